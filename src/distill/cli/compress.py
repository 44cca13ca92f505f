"""`distill compress RECIPE.yaml`: prune -> recover by distillation -> INT8 -> export, one table.

Wired into `distill.cli` with `add_parser(subparsers)` and `main(args)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.cli import add_folder_options
from distill.errors import DistillError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress",
        help="prune, recover by distillation, quantize to INT8 and export; one row per stage",
        description="Runs the compression stages of RECIPE (its compress: section): the baseline "
        "(the recipe's teacher), structured pruning (Torch-Pruning), recovery by distillation from "
        "the unpruned model and by fine-tuning with the same budget, a same-size student distilled "
        "from scratch, ONNX Runtime INT8 (static QDQ for CNNs, dynamic for transformers) and "
        "export (ONNX + safetensors). Every stage is resumable; report.md, tradeoff.png and "
        "summary.json hold one row per model.",
    )
    p.add_argument("recipe", help="a compression recipe YAML file (e.g. recipes/compress_digits.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. compress.prune.ratio=0.3"
    )
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="run N seeds and report mean ± std")
    add_folder_options(p, "runs/<recipe name>", "continue (or redo changed later stages of) a run in --out")
    return p


def run(args) -> int:
    from distill.compress.config import load_compress_recipe
    from distill.compress.pipeline import run_compress_seeds

    if args.seeds < 1:
        raise DistillError(f"--seeds must be at least 1, got {args.seeds}")
    cfg = load_compress_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    summary = run_compress_seeds(cfg, out, args.seeds, resume=args.resume, overwrite=args.overwrite)
    from distill.compress.report import _columns
    from distill.run.report import table

    print(table(summary["rows"], _columns(summary["rows"])))
    print(f"\nrun folder: {out}  (report.md, tradeoff.png, summary.json, export/)")
    return 0


def main(args) -> int:
    """Runs the subcommand; a DistillError is printed as one line (exit 2)."""
    try:
        return run(args)
    except DistillError as e:
        print(f"distill compress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill compress: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m distill.cli.compress RECIPE ...
    parser = argparse.ArgumentParser(prog="distill")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    sys.exit(main(parser.parse_args(["compress", *sys.argv[1:]])))
