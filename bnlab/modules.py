"""The one call body of the Flax drop-ins (``bnlab.linen`` and ``bnlab.nnx``).

Each module owns its variables (creation, storage, Flax's flags); what
happens to an input is :func:`layer_batch_norm`, the same for both. No Flax
import here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from bnlab.batch_norm import variant_batch_norm
from bnlab.checks import feature_layout, output_dtype
from bnlab.stats import BatchStats

__all__ = [
    "BatchNormFields",
    "as_float_input",
    "layer_batch_norm",
    "single_value_output",
]


class BatchNormFields(Protocol):
    """The options a bnlab BN module has (Linen fields, NNX attributes)."""

    axis: Any
    momentum: Any
    epsilon: Any
    dtype: Any
    axis_name: Any
    axis_index_groups: Any
    convention: str
    ghost_size: int | None
    renorm: bool
    r_max: Any
    d_max: Any


def as_float_input(x: Any) -> jax.Array:
    """Integer / bool inputs as float32, as Flax does; floats unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnlab.modules import as_float_input
      >>> as_float_input(jnp.arange(3)).dtype
      dtype('float32')
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.float32)
    return x


def single_value_output(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    epsilon: Any,
    axis: Any,
    dtype: Any,
) -> jax.Array:
    """What Flax returns for one value per feature: ``(x - x) * scale /
    sqrt(eps) + bias``, i.e. ``bias``, with Flax's (zero) gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnlab.modules import single_value_output
      >>> single_value_output(jnp.ones((1, 2)), None, jnp.array([0.5, -1.0]),
      ...                     epsilon=1e-5, axis=-1, dtype=None)
      Array([[ 0.5, -1. ]], dtype=float32)
    """
    keep = feature_layout(x.shape, axis).keep_shape
    dt = jnp.promote_types(x.dtype, jnp.float32)
    xc = x.astype(dt)
    inv = jax.lax.rsqrt(jnp.asarray(epsilon, dt))
    if scale is not None:
        inv = inv * scale.astype(dt).reshape(keep)
    y = (xc - xc) * inv
    if bias is not None:
        y = y + bias.astype(dt).reshape(keep)
    return y.astype(output_dtype(x, scale, bias, dtype))


def _warn_single_value(module: str, shape: tuple[int, ...]) -> None:
    warnings.warn(
        f"{module}: a training batch of shape {shape} has one value per feature, "
        "so it has no batch statistics: the output is `bias` (as in Flax) and "
        "the running statistics are left unchanged.",
        UserWarning,
        stacklevel=4,
    )


def layer_batch_norm(
    layer: BatchNormFields,
    x: jax.Array,
    stats: BatchStats,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    train: bool,
    freeze_affine: bool = False,
    initializing: bool = False,
    mask: jax.Array | None = None,
    r_max: Any = None,
    d_max: Any = None,
    module: str,
) -> tuple[jax.Array, BatchStats | None]:
    """One call of a bnlab BN module with the options of ``layer``.

    Args:
      layer: the module (its fields: :class:`BatchNormFields`).
      x: the input (integers are normalized as float32, as in Flax).
      stats: the current running statistics.
      scale: ``gamma`` or None.
      bias: ``beta`` or None.
      train: batch statistics (and an update), or the running ones; the
        module has already applied ``use_running_average`` and freezing.
      freeze_affine: no gradient to ``scale`` / ``bias``.
      initializing: Flax's init: no sync, no variant, no update, and a single
        example is fine (as in Flax).
      mask: boolean mask of the positions that enter the statistics.
      r_max: per-call override of ``layer.r_max`` (batch renorm).
      d_max: per-call override of ``layer.d_max``.
      module: the module's name, for warnings.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is None when the module must store
      nothing (eval, frozen, init, or a batch with one value per feature,
      which returns ``bias`` as Flax does, with a warning).

    Example:
      >>> import jax.numpy as jnp, bnlab.linen
      >>> from bnlab.modules import layer_batch_norm
      >>> layer = bnlab.linen.BatchNorm()
      >>> y, new = layer_batch_norm(layer, jnp.arange(6.0).reshape(3, 2),
      ...     bnlab.init_batch_stats(2), None, None, train=True, module="demo")
      >>> [round(m, 4) for m in new.mean.tolist()]  # 0.99 * 0 + 0.01 * batch mean
      [0.02, 0.03]
    """
    x = as_float_input(x)
    if freeze_affine:
        scale, bias = jax.lax.stop_gradient((scale, bias))
    layout = feature_layout(x.shape, layer.axis)
    axis_name = None if initializing else layer.axis_name
    groups = None if initializing else layer.axis_index_groups
    per_feature = math.prod(x.shape) // max(math.prod(layout.feature_shape), 1)
    if train and per_feature < 2 and axis_name is None:
        # No batch statistics: Flax's output, running statistics kept. (At
        # init, a single dummy example is common: no warning then.)
        if not initializing:
            _warn_single_value(module, x.shape)
        y = single_value_output(
            x,
            scale,
            bias,
            epsilon=layer.epsilon,
            axis=layout.feature_axes,
            dtype=layer.dtype,
        )
        return y, None
    y, new_stats = variant_batch_norm(
        x,
        stats,
        scale,
        bias,
        renorm=layer.renorm and not initializing,
        r_max=layer.r_max if r_max is None else r_max,
        d_max=layer.d_max if d_max is None else d_max,
        convention=layer.convention,
        ghost_size=None if initializing else layer.ghost_size,
        train=train,
        axis=layout.feature_axes,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        axis_name=axis_name,
        axis_index_groups=groups,
        mask=mask,
        dtype=layer.dtype,
    )
    return y, new_stats if train and not initializing else None
