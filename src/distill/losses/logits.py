"""Logit-level terms: cross-entropy, Hinton KD, logit MSE, LSKD, DKD, DIST, CTKD, weighting.

Each term is a small module over a plain tensor function users can call directly. All math is
done in float32, whatever precision the models ran in.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.base import (
    LossTerm,
    check_positive,
    check_range,
    check_same_shape,
    flatten_logits,
    kl_rows,
    reduce,
)
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES
from distill.schedules import Progress


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
    KL(softmax(t/T) || softmax(s/T)) · T².

    The T² keeps the gradient's magnitude independent of T (the soft gradients scale as 1/T²).

    Args:
        student_logits: (B, C) or (B, T, V).
        teacher_logits: same shape as the student's.
        temperature: T > 0, a float or a scalar tensor (a learnable temperature).
        weights: optional weights, per sample (B,) or per row (B*T,).
        reduction: "mean" over samples (KL summed over classes), "sum" or "none".

    Returns:
        A scalar, or (N,) for reduction="none".
    """
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float()
    t = flatten_logits(teacher_logits).float()
    # kl_rows, not p·(log p − log q): a -inf logit (masked vocabulary) is 0·(-inf) = NaN there.
    per_sample = kl_rows(
        F.log_softmax(t / temperature, dim=-1), F.log_softmax(s / temperature, dim=-1)
    )  # (N,)
    return reduce(per_sample, weights, reduction) * temperature**2


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the student against the teacher's softened distribution, · T².

    Equals `kd_loss` plus the teacher's entropy (a constant for the student), so the gradients
    are the same; the value is what some papers and codebases report.
    """
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float()
    t = flatten_logits(teacher_logits).float()
    p_t = F.softmax(t / temperature, dim=-1)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    # Entries the teacher rules out (p_t = 0, e.g. -inf logits) count 0 even where log_p_s = -inf.
    per_sample = -(p_t * torch.where(p_t > 0, log_p_s, torch.zeros_like(log_p_s))).sum(-1)
    return reduce(per_sample, weights, reduction) * temperature**2


def logit_mse(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Mean squared error between raw logits (Ba & Caruana 2014), averaged over classes."""
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float()
    t = flatten_logits(teacher_logits).float()
    return reduce((s - t).pow(2).mean(-1), weights, reduction)


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against label distributions (mixup / cutmix labels): -Σ_c q_c log p_c per sample,
    summed and divided by the total label mass Σ q.

    A row of `soft_targets` may sum to less than 1: that is the labelled share of a sample mixed
    with an unlabelled one, and a zero row (no label) adds nothing. With every row summing to 1 this
    is the plain mean over samples. Label smoothing spreads ε of each row's mass uniformly.

    Args:
        logits: (B, C) or (B, T, C).
        soft_targets: (B, C) or (B*T, C), rows non-negative.
        label_smoothing: ε in [0, 1).

    Returns:
        A scalar (0 when no sample carries a label).
    """
    z = flatten_logits(logits).float()
    q = soft_targets.reshape(-1, soft_targets.shape[-1]).float()
    if q.shape != z.shape:
        raise DistillError(
            f"soft targets {tuple(q.shape)} do not match the logits {tuple(z.shape)}: one label "
            "distribution per sample over the same classes"
        )
    mass = q.sum(-1)  # (N,)
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + mass[:, None] * (label_smoothing / q.shape[-1])
    per_sample = -(q * F.log_softmax(z, dim=-1)).sum(-1)
    return per_sample.sum() / mass.sum().clamp_min(1e-12)


@LOSSES.register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy on the ground-truth labels, with optional label smoothing.

    Reads class indices from `batch.targets`, skipping `ignore_index` (padding, or transfer-set
    samples without a label); on a mixed batch (`trainer.mix`) it reads the label distributions in
    `batch.soft_targets` instead (see `soft_target_cross_entropy`). A batch with no labelled sample
    gives 0.

    Args:
        label_smoothing: in [0, 1).
        ignore_index: target value to skip (padding in token-level tasks, unlabelled samples).
        normalize: "labelled": the mean over the labelled targets (padding does not count);
            "batch": their sum over all the batch's targets, so an unlabelled sample counts as 0
            and a labelled one weighs in `ce` as in `kd` (`mean over samples of a·CE + b·KD`,
            Hinton's per-sample mix). With a transfer set (`data.transfer`) most samples of a batch
            are unlabelled, and "labelled" lets a few labels outweigh the teacher several times over.
    """

    needs_teacher = False
    supports_sample_weights = False

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100, normalize: str = "labelled"):
        super().__init__()
        check_range("ce.label_smoothing", label_smoothing, 0.0, 0.999)
        if normalize not in ("labelled", "batch"):
            raise DistillError(f"ce.normalize '{normalize}' is not one of labelled, batch")
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.normalize = normalize
        # Validating labels costs a host sync per call on CUDA; the Trainer turns this off there
        # and checks each batch's labels on the host copy instead.
        self.check_labels = True

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        logits = flatten_logits(student.require_logits("student")).float()
        if batch.soft_targets is not None:
            loss = soft_target_cross_entropy(logits, batch.soft_targets, self.label_smoothing)
            if self.normalize == "batch":  # (the mean over the label mass, times its share of the rows)
                return loss * batch.soft_targets.sum() / logits.shape[0]
            return loss
        if batch.targets is None:
            raise DistillError(
                "the ce term needs labels but the batch has none; drop the ce term for unlabeled data"
            )
        targets = batch.targets.reshape(-1).long()
        n = logits.shape[-1]
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= n)) if self.check_labels else None
        if self.check_labels and bad.any():
            i = int(bad.nonzero()[0, 0])
            raise DistillError(
                f"label {int(targets[i])} is out of range for {n} classes (at position {i} of the batch)"
            )
        total = F.cross_entropy(
            logits,
            targets,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        if self.normalize == "batch":
            return total / max(targets.numel(), 1)
        # The mean over labelled samples, without a host sync; 0 (not NaN) when none is labelled.
        return total / (targets != self.ignore_index).sum().clamp_min(1)


@LOSSES.register("kd")
class KD(LossTerm):
    """Hinton KD on logits; see `kd_loss`.

    Args:
        temperature: T > 0; schedulable as `<term>.temperature`.
        form: "kl" (default) or "soft_ce" (cross-entropy against the soft targets).
    """

    supports_sample_weights = True

    def __init__(self, temperature: float = 4.0, form: str = "kl"):
        super().__init__()
        check_positive("kd.temperature", temperature)
        if form not in ("kl", "soft_ce"):
            raise DistillError(f"kd.form: '{form}' is not one of kl, soft_ce")
        self.temperature = temperature
        self.form = form

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        fn = kd_loss if self.form == "kl" else soft_cross_entropy
        return fn(
            _class_logits(student, "student", "kd"),
            _class_logits(teacher, "teacher", "kd"),
            self.temperature,
            weights=_sample_weights(batch),
        )


@LOSSES.register("logit_mse")
class LogitMSE(LossTerm):
    """MSE between student and teacher logits; see `logit_mse`."""

    supports_sample_weights = True

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return logit_mse(
            _class_logits(student, "student", "logit_mse"),
            _class_logits(teacher, "teacher", "logit_mse"),
            weights=_sample_weights(batch),
        )


def _class_logits(out: Outputs, who: str, term: str) -> Tensor:
    """(B, C) logits of one side; (B, T, V) token logits are refused (see the error)."""
    logits = out.require_logits(who)
    if logits.dim() > 2:
        raise DistillError(
            f"{term}: {who} logits {tuple(logits.shape)} are per token, and {term} would also count "
            "prompt and padding tokens; use the fkl term (token-level, masked; shift_labels: false "
            "for logits aligned with the labels)"
        )
    return logits


def _sample_weights(batch: Batch) -> Tensor | None:
    """Per-sample weights a weighting rule attached to the batch (None: uniform)."""
    return batch.weights


# ---------------------------------------------------------------------------------------------
# Logit standardisation, decoupled KD, DIST


STD_KINDS = ("unbiased", "population")


def standardize_logits(logits: Tensor, eps: float = 1e-7, std: str = "unbiased") -> Tensor:
    """Z-scores logits over the class dimension: `(z - mean(z)) / (std(z) + eps)` per sample.

    A −inf logit (a masked class: a vocabulary padded past the tokenizer, a constrained decoder)
    takes no part in the mean and std and stays −inf, so the row is standardised over the classes
    it can give and softmax still gives the masked ones 0 (not NaN: −inf − mean is −inf, but the
    mean and std over a row holding −inf are NaN).

    Args:
        logits: (..., C).
        eps: keeps a sample whose logits are all equal finite (it becomes all zeros).
        std: "unbiased" (1/(C−1), `torch.std`, as the authors' code that produced the published
            CIFAR-100 numbers) or "population" (1/C, as Sun et al. 2024 write Eq. 8). The
            z-scores differ by sqrt(C/(C−1)), which acts as a temperature: the LSKD value
            differs by 11% at C = 10 and 1% at C = 100 (docs/methods.md, Conventions). With
            masked classes, C counts the unmasked ones.
    """
    if std not in STD_KINDS:
        raise DistillError(f"lskd.std: '{std}' is not one of {', '.join(STD_KINDS)}")
    z = logits.float()
    keep = z != float("-inf")  # (..., C); no `.all()` test: that would sync with the GPU
    n = keep.sum(-1, keepdim=True)
    zk = torch.where(keep, z, torch.zeros_like(z))
    mean = zk.sum(-1, keepdim=True) / n.clamp_min(1)
    dev = torch.where(keep, z - mean, torch.zeros_like(z))
    dof = n - 1 if std == "unbiased" else n
    sd = (dev.pow(2).sum(-1, keepdim=True) / dof.clamp_min(1)).sqrt()
    return torch.where(keep, dev / (sd + eps), z)


def lskd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 2.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
    std: str = "unbiased",
) -> Tensor:
    """Sun et al. 2024, "Logit Standardization in Knowledge Distillation": Hinton KD on
    z-scored logits, so the student matches the teacher's logit *relations* rather than their
    range; the result is invariant to shifting and to positive scaling of either side's logits.

    Args:
        student_logits: (B, C) or (B, T, V).
        teacher_logits: same shape.
        temperature: the base temperature applied after standardisation (the paper uses 2 on
            CIFAR-100 with its KD weight of 9 — see `recipes/`), multiplied back as T².
        weights: optional per-sample weights (N,).
        reduction: "mean", "sum" or "none".
        std: "unbiased" (default, the authors' code) or "population"; see `standardize_logits`.
    """
    check_same_shape(student_logits, teacher_logits)
    return kd_loss(
        standardize_logits(student_logits, std=std),
        standardize_logits(teacher_logits, std=std),
        temperature,
        weights=weights,
        reduction=reduction,
    )


