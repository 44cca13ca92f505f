"""Typed recipe configuration. YAML is only its saved form; every key is validated here.

A recipe names components by a registered short name (`name: kd`) or by import path
(`class_path: my_pkg.MyStudent`), each with `init_args`. Errors name the key, the bad value and
what is allowed, in one line.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from distill.engine.config import OptimizerConfig, Strict, TrainerConfig
from distill.errors import ConfigError
from distill.registry import add_import_dir, import_dirs


class Component(Strict):
    """`name` (registered short name) or `class_path` (package.module.Name), plus `init_args`."""

    name: str | None = None
    class_path: str | None = None
    init_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.name is None) == (self.class_path is None):
            raise ValueError("give exactly one of 'name' or 'class_path'")
        return self

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "class_path": self.class_path, "init_args": dict(self.init_args)}


class PseudoLabelConfig(Strict):
    """A detection transfer set's targets: the teacher's boxes (`distill.teachers.pseudo_labels.pseudo_label`)."""

    score_threshold: float = Field(
        0.5, ge=0, le=1, description="keep the teacher's boxes scoring at least this"
    )
    iou: float = Field(0.5, gt=0, le=1, description="class-agnostic NMS threshold, once per image")
    store: str | None = Field(
        None,
        description="the file the boxes are written to once (default: pseudo_labels.safetensors in the run "
        "folder); reused while the teacher, the images and these settings match",
    )


class DataConfig(Component):
    """The dataset (default: the bundled digits) and how it is batched."""

    name: str | None = None
    init_args: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    transfer: Component | None = Field(
        None,
        description="a transfer set (any dataset, same builders): its training inputs, labels ignored, "
        "are added to the distilled student's data and teach through the teacher terms only",
    )
    pseudo_labels: PseudoLabelConfig = Field(
        default_factory=PseudoLabelConfig,
        description="a transfer set of detection images takes the teacher's boxes as its targets",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_digits(cls, data):
        if isinstance(data, dict) and data.get("name") is None and data.get("class_path") is None:
            data = {**data, "name": "digits"}
        return data


class ModelConfig(Component):
    """A model: a registered `name` or a `class_path`, `init_args`, optional weights to load, and
    the adapter that calls it on a batch (default `auto`: `model(x)` or `model(**batch)`).
    A builder that takes a `teacher` argument (layer-subset students) receives the built teacher."""

    checkpoint: str | None = None
    adapter: Component | None = None


class TeacherConfig(ModelConfig):
    """The teacher: loaded from `checkpoint`, or trained first with `train` when none is given."""

    train: TrainerConfig | None = None
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    cache: str | None = Field(
        None, description="a store written by `distill cache-teacher`: distil from it, not the live teacher"
    )
    cache_fill: Literal["tail", "min", "renorm", "bucket"] = "tail"
    served: dict[str, Any] | None = Field(
        None,
        description="a teacher you can only query: {file: responses.jsonl} of top-k log-probabilities "
        "(OpenAI format), or with endpoint/model to fetch them once (distill.run.served.ServedConfig); "
        "no name or class_path then",
    )
    cross_k: int = Field(
        32,
        gt=0,
        description="with a student of another tokenizer (aligned_kd / uld terms): teacher probabilities "
        "kept per token, live and in its store (the rest is one tail bucket)",
    )
    cross_map: Literal["exact", "prefix"] = Field(
        "exact",
        description="with a student of another tokenizer: where aligned_kd carries a teacher token's "
        "probability - the student token of the same bytes (exact), or also the first student token of "
        "its spelling when the student has no token of those bytes (prefix)",
    )
    use: Literal["last", "best"] | int = Field(
        "last",
        description="which weights of a trained teacher teach: last, best (validation) or an epoch number",
    )
    calibrate: bool = Field(
        False, description="divide the teacher's logits by the temperature fitted on the validation split"
    )
    seeds: Literal["each", "first"] = Field(
        "each",
        description="under --seeds N: train the teacher for each seed, or once with the first seed and "
        "distil every seed from it (the teacher's weights fixed, only the students' seeds vary)",
    )

    @model_validator(mode="after")
    def _one_of(self):  # (Component's rule, except that a served teacher names no model)
        if self.served is not None:  # (its keys: distill.run.served.ServedConfig, in resolve_cross)
            if self.name is not None or self.class_path is not None or self.checkpoint or self.train:
                raise ValueError(
                    "served: a served teacher is its responses; drop name/class_path/checkpoint/train"
                )
            return self
        if (self.name is None) == (self.class_path is None):
            raise ValueError("give exactly one of 'name' or 'class_path'")
        return self

    @field_validator("use")
    @classmethod
    def _epoch(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"an epoch number is at least 1 (got {v})")
        return v


class EnsembleConfig(Strict):
    """How `teachers:` are combined per sample (see `distill.teachers.ensemble.member_weights`)."""

    rule: Literal["mean_logits", "mean_probs", "confidence", "entropy"] = "mean_logits"
    tau: float = Field(1.0, gt=0)
    space: Literal["logits", "probs"] = "logits"
    weights: list[float] | None = Field(
        None,
        description="a fixed weight per teacher (>= 0, in teachers: order), multiplied into the rule's "
        "per-sample weights and renormalised; default equal",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, w):
        if w is not None and (any(x < 0 for x in w) or not sum(w) > 0):
            raise ValueError(f"weights {w}: give one weight >= 0 per teacher, not all 0")
        return w


class TermConfig(Component):
    weight: float | dict[str, Any] = 1.0


class ObjectiveConfig(Strict):
    terms: dict[str, TermConfig]
    schedules: dict[str, float | dict[str, Any]] = Field(default_factory=dict)


class ReportConfig(Strict):
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    latency_threads: int = Field(1, gt=0)
    latency_repeats: int = Field(50, gt=0)


class OnPolicyConfig(Strict):
    """On-policy distillation (GKD): for a fraction `lam` of the distilled student's training
    batches, the current student answers the batch's prompts and the teacher scores those answers
    through the objective's token terms (`distill.nlp.generation.OnPolicyHook`). 0: off."""

    lam: float = Field(0.0, ge=0, le=1, description="share of batches the student generates")
    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = True
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)


