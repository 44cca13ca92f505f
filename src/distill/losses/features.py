"""Feature-level terms: FitNets hints, attention transfer, similarity preservation, PKT.

Each term names the layers it reads by module path (`student_layer`, `teacher_layer`), which
sets its `student_taps` / `teacher_taps` so the trainer hooks them; a path that was not tapped
gives `Outputs.feature`'s one-line error. Math is in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.base import LossTerm, check_positive, reduce
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES


def layer_pairs(
    name: str,
    student_layer: str | Sequence[str] | None,
    teacher_layer: str | Sequence[str] | None,
    pairs: Sequence[Sequence[str]] | None = None,
) -> list[tuple[str, str]]:
    """Reads a term's layer arguments: one pair, two equal-length lists, or `pairs`."""
    if pairs is not None:
        if student_layer is not None or teacher_layer is not None:
            raise DistillError(f"{name}: give either pairs or student_layer/teacher_layer, not both")
        out = []
        for p in pairs:
            if isinstance(p, str) or len(p) != 2:
                raise DistillError(
                    f"{name}.pairs: each entry must be [student_layer, teacher_layer], got {p!r}"
                )
            out.append((str(p[0]), str(p[1])))
    else:
        if student_layer is None or teacher_layer is None:
            raise DistillError(
                f"{name} needs student_layer and teacher_layer (module paths, as in model.named_modules())"
            )
        s = [student_layer] if isinstance(student_layer, str) else list(student_layer)
        t = [teacher_layer] if isinstance(teacher_layer, str) else list(teacher_layer)
        if len(s) != len(t):
            raise DistillError(
                f"{name}: {len(s)} student layers but {len(t)} teacher layers; pair them one to one"
            )
        out = list(zip(s, t))
    if not out:
        raise DistillError(f"{name}: no layer pairs given")
    return out


def _check_batch(fs: Tensor, ft: Tensor, name: str) -> None:
    if fs.dim() < 2 or ft.dim() < 2:
        raise DistillError(
            f"{name}: features must have a batch dimension, got {tuple(fs.shape)} and {tuple(ft.shape)}"
        )
    if fs.shape[0] != ft.shape[0]:
        raise DistillError(f"{name}: student batch {fs.shape[0]} and teacher batch {ft.shape[0]} differ")


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resizes (B, C, H, W) maps spatially: area-averaging down, bilinear up."""
    size = tuple(int(v) for v in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# FitNets


def hint_loss(
    student_feature: Tensor, teacher_feature: Tensor, weights: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": mean squared error between the
    (already regressed) student feature and the teacher's hint.

    Args:
        student_feature: (B, ...) after the regressor; same shape as the teacher's.
        teacher_feature: (B, ...).
        weights: optional (B,) per-sample weights.
        reduction: "mean", "sum" or "none" over samples (each sample's error is averaged over
            its elements).
    """
    if student_feature.shape != teacher_feature.shape:
        raise DistillError(
            f"fitnets: regressed student feature {tuple(student_feature.shape)} and teacher feature "
            f"{tuple(teacher_feature.shape)} differ in shape"
        )
    diff = (student_feature.float() - teacher_feature.float()).pow(2)
    return reduce(diff.flatten(1).mean(1), weights, reduction)


def make_regressor(
    student_shape: Sequence[int], teacher_shape: Sequence[int], batchnorm: bool = True, relu: bool = False
) -> nn.Module:
    """The FitNets regressor from tapped shapes: a 1×1 conv (+ BatchNorm) for (B, C, H, W)
    maps, a linear layer over the last dim for (B, D) or (B, T, D) features; `relu` appends a
    ReLU (RepDistiller's ConvReg has one, the paper's regressor does not)."""
    reg = _regressor(tuple(student_shape), tuple(teacher_shape), batchnorm)
    return nn.Sequential(*(reg if isinstance(reg, nn.Sequential) else [reg]), nn.ReLU()) if relu else reg


def _regressor(s: tuple, t: tuple, batchnorm: bool) -> nn.Module:
    if len(s) != len(t):
        raise DistillError(
            f"fitnets: student feature {s} and teacher feature {t} have different ranks; tap layers of "
            "the same kind (both conv maps or both vectors)"
        )
    if len(s) == 4:
        conv = nn.Conv2d(s[1], t[1], kernel_size=1, bias=not batchnorm)
        return nn.Sequential(conv, nn.BatchNorm2d(t[1])) if batchnorm else conv
    if len(s) in (2, 3):
        if len(s) == 3 and s[1] != t[1]:
            raise DistillError(f"fitnets: student sequence length {s[1]} differs from the teacher's {t[1]}")
        return nn.Linear(s[-1], t[-1])
    raise DistillError(
        f"fitnets: features of shape {s} are not supported; tap (B, C, H, W), (B, D) or (B, T, D)"
    )


