"""Early stopping on a validation metric, and each arm's best variables.

:class:`EarlyStopping` is what a user passes to :func:`bnlab.train.fit`.
:class:`Tracker` follows one run: after every evaluation it reads the
records, notes per arm whether the metric improved, and says when every arm
has gone ``patience`` evaluations without improving (the run then stops).
Its state is a pure function of the records, so a resumed run rebuilds it
from ``metrics.jsonl`` and stops at the same step as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["EarlyStopping", "Tracker"]


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop a run when its validation metric stops improving, and keep each
    arm's best variables (``<workdir>/best``, read by ``load(workdir,
    best=True)``).

    Every arm is followed on its own: its best value and step, and how many
    evaluations since it improved. The run stops when every arm has gone
    ``patience`` evaluations without an improvement larger than
    ``min_delta`` (arms that are done earlier keep training with the others;
    their best variables are kept). An arm that stopped on NaN/Inf counts as
    done.

    Attributes:
      metric: the record key followed, e.g. ``"val_loss"`` or
        ``"val_accuracy"`` (a validation split is needed for ``val_*``).
      mode: ``"min"`` or ``"max"``; default: ``"min"`` for a name containing
        ``loss``, else ``"max"``.
      patience: evaluations without an improvement before an arm is done.
      min_delta: the least change that counts as an improvement.

    Example:
      >>> EarlyStopping("val_accuracy", patience=3).direction
      'max'
    """

    metric: str = "val_loss"
    mode: str | None = None
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self):
        if not isinstance(self.metric, str) or not self.metric:
            raise TypeError(
                f"EarlyStopping.metric={self.metric!r} must be a record key."
            )
        if self.mode not in (None, "min", "max"):
            raise ValueError(
                f"EarlyStopping.mode={self.mode!r} must be 'min' or 'max'."
            )
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, int)
            or (self.patience < 1)
        ):
            raise ValueError(
                f"EarlyStopping.patience={self.patience!r} must be a positive integer."
            )
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(
                f"EarlyStopping.min_delta={self.min_delta!r} must be a number >= 0."
            )

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``."""
        if self.mode is not None:
            return self.mode
        return "min" if "loss" in self.metric else "max"

    def config(self) -> dict[str, Any]:
        """As recorded in ``config.json`` (a resume must agree on it)."""
        return {
            "metric": self.metric,
            "mode": self.direction,
            "patience": self.patience,
            "min_delta": float(self.min_delta),
        }


class Tracker:
    """Per arm: the best value and step, evaluations since, done or not."""

    def __init__(self, rule: EarlyStopping, n_arms: int):
        self.rule = rule
        self.best: list[float | None] = [None] * n_arms
        self.best_step: list[int | None] = [None] * n_arms
        self.since = [0] * n_arms
        self.done_at: list[int | None] = [None] * n_arms

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.rule.direction == "min":
            return value < best - self.rule.min_delta
        return value > best + self.rule.min_delta

    def update(self, records: list[dict[str, Any]]) -> list[int]:
        """Takes one evaluation's records (one per arm); returns the arms
        whose value improved (their best variables are these)."""
        improved = []
        for r in records:
            i = r["arm"]
            if self.done_at[i] is not None:
                continue
            value = r.get(self.rule.metric)
            if r.get("stopped_at") is not None:
                self.done_at[i] = r["step"]
                continue
            if value is None or not math.isfinite(value):
                self.since[i] += 1
            elif self._better(value, self.best[i]):
                self.best[i], self.best_step[i], self.since[i] = value, r["step"], 0
                improved.append(i)
            else:
                self.since[i] += 1
            if self.since[i] >= self.rule.patience:
                self.done_at[i] = r["step"]
        return improved

    def replay(self, records: list[dict[str, Any]]) -> None:
        """Rebuilds the state from a run's records (on resume)."""
        by_step: dict[int, list[dict]] = {}
        for r in records:
            by_step.setdefault(r["step"], []).append(r)
        for step in sorted(by_step):
            self.update(by_step[step])

    @property
    def all_done(self) -> bool:
        return all(d is not None for d in self.done_at)

    def summary(self) -> list[dict[str, Any]]:
        """Per arm: ``{"best", "best_step", "done_at"}``."""
        return [
            {"best": b, "best_step": s, "done_at": d}
            for b, s, d in zip(self.best, self.best_step, self.done_at, strict=True)
        ]
