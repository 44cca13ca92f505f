"""Loss terms. Each is an `nn.Module` over a plain function on tensors."""

from distill.losses.base import LossTerm
from distill.losses.logits import KD, CrossEntropy, LogitMSE, kd_loss, logit_mse, soft_cross_entropy

__all__ = ["KD", "CrossEntropy", "LogitMSE", "LossTerm", "kd_loss", "logit_mse", "soft_cross_entropy"]

# Registers detector_loss, fpn_imitation, det_head_kd (pure torch; torchvision is not imported).
from distill.losses import detection as _detection  # noqa: E402, F401
