"""Choosing a teacher: score candidate teachers before distilling from one.

For each candidate, on the validation split: accuracy, negative log-likelihood, expected
calibration error (ECE, Guo et al. 2017, equal-width confidence bins) before and after temperature
scaling, size, CPU latency, and the capacity gap to the student (parameter ratio and accuracy gap
to the same student trained from labels alone). Warnings flag a teacher no better than the
scratch student, a badly calibrated one (suggesting temperature scaling or label smoothing) and a
large capacity gap (suggesting a teacher assistant, Mirzadeh et al. 2020).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from distill.adapters import Adapter, auto_adapter
from distill.checkpoint import atomic_write_text, load_weights
from distill.errors import ConfigError
from distill.run.config import (
    RecipeConfig,
    Strict,
    TeacherConfig,
    apply_overrides,
    format_validation_error,
    load_yaml,
)
from distill.teachers.calibration import collect_logits, plot_reliability, score_logits, token_shift


class TeacherThresholds(Strict):
    """When a candidate earns a warning."""

    ece_bins: int = Field(15, gt=1)
    ece_max: float = Field(0.05, gt=0, description="warn above this ECE")
    min_accuracy_gain: float = Field(0.0, description="warn when teacher accuracy − scratch ≤ this")
    param_ratio_max: float = Field(20.0, gt=1, description="warn when teacher/student params exceed this")


class CandidateConfig(TeacherConfig):
    """A candidate teacher: a model spec with a checkpoint, or a train: section; `label` names its row."""

    label: str | None = None


class TeachersRecipe(RecipeConfig):
    """A recipe whose `candidates` are compared as teachers for its `student`."""

    candidates: list[CandidateConfig] = Field(default_factory=list)
    thresholds: TeacherThresholds = Field(default_factory=TeacherThresholds)


def load_teachers_recipe(path: str | Path, overrides: list[str] | None = None) -> TeachersRecipe:
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return TeachersRecipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {format_validation_error(e, TeachersRecipe)}") from None


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def assess(row: dict[str, Any], student: dict[str, Any], th: TeacherThresholds) -> list[str]:
    """Warnings for one candidate row against the scratch student's row."""
    warnings = []
    gain = row["accuracy"] - student["accuracy"]
    if gain <= th.min_accuracy_gain:
        warnings.append(
            f"no better than the scratch student (accuracy {row['accuracy']:.4f} vs {student['accuracy']:.4f}): "
            "it has little to teach; pick a stronger teacher or train it longer"
        )
    if row["ece"] > th.ece_max:
        over = row["mean_confidence"] > row["accuracy"]
        fix = "retrain it with label smoothing" if over else "train it longer"
        warnings.append(
            f"badly calibrated (ECE {row['ece']:.3f} > {th.ece_max}, {'over' if over else 'under'}-confident): "
            f"distil at a temperature near {row['temperature']:.2f} (its best-NLL temperature; ECE then "
            f"{row['ece_at_temperature']:.3f}) or {fix}"
        )
    if row["param_ratio"] > th.param_ratio_max:
        warnings.append(
            f"large capacity gap ({row['param_ratio']:.0f}x the student's parameters > {th.param_ratio_max:.0f}x): "
            "consider a teacher assistant of intermediate size (distill chain)"
        )
    return warnings


def candidate_row(
    label: str,
    model: nn.Module,
    loader,
    student: dict[str, Any],
    th: TeacherThresholds,
    example: Tensor | None = None,
    latency_batch_sizes=(1, 64),
    latency_repeats: int = 50,
    adapter: Adapter = auto_adapter,
    evaluator: Any = None,
) -> dict[str, Any]:
    """One summary row for a candidate teacher (the reliability bins under `reliability`);
    `evaluator`: the recipe's, whose `shift` says whether token logits predict the next token."""
    from distill.run.measure import count_params, latency_ms, size_mb

    logits, targets = collect_logits(model, loader, adapter, shift=token_shift(evaluator, model))
    row: dict[str, Any] = {"name": label, **score_logits(logits, targets, th.ece_bins)}
    row["params"] = count_params(model)
    row["size_mb"] = size_mb(model)
    if example is not None:
        cpu = copy.deepcopy(model).to("cpu")
        for b in latency_batch_sizes:
            row[f"latency_ms_b{b}"] = latency_ms(cpu, example, b, repeats=latency_repeats)["p50"]
    row["param_ratio"] = row["params"] / max(student["params"], 1)
    row["accuracy_gap"] = row["accuracy"] - student["accuracy"]
    row["warnings"] = assess(row, student, th)
    return row


# --------------------------------------------------------------------------- the command