@LOSSES.register("fitnets")
class FitNets(LossTerm):
    """FitNets hint loss through a learned regressor (see `hint_loss`, `make_regressor`).

    The regressor is created in `setup` from the first batch's tapped shapes, trained with the
    student, checkpointed with the objective and left out of the exported student. A student
    map whose spatial size differs from the teacher's is resized after the regressor.

    Args:
        student_layer: module path of the student's guided layer.
        teacher_layer: module path of the teacher's hint layer.
        batchnorm: follow the 1×1 conv by BatchNorm (conv maps only).
        relu: end the regressor with a ReLU, as the CRD benchmark's code (RepDistiller's
            `ConvReg`, behind the published FitNets numbers) does; off by default, as in the
            paper. It suits a teacher hint taken after a ReLU (non-negative); a pre-activation
            hint has negative values a ReLU output cannot match.
    """

    supports_sample_weights = True

    def __init__(
        self,
        student_layer: str | None = None,
        teacher_layer: str | None = None,
        batchnorm: bool = True,
        relu: bool = False,
    ):
        super().__init__()
        ((self.student_layer, self.teacher_layer),) = _single_pair("fitnets", student_layer, teacher_layer)
        self.student_taps, self.teacher_taps = (self.student_layer,), (self.teacher_layer,)
        self.batchnorm = batchnorm
        self.relu = relu
        self.regressor: nn.Module | None = None

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        fs = student.feature(self.student_layer, "student")
        ft = teacher.feature(self.teacher_layer, "teacher")
        _check_batch(fs, ft, "fitnets")
        self.regressor = make_regressor(fs.shape, ft.shape, self.batchnorm, self.relu).to(fs.device)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        fs = student.feature(self.student_layer, "student")
        ft = teacher.feature(self.teacher_layer, "teacher")
        if self.regressor is None:
            raise DistillError(
                "fitnets: the regressor does not exist yet; call objective.setup(student_out, "
                "teacher_out, batch) on a first batch before building the optimizer"
            )
        _check_batch(fs, ft, "fitnets")
        r = self.regressor(fs)
        if r.dim() == 4:
            r = resize_to(r, ft.shape[-2:])
        return hint_loss(r, ft, weights=batch.weights)


def _single_pair(name, student_layer, teacher_layer):
    pairs = layer_pairs(name, student_layer, teacher_layer)
    if len(pairs) != 1:
        raise DistillError(f"{name} takes one student_layer and one teacher_layer, got {len(pairs)} pairs")
    return pairs


# ---------------------------------------------------------------------------------------------
# Attention transfer


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis 2017: the spatial attention of a (B, C, H, W) map, mean over
    channels of |a|^p -> (B, H, W) (not yet normalised)."""
    if feature.dim() != 4:
        raise DistillError(f"at: needs (B, C, H, W) feature maps, got shape {tuple(feature.shape)}")
    return feature.float().abs().pow(p).mean(1)


AT_POOL = ("features", "maps")


def at_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    p: float = 2.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
    pool: str = "features",
) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"):
    the squared distance between L2-normalised, flattened attention maps, averaged over
    positions (the form of the authors' code and of the CRD benchmark, whose weight of 1000
    assumes it). Invariant to the scale of either feature.

    When the maps differ in size the larger side is area-averaged down to the smaller: with
    `pool="features"` (default) the feature map is pooled before its attention is taken, as
    the CRD benchmark's code (RepDistiller) does, which produced the published numbers; with
    `pool="maps"` the attention map itself is pooled (the mean of |a|^p over each area rather
    than |mean a|^p). They differ by 5-18% in value (docs/methods.md, Conventions).

    Args:
        student_feature: (B, Cs, Hs, Ws). teacher_feature: (B, Ct, Ht, Wt); channels may differ.
        p: the exponent on activations (paper: 2).
        weights: optional (B,) per-sample weights. reduction: "mean", "sum" or "none".
        pool: "features" or "maps": what is pooled when the spatial sizes differ.
    """
    _check_batch(student_feature, teacher_feature, "at")
    if pool not in AT_POOL:
        raise DistillError(f"at.pool: '{pool}' is not one of {', '.join(AT_POOL)}")
    fs, ft = student_feature, teacher_feature
    if fs.dim() == 4 and ft.dim() == 4 and fs.shape[-2:] != ft.shape[-2:] and pool == "features":
        size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
        fs, ft = resize_to(fs.float(), size), resize_to(ft.float(), size)
    ms, mt = attention_map(fs, p), attention_map(ft, p)  # (B, H, W)
    if ms.shape[1:] != mt.shape[1:]:
        size = (min(ms.shape[1], mt.shape[1]), min(ms.shape[2], mt.shape[2]))
        ms = resize_to(ms[:, None], size)[:, 0]
        mt = resize_to(mt[:, None], size)[:, 0]
    qs = F.normalize(ms.flatten(1), dim=1)
    qt = F.normalize(mt.flatten(1), dim=1)
    return reduce((qs - qt).pow(2).mean(1), weights, reduction)


