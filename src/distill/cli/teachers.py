"""`distill teachers RECIPE.yaml`: compare candidate teachers before distilling (wired into `distill.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.cli import add_folder_options
from distill.errors import DistillError

DESCRIPTION = (
    "Trains or loads each teacher listed under `candidates:` and the recipe's student from labels alone, "
    "then scores every candidate on the validation split: accuracy, NLL, expected calibration error "
    "(15 bins, reliability plot) before and after temperature scaling, size, CPU latency and the capacity "
    "gap to the student. Warns when a candidate is no better than the scratch student, badly calibrated, "
    "or far larger than the student. Writes summary.json (one row per candidate), report.md and "
    "reliability.png."
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "teachers", help="compare candidate teachers before distilling", description=DESCRIPTION
    )
    p.add_argument("recipe", help="a recipe YAML with a candidates: list of teacher specs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys")
    add_folder_options(p, "runs/<recipe name>-teachers")
    return p


def main(args) -> int:
    from distill.teacher_choice import load_teachers_recipe, run_teachers

    try:
        cfg = load_teachers_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-teachers"
        summary = run_teachers(cfg, out, resume=args.resume, overwrite=args.overwrite)
    except DistillError as e:
        print(f"distill teachers: error: {e}", file=sys.stderr)
        return 2
    s = summary["student"]
    print(f"scratch student: accuracy {s['accuracy']:.4f}, params {s['params']:,}")
    for r in summary["rows"]:
        print(
            f"{r['name']}: accuracy {r['accuracy']:.4f}  nll {r['nll']:.4f}  ece {r['ece']:.4f}  "
            f"params {r['params']:,} ({r['param_ratio']:.1f}x)"
        )
        for w in r["warnings"]:
            print(f"  warning: {w}")
    print(f"\nrun folder: {out}  (report.md, reliability.png, summary.json)")
    return 0


if __name__ == "__main__":  # python -m distill.cli.teachers RECIPE.yaml
    parser = argparse.ArgumentParser(prog="distill")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    sys.exit(main(parser.parse_args(["teachers", *sys.argv[1:]])))
