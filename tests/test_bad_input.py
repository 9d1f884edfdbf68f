"""Bad input fails with a clear message before Ray starts, and leaves output_dir untouched."""

import dataclasses
import os
import pathlib

import pytest
from conftest import TINY_GPT2, tiny_args

from raylm import ConfigError, DataError, LanguageModelingModel, ModelError, OutputDirError

# Every test here: bad input is reported before Ray starts (conftest's no_ray fails the test if it does).
pytestmark = pytest.mark.usefixtures("no_ray")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "\n".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(200)), encoding="utf-8"
    )
    return str(path)


def _gpt2(tmp_path, text_file, **overrides):
    args = tiny_args(
        overrides.pop("output_dir", tmp_path / "out"), mlm=False, vocab_size=300, config=TINY_GPT2, **overrides
    )
    return LanguageModelingModel("gpt2", None, args=args, train_files=text_file)


def test_glob_without_matches(tmp_path, text_file):
    with pytest.raises(DataError, match="matches no files"):
        _gpt2(tmp_path, text_file).train_model(str(tmp_path / "*.nothing"))


def test_masked_model_with_mlm_false(tmp_path, text_file):
    with pytest.raises(ModelError, match="Set mlm=True"):
        LanguageModelingModel("bert", None, args={"vocab_size": 300, "mlm": False}, train_files=text_file)


def test_from_scratch_without_train_files():
    with pytest.raises(ModelError, match="train_files"):
        LanguageModelingModel("gpt2", None, args={"mlm": False, "vocab_size": 300})


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        LanguageModelingModel("gpt2", str(tmp_path / "no-model"), args={"mlm": False})


