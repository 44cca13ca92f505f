"""Intermediate-layer terms for transformers: hidden states and attention distributions.

Both read what `distill.nlp.HFAdapter(hidden_states=True, attentions=True)` puts in
`Outputs.extras`: `hidden_states` (a tuple of (B, T, H), index 0 = the embedding output, i =
after block i) and `attentions` (a tuple of (B, heads, T, T) probabilities, index i = block i).
Padding tokens (attention mask 0) are excluded.

The layer mapping says which student layer learns from which teacher layer: a dict
`{student_index: teacher_index}` (negative indices count from the end), or "uniform": student
layer i of n learns from teacher layer round(i·m/n) of m, TinyBERT's choice, plus the embeddings
(index 0 -> 0) for hidden states.

For a student cut from its teacher (`distill.nlp.make_student`: blocks b_0 < ... < b_{n-1} kept),
hidden states also take "cut": the input of student block j learns the input of teacher block
b_j, and the student's final (normed) state the teacher's. Each kept block, together with the
ones before it, then learns to do the work of the teacher blocks removed around it (the
intermediate-state loss of depth-pruned LLM recovery: Sreenivas et al. 2024, Minitron; Kim et al.
2024, Shortened LLaMA). It reads the kept blocks from the student's outputs
(`extras["layer_origin"]`, which the `hf` adapter sets from `config.distill_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.losses.base import LossTerm
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES

LayerMap = Mapping[int, int] | Sequence[Sequence[int]] | str


def cut_pairs(origin: Sequence[int], n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """The "cut" map of hidden-state indices: (j, origin[j]) for each student block j (its input
    against the input of the teacher block it came from), then (final, final)."""
    blocks, teacher_blocks = n_student - 1, n_teacher - 1
    if len(origin) != blocks or not all(0 <= b < teacher_blocks for b in origin):
        raise DistillError(
            f"layer_map: cut: the student's blocks came from teacher blocks {list(origin)}, but it has "
            f"{blocks} blocks and the teacher {teacher_blocks}; distil it from the teacher it was cut from"
        )
    return [*((j, int(b)) for j, b in enumerate(origin)), (blocks, teacher_blocks)]


def _pairs(
    layer_map: LayerMap, n_student: int, n_teacher: int, first: int, origin: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Resolves a layer map to (student, teacher) index pairs within [0, n) for each side.

    `first` is the lowest index a uniform map uses (0 for hidden states incl. embeddings, else 1);
    `origin` the teacher block of each student block, for "cut".
    """
    if layer_map == "cut":
        if origin is None:
            raise DistillError(
                "layer_map: cut needs a student cut from its teacher (hf student with num_layers or "
                "layers, which records config.distill_layers) read by the hf adapter with hidden states"
            )
        return cut_pairs(origin, n_student, n_teacher)
    if isinstance(layer_map, str):
        if layer_map == "last":
            return [(n_student - 1, n_teacher - 1)]
        if layer_map != "uniform":
            raise DistillError(
                f"layer_map '{layer_map}' is not one of uniform, last, or a {{student: teacher}} dict"
            )
        if first == 0:  # hidden states: n = blocks + 1 entries, 0 = embeddings
            ls, lt = n_student - 1, n_teacher - 1
            return [(i, round(i * lt / max(ls, 1))) for i in range(n_student)]
        # attentions: one entry per block; block i (1-based) learns from teacher block i·m/n
        return [(i - 1, max(1, round(i * n_teacher / n_student)) - 1) for i in range(1, n_student + 1)]
    items = list(layer_map.items()) if isinstance(layer_map, Mapping) else [tuple(p) for p in layer_map]
    pairs = []
    for item in items:
        if len(item) != 2:
            raise DistillError(f"layer_map entry {item} must be a (student, teacher) pair")
        s, t = int(item[0]), int(item[1])
        s2, t2 = (
            s % n_student if -n_student <= s < n_student else None,
            t % n_teacher if -n_teacher <= t < n_teacher else None,
        )
        if s2 is None or t2 is None:
            raise DistillError(
                f"layer_map pair ({s}, {t}) is out of range: the student has {n_student} and the teacher "
                f"{n_teacher} entries"
            )
        pairs.append((s2, t2))
    if not pairs:
        raise DistillError("layer_map is empty: map at least one student layer to a teacher layer")
    return pairs


