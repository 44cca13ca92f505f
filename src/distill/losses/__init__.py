"""Loss terms. Each is an `nn.Module` over a plain function on tensors.

Importing this package registers every term in `distill.registry.LOSSES`.
"""

from distill.losses.base import LossTerm
from distill.losses.features import (
    PKT,
    AttentionTransfer,
    FitNets,
    SimilarityPreserving,
    at_loss,
    attention_map,
    hint_loss,
    pkt_loss,
    sp_loss,
)
from distill.losses.logits import (
    CTKD,
    DIST,
    DKD,
    KD,
    LSKD,
    CrossEntropy,
    LogitMSE,
    Weighted,
    dist_loss,
    dkd_loss,
    kd_loss,
    logit_mse,
    lskd_loss,
    soft_cross_entropy,
    standardize_logits,
    teacher_sample_weights,
)
from distill.losses.relations import CRD, RKD, nce_loss, rkd_loss

__all__ = [
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "KD",
    "LSKD",
    "PKT",
    "RKD",
    "AttentionTransfer",
    "CrossEntropy",
    "FitNets",
    "LogitMSE",
    "LossTerm",
    "SimilarityPreserving",
    "Weighted",
    "at_loss",
    "attention_map",
    "dist_loss",
    "dkd_loss",
    "hint_loss",
    "kd_loss",
    "logit_mse",
    "lskd_loss",
    "nce_loss",
    "pkt_loss",
    "rkd_loss",
    "soft_cross_entropy",
    "sp_loss",
    "standardize_logits",
    "teacher_sample_weights",
]
