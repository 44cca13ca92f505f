"""Runs a recipe end to end: teacher, baseline student, distilled student, measurements, report."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.adapters import auto_adapter
from distill.checkpoint import atomic_write_text, load_weights, save_weights
from distill.data.bundle import DataBundle, build_data
from distill.engine import distributed as dist
from distill.engine.evaluate import build_evaluator, evaluate
from distill.engine.trainer import Trainer, make_loader, resolve_device, seed_everything
from distill.errors import ConfigError
from distill.losses import CrossEntropy
from distill.models.build import build_model
from distill.objective import Objective
from distill.registry import ADAPTERS, LOSSES
from distill.run.config import RecipeConfig, TrainerConfig
from distill.run.measure import count_params, latency_ms, size_mb
from distill.run.report import write_report
from distill.run.rundir import RunDir
from distill.teachers import Teacher


def build_objective(cfg: RecipeConfig) -> Objective:
    terms = {
        n: LOSSES.build(name=t.name, class_path=t.class_path, init_args=t.init_args)
        for n, t in cfg.objective.terms.items()
    }
    weights = {n: t.weight for n, t in cfg.objective.terms.items()}
    return Objective(terms, weights, cfg.objective.schedules)


def scratch_objective(cfg: RecipeConfig) -> Objective:
    """Labels alone: the recipe's terms that need no teacher (`ce` with its label smoothing, a
    detector's own losses, ...), each at weight 1; plain cross-entropy if it has none."""
    label = {
        n: t
        for n, t in cfg.objective.terms.items()
        if not LOSSES.build(name=t.name, class_path=t.class_path, init_args=t.init_args).needs_teacher
    }
    if not label:
        return Objective({"ce": CrossEntropy()})
    return Objective(
        {
            n: LOSSES.build(name=t.name, class_path=t.class_path, init_args=t.init_args)
            for n, t in label.items()
        }
    )


def build_adapter(spec) -> Any:
    """The recipe's adapter for a model (`None`: the automatic one)."""
    if spec is None:
        return auto_adapter
    return ADAPTERS.build(name=spec.name, class_path=spec.class_path, init_args=spec.init_args)


def _spec(component) -> dict | None:
    return component.spec() if component is not None else None


def example_input(data: DataBundle) -> torch.Tensor | None:
    x = data.train[0][0] if isinstance(data.train[0], tuple | list) else None
    return x.unsqueeze(0) if isinstance(x, torch.Tensor) else None


def train_stage(
    stage: str,
    model: nn.Module,
    objective: Objective,
    data: DataBundle,
    cfg: RecipeConfig,
    trainer_cfg: TrainerConfig,
    out: Path,
    teacher: Any = None,
    adapter: Any = None,
) -> nn.Module:
    final = out / "checkpoints" / stage / "final.safetensors"
    if final.exists():  # finished in an earlier, interrupted invocation
        return load_weights(model, final)
    if trainer_cfg.threads is None and cfg.trainer.threads is not None:
        # a stage with its own settings (teacher.train, a candidate's train) that leaves `threads`
        # unset takes the recipe's: one CPU-thread setting for the whole run
        trainer_cfg = trainer_cfg.model_copy(update={"threads": cfg.trainer.threads})
    sharded = trainer_cfg.parallel == "fsdp2" and dist.world_size() > 1
    blank = copy.deepcopy(model) if sharded else None  # the Trainer shards `model` in place
    trainer = Trainer(
        model,
        objective,
        data.train,
        teacher=teacher,
        val_data=data.val,
        config=trainer_cfg,
        out_dir=out,
        stage=stage,
        seed=cfg.seed,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory,
        collate_fn=data.collate_fn,
        resume=True,
        student_adapter=adapter or auto_adapter,
        evaluator=build_evaluator(_spec(cfg.evaluator)),
    )
    trainer.fit()
    weights = trainer.student_state_dict()  # gathered in full on rank 0 under FSDP2
    if dist.is_main():
        save_weights(final, weights, {"stage": stage})
    dist.barrier()  # every rank sees the same finished stages on a later --resume
    if blank is not None:
        if dist.is_main():
            blank.load_state_dict(weights)
        return blank  # a plain module, for measurement on rank 0
    return model


