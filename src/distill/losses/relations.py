"""Relation-level terms: RKD (distances and angles between samples) and CRD (contrastive).

Both read one tapped layer per side, usually the penultimate embedding; (B, C, H, W) maps are
flattened. Math is in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.base import LossTerm, check_positive, check_range, reduce
from distill.losses.features import _check_batch, _single_pair
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of (B, D) -> (B, B), zero on the diagonal."""
    sq = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)
    d = sq.clamp_min(eps).sqrt()
    return d * (1.0 - torch.eye(e.shape[0], device=e.device, dtype=d.dtype))


def _angles(e: Tensor) -> Tensor:
    """Cosines of the angle at every sample j between the directions to samples i and k:
    (B, D) -> (B³,)."""
    v = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, D): [j, i] = e_i − e_j
    return torch.bmm(v, v.transpose(1, 2)).reshape(-1)


def rkd_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """Park et al. 2019, "Relational Knowledge Distillation":
    `w_d · huber(ψ_D(s), ψ_D(t)) + w_a · huber(ψ_A(s), ψ_A(t))`, where ψ_D are the pairwise
    distances divided by their mean over distinct pairs, and ψ_A the cosines of the angles
    formed by every triplet. Both are invariant to the embeddings' scale; sizes may differ.

    Args:
        student_embedding: (B, Ds) or (B, C, H, W) (flattened).
        teacher_embedding: (B, Dt) or (B, C, H, W).
        distance_weight, angle_weight: the paper's λ_D = 25 and λ_A = 50.
    """
    _check_batch(student_embedding, teacher_embedding, "rkd")
    s = student_embedding.float().flatten(1)
    t = teacher_embedding.float().flatten(1)
    b = s.shape[0]
    if b < 2:
        raise DistillError("rkd needs at least 2 samples in a batch (it compares samples with each other)")
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    loss = s.new_zeros(())
    if distance_weight:
        ds, dt = pairwise_distances(s), pairwise_distances(t)
        ds = ds / ds[off].mean().clamp_min(1e-12)
        dt = dt / dt[off].mean().clamp_min(1e-12)
        loss = loss + distance_weight * F.smooth_l1_loss(ds, dt)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


@LOSSES.register("rkd")
class RKD(LossTerm):
    """Relational KD on one layer pair; see `rkd_loss`.

    Args:
        student_layer, teacher_layer: module paths (usually the pooled penultimate features).
        distance_weight, angle_weight: ≥ 0 (paper: 25 and 50).
    """

    supports_sample_weights = False

    def __init__(
        self,
        student_layer: str | None = None,
        teacher_layer: str | None = None,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ):
        super().__init__()
        ((self.student_layer, self.teacher_layer),) = _single_pair("rkd", student_layer, teacher_layer)
        self.student_taps, self.teacher_taps = (self.student_layer,), (self.teacher_layer,)
        check_range("rkd.distance_weight", distance_weight, 0.0, math.inf)
        check_range("rkd.angle_weight", angle_weight, 0.0, math.inf)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        return rkd_loss(
            student.feature(self.student_layer, "student"),
            teacher.feature(self.teacher_layer, "teacher"),
            self.distance_weight,
            self.angle_weight,
        )


# ---------------------------------------------------------------------------------------------
# CRD


