"""Runs a recipe end to end: teacher, baseline student, distilled student, measurements, report."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
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
from distill.engine.trainer import Trainer, make_loader, seed_everything
from distill.errors import ConfigError
from distill.losses import CrossEntropy
from distill.models.build import build_model
from distill.objective import Objective
from distill.registry import ADAPTERS, LOSSES
from distill.run.config import RecipeConfig, TrainerConfig
from distill.run.hf import export_student_hf, resolve_recipe, text_speed
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
    elif data.collate_fn is not None:  # token batches (text): latency and tokens/s or sentences/s
        row.update(
            text_speed(
                model,
                data,
                adapter,
                cfg.report.latency_batch_sizes,
                cfg.report.latency_repeats,
                cfg.report.latency_threads,
            )
        )
    return row


def run_recipe(
    cfg: RecipeConfig, out: str | Path, resume: bool = False, overwrite: bool = False, command: str = "run"
) -> dict[str, Any]:
    """Trains and measures everything the recipe asks for; writes the run folder; returns the summary."""
    out = Path(out)
    t0 = time.perf_counter()
    cfg = resolve_recipe(cfg)  # defaults an hf teacher implies (tokenizer, task, evaluator)
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)

        seed_everything(cfg.seed)
        teacher_model = build_model(cfg.teacher.spec(), data)
        teacher_adapter, student_adapter = (
            build_adapter(cfg.teacher.adapter),
            build_adapter(cfg.student.adapter),
        )
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
        elif not getattr(teacher_model, "distill_pretrained", False):  # (an hf folder loads its own weights)
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
        if "truncated" in data.meta:  # text longer than max_length, cut (text data builders count them)
            summary["texts_truncated"] = data.meta["truncated"]
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if "student_kd" in students:  # Hugging Face students also as a model folder
            export_student_hf(out, students["student_kd"], data, summary, cfg)
        if cfg.teacher.train is not None and not cfg.teacher.checkpoint:  # a teacher trained here, too
            export_student_hf(out, teacher_model, data, summary, cfg, name="teacher_hf")
        write_report(out)
        return summary


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
                row[k] = statistics.fmean(vals)
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
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite):
        summaries = []
        for k in range(seeds):
            seed_cfg = cfg.model_copy(update={"seed": cfg.seed + k})
            summaries.append(run_recipe(seed_cfg, out / f"seed{cfg.seed + k}", resume=True, command=command))
        if not dist.is_main():
            return summaries[0]
        summary = aggregate(summaries, command)
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
    """Scores a checkpoint of the recipe's student (or teacher) on a split with the recipe's
    evaluator; with a run folder, also its agreement with the run's teacher. A checkpoint that is
    a folder (a run's `student_hf/`) is loaded as a Hugging Face model of the recipe's task."""
    cfg = resolve_recipe(cfg)
    if checkpoint is None:
        if run_dir is None:
            raise ConfigError("give --checkpoint, or a run folder whose checkpoints to score")
        stage = "student_kd" if which == "student" else "teacher"
        checkpoint = str(run_dir / "checkpoints" / stage / "final.safetensors")
    data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
    model_cfg = cfg.student if which == "student" else cfg.teacher
    teacher_model = build_model(cfg.teacher.spec(), data) if which == "student" else None
    if Path(checkpoint).is_dir():
        task = model_cfg.init_args.get("task") if model_cfg.name == "hf" else None
        spec = {"name": "hf", "init_args": {"path": checkpoint, "task": task or "sequence_classification"}}
        model = build_model(spec, data)
    else:
        model = build_model(model_cfg.spec(), data, teacher=teacher_model)
        load_weights(model, checkpoint)
    teacher = None
    teacher_ckpt = run_dir / "checkpoints" / "teacher" / "final.safetensors" if run_dir else None
    if cfg.teacher.checkpoint:
        teacher_ckpt = Path(cfg.teacher.checkpoint)
    if which == "student" and teacher_ckpt is not None and teacher_ckpt.exists():
        teacher = Teacher(
            load_weights(teacher_model, teacher_ckpt), adapter=build_adapter(cfg.teacher.adapter)
        )
    elif which == "student" and getattr(teacher_model, "distill_pretrained", False):
        teacher = Teacher(teacher_model, adapter=build_adapter(cfg.teacher.adapter))
    ds = getattr(data, split)
    if ds is None:
        raise ConfigError(f"the dataset has no {split} split")
    loader, _ = make_loader(ds, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    return {
        "checkpoint": checkpoint,
        "split": split,
        **evaluate(
            model,
            loader,
            build_evaluator(_spec(cfg.evaluator)),
            build_adapter(model_cfg.adapter),
            teacher=teacher,
        ),
        "params": count_params(model),
    }
