"""Distillation between language models with different tokenizers (teacher vocabulary != student's).

Token-level KD compares p_teacher(next token) with q_student(next token) over one vocabulary; with
two tokenizers neither the positions nor the vocabularies line up. Two terms handle that:

- `uld`: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss for LLMs"). Both distributions are sorted in decreasing
  order and compared entry by entry, Σ_i |p_(i) - q_(i)| (the vectors zero-padded to one length),
  the closed form of a Wasserstein-1 distance between them when every token is one unit apart.
  It needs no vocabulary mapping, and is blind to *which* token gets which probability: it
  teaches the student how peaked the teacher is, not what it predicts. Positions are paired as
  in the paper (`positions="index"`: the k-th predicted token of the student's text with the
  k-th of the teacher's, up to the shorter), or by characters (`positions="chars"`).
- `aligned_kd`: the alignment method. Teacher and student positions are paired where their
  tokens have consumed the same bytes of the text (the two models then predict what follows the
  same text prefix). At such a position the teacher's probabilities are carried onto the student's
  vocabulary through a token map (teacher id -> student id of the same bytes, `xt_map`), and
  the student is trained by forward KL on the coarsened distributions {mapped student ids} ∪
  {everything else}; the teacher mass that has no counterpart is compared by ULD with the
  student's remaining mass. Student positions with no aligned teacher position fall back to ULD
  against the teacher's last position before them (`unaligned="uld"`) or are skipped.

What is exact: with the same tokenizer on both sides and the full teacher distribution, every
position aligns, every token maps, and `aligned_kd` equals forward KL (`fkl`). The coarse KL is a
lower bound of the true KL (data processing) when the map is partial. Where the tokenizers
split a word differently, the next-token events differ ("Ġun" vs "Ġunbel"), so the mapped
probability of a short student token underestimates what the student should give it; the map
can instead send each teacher token to the *first* student token of its own spelling
(`distill.nlp.align.vocab_map(..., mode="prefix")`), which carries all the teacher's mass.

The teacher side is sparse, as a store keeps it: per teacher position the top-k probabilities
sorted in decreasing order, their token ids and the tail mass outside them
(`sparse_teacher(logits, k)`). An online teacher goes through the same function, so a stored
teacher and a live one give the same loss on the same batch. With k < V the ULD sum is exact on
the top k entries and counts the tail as one lump, |tail_p - tail_q| (a lower bound of the tail's
part of the distance).

Inputs these terms read from `teacher.extras["xt"][name]` (written by `distill.nlp.align`'s
teachers): `probs` (B, Tt, k) float, `ids` (B, Tt, k) long, `tail` (B, Tt), `valid` (B, Tt) bool
(the teacher position predicts a token of the text), `align` (B, Ts) long (the teacher
position that has consumed the same bytes of the text as student position t, or -1), `fallback`
(B, Ts) long (the last teacher position that has consumed less, or -1) and `map` (Vt,) long
(student id per teacher id, -1 without one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.losses.base import LossTerm, check_positive
from distill.losses.sequence import token_mask
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES

# --------------------------------------------------------------------------------------------
# Plain tensor functions.
# --------------------------------------------------------------------------------------------


def sparse_teacher(
    logits: Tensor, k: int | None = None, temperature: float = 1.0, vocab_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """A teacher distribution as its top-k probabilities, token ids and tail mass.

    Args:
        logits: (..., V) teacher logits.
        k: entries kept (None or >= V: all, sorted).
        temperature: softmax(logits / temperature).
        vocab_size: the teacher tokenizer's ids (`len(tokenizer)`); logit columns past them (a
            padded embedding, as Qwen, Phi and Pythia have) stand for no token and are dropped.

    Returns:
        probs (..., k) float32 in decreasing order, ids (..., k) long, tail (...) float32 =
        1 - probs.sum(-1) (clamped at 0).
    """
    check_positive("temperature", temperature)
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    p = F.softmax(logits.detach().float() / temperature, dim=-1)
    k = p.shape[-1] if k is None else min(int(k), p.shape[-1])
    if k < 1:
        raise DistillError(f"k must be >= 1 (or None for the whole vocabulary), got {k}")
    probs, ids = p.topk(k, dim=-1, sorted=True)
    if k == p.shape[-1]:
        tail = torch.zeros_like(probs[..., 0])  # nothing left out (1 - Σp would be rounding noise)
    else:
        tail = (1.0 - probs.sum(-1)).clamp_min(0.0)
    return probs, ids, tail


def _sorted_top(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(N, k) largest entries of q in decreasing order (zero-padded when q has fewer) and their sum's rest."""
    n = min(k, q.shape[-1])
    top = q.topk(n, dim=-1, sorted=True).values
    if n < k:
        top = F.pad(top, (0, k - n))
    rest = (q.sum(-1) - top.sum(-1)).clamp_min(0.0)
    return top, rest


