"""``batch_norm``: check -> local moments -> merge across devices -> normalize.

Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167) as one pure
function with explicit running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnlab.collectives import (
    AxisName,
    gather_across,
    match_varying,
    sum_across,
    sync_size,
)
from bnlab.stats import (
    BatchStats,
    Moments,
    ema_update,
    local_moments,
    merge_moments,
    sample_shift,
)

__all__ = [
    "batch_moments",
    "batch_norm",
    "batch_renorm",
    "canonical_axes",
    "variant_batch_norm",
]

Axes = int | Sequence[int]

_CONVENTIONS = ("flax", "torch")


# ------------------------------------------------------------------ checks


def canonical_axes(ndim: int, axis: Any, what: str = "axis") -> tuple[int, ...]:
    """Sorted non-negative axes; TypeError/ValueError naming the bad value."""
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    for a in items:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(
                f"batch_norm: {what}={axis!r} must be an int or a tuple of ints "
                f"(feature axes), got {type(a).__name__} {a!r}; e.g. axis=-1 for "
                "NHWC / (batch, features), axis=1 for NCHW."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"batch_norm: {what}={axis!r} is out of range for an input with "
                f"{ndim} dimensions; pass feature axes in [-{ndim}, {ndim - 1}] "
                "(e.g. axis=-1 for NHWC / (batch, features), axis=1 for NCHW)."
            )
    out = [int(a) % ndim for a in items]
    if len(set(out)) != len(out):
        raise ValueError(
            f"batch_norm: {what}={axis!r} names the same axis twice; list each "
            "feature axis once."
        )
    return tuple(sorted(out))


class _Layout(NamedTuple):
    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    keep_shape: tuple[int, ...]  # x.shape with 1 on the reduction axes


def _layout(shape: tuple[int, ...], axis: Any) -> _Layout:
    feature_axes = canonical_axes(len(shape), axis)
    reduction = tuple(i for i in range(len(shape)) if i not in feature_axes)
    return _Layout(
        feature_axes,
        reduction,
        tuple(shape[a] for a in feature_axes),
        tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape))),
    )


def _as_array(name: str, a: Any, shape: tuple[int, ...], *, complex_ok: bool):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(
            f"batch_norm: {name} must be an array of shape {shape}, got "
            f"{type(a).__name__}; build statistics with bnlab.init_batch_stats"
            f"({shape}) and pass scale/bias as arrays or None."
        )
    if tuple(a.shape) != shape:
        raise ValueError(
            f"batch_norm: {name} has shape {tuple(a.shape)} but the feature axes "
            f"of x have shape {shape}. Create it with that shape (e.g. "
            f"bnlab.init_batch_stats({shape})) or fix `axis`."
        )
    kinds = (jnp.floating, jnp.complexfloating) if complex_ok else (jnp.floating,)
    if not any(jnp.issubdtype(a.dtype, k) for k in kinds):
        what = "floating" + (" or complex" if complex_ok else "")
        raise TypeError(
            f"batch_norm: {name} has dtype {a.dtype}; it must be {what}"
            + (
                " (complex only with a complex x)"
                if not complex_ok and jnp.issubdtype(a.dtype, jnp.complexfloating)
                else ""
            )
            + f", e.g. {name}.astype(jnp.float32)."
        )
    return a


def _concrete(v: Any) -> float | None:
    """``float(v)``, or None for a traced value (checked only when concrete)."""
    if isinstance(v, jax.core.Tracer):
        return None
    try:
        return float(v)
    except TypeError:
        raise TypeError(f"expected a number, got {type(v).__name__} {v!r}") from None


def _check_hyper(momentum: Any, epsilon: Any, compute_dtype: Any) -> None:
    m = _concrete(momentum)
    if m is not None and not 0.0 <= m <= 1.0:
        raise ValueError(
            f"batch_norm: momentum={momentum} must lie in [0, 1]. Flax accepts any "
            "value, but outside [0, 1] the running statistics are extrapolated "
            "rather than averaged and can diverge, so bnlab refuses it."
        )
    e = _concrete(epsilon)
    if e is not None and not (
        math.isfinite(e) and e > 0 and np.asarray(e, compute_dtype) > 0
    ):
        raise ValueError(
            f"batch_norm: epsilon={epsilon} must be > 0, finite, and > 0 in "
            f"{np.dtype(compute_dtype).name} (Flax uses 1e-5). Flax accepts "
            "epsilon <= 0, but then a constant feature divides by zero (NaN/Inf "
            "outputs), so bnlab refuses it."
        )


def _check_args(
    x, stats, scale, bias, train, axis, mask, dtype, convention, ghost_size
) -> tuple[jax.Array, BatchStats, Any, Any, Any, _Layout]:
    """Validates and normalises the arguments of :func:`batch_norm`."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    x = jnp.asarray(x)
    complex_x = jnp.issubdtype(x.dtype, jnp.complexfloating)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or complex_x):
        raise TypeError(
            f"batch_norm: x must be a floating (or complex) array, got dtype "
            f"{x.dtype}; cast it first, e.g. x.astype(jnp.float32) (the Flax "
            "drop-in modules do this for integer inputs)."
        )
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(
            f"batch_norm: train={train!r} must be a Python bool: it selects the "
            "computation at trace time (mark it static under jit)."
        )
    if convention not in _CONVENTIONS:
        raise ValueError(
            f"batch_norm: convention={convention!r}; use one of {_CONVENTIONS}."
        )
    layout = _layout(x.shape, axis)
    if isinstance(stats, dict) and set(stats) == {"mean", "var"}:
        stats = BatchStats(stats["mean"], stats["var"])
    if not isinstance(stats, BatchStats):
        raise TypeError(
            f"batch_norm: stats must be bnlab.BatchStats(mean, var), got "
            f"{type(stats).__name__}; create it with bnlab.init_batch_stats."
        )
    fs = layout.feature_shape
    stats = BatchStats(
        _as_array("stats.mean", stats.mean, fs, complex_ok=complex_x),
        _as_array("stats.var", stats.var, fs, complex_ok=False),
    )
    if scale is not None:
        scale = _as_array("scale", scale, fs, complex_ok=complex_x)
    if bias is not None:
        bias = _as_array("bias", bias, fs, complex_ok=complex_x)
    if mask is not None:
        if not hasattr(mask, "dtype"):
            mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(
                f"batch_norm: mask has dtype {mask.dtype}; it must be boolean (a "
                "float mask would count 0.3 or NaN as True). Pass e.g. mask > 0.5 "
                "or mask.astype(bool) once its values are 0/1."
            )
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
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"batch_norm: dtype={dtype!r} is not a floating or complex dtype; the "
            "output of a normalization is fractional (e.g. dtype=jnp.bfloat16)."
        )
    if ghost_size is not None and train:  # ghost batches exist only in training
        _check_ghost(ghost_size, x.shape, layout)
    return x, stats, scale, bias, mask, layout


