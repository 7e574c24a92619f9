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
    "check_outputs",
    "default_loss",
    "loss_and_metrics",
    "make_arm_init",
    "make_arm_outputs",
    "make_arm_step",
    "make_split_metrics",
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
        if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
            outputs = outputs[..., 0]
        if outputs.shape != targets.shape:
            raise ValueError(
                f"the default squared-error loss needs outputs of the targets' shape "
                f"{targets.shape} (or with a last axis of 1), got {outputs.shape}."
            )
        return jnp.mean((outputs - targets.astype(outputs.dtype)) ** 2), {}

    return mse


def check_outputs(outputs: Any, targets: Any, num_classes: int) -> None:
    """Raises before any work if the default loss cannot compare the model's
    ``outputs`` with the ``targets`` (abstract shapes of one batch)."""
    if not hasattr(outputs, "shape"):
        raise TypeError(
            f"model: it returns a {type(outputs).__name__}, but the default loss "
            "needs one array (logits or predictions); return one, or pass a loss= "
            "that takes what the model returns."
        )
    if num_classes:
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(
                f"data: the default classification loss needs integer class labels, "
                f"got {targets.dtype}; pass labels as integers (or a loss= that takes "
                "these targets)."
            )
        want = (*targets.shape, num_classes)
        if outputs.shape != want:
            raise ValueError(
                f"model: it returns outputs of shape {outputs.shape} for labels of "
                f"shape {targets.shape}, but data has num_classes={num_classes}: the "
                f"default cross-entropy needs logits of shape {want}. Make the model's "
                "last layer that wide (or fix data.num_classes or the labels' shape, "
                "or pass a loss=)."
            )
        return
    want = targets.shape
    if outputs.shape != want and outputs.shape != (*want, 1):
        raise ValueError(
            f"model: it returns outputs of shape {outputs.shape} for targets of shape "
            f"{want} (data.num_classes=0: regression); the default squared error "
            f"needs outputs of shape {want} or {(*want, 1)}. Change the model's "
            "output, the targets' shape, or pass a loss=."
        )


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
            given = variables
            variables = post_init(variables, hparams)
            if not isinstance(variables, dict) or jax.tree.structure(
                variables
            ) != jax.tree.structure(given):
                raise TypeError(
                    f"post_init returned {type(variables).__name__} of another "
                    "structure; it must return the variables it was given (the same "
                    "collections and arrays), changed."
                )
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
      style: ``"jit"`` (one program, XLA places the reductions),
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
    grad_style = parallel.canonical_style(style)

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


def make_arm_outputs(fns: ModelFns, batch_stats: bool = False) -> Callable:
    """``outputs(variables, x)`` of one arm in inference mode (running
    statistics), or with ``batch_stats`` normalized by the batch's own."""

    def outputs(variables, x):
        return fns.apply(variables, x, batch_stats, None, None)[0]

    return outputs


def make_split_metrics(loss_fn: LossFn, n: int) -> Callable:
    """``metrics(outputs, targets) -> (loss, {metric: value})`` of a whole
    evaluation split from its batches: the batches' outputs and targets
    (tuples, batch after batch, padding at the end) are joined, cut to the
    split's ``n`` examples, and given to the loss once. So a metric that is
    not a mean over examples (balanced accuracy, F1, AUC) is computed on the
    split as a whole, as the loss function defines it."""

    def metrics(outputs: tuple, targets: tuple):
        join = lambda *a: jnp.concatenate(a)[:n]  # noqa: E731
        return loss_and_metrics(
            loss_fn, jax.tree.map(join, *outputs), jax.tree.map(join, *targets)
        )

    return metrics
