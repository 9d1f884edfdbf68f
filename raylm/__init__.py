"""raylm: Simple Transformers' language-modeling API (MLM, CLM, ELECTRA) on Ray Train and Ray Data."""

from raylm.api import LanguageModelingModel
from raylm.config import LanguageModelingArgs
from raylm.errors import ClusterError, ConfigError, DataError, DivergenceError, ModelError, OutputDirError, RaylmUserError, TrainingFailed

__all__ = [
    "LanguageModelingModel",
    "LanguageModelingArgs",
    "run_sweep",
    "SweepConfig",
    "SweepResult",
    "RaylmUserError",
    "ConfigError",
    "DataError",
    "ModelError",
    "OutputDirError",
    "ClusterError",
    "DivergenceError",
    "TrainingFailed",
]

_SWEEP_NAMES = ("run_sweep", "SweepConfig", "SweepResult")


def __getattr__(name: str):
    # Imported on first use: raylm.sweep pulls in Ray Tune and raylm.train, and importing raylm.train
    # with the package would make `python -m raylm.train` warn that it was already imported.
    if name in _SWEEP_NAMES:
        from raylm import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'raylm' has no attribute {name!r}")