def _check_ghost(ghost_size: Any, shape: tuple[int, ...], layout: _Layout) -> None:
    if isinstance(ghost_size, (bool, np.bool_)) or not isinstance(
        ghost_size, (int, np.integer)
    ):
        raise TypeError(
            f"batch_norm: ghost_size={ghost_size!r} must be an int (examples per "
            "ghost batch) or None."
        )
    if 0 in layout.feature_axes:
        raise ValueError(
            "batch_norm: ghost_size splits axis 0 (the example axis) into ghost "
            f"batches, but axis 0 is a feature axis here (axis={layout.feature_axes})."
        )
    if ghost_size < 1 or shape[0] % ghost_size:
        raise ValueError(
            f"batch_norm: ghost_size={ghost_size} does not divide the {shape[0]} "
            "examples on axis 0 of x (per device under sync); use a divisor, e.g. "
            f"{_largest_divisor(shape[0], max(int(ghost_size), 1))}."
        )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _output_dtype(x, scale, bias, dtype) -> jnp.dtype:
    if dtype is not None:
        return jnp.dtype(dtype)
    args = [a for a in (x, scale, bias) if a is not None]
    # Flax Linen's rule (jnp.result_type of input and parameters); computed with
    # standard promotion so it also holds under jax_numpy_dtype_promotion=strict.
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*args)