def _digits_teacher() -> TeacherConfig:
    return TeacherConfig(
        name="cnn",
        init_args={"channels": [32, 64, 128], "dropout": 0.1},
        train=TrainerConfig(epochs=30, optimizer=OptimizerConfig(lr=3e-3), threads=1),
    )


def _digits_student() -> ModelConfig:
    return ModelConfig(name="mlp", init_args={"hidden": [128]})


def _digits_objective() -> ObjectiveConfig:
    return ObjectiveConfig(
        terms={
            "ce": TermConfig(name="ce", weight=0.5),
            "kd": TermConfig(name="kd", weight=0.5, init_args={"temperature": 4.0}),
        }
    )


def run_name(v: str) -> str:
    """A recipe's `name` (it becomes the folder runs/<name>): a separator or '..' would write
    outside runs/, so they are refused."""
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v or os.sep in v:
        raise ValueError(
            f"{v!r} is not a name: a recipe name has no path separator and is not '.' or '..' "
            "(it becomes the folder runs/<name>; choose the folder with --out)"
        )
    return v


class RecipeConfig(Strict):
    """A whole run. The defaults are the demo: digits, a CNN teacher, an MLP student, Hinton KD."""

    name: str = "digits"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=_digits_teacher)
    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="several teachers distilled as one ensemble (instead of teacher:)"
    )
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    student: ModelConfig = Field(default_factory=_digits_student)
    objective: ObjectiveConfig = Field(default_factory=_digits_objective)
    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig(epochs=30, threads=1))
    evaluator: Component | None = Field(None, description="default: classification accuracy")
    baselines: list[Literal["scratch", "scratch_unmixed"]] = Field(
        default_factory=lambda: ["scratch"],
        description="extra students trained for comparison: scratch (labels only, the same trainer "
        "settings, mixing included) and scratch_unmixed (labels only, without trainer.mix)",
    )
    report: ReportConfig = Field(default_factory=ReportConfig)
    on_policy: OnPolicyConfig = Field(
        default_factory=OnPolicyConfig, description="GKD: the student generates a share of the batches"
    )
    # paths made absolute by `parse_recipe`, as the recipe wrote them (dotted key -> text)
    _written_paths: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _a_name(cls, v: str) -> str:
        return run_name(v)

    @model_validator(mode="after")
    def _on_policy_needs_a_live_teacher(self):
        if self.on_policy.lam > 0 and self.teacher.cache:
            raise ValueError(
                "on_policy with teacher.cache: the store holds the teacher's outputs on its own answers, "
                "not on the student's; drop teacher.cache (the teacher must score new answers online)"
            )
        return self

    @model_validator(mode="after")
    def _one_teacher_section(self):
        if self.teachers and "teacher" in self.model_fields_set:
            raise ValueError("give teacher: (one) or teachers: (an ensemble), not both")
        if len(self.teachers) == 1:
            raise ValueError("teachers: lists at least two; for one teacher use teacher:")
        if any(t.cache for t in self.teachers):
            raise ValueError("teachers[].cache: a teacher store serves one teacher; use teacher: with it")
        w = self.ensemble.weights
        if w is not None and len(w) != len(self.teachers):
            raise ValueError(
                f"ensemble.weights: {len(w)} weights for {len(self.teachers)} teachers; give one per teacher"
            )
        return self

    def to_yaml(self) -> str:
        """The config as YAML; paths that the recipe gave relative to where it ran are saved absolute
        (so `distill eval RUN` works from anywhere) and, in comments, as written."""
        exclude = {"teacher"} if self.teachers else None  # so the saved config reloads as is
        text = yaml.safe_dump(self.model_dump(mode="json", exclude=exclude), sort_keys=False)
        notes = "".join(f"# {k}: written as {v!r} in the recipe\n" for k, v in self._written_paths.items())
        if notes:
            notes = f"# paths are absolute; relative ones were taken from {Path.cwd()}\n" + notes
        return notes + text


