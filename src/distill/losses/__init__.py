"""Loss terms: every method is an `nn.Module` here over a plain tensor function (logits, features,
relations, sequences, detection). May import only the contracts (outputs, registry, errors, schedules).

Importing this package registers every term in `distill.registry.LOSSES`.
"""

from distill.losses import cross_tokenizer, detection, embeddings, transformer  # noqa: F401  (register uld, aligned_kd, det terms, embed_*, hidden_*, attn_kl)
from distill.losses.base import LossTerm
from distill.losses.cross_tokenizer import ULD, AlignedKD, mapped_kl, uld_loss
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
    soft_target_cross_entropy,
    standardize_logits,
    teacher_sample_weights,
)
from distill.losses.relations import CRD, RKD, nce_loss, rkd_loss
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
from distill.registry import LOSSES

LOSSES.add_lazy("ensemble_kd", "distill.teachers.ensemble.EnsembleKD")
LOSSES.add_lazy("mutual", "distill.chain.Mutual")

__all__ = [
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "KD",
    "LSKD",
    "PKT",
    "RKD",
    "AlignedKD",
    "AttentionTransfer",
    "CrossEntropy",
    "FitNets",
    "LogitMSE",
    "LossTerm",
    "SimilarityPreserving",
    "ULD",
    "Weighted",
    "at_loss",
    "attention_map",
    "dist_loss",
    "dkd_loss",
    "forward_kl",
    "generalized_jsd",
    "hint_loss",
    "kd_loss",
    "logit_mse",
    "mapped_kl",
    "lskd_loss",
    "nce_loss",
    "pkt_loss",
    "reverse_kl",
    "rkd_loss",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "soft_target_cross_entropy",
    "sp_loss",
    "standardize_logits",
    "teacher_sample_weights",
    "token_cross_entropy",
    "token_divergence",
    "topk_forward_kl",
    "total_variation",
    "uld_loss",
]
