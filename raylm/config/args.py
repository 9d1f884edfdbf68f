"""`LanguageModelingArgs`: the fields of fields.py, built from a dict or YAML, checked, and what derives from them.

`validate()` runs once, on the driver, before Ray starts, and reports every bad field with its fix; the worker
receives `to_dict()` and rebuilds the object with `from_dict()`. Derived values are properties, never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass
from typing import Any, Iterator

import yaml

from raylm.config.fields import LanguageModelingFields
from raylm.config.values import (
    CHECKPOINT_UPLOAD_MODES,
    DATASET_TYPES,
    OPTIMIZERS,
    PARALLEL_STRATEGIES,
    SCHEDULERS,
    YamlLoader,
    accepts,
    raise_problems,
    type_errors,
)
from raylm.errors import ConfigError


@dataclass
class LanguageModelingArgs(LanguageModelingFields):
    """Every option of a raylm run (fields.py). Unknown names are rejected with the closest field suggested."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Simple Transformers code sets attributes one by one (model_args.x = ...); a typo there
        # must fail as loudly as a typo in a dict.
        if name not in _FIELD_NAMES:
            raise unknown_fields_error([name])
        super().__setattr__(name, value)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict) -> "LanguageModelingArgs":
        args = cls()
        args.update_from_dict(values)
        return args

    @classmethod
    def from_yaml(cls, path: str) -> "LanguageModelingArgs":
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=YamlLoader) or {}
        return cls.from_dict(values)

    def update_from_dict(self, values: dict) -> None:
        """Simple Transformers' name for merging a dict into the args (unknown keys are an error here)."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"args must be a dict or LanguageModelingArgs, got {type(values).__name__}",
                "Pass LanguageModelingArgs() or a dict of its fields",
            )
        unknown = [k for k in values if k not in _FIELD_NAMES]
        if unknown:
            raise unknown_fields_error(unknown)
        for key, value in values.items():
            setattr(self, key, _coerce(key, value))

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def copy(self) -> "LanguageModelingArgs":
        return LanguageModelingArgs.from_dict(json.loads(json.dumps(self.to_dict())))

    def save(self, output_dir: str) -> None:
        values = {k: v for k, v in self.to_dict().items() if k not in self.not_saved_args}
        with open(os.path.join(output_dir, "model_args.json"), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)

    def load(self, input_dir: str) -> None:
        """The settings saved in a model folder's model_args.json, except NEVER_FROM_MODEL_FOLDER's."""
        path = os.path.join(input_dir, "model_args.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            self.update_from_dict(
                {k: v for k, v in saved.items() if k in _FIELD_NAMES and k not in NEVER_FROM_MODEL_FOLDER}
            )

    # --- derived values (never written back) ---------------------------------------------------
    @property
    def normalized_dataset_type(self) -> str:
        return "simple" if self.dataset_type in (None, "None") else self.dataset_type

    @property
    def is_elastic(self) -> bool:
        return isinstance(self.num_workers, (list, tuple))

    @property
    def min_workers(self) -> int:
        return int(self.num_workers[0]) if self.is_elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return int(self.num_workers[1]) if self.is_elastic else self.num_workers

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step, over all workers: fixed by the job, whatever an elastic run's worker count."""
        return self.train_batch_size * self.gradient_accumulation_steps * self.max_workers

    @property
    def seed(self) -> int:
        return 42 if self.manual_seed is None else int(self.manual_seed)

    def warmup_steps_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(total_steps * self.warmup_ratio)

    # --- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every value once, before anything starts; raise one ConfigError naming every bad field and its fix."""
        raise_problems(self.problems())

    def problems(self) -> list[ConfigError]:
        """Every problem of the values: the wrong types in one ConfigError, then each value out of range."""
        wrong = type_errors(self.to_dict(), FIELD_TYPES)
        found = (
            [
                ConfigError(
                    f"Wrong value type{'s' if len(wrong) > 1 else ''}: " + "; ".join(wrong),
                    "Set each to a value of its type (in YAML, write numbers without quotes: 5e-5, not '5e-5')",
                )
            ]
            if wrong
            else []
        )
        return found + self.value_problems()

    def value_problems(self) -> list[ConfigError]:
        """Each value out of its range; a field of the wrong type is left to `type_errors` (checked at its default)."""
        defaults = LanguageModelingArgs()
        well_typed = dataclasses.replace(
            self,
            **{
                name: getattr(defaults, name)
                for name in self.to_dict()
                if not accepts(FIELD_TYPES[name], getattr(self, name))
            },
        )
        return list(well_typed._range_problems())

    def _range_problems(self) -> Iterator[ConfigError]:
        # One `if ...: yield ConfigError(...)` per rule; every rule runs, so a job learns all its problems at once.
        positive_ints = (
            "train_batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "max_seq_length",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                yield ConfigError(f"{name} must be a positive integer, got {value!r}", f"Set {name} to 1 or more")
        if self.is_elastic:
            bounds = list(self.num_workers)
            if (
                len(bounds) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                or not 1 <= bounds[0] <= bounds[1]
            ):
                yield ConfigError(
                    "num_workers must be a positive integer or [min, max] with "
                    f"1 <= min <= max, got {self.num_workers!r}",
                    "Set num_workers to e.g. 4, or [2, 8] for an elastic run",
                )
            elif self.max_failures == 0 and self.max_preemption_failures == 0:
                yield ConfigError(
                    f"num_workers {bounds} is elastic, but max_failures and max_preemption_failures are 0, so the "
                    "first lost node ends the run instead of shrinking it",
                    "Set max_failures to the node losses to ride out, e.g. 10, or max_preemption_failures to -1 "
                    "(spot reclaims only)",
                )
        elif not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            yield ConfigError(
                f"num_workers must be a positive integer, got {self.num_workers!r}",
                "Set num_workers to 1 or more, or [min, max] for an elastic run",
            )
        if not self.elastic_resize_check_s > 0:
            yield ConfigError(
                f"elastic_resize_check_s must be positive, got {self.elastic_resize_check_s!r}",
                "Set elastic_resize_check_s to a number of seconds such as 60",
            )
        if self.num_train_epochs < 1 and self.max_steps <= 0:
            yield ConfigError(
                f"num_train_epochs is {self.num_train_epochs} and max_steps is "
                f"{self.max_steps}, so nothing would be trained",
                "Set num_train_epochs >= 1 or max_steps > 0",
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            yield ConfigError(
                f"learning_rate must be a positive number, got {self.learning_rate!r}",
                "Set learning_rate to a value such as 5e-5",
            )
        if not 0.0 < self.mlm_probability < 1.0:
            yield ConfigError(
                f"mlm_probability must be between 0 and 1, got {self.mlm_probability!r}",
                "Set mlm_probability to a value such as 0.15",
            )
        if not 0.0 < self.stride <= 1.0:
            yield ConfigError(
                f"stride must be in (0, 1], got {self.stride!r}", "Set stride to a fraction of the window, such as 0.8"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            yield ConfigError(
                f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}", "Set warmup_ratio to a value such as 0.06"
            )
        if self.weight_decay < 0 or self.warmup_steps < 0:
            yield ConfigError("weight_decay and warmup_steps must not be negative", "Set them to 0 or more")
        if self.normalized_dataset_type not in DATASET_TYPES:
            yield ConfigError(
                f"dataset_type {self.dataset_type!r} is not one of {', '.join(DATASET_TYPES)}",
                "Use 'text' to pack lines into full blocks or 'simple' for one example per line",
            )
        if self.packing_document_mask and self.normalized_dataset_type != "text":
            yield ConfigError(
                "packing_document_mask keeps the documents of a packed block apart, but "
                f"dataset_type is {self.dataset_type!r}, whose packed lines are always kept apart",
                "Set dataset_type='text', or packing_document_mask=False",
            )
        if self.scheduler not in SCHEDULERS:
            yield ConfigError(f"scheduler {self.scheduler!r} is unknown", f"Use one of {', '.join(SCHEDULERS)}")
        if self.optimizer not in OPTIMIZERS:
            yield ConfigError(f"optimizer {self.optimizer!r} is unknown", f"Use one of {', '.join(OPTIMIZERS)}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 16):
            yield ConfigError(
                f"vocab_size must be an integer of at least 16, got {self.vocab_size!r}",
                "Set vocab_size to the tokenizer size you want, e.g. 30000",
            )
        if self.tokenizer_sample_mb is not None and not (
            self.tokenizer_sample_mb > 0 and math.isfinite(self.tokenizer_sample_mb)
        ):
            yield ConfigError(
                f"tokenizer_sample_mb must be a positive number of MB, got {self.tokenizer_sample_mb!r}",
                "Set tokenizer_sample_mb to the text to learn the tokenizer from, "
                "e.g. 1000 (about 1 GB), or None for the whole corpus",
            )
        if self.shard_size_mb <= 0:
            yield ConfigError(
                f"shard_size_mb must be positive, got {self.shard_size_mb!r}", "Set shard_size_mb to a value such as 4"
            )
        if self.max_failures < 0:
            yield ConfigError(
                f"max_failures must be 0 or more, got {self.max_failures!r}",
                "Set max_failures to the number of restarts to allow",
            )
        if self.max_preemption_failures < -1:
            yield ConfigError(
                f"max_preemption_failures must be -1 (no limit) or more, got {self.max_preemption_failures!r}",
                "Set max_preemption_failures to the spot reclaims to ride out, or -1",
            )
        if not self.preemption_grace_s >= 0:
            yield ConfigError(
                f"preemption_grace_s must be 0 or more, got {self.preemption_grace_s!r}",
                "Set preemption_grace_s to the seconds an upload may run past a reclaim's deadline, e.g. 30",
            )
        if self.checkpoint_upload_mode not in CHECKPOINT_UPLOAD_MODES:
            yield ConfigError(
                f"checkpoint_upload_mode {self.checkpoint_upload_mode!r} is not "
                f"one of {', '.join(CHECKPOINT_UPLOAD_MODES)}",
                "Use 'sync' (the default) or 'async' to upload checkpoints while training goes on",
            )
        if self.parallel_strategy not in PARALLEL_STRATEGIES:
            yield ConfigError(
                f"parallel_strategy {self.parallel_strategy!r} is not one of {', '.join(PARALLEL_STRATEGIES)}",
                "Use 'ddp' (the default: every worker holds the whole model) "
                "or 'fsdp' to shard the model over the workers",
            )
        elif self.parallel_strategy == "fsdp" and self.torch_compile:
            # Seen on CPU (gloo, 2 ranks, torch 2.13): compiling the fully_shard-ed GPT-2 did not finish its
            # first step in 400 s.
            yield ConfigError(
                "torch_compile is not supported with parallel_strategy 'fsdp' yet (compiling "
                "the sharded model's all-gathers did not finish a first step)",
                "Set torch_compile=False, or parallel_strategy='ddp'",
            )
        if self.fsdp_cpu_offload and self.parallel_strategy != "fsdp":
            yield ConfigError(
                "fsdp_cpu_offload keeps FSDP's shards in CPU memory, but "
                f"parallel_strategy is {self.parallel_strategy!r}",
                "Set parallel_strategy='fsdp', or fsdp_cpu_offload=False",
            )
        if self.fsdp_checkpoint_hf_weights and self.parallel_strategy != "fsdp":
            yield ConfigError(
                "fsdp_checkpoint_hf_weights adds Hugging Face weights to FSDP's sharded checkpoints, but "
                f"parallel_strategy is {self.parallel_strategy!r} (DDP checkpoints always hold them)",
                "Set parallel_strategy='fsdp', or fsdp_checkpoint_hf_weights=False",
            )
        if self.fsdp_reduce_scatter_every_micro_batch and self.parallel_strategy != "fsdp":
            yield ConfigError(
                "fsdp_reduce_scatter_every_micro_batch reduce-scatters FSDP's sharded gradients, but "
                f"parallel_strategy is {self.parallel_strategy!r} (DDP all-reduces once, after the last micro-batch)",
                "Set parallel_strategy='fsdp', or leave fsdp_reduce_scatter_every_micro_batch None",
            )
        gpus = self.resources_per_worker.get("GPU", 1) if isinstance(self.resources_per_worker, dict) else 1
        if gpus != 1:
            # A worker trains on one device (Ray's cuda:0 for it): more would sit idle, a fraction would share one.
            yield ConfigError(
                f"resources_per_worker reserves {gpus!r} GPUs per worker, but a worker trains on exactly one GPU",
                "Set resources_per_worker's 'GPU' to 1 (or leave it out) and num_workers to the number of GPUs",
            )
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            yield ConfigError(
                f"checkpoints_to_keep must be 1 or more, got {self.checkpoints_to_keep!r}",
                "Set checkpoints_to_keep to None to keep every checkpoint, or to the number to keep",
            )
        if self.keep_best_checkpoints and not self.evaluate_during_training:
            yield ConfigError(
                "keep_best_checkpoints ranks checkpoints by their evaluation, but evaluate_during_training is False",
                "Set evaluate_during_training=True (with an eval_file), or keep_best_checkpoints=False",
            )
        if self.prefetch_batches < 0:
            yield ConfigError(
                f"prefetch_batches must be 0 or more, got {self.prefetch_batches!r}",
                "Set prefetch_batches to a small number such as 2",
            )
        # The masking hash takes the seed as an unsigned 64-bit integer and numpy's RandomState (a random
        # sweep's sampler) as an unsigned 32-bit one: a seed outside [0, 2**32) fails later, in a worker.
        if self.manual_seed is not None and not 0 <= self.manual_seed < 2**32:
            yield ConfigError(
                f"manual_seed must be between 0 and 2**32 - 1 (4294967295), got {self.manual_seed!r}",
                "Set manual_seed to a value such as 42, or leave it None",
            )


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(LanguageModelingArgs))
# Fields that decide what code runs, where a run writes, or which account it reports to. Only the user
# sets them: a downloaded model folder's model_args.json could otherwise switch on the code shipped in
# that folder (its config.json's auto_map) or point outputs, checkpoints and trackers wherever it likes.
NEVER_FROM_MODEL_FOLDER = frozenset(
    {
        "trust_remote_code",
        "output_dir",
        "overwrite_output_dir",
        "best_model_dir",
        "cache_dir",
        "tensorboard_dir",
        "storage_path",
        "experiment_name",
        "resume",
        "wandb_project",
        "wandb_kwargs",
    }
)
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(LanguageModelingArgs)


def field_help() -> dict[str, str]:
    """Field name -> help text, in declaration order (for --help and the README)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(LanguageModelingArgs)}


def unknown_fields_error(unknown: list[str]) -> ConfigError:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, _FIELD_NAMES, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(
        f"Unknown argument{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}",
        "Use the field names of LanguageModelingArgs (python -m raylm.train --help lists them)",
    )


def _coerce(name: str, value: Any) -> Any:
    # YAML and JSON give lists where the dataclass has tuples.
    if name == "adam_betas" and isinstance(value, list):
        return tuple(value)
    # Tune's samplers can hand out numpy scalars, which JSON (to_dict) cannot write.
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    declared = typing.get_args(FIELD_TYPES[name]) or (FIELD_TYPES[name],)
    if float in declared and isinstance(value, numbers.Real):
        return float(value)
    if int in declared and isinstance(value, numbers.Integral):
        return int(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