def uld_distance(student_probs: Tensor, t_probs: Tensor, t_tail: Tensor | None = None) -> Tensor:
    """Per-row ULD between a student distribution and a sorted sparse teacher one.

    Σ_{i<k} |p_(i) - q_(i)| + |tail_p - tail_q|, where p_(i) / q_(i) are the i-th largest
    probabilities (zero-padded), k the teacher's kept entries and tail the mass beyond them. With
    the teacher's whole vocabulary kept this is exactly the paper's Σ_i |p_(i) - q_(i)| over the
    zero-padded vectors.

    Args:
        student_probs: (N, Vs) probabilities (rows may sum to less than 1: a part of a distribution).
        t_probs: (N, k) teacher probabilities in decreasing order.
        t_tail: (N,) teacher mass outside them (default 0).

    Returns:
        (N,) float32.
    """
    q = student_probs.float()
    p = t_probs.float()
    top, rest = _sorted_top(q, p.shape[-1])
    tail = torch.zeros_like(rest) if t_tail is None else t_tail.float()
    return (p - top).abs().sum(-1) + (tail - rest).abs()


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    k: int | None = None,
    teacher_vocab_size: int | None = None,
) -> Tensor:
    """ULD (Boizard et al. 2024) between position-paired student and teacher logits of any vocabularies.

    Args:
        student_logits: (N, Vs) or (B, T, Vs).
        teacher_logits: (N, Vt) or (B, T, Vt), the same leading dims; a constant.
        mask: leading-dims bool, True where the position counts (None: all).
        temperature: both sides softmax(logits / temperature).
        k: teacher entries compared one by one (None: all: the exact ULD).
        teacher_vocab_size: the teacher tokenizer's ids; wider (padded) logit columns are dropped.

    Returns:
        The mean over counted positions, a float32 scalar.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise DistillError(
            f"ULD pairs positions one to one: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} must share the leading dims (align the positions first)"
        )
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        m = mask.reshape(-1).bool()
        s, t = s[m], t[m]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    probs, _, tail = sparse_teacher(t, k, temperature, teacher_vocab_size)
    q = F.softmax(s.float() / temperature, dim=-1)
    return uld_distance(q, probs, tail).mean()


def mapped_kl(
    student_logits: Tensor,
    t_probs: Tensor,
    t_ids: Tensor,
    t_tail: Tensor,
    vocab_map: Tensor,
    *,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-row KL on the tokens the two vocabularies share, and ULD on the rest.

    The teacher's kept probabilities are moved onto student ids through `vocab_map` (summed when
    several teacher tokens map to one student token): P over the student ids that receive mass,
    plus one "other" bucket holding the teacher mass with no counterpart (and its tail). The
    student is coarsened the same way (its probabilities on those ids, and the rest), and

        kl  = Σ_s P_s log(P_s / q_s) + P_other log(P_other / q_other)
        uld = ULD(teacher's unmapped probabilities (sorted) + tail, the student's probabilities off those ids)

    Args:
        student_logits: (N, Vs).
        t_probs: (N, k) teacher probabilities (sorted or not); t_ids (N, k) their teacher ids;
            t_tail (N,) the teacher mass outside them.
        vocab_map: (Vt,) long, the student id of each teacher id, or -1. Teacher ids past it
            (padding columns of a teacher wider than its tokenizer) stand for no token: dropped.

    Returns:
        kl (N,), uld (N,), float32.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, Vs)
    p = t_probs.float()
    vmap = vocab_map.to(t_ids.device)
    t_ids = t_ids.long()
    inside = t_ids < vmap.shape[0]
    p = torch.where(inside, p, 0.0)
    sid = torch.where(inside, vmap[t_ids.clamp_max(vmap.shape[0] - 1)], -1)  # (N, k)
    matched = sid >= 0
    target = torch.zeros_like(log_q).scatter_add_(1, sid.clamp_min(0), torch.where(matched, p, 0.0))
    has = target > 0
    q = log_q.exp()
    kl_in = torch.where(has, target * (target.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
    p_other = torch.where(matched, 0.0, p).sum(-1) + t_tail.float()  # not 1 - ΣP: no rounding noise
    q_other = torch.where(has, 0.0, q).sum(-1)
    kl_out = torch.where(
        p_other > 0, p_other * (p_other.clamp_min(1e-30).log() - q_other.clamp_min(1e-30).log()), 0.0
    )
    unmapped = torch.where(matched, 0.0, p).sort(dim=-1, descending=True).values
    uld = uld_distance(torch.where(has, 0.0, q), unmapped, t_tail)
    return kl_in + kl_out, uld


def mapped_kl_sum(
    student_logits: Tensor,
    rows: Tensor,
    t_probs: Tensor,
    t_ids: Tensor,
    t_tail: Tensor,
    vocab_map: Tensor,
    *,
    temperature: float = 1.0,
    uld_weight: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Σ over the `rows` of `mapped_kl`'s kl + uld_weight·uld, computed in chunks of rows.

    Same value and gradient as `mapped_kl` on `student_logits[rows]`, without its (N, Vs) float32
    temporaries for all N rows at once (six of them, plus the copy `[rows]` makes): each chunk of
    rows is a view of the logits, its gradient is written into one buffer of the logits' size as
    it is computed (`distill.losses.sequence`'s chunked reduction), so the extra memory is about
    10 · chunk_size · Vs floats.

    Args:
        student_logits: (B, T, Vs) or (N, Vs).
        rows: (B, T) or (N,) bool, the rows to count.
        t_probs, t_ids: (B, T, k) or (N, k), the teacher at each row (any value where not counted);
            t_tail: (B, T) or (N,). vocab_map: as in `mapped_kl`.
        chunk_size: rows per chunk (None: about 4M logits per chunk).

    Returns:
        A scalar (the sum, not the mean).
    """
    from distill.losses.sequence import _reduce_chunked

    vs = student_logits.shape[-1]
    s2d = student_logits.reshape(-1, vs)
    m = rows.reshape(-1).to(s2d.device)
    p, ids, tail = t_probs.reshape(m.shape[0], -1), t_ids.reshape(m.shape[0], -1), t_tail.reshape(-1)

    def per_row(s_c: Tensor, a: int, b: int) -> Tensor:
        kl, uld = mapped_kl(s_c, p[a:b], ids[a:b], tail[a:b], vocab_map, temperature=temperature)
        return kl + uld_weight * uld

    return _reduce_chunked(s2d, m.float(), m, per_row, chunk_size, "sum")


