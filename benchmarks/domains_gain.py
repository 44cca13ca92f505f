"""Does distillation pay beside classification? Detection and speech, paired seeds, `distill run --seeds`.

For each domain, its transfer recipe runs through the pipeline's `run_seeds` (what `distill run
RECIPE --seeds N` calls): the teacher trains once (`teacher.seeds: first`), and each seed trains
the scratch twin and the student distilled with the transfer set (`data.transfer`). A second
`run_seeds` distils each seed's student from that same teacher without the transfer set
(`data.transfer=null`; no scratch stage: the twin is the first run's, same seed and steps). Every
student row has the same `trainer.max_steps`.

    python benchmarks/domains_gain.py --domain speech --seeds 3

Writes benchmarks/results/domains_gain.json (merged by domain): `rows` of
`{domain, method: scratch|kd|kd_transfer, seed, metric, value, train_seconds}`, the paired verdict of
each distilled method over the scratch twin (`distill.run.verdict`), the teacher's validation curve
and its test metric. `train_seconds` is the row's training loop on this machine, read from the
logged throughput (steps x batch / samples per second; evaluation not included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distill.run.config import apply_overrides, load_yaml, parse_recipe
from distill.run.pipeline import run_seeds, teacher_of_first_seed
from distill.run.verdict import verdict

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {
    "speech": ("recipes/speech_digits_transfer.yaml", "accuracy"),
    "detection": ("recipes/detect_shapes_transfer.yaml", "map"),
}
STAGES = {"scratch": "student_scratch", "kd": "student_kd", "kd_transfer": "student_kd"}


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def train_seconds(run: Path, stage: str, batch_size: int) -> float:
    """The stage's training-loop seconds: each logged window's steps x batch / its samples per second."""
    train = [r for r in records(run) if r.get("stage") == stage and r.get("split") == "train"]
    total, last = 0.0, 0
    for r in train:
        if r.get("samples_per_s"):
            total += (r["step"] - last) * batch_size / r["samples_per_s"]
        last = r["step"]
    return round(total, 1)


def teacher_curve(run: Path, metric: str) -> list[dict]:
    """The teacher's validation metric after each epoch (the first seed trained it)."""
    return [
        {"epoch": r["epoch"], metric: r[metric]}
        for r in records(run)
        if r.get("stage") == "teacher" and r.get("split") == "val" and metric in r
    ]


