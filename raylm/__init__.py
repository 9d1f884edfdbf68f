"""raylm: Simple Transformers' language-modeling API (MLM, CLM) on Ray Train and Ray Data."""

from raylm.api import LanguageModelingModel
from raylm.config import LanguageModelingArgs
from raylm.errors import ClusterError, ConfigError, DataError, DivergenceError, ModelError, OutputDirError, RaylmUserError, TrainingFailed

__all__ = [
    "LanguageModelingModel",
    "LanguageModelingArgs",
    "RaylmUserError",
    "ConfigError",
    "DataError",
    "ModelError",
    "OutputDirError",
    "ClusterError",
    "DivergenceError",
    "TrainingFailed",
]
