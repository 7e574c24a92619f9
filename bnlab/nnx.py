"""``bnlab.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Same constructor, ``nnx.Param`` ``scale``/``bias`` and ``nnx.BatchStat``
``mean``/``var`` attributes, ``.train()`` / ``.eval()`` / ``nnx.view``
behaviour; the math is :func:`bnlab.batch_norm`. Unlike Flax NNX with
``dtype=bfloat16``, statistics are computed from the unrounded input.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.nn import initializers

from bnlab.batch_norm import batch_norm
from bnlab.stats import BatchStats

__all__ = ["BatchNorm"]


class BatchNorm(nnx.Module):
    """Batch Normalization (arXiv:1502.03167), Flax NNX interface.

    Args:
      num_features: size of the feature axis.
      use_running_average: normalize with the running statistics (eval).
      axis: the feature axis.
      momentum: ``new = momentum * old + (1 - momentum) * batch``.
      epsilon: added to the variance.
      dtype: output dtype (default: ``result_type(x, scale, bias)``).
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias: learn ``bias``.
      use_scale: learn ``scale``.
      bias_init: initializer of ``bias``.
      scale_init: initializer of ``scale``.
      axis_name: axis (or axes) to synchronise statistics over.
      axis_index_groups: groups of device indices sharing statistics (pmap).
      use_fast_variance: accepted for compatibility; no effect (bnlab's one
        algorithm is exact and fast).
      promote_dtype: accepted for compatibility; bnlab never rounds the input
        before computing statistics, so it is not used.
      convention: ``"flax"`` or ``"torch"`` (see :func:`bnlab.batch_norm`).
      rngs: ``nnx.Rngs`` for the parameter initializers.
      bias_metadata: metadata for the ``bias`` Param.
      scale_metadata: metadata for the ``scale`` Param.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import bnlab.nnx
      >>> bn = bnlab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))
      >>> bn.eval()
      >>> y_eval = bn(jnp.arange(12.0).reshape(4, 3))
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = initializers.zeros,
        scale_init: Any = initializers.ones,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = None,
        convention: str = "flax",
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        if use_scale:
            self.scale = nnx.Param(
                scale_init(rngs.params(), shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(
                bias_init(rngs.params(), shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.convention = convention

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; updates ``mean``/``var`` in place when training.

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name.
          mask: boolean, broadcastable to ``x``: positions that enter the stats.

        Returns:
          The normalized array, ``x``'s shape.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "bnlab.nnx.BatchNorm: no use_running_average given. Pass it to the "
                "constructor or the call, or use model.train() / model.eval()."
            )
        train = not use_running_average
        y, new_stats = batch_norm(
            x,
            BatchStats(self.mean[...], self.var[...]),
            None if self.scale is None else self.scale[...],
            None if self.bias is None else self.bias[...],
            train=train,
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            dtype=self.dtype,
            convention=self.convention,
        )
        if train:
            self.mean[...] = new_stats.mean
            self.var[...] = new_stats.var
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``: sets ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
