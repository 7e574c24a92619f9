"""Progress of a run on stderr: what :func:`bnlab.train.fit` shows by
default and what ``bnlab train`` / ``bnlab reproduce`` show."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A rich progress bar on a terminal; otherwise a plain line per
    evaluation (and per 10 % of the run).

    One object serves ``bnlab train`` (``__call__`` with fit's progress
    dict) and ``bnlab reproduce`` (``experiment`` for the outer level and
    ``steps`` for the training inside it). Shows steps/s measured after
    compilation, the ETA, the last records' train loss and accuracy; a
    dict with an ``event`` (compiling, resumed from step N) is a line above
    the bar.
    """

    def __init__(self, stream=None, label: str = "train", total_experiments: int = 0):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.label = label
        self.last_decile = -1
        self.last_draw = 0.0
        self._bar = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream),
            )
            self._outer = None
            if total_experiments:
                self._outer = self._bar.add_task(
                    "experiments", total=total_experiments, info=""
                )
            self._task = self._bar.add_task(label, total=None, info="compiling...")
            self._bar.start()

    @staticmethod
    def _info(p: dict[str, Any]) -> str:
        parts = []
        if p.get("rate"):
            parts.append(f"{p['rate']:.0f} steps/s")
        if p.get("eta") is not None:
            parts.append(f"ETA {time.strftime('%M:%S', time.gmtime(p['eta']))}")
        if p.get("train_loss") is not None:
            parts.append(f"loss {p['train_loss']:.4f}")
        for key, short in (("val_accuracy", "val acc"), ("test_accuracy", "test acc")):
            if p.get(key) is not None:
                parts.append(f"{short} {p[key]:.3f}")
        return "  ".join(parts)

    def __call__(self, p: dict[str, Any]) -> None:
        """fit's ``on_progress``."""
        if p.get("event"):
            self.line(f"{p.get('label', self.label)}: {p['event']}")
            return
        done, total = p["step"], p["total"]
        now = time.monotonic()
        if self._bar is not None:
            if now - self.last_draw > 0.1 or done == total:
                self._bar.update(
                    self._task,
                    completed=done,
                    total=total,
                    info=self._info(p),
                    description=p.get("label", self.label),
                )
                self.last_draw = now
        elif p.get("evaluated") or int(done / total * 10) > self.last_decile:
            self.last_decile = int(done / total * 10)
            print(
                f"{p.get('label', self.label)} step {done}/{total} {self._info(p)}",
                file=self.stream,
                flush=True,
            )

    def experiment(self, name: str, done: int) -> None:
        """The outer level of ``bnlab reproduce``: experiment ``done + 1``."""
        self.last_decile = -1
        if self._bar is not None and self._outer is not None:
            self._bar.update(
                self._outer, completed=done, description=f"experiments ({name})"
            )

    def line(self, text: str) -> None:
        """A message above the bar (stderr)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
