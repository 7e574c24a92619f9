"""``batch_norm``: validate -> local moments -> merge across devices -> normalize.

Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167) as one pure
function with explicit running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnlab.collectives import AxisName, match_varying, sum_across, sync_size
from bnlab.stats import BatchStats, ema_update, moments_from_sums, shifted_sums

__all__ = ["RECENTRE_RATIO", "batch_norm", "canonical_axes"]

Axes = int | Sequence[int]

# Re-centre (second pass, second collective) when the shift is more than
# sqrt(64) = 8 batch standard deviations from the batch mean. Below that the
# shifted-sum variance loses at most ~log2(65) ~ 6 bits: relative error
# <~ 65 * c * 2**-24 ~ 4e-6 * c. Above it, one more pass about the first
# estimate of the mean makes the error that of an exact two-pass variance.
RECENTRE_RATIO = 64.0

_CONVENTIONS = ("flax", "torch")


def canonical_axes(ndim: int, axis: Axes, what: str = "axis") -> tuple[int, ...]:
    """Sorted, de-duplicated, non-negative axes; ValueError if out of range."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = set()
    for a in axes:
        if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise ValueError(
                f"batch_norm: {what}={axis!r} is out of range for an input with "
                f"{ndim} dimensions; pass feature axes in [-{ndim}, {ndim - 1}] "
                "(e.g. axis=-1 for NHWC / (batch, features), axis=1 for NCHW)."
            )
        out.add(int(a) % ndim)
    return tuple(sorted(out))


def _check_feature_array(name: str, a: jax.Array | None, shape: tuple[int, ...]):
    if a is not None and tuple(jnp.shape(a)) != shape:
        raise ValueError(
            f"batch_norm: {name} has shape {tuple(jnp.shape(a))} but the feature "
            f"axes of x have shape {shape}. Create it with that shape (e.g. "
            f"bnlab.init_batch_stats({shape})) or fix `axis`."
        )


