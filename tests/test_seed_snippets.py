"""Every snippet of the Simple Transformers minimal-start page runs with only the import line changed.

The page (copied to tests/data) is run as written, with three stand-ins the offline test needs:
hub names map to folders this session trained (Google's ELECTRA generator and discriminator to
tiny untrained halves that share the BERT fixture's tokenizer), data/train.txt and data/test.txt are
the sample corpus, and `model_args` is pre-bound to fresh args with a tiny model config, because
snippets 2-6 use it without creating it (a known slip of that page).
"""

import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BERT, TINY_GPT2, read_training_log
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from raylm import LanguageModelingArgs, LanguageModelingModel

SEED_PAGE = os.path.join(os.path.dirname(__file__), "data", "lm-minimal-start.md")


def seed_snippets():
    with open(SEED_PAGE, encoding="utf-8") as f:
        return re.findall(r"### (.+?)\n\n```python\n(.*?)```", f.read(), flags=re.S)


def test_the_page_has_its_six_snippets():
    titles = [title for title, _ in seed_snippets()]
    assert len(titles) == 6 and sum("ELECTRA" in t for t in titles) == 2


@pytest.fixture(scope="module")
def electra_halves(bert_trained, tmp_path_factory):
    """Hub name -> folder: tiny untrained ELECTRA halves saved with the BERT fixture's WordPiece tokenizer.

    Like Google's small generator (128-wide embeddings) and large discriminator (1024), the two
    differ in embedding width, so they cannot share embeddings.
    """
    folder = tmp_path_factory.mktemp("electra-halves")
    tokenizer = bert_trained["model"].tokenizer
    halves = {}
    for hub_name, model_class, overrides in (
        (
            "google/electra-small-generator",
            ElectraForMaskedLM,
            {"hidden_size": 32, "num_attention_heads": 1, "intermediate_size": 64, "embedding_size": 32},
        ),
        ("google/electra-large-discriminator", ElectraForPreTraining, {"embedding_size": 64}),
    ):
        path = folder / hub_name.split("/")[1]
        model_class(ElectraConfig(**{**TINY_BERT, "vocab_size": len(tokenizer), **overrides})).save_pretrained(path)
        tokenizer.save_pretrained(path)
        halves[hub_name] = str(path)
    return halves


def transformers_loss(folder, test_file: str, args: LanguageModelingArgs) -> float:
    """Mean token loss of the model saved in `folder` on `test_file`, as transformers computes it: each non-blank
    line one example (the tokenizer's special tokens around it, or eos after it for a causal LM, truncated to
    block_size); masked models get DataCollatorForLanguageModeling's masks."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = (AutoModelForMaskedLM if args.mlm else AutoModelForCausalLM).from_pretrained(folder).eval()
    block_size = args.block_size if args.block_size > 0 else min(args.max_seq_length, tokenizer.model_max_length)
    with open(test_file, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if args.mlm:
        examples = tokenizer(lines, truncation=True, max_length=block_size)["input_ids"]
    else:
        examples = [
            ids[: block_size - 1] + [tokenizer.eos_token_id]
            for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]
        ]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability)
    loss_sum, targets = 0.0, 0
    torch.manual_seed(0)
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        if args.mlm:
            batch = collator([{"input_ids": ids} for ids in chunk])
        else:  # no collator: it would drop the eos targets of a tokenizer whose pad token is eos
            width = max(map(len, chunk))
            ids = torch.tensor([e + [0] * (width - len(e)) for e in chunk])
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk])
            batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"] if args.mlm else batch["labels"][:, 1:]
        logits = logits if args.mlm else logits[:, :-1]
        loss_sum += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        targets += int((labels != -100).sum())
    return loss_sum / targets


@pytest.mark.parametrize("title, code", seed_snippets(), ids=lambda v: v if len(v) < 60 else "")
def test_seed_snippet_runs(title, code, gpt2_trained, bert_trained, electra_halves, corpus, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(corpus[0], data / "train.txt")
    shutil.copy(corpus[1], data / "test.txt")
    monkeypatch.chdir(tmp_path)
    changed = code.replace("from simpletransformers.language_modeling import", "from raylm import")
    assert changed != code and changed.count("\n") == code.count("\n")
    changed = changed.replace('"bert-base-cased"', repr(bert_trained["dir"])).replace(
        '"gpt2-medium"', repr(gpt2_trained["dir"])
    )
    for hub_name, folder in electra_halves.items():
        changed = changed.replace(repr(hub_name).replace("'", '"'), repr(folder))

    model_args = LanguageModelingArgs()
    model_args.config = TINY_GPT2 if "GPT-2" in title else TINY_BERT
    model_args.max_steps = 15
    model_args.silent = True
    namespace = {"model_args": model_args}
    exec(compile(changed, title, "exec"), namespace)

    result = namespace["result"]
    assert set(result) >= {"eval_loss", "perplexity"} and result["perplexity"] > 1
    assert result["perplexity"] == pytest.approx(
        math.exp(result["generator_loss"] if "ELECTRA" in title else result["eval_loss"])
    )
    assert os.path.isfile(tmp_path / "outputs" / "config.json")
    assert os.path.isfile(tmp_path / "outputs" / "eval_results.txt")
    # The snippet trained as its args say (the first makes its own: one epoch; the others use max_steps), and
    # its result is the saved model's evaluation.
    used_args = namespace["model_args"]
    last_report = read_training_log(tmp_path / "outputs", "train")[-1]
    if used_args is model_args:
        assert last_report["global_step"] == model_args.max_steps
    else:
        assert used_args.max_steps == -1 and last_report["epoch"] == used_args.num_train_epochs == 1
    snippet_model = namespace["model"]
    reloaded = LanguageModelingModel(
        snippet_model.model_type, str(tmp_path / "outputs"), args={"output_dir": str(tmp_path / "reload")}
    )
    assert reloaded.eval_model("data/test.txt")["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)
    # The same loss from the saved folder by transformers alone, so a wrong evaluation cannot pass by being
    # consistent with itself (masks are drawn differently here: MLM agrees to a few percent).
    electra = "ELECTRA" in title
    folder = tmp_path / "outputs" / ("generator_model" if electra else "")
    expected = transformers_loss(folder, "data/test.txt", snippet_model.args)
    measured = result["generator_loss"] if electra else result["eval_loss"]
    assert measured == pytest.approx(expected, rel=0.05 if snippet_model.args.mlm else 1e-4), (measured, expected)
    pretrained = {"BERT": bert_trained, "GPT-2": gpt2_trained}.get(title.split()[2])
    if "scratch" not in title and pretrained is not None:
        # The fine-tuned model started from the trained folder, not from new weights: it keeps most of what
        # that model learnt (15 small steps cannot undo it), far from the untrained model's perplexity.
        assert result["perplexity"] < pretrained["before"]["perplexity"] / 2, (result, pretrained["before"])
    if "ELECTRA" in title:
        assert "google/" not in changed
        precision, recall = result["discriminator_precision"], result["discriminator_recall"]
        assert result["discriminator_f1"] == pytest.approx(
            2 * precision * recall / (precision + recall) if precision + recall else 0.0
        )
        assert result["eval_loss"] == pytest.approx(
            result["generator_loss"] + snippet_model.args.discriminator_loss_weight * result["discriminator_loss"]
        )
        assert 0 < result["replaced_tokens"] < result["eval_input_tokens"]
        for half in ("generator_model", "discriminator_model"):
            assert os.path.isfile(tmp_path / "outputs" / half / "config.json")
