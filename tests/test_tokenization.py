"""Tokenizers trained from scratch keep their casing and specials through a save/reload."""

from transformers import AutoTokenizer

from raylm import LanguageModelingArgs
from raylm.tokenization import special_token_layout, train_tokenizer


def _corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(["Hello World from Python", "hello world from python"] * 200), encoding="utf-8")
    return [str(path)]


def test_wordpiece_trained_cased_stays_cased_after_reload(tmp_path):
    args = LanguageModelingArgs.from_dict({"vocab_size": 100, "do_lower_case": False})
    tokenizer = train_tokenizer("bert", _corpus(tmp_path), args, is_causal=False)
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    upper, lower = reloaded.tokenize("Hello"), reloaded.tokenize("hello")
    assert upper != lower and upper == tokenizer.tokenize("Hello")
    assert special_token_layout(reloaded) == ([reloaded.cls_token_id], [reloaded.sep_token_id])


def test_byte_level_bpe_for_causal_lm_adds_no_specials(tmp_path):
    args = LanguageModelingArgs.from_dict({"vocab_size": 300})
    tokenizer = train_tokenizer("gpt2", _corpus(tmp_path), args, is_causal=True)
    assert special_token_layout(tokenizer) == ([], [])
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>" and tokenizer.mask_token == "<mask>"
    assert tokenizer.decode(tokenizer("Hello World")["input_ids"]) == "Hello World"
