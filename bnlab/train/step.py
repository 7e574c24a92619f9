"""One arm's train step, evaluation and probes: pure functions of arrays.

The loop (:mod:`bnlab.train.loop`) vmaps them over arms and places them on
devices (:mod:`bnlab.parallel`); nothing here knows how many arms or devices
there are. A step of an arm whose loss or new state is not finite is not
applied: the arm keeps its last finite state and records the step at which
it stopped, while the other arms go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnlab import parallel
from bnlab.train.model import ModelFns

__all__ = [
    "Interval",
    "LossFn",
    "TrainState",
    "default_loss",
    "loss_and_metrics",
    "make_arm_eval",
    "make_arm_init",
    "make_arm_step",
    "metric_names",
]

LossFn = Callable[[Any, Any], Any]


class Interval(NamedTuple):
    """Train metrics of one arm since the last record, summed on the device.

    Attributes:
      count: steps summed (int32).
      loss: sum of the steps' mean losses.
      metrics: per metric, the sum of the steps' batch values.
    """

    count: jax.Array
    loss: jax.Array
    metrics: dict[str, jax.Array]

    @classmethod
    def zeros(cls, names: Sequence[str]) -> Interval:
        f = jnp.zeros((), jnp.float32)
        return cls(jnp.zeros((), jnp.int32), f, {k: f for k in names})


class TrainState(NamedTuple):
    """Everything one arm needs to continue bit-exactly (stacked over arms
    by :func:`bnlab.train.fit`).

    The data position is ``step``: the batch of step ``i`` is a pure function
    of the arm's seed and ``i``, so restoring ``step`` restores the position.

    Attributes:
      variables: the model's collections (``params``, ``batch_stats``, ...).
      opt_state: the optax state.
      step: completed steps (int32).
      rng: raw data of the arm's PRNG key (uint32), folded with the step for
        any randomness of the step (e.g. dropout).
      stopped_at: -1 while the arm trains; else the step whose loss or new
        state was not finite (the arm kept its last finite state).
      interval: train metrics since the last record.
    """

    variables: dict
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    stopped_at: jax.Array
    interval: Interval


def default_loss(num_classes: int) -> LossFn:
    """Softmax cross-entropy on integer labels with accuracy (classification,
    ``num_classes > 0``); mean squared error of ``outputs[:, 0]`` otherwise."""
    if num_classes:

        def cross_entropy(outputs, labels):
            loss = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
            correct = jnp.argmax(outputs, -1) == labels
            return jnp.mean(loss), {"accuracy": jnp.mean(correct.astype(jnp.float32))}

        return cross_entropy

    def mse(outputs, targets):
        return jnp.mean((outputs[:, 0] - targets) ** 2), {}

    return mse


def loss_and_metrics(loss_fn: LossFn, outputs, targets) -> tuple[jax.Array, dict]:
    """``(mean loss, {metric: value})`` from a loss that returns a scalar or
    a ``(scalar, dict)`` pair; float32."""
    out = loss_fn(outputs, targets)
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    if not isinstance(metrics, dict):
        raise TypeError(
            f"the loss returned {type(metrics).__name__} as its metrics; return a "
            "scalar or (scalar, {name: scalar})."
        )
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(
            f"the loss returned shape {loss.shape}; it must be the batch's mean, a "
            "scalar (e.g. jnp.mean(per_example))."
        )
    return loss.astype(jnp.float32), {
        k: jnp.asarray(v).astype(jnp.float32) for k, v in metrics.items()
    }


def metric_names(loss_fn: LossFn, outputs: Any, targets: Any) -> list[str]:
    """The metric names ``loss_fn`` reports, from abstract shapes."""
    _, metrics = jax.eval_shape(
        lambda o, t: loss_and_metrics(loss_fn, o, t), outputs, targets
    )
    return sorted(metrics)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree.leaves(tree)
        if jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def make_arm_init(
    fns: ModelFns,
    optimizer: Callable[[dict], optax.GradientTransformation],
    metrics: Sequence[str],
    example_x: jax.Array,
    post_init: Callable[[dict, dict], dict] | None = None,
) -> Callable[[jax.Array, dict], TrainState]:
    """``init(seed, hparams) -> TrainState`` of one arm: the model's variables
    from ``key(seed)`` (split into an init key and the arm's run key), then
    ``post_init``, then the optimizer state."""

    def init(seed, hparams):
        init_key, run_key = jax.random.split(jax.random.key(seed))
        variables = fns.init(init_key, example_x)
        if post_init is not None:
            variables = post_init(variables, hparams)
        return TrainState(
            variables,
            optimizer(hparams).init(variables["params"]),
            jnp.zeros((), jnp.int32),
            jax.random.key_data(run_key),
            jnp.full((), -1, jnp.int32),
            Interval.zeros(metrics),
        )

    return init


def make_arm_step(
    fns: ModelFns,
    optimizer: Callable[[dict], optax.GradientTransformation],
    loss_fn: LossFn,
    *,
    style: str,
    axis_name: Any = None,
    average_axis: Any = None,
    rng_streams: Sequence[str] = (),
    train_kwargs: Callable[[jax.Array, dict], dict] | None = None,
) -> Callable[[TrainState, Any, Any, dict], TrainState]:
    """``step(state, x, y, hparams) -> state`` for one arm.

    Args:
      fns: the model (:func:`bnlab.train.model.model_fns`).
      optimizer: ``hparams -> optax transformation`` (the arm's traced
        hyper-parameters).
      loss_fn: ``(outputs, targets) -> loss`` or ``(loss, metrics)``.
      style: ``"single"``/``"auto"`` (one program, XLA places the reductions),
        ``"shard_map"`` or ``"pmap"``: the gradient rule of
        :func:`bnlab.parallel.value_and_grad`.
      axis_name: the data axis (or axes) of shard_map / pmap.
      average_axis: with BN device groups, the axis along which the groups'
        running statistics differ; they are averaged over it after the step.
      rng_streams: names of the RNG streams the model draws from in training
        (e.g. ``("dropout",)``), each a fold of the arm's key with the step.
      train_kwargs: ``(step, hparams) -> dict`` of extra keyword arguments of
        the model in training (e.g. a batch-renorm schedule).
    """
    grad_style = "jit" if style in ("single", "auto") else style

    def step(state: TrainState, x, y, hparams: dict) -> TrainState:
        variables = state.variables
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_streams)}
        kwargs = None if train_kwargs is None else train_kwargs(state.step, hparams)

        def objective(params):
            out, new_vars = fns.apply(
                {**variables, "params": params}, x, True, rngs or None, kwargs
            )
            loss, metrics = loss_and_metrics(loss_fn, out, y)
            return loss, (new_vars, metrics)

        vg = parallel.value_and_grad(
            objective,
            style=grad_style,
            axis_name=axis_name if grad_style in ("shard_map", "pmap") else None,
            has_aux=True,
        )
        (loss, (new_vars, metrics)), grads = vg(variables["params"])
        if grad_style in ("shard_map", "pmap"):
            metrics = lax.pmean(metrics, axis_name)
            if average_axis is not None:
                new_vars = {
                    k: v if k == "params" else lax.pmean(v, average_axis)
                    for k, v in new_vars.items()
                }
        tx = optimizer(hparams)
        updates, opt_state = tx.update(grads, state.opt_state, variables["params"])
        new_vars = {
            **new_vars,
            "params": optax.apply_updates(variables["params"], updates),
        }
        alive = state.stopped_at < 0
        ok = alive & jnp.isfinite(loss) & _all_finite(new_vars)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(ok, a, b), new, old
        )
        count = state.interval.count + ok.astype(jnp.int32)
        zero = jnp.zeros((), jnp.float32)
        interval = Interval(
            count,
            state.interval.loss + jnp.where(ok, loss, zero),
            {
                k: state.interval.metrics[k] + jnp.where(ok, metrics[k], zero)
                for k in state.interval.metrics
            },
        )
        return TrainState(
            variables=keep(new_vars, variables),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
            stopped_at=jnp.where(alive & ~ok, state.step + 1, state.stopped_at),
            interval=interval,
        )

    return step


def make_arm_eval(
    fns: ModelFns, loss_fn: LossFn, batch_stats: bool = False
) -> Callable[[dict, Any, Any, Any], tuple[jax.Array, dict]]:
    """``evaluate(variables, x, y, valid) -> (sum of losses, {metric: sum})``
    of one arm on one batch, over the examples where ``valid`` is True.

    With running statistics (inference mode, the default) each example's
    loss is the loss of a batch of that one example, so padded batches of one
    fixed size serve every evaluation set (one compilation); the loss must be
    a mean over examples, as losses are. With ``batch_stats`` the batch is
    normalized with its own statistics and must not be padded (``valid`` all
    True): the sums are the batch mean times its size.
    """

    def per_example(out, y):
        return loss_and_metrics(loss_fn, out[None], y[None])

    def evaluate(variables, x, y, valid):
        out, _ = fns.apply(variables, x, batch_stats, None, None)
        if batch_stats:
            loss, metrics = loss_and_metrics(loss_fn, out, y)
            n = jnp.sum(valid.astype(jnp.float32))
            return loss * n, {k: v * n for k, v in metrics.items()}
        losses, metrics = jax.vmap(per_example)(out, y)
        zero = jnp.zeros((), jnp.float32)
        total = lambda v: jnp.sum(jnp.where(valid, v, zero))  # noqa: E731
        return total(losses), {k: total(v) for k, v in metrics.items()}

    return evaluate
