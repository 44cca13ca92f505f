"""Builds every component of a recipe and runs one batch through it, before anything trains.

A typo in the student, the objective or the evaluator used to surface only after the teacher had
trained for minutes. `distill.run.pipeline.preflight_recipe` builds the data, both models (with
their adapters and checkpoints), the objectives and the evaluator, then runs, for every stage the run
will train, `run_stage` here: the Trainer's own one-batch preflight (`preflight_batch`: teacher,
student and objective without gradients) and the evaluator on that batch. `distill run` calls it
before the teacher trains; `distill check` prints what it built. These helpers serve the other
workflows' checks too (chain, compress, teachers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.data.bundle import DataBundle, build_data
from distill.engine.evaluate import build_evaluator
from distill.engine.mix import check_mixable
from distill.engine.trainer import DistillTask, build_mixer, class_count, make_loader, preflight_batch
from distill.errors import ConfigError, DistillError, missing_extra
from distill.objective import Objective
from distill.outputs import Batch, as_batch
from distill.run.measure import count_params
from distill.teachers import Teacher
from distill.teachers.store import check_store, outputs_fingerprint


def first_batch(data: DataBundle, batch_size: int, seed: int = 0) -> Batch:
    """The first training batch, in order (no shuffling)."""
    loader, _ = make_loader(data.train, batch_size, False, seed, collate_fn=data.collate_fn)
    try:
        return as_batch(next(iter(loader)))
    except StopIteration:
        raise DistillError("the training data yields no batch: is the dataset empty?") from None


def shape_of(x: Any) -> Any:
    """Shapes of the tensors in a batch part: `(64, 1, 8, 8)`, or a dict/list of them."""
    if isinstance(x, Tensor):
        return tuple(x.shape)
    if isinstance(x, dict):
        return {k: shape_of(v) for k, v in x.items()}
    if isinstance(x, list | tuple):  # a list of samples (detection): its length and the first one
        return f"{len(x)} x {shape_of(x[0])}" if x else "[]"
    return type(x).__name__


def describe_data(data: DataBundle, batch: Batch, name: str) -> dict[str, Any]:
    sizes = {s: len(getattr(data, s)) for s in ("train", "val", "test") if getattr(data, s) is not None}
    return {
        "name": name,
        "sizes": sizes,
        "num_classes": data.num_classes,
        "input_shape": data.input_shape,
        "batch_inputs": shape_of(batch.inputs),
        "batch_targets": shape_of(batch.targets),
    }


def describe_model(spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    out = {
        "spec": spec.get("name") or spec.get("class_path"),
        "class": type(model).__name__,
        "params": count_params(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    cut = getattr(getattr(model, "config", None), "distill_cut", None)  # a student cut from its teacher
    if isinstance(cut, dict):
        out["cut"] = {k: cut[k] for k in ("select", "importance", "blocks", "teacher_blocks") if k in cut}
    return out


def describe_objective(objective: Objective, weights: dict[str, Any]) -> dict[str, Any]:
    """`weights`: each term's weight as the recipe gives it (a number or a schedule)."""
    return {
        "terms": {
            n: {"class": type(t).__name__, "weight": weights.get(n, 1.0), "needs_teacher": t.needs_teacher}
            for n, t in objective.terms.items()
        },
        "student_taps": objective.student_taps,
        "teacher_taps": objective.teacher_taps,
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def run_stage(
    stage: str,
    student: nn.Module,
    objective: Objective,
    teacher: Teacher | None,
    adapter: Any,
    batch: Batch,
    device: torch.device,
    evaluator_spec: dict | None = None,
    mix: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The Trainer's preflight for one stage (and the evaluator on the same batch; with the stage's
    `trainer.mix`, the Trainer's mixer check on it); a failure becomes a one-line DistillError
    naming the stage."""
    task = None
    try:
        task = DistillTask(student, objective.to(device), teacher, adapter)
        losses, s_out, t_out = preflight_batch(task, batch, device)
        if mix is not None:
            build_mixer(mix, task, batch, class_count(s_out), seed)
        metrics: dict[str, float] = {}
        # the evaluator sees what it sees after each epoch: the student in eval mode
        evaluator = build_evaluator(evaluator_spec)
        evaluator.reset()
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                evaluator.update(
                    task.student_outputs(batch), teacher(batch) if teacher is not None else None, batch
                )
        finally:
            student.train(was_training)
        metrics = {k: float(v) for k, v in evaluator.compute().items() if isinstance(v, int | float)}
    except DistillError as e:
        raise type(e)(f"{stage} (one-batch preflight, before any training): {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - a model's or a loss's own error, made one line
        if (hint := missing_extra(e)) is not None:
            raise hint from e
        raise DistillError(
            f"{stage} (one-batch preflight, before any training): {type(e).__name__}: {_first_line(e)}"
        ) from e
    finally:
        if task is not None:
            task.tap.remove()
    return {"losses": {k: float(v) for k, v in losses.items()}, "metrics": metrics}


# --------------------------------------------------------------------------- refusals before training


def check_teacher_config(tc: Any, who: str, data: DataBundle) -> None:
    """The refusals one teacher section decides: which weights `use` picks, calibration without a
    validation split. `validate_recipe` makes them before training; `load_teacher` again for its
    other callers (`distill cache-teacher`)."""
    if tc.checkpoint and tc.use != "last":
        raise ConfigError(
            f"{who}.use: {tc.use} picks among the weights of a teacher trained here; a teacher "
            "checkpoint: is used as given (point checkpoint: at the file you want)"
        )
    if not tc.checkpoint and tc.train is not None and isinstance(tc.use, int) and tc.use > tc.train.epochs:
        raise ConfigError(
            f"{who}.use: epoch {tc.use} is past the teacher's {tc.train.epochs} training epochs"
        )
    if tc.calibrate and data.val is None:
        raise ConfigError(
            f"{who}.calibrate fits a temperature on the validation split, but the data has none"
        )


def input_shape(bundle: DataBundle) -> tuple[int, ...] | None:
    """The shape of one input sample: the bundle's `input_shape`, else its first training input's."""
    if bundle.input_shape is not None:
        return tuple(bundle.input_shape)
    first = bundle.train[0] if bundle.train is not None and len(bundle.train) else None
    x = first[0] if isinstance(first, tuple | list) else None
    return tuple(x.shape) if isinstance(x, Tensor) else None


def build_transfer(cfg: Any) -> DataBundle:
    """The recipe's `data.transfer` set."""
    spec = cfg.data.transfer
    return build_data(spec.name, spec.class_path, spec.init_args, seed=cfg.seed)


MIX_STORE = (
    "a store of the teacher's outputs at unmixed inputs cannot give its view of a mixed input; write "
    "K fixed mixed views of each input with `distill cache-teacher RECIPE --mix-views K` (epoch e "
    "trains on view e mod K), or set trainer.mix.name: none"
)


def validate_recipe(cfg: Any, data: DataBundle, batch: Batch, objective: Objective) -> None:
    """Every refusal that a `distill run` recipe, its data and its first batch decide, made before
    anything trains. `distill check` and `distill run` both call it (through `preflight_recipe`),
    so a recipe that check passes is not refused by run after its teacher has trained.

    Refused: a teacher section that cannot hold (`check_teacher_config`); mixing (`trainer.mix`,
    or a teacher's `train.mix`) of token inputs or per-token labels; a teacher store
    (`teacher.cache`) that does not match the training data or the recipe's teacher adapter and
    calibration, or a plain one (no mixed views) with mixing; a transfer set of another input shape, or
    label terms that skip different values. What needs a stage's models (a mixed batch through the
    student and the objective) is checked in that stage's `run_stage` with the Trainer's own
    `build_mixer`; `objective` is the distillation objective (its label terms' `ignore_index`).
    """
    teachers = cfg.teachers or [cfg.teacher]
    for i, tc in enumerate(teachers):
        check_teacher_config(tc, f"teachers[{i}]" if cfg.teachers else "teacher", data)
    mixes = [cfg.trainer.mix] + [
        tc.train.mix for tc in teachers if tc.train is not None and not tc.checkpoint
    ]
    for mix in mixes:
        if mix.name != "none" and mix.prob > 0:
            check_mixable(batch.inputs, mix.name, batch.targets)
    mixing = cfg.trainer.mix.name != "none" and cfg.trainer.mix.prob > 0
    from distill.run.cross import is_cross

    if cfg.teacher.cache and not cfg.teachers and not is_cross(cfg):  # (a cross store: distill.run.cross)
        spec = cfg.teacher.adapter.spec() if cfg.teacher.adapter is not None else None
        outputs = outputs_fingerprint(spec, calibrated=cfg.teacher.calibrate)
        if not mixing and cfg.data.transfer is None:
            check_store(cfg.teacher.cache, data.train, outputs=outputs)
        else:  # its rows (transfer inputs, mixed views) are checked when the run opens it, before training
            try:
                manifest = check_store(cfg.teacher.cache, outputs=outputs)
            except DistillError as e:
                if not mixing:
                    raise
                raise ConfigError(f"trainer.mix with teacher.cache: {e} (with --mix-views K)") from None
            samples = len(data.train) + (len(build_transfer(cfg).train) if cfg.data.transfer else 0)
            if mixing and manifest["rows"] <= samples:  # one row per sample: outputs at unmixed inputs
                raise ConfigError(f"trainer.mix with teacher.cache {cfg.teacher.cache}: {MIX_STORE}")
    if cfg.data.transfer is not None:
        transfer = build_transfer(cfg)
        got, want = input_shape(transfer), input_shape(data)
        if got is not None and want is not None and got != want:
            raise ConfigError(
                f"data.transfer: its inputs have shape {got} but the training data's have {want}; "
                "give a transfer set of the same input shape"
            )
        ignores = {t.ignore_index for t in objective.terms.values() if hasattr(t, "ignore_index")}
        if len(ignores) > 1:
            raise ConfigError(
                f"data.transfer: the label terms skip different values ({sorted(ignores)}); use one"
            )


def _components(cfg) -> list[tuple[str, Any, Any]]:
    """(key, component, registry) for every `name | class_path` + `init_args` section of a recipe."""
    from distill.registry import ADAPTERS, DATASETS, EVALUATORS, LOSSES, MODELS

    found = [("data", cfg.data, DATASETS)]
    if cfg.data.transfer is not None:
        found.append(("data.transfer", cfg.data.transfer, DATASETS))
    models = [("teacher", cfg.teacher)] if not cfg.teachers else []
    models += [(f"teachers.{i}", t) for i, t in enumerate(cfg.teachers)] + [("student", cfg.student)]
    for key, model in models:
        found.append((key, model, MODELS))
        if model.adapter is not None:
            found.append((f"{key}.adapter", model.adapter, ADAPTERS))
    found += [(f"objective.terms.{n}", t, LOSSES) for n, t in cfg.objective.terms.items()]
    if cfg.evaluator is not None:
        found.append(("evaluator", cfg.evaluator, EVALUATORS))
    return found


def check_init_args(cfg) -> None:
    """Every `init_args` key of the recipe is an argument of what its section builds, checked
    against the builder's signature before anything is built: `kd: {init_args: {temprature: 2}}`
    fails at once with "did you mean", not after the teacher has trained. Builders taking
    `**kwargs` accept anything and are not checked; one that cannot be resolved is left to the
    build, which says why."""
    import difflib
    import inspect

    for key, comp, registry in _components(cfg):
        if not comp.init_args:
            continue
        try:
            target = registry.resolve(comp.class_path) if comp.class_path else registry.get(comp.name)
            params = inspect.signature(target).parameters.values()
        except Exception:  # noqa: BLE001 - unknown names, missing extras, C builders: the build reports them
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue
        known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for arg in comp.init_args:
            if arg not in known:
                near = difflib.get_close_matches(arg, known, n=1, cutoff=0.5)
                hint = f" (did you mean '{key}.init_args.{near[0]}'?)" if near else ""
                label = comp.class_path or f"{comp.name} ({getattr(target, '__name__', target)})"
                raise ConfigError(
                    f"unknown key '{key}.init_args.{arg}'{hint}; {label} takes: {', '.join(known) or 'nothing'}"
                )
