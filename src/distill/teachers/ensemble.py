"""Many teachers as one: `Ensemble` combines frozen members per sample; `EnsembleKD` learns the mix.

The fixed weighting rules live on the frozen side (`Ensemble`), so any logit term (`kd`,
`logit_mse`, ...) distils from the combined teacher unchanged. A learned per-sample weighting
needs trainable parameters, and the teacher side is never trained, so the learned gate is a
small adapter owned by a loss term (`ensemble_kd`): it reads every member's logits from
`teacher.extras["members"]`, is created in `setup` from the real shapes, trained with the student,
checkpointed with the objective and left out of the exported student.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.adapters import Adapter, auto_adapter
from distill.errors import DistillError
from distill.losses.base import LossTerm, check_positive, check_range, flatten_logits
from distill.losses.logits import kd_loss
from distill.outputs import Batch, Outputs
from distill.registry import LOSSES
from distill.teachers.frozen import Teacher

RULES = ("mean_logits", "mean_probs", "confidence", "entropy", "learned")


# --------------------------------------------------------------------------- plain functions


def member_weights(logits: Tensor, rule: str, targets: Tensor | None = None, tau: float = 1.0) -> Tensor:
    """Per-sample weight of each teacher.

    Args:
        logits: (K, B, C) logits of K teachers.
        rule: `mean_logits` / `mean_probs` / `learned` (uniform 1/K), `confidence`
            (softmax over teachers of -CE(teacher, label)/tau: the teacher that puts more mass on
            the true label counts more, as in CA-MKD, Zhang et al. 2022) or `entropy`
            (softmax over teachers of -H(p_teacher)/tau: the more certain teacher counts more;
            needs no label).
        targets: (B,) labels, required by `confidence`.
        tau: > 0; large tau tends to uniform weights, small tau to picking one teacher.

    Returns:
        (B, K) weights, each row summing to 1.
    """
    k, b = logits.shape[0], logits.shape[1]
    z = logits.float()
    if rule in ("mean_logits", "mean_probs", "learned"):
        return torch.full((b, k), 1.0 / k, device=z.device)
    if rule == "confidence":
        if targets is None:
            raise DistillError(
                "the confidence weighting rule needs labels but the batch has none; use entropy for "
                "unlabeled data"
            )
        y = targets.reshape(-1).long()
        ce = torch.stack([F.cross_entropy(z[i], y, reduction="none") for i in range(k)], dim=1)  # (B, K)
        return torch.softmax(-ce / tau, dim=1)
    if rule == "entropy":
        logp = F.log_softmax(z, dim=-1)
        h = -(logp.exp() * logp).sum(-1).transpose(0, 1)  # (B, K)
        return torch.softmax(-h / tau, dim=1)
    raise DistillError(f"ensemble rule '{rule}' is not one of {', '.join(RULES)}")


def combine(logits: Tensor, weights: Tensor, space: str = "logits") -> Tensor:
    """Mixes K teachers' logits with per-sample weights.

    Args:
        logits: (K, B, C).
        weights: (B, K), rows summing to 1.
        space: `logits` (weighted mean of logits) or `probs` (log of the weighted mean of the
            probabilities; a valid logit vector since softmax(log p) = p).

    Returns:
        (B, C) combined logits, float32.
    """
    z = logits.float()
    w = weights.float().transpose(0, 1).unsqueeze(-1)  # (K, B, 1)
    if space == "logits":
        return (w * z).sum(0)
    if space == "probs":
        # log Σ_k w_k p_k computed stably as logsumexp_k(log w_k + log p_k).
        return torch.logsumexp(torch.log(w.clamp_min(1e-30)) + F.log_softmax(z, dim=-1), dim=0)
    raise DistillError(f"ensemble combine space '{space}' is not one of logits, probs")


# --------------------------------------------------------------------------- the frozen side


class Ensemble:
    """A teacher made of several frozen models, possibly of different architectures.

    Called like `Teacher` (`batch -> Outputs`). The Outputs carry:
      - `logits`: the members combined by `rule` (B, C);
      - `features`: each member's tapped features under `t{i}.<path>`;
      - `extras["members"]`: all members' logits (K, B, C), for `ensemble_kd`;
      - `extras["member_weights"]`: the weights used (B, K).

    Args:
        members: `Teacher`s (or any `batch -> Outputs` callable with `to` and `add_taps`, such as a
            cached teacher), or `nn.Module`s (wrapped with `adapters[i]` or `auto_adapter`).
        rule: one of `mean_logits`, `mean_probs`, `confidence`, `entropy`, `learned` (see
            `member_weights`). `learned` combines by the mean of logits here; the learned
            per-sample weights live in the `ensemble_kd` loss term.
        tau: temperature of the confidence / entropy weights.
        space: for `confidence` / `entropy`: mix `logits` or `probs`. `mean_logits` always mixes
            logits and `mean_probs` always mixes probabilities.
        adapters: per-member adapters for modules given bare.
        dtype, compile: as in `Teacher`, for modules given bare.
        weights: a fixed weight per member (>= 0, not all 0), multiplied into the rule's
            per-sample weights and renormalised (`mean_probs` with weights is a weighted mean);
            None: equal. Not with `learned`, whose gate learns them.
    """

    def __init__(
        self,
        members: Sequence[Teacher | nn.Module],
        rule: str = "mean_logits",
        tau: float = 1.0,
        space: str = "logits",
        adapters: Sequence[Adapter] | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        weights: Sequence[float] | None = None,
    ):
        if len(members) == 0:
            raise DistillError("an Ensemble needs at least one member teacher")
        if rule not in RULES:
            raise DistillError(f"ensemble rule '{rule}' is not one of {', '.join(RULES)}")
        if space not in ("logits", "probs"):
            raise DistillError(f"ensemble space '{space}' is not one of logits, probs")
        check_positive("ensemble tau", tau)
        if adapters is not None and len(adapters) != len(members):
            raise DistillError(f"got {len(adapters)} adapters for {len(members)} ensemble members")
        self.members: list[Teacher] = []
        for i, m in enumerate(members):
            if isinstance(m, nn.Module):
                ad = adapters[i] if adapters is not None else auto_adapter
                m = Teacher(m, adapter=ad, dtype=dtype, compile=compile)
            self.members.append(m)
        self.rule, self.tau = rule, tau
        self.weights = None
        if weights is not None:
            w = [float(x) for x in weights]
            if len(w) != len(members) or any(x < 0 for x in w) or not sum(w) > 0:
                raise DistillError(
                    f"ensemble weights {w}: give one weight >= 0 per member ({len(members)}), not all 0"
                )
            if rule == "learned":
                raise DistillError("ensemble weights: the learned rule learns its weights; drop weights")
            self.weights = w
        self.space = {"mean_logits": "logits", "mean_probs": "probs"}.get(rule, space)
        if rule == "learned":
            self.space = "logits"

    def __len__(self) -> int:
        return len(self.members)

    @property
    def models(self) -> list[nn.Module]:
        return [m.model for m in self.members if isinstance(getattr(m, "model", None), nn.Module)]

    @property
    def device(self) -> torch.device:
        return getattr(self.members[0], "device", torch.device("cpu"))

    def to(self, device) -> Ensemble:
        for m in self.members:
            m.to(device)
        return self

    def add_taps(self, paths: Iterable[str]) -> None:
        """Routes `t{i}.<path>` to member i. A path without the prefix is ambiguous and refused."""
        per: dict[int, list[str]] = {}
        for p in paths:
            head, dot, rest = p.partition(".")
            i = int(head[1:]) if head[:1] == "t" and head[1:].isdigit() and dot else None
            if i is None or i >= len(self.members):
                raise DistillError(
                    f"ensemble feature path '{p}' must name its member as t<i>.<module path> with i in "
                    f"0..{len(self.members) - 1}, e.g. 't0.{p}'"
                )
            per.setdefault(i, []).append(rest)
        for i, ps in per.items():
            self.members[i].add_taps(ps)

    def member_outputs(self, batch: Batch) -> list[Outputs]:
        return [m(batch) for m in self.members]

    def __call__(self, batch: Batch) -> Outputs:
        outs = self.member_outputs(batch)
        for i, o in enumerate(outs):
            if o.logits is None:
                raise DistillError(f"ensemble member {i} produced no logits; every member needs them")
        shapes = {tuple(o.logits.shape) for o in outs}
        if len(shapes) != 1:
            raise DistillError(
                f"ensemble members disagree on the logit shape ({sorted(shapes)}): give every teacher the "
                "same number of classes"
            )
        z = torch.stack([flatten_logits(o.logits).float() for o in outs])  # (K, N, C)
        w = member_weights(z, self.rule, batch.targets, self.tau)
        if self.weights is not None:  # (B, K) * (K,), rows renormalised
            w = w * torch.tensor(self.weights, device=w.device, dtype=w.dtype)
            w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        logits = combine(z, w, self.space).reshape(outs[0].logits.shape)
        features = {f"t{i}.{k}": v for i, o in enumerate(outs) for k, v in o.features.items()}
        extras = {f"t{i}.{k}": v for i, o in enumerate(outs) for k, v in o.extras.items()}
        extras["members"] = z
        extras["member_weights"] = w
        return Outputs(logits=logits, features=features, extras=extras)


# --------------------------------------------------------------------------- the learned gate


class Gate(nn.Module):
    """Per-sample teacher weights from the teachers' own predictions: (B, K*C) -> (B, K) softmax.

    Input is every member's log-probabilities, so the gate needs no label at test time and can
    learn which member to trust on which kind of sample (e.g. where two members disagree).
    """

    def __init__(self, k: int, c: int, hidden: int = 32):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(k * c, hidden), nn.ReLU(), nn.Linear(hidden, k))
        nn.init.zeros_(self.net[-1].weight)  # start uniform: every member weighs 1/K
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, members: Tensor) -> Tensor:
        x = F.log_softmax(members.float(), dim=-1).transpose(0, 1).flatten(1)  # (B, K*C)
        return torch.softmax(self.net(x), dim=-1)


@LOSSES.register("ensemble_kd")
class EnsembleKD(LossTerm):
    """KD from an `Ensemble` whose per-sample member weights are learned with the student.

    loss = T² · KL(softmax(mix/T) ‖ softmax(s/T)) + gate_ce · CE(mix, y),
    mix = Σ_k g_k(x) z_k (or log Σ_k g_k p_k with space="probs").

    The gate sees the mixture only through the label term: in the KD term the mixture is
    detached. Otherwise the gate would be rewarded for copying whichever teacher the student
    already matches (the KD loss is smallest there), a collapse that teaches nothing. So the
    gate learns "which teacher is right on this kind of input" from labels, and the student
    learns from the gated mix. The mean entropy of the last batch's gate weights is kept in `last_entropy`.

    Args:
        temperature: T > 0.
        gate_ce: weight of the gate's label loss (> 0; the gate has no other signal).
        hidden: hidden width of the gate MLP.
        space: mix `logits` or `probs`.

    Shapes: teacher.extras["members"] (K, N, C); student logits (B, C) or (B, T, V) with N = B(·T).
    """

    def __init__(
        self, temperature: float = 4.0, gate_ce: float = 1.0, hidden: int = 32, space: str = "logits"
    ):
        super().__init__()
        check_positive("ensemble_kd.temperature", temperature)
        check_positive("ensemble_kd.gate_ce", gate_ce)
        check_range("ensemble_kd.hidden", hidden, 1, 1e6)
        if space not in ("logits", "probs"):
            raise DistillError(f"ensemble_kd.space: '{space}' is not one of logits, probs")
        self.temperature, self.gate_ce, self.hidden, self.space = temperature, gate_ce, int(hidden), space
        self.gate: Gate | None = None
        self.last_entropy = 0.0

    @staticmethod
    def _members(teacher: Outputs) -> Tensor:
        z = teacher.extras.get("members") if teacher is not None else None
        if not isinstance(z, Tensor) or z.dim() != 3:
            raise DistillError(
                "ensemble_kd needs an Ensemble teacher (teacher.extras['members'] of shape (K, N, C)); "
                "wrap the teachers in distill.teachers.ensemble.Ensemble"
            )
        return z

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        z = self._members(teacher)
        self.gate = Gate(z.shape[0], z.shape[2], self.hidden).to(z.device)

    def weights(self, teacher: Outputs) -> Tensor:
        """(N, K) gate weights for this batch."""
        if self.gate is None:
            raise DistillError("ensemble_kd was not set up: the Trainer calls setup() on a first batch")
        return self.gate(self._members(teacher))

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> Tensor:
        z = self._members(teacher).float()
        w = self.weights(teacher)
        mix = combine(z, w, self.space)  # (N, C)
        s = flatten_logits(student.require_logits("student"))
        loss = kd_loss(s, mix.detach(), self.temperature, weights=batch.weights)
        if batch.targets is None:
            raise DistillError("ensemble_kd trains its gate on labels, but the batch has none")
        loss = loss + self.gate_ce * F.cross_entropy(mix, batch.targets.reshape(-1).long(), ignore_index=-100)
        with torch.no_grad():
            self.last_entropy = float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean())
        return loss
