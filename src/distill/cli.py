"""The `distill` command line."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from distill.errors import DistillError

PLUGINS = [
    "distill.cli_cache",
    "distill.cli_teachers",
    "distill.cli_chain",
    "distill.cli_compress",
    "distill.cli_tune",
    "distill.cli_federated",
]
PLUGINS = [m for m in PLUGINS if importlib.util.find_spec(m) is not None]

EPILOG = """examples:
  distill demo                                  teacher -> student on bundled digits, with a report
  distill demo --seeds 3                        the same, mean and spread over 3 seeds
  distill run recipes/digits.yaml trainer.epochs=10 objective.terms.kd.init_args.temperature=2
  distill eval runs/digits                      score the run's distilled student on the test split
  distill report runs/digits                    rebuild report.md and plots from a finished run
  distill tune recipes/tune_digits.yaml --trials 20   Optuna search over temperature, weights, lr, ...
  distill cache-teacher recipes/digits.yaml      run the teacher once, reuse its outputs for every student
  distill federated recipes/federated_digits.yaml --seeds 3   FedAvg vs FedDF vs FedMD on Flower
  distill compress recipes/compress_digits.yaml  prune -> distil -> INT8 -> export, one row per stage
"""


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
    p.add_argument("--out", default=None, help=f"run folder (default {default_out})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Knowledge distillation for PyTorch: train a small student from a large teacher and "
        "measure the trade (accuracy kept; parameters, bytes and milliseconds saved).",
    )
    from distill import __version__

    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a recipe's data",
        description="Evaluates a checkpoint (default: the run's distilled student) on the "
        "test split of the run's recipe: accuracy, NLL and agreement with the "
        "run's teacher. Prints JSON.",
    )
    p.add_argument("target", help="a run folder (holding config.yaml) or a recipe YAML file")
    p.add_argument("--checkpoint", help="weights to score (.safetensors, or a weights-only torch file)")
    p.add_argument(
        "--model",
        choices=["student", "teacher"],
        default="student",
        help="which architecture of the recipe the checkpoint is (default student)",
    )
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys")

    p = sub.add_parser(
        "report",
        help="rebuild report.md and plots from a finished run folder",
        description="Rebuilds report.md, learning_curves.png and tradeoff.png from the run "
        "folder's summary.json and metrics.jsonl, and prints the table.",
    )
    p.add_argument("run_dir", help="a finished run folder")

    # Commands that live in their own modules (each imports its optional extra only when run).
    for module_name in PLUGINS:
        module = importlib.import_module(module_name)
        before = set(sub.choices)
        module.add_parser(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(_plugin_main=module.main)
    return parser


def _default_out(name: str, auto_increment: bool) -> Path:
    out = Path("runs") / name
    if not auto_increment:
        return out
    k = 1
    while out.exists() and any(out.iterdir()):
        out = Path("runs") / f"{name}-{k}"
        k += 1
    return out


def _print_summary(summary: dict, out: Path) -> None:
    from distill import distributed as dist

    if not dist.is_main():  # under torchrun, rank 0 reports
        return
    from distill.report import table

    print(table(summary["rows"]))
    print(f"\nrun folder: {out}  (report.md, summary.json, checkpoints/)")


def cmd_run(args, recipe_path: str | None) -> int:
    from distill.config import RecipeConfig, apply_overrides, load_yaml, parse_recipe
    from distill.pipeline import run_seeds

    if args.seeds < 1:
        raise DistillError(f"--seeds must be at least 1, got {args.seeds}")
    if recipe_path is None:
        data = apply_overrides(RecipeConfig().model_dump(mode="json"), args.overrides)
        cfg = parse_recipe(data, source="demo")
    else:
        data = apply_overrides(load_yaml(recipe_path), args.overrides)
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
    _print_summary(summary, out)
    return 0


def cmd_eval(args) -> int:
    from distill.config import apply_overrides, load_yaml, parse_recipe
    from distill.pipeline import evaluate_checkpoint

    target = Path(args.target)
    run_dir = target if target.is_dir() else None
    recipe = target / "config.yaml" if run_dir else target
    if run_dir and not recipe.exists():
        raise DistillError(f"{target} has no config.yaml: give a run folder or a recipe file")
    cfg = parse_recipe(apply_overrides(load_yaml(recipe), args.overrides), source=str(recipe))
    metrics = evaluate_checkpoint(cfg, run_dir, args.checkpoint, args.model, args.split)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_report(args) -> int:
    from distill.report import write_report

    run_dir = Path(args.run_dir)
    path = write_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    _print_summary(summary, run_dir)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options: collect stray key=value words as overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if "=" not in w or w.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            return cmd_run(args, None)
        if args.command == "run":
            return cmd_run(args, args.recipe)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "report":
            return cmd_report(args)
        if getattr(args, "_plugin_main", None) is not None:
            return args._plugin_main(args)
    except DistillError as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