def measure(
    name: str,
    model: nn.Module,
    data: DataBundle,
    cfg: RecipeConfig,
    teacher: Teacher | None,
    split: str = "test",
    adapter: Any = None,
) -> dict[str, Any]:
    """One summary row: the recipe's evaluator on `split`, parameters, size and CPU latency."""
    ds = getattr(data, split) or data.val
    loader, _ = make_loader(ds, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    evaluator = build_evaluator(_spec(cfg.evaluator))
    metrics = evaluate(model, loader, evaluator, adapter or auto_adapter, teacher=teacher)
    row: dict[str, Any] = {"name": name, **metrics, "params": count_params(model), "size_mb": size_mb(model)}
    if teacher is None:
        row["agreement"] = 1.0
    example = example_input(data)
    if example is not None:
        model_cpu = copy.deepcopy(model).to("cpu")
        for b in cfg.report.latency_batch_sizes:
            lat = latency_ms(
                model_cpu, example, b, repeats=cfg.report.latency_repeats, threads=cfg.report.latency_threads
            )
            row[f"latency_ms_b{b}"] = lat["p50"]
    return row


def run_recipe(
    cfg: RecipeConfig, out: str | Path, resume: bool = False, overwrite: bool = False, command: str = "run"
) -> dict[str, Any]:
    """Trains and measures everything the recipe asks for; writes the run folder; returns the summary."""
    out = Path(out)
    t0 = time.perf_counter()
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite, reusable=reusable_teacher(cfg)):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)

        seed_everything(cfg.seed)
        teacher_model = build_model(cfg.teacher.spec(), data)
        teacher_adapter, student_adapter = (
            build_adapter(cfg.teacher.adapter),
            build_adapter(cfg.student.adapter),
        )
        preflight_recipe(cfg, data, teacher_model)  # every component and one batch, before any training
        if cfg.teacher.checkpoint:
            load_weights(teacher_model, cfg.teacher.checkpoint)
        elif cfg.teacher.train is not None:
            train_stage(
                "teacher",
                teacher_model,
                scratch_objective(cfg),
                data,
                cfg,
                cfg.teacher.train,
                out,
                adapter=teacher_adapter,
            )
        else:
            raise ConfigError("teacher: give a checkpoint to load or a train: section to train it first")
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.teacher.dtype]
        teacher = Teacher(teacher_model, adapter=teacher_adapter, dtype=dtype, compile=cfg.teacher.compile)

        kd_teacher, kd_data = teacher, data
        if cfg.teacher.cache:  # offline distillation: the teacher's outputs come from a store
            from distill.teachers.store import CachedTeacher

            kd_teacher = CachedTeacher(
                cfg.teacher.cache,
                dataset=data.train,
                teacher=teacher_model,
                fallback=teacher,
                fill=cfg.teacher.cache_fill,
            )
            kd_data = dataclasses.replace(data, train=kd_teacher.training_dataset(data.train))

        students: dict[str, nn.Module] = {}
        stages = (
            [("student_scratch", scratch_objective(cfg), None, data)] if "scratch" in cfg.baselines else []
        )
        stages.append(("student_kd", build_objective(cfg), kd_teacher, kd_data))
        for stage, objective, t, stage_data in stages:
            seed_everything(cfg.seed)  # the same initial student for every stage
            student = build_model(cfg.student.spec(), data, teacher=teacher_model)
            if cfg.student.checkpoint:
                load_weights(student, cfg.student.checkpoint)
            students[stage] = train_stage(
                stage, student, objective, stage_data, cfg, cfg.trainer, out, t, student_adapter
            )

        if not dist.is_main():  # under torchrun only rank 0 measures and writes the summary
            return {"command": command, "recipe": cfg.name, "seed": cfg.seed, "rows": []}
        teacher_row = measure("teacher", teacher.model, data, cfg, None, adapter=teacher_adapter)
        rows = [teacher_row] + [
            measure(n, m, data, cfg, teacher, adapter=student_adapter) for n, m in students.items()
        ]
        summary = {
            "command": command,
            "recipe": cfg.name,
            "seed": cfg.seed,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "rows": rows,
        }
        note_teacher_warnings(summary, data.num_classes)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_report(out)
        return summary