def nce_loss(scores: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """The NCE objective of CRD (Tian et al. 2020, Eq. 10-12), per sample.

    Args:
        scores: (B, K+1) normalised scores `exp(<a, m>/τ) / Z`, the positive in column 0 and K
            noise samples after it.
        n_data: dataset size N; noise is uniform, P_n = 1/N.

    Returns:
        (B,) `−[log h(pos) + Σ_k log(1 − h(neg_k))]` with `h(x) = x / (x + K·P_n)`.
    """
    k = scores.shape[1] - 1
    m_pn = k / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = (pos / (pos + m_pn + eps)).log()
    log_d0 = (m_pn / (neg + m_pn + eps)).log()
    return -(log_d1 + log_d0.sum(1))


class _Embed(nn.Module):
    """CRD's projection head: linear, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


NEGATIVES = ("uniform", "other_class")


@LOSSES.register("crd")
class CRD(LossTerm):
    """Contrastive representation distillation (Tian et al. 2020, "Contrastive Representation
    Distillation").

    Student and teacher features are projected by two linear heads (created in `setup`) onto
    the unit sphere. Each side's embedding is contrasted with the *other* side's memory bank:
    the stored embedding of the same sample is the positive, `nce_k` drawn samples are
    negatives; the NCE loss (`nce_loss`) of both directions is summed. The banks (one row
    per training sample, keyed by `batch.index`) are updated with momentum `nce_m` after
    each training step, and checkpointed with the objective. The normaliser Z of each
    direction is estimated once, on the first batch, as in the paper's code.

    No step reads a device tensor on the host (no `.item()`, no `if tensor:`), so on a GPU the
    step queues without waiting: index checks and the class bank of "other_class" use the data
    loader's host copies of the batch (`Batch.host`), and whether Z is estimated is a Python flag.

    Negatives are drawn with replacement and never include the anchor's own index:
    - "uniform": uniformly over the other N − 1 samples (the paper's noise distribution);
    - "other_class": uniformly over the samples of *other classes*, as the authors' code in
      its default "exact" mode (RepDistiller's `CIFAR100InstanceSample`, behind the published
      numbers; it draws without replacement when it can, which changes only the variance).
      Needs labels: each sample's class is remembered from `batch.targets` as its index is
      seen (a buffer, checkpointed), or given up front with `labels`. Until every sample has
      been seen once (the first epoch) negatives come from the samples seen so far; an
      anchor with no other-class sample seen yet falls back to "uniform".
    The NCE noise probability stays 1/N in both modes, as in the authors' code.

    Needs sample indices: wrap the training set in `distill.data.IndexedDataset`.

    Args:
        student_layer, teacher_layer: module paths (the pooled penultimate features).
        n_data: number of samples in the training set (indices must be below it).
        feat_dim: embedding size (paper: 128).
        nce_k: negatives per sample (paper: 16384).
        nce_t: temperature τ (paper: 0.07).
        nce_m: memory momentum (paper: 0.5).
        negatives: "uniform" (default) or "other_class".
        labels: optional class of every training sample, in index order (length n_data), for
            "other_class" (e.g. `dataset.targets`); otherwise learned from the batches.
    """

    supports_sample_weights = True

    def __init__(
        self,
        student_layer: str | None = None,
        teacher_layer: str | None = None,
        n_data: int | None = None,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        negatives: str = "uniform",
        labels: Sequence[int] | Tensor | None = None,
    ):
        super().__init__()
        ((self.student_layer, self.teacher_layer),) = _single_pair("crd", student_layer, teacher_layer)
        self.student_taps, self.teacher_taps = (self.student_layer,), (self.teacher_layer,)
        if n_data is None or int(n_data) < 2:
            raise DistillError(f"crd.n_data must be the training set size (≥ 2), got {n_data}")
        check_positive("crd.feat_dim", feat_dim)
        check_positive("crd.nce_k", nce_k)
        check_positive("crd.nce_t", nce_t)
        check_range("crd.nce_m", nce_m, 0.0, 1.0)
        self.n_data, self.feat_dim, self.nce_k = int(n_data), int(feat_dim), int(nce_k)
        self.nce_t, self.nce_m = nce_t, nce_m
        # Random unit-scale start, as the paper's memory (uniform in ±1/sqrt(d/3), std 1/sqrt(d)).
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(self.n_data, self.feat_dim) * 2 * stdv - stdv)
        self.register_buffer("memory_t", torch.rand(self.n_data, self.feat_dim) * 2 * stdv - stdv)
        self.register_buffer("z_s", torch.tensor(-1.0))  # < 0: not estimated yet
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_known = False  # mirrors z >= 0 on the host, so no step asks the device
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        if negatives not in NEGATIVES:
            raise DistillError(f"crd.negatives: '{negatives}' is not one of {', '.join(NEGATIVES)}")
        self.negatives = negatives
        self._pool: tuple[Tensor, Tensor, Tensor, int] | None = None  # see _class_pool
        self._bank_host: Tensor | None = None  # a CPU mirror of `labels`, read instead of it
        if negatives == "other_class":
            bank = torch.full((self.n_data,), -1, dtype=torch.long)  # -1: not seen yet
            if labels is not None:
                given = torch.as_tensor(labels).reshape(-1).long()
                if given.numel() != self.n_data or (given < 0).any():
                    raise DistillError(
                        f"crd.labels must hold one class id >= 0 per training sample ({self.n_data}), "
                        f"got {given.numel()} values"
                    )
                bank.copy_(given)
            # Registered only in this mode, so uniform-mode checkpoints keep their keys.
            self.register_buffer("labels", bank)
            self._bank_host = bank.clone()
        elif labels is not None:
            raise DistillError("crd.labels is used only with negatives: other_class")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pool = self._bank_host = None  # derived from the label bank, which may just have been replaced
        self._z_known = bool((self.z_s >= 0) & (self.z_t >= 0))  # one read per load, not per step

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        fs = student.feature(self.student_layer, "student")
        ft = teacher.feature(self.teacher_layer, "teacher")
        _check_batch(fs, ft, "crd")
        self.embed_s = _Embed(fs[0].numel(), self.feat_dim).to(fs.device)
        self.embed_t = _Embed(ft[0].numel(), self.feat_dim).to(fs.device)
        self.to(fs.device)

    def _index(self, batch: Batch, b: int) -> Tensor:
        if batch.index is None:
            raise DistillError(
                "crd needs each sample's dataset index: wrap the training dataset in "
                "distill.data.IndexedDataset so batches are (x, y, index)"
            )
        idx = batch.index.reshape(-1).long()
        if idx.shape[0] != b:
            raise DistillError(f"crd: {idx.shape[0]} sample indices for a batch of {b}")
        host = batch.host("index")  # checked on the host copy; without one, indexing the bank fails
        if host is not None and host.numel() and (host.min() < 0 or host.max() >= self.n_data):
            raise DistillError(
                f"crd: sample index {int(host.max())} is outside [0, n_data={self.n_data}); "
                "set crd.n_data to the training set size"
            )
        return idx

    def _class_pool(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """Sample indices sorted by known class (unseen ones first), each class's start in
        that order and its size, and the number of unseen samples. Recomputed when the bank
        changes."""
        if self._pool is None:  # computed on the host mirror, then sent over without a sync
            bank = self._host_bank()
            order = torch.sort(bank, stable=True).indices
            unseen = int((bank < 0).sum())
            counts = torch.bincount(bank[bank >= 0], minlength=int(bank.max()) + 1 if bank.numel() else 1)
            starts = unseen + counts.cumsum(0) - counts
            device = self.labels.device
            pin = device.type == "cuda"
            order, starts, counts = (
                (t.pin_memory() if pin else t).to(device, non_blocking=True) for t in (order, starts, counts)
            )
            self._pool = (order, starts, counts, unseen)
        return self._pool

    def _host_bank(self) -> Tensor:
        if self._bank_host is None:
            self._bank_host = self.labels.cpu()  # once (and after a load), not per step
        return self._bank_host

    def _learn_labels(self, idx: Tensor, y: Tensor, host_idx: Tensor | None, host_y: Tensor | None) -> None:
        """Writes the batch's classes into the bank when any is new; decided on the host."""
        if host_idx is None or host_y is None:
            host_idx, host_y = idx.cpu(), y.cpu()  # no host copy given: one sync
        host_idx, host_y = host_idx.reshape(-1).long(), host_y.reshape(-1).long()
        bank = self._host_bank()
        if (bank[host_idx] != host_y).any():
            bank[host_idx] = host_y
            self.labels[idx] = y
            self._pool = None

    def draw_contrast(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        host_idx: Tensor | None = None,
        host_targets: Tensor | None = None,
    ) -> Tensor:
        """(B,) anchor indices -> (B, K+1) memory rows: the anchor, then `nce_k` negatives.
        `host_idx`, `host_targets`: CPU copies of `idx`, `targets` (needed only on a GPU: the
        class bank is updated from them without a sync)."""
        b, k, n = idx.shape[0], self.nce_k, self.n_data
        # Uniform over the other N − 1 samples: draw from N − 1 slots and skip the anchor's.
        r = torch.randint(0, n - 1, (b, k), device=idx.device)
        neg = r + (r >= idx[:, None]).long()
        if self.negatives == "other_class":
            if targets is None:
                raise DistillError(
                    "crd.negatives: other_class needs the class labels in each batch; use negatives: "
                    "uniform for unlabeled data"
                )
            y = targets.reshape(-1).long().to(idx.device)
            if y.shape[0] != b:
                raise DistillError(f"crd: {y.shape[0]} labels for a batch of {b}")
            # Learn classes from training batches only (evaluation indices are another dataset's).
            if self.training:
                on_cpu = idx.device.type == "cpu"
                self._learn_labels(idx, y, idx if on_cpu else host_idx, y if on_cpu else host_targets)
            order, starts, counts, unseen = self._class_pool()
            n_class = counts[y]  # (B,), the anchor's class size among seen samples
            n_other = (n - unseen) - n_class  # seen samples of other classes
            # Uniform over the sorted seen samples with the anchor's class block cut out.
            u = (torch.rand(b, k, device=idx.device) * n_other[:, None].clamp_min(1)).long()
            u = torch.minimum(u, (n_other[:, None] - 1).clamp_min(0))
            first = (starts[y] - unseen)[:, None]
            pos = unseen + u + (u >= first).long() * n_class[:, None]
            picked = order[pos.clamp_max(n - 1)]
            neg = torch.where(n_other[:, None] > 0, picked, neg)
        return torch.cat([idx[:, None], neg], dim=1)

    def _scores(self, anchor: Tensor, memory: Tensor, contrast: Tensor, z: Tensor) -> Tensor:
        w = memory[contrast]  # (B, K+1, F), no gradient (a buffer)
        out = torch.exp(torch.bmm(w, anchor[:, :, None]).squeeze(-1) / self.nce_t)  # (B, K+1)
        if not self._z_known:  # the first batch: Z = N · mean score (on the device, no read-back)
            z.copy_(out.detach().mean() * self.n_data)
        return out / z

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        if self.embed_s is None:
            raise DistillError(
                "crd: the embedding heads do not exist yet; call objective.setup(student_out, "
                "teacher_out, batch) on a first batch before building the optimizer"
            )
        fs = student.feature(self.student_layer, "student")
        ft = teacher.feature(self.teacher_layer, "teacher")
        _check_batch(fs, ft, "crd")
        idx = self._index(batch, fs.shape[0]).to(self.memory_s.device)
        es, et = self.embed_s(fs), self.embed_t(ft)  # (B, F) each, unit norm
        contrast = self.draw_contrast(idx, batch.targets, batch.host("index"), batch.host("targets"))
        per_sample = nce_loss(self._scores(es, self.memory_t, contrast, self.z_s), self.n_data) + nce_loss(
            self._scores(et, self.memory_s, contrast, self.z_t), self.n_data
        )
        self._z_known = True
        if self.training:
            with torch.no_grad():
                for memory, e in ((self.memory_s, es), (self.memory_t, et)):
                    mixed = memory[idx] * self.nce_m + e.detach() * (1 - self.nce_m)
                    memory[idx] = F.normalize(mixed, dim=1)
        return reduce(per_sample, batch.weights, "mean")
