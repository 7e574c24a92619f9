"""Running statistics and per-feature moments: the arithmetic of BatchNorm.

Everything here is a pure function of local arrays; nothing crosses devices
(that is :mod:`bnlab.collectives`).

Moments are accumulated as *shifted sums* about a constant shift ``k``::

    n = sum(m),  s1 = sum(m * (x - k)),  s2 = sum(m * (x - k)**2)
    mean = k + s1 / n,   var = s2 / n - (s1 / n)**2

This identity holds for any ``k`` that does not depend on ``x``, so gradients
are exact whatever the shift. Its rounding error is not: in float32 the
relative error of ``var`` is about ``c * 2**-24 * (1 + (mean - k)**2 / var)``,
where ``c`` grows slowly with the reduction length. With ``k`` within a few
standard deviations of the mean it is as accurate as a two-pass variance;
with ``k = 0`` it is the textbook ``E[x^2] - E[x]^2`` that fails when
``|mean| >> std`` (Chan, Golub & LeVeque 1983, "Algorithms for computing the
sample variance"). :func:`bnlab.batch_norm` picks the shift and re-centres
when it was too far away.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BatchStats",
    "ema_update",
    "init_batch_stats",
    "moments_from_sums",
    "shifted_sums",
]


class BatchStats(NamedTuple):
    """Running (moving-average) statistics of one BatchNorm layer.

    A pytree of two arrays with the feature shape, float32 by default, laid
    out like Flax's ``batch_stats`` collection (``{'mean', 'var'}``).

    Attributes:
      mean: running mean, shape = feature shape.
      var: running (biased, or unbiased in torch convention) variance.
    """

    mean: jax.Array
    var: jax.Array


def init_batch_stats(
    feature_shape: int | tuple[int, ...], dtype: jnp.dtype = jnp.float32
) -> BatchStats:
    """Fresh running statistics: mean 0 and variance 1, as in Flax and PyTorch.

    Args:
      feature_shape: the shape of the feature axes (an int for one axis).
      dtype: dtype of the stored statistics.

    Returns:
      A :class:`BatchStats` with ``mean = 0`` and ``var = 1``.

    Example:
      >>> import bnlab
      >>> bnlab.init_batch_stats(3)
      BatchStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
    """
    if isinstance(feature_shape, int):
        feature_shape = (feature_shape,)
    feature_shape = tuple(int(d) for d in feature_shape)
    if any(d <= 0 for d in feature_shape):
        raise ValueError(
            f"init_batch_stats: feature_shape must be positive, got {feature_shape}."
        )
    return BatchStats(jnp.zeros(feature_shape, dtype), jnp.ones(feature_shape, dtype))


def shifted_sums(
    x: jax.Array,
    shift: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None,
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """Local count and shifted first/second sums over ``reduction_axes``.

    Args:
      x: input, already in the reduction dtype (>= float32).
      shift: constant shift, broadcastable to ``x`` (keepdims feature shape).
      reduction_axes: axes to reduce.
      mask: boolean, broadcastable to ``x``, or None (all valid).

    Returns:
      ``(n, s1, s2)`` with feature shape; ``n`` is None when there is no mask
      (the count is then static). Masked positions are selected away with
      ``where`` rather than multiplied by 0, so NaN or Inf there cannot leak.
    """
    # Each sum gets its own copy of the shift: with one shared `x - shift`,
    # XLA:CPU materialises it for the two reductions (a full extra write and
    # read, ~2x the cost of the statistics pass); the barrier keeps the copies
    # apart so each reduction fuses its own subtraction.
    d1 = x - shift
    d2 = x - jax.lax.optimization_barrier(shift)
    if mask is None:
        return None, jnp.sum(d1, reduction_axes), jnp.sum(d2 * d2, reduction_axes)
    mask = jnp.broadcast_to(mask, x.shape)
    zero = jnp.zeros((), x.dtype)
    d1, d2 = jnp.where(mask, d1, zero), jnp.where(mask, d2, zero)
    n = jnp.sum(mask, reduction_axes, dtype=x.dtype)
    return n, jnp.sum(d1, reduction_axes), jnp.sum(d2 * d2, reduction_axes)


def moments_from_sums(
    n: jax.Array, s1: jax.Array, s2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(mean - shift, biased var)`` from shifted sums; 0 where ``n == 0``."""
    safe_n = jnp.maximum(n, jnp.ones((), n.dtype))
    offset = s1 / safe_n
    var = s2 / safe_n - offset * offset
    return offset, var


def ema_update(
    stats: BatchStats,
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    momentum: float,
    convention: str = "flax",
) -> BatchStats:
    """One moving-average step of the running statistics.

    Flax convention: ``new = momentum * old + (1 - momentum) * batch`` with the
    biased batch variance. Torch convention: ``new = (1 - momentum) * old +
    momentum * batch`` with the unbiased variance ``var * n / (n - 1)`` (the
    normalisation itself always uses the biased one, as PyTorch does).
    Features with ``count == 0`` keep their old statistics.

    Args:
      stats: the running statistics.
      mean: batch mean (feature shape).
      var: biased batch variance (feature shape).
      count: number of values behind each feature's moments (feature shape).
      momentum: see above.
      convention: ``"flax"`` or ``"torch"``.

    Returns:
      The new :class:`BatchStats`, in the dtype of ``stats``; no gradient flows.
    """
    mean, var, count = jax.lax.stop_gradient((mean, var, count))
    if convention == "torch":
        keep = 1.0 - momentum
        one = jnp.ones((), count.dtype)
        var = var * (count / jnp.maximum(count - one, one))
    else:
        keep = momentum
    seen = count > 0

    def step(old: jax.Array, batch: jax.Array) -> jax.Array:
        new = keep * old.astype(batch.dtype) + (1.0 - keep) * batch
        return jnp.where(seen, new, old.astype(batch.dtype)).astype(old.dtype)

    return BatchStats(step(stats.mean, mean), step(stats.var, var))
