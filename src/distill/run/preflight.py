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

from distill.data.bundle import DataBundle
from distill.engine.evaluate import build_evaluator
from distill.engine.trainer import DistillTask, make_loader, preflight_batch
from distill.errors import DistillError
from distill.objective import Objective
from distill.outputs import Batch, as_batch
from distill.run.measure import count_params
from distill.teachers import Teacher


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
) -> dict[str, Any]:
    """The Trainer's preflight for one stage (and the evaluator on the same batch); a failure
    becomes a one-line DistillError naming the stage."""
    task = None
    try:
        task = DistillTask(student, objective.to(device), teacher, adapter)
        losses, s_out, t_out = preflight_batch(task, batch, device)
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
        raise DistillError(
            f"{stage} (one-batch preflight, before any training): {type(e).__name__}: {_first_line(e)}"
        ) from e
    finally:
        if task is not None:
            task.tap.remove()
    return {"losses": {k: float(v) for k, v in losses.items()}, "metrics": metrics}
