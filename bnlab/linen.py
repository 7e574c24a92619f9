"""``bnlab.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

A subclass of ``flax.linen.BatchNorm`` (so code that finds BN layers with
``isinstance`` finds these) with the same fields, defaults, call signature,
collections and variable names (``params/{scale,bias}``,
``batch_stats/{mean,var}``), so a Flax variable tree loads unchanged. The
module owns variables only; the math is :func:`bnlab.batch_norm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.batch_norm import RENORM_WITH_GHOST, batch_moments
from bnlab.checks import feature_layout
from bnlab.modules import as_float_input, layer_batch_norm
from bnlab.stats import BatchStats

__all__ = ["MOMENTS_COLLECTION", "BatchNorm", "frozen_bn"]

# Set by `frozen_bn()`: None, or whether gamma/beta are frozen too. A JAX user
# context, not a contextvar: its value is part of the key of jit's (and
# pmap's, scan's, ...) caches, so a function traced outside the context is
# traced again inside it and vice versa, instead of silently reusing a trace
# made with the other setting.
_FROZEN = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def frozen_bn(freeze_affine: bool = False) -> Iterator[None]:
    """Freezes every ``bnlab.linen.BatchNorm`` of any model run inside.

    Within the context, each bnlab BN normalizes with its running statistics
    and updates nothing, in training mode too (FrozenBN, as used to fine-tune
    detectors; Wu & Johnson 2021, arXiv:2105.07576); ``freeze_affine`` also
    stops the gradients of ``scale`` / ``bias``. Flax's own ``nn.BatchNorm``
    is not affected.

    The setting is part of the cache key of ``jax.jit`` (and ``pmap``,
    ``nnx.jit``, ...): a jitted function first traced outside the context is
    traced again when called inside it, and one traced inside is traced
    again when called after it, so a cached trace never applies the wrong
    setting. The price: any jitted function called inside the context is
    traced and compiled once more (the cache key of every jit includes the
    setting), once per setting. An ahead-of-time
    ``jax.jit(f).lower(...).compile()`` object stays what it was compiled as.

    Args:
      freeze_affine: also stop the gradients of ``scale`` / ``bias``.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab.linen
      >>> bn = bnlab.linen.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(6.0).reshape(3, 2)
      >>> v = bn.init(jax.random.key(0), x)
      >>> f = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
      >>> y_train, _ = f(v, x)
      >>> with bnlab.linen.frozen_bn():
      ...     y, upd = f(v, x)  # traced again: frozen
      >>> bool(jnp.allclose(y, x / jnp.sqrt(1 + 1e-5)))  # running stats 0 / 1
      True
    """
    with _FROZEN(bool(freeze_affine)):
        yield


# Train-mode calls store their exact batch moments in this collection when it
# is mutable (see bnlab.precise_stats).
MOMENTS_COLLECTION = "bn_moments"


class BatchNorm(nn.BatchNorm):
    """Batch Normalization (arXiv:1502.03167), Flax Linen interface.

    Replace ``flax.linen.BatchNorm`` with ``bnlab.linen.BatchNorm``: outputs
    match Flax's two-pass mode to float32 rounding, and stay exact where
    Flax's default fast variance breaks (``|mean| >> std``), with uneven masks
    under sync, with all-masked features, and in bf16. See
    :func:`bnlab.batch_norm` for the algorithm and its error bound.

    Attributes (those of ``flax.linen.BatchNorm``, plus the last seven):
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
      use_fast_variance: accepted for compatibility; no effect. bnlab has one
        algorithm, exact to two-pass accuracy (see :func:`bnlab.batch_norm`).
      force_float32_reductions: reductions always run in at least float32;
        when False the running statistics start in ``param_dtype`` and, as
        in Flax, are promoted to float32 by the first update (identical
        variable dtypes). One difference: Flax then normalizes in
        ``param_dtype`` (e.g. bf16) while bnlab computes in float32, so
        outputs agree to that dtype's resolution (2**-8 for bf16).
      convention: ``"flax"`` (default) or ``"torch"`` (see
        :func:`bnlab.batch_norm`).
      ghost_size: Ghost BN: normalize contiguous groups of this many examples
        with their own statistics (arXiv:1705.08741; see
        :func:`bnlab.batch_norm`); None for plain BN.
      renorm: batch renormalization in training (arXiv:1702.03275; see
        :func:`bnlab.batch_renorm`), with bounds ``r_max`` / ``d_max``
        (overridable per call, e.g. from :func:`bnlab.renorm_schedules`).
      r_max: renorm bound of ``r``.
      d_max: renorm bound of ``|d|``.
      frozen: always normalize with the running statistics and never update
        them (FrozenBN; also switched on by :func:`frozen_bn`).
      freeze_affine: with ``frozen``, also stop the gradients of
        ``scale`` / ``bias``.

    A training call on a batch with one value per feature (e.g. a single
    example of a Dense layer) returns ``bias`` as Flax does, leaves the
    running statistics unchanged and warns; the pure function raises instead.
    Integer inputs are normalized as float32, as in Flax.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnlab.linen
      >>> bn = bnlab.linen.BatchNorm(use_running_average=False)
      >>> isinstance(bn, nn.BatchNorm)
      True
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> updates["batch_stats"]["mean"].shape
      (3,)
    """

    convention: str = "flax"
    ghost_size: int | None = None
    renorm: bool = False
    r_max: float = 3.0
    d_max: float = 5.0
    frozen: bool = False
    freeze_affine: bool = False

    def __post_init__(self) -> None:
        # At construction, as bnlab.nnx.BatchNorm: not first at apply, after
        # an init that cannot see the conflict (init runs neither variant).
        if self.renorm and self.ghost_size is not None:
            raise ValueError(
                RENORM_WITH_GHOST.format(
                    fn="bnlab.linen.BatchNorm", ghost_size=self.ghost_size
                )
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
        r_max: float | jax.Array | None = None,
        d_max: float | jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``; updates ``batch_stats`` when training (not in init).

        Args:
          x: the input.
          use_running_average: overrides the field of the same name.
          mask: boolean, broadcastable to ``x``: positions that enter the stats.
          r_max: overrides the field (batch renorm), may be traced.
          d_max: overrides the field (batch renorm), may be traced.

        Returns:
          The normalized array, ``x``'s shape.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        x = as_float_input(x)
        feature_shape = feature_layout(x.shape, self.axis).feature_shape
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
        frozen_ctx = _FROZEN.value
        frozen = self.frozen or frozen_ctx is not None
        y, new_stats = layer_batch_norm(
            self,
            x,
            BatchStats(ra_mean.value, ra_var.value),
            scale,
            bias,
            train=not use_running_average and not frozen,
            freeze_affine=frozen and bool(self.freeze_affine or frozen_ctx),
            initializing=initializing,
            mask=mask,
            r_max=r_max,
            d_max=d_max,
            module="bnlab.linen.BatchNorm",
        )
        if new_stats is not None:
            ra_mean.value = new_stats.mean
            ra_var.value = new_stats.var
            if self.is_mutable_collection(MOMENTS_COLLECTION):
                self.put_variable(
                    MOMENTS_COLLECTION,
                    "moments",
                    batch_moments(
                        x,
                        axis=self.axis,
                        axis_name=self.axis_name,
                        axis_index_groups=self.axis_index_groups,
                        mask=mask,
                    ),
                )
        return y
