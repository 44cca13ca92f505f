"""`distill tune RECIPE.yaml --trials N`: an Optuna study over a recipe's `search:` block."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill.errors import DistillError

DESCRIPTION = """Searches the recipe's `search:` space with Optuna. Each trial is a normal run in
OUT/trials/<number>/ distilling from one teacher trained once (OUT/teacher.safetensors). The study is
stored in SQLite (OUT/study.db): running the same command again continues it up to --trials finished
trials (interrupted trials resume from their last checkpoint), and several processes may run it at once.
A trial whose process died on this machine is resumed at once; a trial of another machine (a study on
shared storage) is taken for dead when its heartbeat is older than the grace period: 120 s (heartbeat
every 30 s), set by the environment variable DISTILL_TUNE_GRACE_S (seconds, at least 2; the heartbeat
is then a quarter of it).
Writes OUT/report.md, OUT/summary.json (one row per trial), history.png (pareto.png with two objectives)
and OUT/best_recipe.yaml, runnable with `distill run`."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="Optuna search over a recipe's search: block (SQLite study, resumable, Pareto plot)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="a recipe YAML file with search: (and optionally tune:) blocks")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. tune.seed=1 trainer.epochs=5",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help="finished trials the study should hold (default tune.trials, 20)",
    )
    p.add_argument("--out", default=None, help="study folder (default runs/tune-<recipe name>)")
    p.add_argument("--study-name", default=None, help="default tune.study_name or the recipe's name")
    p.add_argument("--storage", default=None, help="an Optuna storage URL (default sqlite:///OUT/study.db)")
    return p


def main(args) -> int:
    from distill.tune import load_tune_recipe, run_tune

    try:
        if args.trials is not None and args.trials < 1:
            raise DistillError(f"--trials must be at least 1, got {args.trials}")
        cfg = load_tune_recipe(args.recipe, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"tune-{cfg.name}"
        summary = run_tune(cfg, out, args.trials, args.study_name, args.storage)
    except DistillError as e:
        print(f"distill tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill tune: interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130
    print((out / "report.md").read_text())
    print(f"study folder: {out}  ({summary['counts']}; best recipe: {out / 'best_recipe.yaml'})")
    return 0


if __name__ == "__main__":  # python -m distill.cli.tune RECIPE ... until `distill tune` is wired in
    parser = argparse.ArgumentParser(prog="distill")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    sys.exit(main(parser.parse_args(["tune", *sys.argv[1:]])))