# --------------------------------------------------------------- algorithm


def _separate_reductions(x: jax.Array) -> bool:
    # Measured on XLA:CPU (YNNPACK reductions), float32 and bf16: two
    # reductions that each fuse their own `x - shift` beat one shared,
    # materialised difference (2.3 vs 4.1 ms at (32, 56, 56, 64) f32; bf16
    # forward+backward 1.00x vs 1.28x Flax). On GPU the shared form lets XLA
    # emit one multi-output reduction that reads x once.
    del x
    return jax.default_backend() == "cpu"


def _train_moments(
    parts: tuple[jax.Array, ...],
    mask: jax.Array | None,
    reduction_axes: tuple[int, ...],
    axis_name: AxisName | None,
    axis_index_groups,
    separate: bool,
) -> tuple[tuple[jax.Array, ...], ...]:
    """Exact ``(center, offset, var, count)`` of each real part, keepdims.

    Each device shifts its values by a few of its own samples
    (:func:`bnlab.stats.sample_shift`), takes one pass of shifted sums
    (:func:`bnlab.stats.local_moments`) and, under ``axis_name``, sends its
    ``(count, center, offset, m2)`` in one ``all_gather`` to be merged with
    Chan's formula. No branch, no loop, one read of ``x``, one collective.

    The derivative of ``(mean, var)`` does not depend on how they were
    computed, so a ``custom_jvp`` differentiates the closed form: one psum of
    two per-feature tangent sums, which JAX transposes correctly under pmap,
    shard_map and vmap. Arrays are arguments (not closures) so that higher
    orders trace cleanly.
    """

    @jax.custom_jvp
    def moments(parts, mask):
        out = []
        for x in parts:
            shift = sample_shift(x, reduction_axes, mask)
            out.append(local_moments(x, shift, reduction_axes, mask, separate))
        if axis_name is not None:
            out = _merge_across(out, axis_name, axis_index_groups, mask is None)
        return tuple((m.center, m.offset, m.var, m.count) for m in out)

    @moments.defjvp
    def moments_jvp(primals, tangents):
        parts, mask = primals
        out = moments(parts, mask)
        zero = jnp.zeros((), parts[0].dtype)
        sums = []
        for x, x_dot, (center, offset, _, _) in zip(
            parts, tangents[0], out, strict=True
        ):
            # d var = 2/n sum((x - mean) x_dot) with mean = hi + lo exactly
            # (TwoSum of center + offset): sum((x - hi) x_dot) - lo sum(x_dot),
            # nothing large subtracted. Deliberately not the forward's
            # `x - center`: XLA would materialise a shared full-size
            # subexpression (+40% forward+backward time on CPU).
            hi, lo = _two_sum(center, offset)
            centred = x - hi
            if mask is not None:
                x_dot = jnp.where(mask, x_dot, zero)
                centred = jnp.where(mask, centred, zero)
            sums.append(
                (
                    jnp.sum(x_dot, reduction_axes, keepdims=True),
                    jnp.sum(centred * x_dot, reduction_axes, keepdims=True),
                )
            )
        sums = sum_across(sums, axis_name, axis_index_groups)
        out_dot = []
        for (d_sum, d_cross), (center, offset, _, n) in zip(sums, out, strict=True):
            safe_n = jnp.maximum(n, jnp.ones((), n.dtype))
            d_var = 2.0 * (d_cross - _two_sum(center, offset)[1] * d_sum) / safe_n
            zeros = jnp.zeros_like(center)
            out_dot.append((zeros, d_sum / safe_n, d_var, jnp.zeros_like(n)))
        return out, tuple(out_dot)

    return moments(parts, mask)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a + b`` as ``hi + lo`` exactly (Knuth's TwoSum; per-feature, cheap)."""
    hi = a + b
    b_virtual = hi - a
    lo = (a - (hi - b_virtual)) + (b - b_virtual)
    return hi, lo


def _merge_across(
    local: list[Moments], axis_name: AxisName, axis_index_groups, static_count: bool
) -> list[Moments]:
    """Merges each part's moments over the devices of its statistics group."""
    if static_count:  # every device has the same count: do not send it
        sent = [(m.center, m.offset, m.m2) for m in local]
    else:
        sent = [tuple(m) for m in local]
    gathered = gather_across(sent, axis_name, axis_index_groups)
    out = []
    for m, g in zip(local, gathered, strict=True):
        if static_count:
            g = (jnp.broadcast_to(m.count, g[0].shape), *g)
        out.append(_first(merge_moments(Moments(*g), axis=0)))
    return out


def _real_parts(x: jax.Array) -> tuple[jax.Array, ...]:
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.real(x), jnp.imag(x)
    return (x,)


def _join(parts: Sequence[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else lax.complex(parts[0], parts[1])


def _ghost_view(x, mask, layout: _Layout, ghost_size: int):
    """``x`` as (ghosts, ghost_size, ...): a free reshape; reduction axes move."""
    shape = (x.shape[0] // ghost_size, ghost_size, *x.shape[1:])
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape).reshape(shape)
    reduction = (1, *(a + 1 for a in layout.reduction_axes if a != 0))
    return x.reshape(shape), mask, reduction


def _usable(count, means, var) -> jax.Array:
    """Features whose batch moments can be used: >= 2 values, all finite."""
    ok = (count >= 2) & jnp.isfinite(var)
    for m in means:
        ok = ok & jnp.isfinite(m)
    return ok


def batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float | jax.Array = 0.99,
    epsilon: float | jax.Array = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    dtype: Any = None,
    convention: str = "flax",
    ghost_size: int | None = None,
) -> tuple[jax.Array, BatchStats]:
    """Batch Normalization as a pure function: ``(x, stats) -> (y, new_stats)``.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per feature, where
    ``(mean, var)`` are the batch moments over every axis except ``axis``
    (``train=True``) or the running ``stats`` (``train=False``).

    Algorithm (train mode). Each device shifts its values by the mean of a
    few of its own values per feature, takes one pass of shifted sums and,
    under ``axis_name``, merges per-device ``(count, center, offset, m2)`` with
    Chan's exact formula after one ``all_gather``. No branch, no loop, one
    read of ``x``, one collective forward and one backward; the result does
    not depend on the running statistics. The mean is kept as a float32 pair
    (a data value plus a small offset), so ``x - mean`` is exact to float32
    precision of the deviation, even at ``|mean| = 1e4 * std``.

    Error bound (float32): the relative variance error is about ``c * 2**-24
    * (1 + (mean - shift)**2 / var)`` per device, ``c`` the slowly growing
    summation factor, plus one rounding per merge. For the mean of 8 sampled
    values ``(mean - shift)**2 / var`` is ~1/8 on i.i.d. data (two-pass
    accuracy: 4e-7 max output error at mean 1e4); in the worst case (the
    sampled values are extreme outliers) it is at most the per-device count.
    The output's absolute error is about ``2**-24 * (1 + |mean - shift| /
    std)`` in units of ``scale``. Reductions run in float32 (float64 stays
    float64) from the unrounded input; bf16 inputs are read once in bf16.

    Args:
      x: input array, any float or complex dtype.
      stats: running statistics with the feature shape
        (:func:`bnlab.init_batch_stats`).
      scale: optional ``gamma`` with the feature shape.
      bias: optional ``beta`` with the feature shape.
      train: use (and update) batch statistics; else normalize with ``stats``
        and return them unchanged. A Python bool.
      axis: feature axis or axes (int or tuple), as in Flax.
      momentum: Flax convention ``new = momentum * old + (1 - momentum) *
        batch`` (biased variance); see ``convention``. May be traced (e.g. a
        schedule); a concrete value must lie in [0, 1].
      epsilon: added to the variance; > 0 (may be traced).
      axis_name: pmap / shard_map / vmap axis name (or tuple of names) over
        which statistics are synchronised; None under plain or sharded ``jit``.
      axis_index_groups: groups of indices of ``axis_name`` that share
        statistics (pmap); under shard_map use a 2-D mesh instead.
      mask: boolean array broadcastable to ``x``; only True positions enter
        the statistics. Features with fewer than 2 valid values keep their
        running statistics and are normalized with them. NaN/Inf at masked
        positions reaches neither the statistics, nor valid outputs, nor
        gradients (those positions output ``bias``; elsewhere masked outputs
        are normalized like valid ones, as in Flax).
      dtype: output dtype; default ``result_type(x, scale, bias)`` as Flax Linen
        (so bf16 ``x`` with float32 ``scale`` gives float32).
      convention: ``"flax"`` (default) or ``"torch"``: PyTorch's rule, where
        ``momentum`` weighs the new batch (torch default 0.1) and the running
        variance is unbiased (``var * n / (n - 1)``).
      ghost_size: Ghost Batch Normalization (Hoffer et al. 2017,
        arXiv:1705.08741): split axis 0 into contiguous groups of this many
        examples, each normalized with its own statistics (never across
        devices); the running statistics still move toward the exact
        statistics of the whole (global) batch.

    Returns:
      ``(y, new_stats)``: ``y`` has ``x``'s shape; ``new_stats`` carries no
      gradient. Batch moments that are not finite (e.g. values beyond ~1e19,
      whose squares overflow float32) leave the running statistics unchanged
      and those features are normalized with them.

    Raises:
      TypeError: non-float ``x`` / statistics, non-bool ``mask`` or ``train``,
        badly typed ``axis``.
      ValueError: bad axis, shapes, mask, hyper-parameters, an unbound
        ``axis_name``, a ``ghost_size`` that does not divide the batch, or
        training on a single value per feature.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 5 + 100
      >>> y, stats = bnlab.batch_norm(x, bnlab.init_batch_stats(3), train=True)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
      True
      >>> y_eval, _ = bnlab.batch_norm(x, stats, train=False)
    """
    return _batch_norm(
        x,
        stats,
        scale,
        bias,
        train=train,
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        dtype=dtype,
        convention=convention,
        ghost_size=ghost_size,
        renorm=None,
    )


def _batch_norm(
    x,
    stats,
    scale,
    bias,
    *,
    train,
    axis,
    momentum,
    epsilon,
    axis_name,
    axis_index_groups,
    mask,
    dtype,
    convention,
    ghost_size,
    renorm,
):
    """The one implementation of :func:`batch_norm` and :func:`batch_renorm`
    (``renorm = (r_max, d_max)`` or None)."""
    x, stats, scale, bias, mask, layout = _check_args(
        x, stats, scale, bias, train, axis, mask, dtype, convention, ghost_size
    )
    real_dtype = jnp.float64 if x.real.dtype == jnp.float64 else jnp.float32
    _check_hyper(momentum, epsilon, real_dtype)
    out_dtype = _output_dtype(x, scale, bias, dtype)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        xc = x.astype(jnp.complex128 if real_dtype == jnp.float64 else jnp.complex64)
    else:
        xc = x.astype(real_dtype)  # fused into the consumers: no copy of x
    keep = layout.keep_shape
    run_mean = stats.mean.astype(xc.dtype).reshape(keep)
    run_var = stats.var.astype(real_dtype).reshape(keep)

    if not train:
        y = _normalize(
            xc, None, run_mean, None, run_var, scale, bias, epsilon, keep, axis_name
        )
        return y.astype(out_dtype), stats

    view, view_mask, reduction, param_shape = xc, mask, layout.reduction_axes, keep
    if ghost_size is not None:
        view, view_mask, reduction = _ghost_view(xc, mask, layout, ghost_size)
        param_shape = (1, *keep)
        run_mean, run_var = run_mean[None], run_var[None]
    _check_count(
        x.shape, layout, view.shape, reduction, axis_name, axis_index_groups, ghost_size
    )
    if view_mask is not None:
        view_mask = jnp.broadcast_to(view_mask, view.shape)
    per_part = _train_moments(
        _real_parts(view),
        view_mask,
        reduction,
        axis_name if ghost_size is None else None,  # ghost batches stay local
        axis_index_groups,
        _separate_reductions(x),
    )
    centers, offsets, variances, counts = zip(*per_part, strict=True)
    count, var = counts[0], sum(variances[1:], variances[0])
    center, offset = _join(centers), _join(offsets)
    usable = _usable(count, centers + offsets, var)
    if renorm is not None:
        scale, bias = _renorm_affine(
            center, offset, var, run_mean, run_var, usable, scale, bias, epsilon, renorm
        )
    y = _normalize(
        view,
        view_mask,
        jnp.where(usable, center, run_mean),
        jnp.where(usable, offset, jnp.zeros((), offset.dtype)),
        jnp.where(usable, var, run_var),
        scale,
        bias,
        epsilon,
        param_shape,
        axis_name,
    )
    if ghost_size is not None:
        count, mean, var, usable = _whole_batch(per_part, axis_name, axis_index_groups)
    else:
        mean = center + offset
    fs = layout.feature_shape
    new_stats = ema_update(
        stats,
        mean.reshape(fs),
        var.reshape(fs),
        count.reshape(fs),
        momentum,
        convention,
        valid=usable.reshape(fs),
    )
    return y.reshape(x.shape).astype(out_dtype), new_stats


def batch_moments(
    x: jax.Array,
    *,
    axis: Axes = -1,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
) -> Moments:
    """Exact moments of the (global) batch, per feature, without gradient.

    The statistics :func:`batch_norm` normalizes with in train mode, as
    :class:`bnlab.stats.Moments` ``(count, center, offset, m2)`` with the
    feature shape: ``mean = center + offset``, ``var = m2 / count``. Merge
    several with :func:`bnlab.stats.merge_moments` (e.g. over the batches of
    a dataset: :func:`bnlab.precise_stats`). Real inputs only.

    Example:
      >>> import jax.numpy as jnp, bnlab
      >>> m = bnlab.batch_moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
      >>> m.mean.tolist(), m.var.tolist()
      ([2.0, 20.0], [1.0, 100.0])
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError("batch_moments: complex inputs are not supported.")
    layout = _layout(x.shape, axis)
    fs = layout.feature_shape
    stats = BatchStats(jnp.zeros(fs), jnp.ones(fs))
    x, stats, _, _, mask, layout = _check_args(
        x, stats, None, None, True, axis, mask, None, "flax", None
    )
    real_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    xc = lax.stop_gradient(x.astype(real_dtype))
    _check_count(
        x.shape,
        layout,
        x.shape,
        layout.reduction_axes,
        axis_name,
        axis_index_groups,
        None,
    )
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    shift = sample_shift(xc, layout.reduction_axes, mask)
    m = local_moments(xc, shift, layout.reduction_axes, mask, _separate_reductions(x))
    if axis_name is not None:
        (m,) = _merge_across([m], axis_name, axis_index_groups, mask is None)
    return Moments(*(a.reshape(fs) for a in m))


def _check_count(shape, layout, view_shape, reduction, axis_name, groups, ghost_size):
    """A batch needs >= 2 values per feature (per ghost batch) to train on."""
    local = math.prod(view_shape[a] for a in reduction)
    count = local if ghost_size is not None else local * sync_size(axis_name, groups)
    if count >= 2:
        return
    raise ValueError(
        f"batch_norm(train=True) got x of shape {shape} with feature axes "
        f"{layout.feature_axes}: {count} value per feature"
        + (f" per ghost batch of {ghost_size}" if ghost_size is not None else "")
        + (f" across axis {axis_name!r}" if axis_name is not None else "")
        + ". Its batch variance is 0, so every output would equal `bias` and the "
        "running variance would decay to 0. Train on batches of at least 2 "
        "examples, synchronise statistics across devices with axis_name, or use "
        "train=False (running statistics)."
    )


def _whole_batch(per_part, axis_name, axis_index_groups):
    """Exact moments of the whole (global) batch from the ghost batches'."""
    merged = [
        _first(merge_moments(Moments(n, c, o, v * n), axis=0))
        for c, o, v, n in lax.stop_gradient(per_part)
    ]
    if axis_name is not None:
        merged = _merge_across(merged, axis_name, axis_index_groups, False)
    count = merged[0].count
    var = sum((m.var for m in merged[1:]), merged[0].var)
    means = [m.mean for m in merged]
    return count, _join(means), var, _usable(count, means, var)


def variant_batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    renorm: bool = False,
    r_max: Any = 3.0,
    d_max: Any = 5.0,
    convention: str = "flax",
    ghost_size: int | None = None,
    **common: Any,
) -> tuple[jax.Array, BatchStats]:
    """:func:`batch_renorm` when ``renorm`` (in training), else
    :func:`batch_norm`: the one call of the Flax modules, whose options pick
    the variant. ``common`` holds the keywords both share."""
    if renorm and ghost_size is not None:
        raise ValueError("batch_norm: renorm and ghost_size cannot be combined.")
    if renorm and common.get("train"):
        return batch_renorm(x, stats, scale, bias, r_max=r_max, d_max=d_max, **common)
    return batch_norm(
        x, stats, scale, bias, convention=convention, ghost_size=ghost_size, **common
    )


def _renorm_affine(
    center, offset, var, run_mean, run_var, usable, scale, bias, epsilon, renorm
):
    """Batch Renormalization's r and d folded into the affine parameters:
    ``((x - mu_B) / sigma_B * r + d) * gamma + beta`` is BN with
    ``gamma' = gamma * r`` and ``beta' = beta + gamma * d``."""
    r_max, d_max = renorm
    real = var.dtype
    eps = jnp.asarray(epsilon, real)
    sigma = jnp.sqrt(run_var + eps)
    r = jnp.sqrt(var + eps) / sigma
    d = ((center - run_mean) + offset) / sigma  # batch mean - running mean
    r_max = jnp.asarray(r_max, real)
    d_max = jnp.asarray(d_max, real)
    r = lax.stop_gradient(jnp.where(usable, jnp.clip(r, 1 / r_max, r_max), 1))
    d = lax.stop_gradient(jnp.where(usable, jnp.clip(d, -d_max, d_max), 0))
    gamma = jnp.ones_like(r) if scale is None else scale.astype(real).reshape(r.shape)
    beta = jnp.zeros_like(d) if bias is None else bias.astype(real).reshape(d.shape)
    return gamma * r, beta + gamma * d


def batch_renorm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    train: bool,
    r_max: float | jax.Array = 3.0,
    d_max: float | jax.Array = 5.0,
    axis: Axes = -1,
    momentum: float | jax.Array = 0.99,
    epsilon: float | jax.Array = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: jax.Array | None = None,
    dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Batch Renormalization (Ioffe 2017, arXiv:1702.03275).

    In training ``y = ((x - mu_B) / sigma_B * r + d) * scale + bias`` with
    ``sigma_B = sqrt(var_B + epsilon)``, ``sigma = sqrt(running var +
    epsilon)``, ``r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))``
    and ``d = stop_gradient(clip((mu_B - running mean) / sigma, -d_max,
    d_max))``: the output the network sees in training is corrected toward
    the one it will see at inference, which matters for small or non-i.i.d.
    batches. With ``r_max = 1, d_max = 0`` it is :func:`batch_norm`; when the
    batch's statistics equal the running ones, training and inference
    outputs are equal. Evaluation and the running-statistics update are those
    of :func:`batch_norm` (same exact, synced moments). ``r_max`` / ``d_max``
    may be traced, e.g. from :func:`bnlab.renorm_schedules`.

    Args:
      x: input (real).
      stats: running statistics.
      scale: optional ``gamma``.
      bias: optional ``beta``.
      train: batch statistics with the renorm correction (and update), or
        running statistics.
      r_max: bound of ``r`` (>= 1).
      d_max: bound of ``|d|`` (>= 0).
      axis: feature axis or axes.
      momentum: running-statistics momentum (Flax convention).
      epsilon: added to the variances.
      axis_name: synchronise the batch statistics over this axis.
      axis_index_groups: device groups (pmap).
      mask: boolean mask of valid positions.
      dtype: output dtype.

    Returns:
      ``(y, new_stats)`` as :func:`batch_norm`.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 2.0
      >>> y, s = bnlab.batch_renorm(x, bnlab.init_batch_stats(3), train=True)
      >>> y0, _ = bnlab.batch_norm(x, bnlab.init_batch_stats(3), train=True)
      >>> bool(jnp.allclose(y, y0))  # fresh stats: r, d clipped away from BN
      False
    """
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(f"batch_renorm: train={train!r} must be a Python bool.")
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        v = _concrete(value)
        if v is not None and not v >= low:
            raise ValueError(f"batch_renorm: {name}={value} must be >= {low:g}.")
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.complexfloating):
        raise TypeError("batch_renorm: complex inputs are not supported.")
    return _batch_norm(
        x,
        stats,
        scale,
        bias,
        train=train,
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mask=mask,
        dtype=dtype,
        convention="flax",
        ghost_size=None,
        renorm=(r_max, d_max) if train else None,
    )


def _first(m: Moments) -> Moments:
    return Moments(*(a[0] for a in m))


def _normalize(
    x, mask, center, offset, var, scale, bias, epsilon, param_shape, axis_name
) -> jax.Array:
    """``(x - center) * inv + (bias - offset * inv)``: one subtract and one FMA
    per element, like Flax's fast path; the small offset folds into the
    per-feature constant, so it costs no accuracy."""
    dt = x.dtype
    inv = lax.rsqrt(var + jnp.asarray(epsilon, var.dtype)).astype(dt)
    if scale is not None:
        inv = inv * scale.astype(dt).reshape(param_shape)
    bias_term = jnp.zeros_like(inv) if offset is None else -offset.astype(dt) * inv
    if bias is not None:
        bias_term = bias_term + bias.astype(dt).reshape(param_shape)
    fill = jnp.zeros_like(inv) if offset is None else offset.astype(dt)
    # Under shard_map, cast the replicated per-feature values to per-device
    # together: their backward is then one psum for the layer, not one each.
    center, inv, bias_term, fill = match_varying(
        (center.astype(dt), inv, bias_term, fill), x, axis_name
    )
    centred = x - center
    if mask is not None:
        # A NaN/Inf at a masked position would give NaN gradients to scale and
        # to every valid x (0 * NaN in the backward sums): output `bias` there.
        centred = jnp.where(jnp.isfinite(centred) | mask, centred, fill)
    return centred * inv + bias_term
