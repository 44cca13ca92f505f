"""Named, weighted loss terms whose weights and parameters may follow schedules."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from distill.errors import ConfigError, DistillError
from distill.losses.base import LossTerm
from distill.outputs import Batch, Outputs
from distill.schedules import Progress, Schedule, as_schedule


class Objective(nn.Module):
    """The training loss as a sum of named terms: `loss = Σ weight_i(t) · term_i`.

    Args:
        terms: name → `LossTerm`, e.g. `{"ce": CrossEntropy(), "kd": KD(temperature=4)}`.
        weights: name → a number or a `Schedule`; a missing name has weight 1.
        schedules: `"<term>.<attribute>"` → `Schedule` for any numeric attribute of a term,
            e.g. `{"kd.temperature": Cosine(8, 2)}`.

    `forward` returns `{"loss": total, "<name>": unweighted value, ...}` so every term is
    logged; a term whose current weight is 0 is not computed.
    """

    def __init__(
        self,
        terms: Mapping[str, LossTerm],
        weights: Mapping[str, float | Schedule | dict] | None = None,
        schedules: Mapping[str, float | Schedule | dict] | None = None,
    ):
        super().__init__()
        if not terms:
            raise ConfigError("objective has no terms: add at least one (e.g. ce or kd)")
        for name in terms:
            if "." in name or name == "loss":
                raise ConfigError(f"objective term name '{name}' may not contain '.' or be 'loss'")
        self.terms = nn.ModuleDict(dict(terms))
        weights = dict(weights or {})
        for name in weights:
            if name not in self.terms:
                raise ConfigError(
                    f"objective weight for unknown term '{name}'; terms: {', '.join(self.terms)}"
                )
        self.weights: dict[str, Schedule] = {n: as_schedule(weights.get(n, 1.0)) for n in self.terms}
        self.schedules: dict[str, Schedule] = {}
        for key, sched in dict(schedules or {}).items():
            term_name, _, attr = key.partition(".")
            if term_name not in self.terms or not attr:
                raise ConfigError(
                    f"objective schedule '{key}' must be '<term>.<attribute>' with a term "
                    f"among {', '.join(self.terms)}"
                )
            if not isinstance(getattr(self.terms[term_name], attr, None), int | float):
                raise ConfigError(
                    f"objective schedule '{key}': term '{term_name}' has no numeric attribute '{attr}'"
                )
            self.schedules[key] = as_schedule(sched)
        self.current: dict[str, float] = {}
        self.update(Progress())

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values())

    @property
    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(p for t in self.terms.values() for p in t.student_taps))

    @property
    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(p for t in self.terms.values() for p in t.teacher_taps))

    def update(self, progress: Progress) -> dict[str, float]:
        """Sets every weight and scheduled attribute for this point of training; returns them."""
        values = {f"w_{n}": s(progress) for n, s in self.weights.items()}
        for term in self.terms.values():
            # Terms that follow training themselves (DKD warm-up, CTKD's curriculum) read it here.
            hook = getattr(term, "on_progress", None)
            if hook is not None:
                hook(progress)
        for key, sched in self.schedules.items():
            term_name, _, attr = key.partition(".")
            v = sched(progress)
            setattr(self.terms[term_name], attr, v)
            values[key] = v
        self.current = values
        return values

    def setup(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> None:
        for term in self.terms.values():
            term.setup(student, teacher, batch)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: Batch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        total = None
        for name, term in self.terms.items():
            w = self.current[f"w_{name}"]
            if w == 0:
                continue
            if term.needs_teacher and teacher is None:
                raise DistillError(f"term '{name}' needs a teacher but none was given")
            value = term(student, teacher, batch)
            if value.dim() != 0:
                raise DistillError(f"term '{name}' returned shape {tuple(value.shape)}, expected a scalar")
            out[name] = value.detach()
            total = w * value if total is None else total + w * value
        if total is None:
            total = torch.zeros((), device=_device_of(student), requires_grad=True)
        out["loss"] = total
        return out

    def schedule_state(self) -> dict:
        return {k: s.state_dict() for k, s in {**self.weights, **self.schedules}.items() if s.state_dict()}

    def load_schedule_state(self, state: dict) -> None:
        for k, s in {**self.weights, **self.schedules}.items():
            if k in state:
                s.load_state_dict(state[k])


def _device_of(out: Outputs) -> torch.device:
    if out.logits is not None:
        return out.logits.device
    for v in out.features.values():
        return v.device
    return torch.device("cpu")
