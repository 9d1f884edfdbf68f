"""`LanguageModelingArgs`: the one typed configuration that flows from Python, YAML or the CLI into the loop.

`fields` declares every option (name, type, default, help: the single source of `--help` and docs/options.md),
`args` adds construction, derived values and validation, `values` reads and checks values, and `options`
writes docs/options.md.
"""

from raylm.config.args import (
    FIELD_TYPES,
    NEVER_FROM_MODEL_FOLDER,
    LanguageModelingArgs,
    field_help,
    unknown_fields_error,
)
from raylm.config.values import YamlLoader, raise_problems, type_errors

__all__ = [
    "FIELD_TYPES",
    "NEVER_FROM_MODEL_FOLDER",
    "LanguageModelingArgs",
    "YamlLoader",
    "field_help",
    "raise_problems",
    "type_errors",
    "unknown_fields_error",
]
