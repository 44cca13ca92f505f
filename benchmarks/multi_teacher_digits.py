"""Multi-teacher distillation on scikit-learn digits: three differently built teachers, every
weighting rule, students over several seeds. Writes docs/multi_teacher.md with the measured numbers.

    nice -n 10 python benchmarks/multi_teacher_digits.py            # ~15 min wall on a busy 2-core machine (1 thread)
    nice -n 10 python benchmarks/multi_teacher_digits.py --seeds 1 --student-epochs 5   # smoke run

Teachers are trained once (seed 0) and reused for every student seed; partial results are kept in
--work (results.json), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.checkpoint import atomic_write_text, load_weights, save_weights  # noqa: E402
from distill.data import build_data  # noqa: E402
from distill.engine.evaluate import evaluate  # noqa: E402
from distill.engine.trainer import Trainer, make_loader, seed_everything  # noqa: E402
from distill.losses import KD, CrossEntropy  # noqa: E402
from distill.models.build import build_model  # noqa: E402
from distill.objective import Objective  # noqa: E402
from distill.outputs import as_batch  # noqa: E402
from distill.teacher_choice import collect_logits, score_logits  # noqa: E402
from distill.teachers import Teacher  # noqa: E402
from distill.teachers.ensemble import Ensemble, EnsembleKD  # noqa: E402

TEACHERS = {
    "cnn": {"name": "cnn", "init_args": {"channels": [32, 64, 128], "dropout": 0.1}},
    "wide_mlp": {"name": "mlp", "init_args": {"hidden": [512, 512], "dropout": 0.2}},
    "deep_cnn": {"name": "cnn", "init_args": {"channels": [16, 32, 32, 64]}},
}
STUDENT = {"name": "mlp", "init_args": {"hidden": [32]}}
RULES = ["mean_logits", "mean_probs", "confidence", "entropy", "learned"]


def _ensemble(members, rule: str) -> Ensemble:
    """`rule` or `rule@tau`."""
    name, _, tau = rule.partition("@")
    return Ensemble(members, rule=name, tau=float(tau) if tau else 1.0)


def train(model, objective, data, teacher, epochs, seed, lr=3e-3):
    tr = Trainer(
        model,
        objective,
        data.train,
        teacher=teacher,
        val_data=data.val,
        epochs=epochs,
        seed=seed,
        batch_size=64,
        device="cpu",
        progress="off",
        tensorboard=False,
        optimizer={"lr": lr},
    )
    tr.fit()
    return model


def test_metrics(model, data, teacher=None):
    loader, _ = make_loader(data.test, 256, False, 0)
    return evaluate(model, loader, teacher=teacher)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-epochs", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--sharp-tau", type=float, default=0.1, help="also run confidence/entropy at this tau")
    ap.add_argument("--work", default="runs/multi_teacher_digits")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "multi_teacher.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save():
        atomic_write_text(res_path, json.dumps(results, indent=2))

    data = build_data("digits", seed=0)
    loader, _ = make_loader(data.test, 256, False, 0)

    # ---- teachers, each alone
    teachers = {}
    for name, spec in TEACHERS.items():
        seed_everything(0)
        model = build_model(spec, data)
        path = work / f"teacher_{name}_e{args.teacher_epochs}.safetensors"
        if path.exists():
            load_weights(model, path)
        else:
            t1 = time.perf_counter()
            train(model, Objective({"ce": CrossEntropy()}), data, None, args.teacher_epochs, 0)
            save_weights(path, model.state_dict())
            results.setdefault("teacher_seconds", {})[name] = round(time.perf_counter() - t1, 1)
        teachers[name] = model
        z, y = collect_logits(model, loader)
        s = score_logits(z, y)
        results.setdefault("teachers", {})[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            **{k: s[k] for k in ("accuracy", "nll", "ece")},
        }
    save()
    members = list(teachers.values())

    # ---- the ensemble's own accuracy per rule (confidence uses the test labels: an oracle)
    sharp = [f"confidence@{args.sharp_tau}", f"entropy@{args.sharp_tau}"]
    for rule in RULES[:4] + sharp:
        ens = _ensemble(members, rule)
        zs, ys = [], []
        for raw in loader:
            b = as_batch(raw)
            zs.append(ens(b).logits)
            ys.append(b.targets)
        s = score_logits(torch.cat(zs), torch.cat(ys))
        results.setdefault("ensemble", {})[rule] = {k: s[k] for k in ("accuracy", "nll", "ece")}
        # How far from uniform the rule's weights are on the training data (what the students see).
        train_loader, _ = make_loader(data.train, 256, False, 0)
        ws = torch.cat([ens(as_batch(raw)).extras["member_weights"] for raw in train_loader])
        results["ensemble"][rule]["train_max_weight"] = float(ws.max(1).values.mean())
        results["ensemble"][rule]["train_mean_weights"] = [round(float(v), 4) for v in ws.mean(0)]
    save()

    # ---- students: scratch, KD from each teacher alone, and from the ensemble under each rule
    runs = [("scratch", None)] + [(f"kd_{n}", n) for n in TEACHERS] + [(f"ens_{r}", r) for r in RULES + sharp]
    T = args.temperature
    for seed in range(args.seeds):
        for run, what in runs:
            key = f"{run}/seed{seed}/e{args.student_epochs}"
            if key in results.get("students", {}):
                continue
            seed_everything(seed)
            student = build_model(STUDENT, data)
            if what is None:
                obj, teacher = Objective({"ce": CrossEntropy()}), None
            elif what in TEACHERS:
                obj = Objective({"ce": CrossEntropy(), "kd": KD(T)}, {"ce": 0.5, "kd": 0.5})
                teacher = Teacher(teachers[what])
            elif what == "learned":
                obj = Objective({"ce": CrossEntropy(), "kd": EnsembleKD(T)}, {"ce": 0.5, "kd": 0.5})
                teacher = Ensemble(members, rule="learned")
            else:
                obj = Objective({"ce": CrossEntropy(), "kd": KD(T)}, {"ce": 0.5, "kd": 0.5})
                teacher = _ensemble(members, what)
            t1 = time.perf_counter()
            train(student, obj, data, teacher, args.student_epochs, seed)
            m = test_metrics(student, data)
            results.setdefault("students", {})[key] = {**m, "seconds": round(time.perf_counter() - t1, 1)}
            save()
            print(f"{key}: accuracy {m['accuracy']:.4f}", flush=True)

    # ---- the page
    def accs(run):
        return [
            results["students"][f"{run}/seed{s}/e{args.student_epochs}"]["accuracy"]
            for s in range(args.seeds)
        ]

    def agg(run):
        vals = accs(run)
        sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        # paired by seed: the same initial student and data order as the scratch run
        diff = [a - b for a, b in zip(vals, accs("scratch"))]
        return f"{statistics.fmean(vals):.4f} ± {sd:.4f} | {statistics.fmean(diff):+.4f}"

    sp = sum(p.numel() for p in build_model(STUDENT, data).parameters())
    lines = [
        "# Multi-teacher distillation on digits",
        "",
        "Measured by `benchmarks/multi_teacher_digits.py` (CPU, 1 thread):",
        "",
        "```",
        f"nice -n 10 python benchmarks/multi_teacher_digits.py --seeds {args.seeds} "
        f"--teacher-epochs {args.teacher_epochs} --student-epochs {args.student_epochs} "
        f"--temperature {args.temperature} --sharp-tau {args.sharp_tau}",
        "```",
        "",
        f"scikit-learn digits, stratified 60/20/20 split (test n = {len(data.test)}). Teachers trained once "
        f"(seed 0, {args.teacher_epochs} epochs, AdamW 3e-3, cosine); students `mlp` hidden [32] ({sp:,} params), "
        f"{args.student_epochs} epochs, loss 0.5·CE + 0.5·KD (T = {args.temperature}), "
        f"{args.seeds} seeds (mean ± population std). Training time, summed over all runs: students "
        f"{sum(r['seconds'] for k, r in results['students'].items() if k.endswith(f'/e{args.student_epochs}')):.0f} s"
        + (
            f", teachers {sum(results['teacher_seconds'].values()):.0f} s"
            if "teacher_seconds" in results
            else ""
        )
        + " (wall clock on a shared 2-core machine).",
        "",
        "## Teachers alone and the ensemble (test split)",
        "",
        "| model | params | accuracy | NLL | ECE (15 bins) | mean max weight (train) | mean weights (train) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for n, r in results["teachers"].items():
        lines.append(
            f"| teacher {n} | {r['params']:,} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | | |"
        )
    for rule, r in results["ensemble"].items():
        note = " (uses the test labels: oracle)" if rule.startswith("confidence") else ""
        lines.append(
            f"| ensemble {rule}{note} | | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | "
            f"{r.get('train_max_weight', float('nan')):.3f} | {r.get('train_mean_weights', '')} |"
        )
    lines += [
        "",
        "The `learned` rule has no fixed ensemble of its own: its gate is trained with each student. The "
        "last two columns show how far the confidence / entropy weights are from uniform on the training "
        "images the students learn from: when every teacher fits the training labels, they are close to "
        "1/3 each and those rules behave like `mean_logits`.",
        "",
        "## Students (test accuracy)",
        "",
        "| student distilled from | accuracy | Δ vs scratch (paired by seed) |",
        "|---|---:|---:|",
    ]
    for run, _ in runs:
        lines.append(f"| {run} | {agg(run)} |")
    lines += [
        "",
        f"One test sample is {1 / len(data.test):.4f} of accuracy. "
        "`scratch`: labels only. `kd_<t>`: Hinton KD from one teacher. `ens_<rule>`: KD from the ensemble "
        "combined by that rule (`confidence`: softmax over teachers of −CE/τ, computed on the "
        "training labels; `entropy`: softmax of −entropy/τ; τ = 1 unless the name says `@τ`; `learned`: the `ensemble_kd` term's gate, trained "
        "on the labels through the mixture, KD on the detached mixture).",
        "",
    ]
    lines += [
        "## Use",
        "",
        "```python",
        "from distill.teachers.ensemble import Ensemble, EnsembleKD",
        'teacher = Ensemble([cnn, wide_mlp, deep_cnn], rule="entropy", tau=1.0)  # any Teacher-like use',
        'objective = Objective({"ce": CrossEntropy(), "kd": KD(4.0)}, {"ce": 0.5, "kd": 0.5})',
        "# learned per-sample weights: the gate lives in the loss term, trained with the student",
        'teacher = Ensemble([cnn, wide_mlp, deep_cnn], rule="learned")',
        'objective = Objective({"ce": CrossEntropy(), "kd": EnsembleKD(4.0)}, {"ce": 0.5, "kd": 0.5})',
        "# features per member: a term's teacher_taps name them as 't<i>.<module path>', e.g. 't0.features.3'",
        "```",
        "",
    ]
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.doc), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
