"""`distill report RUN`: rebuild report.md and plots from a finished run folder."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild report.md and plots from a finished run folder",
        description="Rebuilds report.md, learning_curves.png and tradeoff.png from the run "
        "folder's summary.json and metrics.jsonl, and prints the table.",
    )
    p.add_argument("run_dir", help="a finished run folder")


def main(args) -> int:
    from distill.cli.run import print_summary
    from distill.run.report import write_report

    run_dir = Path(args.run_dir)
    path = write_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    print_summary(summary, run_dir)
    print(f"wrote {path}")
    return 0