def _targets_for(logits: Tensor, targets: Tensor | None, what: str) -> Tensor:
    if targets is None:
        raise DistillError(f"{what} needs ground-truth labels but the batch has none")
    t = targets.reshape(-1).long()
    n, c = logits.shape
    if t.shape[0] != n:
        raise DistillError(f"{what}: {t.shape[0]} labels for {n} rows of logits")
    bad = (t < 0) | (t >= c)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise DistillError(f"{what}: label {int(t[i])} is out of range for {c} classes (position {i})")
    return t


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float | Tensor = 1.0,
    beta: float | Tensor = 8.0,
    temperature: float = 4.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Zhao et al. 2022, "Decoupled Knowledge Distillation": `(α·TCKD + β·NCKD) · T²`.

    TCKD is the KL between the binary (target, all non-targets) probabilities of teacher and
    student; NCKD the KL between their distributions over the non-target classes only
    (renormalised). Hinton KD is `TCKD + (1 − p_t)·NCKD` with `p_t` the teacher's target
    probability at temperature T (the paper's Eq. 3), so α = 1, β = 1 − p_t gives back KD.

    Args:
        student_logits: (B, C) or (B, T, V); C ≥ 2.
        teacher_logits: same shape.
        targets: (B,) or (B, T) class indices.
        alpha: TCKD weight, a float or a per-sample (N,) tensor.
        beta: NCKD weight, a float or a per-sample (N,) tensor.
        temperature: T > 0.
        weights: optional per-sample weights (N,).
        reduction: "mean", "sum" or "none".
    """
    check_same_shape(student_logits, teacher_logits)
    s = flatten_logits(student_logits).float() / temperature
    t = flatten_logits(teacher_logits).float() / temperature
    n, c = s.shape
    if c < 2:
        raise DistillError(f"dkd needs at least 2 classes, got {c}")
    y = _targets_for(s, targets, "dkd")
    target_mask = F.one_hot(y, c).bool()  # (N, C)

    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)

    # Binary distribution [p_target, 1 - p_target] in log space; the non-target mass is a
    # logsumexp over the other classes, which stays exact when p_target is close to 1.
    def binary(log_p: Tensor) -> Tensor:
        tgt = log_p.gather(1, y[:, None])  # (N, 1)
        rest = log_p.masked_fill(target_mask, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([tgt, rest], dim=1)  # (N, 2)

    tckd = kl_rows(binary(log_pt), binary(log_ps))  # (N,)
    # Non-target classes only: drop the target column, renormalise.
    s_nt = s[~target_mask].reshape(n, c - 1)
    t_nt = t[~target_mask].reshape(n, c - 1)
    nckd = kl_rows(F.log_softmax(t_nt, -1), F.log_softmax(s_nt, -1))  # (N,)
    per_sample = _as_rows(alpha, n, "alpha", s) * tckd + _as_rows(beta, n, "beta", s) * nckd
    return reduce(per_sample, weights, reduction) * temperature**2


def _as_rows(v: float | Tensor, n: int, name: str, like: Tensor) -> float | Tensor:
    if isinstance(v, Tensor) and v.dim() > 0:
        if v.numel() != n:
            raise DistillError(f"dkd {name} has {v.numel()} values for {n} samples")
        return v.reshape(n).to(like.device, torch.float32)
    return v


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation along the last dim: (..., K), (..., K) -> (...)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (DIST):
    `T² · (β · inter + γ · intra)` on softened predictions Y = softmax(z / T), where
    inter = mean over samples of 1 − pearson(Y_s[i, :], Y_t[i, :]) (each sample's ranking of
    classes) and intra = mean over classes of 1 − pearson(Y_s[:, c], Y_t[:, c]) (each class's
    ranking of the samples in the batch).

    Args:
        student_logits: (B, C) or (B, T, V) (tokens are rows).
        teacher_logits: same shape.
        beta: inter-class weight. gamma: intra-class weight. temperature: T > 0.
        weights: optional per-sample weights (N,), applied to the inter-class part only (the
            intra-class part is a relation over the whole batch).

    Returns:
        A scalar.
    """
    check_same_shape(student_logits, teacher_logits)
    ys = F.softmax(flatten_logits(student_logits).float() / temperature, -1)
    yt = F.softmax(flatten_logits(teacher_logits).float() / temperature, -1)
    inter = reduce(1.0 - _pearson(ys, yt), weights, "mean")
    intra = (1.0 - _pearson(ys.t(), yt.t())).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@LOSSES.register("lskd")
class LSKD(LossTerm):
    """Logit-standardised KD; see `lskd_loss`.

    Args:
        temperature: base temperature T > 0 (schedulable as `<term>.temperature`).
        std: "unbiased" (default: `torch.std`, as the authors' code behind the published
            numbers) or "population" (the paper's Eq. 8); see `standardize_logits`.
    """

    supports_sample_weights = True

    def __init__(self, temperature: float = 2.0, std: str = "unbiased"):
        super().__init__()
        check_positive("lskd.temperature", temperature)
        if std not in STD_KINDS:
            raise DistillError(f"lskd.std: '{std}' is not one of {', '.join(STD_KINDS)}")
        self.temperature = temperature
        self.std = std

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return lskd_loss(
            _class_logits(student, "student", "lskd"),
            _class_logits(teacher, "teacher", "lskd"),
            self.temperature,
            weights=_sample_weights(batch),
            std=self.std,
        )


@LOSSES.register("dkd")
class DKD(LossTerm):
    """Decoupled KD; see `dkd_loss`.

    Args:
        alpha: TCKD weight ≥ 0 (paper: 1).
        beta: NCKD weight ≥ 0 (paper, CIFAR-100: 8, or 6 for the WRN and VGG pairs).
        temperature: T > 0.
        warmup: fraction of training over which the term's factor rises linearly from 0 to 1
            (the paper warms DKD up over 20 of 240 epochs: 0.083). 0 = no warm-up. The same
            effect is available for any term as an objective weight schedule
            (`weights: {dkd: {name: warmup, value: 1.0, warmup: 0.083}}`); use one, not both.
    """

    supports_sample_weights = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 0.0):
        super().__init__()
        check_range("dkd.alpha", alpha, 0.0, math.inf)
        check_range("dkd.beta", beta, 0.0, math.inf)
        check_positive("dkd.temperature", temperature)
        check_range("dkd.warmup", warmup, 0.0, 1.0)
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup
        self.ramp = 1.0 if warmup == 0 else 0.0

    def on_progress(self, progress: Progress) -> None:
        self.ramp = 1.0 if self.warmup == 0 else min(progress.fraction / self.warmup, 1.0)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        loss = dkd_loss(
            _class_logits(student, "student", "dkd"),
            _class_logits(teacher, "teacher", "dkd"),
            batch.targets,
            self.alpha,
            self.beta,
            self.temperature,
            weights=_sample_weights(batch),
        )
        return self.ramp * loss


