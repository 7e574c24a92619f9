"""An MLP whose normalization, activation and depth are per-arm variables.

Arms of :func:`bnlab.train.fit` that differ in these choices then share one
compiled program: every layer computes each candidate (BN before the
activation, BN after it, an alternative normalization) and per-layer *gates*
(0 or 1, in the ``gates`` collection, set per arm by ``post_init``) select
what the layer does. A gate of 0 makes that choice the identity: the network
is exactly the variant it selects, its outputs and gradients are that
variant's, and arms with the same seed start from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.models.mlp import kernel_init

__all__ = ["GATES", "VariantMLP", "set_gates"]

# gate name -> what it selects (shape (depth,) unless noted)
GATES = {
    "bn_before": "BN between the Dense layer and the activation",
    "bn_after": "BN after the activation",
    "alt_before": "the alternative normalization (alt_norm) before the activation",
    "sigmoid": "sigmoid instead of ReLU (scalar)",
    "layer_on": "the layer is applied (0: it is the identity; the first layer "
    "is always applied)",
    "dropout": "dropout rate after each activation (scalar)",
}


class VariantMLP(nn.Module):
    """Dense layers of equal width with gated variants (see the module
    docstring and :data:`GATES`).

    Attributes:
      widths: hidden widths (all equal where ``layer_on`` may switch a layer
        off).
      num_outputs: classes.
      norm: BN factory (e.g. ``bnlab.linen.BatchNorm``), called with
        ``use_running_average``; gate ``bn_before``.
      norm_after: also build a BN after every activation (gate ``bn_after``).
      alt_norm: an alternative normalization factory (LayerNorm, ghost BN,
        ...), called with ``use_running_average``, or None (gate
        ``alt_before``).
      dropout: build the ``dropout`` gate (a traced rate; needs the
        ``dropout`` RNG stream in training).
      init_scheme: ``"he"``, ``"lecun"`` or ``"normal"`` (``init_std``).
      defaults: default gate values (``{"bn_before": 1.0, ...}``), used
        until ``post_init`` sets an arm's.

    Only the candidates a model is built with are computed (and have gates):
    a BN after the activation or dropout costs nothing unless asked for.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab.linen
      >>> m = VariantMLP((8, 8), 3, norm=bnlab.linen.BatchNorm)
      >>> v = m.init(jax.random.key(0), jnp.ones((4, 5)), train=False)
      >>> v = set_gates(v, bn_before=[1.0, 0.0], sigmoid=1.0)
      >>> m.apply(v, jnp.ones((4, 5)), train=False).shape
      (4, 3)
    """

    widths: tuple[int, ...]
    num_outputs: int = 10
    norm: Callable[..., nn.Module] | None = None
    norm_after: bool = False
    alt_norm: Callable[..., nn.Module] | None = None
    dropout: bool = False
    init_scheme: str = "he"
    init_std: float = 1.0
    defaults: Any = None

    def _gate(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        default = dict(self.defaults or {}).get(
            name, 0.0 if name != "layer_on" else 1.0
        )
        value = self.variable(
            "gates", name, lambda: jnp.full(shape, default, jnp.float32)
        ).value
        return jnp.broadcast_to(value, shape)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        depth = len(self.widths)
        if self.norm_after and self.norm is None:
            raise ValueError("VariantMLP: norm_after=True needs a norm factory.")
        g = {
            "layer_on": self._gate("layer_on", (depth,)),
            "sigmoid": self._gate("sigmoid", ()),
        }
        if self.norm is not None:
            g["bn_before"] = self._gate("bn_before", (depth,))
        if self.norm_after:
            g["bn_after"] = self._gate("bn_after", (depth,))
        if self.alt_norm is not None:
            g["alt_before"] = self._gate("alt_before", (depth,))
        if self.dropout:
            g["dropout"] = self._gate("dropout", ())
        k_init = kernel_init(self.init_scheme, self.init_std)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.widths):
            h = nn.Dense(width, kernel_init=k_init)(x)
            if self.norm is not None:
                bn = self.norm(use_running_average=not train)(h)
                h = _select(g["bn_before"][i], bn, h)
            if self.alt_norm is not None:
                alt = self.alt_norm(use_running_average=not train)(h)
                h = _select(g["alt_before"][i], alt, h)
            self.sow("intermediates", f"act_input_{i}", h)
            h = _select(g["sigmoid"], nn.sigmoid(h), nn.relu(h))
            if self.norm_after:
                bn = self.norm(use_running_average=not train)(h)
                h = _select(g["bn_after"][i], bn, h)
            if self.dropout and train:
                h = _dropout(self, h, g["dropout"])
            # the first layer (or a change of width) is always applied
            skippable = i > 0 and x.shape == h.shape
            x = _select(g["layer_on"][i], h, x) if skippable else h
        return nn.Dense(self.num_outputs, kernel_init=k_init)(x)


def _select(gate: jax.Array, on: jax.Array, off: jax.Array) -> jax.Array:
    """``on`` where the gate is 1, ``off`` where it is 0: exactly one of them
    (no arithmetic mix, so outputs and gradients are the variant's bits)."""
    return jnp.where(gate > 0.5, on, off)


def _dropout(module: nn.Module, h: jax.Array, rate: jax.Array) -> jax.Array:
    """Inverted dropout with a traced rate (rate 0: the identity, no RNG)."""
    if not module.has_rng("dropout"):
        return h
    keep = 1.0 - rate
    mask = jax.random.uniform(module.make_rng("dropout"), h.shape) < keep
    scaled = jnp.where(mask, h / jnp.maximum(keep, 1e-6), jnp.zeros((), h.dtype))
    return jnp.where(rate > 0, scaled, h)


def set_gates(variables: dict, **gates: Any) -> dict:
    """``variables`` with gate values replaced (arrays, or numbers / lists
    broadcast to each gate's shape); use it in ``fit``'s ``post_init``."""
    current = dict(variables.get("gates", {}))
    for name, value in gates.items():
        if name not in current:
            raise KeyError(f"unknown gate {name!r}; the model has {sorted(current)}.")
        current[name] = jnp.broadcast_to(
            jnp.asarray(value, jnp.float32), jnp.shape(current[name])
        )
    return {**variables, "gates": current}
