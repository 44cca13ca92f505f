"""Does distillation beat the scratch twin? Paired seeds through the `distill run` pipeline.

For each variant (a name and recipe overrides) and each seed, `run_recipe` trains the scratch twin
and the distilled student from the same initial weights (the same mixing, epochs and data order),
from a teacher trained once per seed by the base recipe; the verdict (`distill.run.verdict`) gives
the paired gain per seed, its mean and 95% t-interval. Results are merged by variant into the JSON,
so variants can be run one at a time:

    python benchmarks/distill_gain.py recipes/digits.yaml --seeds 5 \\
        --variant "mix_kd_t1=trainer.mix.name=mixup objective.terms={kd: {name: kd, init_args: {temperature: 1}}}"

A variant is `name=override override ...`; overrides are `distill run`'s dotted keys (spaces
inside `{...}` are kept).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from distill.run.config import apply_overrides, load_yaml, parse_recipe
from distill.run.pipeline import run_recipe
from distill.run.verdict import verdict

ROOT = Path(__file__).resolve().parents[1]


def split_overrides(text: str) -> list[str]:
    """`a=1 b={x: 1, y: 2}` -> ["a=1", "b={x: 1, y: 2}"]: splits on spaces outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "{[" and 1 or 0
        depth -= ch in "}]" and 1 or 0
        if ch == " " and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + ([cur] if cur else [])


def pin_teacher(tc: dict, data: dict, seed: int, work: Path) -> dict:
    """The teacher `tc` of this seed trained once (shared by every variant that trains the same teacher
    on the same data) and pinned as `checkpoint`: the weights `use` names (last, best, epoch N)."""
    if tc.get("checkpoint"):
        return tc
    trained = {k: v for k, v in tc.items() if k not in ("use", "calibrate")}
    data_spec = {k: v for k, v in (data.get("data") or {}).items() if k != "transfer"}
    key = hashlib.sha1(json.dumps([trained, data_spec], sort_keys=True).encode()).hexdigest()[:10]
    folder = work / f"teacher_{key}_seed{seed}"
    files = folder / "checkpoints" / "teacher"
    if not (files / "final.safetensors").exists():
        epochs = int((trained.get("train") or {}).get("epochs", 30))
        train = {**(trained.get("train") or {}), "keep_epochs": list(range(1, epochs + 1)), "progress": "off"}
        sub = {k: v for k, v in data.items() if k not in ("teacher", "teachers", "ensemble")}
        sub.update(teacher={**trained, "train": train}, baselines=[], seed=seed)
        sub["trainer"] = {**data.get("trainer", {}), "max_steps": 1, "mix": {"name": "none"}}
        sub["data"] = {**data.get("data", {}), "transfer": None}
        run_recipe(parse_recipe(sub, source="teacher"), folder, overwrite=True)
    use = tc.get("use", "last")
    name = "final" if use == "last" else "best" if use == "best" else f"epoch{use}"
    return {**tc, "checkpoint": str(files / f"{name}.safetensors"), "use": "last"}


def run_variant(
    recipe: Path, name: str, overrides: list[str], seeds: int, work: Path, base: list[str]
) -> dict:
    summaries = []
    for seed in range(seeds):
        data = apply_overrides(load_yaml(recipe), [*base, *overrides, f"seed={seed}", "trainer.progress=off"])
        if data.get("teachers"):
            data["teachers"] = [pin_teacher(tc, data, seed, work) for tc in data["teachers"]]
        elif "teacher" in data:
            data["teacher"] = pin_teacher(data["teacher"], data, seed, work)
        cfg = parse_recipe(data, source=name)
        out = work / recipe.stem / name / f"seed{seed}"
        t0 = time.perf_counter()
        summary = run_recipe(cfg, out, overwrite=True)
        rows = {r["name"]: r for r in summary["rows"]}
        print(
            f"{name} seed {seed}: "
            + "  ".join(f"{n} {r.get('accuracy', float('nan')):.4f}" for n, r in rows.items())
            + f"  ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        summaries.append(summary)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    v = verdict(summaries)
    return {"overrides": overrides, "summaries": summaries, "verdict": v}


def table(results: dict) -> str:
    """Markdown: accuracy (mean ± std over seeds, in %) of each row, and the verdict's paired gains."""
    lines = [
        "| variant | teacher | scratch twin | distilled | paired gain vs twin (points) | 95% interval "
        "| seeds better | scratch without mixing | gain vs it (95% interval) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():

        def acc(row, res=res):
            vals = []
            for s in res["summaries"]:
                r = next((r for r in s["rows"] if r["name"] == row), None)
                if r is None:
                    return None
                vals.append(100 * r["accuracy"])
            return vals

        def ms(v):
            return "—" if v is None else f"{statistics.fmean(v):.2f} ± {statistics.pstdev(v):.2f}"

        def ci(r):
            lo, hi = r["ci95"]
            return f"{100 * lo:+.2f} to {100 * hi:+.2f}" if lo is not None else "—"

        rows = res["verdict"]["rows"]
        v = rows["student_kd"]
        u = rows.get("student_kd vs student_scratch_unmixed")
        unmixed = f"{100 * u['mean']:+.2f} ({ci(u)})" if u else "—"
        lines.append(
            f"| {name} | {ms(acc('teacher'))} | {ms(acc('student_scratch'))} | {ms(acc('student_kd'))} "
            f"| {100 * v['mean']:+.2f} | {ci(v)} | {v['seeds_better']}/{len(v['gains'])} "
            f"| {ms(acc('student_scratch_unmixed'))} | {unmixed} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", type=Path)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--variant", action="append", default=[], help="name=override override ...")
    p.add_argument("--base", default="", help="overrides for every variant and the teachers")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/distill_gain"))
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/gain_<recipe>.json")
    p.add_argument("--table", action="store_true", help="print the saved table only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.json or ROOT / "benchmarks" / "results" / f"gain_{args.recipe.stem}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if not args.table:
        base = split_overrides(args.base)
        work = args.work
        for spec in args.variant or ["recipe="]:
            name, _, rest = spec.partition("=")
            res = run_variant(args.recipe, name, split_overrides(rest), args.seeds, work, base)
            res["base"] = base
            res["command"] = (
                f"python benchmarks/distill_gain.py {args.recipe} --seeds {args.seeds}"
                + (f" --base '{args.base}'" if args.base else "")
                + f" --variant '{spec}'"
            )
            saved[name] = res
            print(res["verdict"]["line"], *res["verdict"]["reasons"], sep="\n  ", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(saved, indent=1))
    print(table(saved))


if __name__ == "__main__":
    main()
