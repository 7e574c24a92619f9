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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Arm", "arm_map", "make_arms"]


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
        if (
            isinstance(s, bool)
            or not isinstance(s, (int, np.integer))
            or not 0 <= s < 2**32
        ):
            raise ValueError(
                f"seed {s!r} must be an integer in [0, 2**32) (an arm's key is made "
                "from a uint32)."
            )
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
    # Arms see their hyper-parameters as float32: refuse values it would turn
    # into 0 or Inf (or a record would name a value no arm trained with).
    with np.errstate(over="ignore", under="ignore"):
        as32 = float(np.float32(v))
    if not math.isfinite(as32) or (as32 == 0.0) != (float(v) == 0.0):
        raise ValueError(
            f"hyper-parameter {key}={v!r} is not representable in float32 (it "
            f"would be {as32}); arms compute with float32 hyper-parameters, so use "
            "a magnitude between 1.4e-45 and 3.4e38."
        )
    return float(v)


def stacked(arms: Sequence[Arm]) -> dict[str, np.ndarray]:
    """Each hyper-parameter as a float32 array over arms (for vmap)."""
    keys = list(arms[0].hparams)
    return {k: np.asarray([a.hparams[k] for a in arms], np.float32) for k in keys}


def arm_map(fn: Callable, in_axes: Any = 0) -> Callable:
    """``jax.vmap(fn, in_axes)`` over the leading (arm) axis, except that one
    arm (a static size of 1, e.g. one arm per device) is computed unbatched
    and given its axis back: XLA:CPU runs batched matmuls of batch 1 slower
    than plain ones (``python -m benchmarks.train_loop``: fit went from 0.49x
    to 0.75x of a minimal loop with this)."""
    mapped = jax.vmap(fn, in_axes=in_axes)

    def call(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        sizes = {
            leaf.shape[0]
            for a, ax in zip(args, axes, strict=True)
            if ax is not None
            for leaf in jax.tree.leaves(a)
        }
        if sizes != {1}:
            return mapped(*args)
        squeezed = [
            a if ax is None else jax.tree.map(lambda v: v[0], a)
            for a, ax in zip(args, axes, strict=True)
        ]
        return jax.tree.map(lambda v: v[None], fn(*squeezed))

    return call
