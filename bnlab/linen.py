"""``bnlab.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Same fields, defaults, call signature, collections and variable names
(``params/{scale,bias}``, ``batch_stats/{mean,var}``), so a Flax variable tree
loads unchanged. The module owns variables only; the math is
:func:`bnlab.batch_norm`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from bnlab.batch_norm import batch_norm, canonical_axes
from bnlab.stats import BatchStats

__all__ = ["BatchNorm"]


class BatchNorm(nn.Module):
    """Batch Normalization (arXiv:1502.03167), Flax Linen interface.

    Replace ``flax.linen.BatchNorm`` with ``bnlab.linen.BatchNorm``: outputs
    match Flax's two-pass mode to float32 rounding, and stay exact where
    Flax's default fast variance breaks (``|mean| >> std``), with uneven masks
    under sync, with all-masked features, and in bf16.

    Attributes:
      use_running_average: normalize with the stored running statistics (eval).
      axis: feature axis or axes.
      momentum: ``new = momentum * old + (1 - momentum) * batch``.
      epsilon: added to the variance.
      dtype: output dtype (default ``result_type(x, scale, bias)``, as Flax).
      param_dtype: dtype of ``scale`` / ``bias``.
      use_bias: learn ``bias`` (beta).
      use_scale: learn ``scale`` (gamma).
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: axis (or axes) to synchronise statistics over; ignored during
        ``init``, as in Flax.
      axis_index_groups: groups of device indices sharing statistics (pmap).
      use_fast_variance: accepted for compatibility; no effect. bnlab's single
        algorithm is as fast as Flax's fast path and as exact as its two-pass
        one (see :func:`bnlab.batch_norm`).
      force_float32_reductions: accepted for compatibility. Reductions always
        run in at least float32; when False the running statistics are stored
        in ``param_dtype`` and scale/bias are applied in ``param_dtype``, as
        Flax does, so variable trees keep their dtypes.
      convention: ``"flax"`` (default) or ``"torch"`` (see
        :func:`bnlab.batch_norm`).

    Example:
      >>> import jax, jax.numpy as jnp, bnlab.linen
      >>> bn = bnlab.linen.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> updates["batch_stats"]["mean"].shape
      (3,)
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    convention: str = "flax"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; updates ``batch_stats`` when training (not in init).

        Args:
          x: the input.
          use_running_average: overrides the field of the same name.
          mask: boolean, broadcastable to ``x``: positions that enter the stats.

        Returns:
          The normalized array, ``x``'s shape.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = jnp.asarray(x)
        feature_axes = canonical_axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[a] for a in feature_axes)
        stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
        )
        scale = bias = None
        if self.use_scale:
            scale = self.param(
                "scale", self.scale_init, feature_shape, self.param_dtype
            )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype)

        initializing = self.is_initializing()
        train = not use_running_average
        if initializing and train:
            # Flax normalizes init inputs with their local batch statistics; a
            # single value per feature (common dummy init input) has none, so
            # use the fresh running statistics instead of raising.
            reduced = math.prod(x.shape) // max(math.prod(feature_shape), 1)
            train = reduced > 1
        y, new_stats = batch_norm(
            x,
            BatchStats(ra_mean.value, ra_var.value),
            scale,
            bias,
            train=train,
            axis=feature_axes,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
            convention=self.convention,
        )
        if train and not initializing:
            ra_mean.value = new_stats.mean
            ra_var.value = new_stats.var
        return y
