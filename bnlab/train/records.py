"""``metrics.jsonl``: one record per evaluation and arm, appended as
evaluations finish; records a restart drops are kept aside."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnlab.train.rundir import (
    METRICS_FILE,
    RunLock,
    append_record,
    read_records,
    rewrite_records,
)


class Records:
    """``metrics.jsonl`` of a run: records appended as evaluations finish,
    the run directory's identity checked before every write, and records a
    restart drops kept in ``metrics.jsonl.dropped`` (never lost)."""

    def __init__(self, workdir: Path, lock: RunLock | None):
        self.path = workdir / METRICS_FILE
        self.lock = lock
        self.last: dict[str, Any] = {}

    def _check(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def keep_until(self, step: int) -> None:
        """Keeps the records up to ``step`` (where the run resumes); later
        ones (from after the checkpoint, or of an earlier run when ``step``
        is 0) move to ``metrics.jsonl.dropped`` with a warning."""
        if self.lock is None:
            return
        self._check()
        records = read_records(self.path)
        kept = [r for r in records if r["step"] <= step]
        dropped = [r for r in records if r["step"] > step]
        if dropped:
            aside = self.path.with_name(self.path.name + ".dropped")
            for r in dropped:
                append_record(aside, r)
            warnings.warn(
                f"{self.path}: {len(dropped)} record(s) after step {step} (where "
                f"this run {'resumes' if step else 'starts'}) are kept in {aside}.",
                UserWarning,
                stacklevel=4,
            )
        rewrite_records(self.path, kept)  # also drops lines kept in .bad

    def append(self, records: list[dict[str, Any]]) -> None:
        self.last = _summary(records)
        if self.lock is None:
            return
        self._check()
        for r in records:
            append_record(self.path, r)


def arm_record(step, arm, interval, alive, stopped, evals, rate) -> dict[str, Any]:
    """One arm's record: train means since the last record, evaluations."""
    i = arm.index
    count = int(interval.count[i])

    def mean(total):
        return float(total) / count if alive and count else None

    r: dict[str, Any] = {
        "step": step,
        "arm": i,
        "seed": arm.seed,
        "hparams": arm.hparams,
        "train_loss": mean(interval.loss[i]),
    }
    for m, totals in interval.metrics.items():
        r[f"train_{m}"] = mean(totals[i])
    for key, values in evals.items():
        if key == "probe":
            r["probe"] = (
                jax.tree.map(lambda a: np.asarray(a[i]).tolist(), values)
                if alive
                else None
            )
        else:
            r[key] = float(values[i]) if alive else None
    r["stopped_at"] = None if alive else int(stopped)
    r["steps_per_sec"] = rate
    return r


def _summary(records: list[dict]) -> dict[str, Any]:
    """Means over arms of what the progress line shows."""
    out = {}
    for key in ("train_loss", "val_accuracy", "test_accuracy"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out
