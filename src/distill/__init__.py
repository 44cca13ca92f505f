"""distill: knowledge distillation for PyTorch, with the trade measured."""

from distill.adapters import auto_adapter, read_outputs
from distill.errors import CheckpointError, ConfigError, DistillError, TrainingDiverged
from distill.losses import KD, CrossEntropy, LogitMSE, LossTerm, kd_loss, logit_mse, soft_cross_entropy
from distill.objective import Objective
from distill.outputs import Batch, Outputs, as_batch
from distill.schedules import Constant, Cosine, Linear, Progress, Schedule, Step, Warmup
from distill.taps import FeatureTap
from distill.teachers import Teacher

__version__ = "0.1.0"

__all__ = [
    "KD",
    "Batch",
    "CheckpointError",
    "ConfigError",
    "Constant",
    "Cosine",
    "CrossEntropy",
    "DistillError",
    "FeatureTap",
    "Linear",
    "LogitMSE",
    "LossTerm",
    "Objective",
    "Outputs",
    "Progress",
    "Schedule",
    "Step",
    "Teacher",
    "TrainingDiverged",
    "Warmup",
    "as_batch",
    "auto_adapter",
    "kd_loss",
    "logit_mse",
    "read_outputs",
    "soft_cross_entropy",
]
