"""The experiments' models: MLPs whose normalization is a knob."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnlab.linen

ACT = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": jnp.tanh}


def bn_factory(momentum: float = 0.99, **kw: Any) -> Callable[..., nn.Module]:
    """bnlab BN with the experiments' default momentum."""
    return functools.partial(bnlab.linen.BatchNorm, momentum=momentum, **kw)


class MLP(nn.Module):
    """Dense layers with a normalization knob.

    Attributes:
      widths: hidden widths.
      num_classes: outputs.
      activation: relu | sigmoid | tanh.
      norm: none | before (Dense -> norm -> act, the paper's) | after
        (Dense -> act -> norm) | first (norm after the first Dense only).
      init_std: kernels ~ N(0, init_std^2) if set, else LeCun normal.
      norm_layer: factory of the normalization layer, called with
        ``use_running_average``; default bnlab BN (momentum 0.99). A factory
        that does not take it (LayerNorm) is wrapped by ``stateless_norm``.
    """

    widths: tuple[int, ...]
    num_classes: int = 10
    activation: str = "relu"
    norm: str = "before"
    init_std: float | None = None
    norm_layer: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        init = (
            nn.initializers.normal(self.init_std)
            if self.init_std is not None
            else nn.initializers.lecun_normal()
        )
        make_norm = self.norm_layer or bn_factory()
        act = ACT[self.activation]
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.widths):
            norm_here = self.norm in ("before", "after") or (
                self.norm == "first" and i == 0
            )
            x = nn.Dense(
                width,
                use_bias=not (norm_here and self.norm != "after"),
                kernel_init=init,
            )(x)
            if norm_here and self.norm != "after":
                x = make_norm(use_running_average=not train)(x)
            if i == len(self.widths) - 1:
                self.sow("intermediates", "last_sigmoid_input", x)
            x = act(x)
            if norm_here and self.norm == "after":
                x = make_norm(use_running_average=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=init)(x)


def stateless_norm(
    cls: Callable[..., nn.Module], **kw: Any
) -> Callable[..., nn.Module]:
    """A factory for LayerNorm / GroupNorm that ignores ``use_running_average``."""

    def make(use_running_average: bool = False, **more: Any) -> nn.Module:
        del use_running_average
        return cls(**kw, **more)

    return make
