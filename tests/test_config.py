import pytest
import yaml

from raylm import ConfigError, LanguageModelingArgs


def test_defaults_are_simple_transformers():
    args = LanguageModelingArgs()
    assert (args.mlm, args.mlm_probability, args.block_size, args.max_seq_length) == (True, 0.15, -1, 128)
    assert (args.learning_rate, args.train_batch_size, args.num_train_epochs, args.fp16) == (4e-5, 8, 1, True)
    assert (args.output_dir, args.overwrite_output_dir, args.min_frequency) == ("outputs/", False, 2)
    assert args.special_tokens == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert args.scheduler == "linear_schedule_with_warmup" and args.warmup_ratio == 0.06


def test_unknown_key_in_dict_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"'learning_rat'.*did you mean 'learning_rate'"):
        LanguageModelingArgs.from_dict({"learning_rat": 1e-4})


def test_attribute_typo_is_an_error_too():
    args = LanguageModelingArgs()
    with pytest.raises(ConfigError, match="num_train_epochs"):
        args.num_train_epoch = 3


def test_yaml_round_trip(tmp_path):
    args = LanguageModelingArgs.from_dict({"mlm": False, "adam_betas": [0.9, 0.95], "config": {"n_layer": 2}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(args.to_dict()))
    loaded = LanguageModelingArgs.from_yaml(str(path))
    assert loaded == args and loaded.adam_betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"dataset_type": "lines"}, "dataset_type"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"num_workers": 0}, "num_workers"),
    ],
)
def test_validate_names_the_field(values, field):
    args = LanguageModelingArgs.from_dict(values)
    with pytest.raises(ConfigError, match=field):
        args.validate()


def test_none_dataset_type_means_simple():
    assert LanguageModelingArgs.from_dict({"dataset_type": "None"}).normalized_dataset_type == "simple"
