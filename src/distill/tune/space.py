"""The search space: dotted recipe keys checked against the recipe, and sampled per trial."""

from __future__ import annotations

import difflib
import json
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from distill.errors import ConfigError
from distill.run.config import RecipeConfig, Strict, format_validation_error


class SearchParam(Strict):
    """How one recipe key is sampled.

    `float`/`int`: uniform in [low, high] (log-uniform with `log: true`; on a grid with `step`).
    `categorical`: one of `choices`; choices may be lists or mappings (e.g. a whole
    `objective.terms` block), shown in tables by `labels` when given.
    """

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    labels: list[str] | None = None


class SearchSpace(Protocol):
    """What this module reads of a tune recipe (`distill.tune.config.TuneRecipe` is one): the space
    and the recipe it varies. A protocol, so that config imports space and never the reverse."""

    search: dict[str, SearchParam]

    def base_data(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- the search space

# Teacher keys a trial may vary: the teacher is trained once (every epoch kept) and shared.
TEACHER_KEYS = ("teacher.use", "teacher.calibrate")

_MISSING = object()
# Free-form mappings: any key below them is accepted (a loss's or model's own keyword arguments).
_FREE = ("init_args", "schedules")


def _get(data: Any, parts: list[str]) -> Any:
    """The value at a dotted key; a number indexes a list (`ensemble.weights.0`)."""
    for p in parts:
        if isinstance(data, list) and p.isdigit() and int(p) < len(data):
            data = data[int(p)]
        elif isinstance(data, dict) and p in data:
            data = data[p]
        else:
            return _MISSING
    return data


def _set(data: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        data = data[int(p)] if isinstance(data, list) else data.setdefault(p, {})
    if isinstance(data, list):
        data[int(parts[-1])] = value
    else:
        data[parts[-1]] = value


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    keys = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        keys.append(key)
        keys.extend(_dotted_keys(v, key))
    return keys


def _key_exists(base: dict[str, Any], key: str) -> bool:
    parts = key.split(".")
    if _get(base, parts) is not _MISSING:
        return True
    # under a free-form mapping, a new key is fine as long as the mapping itself exists
    return any(p in _FREE and _get(base, parts[: i + 1]) is not _MISSING for i, p in enumerate(parts[:-1]))


def _structural_keys(cfg: SearchSpace) -> set[str]:
    """Keys that a categorical choice of a mapping (e.g. `objective.terms`) may create."""
    keys: set[str] = set()
    for key, p in cfg.search.items():
        if p.type == "categorical":
            for c in p.choices or []:
                keys.update(f"{key}.{k}" for k in _dotted_keys(c))
    return keys


def validate_search(cfg: SearchSpace, source: str = "recipe") -> None:
    """Checks the search space before any trial: every key exists in the recipe, every range is
    non-empty, and the recipe still validates at each end of each range and with each choice."""
    where = f"{source}: search"
    if not cfg.search:
        raise ConfigError(f"{where}: is empty; declare at least one key to tune, e.g. trainer.optimizer.lr")
    base = cfg.base_data()
    structural = _structural_keys(cfg)
    for key, p in cfg.search.items():
        name = f"{where}.{key}"
        if key.split(".")[0] == "teacher" and key not in TEACHER_KEYS:
            raise ConfigError(
                f"{name}: the teacher is trained once and shared by all trials; tune student-side keys "
                f"or {' / '.join(TEACHER_KEYS)} (which of its checkpoints teaches, calibrated or not)"
            )
        if key.split(".")[0] == "teachers":
            raise ConfigError(
                f"{name}: the teachers are trained once and shared by all trials; tune how they are "
                "combined (ensemble.rule, ensemble.tau, ensemble.weights.<i>) or student-side keys"
            )
        if key in ("seed", "name"):
            raise ConfigError(f"{name}: '{key}' is not a hyperparameter; remove it from search")
        if not _key_exists(base, key) and key not in structural:
            near = difflib.get_close_matches(key, _dotted_keys(base), n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{name}: unknown recipe key{hint}")
        if p.type == "categorical":
            if not p.choices:
                raise ConfigError(f"{name}: categorical needs a non-empty 'choices' list")
            if p.low is not None or p.high is not None or p.log or p.step is not None:
                raise ConfigError(f"{name}: categorical takes 'choices', not low/high/log/step")
            if p.labels is not None and len(p.labels) != len(p.choices):
                raise ConfigError(
                    f"{name}: {len(p.labels)} labels for {len(p.choices)} choices; give one label per choice"
                )
            probes = list(p.choices)
        else:
            if p.choices is not None:
                raise ConfigError(f"{name}: a {p.type} range takes low/high, not choices")
            if p.low is None or p.high is None:
                raise ConfigError(f"{name}: a {p.type} range needs both 'low' and 'high'")
            if p.low >= p.high:
                raise ConfigError(f"{name}: empty range (low {p.low:g} >= high {p.high:g}); give low < high")
            if p.log and p.low <= 0:
                raise ConfigError(f"{name}: log scale needs low > 0 (got {p.low:g})")
            if p.log and p.step is not None:
                raise ConfigError(f"{name}: give either log: true or a step, not both")
            if p.step is not None and p.step <= 0:
                raise ConfigError(f"{name}: step must be > 0 (got {p.step:g})")
            if p.type == "int":
                for k in ("low", "high", "step"):
                    v = getattr(p, k)
                    if v is not None and v != int(v):
                        raise ConfigError(f"{name}: an int range needs whole numbers ({k}={v:g})")
                probes = [int(p.low), int(p.high)]
            else:
                probes = [float(p.low), float(p.high)]
        if key in structural or _get(base, key.split(".")) is _MISSING:
            continue  # created by another choice, or a free init_arg: checked when built
        for value in probes:
            data = json.loads(json.dumps(base))
            _set(data, key.split("."), value)
            try:
                RecipeConfig.model_validate(data)
            except ValidationError as e:
                msg = format_validation_error(e, RecipeConfig)
                raise ConfigError(f"{name}: the value {value!r} does not fit the recipe: {msg}") from None


def _label(p: SearchParam, i: int) -> str:
    if p.labels:
        return p.labels[i]
    c = p.choices[i]
    return c if isinstance(c, str) else json.dumps(c, separators=(",", ":"))


def _primitive(p: SearchParam) -> bool:
    return all(c is None or isinstance(c, bool | int | float | str) for c in p.choices or [])


def suggest(trial: Any, cfg: SearchSpace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Samples the space for `trial` (define-by-run): returns the trial's recipe data and the
    sampled values by key. Keys whose parent a structural choice removed are not sampled."""
    data = cfg.base_data()
    values: dict[str, Any] = {}
    # shorter keys first, so that `objective.terms` is chosen before `objective.terms.kd.weight`
    for key in sorted(cfg.search, key=lambda k: k.count(".")):
        p = cfg.search[key]
        parts = key.split(".")
        parent = _get(data, parts[:-1]) if len(parts) > 1 else data
        if parent is _MISSING or not isinstance(parent, dict | list):
            continue
        if p.type == "float":
            v: Any = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            v = trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif _primitive(p):
            v = trial.suggest_categorical(key, p.choices)
        else:
            labels = [_label(p, i) for i in range(len(p.choices))]
            chosen = trial.suggest_categorical(key, labels)
            v = json.loads(json.dumps(p.choices[labels.index(chosen)]))
        _set(data, parts, v)
        values[key] = v
    return data, values