# --------------------------------------------------------------------------------------------
# Reading the aligned teacher from Outputs.extras, and the registered terms.
# --------------------------------------------------------------------------------------------


def cross_teacher(teacher: Outputs | None, name: str | None, term: str) -> Mapping[str, Tensor]:
    """The `extras["xt"][name]` entry of a cross-tokenizer teacher, with a one-line error otherwise."""
    xt = None if teacher is None else teacher.extras.get("xt")
    if not isinstance(xt, Mapping) or not xt:
        raise DistillError(
            f"the {term} term needs a teacher with another tokenizer, read through "
            "distill.nlp.align.CrossTokenizerTeacher (online) or CachedCrossTokenizerTeacher (a store); "
            "for a teacher with the student's tokenizer use fkl"
        )
    if name is None:
        if len(xt) != 1:
            raise DistillError(
                f"the {term} term got {len(xt)} teachers ({', '.join(xt)}); set {term}.teacher to one of them "
                "(one term per teacher, each with its own weight)"
            )
        return next(iter(xt.values()))
    if name not in xt:
        raise DistillError(f"{term}.teacher '{name}' is not one of the teachers: {', '.join(xt)}")
    return xt[name]


def _gather_rows(x: Tensor, pos: Tensor) -> Tensor:
    """x (B, Tt, ...) at teacher positions pos (B, Ts) (>= 0) -> (B, Ts, ...)."""
    idx = pos.clamp_min(0)
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


