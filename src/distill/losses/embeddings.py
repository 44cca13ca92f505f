"""Sentence-embedding distillation: the student regresses the teacher's embedding vectors.

Reimers & Gurevych 2020 ("Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation") train the student with MSE to the teacher's embeddings; cosine is the variant
that ignores the norm (what retrieval with normalised embeddings uses). Embeddings are read from
`Outputs.extras["embeddings"]` (the sentence adapter and the embedding cache put them there).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.base import LossTerm, reduce
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES

_KEYS = ("embeddings", "sentence_embedding", "pooler_output")


def get_embeddings(out: Outputs, who: str) -> Tensor:
    """(B, D) sentence embeddings from `Outputs.extras` (or 2-D logits as a last resort)."""
    for key in _KEYS:
        v = out.extras.get(key)
        if isinstance(v, Tensor):
            return v
    if out.logits is not None and out.logits.dim() == 2:
        return out.logits
    raise DistillError(
        f"the {who} outputs hold no sentence embeddings (extras['embeddings']); use "
        f"distill.nlp.sentence_adapter for the {who} or a cached teacher"
    )


def embedding_mse(student: Tensor, teacher: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error per embedding (mean over D), averaged over the batch: (B, D) -> ()."""
    _check(student, teacher)
    return reduce((student.float() - teacher.float()).pow(2).mean(-1), weights, "mean")


def embedding_cosine(student: Tensor, teacher: Tensor, weights: Tensor | None = None) -> Tensor:
    """1 - cosine similarity per embedding, averaged over the batch: (B, D) -> ()."""
    _check(student, teacher)
    return reduce(
        1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8), weights, "mean"
    )


def _check(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise DistillError(
            f"student embeddings {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)} differ; "
            "the embed terms project the student when only the width differs"
        )


class _Embed(LossTerm):
    fn = staticmethod(embedding_mse)
    name = "embed_mse"

    def __init__(self, projection: bool = True):
        super().__init__()
        self.projection = projection
        self.proj: nn.Module | None = None

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        s, t = get_embeddings(student, "student"), get_embeddings(teacher, "teacher")
        if s.shape[-1] != t.shape[-1]:
            if not self.projection:
                raise DistillError(
                    f"{self.name}: student width {s.shape[-1]} != teacher width {t.shape[-1]}; "
                    "set projection: true"
                )
            self.proj = nn.Linear(s.shape[-1], t.shape[-1]).to(s.device)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        s, t = get_embeddings(student, "student"), get_embeddings(teacher, "teacher")
        if self.proj is not None:
            s = self.proj(s.float())
        return self.fn(s, t.to(s.device), batch.weights)


@LOSSES.register("embed_mse")
class EmbedMSE(_Embed):
    """MSE to the teacher's sentence embeddings (Reimers & Gurevych 2020), with a learned
    projection when the student is narrower (created in `setup`).

    Args:
        projection: allow a learned linear projection when the widths differ.
    """

    fn = staticmethod(embedding_mse)
    name = "embed_mse"


@LOSSES.register("embed_cos")
class EmbedCosine(_Embed):
    """1 - cosine similarity to the teacher's sentence embeddings; see `EmbedMSE`."""

    fn = staticmethod(embedding_cosine)
    name = "embed_cos"