@LOSSES.register("at")
class AttentionTransfer(LossTerm):
    """Attention transfer over one or more layer pairs, summed over pairs; see `at_loss`.

    Args:
        student_layer, teacher_layer: module paths, or equal-length lists of them.
        pairs: alternatively `[[student_layer, teacher_layer], ...]`.
        p: exponent on activations, > 0 (paper: 2).
        pool: when a pair's spatial sizes differ, pool the larger side's "features" (default,
            as RepDistiller) or its attention "maps"; see `at_loss`.
    """

    supports_sample_weights = True

    def __init__(
        self,
        student_layer: str | list[str] | None = None,
        teacher_layer: str | list[str] | None = None,
        pairs: list[list[str]] | None = None,
        p: float = 2.0,
        pool: str = "features",
    ):
        super().__init__()
        check_positive("at.p", p)
        if pool not in AT_POOL:
            raise DistillError(f"at.pool: '{pool}' is not one of {', '.join(AT_POOL)}")
        self.pool = pool
        self.pairs = layer_pairs("at", student_layer, teacher_layer, pairs)
        self.student_taps = tuple(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = tuple(dict.fromkeys(t for _, t in self.pairs))
        self.p = p

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return sum(
            at_loss(
                student.feature(s, "student"),
                teacher.feature(t, "teacher"),
                self.p,
                batch.weights,
                pool=self.pool,
            )
            for s, t in self.pairs
        )


# ---------------------------------------------------------------------------------------------
# Similarity preserving


def similarity_matrix(feature: Tensor) -> Tensor:
    """Row-normalised batch Gram matrix of flattened features: (B, ...) -> (B, B)."""
    f = feature.float().flatten(1)
    return F.normalize(f @ f.t(), dim=1)


def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation":
    `||G_s − G_t||_F² / B²` with G the row-normalised Gram matrices of the batch. Feature
    sizes may differ (only B × B matrices are compared); invariant to feature scale.

    Args:
        student_feature: (B, ...). teacher_feature: (B, ...).

    Returns:
        A scalar (a relation over the batch, so there are no per-sample terms).
    """
    _check_batch(student_feature, teacher_feature, "sp")
    b = student_feature.shape[0]
    gs, gt = similarity_matrix(student_feature), similarity_matrix(teacher_feature)
    return (gs - gt).pow(2).sum() / (b * b)


@LOSSES.register("sp")
class SimilarityPreserving(LossTerm):
    """Similarity-preserving KD over one or more layer pairs, summed; see `sp_loss`.

    Args:
        student_layer, teacher_layer: module paths, or equal-length lists of them.
        pairs: alternatively `[[student_layer, teacher_layer], ...]`.
    """

    supports_sample_weights = False

    def __init__(self, student_layer=None, teacher_layer=None, pairs=None):
        super().__init__()
        self.pairs = layer_pairs("sp", student_layer, teacher_layer, pairs)
        self.student_taps = tuple(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = tuple(dict.fromkeys(t for _, t in self.pairs))

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return sum(
            sp_loss(student.feature(s, "student"), teacher.feature(t, "teacher")) for s, t in self.pairs
        )


# ---------------------------------------------------------------------------------------------
# Probabilistic knowledge transfer


def cosine_affinity(feature: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT's conditional probabilities: cosine similarities of the batch shifted to [0, 1]
    and normalised per row. (B, ...) -> (B, B)."""
    f = F.normalize(feature.float().flatten(1), dim=1, eps=eps)
    sim = (f @ f.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_loss(student_feature: Tensor, teacher_feature: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
    Transfer": divergence between teacher and student cosine-affinity distributions,
    `mean_ij p_t(j|i) · log((p_t(j|i) + eps) / (p_s(j|i) + eps))` over the B² pairs (the
    averaging that the CRD benchmark's PKT weight of 30000 assumes).

    Args:
        student_feature: (B, ...). teacher_feature: (B, ...); sizes may differ.
    """
    _check_batch(student_feature, teacher_feature, "pkt")
    ps, pt = cosine_affinity(student_feature, eps), cosine_affinity(teacher_feature, eps)
    return (pt * ((pt + eps) / (ps + eps)).log()).mean()


@LOSSES.register("pkt")
class PKT(LossTerm):
    """Probabilistic knowledge transfer on one layer pair (usually the penultimate
    embedding); see `pkt_loss`.

    Args:
        student_layer, teacher_layer: module paths.
    """

    supports_sample_weights = False

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None):
        super().__init__()
        ((self.student_layer, self.teacher_layer),) = _single_pair("pkt", student_layer, teacher_layer)
        self.student_taps, self.teacher_taps = (self.student_layer,), (self.teacher_layer,)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return pkt_loss(
            student.feature(self.student_layer, "student"), teacher.feature(self.teacher_layer, "teacher")
        )
