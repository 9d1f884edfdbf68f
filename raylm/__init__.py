"""raylm: Simple Transformers' language-modeling API (MLM, CLM) on Ray Train and Ray Data."""

from raylm.api import LanguageModelingModel
from raylm.config import LanguageModelingArgs
from raylm.errors import ClusterError, ConfigError, DataError, DivergenceError, ModelError, OutputDirError, RaylmUserError, TrainingFailed
from raylm.sweep import SweepConfig, SweepResult, run_sweep

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
