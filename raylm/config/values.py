"""Reading and checking values: the YAML loader, the choices a field allows, type checks, one report of problems."""

from __future__ import annotations

import numbers
import re
import typing
from typing import Any, Union

import yaml

from raylm.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `1e-4` is a float (as in YAML 1.2) rather than the string '1e-4'.

    PyYAML follows YAML 1.1, where a float needs a dot; a learning rate written `5e-5` would
    otherwise arrive as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

SCHEDULERS = (
    "constant_schedule",
    "constant_schedule_with_warmup",
    "linear_schedule_with_warmup",
    "cosine_schedule_with_warmup",
    "cosine_with_hard_restarts_schedule_with_warmup",
    "polynomial_decay_schedule_with_warmup",
)
OPTIMIZERS = ("AdamW", "Adafactor")
DATASET_TYPES = ("simple", "line_by_line", "text")
CHECKPOINT_UPLOAD_MODES = ("sync", "async")
PARALLEL_STRATEGIES = ("ddp", "fsdp")


def raise_problems(problems: list[ConfigError]) -> None:
    """Raise the one problem as it is, or several as one ConfigError that lists each with its fix."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = " ".join(
            f"({number}) {problem.problem.rstrip('.')}: {problem.fix.rstrip('.')}."
            for number, problem in enumerate(problems, start=1)
        )
        raise ConfigError(
            f"{len(problems)} problems, all reported at once: {listed.rstrip('.')}",
            "Correct each of them (python -m raylm.train --help describes every key)",
        )


def type_errors(values: dict, types: dict[str, Any]) -> list[str]:
    """'name must be <type>, got <value>' for each value whose type does not fit (a string where a number belongs)."""
    return [
        f"{name} must be {describe(types[name])}, got {value!r}"
        for name, value in values.items()
        if not accepts(types[name], value)
    ]


def accepts(expected: Any, value: Any) -> bool:
    if typing.get_origin(expected) is Union:
        return any(accepts(option, value) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if isinstance(value, bool):
        return expected is bool
    # numbers.* so that numpy scalars from Tune's samplers fit too.
    if expected is float:
        return isinstance(value, numbers.Real)
    if expected is int:
        return isinstance(value, numbers.Integral)
    if expected in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def describe(expected: Any) -> str:
    if typing.get_origin(expected) is Union:
        return " or ".join(describe(option) for option in typing.get_args(expected))
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        tuple: "a list",
        type(None): "null",
    }
    return names.get(expected, getattr(expected, "__name__", str(expected)))