def index_pairs(student_mask: Tensor, teacher_valid: Tensor) -> Tensor:
    """(B, Ts) long: the k-th counted student position paired with the k-th valid teacher one (ULD's rule), -1 else."""
    out = torch.full(student_mask.shape, -1, dtype=torch.long, device=student_mask.device)
    for b in range(student_mask.shape[0]):
        s_pos = student_mask[b].nonzero().squeeze(-1)
        t_pos = teacher_valid[b].to(student_mask.device).nonzero().squeeze(-1)
        n = min(len(s_pos), len(t_pos))
        out[b, s_pos[:n]] = t_pos[:n]
    return out


class _CrossTerm(LossTerm):
    # reads the teacher through the batch's raw texts and byte offsets (any teacher tokenizer):
    # `distill run` then collates texts with offsets and runs the teacher on them (distill.run.cross)
    needs_texts = True

    def __init__(
        self,
        temperature: float = 1.0,
        teacher: str | None = None,
        shift_labels: bool = True,
        ignore_index: int = -100,
    ):
        super().__init__()
        check_positive(f"{self.name}.temperature", temperature)
        self.temperature = temperature
        self.teacher = teacher
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index

    name = "cross"

    def _inputs(self, student: Outputs, teacher: Outputs | None, batch: Batch):
        s = student.require_logits("student")
        if s.dim() != 3:
            raise DistillError(f"the {self.name} term needs (B, T, V) student logits, got {tuple(s.shape)}")
        xt = cross_teacher(teacher, self.teacher, self.name)
        mask = token_mask(batch, s, self.shift_labels, self.ignore_index)
        if xt["align"].shape != mask.shape:
            raise DistillError(
                f"the teacher's alignment {tuple(xt['align'].shape)} does not match the student's tokens "
                f"{tuple(mask.shape)}: collate the batch with distill.nlp.align.CrossTokenizerCollator"
            )
        return s, xt, mask

    def _sparse_at(self, xt, pos: Tensor):
        """Teacher (probs, ids, tail) at positions pos (B, Ts); the temperature re-applied to stored probs."""
        probs = _gather_rows(xt["probs"], pos).float()
        ids = _gather_rows(xt["ids"], pos)
        tail = _gather_rows(xt["tail"], pos).float()
        if self.temperature != 1 and "served" in xt:
            raise DistillError(
                f"{self.name}.temperature: {self.temperature} with a served teacher (top-k log-probabilities "
                "at temperature 1, logits unknown: the tail cannot be tempered); set temperature: 1"
            )
        if self.temperature != 1:
            # p^(1/T) renormalised is softmax(z / T) restricted to the kept tokens (tail dropped).
            probs = probs.clamp_min(1e-30) ** (1.0 / self.temperature)
            probs = probs / probs.sum(-1, keepdim=True)
            tail = torch.zeros_like(tail)
        return probs, ids, tail