def _extra(out: Outputs, key: str, who: str) -> tuple:
    v = out.extras.get(key)
    if not v:
        flag = "hidden_states=True" if key == "hidden_states" else "attentions=True"
        raise DistillError(
            f"the {who} outputs have no {key}; use distill.nlp.hf_adapter({flag}) as the {who}'s adapter "
            f"(in a recipe: the {who}'s hf init_args {key}: true)"
        )
    # A Teacher's outputs come from inference mode; tensors nested in tuples are not cloned by
    # Outputs.clone(), and inference tensors cannot be saved for backward.
    return tuple(_plain(x) if isinstance(x, Tensor) else x for x in v)


def _plain(x: Tensor) -> Tensor:
    """A copy usable in autograd when `x` was made under inference mode (a frozen teacher's)."""
    return x.clone() if x.is_inference() else x


def _token_mask(out: Outputs, batch: Batch, b: int, t: int, device) -> Tensor:
    m = out.extras.get("attention_mask")
    if m is None and isinstance(batch.inputs, Mapping):
        m = batch.inputs.get("attention_mask")
    if isinstance(m, Tensor) and m.shape == (b, t):
        return m.to(device).bool()
    return torch.ones(b, t, dtype=torch.bool, device=device)


def hidden_state_loss(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, kind: str = "mse"
) -> Tensor:
    """Per-token MSE (mean over features) or 1 - cosine between (B, T, H) states, averaged over
    the tokens where `mask` (B, T) is True. Student and teacher widths must already agree."""
    s, t = student.float(), _plain(teacher.float())
    if s.shape != t.shape:
        raise DistillError(f"hidden states {tuple(s.shape)} vs {tuple(t.shape)}: project the student first")
    per = (s - t).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1)


def attention_kl(student: Tensor, teacher: Tensor, mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """KL(teacher row || student row) of attention probabilities, MiniLM (Wang et al. 2020) eq. 5.

    Args:
        student, teacher: (B, heads, T, T) attention probabilities (rows sum to 1).
        mask: (B, T) True for real tokens; padded query rows are excluded.

    Returns:
        The KL summed over keys, averaged over heads and real query positions.
    """
    s, t = student.float(), _plain(teacher.float())
    per = (t * (t.clamp_min(eps).log() - s.clamp_min(eps).log())).sum(-1).mean(1)  # (B, T)
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1)


LAYER_REDUCTIONS = ("mean", "sum")


class _HiddenState(LossTerm):
    kind = "mse"

    def __init__(
        self, layer_map: LayerMap = "uniform", projection: bool = True, layer_reduction: str = "mean"
    ):
        super().__init__()
        if layer_reduction not in LAYER_REDUCTIONS:
            raise DistillError(
                f"{self._name}.layer_reduction: '{layer_reduction}' is not one of {', '.join(LAYER_REDUCTIONS)}"
            )
        self.layer_reduction = layer_reduction
        if not isinstance(layer_map, str | Mapping | Sequence):
            raise DistillError(
                f"{self._name}.layer_map must be 'uniform', 'last', 'cut' or a {{student: teacher}} dict"
            )
        if isinstance(layer_map, str) and layer_map not in ("uniform", "last", "cut"):
            raise DistillError(
                f"{self._name}.layer_map '{layer_map}' is not one of uniform, last, cut, or a dict"
            )
        self.layer_map = layer_map
        self.projection = projection
        self.proj = nn.ModuleDict()

    @property
    def _name(self) -> str:
        return f"hidden_{self.kind}"

    def _pairs(self, student: Outputs, hs: tuple, ht: tuple) -> list[tuple[int, int]]:
        return _pairs(self.layer_map, len(hs), len(ht), 0, student.extras.get("layer_origin"))

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        hs, ht = _extra(student, "hidden_states", "student"), _extra(teacher, "hidden_states", "teacher")
        for i, j in self._pairs(student, hs, ht):
            ds, dt = hs[i].shape[-1], ht[j].shape[-1]
            if ds != dt:
                if not self.projection:
                    raise DistillError(
                        f"{self._name}: student width {ds} != teacher width {dt}; set projection: true"
                    )
                self.proj[str(i)] = nn.Linear(ds, dt).to(hs[i].device)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        hs, ht = _extra(student, "hidden_states", "student"), _extra(teacher, "hidden_states", "teacher")
        pairs = self._pairs(student, hs, ht)
        b, t = hs[0].shape[:2]
        mask = _token_mask(student, batch, b, t, hs[0].device)
        total = 0.0
        for i, j in pairs:
            s = hs[i]
            if str(i) in self.proj:
                s = self.proj[str(i)](s.float())
            elif s.shape[-1] != ht[j].shape[-1]:
                raise DistillError(
                    f"{self._name}: student layer {i} has width {s.shape[-1]}, teacher layer {j} "
                    f"{ht[j].shape[-1]}, and no projection was set up (the trainer calls setup once)"
                )
            total = total + hidden_state_loss(s, ht[j], mask, self.kind)
        return total if self.layer_reduction == "sum" else total / len(pairs)


