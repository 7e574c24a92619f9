"""Train state, model and optimizer built from a :class:`Config`."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from bnlab.models import CNN, MLP, ResNet20
from bnlab.train.config import Config, norm_spec

__all__ = ["TrainState", "build_model", "build_optimizer", "init_state"]


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-exactly.

    The data position is ``step``: batch ``i`` of the stream is
    ``BatchStream.batch(i)``, so restoring ``step`` restores the position.

    Attributes:
      params: model parameters.
      batch_stats: BN running statistics (Flax ``batch_stats`` collection).
      opt_state: optax state.
      step: number of completed steps, int32 scalar.
      key: raw data of the run's PRNG key (uint32), for any step randomness.
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def build_model(
    config: Config,
    num_outputs: int,
    axis_name: str | None,
    axis_index_groups: list[list[int]] | None = None,
):
    """The Flax Linen model, with bnlab BN (or a variant) injected as one
    factory; ``axis_name`` / ``axis_index_groups`` are BN's statistics axis."""
    variant, placement, ghost = norm_spec(config.norm)
    norm = functools.partial(
        bnlab.linen.BatchNorm,
        momentum=config.bn_momentum,
        epsilon=config.bn_epsilon,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        ghost_size=ghost,
        renorm=variant == "renorm",
        frozen=variant == "frozen",
    )
    if config.model == "mlp":
        return MLP(
            widths=(config.width,) * config.depth,
            num_outputs=num_outputs,
            activation=config.activation,
            placement=placement,
            norm=norm,
            init_scheme=config.init,
            init_std=config.init_std,
        )
    if config.model == "cnn":
        return CNN(num_outputs=num_outputs, norm=None if variant == "none" else norm)
    if config.model == "resnet20":
        return ResNet20(
            num_outputs=num_outputs,
            norm=norm,
            zero_init_last_gamma=config.zero_init_last_gamma,
        )
    raise ValueError(
        f"model {config.model!r} has no Linen training path; the NNX MLP is "
        "bnlab.models.nnx_mlp.NNXMLP (see its docstring)."
    )


def build_optimizer(config: Config) -> optax.GradientTransformation:
    """optax optimizer and schedule from the config."""
    steps = config.steps - config.warmup_steps
    if config.schedule == "constant":
        schedule = optax.constant_schedule(config.lr)
    elif config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(config.lr, max(steps, 1))
    else:
        boundaries = {
            b: config.step_factor
            for b in range(config.step_every, max(steps, 1), config.step_every)
        }
        schedule = optax.piecewise_constant_schedule(config.lr, boundaries)
    if config.warmup_steps:
        warmup = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
        schedule = optax.join_schedules([warmup, schedule], [config.warmup_steps])
    if config.optimizer == "sgd":
        tx = optax.sgd(schedule)
    elif config.optimizer == "momentum":
        tx = optax.sgd(schedule, momentum=config.momentum)
    else:
        tx = optax.adam(schedule)
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


def init_state(
    config: Config, model, tx: optax.GradientTransformation, example_x: np.ndarray
) -> TrainState:
    """Fresh state on the host (init is deterministic in ``config.seed``)."""
    key = jax.random.key(config.seed)
    init_key, run_key = jax.random.split(key)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
        init_key, jnp.asarray(example_x[:2])
    )
    params = variables["params"]
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(run_key),
    )
