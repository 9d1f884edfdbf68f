"""Bad input fails with a clear message before Ray starts, and leaves output_dir untouched."""

import os

import pytest

from raylm import ConfigError, DataError, LanguageModelingArgs, LanguageModelingModel, ModelError, OutputDirError, launcher

from conftest import TINY_GPT2, tiny_args


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(launcher, "ensure_ray", refuse)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(200)), encoding="utf-8")
    return str(path)


def _gpt2(tmp_path, text_file, **overrides):
    args = tiny_args(tmp_path / "out", mlm=False, vocab_size=300, config=TINY_GPT2, **overrides)
    return LanguageModelingModel("gpt2", None, args=args, train_files=text_file)


def _bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_text("\n   \n\t\n")
    elif kind == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" * 100)
    elif kind == "latin1":
        path.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 20)
    return str(path)


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "does not exist"), ("empty", "is empty"), ("blank", "only whitespace"), ("binary", "looks binary"), ("latin1", "not valid UTF-8")],
)
def test_bad_train_file(tmp_path, text_file, kind, message):
    model = _gpt2(tmp_path, text_file)
    path = str(tmp_path / "nope.txt") if kind == "missing" else _bad_file(tmp_path, kind)
    with pytest.raises(DataError, match=message):
        model.train_model(path)


def test_glob_without_matches(tmp_path, text_file):
    with pytest.raises(DataError, match="matches no files"):
        _gpt2(tmp_path, text_file).train_model(str(tmp_path / "*.nothing"))


def test_unknown_model_type(tmp_path, text_file):
    with pytest.raises(ModelError, match=r"Unknown model_type 'gtp2'.*did you mean 'gpt2'"):
        LanguageModelingModel("gtp2", None, args={"vocab_size": 300}, train_files=text_file)


def test_causal_model_with_mlm_true(tmp_path, text_file):
    with pytest.raises(ModelError, match="Set mlm=False"):
        LanguageModelingModel("gpt2", None, args={"vocab_size": 300}, train_files=text_file)


def test_masked_model_with_mlm_false(tmp_path, text_file):
    with pytest.raises(ModelError, match="Set mlm=True"):
        LanguageModelingModel("bert", None, args={"vocab_size": 300, "mlm": False}, train_files=text_file)


def test_from_scratch_without_vocab_size(text_file):
    with pytest.raises(ModelError, match="vocab_size"):
        LanguageModelingModel("gpt2", None, args={"mlm": False}, train_files=text_file)


def test_from_scratch_without_train_files():
    with pytest.raises(ModelError, match="train_files"):
        LanguageModelingModel("gpt2", None, args={"mlm": False, "vocab_size": 300})


def test_block_size_above_positions(tmp_path, text_file):
    with pytest.raises(ModelError, match="block_size 512 is larger than the model's 128 positions"):
        _gpt2(tmp_path, text_file, block_size=512)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        LanguageModelingModel("gpt2", str(tmp_path / "no-model"), args={"mlm": False})


def test_non_empty_output_dir_is_refused_and_untouched(tmp_path, text_file):
    model = _gpt2(tmp_path, text_file)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("precious")
    model.args.overwrite_output_dir = False
    with pytest.raises(OutputDirError, match="overwrite_output_dir"):
        model.train_model(text_file)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_unknown_arg_in_train_model(tmp_path, text_file):
    with pytest.raises(ConfigError, match="did you mean 'num_train_epochs'"):
        _gpt2(tmp_path, text_file).train_model(text_file, args={"num_epochs": 2})


def test_evaluate_during_training_needs_eval_file(tmp_path, text_file):
    with pytest.raises(ConfigError, match="eval_file"):
        _gpt2(tmp_path, text_file, evaluate_during_training=True).train_model(text_file)


def test_negative_learning_rate(tmp_path, text_file):
    args = LanguageModelingArgs.from_dict({"mlm": False, "vocab_size": 300, "learning_rate": -1e-3})
    with pytest.raises(ConfigError, match="learning_rate"):
        LanguageModelingModel("gpt2", None, args=args, train_files=text_file)