@LOSSES.register("hidden_mse")
class HiddenMSE(_HiddenState):
    """MSE between mapped hidden states (TinyBERT, Jiao et al. 2020, eq. 8), through a learned
    linear projection when the widths differ (created in `setup`, trained with the student).

    Args:
        layer_map: {student: teacher} hidden-state indices (0 = embeddings), "uniform", "last",
            or "cut" (a student cut from this teacher: each block's input against the input of
            the teacher block it came from; see the module docstring).
        projection: allow a learned projection when widths differ.
        layer_reduction: "mean" (default) or "sum" over the layer pairs. TinyBERT sums them, so
            its published weights assume "sum" (5x "mean" for a 4-layer student with the
            uniform map: embeddings + 4 blocks); "mean" keeps a weight's meaning when the
            number of layers changes.
    """

    kind = "mse"


@LOSSES.register("hidden_cos")
class HiddenCosine(_HiddenState):
    """1 - cosine similarity between mapped hidden states (DistilBERT's cosine loss, Sanh et al.
    2019), through a learned projection when widths differ; see `HiddenMSE` for the arguments."""

    kind = "cos"


@LOSSES.register("attn_kl")
class AttentionKL(LossTerm):
    """KL between teacher and student attention distributions (MiniLM, Wang et al. 2020).

    Args:
        layer_map: {student: teacher} block indices, "last" (MiniLM's choice) or "uniform".
        heads: "match" (head counts must agree) or "mean" (compare head-averaged maps, for
            students with fewer heads).
    """

    def __init__(self, layer_map: LayerMap = "last", heads: str = "match"):
        super().__init__()
        if heads not in ("match", "mean"):
            raise DistillError(f"attn_kl.heads '{heads}' is not one of match, mean")
        if isinstance(layer_map, str) and layer_map not in ("uniform", "last"):
            raise DistillError(f"attn_kl.layer_map '{layer_map}' is not one of uniform, last, or a dict")
        self.layer_map = layer_map
        self.heads = heads

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        a_s, a_t = _extra(student, "attentions", "student"), _extra(teacher, "attentions", "teacher")
        pairs = _pairs(self.layer_map, len(a_s), len(a_t), first=1)
        b, _, t, _ = a_s[0].shape
        mask = _token_mask(student, batch, b, t, a_s[0].device)
        total = 0.0
        for i, j in pairs:
            s, te = a_s[i], a_t[j]
            if s.shape[1] != te.shape[1] and self.heads == "match":
                raise DistillError(
                    f"attn_kl: student block {i} has {s.shape[1]} heads, teacher block {j} has "
                    f"{te.shape[1]}; set attn_kl.heads: mean"
                )
            if self.heads == "mean":
                s, te = s.mean(1, keepdim=True), te.mean(1, keepdim=True)
            total = total + attention_kl(s, te, mask)
        return total / len(pairs)
