import re

import numpy as np
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
        ({"num_workers": [3, 2], "max_failures": 1}, "num_workers"),
        ({"num_workers": [1, 2, 4], "max_failures": 1}, "num_workers"),
        ({"num_workers": [1, 2], "max_preemption_failures": 0}, "max_failures"),
        ({"max_preemption_failures": -2}, "max_preemption_failures"),
        ({"preemption_grace_s": -1.0}, "preemption_grace_s"),
        ({"num_workers": [1, 2], "max_failures": 1, "elastic_resize_check_s": 0}, "elastic_resize_check_s"),
        ({"checkpoint_upload_mode": "ASYNC"}, "checkpoint_upload_mode"),
    ],
)
def test_validate_names_the_field(values, field):
    args = LanguageModelingArgs.from_dict(values)
    with pytest.raises(ConfigError, match=field):
        args.validate()


def test_an_elastic_run_keeps_the_global_batch_of_its_largest_size():
    args = LanguageModelingArgs.from_dict(
        {"num_workers": [2, 8], "max_failures": 3, "train_batch_size": 4, "gradient_accumulation_steps": 2}
    )
    args.validate()
    assert (args.is_elastic, args.min_workers, args.max_workers, args.global_batch_size) == (True, 2, 8, 64)
    fixed = LanguageModelingArgs.from_dict({"num_workers": 3, "train_batch_size": 4})
    assert (fixed.is_elastic, fixed.min_workers, fixed.max_workers, fixed.global_batch_size) == (False, 3, 3, 12)


def test_none_dataset_type_means_simple():
    assert LanguageModelingArgs.from_dict({"dataset_type": "None"}).normalized_dataset_type == "simple"


def test_yaml_reads_exponent_numbers_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 5e-5 as a string; jobs and from_yaml must not.
    path = tmp_path / "job.yaml"
    path.write_text("learning_rate: 5e-5\nweight_decay: 1E-2\n")
    loaded = LanguageModelingArgs.from_yaml(str(path))
    assert loaded.learning_rate == 5e-5 and loaded.weight_decay == 0.01
    loaded.validate()


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", "5e-5"), ("num_train_epochs", 2.5), ("fp16", "yes"), ("manual_seed", "42"), ("config", [1, 2])],
)
def test_a_value_of_the_wrong_type_is_named_before_training(field, value):
    args = LanguageModelingArgs()
    setattr(args, field, value)
    with pytest.raises(ConfigError, match=rf"{field} must be .*got {re.escape(repr(value))}"):
        args.validate()


def test_numpy_scalars_from_a_sweep_become_python_numbers():
    args = LanguageModelingArgs.from_dict(
        {"learning_rate": np.float32(0.5), "train_batch_size": np.int64(4), "manual_seed": np.int32(7)}
    )
    args.validate()
    assert (type(args.learning_rate), type(args.train_batch_size), type(args.manual_seed)) == (float, int, int)
    assert args.to_dict()["train_batch_size"] == 4


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_a_seed_the_masking_hash_and_shuffles_cannot_take_is_refused(seed):
    args = LanguageModelingArgs.from_dict({"manual_seed": seed})
    with pytest.raises(ConfigError, match="manual_seed"):
        args.validate()


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_the_extreme_seeds_work_in_the_collate_the_epoch_order_the_workers_and_the_sweep(seed):
    """Every place raylm seeds from manual_seed, called as raylm calls it, at the ends of the accepted range."""
    from raylm.data.collators import hashed_uniform
    from raylm.data.epoch_data import epoch_order
    from raylm.sweep import SweepConfig
    from raylm.sweep.tuner import _search_alg
    from raylm.training.worker import seed_rank

    args = LanguageModelingArgs.from_dict({"manual_seed": seed})
    args.validate()
    draws = hashed_uniform(args.seed, 0, np.arange(3), 4, salt=1)
    assert draws.shape == (3, 4) and ((0 <= draws) & (draws < 1)).all()
    # The epoch's order of one store and of a mixture (api.py and worker.py call epoch_order so).
    single = epoch_order([[64, 64, 10]], None, args.seed, 3, args.global_batch_size)
    assert sorted(zip(*single.locate(0, 138))) == sorted((b, r) for b, n in enumerate([64, 64, 10]) for r in range(n))
    mixture = epoch_order([[64, 64], [64, 5]], [0.7, 0.3], args.seed, 1, args.global_batch_size)
    assert len(mixture.locate(0, 100)[0]) == 100
    seed_rank(args.seed, 1)  # a worker's generator, as rank 1 seeds it
    sweep = SweepConfig.from_dict({"parameters": {"learning_rate": {"values": [1e-4, 1e-3]}}})
    _search_alg(sweep, args.seed, 1)  # a random sweep's sampler, seeded from the job


def test_validate_reports_every_problem_at_once():
    args = LanguageModelingArgs.from_dict(
        {"learning_rate": "fast", "train_batch_size": 0, "stride": 2.0, "checkpoints_to_keep": 0}
    )
    with pytest.raises(ConfigError) as caught:
        args.validate()
    message = str(caught.value)
    assert message.startswith("4 problems") and "\n" not in message
    for part in (
        "learning_rate must be a number, got 'fast'",
        "train_batch_size must be a positive integer, got 0",
        "stride must be in (0, 1], got 2.0",
        "checkpoints_to_keep must be 1 or more, got 0",
    ):
        assert part in message, part
    # The wrongly typed learning_rate is reported once, as a type, not again as out of range.
    assert "learning_rate must be a positive number" not in message


def test_one_problem_is_reported_as_it_is():
    with pytest.raises(ConfigError) as caught:
        LanguageModelingArgs.from_dict({"train_batch_size": 0}).validate()
    assert str(caught.value) == "train_batch_size must be a positive integer, got 0. Set train_batch_size to 1 or more."
