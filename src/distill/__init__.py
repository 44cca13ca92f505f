"""distill: knowledge distillation for PyTorch, with the trade measured.

The public names below are imported on first use (PEP 562), so `import distill` and the
`distill --help` that sits on it cost no torch import; `from distill import KD` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "auto_adapter": "distill.adapters",
    "read_outputs": "distill.adapters",
    "CheckpointError": "distill.errors",
    "ConfigError": "distill.errors",
    "DistillError": "distill.errors",
    "TrainingDiverged": "distill.errors",
    "KD": "distill.losses",
    "CrossEntropy": "distill.losses",
    "LogitMSE": "distill.losses",
    "LossTerm": "distill.losses",
    "kd_loss": "distill.losses",
    "logit_mse": "distill.losses",
    "soft_cross_entropy": "distill.losses",
    "Objective": "distill.objective",
    "Batch": "distill.outputs",
    "Outputs": "distill.outputs",
    "as_batch": "distill.outputs",
    "Constant": "distill.schedules",
    "Cosine": "distill.schedules",
    "Linear": "distill.schedules",
    "Progress": "distill.schedules",
    "Schedule": "distill.schedules",
    "Step": "distill.schedules",
    "Warmup": "distill.schedules",
    "FeatureTap": "distill.taps",
    "Teacher": "distill.teachers",
}

__all__ = [
    "Batch",
    "CheckpointError",
    "ConfigError",
    "Constant",
    "Cosine",
    "CrossEntropy",
    "DistillError",
    "FeatureTap",
    "KD",
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


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from distill.adapters import auto_adapter, read_outputs
    from distill.errors import CheckpointError, ConfigError, DistillError, TrainingDiverged
    from distill.losses import KD, CrossEntropy, LogitMSE, LossTerm, kd_loss, logit_mse, soft_cross_entropy
    from distill.objective import Objective
    from distill.outputs import Batch, Outputs, as_batch
    from distill.schedules import Constant, Cosine, Linear, Progress, Schedule, Step, Warmup
    from distill.taps import FeatureTap
    from distill.teachers import Teacher
