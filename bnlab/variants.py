"""BN for inference and fine-tuning: frozen BN, folding, renorm schedules.

Ghost BN is the ``ghost_size`` keyword of :func:`bnlab.batch_norm`, batch
renormalization is :func:`bnlab.batch_renorm`, PreciseBN is
:func:`bnlab.precise_stats`; this module holds the rest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnlab.batch_norm import batch_norm
from bnlab.checks import check_epsilon
from bnlab.stats import BatchStats

__all__ = ["fold_batch_norm", "frozen_batch_norm", "renorm_schedules"]


def fold_batch_norm(
    kernel: jax.Array,
    bias: jax.Array | None,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bn_bias: jax.Array | None = None,
    *,
    epsilon: float | jax.Array = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference-mode BN into the preceding Dense or Conv layer.

    ``BN(x @ kernel + bias)`` with running statistics equals ``x @ kernel' +
    bias'`` for ``kernel' = kernel * s`` and ``bias' = (bias - mean) * s +
    bn_bias`` with ``s = scale / sqrt(var + epsilon)`` per output feature:
    one layer less at inference (Jacob et al. 2018, arXiv:1712.05877,
    sec. 3.2). The kernel's last axis is the output-feature axis (Flax's
    ``Dense`` and ``Conv`` layouts).

    Args:
      kernel: ``(..., features)`` kernel of the preceding layer.
      bias: its bias ``(features,)``, or None for a layer without bias.
      stats: the BN's running statistics.
      scale: the BN's ``gamma`` (None: 1).
      bn_bias: the BN's ``beta`` (None: 0).
      epsilon: the BN's epsilon.

    Invalid running statistics fold as :func:`bnlab.batch_norm` evaluates
    them: a negative variance counts as 0 (``s = scale / sqrt(epsilon)``), an
    infinite one gives ``s = 0``, and a NaN variance or mean gives NaN in that
    feature's column of ``kernel'`` / entry of ``bias'``, by design. A traced
    ``epsilon`` that is NaN or <= 0 gives NaN everywhere.

    Returns:
      ``(kernel', bias')`` in the kernel's dtype (computed in float32 or
      wider).

    Raises:
      ValueError: the statistics or BN parameters do not have the kernel's
        output-feature shape, or a concrete ``epsilon`` is not > 0.
      TypeError: ``epsilon`` is not one real number.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab
      >>> k = jax.random.normal(jax.random.key(0), (4, 3))
      >>> s = bnlab.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 1.0, 9.0]))
      >>> k2, b2 = bnlab.fold_batch_norm(k, None, s)
      >>> x = jnp.ones((2, 4))
      >>> y, _ = bnlab.batch_norm(x @ k, s, train=False)
      >>> bool(jnp.allclose(x @ k2 + b2[None], y, atol=1e-5))
      True
    """
    kernel = jnp.asarray(kernel)
    f = kernel.shape[-1]
    for name, a in (
        ("stats.mean", stats.mean),
        ("stats.var", stats.var),
        ("bias", bias),
        ("scale", scale),
        ("bn_bias", bn_bias),
    ):
        if a is not None and tuple(jnp.shape(a)) != (f,):
            raise ValueError(
                f"fold_batch_norm: {name} has shape {tuple(jnp.shape(a))}, but the "
                f"kernel's last (output-feature) axis has {f} features."
            )
    dt = jnp.promote_types(kernel.dtype, jnp.float32)
    epsilon_traced = check_epsilon(epsilon, dt, fn="fold_batch_norm")
    eps = jnp.asarray(epsilon, dt)
    s = lax.rsqrt(jnp.maximum(jnp.asarray(stats.var, dt), jnp.zeros((), dt)) + eps)
    if epsilon_traced:
        s = jnp.where(eps > 0, s, jnp.full((), jnp.nan, dt))
    if scale is not None:
        s = s * jnp.asarray(scale, dt)
    b = jnp.zeros((f,), dt) if bias is None else jnp.asarray(bias, dt)
    b = (b - jnp.asarray(stats.mean, dt)) * s
    if bn_bias is not None:
        b = b + jnp.asarray(bn_bias, dt)
    s_k = s.reshape((1,) * (kernel.ndim - 1) + (f,))  # per output feature
    return (kernel.astype(dt) * s_k).astype(kernel.dtype), b.astype(kernel.dtype)


def frozen_batch_norm(
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    axis: Any = -1,
    epsilon: float = 1e-5,
    freeze_affine: bool = False,
    axis_name: Any = None,
    dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
    """Frozen BN: normalize with the running statistics, update nothing.

    What detection models fine-tune with (small per-device batches make batch
    statistics useless; Wu & Johnson 2021, arXiv:2105.07576, sec. 5): the
    layer is the affine map of inference mode, in training too. No gradient
    reaches the statistics; with ``freeze_affine`` none reaches ``scale`` /
    ``bias`` either.

    Returns:
      ``(y, stats)`` with ``stats`` unchanged.

    Example:
      >>> import jax.numpy as jnp, bnlab
      >>> s = bnlab.BatchStats(jnp.array([1.0]), jnp.array([4.0]))
      >>> y, same = bnlab.frozen_batch_norm(jnp.array([[3.0]]), s, epsilon=0.0001)
      >>> round(float(y[0, 0]), 3)
      1.0
    """
    stats = jax.tree.map(lax.stop_gradient, stats)
    if freeze_affine:
        scale, bias = jax.tree.map(lax.stop_gradient, (scale, bias))
    y, _ = batch_norm(
        x,
        stats,
        scale,
        bias,
        train=False,
        axis=axis,
        epsilon=epsilon,
        axis_name=axis_name,
        dtype=dtype,
    )
    return y, stats


def renorm_schedules(
    *,
    warmup_steps: int = 5000,
    r_max: float = 3.0,
    r_max_step: int = 40000,
    d_max: float = 5.0,
    d_max_step: int = 25000,
):
    """Batch renorm's relaxation schedule as two optax schedules.

    Ioffe 2017 (arXiv:1702.03275, sec. 4.1): ``r_max = 1, d_max = 0`` (plain
    BN) for ``warmup_steps``, then linearly to ``r_max`` at ``r_max_step`` and
    ``d_max`` at ``d_max_step``.

    Returns:
      ``(r_max_schedule, d_max_schedule)``, each ``step -> value``, usable
      inside jit (pass the values to :func:`bnlab.batch_renorm`).

    Example:
      >>> import bnlab
      >>> r, d = bnlab.renorm_schedules()
      >>> float(r(0)), float(r(40000)), float(d(15000)), float(d(30000))
      (1.0, 3.0, 2.5, 5.0)
    """
    import optax

    if not 0 <= warmup_steps < min(r_max_step, d_max_step):
        raise ValueError(
            f"renorm_schedules: warmup_steps={warmup_steps} must be >= 0 and "
            "before r_max_step and d_max_step."
        )
    r = optax.join_schedules(
        [
            optax.constant_schedule(1.0),
            optax.linear_schedule(1.0, r_max, r_max_step - warmup_steps),
        ],
        [warmup_steps],
    )
    d = optax.join_schedules(
        [
            optax.constant_schedule(0.0),
            optax.linear_schedule(0.0, d_max, d_max_step - warmup_steps),
        ],
        [warmup_steps],
    )
    return r, d
