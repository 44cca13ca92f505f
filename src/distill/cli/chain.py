"""`distill chain RECIPE.yaml`: teacher -> assistant(s) -> student, or born-again generations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.cli import add_folder_options
from distill.errors import DistillError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chain",
        help="train a chain of stages: teacher -> assistant(s) -> student, or born-again generations",
        description="Trains the recipe's teacher, then each of its `assistants:` and the student (or "
        "`generations:` of the student), each distilled from the stage before, each in its own folder "
        "under <out>/stages/ and resumable. Writes summary.json (one row per stage) and report.md.",
    )
    p.add_argument("recipe", help="a recipe YAML with optional assistants: and generations:")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of recipe keys")
    add_folder_options(p, "runs/<recipe name>", "continue an interrupted chain in --out")
    return p


def main(args) -> int:
    from distill.chain import load_chain_recipe, run_chain
    from distill.run.report import table

    try:
        cfg = load_chain_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        summary = run_chain(cfg, out, resume=args.resume, overwrite=args.overwrite)
    except DistillError as e:
        print(f"distill chain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill chain: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(table(summary["rows"]))
    print(f"\nrun folder: {out}  (stages/, report.md, summary.json)")
    return 0


if __name__ == "__main__":  # python -m distill.cli.chain RECIPE.yaml
    parser = argparse.ArgumentParser(prog="distill")
    add_parser(parser.add_subparsers(dest="command"))
    sys.exit(main(parser.parse_args(["chain", *sys.argv[1:]])))
