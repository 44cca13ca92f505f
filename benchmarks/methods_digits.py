"""Every method on digits: teacher, scratch student, each distillation method, over seeds.

Regenerates the measured table in docs/methods.md (between the digits-table markers):

    python benchmarks/methods_digits.py --seeds 3

Per seed, the teacher is trained once (recipes/digits_kd.yaml's teacher) and every method's
student starts from the same initial weights. Accuracy is on the held-out test split after the
last epoch; time per epoch (training + the per-epoch validation) is relative to the scratch
student's: per seed, the method's process CPU time per epoch over the scratch student's (run
with --threads 1 the CPU time measures the work, not the wait on a shared machine), median over
seeds. Wall-clock seconds are kept in the JSON too.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from distill.data.bundle import build_data
from distill.engine.evaluate import evaluate
from distill.engine.trainer import Trainer, make_loader, seed_everything
from distill.models.build import build_model
from distill.run.config import load_recipe
from distill.run.pipeline import build_objective, scratch_objective
from distill.teachers import Teacher

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "kd", "lskd", "dkd", "dist", "ctkd", "fitnets", "at", "sp", "pkt", "rkd", "crd", "kd_adaptive", "kd_weighted",
]  # fmt: skip


def _fit(model, objective, data, cfg, trainer_cfg, teacher, seed, epochs):
    tcfg = trainer_cfg.model_copy(update={"epochs": epochs, "progress": "off", "tensorboard": False})
    trainer = Trainer(
        model,
        objective,
        data.train,
        teacher=teacher,
        val_data=data.val,
        config=tcfg,
        seed=seed,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit()
    return (time.perf_counter() - t0) / epochs, (time.process_time() - c0) / epochs


def _test(model, data, teacher=None):
    loader, _ = make_loader(data.test, 256, False, 0)
    return evaluate(model, loader, teacher=teacher)


def run(seeds: int, epochs: int, teacher_epochs: int, methods: list[str]) -> dict:
    results: dict[str, list[dict]] = {}
    for seed in range(seeds):
        base = load_recipe(ROOT / "recipes" / "digits_kd.yaml", [f"seed={seed}"])
        data = build_data(base.data.name, base.data.class_path, base.data.init_args, seed=seed)
        seed_everything(seed)
        t_model = build_model(base.teacher.spec(), data)
        _fit(t_model, scratch_objective(base), data, base, base.teacher.train, None, seed, teacher_epochs)
        teacher = Teacher(t_model)
        results.setdefault("teacher", []).append(
            {"accuracy": _test(t_model, data)["accuracy"], "epoch_s": None, "epoch_cpu_s": None}
        )
        print(f"seed {seed} teacher {results['teacher'][-1]['accuracy']:.4f}", flush=True)
        for method in ["scratch", *methods]:
            cfg = (
                base
                if method == "scratch"
                else load_recipe(ROOT / "recipes" / f"digits_{method}.yaml", [f"seed={seed}"])
            )
            mdata = (
                data
                if cfg.data == base.data
                else build_data(cfg.data.name, cfg.data.class_path, cfg.data.init_args, seed=seed)
            )
            seed_everything(seed)
            student = build_model(cfg.student.spec(), mdata)
            objective = scratch_objective(cfg) if method == "scratch" else build_objective(cfg)
            epoch_s, epoch_cpu_s = _fit(
                student,
                objective,
                mdata,
                cfg,
                cfg.trainer,
                None if method == "scratch" else teacher,
                seed,
                epochs,
            )
            m = _test(student, data, teacher)
            results.setdefault(method, []).append(
                {
                    "accuracy": m["accuracy"],
                    "agreement": m.get("agreement"),
                    "epoch_s": epoch_s,
                    "epoch_cpu_s": epoch_cpu_s,
                }
            )
            print(
                f"seed {seed} {method:12s} acc {m['accuracy']:.4f} epoch {epoch_s:.3f}s"
                f" (cpu {epoch_cpu_s:.3f}s)",
                flush=True,
            )
    return results


def table(results: dict, paired_vs: str | None = None) -> str:
    """Markdown table; with `paired_vs`, a column of per-seed accuracy differences against that
    row (same seed, same teacher, same initial student), as mean ± std and wins/ties/losses."""
    scratch_cpu = [r["epoch_cpu_s"] for r in results["scratch"]]
    head = "| model / method | test accuracy (mean ± std) | agreement with teacher | CPU time per epoch vs scratch |"
    rule = "| --- | --- | --- | --- |"
    if paired_vs:
        head += f" Δ accuracy vs {paired_vs}, paired (mean ± std) | seeds better / equal / worse |"
        rule += " --- | --- |"
    lines = [head, rule]
    for name, runs in results.items():
        acc = [100 * r["accuracy"] for r in runs]
        std = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        agr = [100 * r["agreement"] for r in runs if r.get("agreement") is not None]
        agr_s = f"{statistics.fmean(agr):.1f}%" if agr else "—"
        rel = (
            "—"
            if runs[0]["epoch_s"] is None
            else f"{statistics.median(r['epoch_cpu_s'] / c for r, c in zip(runs, scratch_cpu, strict=True)):.2f}×"
        )
        row = f"| {name} | {statistics.fmean(acc):.2f} ± {std:.2f} | {agr_s} | {rel} |"
        if paired_vs:
            if name == paired_vs or name == "teacher":
                row += " — | — |"
            else:
                ref = [100 * r["accuracy"] for r in results[paired_vs]]
                d = [a - b for a, b in zip(acc, ref, strict=True)]
                wins = sum(x > 1e-9 for x in d)
                losses = sum(x < -1e-9 for x in d)
                row += f" {statistics.fmean(d):+.2f} ± {statistics.pstdev(d):.2f} | {wins} / {len(d) - wins - losses} / {losses} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "methods_digits.json"))
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/methods.md")
    p.add_argument("--paired-vs", default=None, help="add per-seed paired differences against this row")
    p.add_argument("--block", default="digits-table", help="docs/methods.md marker block to rewrite")
    p.add_argument("--from-json", default=None, help="re-render a saved run's table instead of running")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, meta = saved["results"], saved["meta"]
        args.seeds, args.epochs = meta["seeds"], meta["epochs"]
        args.teacher_epochs, args.threads, wall = meta["teacher_epochs"], meta["threads"], meta["wall_s"]
        ran = [m for m in results if m not in ("teacher", "scratch")]
        args.methods = METHODS if ran == METHODS else ran
        args.json = args.from_json
    else:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        results = run(args.seeds, args.epochs, args.teacher_epochs, args.methods)
        wall = time.perf_counter() - t0
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seeds": args.seeds, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "wall_s": round(wall, 1),
            "torch": torch.__version__, "threads": args.threads}  # fmt: skip
    if not args.from_json:
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = table(results, args.paired_vs)
    print(md)
    print(f"wall {wall:.0f}s")
    docs = ROOT / "docs" / "methods.md"
    if not args.no_docs and docs.exists():
        cmd = (
            f"python benchmarks/methods_digits.py --seeds {args.seeds} --epochs {args.epochs}"
            f" --teacher-epochs {args.teacher_epochs} --threads {args.threads}"
        )
        if args.methods != METHODS:
            cmd += " --methods " + " ".join(args.methods)
        if args.paired_vs:
            cmd += f" --paired-vs {args.paired_vs}"
        default_json = ROOT / "benchmarks" / "results" / "methods_digits.json"
        if Path(args.json).resolve() != default_json:
            json_path = Path(args.json).resolve()
            cmd += f" --json {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}"
        if args.block != "digits-table":
            cmd += f" --block {args.block}"
        start, end = f"<!-- {args.block}:start -->", f"<!-- {args.block}:end -->"
        block = (
            f"{start}\n{md}\n\nCommand: `{cmd}` ({wall / 60:.1f} min, {args.threads} torch thread(s)).\n{end}"
        )
        text = re.sub(
            re.escape(start) + ".*" + re.escape(end),
            lambda _: block,
            docs.read_text(),
            flags=re.S,
        )
        docs.write_text(text)


if __name__ == "__main__":
    main()