def _snapshot(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _saved_model(tmp_path, model_type, config, vocab_size):
    """A tiny model folder saved the way raylm saves one (no Ray needed)."""
    from transformers import AutoTokenizer

    folder = tmp_path / f"saved-{model_type}-{vocab_size}"
    if not folder.exists():
        corpus = _write(tmp_path / "tok.txt", "\n".join(f"word{i} other{i % 7} thing" for i in range(400)).encode())
        mlm = model_type != "gpt2"
        model = LanguageModelingModel(
            model_type, None, args={"mlm": mlm, "vocab_size": vocab_size, "config": config}, train_files=corpus
        )
        model.save_model(str(folder))
        assert AutoTokenizer.from_pretrained(str(folder))
    return str(folder)


# Each row: a kind of bad input, the action that must fail, the error class and what its message must say.
# Every action points output_dir at a folder that already holds a user's files.
BAD_INPUT_TABLE = {
    "missing train file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(str(t / "nope.txt")),
        DataError,
        "does not exist",
    ),
    "whitespace-only train file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(_write(t / "w.txt", b"\n   \n\t\n")),
        DataError,
        r"w\.txt' holds only whitespace",
    ),
    "empty train file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(_write(t / "e.txt", b"")),
        DataError,
        "is empty",
    ),
    "binary train file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(_write(t / "b.txt", b"\x7fELF\x00" * 50)),
        DataError,
        "looks binary",
    ),
    "non-UTF-8 train file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(
            _write(t / "l.txt", "caf\u00e9\n".encode("latin-1") * 9)
        ),
        DataError,
        "not valid UTF-8",
    ),
    "a single 10 MB line": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(_write(t / "long.txt", b"word " * (2 * 2**20))),
        DataError,
        "line of more than 1 MB",
    ),
    "negative learning rate": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, learning_rate=-1e-3),
        ConfigError,
        "learning_rate",
    ),
    "unknown arg": (
        lambda t, out: _gpt2(t, t.text, output_dir=out).train_model(t.text, args={"num_epochs": 2}),
        ConfigError,
        "did you mean 'num_train_epochs'",
    ),
    "evaluate_during_training without eval_file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, evaluate_during_training=True).train_model(t.text),
        ConfigError,
        "no eval_file",
    ),
    "non-empty output_dir without overwrite": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, overwrite_output_dir=False).train_model(t.text),
        OutputDirError,
        "overwrite_output_dir",
    ),
    "unwritable output_dir": (
        lambda t, out: _gpt2(t, t.text).train_model(t.text, output_dir=os.path.join(out, "keep.txt", "model")),
        OutputDirError,
        "cannot be created",
    ),
    "tokenizer folder missing files": (
        lambda t, out: LanguageModelingModel(
            "gpt2", None, args={"mlm": False, "output_dir": out, "tokenizer_name": str(t / "empty-tok")}
        ),
        ModelError,
        "has no tokenizer files",
    ),
    "tokenizer larger than the model's embeddings": (
        lambda t, out: LanguageModelingModel(
            "gpt2",
            _saved_model(t, "gpt2", TINY_GPT2, 300),
            args={"mlm": False, "output_dir": out, "tokenizer_name": _saved_model(t, "gpt2", TINY_GPT2, 900)},
        ),
        ModelError,
        "embeddings",
    ),
    "block_size above the model's positions": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, block_size=512),
        ModelError,
        "larger than the model's 128 positions",
    ),
    "checkpoint folder of another model type": (
        lambda t, out: LanguageModelingModel("bert", _saved_model(t, "gpt2", TINY_GPT2, 300), args={"output_dir": out}),
        ModelError,
        "holds a 'gpt2' model, not a 'bert' one",
    ),
    "train_batch_size 0": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, train_batch_size=0),
        ConfigError,
        "train_batch_size",
    ),
    "checkpoints_to_keep 0": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, checkpoints_to_keep=0),
        ConfigError,
        "checkpoints_to_keep must be 1 or more",
    ),
    "keep_best_checkpoints without evaluation": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, checkpoints_to_keep=2, keep_best_checkpoints=True),
        ConfigError,
        "evaluate_during_training is False",
    ),
    "gradient_accumulation_steps 0": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, gradient_accumulation_steps=0),
        ConfigError,
        "gradient_accumulation_steps",
    ),
    "mlm on a causal model": (
        lambda t, out: LanguageModelingModel(
            "gpt2", None, args={"vocab_size": 300, "output_dir": out}, train_files=t.text
        ),
        ModelError,
        "Set mlm=False",
    ),
    "from scratch without vocab_size": (
        lambda t, out: LanguageModelingModel("gpt2", None, args={"mlm": False, "output_dir": out}, train_files=t.text),
        ModelError,
        "vocab_size",
    ),
    "unknown model type": (
        lambda t, out: LanguageModelingModel("gtp2", None, args={"output_dir": out}),
        ModelError,
        "did you mean 'gpt2'",
    ),
    "whitespace-only eval file": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, evaluate_during_training=True).train_model(
            t.text, eval_file=_write(t / "blank.txt", b" \n\n")
        ),
        DataError,
        r"The eval_file '.*blank\.txt' holds only whitespace",
    ),
    "eval file that is not UTF-8": (
        lambda t, out: _gpt2(t, t.text, output_dir=out, evaluate_during_training=True).train_model(
            t.text, eval_file=_write(t / "ev.txt", b"\xff\xfe" * 40)
        ),
        DataError,
        "not valid UTF-8",
    ),
}


@dataclasses.dataclass
class _Scratch:
    """tmp_path plus the shared text file, so each table row is one short lambda."""

    root: pathlib.Path
    text: str

    def __truediv__(self, name: str) -> pathlib.Path:
        return self.root / name


@pytest.mark.parametrize("kind", list(BAD_INPUT_TABLE))
def test_bad_input_table(kind, tmp_path, text_file):
    action, error, message = BAD_INPUT_TABLE[kind]
    scratch = _Scratch(tmp_path, text_file)
    (tmp_path / "empty-tok").mkdir()
    (tmp_path / "empty-tok" / "config.json").write_text("{}")
    out = tmp_path / "user-output"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"weights")
    before = _snapshot(out)
    with pytest.raises(error, match=message) as caught:
        action(scratch, str(out))
    assert (
        "\n" not in str(caught.value) and str(caught.value).count(". ") >= 1
    )  # one paragraph: the problem, then the fix
    assert _snapshot(out) == before


def test_mlm_set_by_the_user_is_not_called_the_default(text_file):
    with pytest.raises(ModelError) as caught:
        LanguageModelingModel("gpt2", None, args={"mlm": True, "vocab_size": 300}, train_files=text_file)
    assert "mlm is True" in str(caught.value) and "mlm is True (the default)" not in str(caught.value)
