"""``batch_norm``: check -> local moments -> merge across devices -> normalize.

Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167) as one pure
function with explicit running statistics. The argument checks are
:mod:`bnlab.checks`; the per-feature arithmetic is :mod:`bnlab.stats`; what
crosses devices is :mod:`bnlab.collectives`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnlab.checks import (
    Layout,
    check_count,
    check_epsilon,
    check_ghost,
    check_input,
    check_momentum,
    check_options,
    check_params,
    check_renorm_bounds,
    output_dtype,
)
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
    "variant_batch_norm",
]

Axes = int | Sequence[int]

# The one message for renorm together with ghost_size, from the function and
# from both modules (``str.format`` with ``fn`` and ``ghost_size``).
RENORM_WITH_GHOST = (
    "{fn}: renorm=True and ghost_size={ghost_size!r} cannot be combined (batch "
    "renormalization is implemented for whole batches, not ghost batches). "
    "Set renorm=False or ghost_size=None."
)


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
    *,
    reduction_axes: tuple[int, ...],
    axis_name: AxisName | None,
    axis_index_groups,
    separate: bool,
) -> tuple[tuple[jax.Array, ...], ...]:
    """Exact ``(center, offset, var, count)`` of each real part, keepdims.

    Each device shifts its values by the median of a few of its own values
    per feature (:func:`bnlab.stats.sample_shift`), takes one pass of shifted sums
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


def _ghost_view(x, mask, layout: Layout, ghost_size: int):
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


def _first(m: Moments) -> Moments:
    return Moments(*(a[0] for a in m))


