"""`distill federated RECIPE.yaml`: FedAvg vs federated distillation (FedDF, FedMD) on Flower.

Wired into `distill.cli` with `add_parser(subparsers)` and `main(args)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distill.cli import add_folder_options
from distill.errors import DistillError

DESCRIPTION = (
    "Simulates federated training on Flower (ServerApp + ClientApp; in-process by default, or "
    "Flower's Ray simulation with backend=ray): every strategy of the recipe (fedavg, feddf, fedmd) "
    "on the same client split. Writes accuracy per round, bytes sent per round, the final global "
    "(fedavg, feddf) and client (fedmd) models as safetensors, summary.json and report.md."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "federated", help="FedAvg vs federated distillation (FedDF, FedMD) on Flower", description=DESCRIPTION
    )
    p.add_argument("recipe", help="a federated recipe YAML, e.g. recipes/federated_digits.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. rounds=5 partition.alpha=0.1",
    )
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="run N seeds and report mean ± std")
    add_folder_options(
        p,
        "runs/<recipe name>",
        "rerun into a folder holding the same recipe (strategies restart from round 0)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")


def main(args) -> int:
    try:
        return _run(args)
    except DistillError as e:
        print(f"distill federated: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from distill.federated.config import parse_federated
    from distill.run.config import apply_overrides, load_yaml

    if args.seeds < 1:
        raise DistillError(f"--seeds must be at least 1, got {args.seeds}")
    recipe = parse_federated(apply_overrides(load_yaml(args.recipe), args.overrides), source=args.recipe)
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DistillError(
            "distill federated needs Flower: pip install 'distill[federated]' (flwr)"
        ) from None
    from distill.federated.simulation import REPORT_COLUMNS, run_federated
    from distill.run.report import table

    out = Path(args.out) if args.out else Path("runs") / recipe.name
    summary = run_federated(
        recipe, out, seeds=args.seeds, resume=args.resume, overwrite=args.overwrite, verbose=args.verbose
    )
    print(table(summary["rows"], columns=REPORT_COLUMNS))
    print(f"\nrun folder: {out}  (report.md, summary.json, checkpoints/)")
    return 0


if __name__ == "__main__":  # python -m distill.cli.federated RECIPE.yaml (before it is wired into distill)
    import argparse

    parser = argparse.ArgumentParser(prog="distill")
    add_parser(parser.add_subparsers(dest="command"))
    sys.exit(main(parser.parse_args()))
