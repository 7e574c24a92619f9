"""Running statistics and per-feature moments: the arithmetic of BatchNorm.

Everything here is a pure function of local arrays; nothing crosses devices
(that is :mod:`bnlab.collectives`).

Moments of a set of values are kept as :class:`Moments` ``(count, center,
offset, m2)`` with ``mean = center + offset`` and ``var = m2 / count``.
``center`` is a float32 value taken from the data, so ``x - center`` is exact
(Sterbenz) or correctly rounded relative to the *deviation*, and the small
``offset`` carries the rest of the mean. Keeping the mean as this pair instead
of one rounded float32 saves half an ulp of ``|mean|`` in every normalized
output (5e-4 at mean 1e4 with std 1).

Local moments are one pass of *shifted sums* about the center ``k``::

    n = sum(m),  s1 = sum(m * (x - k)),  s2 = sum(m * (x - k)**2)
    offset = s1 / n,   m2 = s2 - s1 * offset

In float32 the relative error of ``m2`` is about ``c * 2**-24 * (1 + (mean -
k)**2 / var)`` (``c`` grows slowly with the reduction length; Chan, Golub &
LeVeque 1983). With ``k`` the median of 8 sampled values (32 with a mask;
:func:`sample_shift`) the second term is about ``pi / 16 = 0.2`` for i.i.d.
normal data, so this is as accurate as a two-pass variance; with
``k = 0`` it is the textbook ``E[x^2] - E[x]^2`` that fails when ``|mean| >>
std``. Parts (devices, ghost batches, batches of a dataset) are combined with
Chan's pairwise formula, which is exact: no cancellation however far apart the
parts' means are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "BatchStats",
    "Moments",
    "ema_update",
    "init_batch_stats",
    "local_moments",
    "merge_moments",
    "sample_shift",
]

# How many values per feature the shift is the median of (masked inputs sample
# more, so that a feature rarely has no valid sample).
SHIFT_SAMPLES = 8
SHIFT_SAMPLES_MASKED = 32


class BatchStats(NamedTuple):
    """Running (moving-average) statistics of one BatchNorm layer.

    A pytree of two arrays with the feature shape, float32 by default, laid
    out like Flax's ``batch_stats`` collection (``{'mean', 'var'}``).

    Attributes:
      mean: running mean, shape = feature shape (complex for complex inputs,
        as in Flax).
      var: running (biased, or unbiased in torch convention) variance; real.
    """

    mean: jax.Array
    var: jax.Array


class Moments(NamedTuple):
    """Exact per-feature moments of a set of values.

    All four arrays have the same shape (the input's shape with reduced axes
    kept as size 1, or with a leading axis of parts to merge).

    Attributes:
      count: number of values (float).
      center: a value near the mean, taken from the data.
      offset: ``mean - center``.
      m2: sum of squared deviations from the mean (``var = m2 / count``).
    """

    count: jax.Array
    center: jax.Array
    offset: jax.Array
    m2: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.center + self.offset

    @property
    def var(self) -> jax.Array:
        """Biased variance; 0 where ``count`` is 0."""
        return self.m2 / jnp.maximum(self.count, jnp.ones((), self.count.dtype))


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
    real = jnp.finfo(dtype).dtype
    return BatchStats(jnp.zeros(feature_shape, dtype), jnp.ones(feature_shape, real))


def sample_shift(
    x: jax.Array,
    reduction_axes: Sequence[int],
    mask: jax.Array | None,
) -> jax.Array:
    """A per-feature value near the mean, read from a few elements of ``x``.

    The median of up to 8 (32 with a mask) values taken at evenly strided
    positions of the first reduction axis and the middle of the others; only
    valid (mask True) values count, so a minority of outliers among them
    cannot drag the shift away. With a mask, a feature none of whose sampled
    values is valid is shifted by its first valid value in memory order (one
    extra pass over the mask, none over ``x``). The result never depends on
    running statistics.

    Returns:
      The shift, with ``x``'s shape but size 1 along ``reduction_axes``.
    """
    first, *others = reduction_axes
    size = x.shape[first]
    r = min(size, SHIFT_SAMPLES if mask is None else SHIFT_SAMPLES_MASKED)
    stride = size // r
    index = [slice(None)] * x.ndim
    index[first] = slice(0, stride * r, stride)
    for a in others:
        mid = x.shape[a] // 2
        index[a] = slice(mid, mid + 1)
    values = _replicated(x[tuple(index)])
    if mask is None:
        return _median(values, None, first)
    mask = jnp.broadcast_to(mask, x.shape)
    valid = _replicated(mask[tuple(index)]) & ~jnp.isnan(values)
    found = jnp.any(valid, axis=first, keepdims=True)
    median = _median(values, valid, first)
    return jnp.where(found, median, _first_valid(x, reduction_axes, mask))


def _median(values: jax.Array, valid: jax.Array | None, axis: int) -> jax.Array:
    """Median along ``axis`` (keepdims) of the valid entries.

    Without a mask: an odd-even transposition network of elementwise min/max
    over the few sampled values, which XLA fuses into one small kernel (a
    ``sort`` op costs a separate, slow kernel on CPU). With a mask: a sort,
    invalid entries last (as +inf), and the middle of the valid ones.
    """
    if valid is None:
        rows = [lax.index_in_dim(values, i, axis) for i in range(values.shape[axis])]
        for rnd in range(len(rows)):
            for i in range(rnd % 2, len(rows) - 1, 2):
                rows[i], rows[i + 1] = (
                    jnp.minimum(rows[i], rows[i + 1]),
                    jnp.maximum(rows[i], rows[i + 1]),
                )
        lo, hi = rows[(len(rows) - 1) // 2], rows[len(rows) // 2]
        return _materialize(jnp.asarray(0.5, values.dtype) * (lo + hi))
    k = jnp.sum(valid, axis=axis, keepdims=True, dtype=jnp.int32)
    inf = jnp.full((), jnp.inf, values.dtype)
    ordered = jnp.sort(jnp.where(valid, values, inf), axis=axis)
    one = jnp.ones((), jnp.int32)
    lo = jnp.maximum(k - one, 0 * one) // 2
    pick = jnp.take_along_axis
    half = jnp.asarray(0.5, values.dtype)
    return half * (pick(ordered, lo, axis=axis) + pick(ordered, k // 2, axis=axis))


def _materialize(a: jax.Array) -> jax.Array:
    """``a``, computed once into its own buffer.

    XLA fuses cheap elementwise producers into every consumer: the min/max
    network above would be recomputed for each element of ``x`` in the
    reductions and the output (3x slower BN on CPU, measured). A scatter is a
    fusion boundary; ``lax.optimization_barrier`` is not (XLA:CPU expands it
    before fusion), nor is a small reduce (simplified to elementwise), and a
    sort of the samples is slower still (1.6 ms for 4096 features on CPU).
    """
    flat = a.reshape(-1)
    index = jnp.arange(flat.size)
    out = (
        jnp.zeros_like(flat)
        .at[index]
        .set(flat, unique_indices=True, indices_are_sorted=True)
    )
    return out.reshape(a.shape)


def _first_valid(
    x: jax.Array, reduction_axes: Sequence[int], mask: jax.Array
) -> jax.Array:
    """Each feature's first valid value in memory order (0 where none)."""
    if x.size >= 2**31:  # int32 positions would overflow; stay data-free
        return jnp.zeros(sample_shape(x.shape, reduction_axes), x.dtype)
    strides = [1] * x.ndim
    for a in range(x.ndim - 2, -1, -1):
        strides[a] = strides[a + 1] * x.shape[a + 1]
    position = sum(
        lax.broadcasted_iota(jnp.int32, x.shape, a) * strides[a] for a in range(x.ndim)
    )
    none = jnp.full((), x.size, jnp.int32)
    where = jnp.min(jnp.where(mask, position, none), reduction_axes, keepdims=True)
    flat, where = x.reshape(-1), _replicated(where)
    at = flat.at[jnp.minimum(where, none - 1)]
    mesh = _explicit_mesh(flat)
    value = at.get() if mesh is None else at.get(out_sharding=NamedSharding(mesh, P()))
    return jnp.where(where < none, value, jnp.zeros((), x.dtype))