def run_teachers(
    cfg: TeachersRecipe, out: str | Path, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Trains or loads every candidate and the scratch student, scores them on the validation split,
    and writes summary.json (one row per candidate; the scratch student under `student`),
    report.md and reliability.png to `out`."""
    from distill.data.bundle import build_data
    from distill.engine.evaluate import build_evaluator
    from distill.engine.trainer import make_loader, seed_everything
    from distill.models.build import build_model
    from distill.run.measure import count_params
    from distill.run.pipeline import build_adapter, example_input, scratch_objective, train_stage
    from distill.run.report import table
    from distill.run.rundir import RunDir

    out = Path(out)
    t0 = time.perf_counter()
    candidates = cfg.candidates or [CandidateConfig(**cfg.teacher.model_dump(), label="teacher")]
    labels = [c.label or f"{c.name or c.class_path.rsplit('.', 1)[-1]}{i}" for i, c in enumerate(candidates)]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"candidates: labels must be unique, got {labels}")
    with RunDir(out, cfg.to_yaml(), resume=resume, overwrite=overwrite):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
        split = data.val if data.val is not None else data.test
        if split is None:
            raise ConfigError("the dataset has no validation (or test) split to score teachers on")
        loader, _ = make_loader(split, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
        example = example_input(data)

        seed_everything(cfg.seed)
        student = build_model(cfg.student.spec(), data)
        s_adapter = build_adapter(cfg.student.adapter)
        if cfg.student.checkpoint:
            load_weights(student, cfg.student.checkpoint)
        else:
            student = train_stage(
                "student_scratch",
                student,
                scratch_objective(cfg),
                data,
                cfg,
                cfg.trainer,
                out,
                None,
                s_adapter,
            )
        ev = build_evaluator(cfg.evaluator.spec()) if cfg.evaluator is not None else None
        logits, targets = collect_logits(student, loader, s_adapter, shift=token_shift(ev, student))
        s_row = {"name": "student_scratch", **score_logits(logits, targets, cfg.thresholds.ece_bins)}
        s_row["params"] = count_params(student)

        rows = []
        for label, cand in zip(labels, candidates):
            seed_everything(cfg.seed)
            model = build_model(cand.spec(), data)
            adapter = build_adapter(cand.adapter)
            if cand.checkpoint:
                load_weights(model, cand.checkpoint)
            elif cand.train is not None:
                model = train_stage(
                    f"candidate_{label}",
                    model,
                    scratch_objective(cfg),
                    data,
                    cfg,
                    cand.train,
                    out,
                    None,
                    adapter,
                )
            else:
                raise ConfigError(f"candidate '{label}': give a checkpoint to load or a train: section")
            rows.append(
                candidate_row(
                    label,
                    model,
                    loader,
                    s_row,
                    cfg.thresholds,
                    example,
                    cfg.report.latency_batch_sizes,
                    cfg.report.latency_repeats,
                    adapter,
                    ev,
                )
            )
        summary = {
            "command": "teachers",
            "recipe": cfg.name,
            "seed": cfg.seed,
            "split": "val" if data.val is not None else "test",
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "student": s_row,
            "rows": rows,
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        cols = [
            ("accuracy", "accuracy", "{:.4f}"),
            ("nll", "NLL", "{:.4f}"),
            ("ece", "ECE", "{:.4f}"),
            ("temperature", "best T", "{:.2f}"),
            ("ece_at_temperature", "ECE at T", "{:.4f}"),
            ("params", "params", "{:,.0f}"),
            ("param_ratio", "params / student", "{:.1f}"),
            ("accuracy_gap", "acc. gain over scratch", "{:+.4f}"),
            ("size_mb", "size (MB)", "{:.3f}"),
        ]
        cols += [(f"latency_ms_b{b}", f"latency b{b} (ms)", "{:.3f}") for b in cfg.report.latency_batch_sizes]
        keys = {"name"} | {c[0] for c in cols}
        plain = [{k: v for k, v in r.items() if k in keys} for r in rows]
        lines = [
            f"# {cfg.name}: choosing a teacher",
            "",
            f"Scored on the {summary['split']} split. Scratch student ({s_row['params']:,} params): accuracy "
            f"{s_row['accuracy']:.4f}, ECE {s_row['ece']:.4f}. ECE uses {cfg.thresholds.ece_bins} equal-width "
            "confidence bins; 'best T' is the temperature minimising NLL.",
            "",
            table(plain, cols),
            "",
            "## Warnings",
            "",
        ]
        for r in rows:
            lines += [f"- **{r['name']}**: {w}" for w in r["warnings"]] or [f"- **{r['name']}**: none"]
        if plot_reliability(rows, out / "reliability.png"):
            lines += ["", "![reliability diagrams](reliability.png)", ""]
        atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
        return summary