# --------------------------------------------------------------------------- loading and errors


IMPORT_HEADER = "# class_path modules beside the recipe: "


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping with the safe loader (tags that would build objects are refused).

    The file's folder becomes importable by `class_path` (`mydata.wine` with `mydata.py` beside the
    recipe), and so do the folders a run folder's config.yaml names in its first line (written by
    `RunDir`), so `distill eval RUN` finds the same files as the run did. Every command loads its
    recipe here, so this is the one place that does it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): a recipe is a "
            "YAML text file (see recipes/digits.yaml)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of keys (name:, data:, teacher:, ...), not a {type(data).__name__}"
        )
    if not data:  # an empty file must not silently run the 90-epoch demo
        raise ConfigError(
            f"{path} is empty: a recipe names at least its teacher: and student: (copy recipes/digits.yaml "
            "to start, or run `distill demo` for the defaults)"
        )
    add_import_dir(path.parent)
    first = text.split("\n", 1)[0]
    if first.startswith(IMPORT_HEADER):
        for folder in first[len(IMPORT_HEADER) :].split(os.pathsep):
            if folder.strip() and Path(folder.strip()).is_dir():
                add_import_dir(folder.strip())
    return data


def require_sections(
    data: dict[str, Any], source: str, sections: tuple[str, ...] = ("teacher|teachers", "student")
) -> None:
    """A recipe file must name the models it distils: a near-empty one (only `name:`, say) would
    otherwise run the demo's digits defaults without a word. `a|b` accepts either key."""
    missing = [k.split("|") for k in sections if not any(a in data for a in k.split("|"))]
    if missing:
        said = " or ".join(
            f"{a[0]}:" + (f" (or {', '.join(x + ':' for x in a[1:])})" if a[1:] else "") for a in missing
        )
        raise ConfigError(
            f"{source} does not say {said} (missing: {', '.join(a[0] for a in missing)}); "
            "a recipe names its teacher: and student: (see recipes/digits.yaml)"
        )


