"""Multi-task distillation on scikit-learn digits: one student, a shared trunk and two heads.

Task `digit`: the 10-class label on the full training split. Task `parity`: odd/even on a small
subset (--parity-n images), so the tasks differ in size and task sampling (size^tau) matters.
Each head is distilled from its own CNN teacher. Writes docs/multitask.md.

    nice -n 10 python benchmarks/multitask_digits.py          # ~3 min wall on a busy 2-core machine (1 thread)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.checkpoint import atomic_write_text, load_weights, save_weights  # noqa: E402
from distill.data import build_data  # noqa: E402
from distill.engine.trainer import Trainer, seed_everything  # noqa: E402
from distill.losses import KD, CrossEntropy  # noqa: E402
from distill.models.build import build_model  # noqa: E402
from distill.multitask import (  # noqa: E402
    MultiTaskDataset,
    MultiTaskStudent,
    TaskTeachers,
    evaluate_tasks,
    task_adapter,
    task_loader,
    task_probabilities,
)
from distill.objective import Objective  # noqa: E402

TEACHER = {"name": "cnn", "init_args": {"channels": [32, 64, 128], "dropout": 0.1}}


class Parity(Dataset):
    """The digits images labelled odd (1) / even (0), optionally the first n only."""

    def __init__(self, base: Dataset, n: int | None = None):
        self.base, self.n = base, min(n or len(base), len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y % 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--parity-n", type=int, default=100)
    ap.add_argument("--taus", default="0,0.5,1")
    ap.add_argument("--work", default="runs/multitask_digits")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "multitask.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data("digits", seed=0)
    train = {"digit": data.train, "parity": Parity(data.train, args.parity_n)}
    val = {"digit": data.val, "parity": Parity(data.val)}
    test = {"digit": data.test, "parity": Parity(data.test)}
    classes = {"digit": 10, "parity": 2}

    teachers = {}
    for task in train:
        seed_everything(0)
        model = build_model(
            {**TEACHER, "init_args": {**TEACHER["init_args"], "num_classes": classes[task]}}, data
        )
        path = work / f"teacher_{task}_e{args.teacher_epochs}.safetensors"
        if path.exists():
            load_weights(model, path)
        else:
            Trainer(
                model,
                Objective({"ce": CrossEntropy()}),
                train[task],
                val_data=val[task],
                epochs=args.teacher_epochs,
                device="cpu",
                progress="off",
                tensorboard=False,
            ).fit()
            save_weights(path, model.state_dict())
        teachers[task] = model
    mt_train = MultiTaskDataset(train)
    mt_val = MultiTaskDataset(val)
    tt = TaskTeachers(teachers, mt_train.names)
    teacher_metrics = evaluate_tasks_plain(teachers, test)

    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    taus = [float(t) for t in args.taus.split(",")]
    for seed in range(args.seeds):
        for tau in taus:
            for mode in ("scratch", "kd"):
                key = f"{mode}/tau{tau}/seed{seed}/e{args.epochs}"
                if key in results:
                    continue
                seed_everything(seed)
                student = MultiTaskStudent(
                    nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()),
                    {t: nn.Linear(32, c) for t, c in classes.items()},
                )
                if mode == "kd":
                    obj = Objective({"ce": CrossEntropy(), "kd": KD(4.0)}, {"ce": 0.5, "kd": 0.5})
                else:
                    obj = Objective({"ce": CrossEntropy()})
                Trainer(
                    student,
                    obj,
                    task_loader(mt_train, 64, tau=tau, seed=seed),
                    teacher=tt if mode == "kd" else None,
                    val_data=task_loader(mt_val, 256, shuffle=False),
                    student_adapter=task_adapter(mt_train.names),
                    epochs=args.epochs,
                    seed=seed,
                    device="cpu",
                    progress="off",
                    tensorboard=False,
                ).fit()
                per = evaluate_tasks(student, test, tt)
                results[key] = {t: m["accuracy"] for t, m in per.items()}
                atomic_write_text(res_path, json.dumps(results, indent=2))
                print(key, results[key], flush=True)

    def cell(mode, tau, task):
        v = [results[f"{mode}/tau{tau}/seed{s}/e{args.epochs}"][task] for s in range(args.seeds)]
        return f"{statistics.fmean(v):.4f} ± {statistics.pstdev(v) if len(v) > 1 else 0.0:.4f}"

    sizes = [len(train[t]) for t in mt_train.names]
    lines = [
        "# Multi-task distillation on digits",
        "",
        "Measured by `benchmarks/multitask_digits.py` (CPU, 1 thread):",
        "",
        "```",
        f"nice -n 10 python benchmarks/multitask_digits.py --seeds {args.seeds} --epochs {args.epochs} "
        f"--teacher-epochs {args.teacher_epochs} --parity-n {args.parity_n} --taus {args.taus}",
        "```",
        "",
        f"Tasks: `digit` (10 classes, {sizes[0]} training images) and `parity` (odd/even, the first "
        f"{sizes[1]} training images). One CNN teacher per task ({args.teacher_epochs} epochs). Student: a shared "
        "trunk (flatten, linear 64→32, ReLU) and a linear head per task; single-task batches of 64, the "
        "task of each batch drawn with p ∝ n^τ; an epoch is Σ ceil(n_t / 64) batches; "
        f"{args.epochs} epochs; `kd`: 0.5·CE + 0.5·KD (T = 4) with each head taught by its task's teacher. "
        f"Test accuracy per task, mean ± std over {args.seeds} seeds.",
        "",
        f"Teachers alone (test): digit {teacher_metrics['digit']:.4f}, parity {teacher_metrics['parity']:.4f}.",
        "",
        "| τ | p(parity) | student | digit | parity |",
        "|---:|---:|---|---:|---:|",
    ]
    for tau in taus:
        p = task_probabilities(sizes, tau)[1]
        for mode in ("scratch", "kd"):
            lines.append(
                f"| {tau} | {p:.3f} | {mode} | {cell(mode, tau, 'digit')} | {cell(mode, tau, 'parity')} |"
            )
    lines.append("")
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.doc), "\n".join(lines))
    print("\n".join(lines))
    return 0


def evaluate_tasks_plain(teachers: dict, test: dict) -> dict[str, float]:
    from distill.engine.evaluate import evaluate
    from distill.engine.trainer import make_loader

    return {t: evaluate(m, make_loader(test[t], 256, False, 0)[0])["accuracy"] for t, m in teachers.items()}


if __name__ == "__main__":
    raise SystemExit(main())
