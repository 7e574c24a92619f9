"""Arms: the seeds x hyper-parameters that :func:`bnlab.train.fit` trains as
one vmapped program.

An arm is one model trained with one seed (its initialization and its data
order) and one set of numeric hyper-parameters. Arms with the same seed share
their initial weights and the order of their batches, so comparisons between
them are paired.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Arm", "make_arms"]


class Arm(NamedTuple):
    """One arm: its index, seed and hyper-parameters."""

    index: int
    seed: int
    hparams: dict[str, float]

    def label(self) -> str:
        hp = ", ".join(f"{k}={v:g}" for k, v in self.hparams.items())
        return f"arm {self.index} (seed {self.seed}{', ' + hp if hp else ''})"


def make_arms(
    seeds: Sequence[int] | int,
    hparams: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]] | None,
) -> list[Arm]:
    """Every (hyper-parameters, seed) pair, hyper-parameters outermost.

    ``hparams`` is either a grid ``{"lr": [0.1, 0.3], "wd": [0, 1e-4]}`` (every
    combination) or an explicit list of settings ``[{"lr": 0.1}, {"lr": 0.3,
    "wd": 1e-4}]`` (every setting must name the same keys).

    Example:
      >>> [a.label() for a in make_arms((0, 1), {"lr": [0.1, 0.3]})]
      ['arm 0 (seed 0, lr=0.1)', 'arm 1 (seed 1, lr=0.1)', 'arm 2 (seed 0, lr=0.3)', 'arm 3 (seed 1, lr=0.3)']
    """
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = (int(seeds),)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed, e.g. seeds=(0,).")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"seed {s!r} must be a non-negative integer.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a seed; list each seed once.")
    settings = _settings(hparams)
    return [
        Arm(i, int(seed), setting)
        for i, (setting, seed) in enumerate(itertools.product(settings, seeds))
    ]


def _settings(hparams: Any) -> list[dict[str, float]]:
    if hparams is None:
        return [{}]
    if isinstance(hparams, Mapping):
        keys = list(hparams)
        values = []
        for k in keys:
            v = hparams[k]
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
                raise TypeError(
                    f"hparams[{k!r}] must be a list of values (a grid), e.g. "
                    f"{{{k!r}: [0.1, 0.3]}}; got {v!r}."
                )
            if not v:
                raise ValueError(f"hparams[{k!r}] is empty.")
            values.append([_number(k, x) for x in v])
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)
        ]
    if isinstance(hparams, Sequence) and not isinstance(hparams, (str, bytes)):
        if not hparams:
            raise ValueError(
                "hparams is an empty list; pass None for no hyper-parameters."
            )
        keys = None
        out = []
        for i, setting in enumerate(hparams):
            if not isinstance(setting, Mapping):
                raise TypeError(
                    f"hparams[{i}] must be a dict of numbers, got {type(setting).__name__}."
                )
            if keys is None:
                keys = list(setting)
            elif sorted(setting) != sorted(keys):
                raise ValueError(
                    f"hparams[{i}] names {sorted(setting)} but hparams[0] names "
                    f"{sorted(keys)}: every setting must name the same keys."
                )
            out.append({k: _number(k, setting[k]) for k in keys})
        return out
    raise TypeError(
        "hparams must be a dict of lists (a grid) or a list of dicts (settings), "
        f"got {type(hparams).__name__}."
    )


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"hyper-parameter {key}={v!r} must be a number (arms of one fit share "
            "one program, so structural choices such as another layer or norm need "
            "their own fit call)."
        )
    if not math.isfinite(float(v)):
        raise ValueError(f"hyper-parameter {key}={v!r} must be finite.")
    return float(v)


def stacked(arms: Sequence[Arm]) -> dict[str, np.ndarray]:
    """Each hyper-parameter as a float32 array over arms (for vmap)."""
    keys = list(arms[0].hparams)
    return {k: np.asarray([a.hparams[k] for a in arms], np.float32) for k in keys}