def import_header() -> str:
    """The first line of a run folder's config.yaml: the folders whose Python files the recipe's
    `class_path`s may name (only those holding a module), or "" when there are none."""
    folders = [d for d in import_dirs() if any(Path(d).glob("*.py")) or any(Path(d).glob("*/__init__.py"))]
    return f"{IMPORT_HEADER}{os.pathsep.join(folders)}\n" if folders else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's own words with the line and column (1-based) where it stopped, and where the
    construct it was reading began."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).split("\n", 1)[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = f"{problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        what += f" ({context} that began at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        what += f" ({context})"
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in str(problem):
        what += "; tags that build Python objects are refused"
    return f"{where}{what}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides (values parsed as YAML: numbers, lists, null...)."""
    data = _deepcopy(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override '{key}': '{p}' is not a mapping")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> RecipeConfig:
    """Validates a recipe mapping; the first problem becomes a one-line ConfigError. Relative
    paths of files and folders that exist (data paths, checkpoints, stores) become absolute, so
    the run folder's config.yaml replays from any directory (`absolute_paths`)."""
    data, written = absolute_paths(data)
    try:
        cfg = RecipeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e, RecipeConfig)}") from None
    cfg._written_paths = written
    return cfg


_PATH_ARGS = ("path", "root", "directory", "folder")
_PATH_SUFFIXES = ("_path", "_root", "_dir", "_file", "_folder")


def absolute_paths(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """`data` with the relative paths of files and folders that exist (under the current directory)
    made absolute, and those paths as written (dotted key -> text). Read: every path-like argument
    of the data section (`path`, `root`, `*_path`, `*_dir`, ..., nested specs too) and the models'
    `checkpoint` and the teacher's `cache`. A path that does not exist (a hub id, a folder a
    builder creates) is left as written."""
    data = _deepcopy(data)
    written: dict[str, str] = {}

    def fix(node: dict[str, Any], key: str, dotted: str) -> None:
        v = node.get(key)
        if isinstance(v, str) and v and not os.path.isabs(v) and "://" not in v and Path(v).exists():
            node[key] = str(Path(v).resolve())
            written[dotted] = v

    def walk(node: Any, dotted: str) -> None:
        if isinstance(node, dict):
            for k in list(node):
                if isinstance(k, str) and (k in _PATH_ARGS or k.endswith(_PATH_SUFFIXES)):
                    fix(node, k, f"{dotted}.{k}")
                walk(node[k], f"{dotted}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{dotted}.{i}")

    if isinstance(data.get("data"), dict):
        walk(data["data"], "data")
    models = [("teacher", data.get("teacher")), ("student", data.get("student"))]
    models += [(f"teachers.{i}", t) for i, t in enumerate(data.get("teachers") or [])]
    for name, m in models:
        if isinstance(m, dict):
            for k in ("checkpoint", "cache"):
                fix(m, k, f"{name}.{k}")
    return data, written


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    data = apply_overrides(load_yaml(path), overrides or [])
    return parse_recipe(data, source=str(path))


def format_validation_error(e: ValidationError, root: type[BaseModel]) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        near = _suggest(root, loc)
        hint = f" (did you mean '{near}'?)" if near else ""
        more = f" [{len(e.errors()) - 1} more problem(s)]" if len(e.errors()) > 1 else ""
        return f"unknown key '{key}'{hint}{more}"
    msg = err["msg"]
    if err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"{err.get('input')!r} is not one of {expected}"
    elif "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    more = f" [{len(e.errors()) - 1} more problem(s)]" if len(e.errors()) > 1 else ""
    return f"{key}: {msg}{more}"


def _suggest(root: type[BaseModel], loc: list[str]) -> str | None:
    """The nearest valid key for an unknown one, following the model tree along `loc`."""
    node: Any = root
    for part in loc[:-1]:
        if _is_model(node):
            field = node.model_fields.get(part)
            if field is None:
                return None
            node = _unwrap(field.annotation)
        elif typing.get_origin(node) is dict:  # a mapping of models (objective.terms.<name>)
            node = _unwrap(typing.get_args(node)[1])
        else:
            return None
    if not _is_model(node):
        return None
    near = difflib.get_close_matches(loc[-1], list(node.model_fields), n=1, cutoff=0.5)
    return ".".join(loc[:-1] + near[:1]) if near else None


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and typing.get_origin(t) is None and issubclass(t, BaseModel)


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; a model or a dict type is returned as is."""
    if _is_model(annotation) or typing.get_origin(annotation) is dict:
        return annotation
    for arg in typing.get_args(annotation):
        inner = _unwrap(arg)
        if inner is not None:
            return inner
    return None