def _real_dtype(x: jax.Array) -> Any:
    """Reductions run in float32, or float64 for float64 (complex128) input."""
    return jnp.float64 if x.real.dtype == jnp.float64 else jnp.float32


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

    Algorithm (train mode). Each device shifts its values by the median of 8
    of its own values per feature (32 with a mask; sampled at strided
    positions, :func:`bnlab.stats.sample_shift`), takes one pass of shifted
    sums and, under ``axis_name``, merges per-device ``(count, center, offset,
    m2)`` with Chan's exact formula after one ``all_gather``. No branch, no
    loop, one read of ``x``, one collective forward and one backward; the
    result does not depend on the running statistics. The mean is kept as a
    float32 pair (a data value plus a small offset), so ``x - mean`` is exact
    to float32 precision of the deviation, even at ``|mean| = 1e4 * std``.

    Error bound (float32): the relative variance error is about ``c * 2**-24
    * (1 + (mean - shift)**2 / var)`` per device, ``c`` the slowly growing
    summation factor, plus one rounding per merge. For the median of 8
    sampled values ``(mean - shift)**2 / var`` is about ``pi / 16 = 0.2`` on
    i.i.d. normal data (two-pass accuracy: 4e-7 max output error at mean
    1e4); the median ignores a minority of outliers among the samples, and in
    the worst case (most sampled values are extreme outliers) the term is at
    most the per-device count. The output's absolute error is about ``2**-24
    * (1 + |mean - shift| / std)`` in units of ``scale``. Reductions run in
    float32 (float64 stays float64) from the unrounded input; bf16 inputs are
    read once in bf16.

    Invalid values. Traced hyper-parameters (e.g. schedules inside ``jit``)
    cannot be checked at trace time, so the running statistics stay valid
    for any value instead: an update is skipped (the old statistics are
    kept) when ``momentum`` is outside [0, 1] or NaN, and per feature when
    the new mean or variance would not be finite or the variance would be
    negative. A traced ``epsilon`` that is NaN or <= 0 makes every output
    NaN, so the loss shows it (the running-statistics update does not use
    ``epsilon``). Invalid running statistics (in eval, or for a feature
    without usable batch moments) never become a silent NaN: a negative
    running variance is taken as 0 (the divisor is ``sqrt(epsilon)``) and
    an infinite one outputs ``bias``; a NaN running variance or mean has no
    value to fall back on, so that feature's outputs are NaN, by design (no
    update ever writes one).

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
        batch`` (biased variance); see ``convention``. One real number; may be
        traced (e.g. a schedule: see above); a concrete value must lie in
        [0, 1].
      epsilon: added to the variance; one real number > 0 (may be traced).
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
        badly typed ``axis``, a ``momentum`` / ``epsilon`` that is not one
        real number (a string, an array of several values).
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
      >>> # A traced momentum outside [0, 1] keeps the running statistics:
      >>> f = jax.jit(lambda x, s, m: bnlab.batch_norm(x, s, train=True, momentum=m))
      >>> _, same = f(x, stats, 1.5)
      >>> bool(jnp.array_equal(same.var, stats.var))
      True
    """
    shared = _Shared(
        train, axis, momentum, epsilon, axis_name, axis_index_groups, mask, dtype
    )
    return _batch_norm(
        x,
        stats,
        scale,
        bias,
        shared=shared,
        convention=convention,
        ghost_size=ghost_size,
    )


class _Shared(NamedTuple):
    """The keywords :func:`batch_norm` and :func:`batch_renorm` share (in
    their signatures' order), passed to ``_batch_norm`` as one value."""

    train: bool
    axis: Axes
    momentum: float | jax.Array
    epsilon: float | jax.Array
    axis_name: AxisName | None
    axis_index_groups: Sequence[Sequence[int]] | None
    mask: jax.Array | None
    dtype: Any


def _batch_norm(
    x,
    stats,
    scale,
    bias,
    *,
    shared: _Shared,
    convention="flax",
    ghost_size=None,
    renorm=None,
    fn="batch_norm",
):
    """The one implementation of :func:`batch_norm` and :func:`batch_renorm`
    (``renorm = (r_max, d_max)`` or None)."""
    train, axis, momentum, epsilon, axis_name, axis_index_groups, mask, dtype = shared
    check_options(train=train, convention=convention, dtype=dtype, fn=fn)
    x, mask, layout = check_input(x, axis=axis, mask=mask, fn=fn)
    complex_x = jnp.issubdtype(x.dtype, jnp.complexfloating)
    stats, scale, bias = check_params(
        stats, scale, bias, layout, complex_x=complex_x, fn=fn
    )
    if ghost_size is not None and train:  # ghost batches exist only in training
        check_ghost(ghost_size, x.shape, layout, fn=fn)
    if train:  # the statistics axis, checked here to name the caller
        sync_size(axis_name, axis_index_groups, fn=fn)
    real_dtype = _real_dtype(x)
    check_momentum(momentum, fn=fn)  # a traced one: guarded in ema_update
    epsilon_traced = check_epsilon(epsilon, real_dtype, fn=fn)
    out_dtype = output_dtype(x, scale, bias, dtype)
    if complex_x:
        xc = x.astype(jnp.complex128 if real_dtype == jnp.float64 else jnp.complex64)
    else:
        xc = x.astype(real_dtype)  # fused into the consumers: no copy of x
    keep = layout.keep_shape
    run_mean = stats.mean.astype(xc.dtype).reshape(keep)
    run_var = stats.var.astype(real_dtype).reshape(keep)
    norm = {
        "scale": scale,
        "bias": bias,
        "epsilon": epsilon,
        "check_epsilon": epsilon_traced,
        "axis_name": axis_name,
    }

    if not train:
        y = _normalize(
            xc,
            mask=None,
            center=run_mean,
            offset=None,
            var=run_var,
            param_shape=keep,
            **norm,
        )
        return y.astype(out_dtype), stats

    view, view_mask, reduction, param_shape = xc, mask, layout.reduction_axes, keep
    if ghost_size is not None:
        view, view_mask, reduction = _ghost_view(xc, mask, layout, ghost_size)
        param_shape = (1, *keep)
        run_mean, run_var = run_mean[None], run_var[None]
    check_count(
        shape=x.shape,
        layout=layout,
        view_shape=view.shape,
        reduction=reduction,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_size=ghost_size,
        fn=fn,
    )
    if view_mask is not None:
        view_mask = jnp.broadcast_to(view_mask, view.shape)
    per_part = _train_moments(
        _real_parts(view),
        view_mask,
        reduction_axes=reduction,
        axis_name=axis_name if ghost_size is None else None,  # ghost: stay local
        axis_index_groups=axis_index_groups,
        separate=_separate_reductions(x),
    )
    centers, offsets, variances, counts = zip(*per_part, strict=True)
    count, var = counts[0], sum(variances[1:], variances[0])
    center, offset = _join(centers), _join(offsets)
    usable = _usable(count, centers + offsets, var)
    if renorm is not None:
        norm["scale"], norm["bias"] = _renorm_affine(
            batch_center=center,
            batch_offset=offset,
            batch_var=var,
            run_mean=run_mean,
            run_var=run_var,
            usable=usable,
            scale=scale,
            bias=bias,
            epsilon=epsilon,
            r_max=renorm[0],
            d_max=renorm[1],
        )
    y = _normalize(
        view,
        mask=view_mask,
        center=jnp.where(usable, center, run_mean),
        offset=jnp.where(usable, offset, jnp.zeros((), offset.dtype)),
        var=jnp.where(usable, var, run_var),
        param_shape=param_shape,
        **norm,
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

    Args:
      x: real input.
      axis: feature axis or axes.
      axis_name: merge the moments over this axis (as :func:`batch_norm`).
      axis_index_groups: device groups (pmap).
      mask: boolean, broadcastable to ``x``: positions that count.

    Returns:
      :class:`bnlab.stats.Moments` with the feature shape.

    Raises:
      TypeError / ValueError: as :func:`batch_norm` for ``x``, ``axis``,
        ``mask`` and ``axis_name``, naming ``batch_moments``.

    Example:
      >>> import jax.numpy as jnp, bnlab
      >>> m = bnlab.batch_moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
      >>> m.mean.tolist(), m.var.tolist()
      ([2.0, 20.0], [1.0, 100.0])
    """
    fn = "batch_moments"
    x, mask, layout = check_input(x, axis=axis, mask=mask, fn=fn, complex_ok=False)
    sync_size(axis_name, axis_index_groups, fn=fn)  # its errors name batch_moments
    check_count(
        shape=x.shape,
        layout=layout,
        view_shape=x.shape,
        reduction=layout.reduction_axes,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        fn=fn,
    )
    xc = lax.stop_gradient(x.astype(_real_dtype(x)))
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    shift = sample_shift(xc, layout.reduction_axes, mask)
    m = local_moments(xc, shift, layout.reduction_axes, mask, _separate_reductions(x))
    if axis_name is not None:
        (m,) = _merge_across([m], axis_name, axis_index_groups, mask is None)
    return Moments(*(a.reshape(layout.feature_shape) for a in m))


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
    the variant. ``common`` holds the keywords both share.

    Example:
      >>> import jax.numpy as jnp, bnlab
      >>> from bnlab.batch_norm import variant_batch_norm
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> y, _ = variant_batch_norm(x, bnlab.init_batch_stats(2), None, None,
      ...                           renorm=True, r_max=1.0, d_max=0.0, train=True)
      >>> bool(jnp.allclose(y, bnlab.batch_norm(x, bnlab.init_batch_stats(2),
      ...                                       train=True)[0]))
      True
    """
    if renorm and ghost_size is not None:
        raise ValueError(
            RENORM_WITH_GHOST.format(fn="variant_batch_norm", ghost_size=ghost_size)
        )
    if renorm and common.get("train"):
        return batch_renorm(x, stats, scale, bias, r_max=r_max, d_max=d_max, **common)
    return batch_norm(
        x, stats, scale, bias, convention=convention, ghost_size=ghost_size, **common
    )


def _renorm_affine(
    *,
    batch_center,
    batch_offset,
    batch_var,
    run_mean,
    run_var,
    usable,
    scale,
    bias,
    epsilon,
    r_max,
    d_max,
):
    """Batch Renormalization's r and d folded into the affine parameters:
    ``((x - mu_B) / sigma_B * r + d) * gamma + beta`` is BN with
    ``gamma' = gamma * r`` and ``beta' = beta + gamma * d``."""
    real = batch_var.dtype
    eps = jnp.asarray(epsilon, real)
    sigma = jnp.sqrt(jnp.maximum(run_var, jnp.zeros((), real)) + eps)
    r = jnp.sqrt(batch_var + eps) / sigma
    d = ((batch_center - run_mean) + batch_offset) / sigma  # batch - running mean
    # A traced bound that is invalid (r_max < 1, d_max < 0, NaN) acts as the
    # tightest valid one (plain BN) instead of an inverted or NaN clip.
    r_max = jnp.asarray(r_max, real)
    d_max = jnp.asarray(d_max, real)
    r_max = jnp.where(r_max >= 1, r_max, jnp.ones((), real))
    d_max = jnp.where(d_max >= 0, d_max, jnp.zeros((), real))
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
    may be traced, e.g. from :func:`bnlab.renorm_schedules`; a traced bound
    that is invalid (``r_max < 1``, ``d_max < 0`` or NaN) acts as the
    tightest valid one (1, resp. 0).

    Invalid values are handled as in :func:`batch_norm`: a traced
    ``momentum`` outside [0, 1] or NaN, or an update that would make a
    feature's statistics non-finite or its variance negative, keeps the old
    running statistics; a traced ``epsilon`` that is NaN or <= 0 makes every
    output NaN; a negative running variance counts as 0. Training outputs
    depend on the running statistics here, so a NaN running mean or variance
    gives NaN outputs for that feature in training too, by design.

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

    Raises:
      TypeError / ValueError: as :func:`batch_norm`; also for ``r_max`` /
        ``d_max`` that are not one real number, or concrete and out of range.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) + 2.0
      >>> y, s = bnlab.batch_renorm(x, bnlab.init_batch_stats(3), train=True)
      >>> y0, _ = bnlab.batch_norm(x, bnlab.init_batch_stats(3), train=True)
      >>> bool(jnp.allclose(y, y0))  # fresh stats: r, d clipped away from BN
      False
    """
    fn = "batch_renorm"
    check_options(train=train, fn=fn)
    check_renorm_bounds(r_max, d_max, fn=fn)
    check_input(x, axis=axis, mask=mask, fn=fn, complex_ok=False)
    shared = _Shared(
        train, axis, momentum, epsilon, axis_name, axis_index_groups, mask, dtype
    )
    renorm = (r_max, d_max) if train else None
    return _batch_norm(x, stats, scale, bias, shared=shared, renorm=renorm, fn=fn)


def _normalize(
    x,
    *,
    mask,
    center,
    offset,
    var,
    scale,
    bias,
    epsilon,
    check_epsilon,
    param_shape,
    axis_name,
) -> jax.Array:
    """``(x - center) * inv + (bias - offset * inv)``: one subtract and one FMA
    per element, like Flax's fast path; the small offset folds into the
    per-feature constant, so it costs no accuracy.

    A negative ``var`` (only ever from the caller's running statistics)
    counts as 0; with ``check_epsilon`` (a traced epsilon) an epsilon that is
    NaN or <= 0 gives NaN everywhere, on purpose."""
    dt = x.dtype
    real = var.dtype
    eps = jnp.asarray(epsilon, real)
    inv = lax.rsqrt(jnp.maximum(var, jnp.zeros((), real)) + eps)
    if check_epsilon:
        inv = jnp.where(eps > 0, inv, jnp.full((), jnp.nan, real))
    inv = inv.astype(dt)
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