@LOSSES.register("dist")
class DIST(LossTerm):
    """DIST relation matching; see `dist_loss`.

    Args:
        beta: inter-class weight ≥ 0. gamma: intra-class weight ≥ 0. temperature: T > 0.
        Paper defaults (ImageNet): 1, 1, 1; for CIFAR-100 we read it as β = γ = 2, T = 4.
    """

    supports_sample_weights = True

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        super().__init__()
        check_range("dist.beta", beta, 0.0, math.inf)
        check_range("dist.gamma", gamma, 0.0, math.inf)
        check_positive("dist.temperature", temperature)
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return dist_loss(
            _class_logits(student, "student", "dist"),
            _class_logits(teacher, "teacher", "dist"),
            self.beta,
            self.gamma,
            self.temperature,
            weights=_sample_weights(batch),
        )


# ---------------------------------------------------------------------------------------------
# Learnable temperature (CTKD) and per-sample weighting


class _GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by −λ backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    return _GradReverse.apply(x, lam)


@LOSSES.register("ctkd")
class CTKD(LossTerm):
    """Curriculum temperature KD (Li et al. 2023, "Curriculum Temperature for Knowledge
    Distillation"): Hinton KD whose temperature is a learned global parameter trained
    *adversarially* — through a gradient-reversal layer it ascends the KD loss the student
    descends, so the task gets harder — with the reversal strength λ rising from `lambda_min`
    to `lambda_max` along a half cosine over the first `ramp` fraction of training (easy to
    hard: the curriculum).

    The temperature is `min_temperature + (max_temperature − min_temperature) · sigmoid(θ)`,
    θ a trainable parameter of this term (an adapter: trained with the student by the same
    optimizer, checkpointed with the objective, never exported with the student).

    Args:
        init_temperature: starting temperature, strictly between the bounds.
        min_temperature, max_temperature: bounds of the learned temperature (paper: 1 and 21).
        lambda_min, lambda_max: reversal strength at the start and end of the ramp (0 → 1).
        ramp: fraction of training over which λ rises (paper: 10 of 240 epochs ≈ 0.04).
    """

    supports_sample_weights = True

    def __init__(
        self,
        init_temperature: float = 4.0,
        min_temperature: float = 1.0,
        max_temperature: float = 21.0,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        ramp: float = 0.04,
    ):
        super().__init__()
        check_positive("ctkd.min_temperature", min_temperature)
        if not min_temperature < init_temperature < max_temperature:
            raise DistillError(
                f"ctkd.init_temperature {init_temperature} must lie strictly between "
                f"min_temperature {min_temperature} and max_temperature {max_temperature}"
            )
        check_range("ctkd.lambda_min", lambda_min, 0.0, math.inf)
        check_range("ctkd.lambda_max", lambda_max, lambda_min, math.inf)
        check_range("ctkd.ramp", ramp, 0.0, 1.0)
        self.t_min, self.t_range = min_temperature, max_temperature - min_temperature
        a = (init_temperature - min_temperature) / self.t_range
        self.theta = nn.Parameter(torch.tensor(math.log(a / (1 - a))))
        self.lambda_min, self.lambda_max, self.ramp = lambda_min, lambda_max, ramp
        self.lam = lambda_min

    @property
    def temperature(self) -> float:
        """The current learned temperature, for logging."""
        return float(self.t_min + self.t_range * torch.sigmoid(self.theta.detach()))

    @temperature.setter
    def temperature(self, value: float) -> None:
        raise DistillError(
            "ctkd.temperature is learned, not scheduled: set init_temperature, or schedule the kd term instead"
        )

    def on_progress(self, progress: Progress) -> None:
        a = 1.0 if self.ramp == 0 else min(progress.fraction / self.ramp, 1.0)
        self.lam = self.lambda_min + (self.lambda_max - self.lambda_min) * 0.5 * (1 - math.cos(math.pi * a))

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        temperature = self.t_min + self.t_range * torch.sigmoid(self.theta.float())
        temperature = grad_reverse(temperature, self.lam)
        return kd_loss(
            _class_logits(student, "student", "ctkd"),
            _class_logits(teacher, "teacher", "ctkd"),
            temperature,
            weights=_sample_weights(batch),
        )