def _explicit_mesh(a: jax.Array):
    """The mesh over which ``a`` is explicitly sharded (jit with Explicit mesh
    axes, JAX's default), or None."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(p is None for p in spec):
        return None
    return sharding.mesh


def _replicated(a: jax.Array) -> jax.Array:
    """A small array that explicit sharding left split over devices, replicated
    (so it can be sorted / indexed whole); identity otherwise."""
    mesh = _explicit_mesh(a)
    return a if mesh is None else jax.sharding.reshard(a, NamedSharding(mesh, P()))


def sample_shape(shape: Sequence[int], reduction_axes: Sequence[int]) -> tuple:
    """``shape`` with size 1 along ``reduction_axes`` (keepdims)."""
    return tuple(1 if a in reduction_axes else d for a, d in enumerate(shape))


def local_moments(
    x: jax.Array,
    shift: jax.Array,
    reduction_axes: Sequence[int],
    mask: jax.Array | None,
    separate_reductions: bool = False,
) -> Moments:
    """Moments of ``x`` over ``reduction_axes`` in one pass of shifted sums.

    Args:
      x: real input in the reduction dtype (>= float32).
      shift: :func:`sample_shift` of ``x`` (keepdims shape).
      reduction_axes: axes to reduce.
      mask: boolean, broadcastable to ``x``, or None (all valid).
      separate_reductions: give each of the two sums its own copy of the
        shift. XLA:CPU otherwise materialises ``x - shift`` for the two
        reductions (a full extra write and read); on GPU the two sums should
        share it so that XLA fuses them into one kernel reading ``x`` once.

    Returns:
      :class:`Moments` with ``x``'s shape, size 1 along ``reduction_axes``.
      Masked positions are selected away with ``where`` (never multiplied by
      0), so NaN or Inf there cannot leak.
    """
    axes = tuple(reduction_axes)
    d1 = x - shift
    d2 = x - lax.optimization_barrier(shift) if separate_reductions else d1
    if mask is None:
        n = jnp.full(shift.shape, _count(x.shape, axes), x.dtype)
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        zero = jnp.zeros((), x.dtype)
        d1, d2 = jnp.where(mask, d1, zero), jnp.where(mask, d2, zero)
        n = jnp.sum(mask, axes, keepdims=True, dtype=x.dtype)
    s1 = jnp.sum(d1, axes, keepdims=True)
    s2 = jnp.sum(d2 * d2, axes, keepdims=True)
    offset = s1 / jnp.maximum(n, jnp.ones((), n.dtype))
    m2 = jnp.maximum(s2 - s1 * offset, jnp.zeros((), x.dtype))
    return Moments(n, shift, offset, m2)


def merge_moments(parts: Moments, axis: int) -> Moments:
    """Chan's exact merge of the parts stacked along ``axis`` (kept as size 1).

    ``mean = sum(n_i mean_i) / N`` and ``m2 = sum(m2_i) + sum(n_i (mean_i -
    mean)^2)``, with every mean taken relative to the center of the first part
    that has values, so nothing large is ever subtracted. Parts with count 0
    are ignored (their center may be anything, NaN included).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnlab.stats import Moments, merge_moments
      >>> a = Moments(*map(jnp.array, ([2.0], [10.0], [0.0], [2.0])))  # 9, 11
      >>> b = Moments(*map(jnp.array, ([2.0], [20.0], [0.0], [0.0])))  # 20, 20
      >>> m = merge_moments(Moments(*(jnp.stack(p) for p in zip(a, b))), 0)
      >>> float(m.mean[0, 0]), float(m.var[0, 0])
      (15.0, 25.5)
    """
    n, k, o, m2 = parts
    has = n > 0
    first = jnp.argmax(has, axis=axis, keepdims=True)
    center = jnp.take_along_axis(k, first, axis=axis)
    zero = jnp.zeros((), o.dtype)
    d = jnp.where(has, (k - center) + o, zero)  # part mean - center
    count = jnp.sum(n, axis, keepdims=True)
    offset = jnp.sum(n * d, axis, keepdims=True) / jnp.maximum(
        count, jnp.ones((), count.dtype)
    )
    spread = n * (d - offset) * (d - offset)
    m2 = jnp.sum(jnp.where(has, m2 + spread, zero), axis, keepdims=True)
    return Moments(count, center, offset, m2)


def _count(shape: Sequence[int], axes: Sequence[int]) -> int:
    out = 1
    for a in axes:
        out *= shape[a]
    return out


def ema_update(
    stats: BatchStats,
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    momentum: float | jax.Array,
    convention: str = "flax",
    valid: jax.Array | None = None,
) -> BatchStats:
    """One moving-average step of the running statistics.

    Flax convention: ``new = momentum * old + (1 - momentum) * batch`` with the
    biased batch variance. Torch convention: ``new = (1 - momentum) * old +
    momentum * batch`` with the unbiased variance ``var * n / (n - 1)`` (the
    normalisation itself always uses the biased one, as PyTorch does).
    Features where ``valid`` is False (fewer than 2 values, or non-finite
    moments) keep their old statistics.

    The result is valid for any ``momentum``, traced ones included (they
    cannot be checked before the computation): a ``momentum`` outside [0, 1]
    or NaN skips the update (every feature keeps its old statistics), and a
    feature whose new mean or variance would not be finite, or whose new
    variance would be negative, keeps its old ones.

    The new statistics have dtype ``promote(old, batch)`` as in Flax: float32
    or bf16 statistics stay float32, a complex input makes the mean complex.

    Args:
      stats: the running statistics.
      mean: batch mean (feature shape).
      var: biased batch variance (feature shape).
      count: number of values behind each feature's moments (feature shape).
      momentum: see above.
      convention: ``"flax"`` or ``"torch"``.
      valid: which features to update (default: ``count > 0``).

    Returns:
      The new :class:`BatchStats`; no gradient flows.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnlab.stats import BatchStats, ema_update
      >>> old = BatchStats(jnp.zeros(2), jnp.ones(2))
      >>> ema_update(old, jnp.ones(2), jnp.full(2, 3.0), jnp.full(2, 8.0), 0.5).var
      Array([2., 2.], dtype=float32)
      >>> ema_update(old, jnp.ones(2), jnp.full(2, 3.0), jnp.full(2, 8.0), 1.5).var
      Array([1., 1.], dtype=float32)
    """
    mean, var, count = lax.stop_gradient((mean, var, count))
    if valid is None:
        valid = count > 0
    m = jnp.asarray(momentum)
    valid = valid & (m >= 0) & (m <= 1)  # False for NaN too
    # Both weights are formed before rounding to the statistics' dtype: for a
    # Python float, 1 - float32(0.99) would weigh the batch by 0.0099999905,
    # 1e-6 off (8 ulps of a running mean after one step).
    if convention == "torch":
        keep, take = 1.0 - momentum, momentum
        one = jnp.ones((), count.dtype)
        var = var * (count / jnp.maximum(count - one, one))
    else:
        keep, take = momentum, 1.0 - momentum

    def step(old: jax.Array, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        with jax.numpy_dtype_promotion("standard"):  # Flax's rule, even if strict
            dtype = jnp.promote_types(old.dtype, batch.dtype)
        old, batch = old.astype(dtype), batch.astype(dtype)
        k = jnp.asarray(keep).astype(dtype)  # complex for a complex mean
        t = jnp.asarray(take).astype(dtype)
        return old, k * old + t * batch

    old_mean, new_mean = step(stats.mean, mean)
    old_var, new_var = step(stats.var, var)
    ok = (
        valid
        & jnp.isfinite(new_mean)
        & jnp.isfinite(new_var)
        & (new_var >= jnp.zeros((), new_var.dtype))
    )
    return BatchStats(
        jnp.where(ok, new_mean, old_mean), jnp.where(ok, new_var, old_var)
    )
