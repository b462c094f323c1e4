"""equiforce.training: losses, optimisers, the loop, checkpoints and metrics."""

from equiforce.training.config import ConfigError, TrainConfig, load_config
from equiforce.training.evaluate import Predictions, compute_metrics, evaluate, predict
from equiforce.training.trainer import TrainResult, train

__all__ = [
    "ConfigError",
    "Predictions",
    "TrainConfig",
    "TrainResult",
    "compute_metrics",
    "evaluate",
    "load_config",
    "predict",
    "train",
]