WEIGHT_RULES = ("confidence", "target_prob", "correct")


def teacher_sample_weights(
    teacher_logits: Tensor, targets: Tensor | None = None, rule: str = "confidence", floor: float = 0.0
) -> Tensor:
    """Per-sample weights from the teacher's own output, to trust it where it is reliable.

    Rules (raw score r in [0, 1], then `w = floor + (1 − floor) · r`):
      - "confidence": r = the teacher's top softmax probability;
      - "target_prob": r = the teacher's probability of the true label;
      - "correct": r = 1 where the teacher's top class is the true label, else 0.

    Args:
        teacher_logits: (B, C) or (B, T, V).
        targets: (B,) or (B, T); needed by "target_prob" and "correct".
        rule: one of `WEIGHT_RULES`.
        floor: the weight of a sample the teacher gets fully wrong, in [0, 1].

    Returns:
        (N,) weights, no gradient.
    """
    t = flatten_logits(teacher_logits).detach().float()
    p = F.softmax(t, -1)
    if rule == "confidence":
        r = p.max(-1).values
    elif rule in ("target_prob", "correct"):
        y = _targets_for(t, targets, f"weighted rule '{rule}'")
        r = p.gather(1, y[:, None]).squeeze(1) if rule == "target_prob" else (p.argmax(-1) == y).float()
    else:
        raise DistillError(f"weighted.rule: '{rule}' is not one of {', '.join(WEIGHT_RULES)}")
    return floor + (1.0 - floor) * r


