"""raylm: Simple Transformers' language-modeling API (MLM, CLM, ELECTRA) on Ray Train, Ray Data and Ray Tune."""

import importlib

# Public name -> the module that defines it. Loaded on first use: Ray Data's tokenizing tasks import
# raylm.data.datasets in fresh processes, and importing the whole API there (torch, transformers, Ray
# Train and Tune) cost seconds per process before the first batch.
_EXPORTS = {
    "LanguageModelingModel": "raylm.api",
    "LanguageModelingArgs": "raylm.config",
    "run_sweep": "raylm.sweep",
    "SweepConfig": "raylm.sweep",
    "SweepResult": "raylm.sweep",
    "RaylmUserError": "raylm.errors",
    "ConfigError": "raylm.errors",
    "DataError": "raylm.errors",
    "ModelError": "raylm.errors",
    "OutputDirError": "raylm.errors",
    "ClusterError": "raylm.errors",
    "DivergenceError": "raylm.errors",
    "TrainingFailed": "raylm.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raylm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
