"""``bnlab.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

A subclass of ``flax.nnx.BatchNorm`` (same constructor and variables); the
math is :func:`bnlab.batch_norm`. Unlike Flax NNX with ``dtype=bfloat16``,
statistics are computed from the unrounded input.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from bnlab.batch_norm import RENORM_WITH_GHOST
from bnlab.modules import layer_batch_norm
from bnlab.stats import BatchStats

__all__ = ["BatchNorm", "freeze"]


class BatchNorm(nnx.BatchNorm):
    """Batch Normalization (arXiv:1502.03167), Flax NNX interface.

    A subclass of ``flax.nnx.BatchNorm``: the same constructor, variables
    (``nnx.Param`` ``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``,
    created by Flax's own constructor) and ``.train()`` / ``.eval()`` /
    ``nnx.view`` behaviour; the math is :func:`bnlab.batch_norm`.

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
        algorithm is exact to two-pass accuracy).
      promote_dtype: accepted for compatibility; not used: bnlab never rounds
        the input before computing statistics.
      convention: ``"flax"`` or ``"torch"`` (see :func:`bnlab.batch_norm`).
      ghost_size: Ghost BN group size (see :func:`bnlab.batch_norm`).
      renorm: batch renormalization in training (:func:`bnlab.batch_renorm`).
      r_max: renorm bound of ``r`` (a call may override it).
      d_max: renorm bound of ``|d|`` (a call may override it).
      frozen: normalize with the running statistics always; no updates.
      freeze_affine: with ``frozen``, stop the gradients of scale / bias.
      rngs: ``nnx.Rngs`` for the parameter initializers.
      bias_metadata: metadata for the ``bias`` Param.
      scale_metadata: metadata for the ``scale`` Param.

    A training call with one value per feature returns ``bias`` (as Flax),
    keeps the running statistics and warns, so ``nnx.eval_shape`` and
    one-example checks work; integer inputs are normalized as float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import bnlab.nnx
      >>> bn = bnlab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> isinstance(bn, nnx.BatchNorm)
      True
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))
      >>> bn.eval()
      >>> y_eval = bn(jnp.arange(12.0).reshape(4, 3))
    """

    def __init__(
        self,
        num_features: int,
        *,
        convention: str = "flax",
        ghost_size: int | None = None,
        renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
        frozen: bool = False,
        freeze_affine: bool = False,
        rngs: nnx.Rngs,
        **flax_kwargs: Any,
    ):
        if renorm and ghost_size is not None:
            raise ValueError(
                RENORM_WITH_GHOST.format(
                    fn="bnlab.nnx.BatchNorm", ghost_size=ghost_size
                )
            )
        super().__init__(num_features, rngs=rngs, **flax_kwargs)
        self.convention = convention
        self.ghost_size = ghost_size
        self.renorm = renorm
        self.r_max = r_max
        self.d_max = d_max
        self.frozen = frozen
        self.freeze_affine = freeze_affine

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        r_max: float | jax.Array | None = None,
        d_max: float | jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; updates ``mean``/``var`` in place when training.

        Args:
          x: the input.
          use_running_average: overrides the attribute of the same name.
          mask: boolean, broadcastable to ``x``: positions that enter the stats.
          r_max: overrides the attribute (batch renorm), may be traced.
          d_max: overrides the attribute (batch renorm), may be traced.

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
        y, new_stats = layer_batch_norm(
            self,
            x,
            BatchStats(self.mean[...], self.var[...]),
            None if self.scale is None else self.scale[...],
            None if self.bias is None else self.bias[...],
            train=not use_running_average and not self.frozen,
            freeze_affine=self.frozen and self.freeze_affine,
            mask=mask,
            r_max=r_max,
            d_max=d_max,
            module="bnlab.nnx.BatchNorm",
        )
        if new_stats is not None:
            self.mean[...] = new_stats.mean
            self.var[...] = new_stats.var
        return y


def freeze(model: nnx.Module, freeze_affine: bool = False) -> nnx.Module:
    """Freezes every BN of an NNX model in place and returns it.

    Every ``bnlab.nnx.BatchNorm`` becomes ``frozen`` (running statistics
    always, no updates; with ``freeze_affine`` no gradient to scale / bias);
    every ``flax.nnx.BatchNorm`` gets ``use_running_average=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import bnlab.nnx
      >>> bn = bnlab.nnx.freeze(bnlab.nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
      >>> _ = bn(jnp.ones((4, 2)) * 7)
      >>> bn.mean[...].tolist()  # not updated
      [0.0, 0.0]
    """
    for _, node in nnx.iter_graph(model):
        if isinstance(node, BatchNorm):
            node.frozen = True
            node.freeze_affine = freeze_affine
        elif isinstance(node, nnx.BatchNorm):
            node.use_running_average = True
    return model