@LOSSES.register("weighted")
class Weighted(LossTerm):
    """Wraps another term and weights its per-sample losses by `teacher_sample_weights`.

    The wrapped term averages with these weights (`Σ w·l / Σ w`), so the loss keeps its scale
    and only the emphasis between samples changes: samples the teacher is sure of (or right
    on) count more. A weight already on the batch is multiplied in.

    Args:
        term: the wrapped term, a registered name (`"kd"`) or a mapping
            `{name: kd, temperature: 4}` (or `{class_path: ..., init_args: {...}}`). It must
            take per-sample weights (kd, lskd, dkd, dist, ctkd, logit_mse, at, fitnets, crd).
        rule: "confidence", "target_prob" or "correct"; see `teacher_sample_weights`.
        floor: weight of the least trusted sample, in [0, 1].
    """

    def __init__(self, term: str | dict = "kd", rule: str = "confidence", floor: float = 0.0):
        super().__init__()
        if rule not in WEIGHT_RULES:
            raise DistillError(f"weighted.rule: '{rule}' is not one of {', '.join(WEIGHT_RULES)}")
        check_range("weighted.floor", floor, 0.0, 1.0)
        if isinstance(term, str):
            inner = LOSSES.build(name=term)
        elif isinstance(term, dict):
            spec = dict(term)
            inner = LOSSES.build(
                name=spec.pop("name", None),
                class_path=spec.pop("class_path", None),
                init_args=spec.pop("init_args", {}),
                **spec,
            )
        elif isinstance(term, LossTerm):
            inner = term
        else:
            raise DistillError(f"weighted.term must be a loss name or mapping, got {term!r}")
        if not getattr(inner, "supports_sample_weights", False):
            raise DistillError(
                f"weighted.term: {type(inner).__name__} does not take per-sample weights "
                "(it is a relation over the whole batch, or label-only); wrap a KD-style term"
            )
        self.term = inner
        self.rule, self.floor = rule, floor
        self.needs_teacher = True
        self.student_taps, self.teacher_taps = inner.student_taps, inner.teacher_taps

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        self.term.setup(student, teacher, batch)

    def on_progress(self, progress: Progress) -> None:
        hook = getattr(self.term, "on_progress", None)
        if hook is not None:
            hook(progress)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        w = teacher_sample_weights(teacher.require_logits("teacher"), batch.targets, self.rule, self.floor)
        if batch.weights is not None:
            w = w * batch.weights.reshape(-1).to(w)
        return self.term(student, teacher, dataclasses.replace(batch, weights=w))
