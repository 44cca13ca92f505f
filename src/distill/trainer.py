"""`from distill.trainer import Trainer`, the import the README shows; the loop lives in `distill.engine`."""

from distill.engine.config import TrainerConfig
from distill.engine.trainer import Trainer

__all__ = ["Trainer", "TrainerConfig"]