def teacher_warnings(rows: list[dict[str, Any]], num_classes: int | None) -> list[str]:
    """Why distilling from this teacher may be wasted: it is at chance, or not clearly better than
    the student trained from labels alone (accuracy within 0.01, perplexity within 1%)."""
    teacher = next((r for r in rows if r["name"] == "teacher"), None)
    scratch = next((r for r in rows if r["name"] == "student_scratch"), None)
    if teacher is None:
        return []
    out = []
    if "perplexity" in teacher:  # a language model: its token accuracy is not the measure
        if scratch is not None and teacher["perplexity"] > 0.99 * scratch.get("perplexity", float("inf")):
            out.append(
                f"the teacher's perplexity {teacher['perplexity']:.2f} is not clearly better than the "
                f"scratch student's {scratch['perplexity']:.2f}: there is little to distil"
            )
    elif "accuracy" in teacher:
        acc = teacher["accuracy"]
        chance = 1 / num_classes if num_classes else None
        if chance is not None and acc < chance + 0.05:
            out.append(
                f"the teacher's accuracy {acc:.4f} is at chance ({chance:.4f} for {num_classes} classes): "
                "distilling from it teaches noise; train it longer (teacher.train.epochs) or check its data"
            )
        elif scratch is not None and "accuracy" in scratch and acc < scratch["accuracy"] + 0.01:
            out.append(
                f"the teacher's accuracy {acc:.4f} is not clearly better than the scratch student's "
                f"{scratch['accuracy']:.4f}: there is little to distil; use a stronger or longer-trained teacher"
            )
    return out


def note_teacher_warnings(summary: dict[str, Any], num_classes: int | None) -> None:
    """Adds the teacher warnings to `summary["warnings"]` (report.md shows them) and to the log."""
    warnings = teacher_warnings(summary["rows"], num_classes)
    if warnings:
        summary["warnings"] = warnings
        for w in warnings:
            print(f"distill: warning: {w}", file=sys.stderr)


def aggregate(summaries: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """One summary over several seeds: each numeric metric's mean, with `<metric>_std` beside it."""
    names = [r["name"] for r in summaries[0]["rows"]]
    rows = []
    for name in names:
        per_seed = [next(r for r in s["rows"] if r["name"] == name) for s in summaries]
        row: dict[str, Any] = {"name": name}
        for k, v in per_seed[0].items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                vals = [float(r[k]) for r in per_seed if k in r]
                ints = [r[k] for r in per_seed if k in r and isinstance(r[k], int)]
                # a count that every seed agrees on (params) stays an int
                row[k] = ints[0] if len(ints) == len(vals) and len(set(ints)) == 1 else statistics.fmean(vals)
                if k not in ("params", "size_mb"):
                    row[f"{k}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return {
        "command": command,
        "recipe": summaries[0]["recipe"],
        "seeds": [s["seed"] for s in summaries],
        "wall_seconds": round(sum(s["wall_seconds"] for s in summaries), 1),
        "rows": rows,
    }


def run_seeds(
    cfg: RecipeConfig,
    out: str | Path,
    seeds: int,
    resume: bool = False,
    overwrite: bool = False,
    command: str = "run",
) -> dict[str, Any]:
    """`seeds` runs of the recipe (seed, seed+1, ...) in `out/seed<k>/`, summarised together in `out/`."""
    out = Path(out)
    if seeds == 1:
        return run_recipe(cfg, out, resume, overwrite, command)
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite, reusable=reusable_teacher(cfg)):
        summaries = []
        for k in range(seeds):
            seed_cfg = cfg.model_copy(update={"seed": cfg.seed + k})
            summaries.append(run_recipe(seed_cfg, out / f"seed{cfg.seed + k}", resume=True, command=command))
        if not dist.is_main():
            return summaries[0]
        summary = aggregate(summaries, command)
        warnings = [w for s in summaries for w in s.get("warnings", [])]
        if warnings:
            summary["warnings"] = list(dict.fromkeys(w for w in warnings))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_report(out)
        return summary