def run_domain(
    domain: str, seeds: int, work: Path, overrides: list[str], resume: bool = False, only: str | None = None
) -> dict:
    recipe, metric = DOMAINS[domain]
    # one pseudo-label file for every seed: they share the teacher, so it is labelled once
    store = f"data.pseudo_labels.store={work.resolve() / domain / 'pseudo_labels.safetensors'}"
    base = apply_overrides(load_yaml(ROOT / recipe), [store, *overrides, "trainer.progress=off"])
    cfg_t = parse_recipe(base, source=recipe)
    runs = {"kd_transfer": work / domain / "kd_transfer", "kd": work / domain / "kd"}

    def folder(run: Path, seed: int) -> Path:  # `run_seeds` writes one seed into the run folder itself
        return run / f"seed{seed}" if seeds > 1 else run

    first = folder(runs["kd_transfer"], cfg_t.seed)
    keep = {"resume": resume, "overwrite": not resume}  # resume: finished stages are reused
    wall = {}
    if only in (None, "kd_transfer"):
        t0 = time.perf_counter()
        run_seeds(cfg_t, runs["kd_transfer"], seeds, **keep)
        wall["kd_transfer_run"] = round(time.perf_counter() - t0, 1)
    if only in (None, "kd"):
        # the same teacher, the same steps, no transfer set; the scratch twin is the first run's
        cfg_k = parse_recipe(apply_overrides(base, ["data.transfer=null", "baselines=[]"]), source=recipe)
        t0 = time.perf_counter()
        run_seeds(teacher_of_first_seed(cfg_k, first), runs["kd"], seeds, **keep)
        wall["kd_run"] = round(time.perf_counter() - t0, 1)

    # the table, from every run folder that holds all the seeds (--only: the other may be missing)
    seed_list = [cfg_t.seed + k for k in range(seeds)]
    methods = {"scratch": runs["kd_transfer"], **runs}
    methods = {
        m: run
        for m, run in methods.items()
        if all((folder(run, s) / "summary.json").exists() for s in seed_list)
    }
    rows, per_seed = [], {m: [] for m in methods if m != "scratch"}
    for seed in seed_list:
        found = {}
        for method, run in methods.items():
            summary = json.loads((folder(run, seed) / "summary.json").read_text())
            found[method] = next(r for r in summary["rows"] if r["name"] == STAGES[method])
            rows.append(
                {
                    "domain": domain,
                    "method": method,
                    "seed": seed,
                    "metric": metric,
                    "value": found[method][metric],
                    "train_seconds": train_seconds(folder(run, seed), STAGES[method], cfg_t.data.batch_size),
                }
            )
        for method in per_seed:  # the verdict's input: one summary per seed, the twin beside the row
            if "scratch" in found:
                per_seed[method].append({"rows": [found["scratch"], {**found[method], "name": "student_kd"}]})
    teacher_row = next(
        r for r in json.loads((first / "summary.json").read_text())["rows"] if r["name"] == "teacher"
    )
    return {
        "recipe": recipe,
        "seeds": seeds,
        "overrides": overrides,
        "command": f"python benchmarks/domains_gain.py --domain {domain} --seeds {seeds}"
        + "".join(f" '{o}'" for o in overrides),
        "not_run": sorted({"scratch", "kd", "kd_transfer"} - set(methods)),
        "teacher": {
            metric: teacher_row[metric],
            "params": teacher_row.get("params"),
            "val_curve": teacher_curve(first, metric),
        },
        "verdicts": {m: verdict(s) for m, s in per_seed.items() if s},
        "wall_seconds": wall,
        "rows": rows,
    }


def table(saved: dict) -> str:
    lines = ["| domain | method | mean | per seed | train s (mean) | paired gain over scratch [95% CI] |"]
    lines.append("|---|---|---:|---|---:|---|")
    for domain, res in saved.items():
        for method in ("scratch", "kd", "kd_transfer"):
            got = [r for r in res["rows"] if r["method"] == method]
            if not got:
                lines.append(f"| {domain} | {method} | not run | | | |")
                continue
            vals = [r["value"] for r in got]
            secs = sum(r["train_seconds"] for r in got) / len(got)
            v = res["verdicts"].get(method)
            gain = ""
            if v:
                row = v["rows"]["student_kd"]
                lo, hi = row["ci95"]
                gain = f"{row['mean']:+.4f}" + (f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None else "")
            lines.append(
                f"| {domain} | {method} | {sum(vals) / len(vals):.4f} | "
                f"{', '.join(f'{x:.4f}' for x in vals)} | {secs:.0f} | {gain} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", choices=sorted(DOMAINS), action="append", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides for every run (tiny settings)")
    p.add_argument("--work", type=Path, default=Path("runs/domains_gain"))
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "domains_gain.json")
    p.add_argument("--resume", action="store_true", help="reuse the stages a former run of --work finished")
    p.add_argument(
        "--only",
        choices=("kd_transfer", "kd", "none"),
        help="run one of the two runs only (kd needs the kd_transfer run's first seed: its teacher), or "
        "none; the table holds the methods whose runs in --work have every seed",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    saved: dict = {}
    for domain in args.domain:
        result = run_domain(domain, args.seeds, args.work, args.overrides, args.resume, args.only)
        # read just before writing: another domain's run may have written the file meanwhile
        saved = json.loads(args.json.read_text()) if args.json.exists() else {}
        saved[domain] = result
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(saved, indent=1))
    print(table(saved))


if __name__ == "__main__":
    main()
