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
    def __call__(
        self, x: jax.Array, train: bool, norm_kwargs: dict | None = None
    ) -> jax.Array:
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
                x = make_norm(use_running_average=not train)(x, **(norm_kwargs or {}))
            if i == len(self.widths) - 1:
                self.sow("intermediates", "last_sigmoid_input", x)
            x = act(x)
            if norm_here and self.norm == "after":
                x = make_norm(use_running_average=not train)(x, **(norm_kwargs or {}))
        return nn.Dense(self.num_classes, kernel_init=init)(x)


def stateless_norm(
    cls: Callable[..., nn.Module], **kw: Any
) -> Callable[..., nn.Module]:
    """A factory for LayerNorm / GroupNorm that ignores ``use_running_average``."""

    def make(use_running_average: bool = False, **more: Any) -> nn.Module:
        del use_running_average
        return cls(**kw, **more)

    return make


class NoisyBN(nn.Module):
    """bnlab BN followed by noise with non-zero mean and non-unit variance,
    redrawn every training step (Santurkar et al. 2018, sec. 2.1): ``y *
    (1 + level * a) + level * b`` with ``a, b ~ N(0, 1)`` per feature."""

    level: float = 0.0
    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = bnlab.linen.BatchNorm(
            use_running_average=self.use_running_average, momentum=0.99
        )(x)
        if self.use_running_average or self.level == 0:
            return y
        a, b = jax.random.normal(self.make_rng("noise"), (2, x.shape[-1]))
        return y * (1 + self.level * a)[None] + (self.level * b)[None]


class DeviceSim(nn.Module):
    """An MLP run on ``devices`` simulated devices: the batch is split along a
    named ``vmap`` axis and BN synchronises its statistics over it, exactly
    as under pmap / shard_map (collectives over a vmap axis are local ops)."""

    widths: tuple[int, ...]
    devices: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        per = nn.vmap(
            MLP,
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
            in_axes=(0, None),
            axis_name="devices",
        )(widths=self.widths, norm="before", norm_layer=bn_factory(axis_name="devices"))
        b = x.shape[0]
        if b % self.devices:  # (init with a dummy batch): one example per device
            xs = jnp.broadcast_to(x[:1], (self.devices, *x.shape))[:, :1]
            return per(xs, train).reshape(self.devices, -1)[:b]
        y = per(x.reshape(self.devices, b // self.devices, *x.shape[1:]), train)
        return y.reshape(b, -1)
