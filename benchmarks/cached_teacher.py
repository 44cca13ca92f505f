"""A stored teacher against the online one, through the `distill run` pipeline.

For each seed: the recipe's teacher is trained once (`distill_gain.pin_teacher`), the distilled
student is trained with that teacher online, then `distill cache-teacher` writes its store (the
transfer set's inputs included; under `trainer.mix`, `--mix-views K` fixed mixed views per input)
and the same student is trained again with `teacher.cache` pointing at it. Prints and saves the
students' test accuracy, the paired difference (stored minus online) and the mean training step time
of each (from the trainer's own `samples_per_s` in metrics.jsonl):

    python benchmarks/cached_teacher.py recipes/digits_transfer.yaml --seeds 3
    python benchmarks/cached_teacher.py recipes/digits_patient.yaml --seeds 2 --views 10 --views 90

Scratch baselines are off (`baselines=[]`): only the two distilled students are compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_gain import pin_teacher, split_overrides  # noqa: E402

from distill.cli import cache as cli_cache  # noqa: E402
from distill.run.config import apply_overrides, load_yaml, parse_recipe  # noqa: E402
from distill.run.pipeline import run_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_ms(run: Path, batch_size: int) -> float:
    """Median milliseconds per training step of the distilled stage, from its logged throughput."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if r.get("split") == "train" and r.get("stage") == "student_kd"]
    return 1000 * batch_size / statistics.median(rates)


def write_store(recipe: Path, overrides: list[str], out: Path, views: int | None) -> float:
    parser = argparse.ArgumentParser(prog="distill")
    cli_cache.add_parser(parser.add_subparsers(dest="command"))
    argv = ["cache-teacher", str(recipe), *overrides, "--out", str(out), "--overwrite"]
    argv += ["--mix-views", str(views)] if views else []
    t0 = time.perf_counter()
    if cli_cache.main(parser.parse_args(argv)) != 0:
        raise SystemExit("cache-teacher failed")
    return time.perf_counter() - t0


def one(recipe: Path, seed: int, work: Path, base: list[str], views: list[int]) -> dict:
    data = apply_overrides(load_yaml(recipe), [*base, f"seed={seed}", "trainer.progress=off", "baselines=[]"])
    teacher = pin_teacher(data["teacher"], data, seed, work)
    pinned = [f"teacher.checkpoint={teacher['checkpoint']}", "teacher.train=null", "teacher.use=last"]
    overrides = [*base, f"seed={seed}", "trainer.progress=off", "baselines=[]", *pinned]
    batch = int(data["data"].get("batch_size", 64))
    res: dict = {}
    mixing = (data.get("trainer", {}).get("mix") or {}).get("name", "none") != "none"
    runs = [("online", None)] + ([(f"stored_{k}views", k) for k in views] if mixing else [("stored", None)])
    for name, k in runs:
        extra = []
        t0 = time.perf_counter()
        if name != "online":
            store = work / f"store_{recipe.stem}_seed{seed}_{name}"
            res[f"{name}_write_s"] = write_store(recipe, overrides, store, k)
            extra = [f"teacher.cache={store}"]
        cfg = parse_recipe(apply_overrides(load_yaml(recipe), [*overrides, *extra]), source=name)
        out = work / recipe.stem / name / f"seed{seed}"
        summary = run_recipe(cfg, out, overwrite=True)
        row = next(r for r in summary["rows"] if r["name"] == "student_kd")
        res[name] = {
            "accuracy": row["accuracy"],
            "step_ms": step_ms(out, batch),
            "wall_s": time.perf_counter() - t0,
        }
        print(
            f"{recipe.stem} seed {seed} {name}: accuracy {100 * row['accuracy']:.2f}  "
            f"step {res[name]['step_ms']:.2f} ms  ({res[name]['wall_s']:.0f}s)",
            flush=True,
        )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return res


def table(results: dict) -> str:
    lines = [
        "| recipe | teacher | seeds | accuracy (%) | stored − online (points, paired) | step (ms) | store written (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for recipe, res in results.items():
        per_seed = res["seeds"]
        names = [n for n in per_seed[0] if isinstance(per_seed[0][n], dict)]
        for n in names:
            acc = [100 * s[n]["accuracy"] for s in per_seed]
            ms = [s[n]["step_ms"] for s in per_seed]
            diff = "—"
            if n != "online":
                d = [100 * (s[n]["accuracy"] - s["online"]["accuracy"]) for s in per_seed]
                diff = f"{statistics.fmean(d):+.2f} (per seed {', '.join(f'{x:+.2f}' for x in d)})"
            write = [s[f"{n}_write_s"] for s in per_seed if f"{n}_write_s" in s]
            lines.append(
                f"| {recipe} | {n} | {len(per_seed)} | {statistics.fmean(acc):.2f} ± {statistics.pstdev(acc):.2f} "
                f"| {diff} | {statistics.fmean(ms):.2f} | {f'{statistics.fmean(write):.1f}' if write else '—'} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--views", type=int, action="append", default=[], help="mixed views per input (mixing recipes)"
    )
    p.add_argument("--base", default="", help="overrides for every run, e.g. 'trainer.epochs=30'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/cached_teacher"))
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cached_teacher.json")
    p.add_argument("--table", action="store_true", help="print the saved table only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    saved = json.loads(args.json.read_text()) if args.json.exists() else {}
    if not args.table:
        base = split_overrides(args.base)
        seeds = [one(args.recipe, s, args.work, base, args.views or [10]) for s in range(args.seeds)]
        command = f"python benchmarks/cached_teacher.py {args.recipe} --seeds {args.seeds}"
        command += "".join(f" --views {k}" for k in args.views) + (
            f" --base '{args.base}'" if args.base else ""
        )
        saved[args.recipe.stem] = {"command": command, "base": base, "seeds": seeds}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(saved, indent=1))
    print(table(saved))


if __name__ == "__main__":
    main()
