"""Chains and cohorts on scikit-learn digits: teacher -> student directly, teacher -> assistant ->
student (TAKD), born-again generations, and deep mutual learning. Writes docs/chains.md.

    nice -n 10 python benchmarks/chain_digits.py                    # ~10 min wall on a busy 2-core machine (1 thread)
    nice -n 10 python benchmarks/chain_digits.py --seeds 1 --epochs 3 --doc /tmp/chains.md   # smoke

Each chain is a `distill.chain.run_chain` run folder under --work (resumable: rerun to continue).
The CNN teacher is trained once (seed 0) and loaded by every chain as a checkpoint.
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

from distill.chain import ChainRecipe, Cohort, Mutual, run_chain  # noqa: E402
from distill.checkpoint import atomic_write_text, save_weights  # noqa: E402
from distill.data import build_data  # noqa: E402
from distill.engine.evaluate import evaluate  # noqa: E402
from distill.engine.trainer import Trainer, make_loader, seed_everything  # noqa: E402
from distill.losses import CrossEntropy  # noqa: E402
from distill.models.build import build_model  # noqa: E402
from distill.objective import Objective  # noqa: E402

TEACHER = {"name": "cnn", "init_args": {"channels": [32, 64, 128], "dropout": 0.1}}
ASSISTANT = {"name": "mlp", "init_args": {"hidden": [128]}}
STUDENT = {"name": "mlp", "init_args": {"hidden": [16]}}
BAN = {"name": "mlp", "init_args": {"hidden": [32]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=60, help="epochs of every student / assistant stage")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--work", default="runs/chain_digits_e60")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "chains.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data("digits", seed=0)

    teacher_path = work / f"teacher_e{args.teacher_epochs}.safetensors"
    if not teacher_path.exists():
        seed_everything(0)
        t = build_model(TEACHER, data)
        Trainer(
            t,
            Objective({"ce": CrossEntropy()}),
            data.train,
            val_data=data.val,
            epochs=args.teacher_epochs,
            device="cpu",
            progress="off",
            tensorboard=False,
        ).fit()
        save_weights(teacher_path, t.state_dict())

    fast = {"epochs": args.epochs, "device": "cpu", "progress": "off", "tensorboard": False}
    base = {
        "data": {"name": "digits"},
        "trainer": fast,
        "report": {"latency_batch_sizes": [1], "latency_repeats": 20},
    }
    chains = {
        "direct": {**base, "teacher": {**TEACHER, "checkpoint": str(teacher_path)}, "student": STUDENT},
        "takd": {
            **base,
            "teacher": {**TEACHER, "checkpoint": str(teacher_path)},
            "assistants": [ASSISTANT],
            "student": STUDENT,
            "baselines": [],
        },
        "born_again": {
            **base,
            "teacher": {**BAN, "train": fast},
            "student": BAN,
            "generations": args.generations,
            "baselines": [],
        },
    }
    acc: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        for name, recipe in chains.items():
            cfg = ChainRecipe.model_validate({**recipe, "name": name, "seed": seed})
            out = work / name / f"seed{seed}"
            summary = run_chain(cfg, out, resume=True)
            for r in summary["rows"]:
                acc.setdefault(name, {}).setdefault(r["name"], []).append(r["accuracy"])
            print(name, seed, {r["name"]: round(r["accuracy"], 4) for r in summary["rows"]}, flush=True)

        # deep mutual learning: two students of the student's architecture, trained together
        res = work / "dml" / f"seed{seed}.json"
        if not res.exists():
            seed_everything(seed)
            cohort = Cohort([build_model(STUDENT, data), build_model(STUDENT, data)])
            Trainer(
                cohort,
                Objective({"dml": Mutual(alpha=1.0, temperature=1.0)}),
                data.train,
                val_data=data.val,
                seed=seed,
                **fast,
            ).fit()
            loader, _ = make_loader(data.test, 256, False, 0)
            m = [evaluate(s, loader)["accuracy"] for s in cohort.members]
            res.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(res, json.dumps({"member0": m[0], "member1": m[1]}))
        for k, v in json.loads(res.read_text()).items():
            acc.setdefault("dml", {}).setdefault(k, []).append(v)

    def fmt(vals):
        sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.4f} ± {sd:.4f}"

    params = {
        n: sum(p.numel() for p in build_model(s, data).parameters())
        for n, s in [("teacher", TEACHER), ("assistant", ASSISTANT), ("student", STUDENT), ("ban", BAN)]
    }
    lines = [
        "# Chains and cohorts on digits",
        "",
        "Measured by `benchmarks/chain_digits.py` (CPU, 1 thread):",
        "",
        "```",
        f"nice -n 10 python benchmarks/chain_digits.py --seeds {args.seeds} --teacher-epochs {args.teacher_epochs} "
        f"--epochs {args.epochs} --generations {args.generations}",
        "```",
        "",
        f"Test accuracy, mean ± population std over {args.seeds} seeds (test n = {len(data.test)}). Teacher: "
        f"cnn [32, 64, 128] ({params['teacher']:,} params, trained once, seed 0). Assistant: mlp [128] "
        f"({params['assistant']:,}). Student: mlp [16] ({params['student']:,}). Every distilled stage: "
        f"0.5·CE + 0.5·KD (T = 4), {args.epochs} epochs. Born-again: mlp [32] ({params['ban']:,}), generation 0 "
        "trained from labels, each next generation taught by the previous. DML: two mlp [16] trained "
        "together, each on CE + KL to the other (α = 1, T = 1). "
        f"Wall time of this invocation: {time.perf_counter() - t0:.0f} s (finished stages are loaded, not rerun).",
        "",
        "| setup | stage | accuracy |",
        "|---|---|---:|",
    ]
    for setup, stages in acc.items():
        for stage, vals in stages.items():
            lines.append(f"| {setup} | {stage} | {fmt(vals)} |")
    lines.append("")
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.doc), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
