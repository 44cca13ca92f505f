"""Runs a detection recipe (default recipes/detect_shapes.yaml): teacher, scratch student,
distilled student; reports mAP, mAP@0.5, params, size and CPU latency in a run folder.

It uses `distill.engine.trainer.Trainer` directly, with the detection adapter and mAP evaluator (what
the recipe's `adapter` / `evaluator` keys name; the frozen teacher skips NMS here) and a
label-only objective made of the recipe's terms that need no teacher (`det`), because the recipe
pipeline trains the teacher and the scratch student with cross-entropy. Usage:

    python benchmarks/detect_shapes.py [--recipe recipes/detect_shapes.yaml] [--out runs/detect_shapes] [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from distill.checkpoint import atomic_write_text, load_weights, save_weights
from distill.data.bundle import build_data
from distill.engine.evaluate import evaluate
from distill.engine.trainer import Trainer, make_loader, seed_everything
from distill.models.build import build_model
from distill.models.detection import DetectionEvaluator, detection_adapter, teacher_detection_adapter
from distill.objective import Objective
from distill.run.config import load_recipe
from distill.run.measure import count_params, latency_ms, size_mb
from distill.run.pipeline import build_objective
from distill.run.report import table, write_report
from distill.run.rundir import RunDir
from distill.teachers import Teacher


def label_objective(cfg) -> Objective:
    full = build_objective(cfg)
    names = [n for n, t in full.terms.items() if not t.needs_teacher]
    weights = {n: t.weight for n, t in cfg.objective.terms.items() if n in names}
    return Objective({n: full.terms[n] for n in names}, weights)


def train_stage(stage, model, objective, data, cfg, trainer_cfg, out, teacher=None):
    final = out / "checkpoints" / stage / "final.safetensors"
    if final.exists():
        return load_weights(model, final)
    t0 = time.perf_counter()
    Trainer(
        model,
        objective,
        data.train,
        teacher=teacher,
        val_data=data.val,
        config=trainer_cfg,
        out_dir=out,
        stage=stage,
        student_adapter=detection_adapter,
        evaluator=DetectionEvaluator(),
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        collate_fn=data.collate_fn,
        seed=cfg.seed,
        resume=True,
    ).fit()
    save_weights(
        final, model.state_dict(), {"stage": stage, "train_seconds": f"{time.perf_counter() - t0:.1f}"}
    )
    return model


def measure(name, model, data, cfg):
    loader, _ = make_loader(data.test, cfg.data.eval_batch_size, False, cfg.seed, collate_fn=data.collate_fn)
    row = {"name": name, **evaluate(model, loader, DetectionEvaluator(), detection_adapter)}
    row.update(params=count_params(model), size_mb=size_mb(model))
    example = data.test[0][0].unsqueeze(0)  # (1, 3, H, W); the detector runs its post-processing too
    cpu = copy.deepcopy(model).to("cpu").eval()
    for b in cfg.report.latency_batch_sizes:
        row[f"latency_ms_b{b}"] = latency_ms(cpu, example, b, repeats=cfg.report.latency_repeats)["p50"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/detect_shapes.yaml")
    p.add_argument("--out", default="runs/detect_shapes")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_recipe(args.recipe, args.overrides)
    out = Path(args.out)
    t0 = time.perf_counter()
    with RunDir(out, cfg.to_yaml(), resume=True):
        data = build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=cfg.seed)
        seed_everything(cfg.seed)
        teacher_model = build_model(cfg.teacher.spec(), data)
        if cfg.teacher.checkpoint:
            load_weights(teacher_model, cfg.teacher.checkpoint)
        else:
            train_stage("teacher", teacher_model, label_objective(cfg), data, cfg, cfg.teacher.train, out)
        teacher = Teacher(teacher_model, adapter=teacher_detection_adapter)
        students = {}
        for stage, objective, t in (
            ("student_scratch", label_objective(cfg), None),
            ("student_kd", build_objective(cfg), teacher),
        ):
            seed_everything(cfg.seed)  # the same initial student for both
            student = build_model(cfg.student.spec(), data)
            students[stage] = train_stage(stage, student, objective, data, cfg, cfg.trainer, out, t)
        rows = [measure("teacher", teacher.model, data, cfg)]
        rows += [measure(n, m, data, cfg) for n, m in students.items()]
        summary = {
            "command": "benchmarks/detect_shapes.py",
            "recipe": cfg.name,
            "seed": cfg.seed,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_report(out)
    cols = (
        [(k, k, "{:.4f}") for k in ("map", "map_50")]
        + [
            ("params", "params", "{:,.0f}"),
            ("size_mb", "size (MB)", "{:.2f}"),
        ]
        + [(f"latency_ms_b{b}", f"latency b{b} (ms)", "{:.1f}") for b in cfg.report.latency_batch_sizes]
    )
    print(table(rows, cols))
    print(f"run folder: {out}  ({summary['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
