"""A run's result: :class:`FitResult`, what :func:`bnlab.train.fit` returns
and what :func:`load` reads back from a run directory (one type for a run in
memory and a run loaded back)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from bnlab.train.arms import Arm
from bnlab.train.checkpoint import (
    finalized_steps,
    read_state,
)
from bnlab.train.plan import RESERVED
from bnlab.train.rundir import METRICS_FILE, read_records


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      variables: the final variables (``params``, ``batch_stats``, ...) as
        numpy arrays with a leading axis of arms.
      arms: the arms, in the order of that axis.
      records: every record of ``metrics.jsonl`` (one per evaluation and arm).
      stopped_at: per arm, None, or the step whose loss or state was not
        finite (the arm kept its last finite state).
      step: the step the run reached.
      early_stopping: with ``early_stopping=``, per arm ``{"best",
        "best_step", "done_at"}``; the best variables are ``best``.
      best: with ``early_stopping=``, each arm's variables at its best
        evaluation (leading axis of arms), else None.
      config: the run's configuration (``config.json``; as saved with the
        checkpoint for :func:`load`).
    """

    variables: dict
    arms: list[Arm]
    records: list[dict]
    stopped_at: list[int | None]
    step: int
    early_stopping: list[dict] | None = None
    best: dict | None = None
    config: dict | None = None

    def table(self) -> str:
        """The arms as a table: index, seed, hyper-parameters, stopped.

        Example:
          >>> from bnlab.train import make_arms
          >>> print(FitResult({}, make_arms((0, 1), {"lr": [0.1]}), [], [None, 7], 9).table())
          arm  seed   lr  stopped_at
            0     0  0.1           -
            1     1  0.1           7
        """
        return _arms_table([(a.seed, a.hparams) for a in self.arms], self.stopped_at)

    def __repr__(self) -> str:
        return f"FitResult(step={self.step}, {len(self.arms)} arm(s))\n{self.table()}"

    def arm(self, i: int) -> dict:
        """The variables of arm ``i``, as ``model.apply`` takes them."""
        return jax.tree.map(lambda a: a[i], self.variables)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values (evaluations, arms))`` of a record key (NaN where
        absent or null), e.g. ``result.curve("val_accuracy")``."""
        steps = sorted({r["step"] for r in self.records})
        pos = {s: i for i, s in enumerate(steps)}
        out = np.full((len(steps), len(self.arms)), np.nan)
        for r in self.records:
            v = r.get(key)
            if v is not None:
                out[pos[r["step"]], r["arm"]] = v
        return np.asarray(steps), out


# The former name of a run read back by load: the same type as fit's result.
Loaded = FitResult


def _arms_table(arms: list[tuple[int, dict]], stopped: list[int | None]) -> str:
    keys = sorted({k for _, hp in arms for k in hp})
    rows = [["arm", "seed", *keys, "stopped_at"]]
    for i, ((seed, hp), s) in enumerate(zip(arms, stopped, strict=True)):
        rows.append(
            [
                str(i),
                str(seed),
                *(f"{hp[k]:g}" for k in keys),
                "-" if s is None else str(s),
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows
    )


def load(
    workdir: str | Path, step: int | None = None, *, best: bool = False
) -> FitResult:
    """The variables of every arm of a run, verified, for your own code.

    Reads the newest finished checkpoint of ``workdir`` (or ``step``) with
    orbax, checks every array against the SHA-256 recorded when it was saved,
    and returns the run as a :class:`FitResult`: each arm's model variables
    (``params``, ``batch_stats``, ...) as numpy arrays with a leading axis of
    arms (``result.arm(i)`` for one), its arms, the records up to that step
    and its configuration. No model is needed. With ``best``: each arm's
    variables at its best evaluation (a run with ``early_stopping``).

    Raises:
      FileNotFoundError: no such run or checkpoint.
      ValueError: the checkpoint fails its digests, misses an array, or its
        files cannot be read (damaged).
      RunDirError: a file of the checkpoint cannot be read for lack of
        permission.

    Example:
      >>> run = load(workdir)  # doctest: +SKIP
      >>> logits = model.apply(run.arm(0), x, train=False)  # doctest: +SKIP
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory.")
    if not finalized_steps(directory):
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    tree, meta = read_state(directory, step)
    config = meta["config"]
    arms = [
        Arm(i, int(a["seed"]), dict(a["hparams"]))
        for i, a in enumerate(config.get("arms", []))
    ]
    model = {k: v for k, v in tree.items() if k not in RESERVED}
    if best and "best" not in tree:
        raise ValueError(
            f"{workdir} was trained without early_stopping: it keeps no best "
            "variables; load(workdir) gives the last ones."
        )
    stopped = [None if s < 0 else int(s) for s in np.asarray(tree["stopped_at"])]
    step = int(meta["step"])
    records = [
        r
        for r in read_records(Path(workdir) / METRICS_FILE, False)
        if r["step"] <= step
    ]
    return FitResult(
        tree["best"] if best else model,
        arms,
        records,
        stopped,
        step,
        None,
        tree.get("best"),
        config,
    )