@LOSSES.register("uld")
class ULD(_CrossTerm):
    """Universal Logit Distillation (Boizard et al. 2024): sorted-probability L1 per paired position.

    Args:
        positions: "index" (the paper: k-th predicted student token with the k-th teacher one) or
            "chars" (the teacher position that has read the same text; other positions skipped).
        temperature: both distributions softmax(logits / T) (the teacher's from its stored probabilities).
        teacher: which teacher of `extras["xt"]` (None: the only one).
    """

    name = "uld"

    def __init__(self, positions: str = "index", **kw):
        super().__init__(**kw)
        if positions not in ("index", "chars"):
            raise DistillError(f"uld.positions '{positions}' is not one of index, chars")
        self.positions = positions

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        s, xt, mask = self._inputs(student, teacher, batch)
        pos = (
            index_pairs(mask, xt["valid"])
            if self.positions == "index"
            else torch.where(mask, xt["align"], -1)
        )
        keep = pos >= 0
        if not keep.any():
            return s.sum() * 0.0
        probs, _, tail = self._sparse_at(xt, pos)
        q = F.softmax(s[keep].float() / self.temperature, dim=-1)
        return uld_distance(q, probs[keep], tail[keep]).mean()


@LOSSES.register("aligned_kd")
class AlignedKD(_CrossTerm):
    """Character-aligned positions, teacher probabilities mapped onto the student vocabulary, ULD elsewhere.

    Args:
        uld_weight: weight of the ULD part on the teacher mass with no student counterpart.
        unaligned: "uld" (student positions with no teacher position that has read the same
            text: ULD against the teacher's last position that has read less) or "skip".
        unaligned_weight: weight of those positions' ULD.
        chunk_size: aligned positions per chunk of the mapped KL (None: automatic; see
            `mapped_kl_sum`), which bounds its memory whatever the vocabulary and sequence length.
        temperature, teacher: as in `uld`.

    The loss is the mean over counted student positions of kl + uld_weight·uld at aligned ones
    and unaligned_weight·uld at the others (see `mapped_kl`).
    """

    name = "aligned_kd"

    def __init__(
        self,
        uld_weight: float = 1.0,
        unaligned: str = "uld",
        unaligned_weight: float = 1.0,
        chunk_size: int | None = None,
        **kw,
    ):
        super().__init__(**kw)
        if chunk_size is not None and int(chunk_size) < 1:
            raise DistillError(f"aligned_kd.chunk_size must be >= 1 (or null for auto), got {chunk_size}")
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        if unaligned not in ("uld", "skip"):
            raise DistillError(f"aligned_kd.unaligned '{unaligned}' is not one of uld, skip")
        if uld_weight < 0 or unaligned_weight < 0:
            raise DistillError("aligned_kd.uld_weight and unaligned_weight must be >= 0")
        self.uld_weight = uld_weight
        self.unaligned = unaligned
        self.unaligned_weight = unaligned_weight

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        s, xt, mask = self._inputs(student, teacher, batch)
        aligned = mask & (xt["align"] >= 0)
        total = s.new_zeros((), dtype=torch.float32)
        count = int(aligned.sum())
        if count:
            probs, ids, tail = self._sparse_at(xt, xt["align"])
            total = total + mapped_kl_sum(
                s,
                aligned,
                probs,
                ids,
                tail,
                xt["map"],
                temperature=self.temperature,
                uld_weight=self.uld_weight,
                chunk_size=self.chunk_size,
            )
        if self.unaligned == "uld":
            other = mask & (xt["align"] < 0) & (xt["fallback"] >= 0)
            n = int(other.sum())
            if n:
                probs, _, tail = self._sparse_at(xt, xt["fallback"])
                q = F.softmax(s[other].float() / self.temperature, dim=-1)
                total = total + self.unaligned_weight * uld_distance(q, probs[other], tail[other]).sum()
                count += n
        if not count:
            return s.sum() * 0.0
        return total / count
