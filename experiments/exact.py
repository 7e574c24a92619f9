"""Statistics for quantities that a t interval does not fit: counts of seeds
and claims that must hold on every seed.

A network that does not train predicts one class, so every such seed scores
exactly chance: a t interval over tied values has zero width and claims a
certainty five seeds do not give. What the seeds give is a count (how many
train), judged with an exact Clopper-Pearson interval
(:func:`share_meeting`, :func:`share_above`). A claim that an identity holds
on every seed ("re-estimated statistics remove an affine shift exactly") is
judged on its worst seed (:func:`every_seed`), not on an interval of the
mean.

An experiment that imports this module has its source in its design digest
(:func:`experiments.registry.design_digest`), as it has the protocol's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments import protocol as P

__all__ = ["every_seed", "share_above", "share_meeting", "share_within"]


def share_meeting(per_seed: Sequence[float], note: str = "") -> P.Measured:
    """The share of seeds meeting a claim (``per_seed``: 1, 0 or 0.5 for
    undetermined) with a Clopper-Pearson 95 % interval whose lower end counts
    undetermined seeds as 0 and whose upper end as 1 (each end conservative
    for the side it decides); the value counts them as half.

    Example:
      >>> m = share_meeting([1.0, 1.0, 1.0, 1.0, 0.5])
      >>> m.value, round(m.low, 4), m.high  # low: 4 of 5; high: 5 of 5
      (0.9, 0.2836, 1.0)
    """
    v = np.asarray(per_seed, np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isin(v, (0.0, 0.5, 1.0)).all():
        raise ValueError(f"per_seed must be 0, 0.5 or 1 per seed, got {v.tolist()}")
    n = len(v)
    sure, maybe = int(np.sum(v == 1.0)), int(np.sum(v == 0.5))
    low = P.exact_sign_test(sure, n).low
    high = P.exact_sign_test(sure + maybe, n).high
    return P.Measured(
        float(v.mean()),
        low,
        high,
        tuple(v.tolist()),
        note or f"{sure} of {n} seeds meet it, {maybe} undetermined",
    )


def share_above(values: Sequence[float], level: float, what: str) -> P.Measured:
    """The share of seeds whose ``values`` exceed ``level`` (e.g. the seeds
    on which a network trains: test accuracy above chance plus a margin),
    with its Clopper-Pearson 95 % interval (:func:`share_meeting`). A NaN
    (a diverged run) does not exceed any level.

    Example:
      >>> m = share_above([0.1, 0.1, 0.62, 0.1, 0.1, 0.1], 0.15, "train")
      >>> round(m.value, 4), round(m.low, 4), round(m.high, 4)
      (0.1667, 0.0042, 0.6412)
      >>> m.note
      '1 of 6 seeds train (> 0.15): 0.1, 0.1, 0.62, 0.1, 0.1, 0.1'
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"need one value per seed, got shape {v.shape}")
    above = np.where(np.isnan(v), False, v > level)
    listed = ", ".join(f"{x:.3g}" for x in v)
    return share_meeting(
        above.astype(np.float64).tolist(),
        f"{int(above.sum())} of {len(v)} seeds {what} (> {level:g}): {listed}",
    )


def share_within(values: Sequence[float], margin: float, what: str) -> P.Measured:
    """The share of seeds whose ``values`` lie within ``±margin`` (e.g. the
    seeds on which two runs of the same maths end within the test set's
    resolution of each other), with its Clopper-Pearson 95 % interval
    (:func:`share_meeting`). A NaN is not within any margin.

    Example:
      >>> m = share_within([0.0, -0.002, 0.0, 0.0, 0.02, 0.0], 0.01, "agree")
      >>> m.per_seed, round(m.low, 4), round(m.high, 4)
      ((1.0, 1.0, 1.0, 1.0, 0.0, 1.0), 0.3588, 0.9958)
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"need one value per seed, got shape {v.shape}")
    inside = np.where(np.isnan(v), False, np.abs(v) <= margin)
    listed = ", ".join(f"{x:.3g}" for x in v)
    return share_meeting(
        inside.astype(np.float64).tolist(),
        f"{int(inside.sum())} of {len(v)} seeds {what} (within ±{margin:g}): {listed}",
    )


def every_seed(values: Sequence[float], what: str = "") -> P.Measured:
    """A claim that must hold on every seed (an identity), judged on the
    worst seed: the value, ``low`` and ``high`` are all the largest per-seed
    value, so a ``<=`` criterion is SUPPORTED when every seed meets it and
    CONTRADICTED when one seed does not (:func:`experiments.protocol.decide`).
    It is not an interval of a mean: no number of seeds is "needed", and a
    NaN seed (a failed run) contradicts.

    Example:
      >>> m = every_seed([0.0, 0.002, 0.0])
      >>> m.value, m.low, m.high
      (0.002, 0.002, 0.002)
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"need one value per seed, got shape {v.shape}")
    worst = float(np.max(v)) if np.isfinite(v).all() else np.inf
    return P.Measured(
        worst,
        worst,
        worst,
        tuple(v.tolist()),
        (what + "; " if what else "")
        + f"the worst of {len(v)} seeds (a claim about every seed)",
    )
