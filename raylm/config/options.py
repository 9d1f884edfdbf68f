"""The fields of `LanguageModelingArgs` -> docs/options.md: name, type, default, help, and Simple Transformers'
default where it differs.

    python -m raylm.config.options > docs/options.md

The help is the fields' own (the same text `python -m raylm.train --help` prints); the sections are the
`# --- title ---` comments that group the fields in fields.py. tests/test_docs.py fails when the file is stale.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any, Union

from raylm.config.args import FIELD_TYPES, LanguageModelingArgs

FIELDS_SOURCE = Path(__file__).with_name("fields.py")


@dataclasses.dataclass(frozen=True)
class Computed:
    """A default Simple Transformers computes at run time, written as it reads."""

    text: str


# Simple Transformers 0.70.8's defaults (its config/model_args.py: ModelArgs and LanguageModelingArgs) for the
# fields raylm shares with it; a field missing here is raylm's own.
SIMPLE_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "mlm": True,
    "mlm_probability": 0.15,
    "block_size": -1,
    "max_seq_length": 128,
    "dataset_type": "None",
    "sliding_window": False,
    "stride": 0.8,
    "tokenizer_name": None,
    "vocab_size": None,
    "min_frequency": 2,
    "special_tokens": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "clean_text": True,
    "handle_chinese_chars": True,
    "strip_accents": True,
    "do_lower_case": False,
    "config_name": None,
    "config": {},
    "generator_config": {},
    "discriminator_config": {},
    "discriminator_loss_weight": 50.0,
    "tie_generator_and_discriminator_embeddings": True,
    "trust_remote_code": False,
    "train_batch_size": 8,
    "eval_batch_size": 100,
    "num_train_epochs": 1,
    "max_steps": -1,
    "learning_rate": 4e-5,
    "optimizer": "AdamW",
    "weight_decay": 0.0,
    "adam_epsilon": 1e-8,
    "adam_betas": (0.9, 0.999),
    "scheduler": "linear_schedule_with_warmup",
    "warmup_ratio": 0.06,
    "warmup_steps": 0,
    "cosine_schedule_num_cycles": 0.5,
    "polynomial_decay_schedule_lr_end": 1e-7,
    "polynomial_decay_schedule_power": 1.0,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": 1.0,
    "fp16": True,
    "manual_seed": None,
    "output_dir": "outputs/",
    "overwrite_output_dir": False,
    "best_model_dir": "outputs/best_model",
    "no_save": False,
    "not_saved_args": [],
    "logging_steps": 50,
    "save_steps": 2000,
    "save_model_every_epoch": True,
    "save_optimizer_and_scheduler": True,
    "save_eval_checkpoints": True,
    "save_best_model": True,
    "evaluate_during_training": False,
    "evaluate_during_training_steps": 2000,
    "evaluate_during_training_verbose": False,
    "evaluate_during_training_silent": True,
    "evaluate_each_epoch": True,
    "use_early_stopping": False,
    "early_stopping_metric": "eval_loss",
    "early_stopping_metric_minimize": True,
    "early_stopping_delta": 0.0,
    "early_stopping_patience": 3,
    "early_stopping_consider_epochs": False,
    "silent": False,
    "tensorboard_dir": None,
    "wandb_project": None,
    "wandb_kwargs": {},
    "reprocess_input_data": True,
    "no_cache": False,
    "cache_dir": "cache_dir/",
    "use_multiprocessing": True,
    "process_count": Computed("os.cpu_count() - 2, at least 1"),
    "dataloader_num_workers": 0,
    "n_gpu": 1,
    "local_rank": -1,
}

_SECTION = re.compile(r"^\s*# --- (.+?) -+$")
_FIELD_LINE = re.compile(r"^    (\w+): ")


def sections() -> list[tuple[str, list[str]]]:
    """(title, field names) in declaration order, from the `# --- title ---` comments of fields.py."""
    grouped: list[tuple[str, list[str]]] = []
    for line in FIELDS_SOURCE.read_text(encoding="utf-8").splitlines():
        if heading := _SECTION.match(line):
            grouped.append((heading.group(1), []))
        elif (name := _FIELD_LINE.match(line)) and grouped:
            grouped[-1][1].append(name.group(1))
    return grouped


def type_name(declared: Any) -> str:
    if typing.get_origin(declared) is Union:
        return " or ".join(type_name(option) for option in typing.get_args(declared))
    return "null" if declared is type(None) else declared.__name__


def format_default(value: Any) -> str:
    """As a YAML job writes it (tuples as lists, None as null)."""
    if isinstance(value, Computed):
        return value.text
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _cell(text: str) -> str:
    # "|" would end the cell, even inside a code span.
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    # A bare "<name>" in prose would be read as an HTML tag and vanish (code spans keep it as it is).
    return text.replace("<", "&lt;")


def options_markdown() -> str:
    """docs/options.md, whole."""
    defaults = LanguageModelingArgs().to_dict()
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(LanguageModelingArgs)}
    lines = [
        "# Options",
        "",
        "Every field of `LanguageModelingArgs`: a key of a YAML job, a `key=value` override of",
        "`python -m raylm.train`, and an attribute in Python (`model_args.learning_rate = 1e-4`).",
        "Generated from `raylm/config/fields.py` by `python -m raylm.config.options > docs/options.md`;",
        "do not edit by hand. The last column gives Simple Transformers 0.70.8's default where it differs",
        "(empty: the same; *raylm only*: a field it does not have).",
    ]
    for title, names in sections():
        lines += ["", f"## {title[0].upper()}{title[1:]}", ""]
        lines += ["| option | type | default | Simple Transformers | help |", "|---|---|---|---|---|"]
        for name in names:
            ours = format_default(defaults[name])
            if name not in SIMPLE_TRANSFORMERS_DEFAULTS:
                theirs = "*raylm only*"
            else:
                theirs = format_default(SIMPLE_TRANSFORMERS_DEFAULTS[name])
                theirs = "" if theirs == ours else f"`{theirs}`"
            cells = [f"`{name}`", type_name(FIELD_TYPES[name]), f"`{ours}`", theirs, _prose(helps[name])]
            lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from raylm.console import write_result

    write_result(options_markdown())
