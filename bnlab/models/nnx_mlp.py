"""The MLP in Flax NNX, with bnlab.nnx.BatchNorm (shows the NNX module in use)."""

from __future__ import annotations

import jax
from flax import nnx

import bnlab.nnx
from bnlab.models.mlp import ACTIVATIONS


class NNXMLP(nnx.Module):
    """Dense -> BN -> activation blocks, then a linear head.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> m = NNXMLP(64, (32,), 10, rngs=nnx.Rngs(0))
      >>> m(jnp.ones((4, 64))).shape
      (4, 10)
    """

    def __init__(
        self,
        in_features: int,
        widths: tuple[int, ...],
        num_outputs: int,
        activation: str = "relu",
        *,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.act = ACTIVATIONS[activation]
        dims = (in_features, *widths)
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=False, rngs=rngs)
                for a, b in zip(dims[:-1], widths, strict=True)
            ]
        )
        self.norms = nnx.List(
            [bnlab.nnx.BatchNorm(w, axis_name=axis_name, rngs=rngs) for w in widths]
        )
        self.head = nnx.Linear(dims[-1], num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = self.act(norm(layer(x)))
        return self.head(x)
