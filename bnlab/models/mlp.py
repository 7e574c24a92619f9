"""MLP with BN placement and init scheme as experiment knobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
}
PLACEMENTS = ("none", "before", "after")


def kernel_init(scheme: str, std: float = 1.0) -> Callable[..., jax.Array]:
    """``"normal"`` (N(0, std^2), as in Ioffe & Szegedy's MNIST figure),
    ``"he"`` or ``"lecun"``."""
    if scheme == "normal":
        return nn.initializers.normal(std)
    if scheme == "he":
        return nn.initializers.he_normal()
    if scheme == "lecun":
        return nn.initializers.lecun_normal()
    raise ValueError(f"unknown init {scheme!r}; one of 'normal', 'he', 'lecun'.")


class MLP(nn.Module):
    """Dense layers with optional BN before or after each activation.

    Attributes:
      widths: hidden layer widths.
      num_outputs: output size (classes, or 1 for regression).
      activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
      placement: ``"none"``, ``"before"`` (Dense -> BN -> act, the paper's) or
        ``"after"`` (Dense -> act -> BN).
      norm: BN factory, e.g. ``functools.partial(bnlab.linen.BatchNorm,
        axis_name="batch")``; called with ``use_running_average``.
      init_scheme: kernel init scheme; ``init_std`` for ``"normal"``.
      bn_layers: indices of the hidden layers that get a BN (default: all),
        e.g. ``(0,)`` for BN after the first layer only.
      residual: add each hidden layer's input to its output where the widths
        match (``x + act(BN(Dense(x)))``).

    The input of each activation is sown as ``intermediates/act_input_<i>``
    (read it with ``mutable=["intermediates"]``; otherwise free).

    Example:
      >>> import jax, jax.numpy as jnp, functools, bnlab.linen
      >>> m = MLP((8, 8), 3, norm=bnlab.linen.BatchNorm, bn_layers=(0,))
      >>> v = m.init(jax.random.key(0), jnp.ones((2, 4)), train=False)
      >>> sorted(v["batch_stats"])
      ['BatchNorm_0']
    """

    widths: tuple[int, ...] = (128, 128, 128)
    num_outputs: int = 10
    activation: str = "relu"
    placement: str = "before"
    norm: Any = None
    init_scheme: str = "lecun"
    init_std: float = 1.0
    bn_layers: tuple[int, ...] | None = None
    residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} not in {PLACEMENTS}.")
        if self.placement != "none" and self.norm is None:
            raise ValueError(f"placement={self.placement!r} needs a norm factory.")
        act = ACTIVATIONS[self.activation]
        k_init = kernel_init(self.init_scheme, self.init_std)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.widths):
            bn = self.placement != "none" and (
                self.bn_layers is None or i in self.bn_layers
            )
            before = bn and self.placement == "before"
            # BN's bias makes the Dense bias redundant before it.
            h = nn.Dense(width, use_bias=not before, kernel_init=k_init)(x)
            if before:
                h = self.norm(use_running_average=not train)(h)
            self.sow("intermediates", f"act_input_{i}", h)
            h = act(h)
            if bn and self.placement == "after":
                h = self.norm(use_running_average=not train)(h)
            x = x + h if self.residual and x.shape == h.shape else h
        return nn.Dense(self.num_outputs, kernel_init=k_init)(x)
