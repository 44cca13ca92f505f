"""The `distill` command line: `main` and the parser; one module per command beside it.

May import everything below it; at start it imports only `distill.errors`, and each command module
imports its workflow when chosen, so `distill --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distill.errors import DistillError

# One module per command group, each with `add_parser(subparsers)` and `main(args)`; a module's heavy
# imports (torch, its workflow, optional extras) happen inside `main`, so `distill --help` stays fast.
COMMANDS = [
    "run", "check", "eval", "report", "cache", "teachers", "chain", "compress", "tune", "federated", "chat",
]  # fmt: skip


def add_folder_options(
    p, default_out: str, resume_help: str = "continue an interrupted run in --out"
) -> None:
    """`--out`, and `--resume` / `--overwrite` (one or the other) for a command that writes a run folder."""
    p.add_argument("--out", default=None, help=f"run folder (default {default_out})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help=resume_help)
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")


EPILOG = """examples:
  distill demo                                  teacher -> student on bundled digits, with a report
  distill demo --seeds 3                        the same, mean and spread over 3 seeds
  distill run recipes/digits.yaml trainer.epochs=10 objective.terms.kd.init_args.temperature=2
  distill check recipes/digits.yaml             build everything and run one batch, no training (seconds)
  distill eval runs/digits                      score the run's distilled student on the test split
  distill report runs/digits                    rebuild report.md and plots from a finished run
  distill tune recipes/tune_digits.yaml --trials 20   Optuna search over temperature, weights, lr, ...
  distill cache-teacher recipes/digits.yaml      run the teacher once, reuse its outputs for every student
  distill federated recipes/federated_digits.yaml --seeds 3   FedAvg vs FedDF vs FedMD on Flower
  distill compress recipes/compress_digits.yaml  prune -> distil -> INT8 -> export, one row per stage
  distill chat runs/chat --teacher              talk to a distilled chat model, its teacher beside it
"""


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

    for name in COMMANDS:
        module = importlib.import_module(f"distill.cli.{name}")
        before = set(sub.choices)
        module.add_parser(sub)
        for command in set(sub.choices) - before:
            sub.choices[command].set_defaults(_main=module.main)
    return parser


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
        return args._main(args)
    except DistillError as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
