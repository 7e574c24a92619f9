"""``bnlab train``'s presets: a :class:`~bnlab.train.Config` built into a
model, data and an optimizer, trained by :func:`bnlab.train.fit`.

:func:`fit_config` is the Python path of ``bnlab train``: one arm (the
config's seed), the config's parallel style, everything else as in
:func:`~bnlab.train.fit`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import bnlab.linen
from bnlab import data as bn_data
from bnlab import parallel as bn_parallel
from bnlab.models import CNN, MLP, ResNet20
from bnlab.train.config import RUN_LENGTH_FIELDS, Config, ConfigError, norm_spec
from bnlab.train.layout import ArmsLayout, arms_layout
from bnlab.train.loop import DATA_AXIS, FitResult, fit

__all__ = ["build_model", "build_optimizer", "fit_config"]

# The seed of the data split (and of generated data), fixed: not the config's.
DATA_SEED = 0


def build_model(
    config: Config,
    num_outputs: int,
    axis_name: str | None = None,
    axis_index_groups: list[list[int]] | None = None,
):
    """The Flax Linen model of a config, with bnlab BN (or a variant)
    injected as one factory; ``axis_name`` / ``axis_index_groups`` are BN's
    statistics axis (shard_map / pmap)."""
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
    return ResNet20(
        num_outputs=num_outputs,
        norm=norm,
        zero_init_last_gamma=config.zero_init_last_gamma,
    )


def build_optimizer(config: Config) -> optax.GradientTransformation:
    """optax optimizer and schedule from the config.

    Weight decay is decoupled (Loshchilov & Hutter, arXiv:1711.05101), as in
    ``optax.adamw``: the update is ``-lr_t * (direction + weight_decay * w)``,
    where ``direction`` is the optimizer's own step before the learning rate
    (the gradient for sgd, the momentum trace for momentum, Adam's
    ``m_hat / (sqrt(v_hat) + eps)`` for adam) and ``lr_t`` the schedule
    (warm-up included). The decay never enters the momentum or Adam's
    moments. Only parameters with ``ndim > 1`` (Dense and Conv kernels)
    decay; biases and BN ``scale`` / ``bias`` do not (the Flax ImageNet
    example's convention). For plain sgd this equals L2 on the kernels.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnlab.train import build_optimizer, load_config
      >>> tx = build_optimizer(load_config(None, ["optimizer=sgd", "lr=0.5",
      ...                                         "schedule=constant",
      ...                                         "weight_decay=0.1"]))
      >>> params = {"kernel": jnp.ones((1, 1)), "bias": jnp.ones(1)}
      >>> grads = {"kernel": jnp.ones((1, 1)), "bias": jnp.ones(1)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["kernel"].tolist(), updates["bias"].tolist()  # -0.5 (1 + 0.1)
      ([[-0.550000011920929]], [-0.5])
    """
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
    # optax's schedules mix Python floats with the int32 step count, which
    # jax_numpy_dtype_promotion="strict" refuses; a float32 count (exact to
    # 2**24 steps) gives the same values under either promotion mode.
    schedule = _float_count(schedule)
    if config.optimizer == "sgd":
        direction = optax.identity()
    elif config.optimizer == "momentum":
        direction = optax.trace(decay=config.momentum)
    else:
        direction = optax.scale_by_adam()
    if not config.weight_decay:
        # optax.sgd / optax.adam exactly (their state layout)
        return optax.chain(direction, optax.scale_by_learning_rate(schedule))
    return optax.chain(
        direction,
        optax.add_decayed_weights(config.weight_decay, mask=_kernels),
        optax.scale_by_learning_rate(schedule),
    )


def _kernels(params: Any) -> Any:
    """True for the parameters weight decay applies to: ``ndim > 1``."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _float_count(schedule: optax.Schedule) -> optax.Schedule:
    return lambda count: schedule(jnp.asarray(count, jnp.float32))


def layout_of(config: Config) -> ArmsLayout:
    """The device layout of a config's single arm; ConfigError if the batch
    or the BN groups do not fit the devices."""
    style = bn_parallel.canonical_style(config.parallel)
    devices = jax.devices()[:1] if config.parallel == "single" else None
    try:
        layout = arms_layout(
            1,
            config.batch_size,
            style=style,
            devices=devices,
            bn_group_size=config.bn_group_size,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _, _, ghost = norm_spec(config.norm)
    if ghost is not None:
        per_device = config.batch_size // (1 if style == "jit" else layout.data_shards)
        if per_device % ghost:
            raise ConfigError(
                f"norm={config.norm!r}: ghost batches of {ghost} do not divide the "
                f"{per_device} examples BN sees per step"
                + ("" if style == "jit" else " and device")
                + f" (batch_size={config.batch_size}); choose G dividing {per_device}."
            )
    return layout


def fit_config(
    config: Config,
    workdir: str | Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Trains (or resumes) a preset or config file's run, as ``bnlab train``.

    Everything about the config is checked before any work (ConfigError);
    the rest is :func:`bnlab.train.fit` with one arm. The data split is fixed
    (``DATA_SEED``): ``config.seed`` changes the initialization and the batch
    order, never which examples are test (or validation) examples.

    Example:
      >>> import tempfile
      >>> from bnlab.train import fit_config, load_config
      >>> config = load_config("digits", ["steps=20", "eval_every=20"])
      >>> fit_config(config, tempfile.mkdtemp()).step
      20
    """
    config.check_devices(jax.device_count(), jax.process_count())
    layout = layout_of(config)
    # The data (digits' train/test split, the synthetic set) is the same for
    # every seed, so that runs of different seeds are evaluated on the same
    # test set; the config's seed drives only the init and the batch order.
    ds = bn_data.load(config.dataset, config.data_dir, seed=DATA_SEED)
    style = bn_parallel.canonical_style(config.parallel)
    axis = None if style == "jit" else DATA_AXIS
    model = build_model(config, ds.num_classes or 1, axis, layout.bn_groups)
    described = {
        k: v for k, v in config.to_dict().items() if k not in RUN_LENGTH_FIELDS
    }
    with warnings.catch_warnings():
        if config.schedule == "constant" and not config.warmup_steps:
            # fit warns that a schedule may follow a new run length; this
            # one does not depend on it
            warnings.filterwarnings("ignore", message=r"resuming a \d+-step run")
        return fit(
            model,
            ds,
            workdir,
            optimizer=build_optimizer(config),
            steps=config.steps,
            batch_size=config.batch_size,
            seeds=(config.seed,),
            eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every,
            keep_checkpoints=config.keep_checkpoints,
            validation=config.validation or None,
            parallel=style,
            devices=jax.devices()[:1] if config.parallel == "single" else None,
            bn_group_size=config.bn_group_size,
            eval_batch_stats=config.eval_batch_stats,
            config=described,
            on_progress=on_progress,
        )
