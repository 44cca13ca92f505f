"""`distill demo` and `distill run RECIPE`: the teacher, the scratch twin and the distilled student."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.cli import add_folder_options
from distill.errors import DistillError


def _add_run_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of recipe keys, e.g. trainer.epochs=5 data.batch_size=128",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run N seeds (seed, seed+1, ...) and report mean ± std (default 1)",
    )
    add_folder_options(p, default_out)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="distil on bundled digits data and print the comparison table",
        description="Trains a CNN teacher on scikit-learn's digits (offline), then the same MLP "
        "student twice with one seed and budget: from labels alone and distilled. "
        "Prints params, size, CPU latency, test accuracy and agreement with the "
        "teacher; writes config.yaml, metrics.jsonl, checkpoints, report.md and "
        "summary.json to the run folder. The recipe is recipes/digits.yaml.",
    )
    _add_run_options(p, "runs/demo (or runs/demo-N if taken)")

    p = sub.add_parser(
        "run",
        help="run a recipe (YAML) with optional dotted overrides",
        description="Runs RECIPE: trains (or loads) the teacher, the baseline students and the "
        "distilled student, measures them and writes the run folder.",
    )
    p.add_argument("recipe", help="path to a recipe YAML file")
    _add_run_options(p, "runs/<recipe name>")


def main(args) -> int:
    return cmd_run(args, None if args.command == "demo" else args.recipe)


def _default_out(name: str, auto_increment: bool) -> Path:
    out = Path("runs") / name
    if not auto_increment:
        return out
    k = 1
    while out.exists() and (not out.is_dir() or any(out.iterdir())):
        out = Path("runs") / f"{name}-{k}"
        k += 1
    return out


def print_summary(summary: dict, out: Path) -> None:
    from distill.engine import distributed as dist

    if not dist.is_main():  # under torchrun, rank 0 reports
        return
    from distill.run.report import table

    print(table(summary["rows"]))
    v = summary.get("verdict")
    if v:
        print(f"\n{v['line']}")
        for reason in v["reasons"]:
            print(f"  - {reason}")
    print(f"\nrun folder: {out}  (report.md, summary.json, checkpoints/)")


def cmd_run(args, recipe_path: str | None) -> int:
    from distill.run.config import RecipeConfig, apply_overrides, load_yaml, parse_recipe, require_sections
    from distill.run.pipeline import run_seeds

    if args.seeds < 1:
        raise DistillError(f"--seeds must be at least 1, got {args.seeds}")
    if recipe_path is None:
        data = apply_overrides(RecipeConfig().model_dump(mode="json"), args.overrides)
        cfg = parse_recipe(data, source="demo")
    else:
        data = apply_overrides(load_yaml(recipe_path), args.overrides)
        require_sections(data, recipe_path)
        cfg = parse_recipe(data, source=recipe_path)
    if args.out:
        out = Path(args.out)
    else:
        out = _default_out(
            "demo" if recipe_path is None else cfg.name,
            auto_increment=recipe_path is None and not args.resume,
        )
    summary = run_seeds(
        cfg,
        out,
        args.seeds,
        resume=args.resume,
        overwrite=args.overwrite,
        command="demo" if recipe_path is None else "run",
    )
    print_summary(summary, out)
    return 0