def _output_dtype(x, scale, bias, dtype) -> jnp.dtype:
    if dtype is not None:
        return jnp.dtype(dtype)
    args = [a for a in (x, scale, bias) if a is not None]
    # Flax Linen's rule (jnp.result_type of input and parameters); computed with
    # standard promotion so it also holds under jax_numpy_dtype_promotion=strict.
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*args)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a + b`` as ``hi + lo`` exactly (Knuth's TwoSum; per-feature, cheap)."""
    hi = a + b
    b_virtual = hi - a
    lo = (a - (hi - b_virtual)) + (b - b_virtual)
    return hi, lo


def _batch_moments(
    x: jax.Array,
    running_mean: jax.Array,
    reduction_axes: tuple[int, ...],
    keep_shape: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: AxisName | None,
    axis_index_groups,
    static_count: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Exact ``(shift, mean - shift, biased var, count)`` of the (global) batch.

    The mean is returned as a float32 pair ``shift + offset`` (``shift`` within
    8 standard deviations of the mean, ``offset`` small): ``x - shift`` is
    then exact to float32 precision of the *deviation* and ``offset`` enters
    as a per-feature constant, whereas rounding the mean to one float32 costs
    half an ulp of ``|mean|`` in every output (5e-4 at mean 1e4).

    Pass 1 shifts by the running mean (identical on every device, so the
    shifted sums add exactly) and sends ``(count, s1, s2)`` in one psum. If the
    shift was far from the batch mean (fresh state, distribution shift), a
    second pass re-centres on the pass-1 mean: one more psum, inside a
    ``lax.cond`` whose predicate comes from reduced values and so agrees on
    every device of a statistics group.
    """
    feature_shape = running_mean.shape

    def global_sums(x, shift, mask):
        n, s1, s2 = shifted_sums(x, shift, reduction_axes, mask)
        if n is None:  # static count: do not send it
            s1, s2 = sum_across((s1, s2), axis_name, axis_index_groups)
            n = jnp.full(feature_shape, static_count, x.dtype)
        else:
            n, s1, s2 = sum_across((n, s1, s2), axis_name, axis_index_groups)
        return n, s1, s2

    shift = lax.stop_gradient(running_mean).astype(x.dtype).reshape(keep_shape)

    def primal(x, shift, mask):
        n, s1, s2 = global_sums(x, shift, mask)
        offset, var = moments_from_sums(n, s1, s2)
        far = jnp.any(offset * offset > RECENTRE_RATIO * var)

        def keep(_):
            # `+ 0 * offset` gives the shift the offset's device-variance type
            # (e.g. varying over 'replica' when reducing over 'bn_group').
            return shift.reshape(feature_shape) + jnp.zeros_like(offset), offset, var

        def recentre(_):
            new_shift = shift + offset.reshape(keep_shape)
            _, t1, t2 = global_sums(x, new_shift, mask)
            offset2, var2 = moments_from_sums(n, t1, t2)
            return new_shift.reshape(feature_shape), offset2, var2

        center, offset, var = lax.cond(far, recentre, keep, None)
        return center, offset, jnp.maximum(var, jnp.zeros((), var.dtype)), n

    # The derivative of (mean, var) does not depend on how they were computed,
    # so differentiate the closed form instead of the cond: no residuals from
    # the untaken branch, and one psum (of two per-feature sums) in the
    # tangent, which JAX transposes correctly under pmap, shard_map and vmap.
    # Arrays enter as arguments (not closures) so higher orders trace cleanly.
    @jax.custom_jvp
    def moments(x, shift, mask):
        return primal(x, shift, mask)

    @moments.defjvp
    def moments_jvp(primals, tangents):
        x, shift, mask = primals
        x_dot = tangents[0]
        center, offset, var, n = out = moments(x, shift, mask)
        # d var = 2/n sum((x - mean) x_dot) with mean = hi + lo exactly (TwoSum
        # of center + offset): sum((x - hi) x_dot) - lo sum(x_dot). `x - hi` is
        # deliberately not the forward's `x - center`: a shared full-size
        # subexpression would be materialised by XLA (+40% time on CPU).
        hi, lo = _two_sum(center, offset)
        centred = x - hi.reshape(keep_shape)
        if mask is not None:
            zero = jnp.zeros((), x.dtype)
            x_dot = jnp.where(mask, x_dot, zero)
            centred = jnp.where(mask, centred, zero)
        d_sum = jnp.sum(x_dot, reduction_axes)
        d_sq = 2.0 * (jnp.sum(centred * x_dot, reduction_axes) - lo * d_sum)
        d_sum, d_sq = sum_across((d_sum, d_sq), axis_name, axis_index_groups)
        safe_n = jnp.maximum(n, jnp.ones((), n.dtype))
        zeros = jnp.zeros_like(center)
        return out, (zeros, d_sum / safe_n, d_sq / safe_n, jnp.zeros_like(n))

    return moments(x, shift, mask)


def batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    dtype: jnp.dtype | None = None,
    convention: str = "flax",
) -> tuple[jax.Array, BatchStats]:
    """Batch Normalization as a pure function: ``(x, stats) -> (y, new_stats)``.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per feature, where
    ``(mean, var)`` are the batch moments over every axis except ``axis``
    (``train=True``) or the running ``stats`` (``train=False``).

    Algorithm (train mode). Moments are shifted sums about the running mean,
    reduced over devices as ``(count, s1, s2)`` in ONE ``psum``; if the running
    mean is more than 8 batch standard deviations from the batch mean, a second
    pass re-centres on the first estimate (a second ``psum``). So the steady
    state costs one read of ``x`` and one collective, and the worst case two of
    each. Error bound: float32 relative variance error
    ``<~ c * 2**-24 * (1 + min((mean - shift)**2 / var, 64))`` with ``c`` the
    (slowly growing) summation factor, i.e. that of a two-pass variance up to
    ~6 bits. Counts are summed, so uneven per-device masks merge exactly.
    Reductions run in ``promote(x.dtype, float32)``, from the unrounded input.

    Args:
      x: input array, any float dtype.
      stats: running statistics with the feature shape
        (:func:`bnlab.init_batch_stats`).
      scale: optional ``gamma`` with the feature shape.
      bias: optional ``beta`` with the feature shape.
      train: use (and update) batch statistics; else normalize with ``stats``
        and return them unchanged.
      axis: feature axis or axes (int or tuple), as in Flax.
      momentum: Flax convention ``new = momentum * old + (1 - momentum) *
        batch`` (biased variance); see ``convention``.
      epsilon: added to the variance.
      axis_name: pmap / shard_map / vmap axis name (or tuple of names) over
        which statistics are synchronised; None under plain or sharded ``jit``.
      axis_index_groups: groups of indices of ``axis_name`` that share
        statistics (pmap / vmap); under shard_map use a 2-D mesh instead.
      mask: boolean array broadcastable to ``x``; only True positions enter
        the statistics. Features with no valid value keep their running
        statistics and are normalized with them. NaN/Inf at masked positions
        reaches neither the statistics, nor valid outputs, nor gradients (those
        positions output ``bias``; elsewhere masked outputs are normalized
        like valid ones, as in Flax).
      dtype: output dtype; default ``result_type(x, scale, bias)`` as Flax Linen
        (so bf16 ``x`` with float32 ``scale`` gives float32).
      convention: ``"flax"`` (default) or ``"torch"``: PyTorch's rule, where
        ``momentum`` weighs the new batch (torch default 0.1) and the running
        variance is unbiased (``var * n / (n - 1)``).

    Returns:
      ``(y, new_stats)``: ``y`` has ``x``'s shape; ``new_stats`` carries no
      gradient.

    Raises:
      ValueError: bad axis, shapes, mask, hyper-parameters, an unbound
        ``axis_name``, or training on a single value per feature.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 5 + 100
      >>> y, stats = bnlab.batch_norm(x, bnlab.init_batch_stats(3), train=True)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
      True
      >>> y_eval, _ = bnlab.batch_norm(x, stats, train=False)
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"batch_norm: x must be a floating array, got dtype {x.dtype}; "
            "cast it first, e.g. x.astype(jnp.float32)."
        )
    if not isinstance(stats, BatchStats):
        if isinstance(stats, dict) and set(stats) == {"mean", "var"}:
            stats = BatchStats(stats["mean"], stats["var"])
        else:
            raise TypeError(
                f"batch_norm: stats must be bnlab.BatchStats(mean, var), got "
                f"{type(stats).__name__}; create it with bnlab.init_batch_stats."
            )
    if convention not in _CONVENTIONS:
        raise ValueError(
            f"batch_norm: convention={convention!r}; use one of {_CONVENTIONS}."
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batch_norm: momentum={momentum} must lie in [0, 1].")
    if not epsilon > 0.0:
        raise ValueError(
            f"batch_norm: epsilon={epsilon} must be > 0 (it keeps 1/sqrt(var + "
            "epsilon) finite for constant features); Flax uses 1e-5."
        )
    feature_axes = canonical_axes(x.ndim, axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    keep_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    _check_feature_array("stats.mean", stats.mean, feature_shape)
    _check_feature_array("stats.var", stats.var, feature_shape)
    _check_feature_array("scale", scale, feature_shape)
    _check_feature_array("bias", bias, feature_shape)
    if mask is not None:
        mask = jnp.asarray(mask)
        try:
            ok = np.broadcast_shapes(mask.shape, x.shape) == x.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"batch_norm: mask of shape {mask.shape} does not broadcast to x of "
                f"shape {x.shape}; give it x's shape or size-1 axes where it is "
                "constant, e.g. mask[..., None] for a per-example mask."
            )
        mask = mask.astype(bool)

    # Reductions in float32 at least (float64 stays float64), from x itself.
    compute_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    out_dtype = _output_dtype(x, scale, bias, dtype)
    xc = x.astype(compute_dtype)

    if train:
        local_count = math.prod(x.shape[a] for a in reduction_axes)
        count = local_count * sync_size(axis_name, axis_index_groups)
        if count < 2:
            raise ValueError(
                f"batch_norm(train=True) got x of shape {x.shape} with feature "
                f"axes {feature_axes}: {count} value per feature"
                f"{'' if axis_name is None else f' across axis {axis_name!r}'}. "
                "Its batch variance is 0, so every output would equal `bias` and "
                "the running variance would decay to 0. Train on batches of at "
                "least 2 examples, synchronise statistics across devices with "
                "axis_name, or use train=False (running statistics)."
            )
        center, offset, var, n = _batch_moments(
            xc,
            stats.mean,
            reduction_axes,
            keep_shape,
            mask,
            axis_name,
            axis_index_groups,
            count,
        )
        if mask is not None:  # features with no valid value: use running stats
            seen = n > 0
            center = jnp.where(seen, center, stats.mean.astype(compute_dtype))
            offset = jnp.where(seen, offset, jnp.zeros((), compute_dtype))
            var = jnp.where(seen, var, stats.var.astype(compute_dtype))
        new_stats = ema_update(stats, center + offset, var, n, momentum, convention)
    else:
        center = stats.mean.astype(compute_dtype)
        offset = None
        var = stats.var.astype(compute_dtype)
        new_stats = stats

    inv = lax.rsqrt(var + jnp.asarray(epsilon, compute_dtype))
    if scale is not None:
        inv = inv * jnp.asarray(scale).astype(compute_dtype)
    # y = (x - center) * inv + (bias - offset * inv): one subtract and one FMA
    # per element, like the fast path. |offset| <= 8 std (else we re-centred),
    # so folding it into the per-feature constant costs at most ~3 bits.
    if offset is None:
        offset = jnp.zeros_like(center)
    bias_term = -offset * inv
    if bias is not None:
        bias_term = bias_term + jnp.asarray(bias).astype(compute_dtype)
    center, offset, inv, bias_term = (
        a.reshape(keep_shape)
        for a in match_varying((center, offset, inv, bias_term), xc, axis_name)
    )
    centred = xc - center
    if mask is not None:
        # A NaN/Inf at a masked position would give NaN gradients to scale and
        # to every valid x (0 * NaN in the backward sums): output `bias` there.
        centred = jnp.where(jnp.isfinite(centred) | mask, centred, offset)
    y = centred * inv + bias_term
    return y.astype(out_dtype), new_stats
