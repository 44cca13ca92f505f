"""Values that change over training: loss weights, temperatures, anything numeric on a term.

A schedule is called with the training `Progress` and returns a float. Positions (`warmup`,
`start_at`, `end_at`, `milestones`) are fractions of the whole run in [0, 1], so one recipe works
for any number of epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distill.errors import ConfigError
from distill.registry import SCHEDULES


@dataclass
class Progress:
    """Where training is: global optimizer step, total steps, epoch, and the latest metrics
    (validation metrics after each evaluation; adaptive schedules read them)."""

    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(max(self.step / max(self.total_steps, 1), 0.0), 1.0)


class Schedule:
    def __call__(self, progress: Progress) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Adaptive schedules keep state across a resume; stateless ones return {}."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027
        pass


def _check_fraction(name: str, v: float) -> None:
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"schedule {name}: {v} is not a fraction of training in [0, 1]")


@SCHEDULES.register("constant")
class Constant(Schedule):
    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, progress: Progress) -> float:
        return self.value


@SCHEDULES.register("warmup")
class Warmup(Schedule):
    """Linear from `start` to `value` over the first `warmup` fraction, then `value`."""

    def __init__(self, value: float, warmup: float = 0.1, start: float = 0.0):
        _check_fraction("warmup.warmup", warmup)
        self.value, self.warmup, self.start = float(value), warmup, float(start)

    def __call__(self, progress: Progress) -> float:
        if self.warmup <= 0:
            return self.value
        a = min(progress.fraction / self.warmup, 1.0)
        return self.start + a * (self.value - self.start)


class _Ramp(Schedule):
    def __init__(self, start: float, end: float, start_at: float = 0.0, end_at: float = 1.0):
        _check_fraction(f"{type(self).__name__.lower()}.start_at", start_at)
        _check_fraction(f"{type(self).__name__.lower()}.end_at", end_at)
        if end_at < start_at:
            raise ConfigError(
                f"schedule {type(self).__name__.lower()}: end_at {end_at} < start_at {start_at}"
            )
        self.start, self.end, self.start_at, self.end_at = float(start), float(end), start_at, end_at

    def _a(self, progress: Progress) -> float:
        span = self.end_at - self.start_at
        if span <= 0:
            return 1.0 if progress.fraction >= self.end_at else 0.0
        return min(max((progress.fraction - self.start_at) / span, 0.0), 1.0)


@SCHEDULES.register("linear")
class Linear(_Ramp):
    """Linear from `start` to `end` between the fractions `start_at` and `end_at`."""

    def __call__(self, progress: Progress) -> float:
        return self.start + self._a(progress) * (self.end - self.start)


@SCHEDULES.register("cosine")
class Cosine(_Ramp):
    """Half-cosine from `start` to `end` between `start_at` and `end_at`."""

    def __call__(self, progress: Progress) -> float:
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * self._a(progress)))


@SCHEDULES.register("step")
class Step(Schedule):
    """Piecewise constant: `values[i]` from `milestones[i-1]` on (annealing KD steps the
    temperature down this way). `len(values) == len(milestones) + 1`."""

    def __init__(self, values: list[float], milestones: list[float]):
        if len(values) != len(milestones) + 1:
            raise ConfigError(
                f"schedule step: {len(values)} values need {len(values) - 1} milestones, "
                f"got {len(milestones)}"
            )
        for m in milestones:
            _check_fraction("step.milestones", m)
        if sorted(milestones) != list(milestones):
            raise ConfigError("schedule step: milestones must increase")
        self.values, self.milestones = [float(v) for v in values], list(milestones)

    def __call__(self, progress: Progress) -> float:
        i = sum(progress.fraction >= m for m in self.milestones)
        return self.values[i]


@SCHEDULES.register("anneal")
class Anneal(Schedule):
    """Annealing: `stages` equal steps from `start` to `end` between the fractions `start_at`
    and `end_at` (e.g. a KD temperature 8 → 2 in 4 stages: 8, 6, 4, 2). For uneven steps use
    `step` with explicit milestones."""

    def __init__(self, start: float, end: float, stages: int = 4, start_at: float = 0.0, end_at: float = 1.0):
        if int(stages) < 2:
            raise ConfigError(f"schedule anneal: stages must be ≥ 2, got {stages}")
        _check_fraction("anneal.start_at", start_at)
        _check_fraction("anneal.end_at", end_at)
        if end_at <= start_at:
            raise ConfigError(f"schedule anneal: end_at {end_at} must be > start_at {start_at}")
        self.start, self.end, self.stages = float(start), float(end), int(stages)
        self.start_at, self.end_at = start_at, end_at

    def __call__(self, progress: Progress) -> float:
        a = (progress.fraction - self.start_at) / (self.end_at - self.start_at)
        i = min(max(int(a * self.stages), 0), self.stages - 1)  # which stage we are in
        return self.start + (self.end - self.start) * i / (self.stages - 1)


@SCHEDULES.register("adaptive")
class Adaptive(Schedule):
    """Progress-adaptive: a value driven by the student's latest measured metric.

    Rule: with m the metric (read from `progress.metrics[metric]`, set after each evaluation)
    rescaled from [`low`, `high`] to [0, 1] and clipped, the value is
    `start + (end − start) · m`; before the first evaluation it is `initial` (default `start`).

    The default use is the KD weight driven by the student's agreement with the teacher
    (`weights: {kd: {name: adaptive, metric: agreement, start: 1.0, end: 0.25}}`): distil
    hard while the student still disagrees with the teacher, and hand the weight over to the
    labels as it catches up. The same rule drives a temperature
    (`schedules: {kd.temperature: {name: adaptive, metric: accuracy, start: 8, end: 2}}`).
    """

    def __init__(
        self,
        start: float,
        end: float,
        metric: str = "agreement",
        low: float = 0.0,
        high: float = 1.0,
        initial: float | None = None,
    ):
        if not high > low:
            raise ConfigError(f"schedule adaptive: high {high} must be > low {low}")
        self.start, self.end, self.metric = float(start), float(end), metric
        self.low, self.high = float(low), float(high)
        self.initial = self.start if initial is None else float(initial)

    def __call__(self, progress: Progress) -> float:
        v = progress.metrics.get(self.metric)
        if v is None:
            return self.initial
        m = min(max((float(v) - self.low) / (self.high - self.low), 0.0), 1.0)
        return self.start + (self.end - self.start) * m


SCHEDULES.accept(Schedule, what="a schedule (a Schedule subclass)")


def as_schedule(value: float | int | Schedule | dict) -> Schedule:
    """A number is a constant; a dict is `{name: ..., **kwargs}` or `{class_path: ..., init_args}`."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, int | float):
        return Constant(value)
    if isinstance(value, dict):
        spec = dict(value)
        if "class_path" in spec:
            return SCHEDULES.build(
                class_path=spec.pop("class_path"), init_args=spec.pop("init_args", {}), **spec
            )
        name = spec.pop("name", None)
        if name is None:
            raise ConfigError(f"schedule {value} needs a name (one of {', '.join(SCHEDULES.names())})")
        return SCHEDULES.build(name=name, init_args=spec.pop("init_args", {}), **spec)
    raise ConfigError(f"a schedule must be a number or a mapping with 'name', got {value!r}")
