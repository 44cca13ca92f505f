"""Progress: a live bar on terminals; plain lines elsewhere (CI logs, pipes, `> run.log`).

A run redirected to a file used to print nothing until its final table. Off a terminal each stage
now writes one line per epoch (its validation metrics), and one per `every_s` seconds inside a
long epoch, so a log shows where the run is and how fast it goes.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from distill.engine import distributed as dist

_SHOWN = ("loss", "accuracy", "agreement", "map", "perplexity", "cosine")


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k in _SHOWN)


class ProgressBar:
    """`enabled`: "auto" (a bar on a terminal, lines otherwise), "on" (always the bar) or "off"."""

    def __init__(self, label: str, total: int, enabled: str = "auto", done: int = 0, every_s: float = 30.0):
        tty = sys.stderr.isatty()
        mode = {"auto": "bar" if tty else "lines", "on": "bar", "off": None}[enabled]
        self.mode = mode if dist.is_main() else None
        self.label, self.total, self.done = label, total, done
        self.every_s = every_s
        self._progress = None
        self._task = None
        self._t0 = self._last = time.perf_counter()
        self._loss: float | None = None

    def __enter__(self):
        if self.mode == "bar":
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
        self._t0 = self._last = time.perf_counter()
        return self

    def _line(self, text: str) -> None:
        self._last = time.perf_counter()
        elapsed = self._last - self._t0
        print(f"{self.label}: {text} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    def advance(self, loss: float | None = None) -> None:
        """One optimizer step; `loss`, when given, is the latest logged training loss."""
        self.done += 1
        if loss is not None:
            self._loss = loss
        if self._progress is not None:
            self._progress.advance(self._task)
        elif self.mode == "lines" and time.perf_counter() - self._last >= self.every_s:
            loss_txt = f", loss={self._loss:.4f}" if self._loss is not None else ""
            self._line(f"step {self.done}/{self.total}{loss_txt}")

    def note(self, metrics: dict[str, Any], epoch: int | None = None, epochs: int | None = None) -> None:
        """After an epoch: the bar shows the metrics; off a terminal, one line with them."""
        if self._progress is not None:
            self._progress.update(self._task, info=_metrics(metrics))
        elif self.mode == "lines":
            where = f"epoch {epoch}/{epochs}, " if epoch is not None else ""
            fresh = epoch is None or metrics.get("epoch") == epoch  # evaluated this epoch
            train = {"loss": self._loss} if self._loss is not None else {}
            shown = _metrics({**train, **(metrics if fresh else {})})
            self._line(f"{where}step {self.done}/{self.total}" + (f", {shown}" if shown else ""))

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
