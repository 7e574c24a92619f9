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
    """

    widths: tuple[int, ...] = (128, 128, 128)
    num_outputs: int = 10
    activation: str = "relu"
    placement: str = "before"
    norm: Any = None
    init_scheme: str = "lecun"
    init_std: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} not in {PLACEMENTS}.")
        use_bn = self.placement != "none"
        if use_bn and self.norm is None:
            raise ValueError(f"placement={self.placement!r} needs a norm factory.")
        act = ACTIVATIONS[self.activation]
        k_init = kernel_init(self.init_scheme, self.init_std)
        x = x.reshape((x.shape[0], -1))
        for width in self.widths:
            # BN's bias makes the Dense bias redundant before it.
            x = nn.Dense(
                width, use_bias=self.placement != "before", kernel_init=k_init
            )(x)
            if self.placement == "before":
                x = self.norm(use_running_average=not train)(x)
            x = act(x)
            if self.placement == "after":
                x = self.norm(use_running_average=not train)(x)
        return nn.Dense(self.num_outputs, kernel_init=k_init)(x)
