"""A progress bar on terminals, silence elsewhere (CI logs, pipes)."""

from __future__ import annotations

import sys
from typing import Any

from distill.engine import distributed as dist


class ProgressBar:
    def __init__(self, label: str, total: int, enabled: str = "auto", done: int = 0):
        on = sys.stderr.isatty() if enabled == "auto" else enabled == "on"
        self.on = on and dist.is_main()
        self.label, self.total, self.done = label, total, done
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.on:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, completed=self.done, info="")
        return self

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def note(self, metrics: dict[str, Any]) -> None:
        if self._progress is not None:
            info = " ".join(
                f"{k}={v:.4f}"
                for k, v in metrics.items()
                if isinstance(v, float) and k in ("accuracy", "agreement", "loss", "map", "perplexity")
            )
            self._progress.update(self._task, info=info)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
