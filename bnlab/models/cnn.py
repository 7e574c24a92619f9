"""A small CNN and a CIFAR-style ResNet-20 (He et al. 2016, arXiv:1512.03385)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
    """conv(32)-BN-relu-pool, conv(64)-BN-relu-pool, dense(128)-BN-relu, dense."""

    num_outputs: int = 10
    norm: Any = None
    dtype: Any = None  # activations (e.g. bf16); parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def bn(x):
            if self.norm is None:
                return x
            return self.norm(use_running_average=not train, dtype=self.dtype)(x)

        for features in (32, 64):
            x = nn.Conv(features, (3, 3), use_bias=self.norm is None, dtype=self.dtype)(
                x
            )
            x = nn.max_pool(nn.relu(bn(x)), (2, 2), (2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(bn(nn.Dense(128, use_bias=self.norm is None, dtype=self.dtype)(x)))
        return nn.Dense(self.num_outputs, dtype=self.dtype)(x)


def _merge_residual(block: nn.Module, x: jax.Array, y: jax.Array, ura: bool):
    """Last BN of the residual branch (scale 0 with zero_init_last_gamma), a
    projection shortcut when shapes differ, add, relu. Called inside the
    block's compact ``__call__``, so the layers belong to the block."""
    last_init = (
        nn.initializers.zeros if block.zero_init_last_gamma else nn.initializers.ones
    )
    dt = block.dtype
    y = block.norm(use_running_average=ura, scale_init=last_init, dtype=dt)(y)
    if x.shape != y.shape:
        x = nn.Conv(y.shape[-1], (1, 1), block.strides, use_bias=False, dtype=dt)(x)
        x = block.norm(use_running_average=ura, dtype=dt)(x)
    return nn.relu(x + y)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``zero_init_last_gamma`` starts the residual at 0
    (Goyal et al. 2017, arXiv:1706.02677)."""

    features: int
    strides: int
    norm: Any
    zero_init_last_gamma: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura, dt = not train, self.dtype
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False, dtype=dt)(x)
        y = nn.relu(self.norm(use_running_average=ura, dtype=dt)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, dtype=dt)(y)
        return _merge_residual(self, x, y, ura)


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3 stages x 3 blocks, 16/32/64 channels, global pool."""

    num_outputs: int = 10
    norm: Any = None
    zero_init_last_gamma: bool = False
    blocks_per_stage: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.norm is None:
            raise ValueError("ResNet20 needs a norm factory (BN is part of it).")
        dt = self.dtype
        x = nn.Conv(16, (3, 3), use_bias=False, dtype=dt)(x)
        x = nn.relu(self.norm(use_running_average=not train, dtype=dt)(x))
        for stage, features in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    features, strides, self.norm, self.zero_init_last_gamma, dt
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_outputs, dtype=dt)(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4) bottleneck block with BN (ResNet-50 style)."""

    features: int
    strides: int
    norm: Any
    zero_init_last_gamma: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura, dt = not train, self.dtype
        y = nn.Conv(self.features, (1, 1), use_bias=False, dtype=dt)(x)
        y = nn.relu(self.norm(use_running_average=ura, dtype=dt)(y))
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False, dtype=dt)(y)
        y = nn.relu(self.norm(use_running_average=ura, dtype=dt)(y))
        y = nn.Conv(4 * self.features, (1, 1), use_bias=False, dtype=dt)(y)
        return _merge_residual(self, x, y, ura)


class ResNet50(nn.Module):
    """ImageNet-style ResNet-50 (stages 3-4-6-3 of bottlenecks, 64..512 wide)."""

    num_outputs: int = 1000
    norm: Any = None
    stages: tuple[int, ...] = (3, 4, 6, 3)
    zero_init_last_gamma: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.norm is None:
            raise ValueError("ResNet50 needs a norm factory (BN is part of it).")
        dt = self.dtype
        x = nn.Conv(64, (7, 7), 2, use_bias=False, dtype=dt)(x)
        x = nn.relu(self.norm(use_running_average=not train, dtype=dt)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stages):
            for block in range(blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(
                    64 * 2**stage, strides, self.norm, self.zero_init_last_gamma, dt
                )(x, train)
        return nn.Dense(self.num_outputs, dtype=dt)(jnp.mean(x, axis=(1, 2)))