def evaluate_checkpoint(
    cfg: RecipeConfig,
    run_dir: Path | None,
    checkpoint: str | None,
    which: str = "student",
    split: str = "test",
) -> dict[str, Any]:
    """Scores a checkpoint of the recipe's student (or teacher) on a split; with a run folder,
    also its agreement with the run's teacher."""
    if checkpoint is None:
        if run_dir is None:
            raise ConfigError("give --checkpoint, or a run folder whose checkpoints to score")
        stage = "student_kd" if which == "student" else "teacher"
        checkpoint = str(run_dir / "checkpoints" / stage / "final.safetensors")
        if not Path(checkpoint).exists():
            raise ConfigError(
                f"{run_dir} has no finished {stage} ({checkpoint} is missing): finish the run with "
                "--resume, or give --checkpoint"
            )
    data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    model_cfg = cfg.student if which == "student" else cfg.teacher
    teacher_model = build_model(cfg.teacher.spec(), data) if which == "student" else None
    model = build_model(model_cfg.spec(), data, teacher=teacher_model)
    load_weights(model, checkpoint)
    adapter = build_adapter(model_cfg.adapter)
    teacher = None
    teacher_ckpt = run_dir / "checkpoints" / "teacher" / "final.safetensors" if run_dir else None
    if cfg.teacher.checkpoint:
        teacher_ckpt = Path(cfg.teacher.checkpoint)
    if which == "student" and teacher_ckpt is not None and teacher_ckpt.exists():
        teacher = Teacher(
            load_weights(teacher_model, teacher_ckpt), adapter=build_adapter(cfg.teacher.adapter)
        )
    ds = getattr(data, split)
    if ds is None:
        raise ConfigError(f"the dataset has no {split} split")
    loader, _ = make_loader(ds, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    return {
        "checkpoint": checkpoint,
        "split": split,
        **evaluate(model, loader, build_evaluator(_spec(cfg.evaluator)), adapter, teacher=teacher),
        "params": count_params(model),
    }


def preflight_recipe(
    cfg: RecipeConfig, data: DataBundle | None = None, teacher_model: nn.Module | None = None
) -> dict[str, Any]:
    """Builds every component of `cfg` and runs one batch through each stage it will train.

    Args:
        data: the built data (built here when None).
        teacher_model: the run's teacher, not yet trained or loaded. A teacher that will be trained
            is copied (the run's own model is left as it is); one loaded from a checkpoint is used
            in place (it is frozen for distillation anyway). None: built here, with its checkpoint.

    Returns:
        What was built: data sizes and shapes, models with parameters, objective terms and taps,
        and each stage's losses and evaluator metrics on the batch.
    """
    from distill.run.preflight import (
        describe_data,
        describe_model,
        describe_objective,
        first_batch,
        run_stage,
    )

    if not cfg.teacher.checkpoint and cfg.teacher.train is None:
        raise ConfigError("teacher: give a checkpoint to load or a train: section to train it first")
    if data is None:
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    device = resolve_device(cfg.trainer.device)
    batch = first_batch(data, cfg.data.batch_size, cfg.seed).to(device)
    report: dict[str, Any] = {"data": describe_data(data, batch, cfg.data.name or cfg.data.class_path)}
    evaluator_spec = cfg.evaluator.spec() if cfg.evaluator is not None else None
    build_evaluator(evaluator_spec)  # a typo in the evaluator fails here, before anything else

    teacher_adapter = build_adapter(cfg.teacher.adapter)
    student_adapter = build_adapter(cfg.student.adapter)
    if teacher_model is None:
        teacher_model = build_model(cfg.teacher.spec(), data)
        if cfg.teacher.checkpoint:
            load_weights(teacher_model, cfg.teacher.checkpoint)
    elif not cfg.teacher.checkpoint:
        teacher_model = copy.deepcopy(teacher_model)
    teacher_model.to(device)
    report["teacher"] = describe_model(cfg.teacher.spec(), teacher_model)
    report["teacher"]["source"] = (
        f"checkpoint {cfg.teacher.checkpoint}"
        if cfg.teacher.checkpoint
        else f"trained first ({cfg.teacher.train.epochs} epochs)"
    )
    stages: dict[str, Any] = {}
    if not cfg.teacher.checkpoint:
        stages["teacher"] = run_stage(
            "teacher",
            teacher_model,
            scratch_objective(cfg),
            None,
            teacher_adapter,
            batch,
            device,
            evaluator_spec,
        )
    teacher = Teacher(teacher_model, adapter=teacher_adapter)
    try:
        student = build_model(cfg.student.spec(), data, teacher=teacher_model)
        if cfg.student.checkpoint:
            load_weights(student, cfg.student.checkpoint)
        student.to(device)
        report["student"] = describe_model(cfg.student.spec(), student)
        kd = build_objective(cfg)
        report["objective"] = describe_objective(kd, {n: t.weight for n, t in cfg.objective.terms.items()})
        if "scratch" in cfg.baselines:
            stages["student_scratch"] = run_stage(
                "student_scratch",
                student,
                scratch_objective(cfg),
                None,
                student_adapter,
                batch,
                device,
                evaluator_spec,
            )
        stages["student_kd"] = run_stage(
            "student_kd", student, kd, teacher, student_adapter, batch, device, evaluator_spec
        )
    finally:
        teacher.tap.remove()  # the run's Teacher adds its own taps
    report["stages"] = stages
    return report


# Teacher settings that change only how the teacher is used for distillation, not its trained weights.
_TEACHER_USE_ONLY = ("cache", "cache_fill", "dtype", "compile")


def teacher_stage_inputs(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """What the teacher stage's weights depend on, from a recipe as data: the seed, the data, the
    teacher section and the label-only objective terms the teacher trains with (None if the terms
    do not build)."""
    label = {}
    for n, t in ((recipe.get("objective") or {}).get("terms") or {}).items():
        try:
            term = LOSSES.build(
                name=t.get("name"), class_path=t.get("class_path"), init_args=t.get("init_args") or {}
            )
        except Exception:  # noqa: BLE001 - a saved recipe that no longer builds reuses nothing
            return None
        if not term.needs_teacher:
            label[n] = {k: t.get(k) for k in ("name", "class_path", "init_args")}
    teacher = {k: v for k, v in (recipe.get("teacher") or {}).items() if k not in _TEACHER_USE_ONLY}
    return {"seed": recipe.get("seed"), "data": recipe.get("data"), "teacher": teacher, "label_terms": label}


def reusable_teacher(cfg: RecipeConfig):
    """For `RunDir(reusable=...)`: a finished teacher stage is reused on `--resume` when only later
    sections (student, objective's distillation terms, trainer, evaluator, report) changed."""
    mine = teacher_stage_inputs(cfg.model_dump(mode="json"))

    def reusable(saved: dict[str, Any]) -> list[str]:
        return ["teacher"] if mine is not None and teacher_stage_inputs(saved) == mine else []

    return reusable
