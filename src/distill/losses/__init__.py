"""Loss terms. Each is an `nn.Module` over a plain function on tensors."""

from distill.losses import embeddings, transformer  # noqa: F401  (register embed_*, hidden_*, attn_kl)
from distill.losses.base import LossTerm
from distill.losses.logits import KD, CrossEntropy, LogitMSE, kd_loss, logit_mse, soft_cross_entropy
from distill.losses.sequence import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    token_cross_entropy,
    token_divergence,
    topk_forward_kl,
    total_variation,
)

__all__ = [
    "KD",
    "CrossEntropy",
    "LogitMSE",
    "LossTerm",
    "forward_kl",
    "generalized_jsd",
    "kd_loss",
    "logit_mse",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "token_cross_entropy",
    "token_divergence",
    "topk_forward_kl",
    "total_variation",
]
