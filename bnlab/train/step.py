"""One train step and the evaluation step (pure functions; jitted by callers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnlab import parallel
from bnlab.train.state import TrainState

__all__ = [
    "Interval",
    "make_eval_step",
    "make_train_step",
    "task_loss",
    "with_interval",
]


def task_loss(outputs: jax.Array, y: jax.Array, num_classes: int):
    """(mean loss, accuracy) for classification; (MSE, 0) for regression."""
    if num_classes:
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()
        acc = jnp.mean((jnp.argmax(outputs, -1) == y).astype(jnp.float32))
        return loss, acc
    return jnp.mean((outputs[:, 0] - y) ** 2), jnp.zeros((), jnp.float32)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    num_classes: int,
    style: str,
    axis_name: str | tuple[str, ...] | None,
    average_stats: str | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """``step(state, x, y) -> (state, {"loss", "accuracy"})`` for a style.

    The gradient rule of the style comes from
    :func:`bnlab.parallel.value_and_grad` over ``axis_name`` (every device);
    BN synchronises its statistics through the model's own axis. With BN
    groups each group's running statistics differ; ``average_stats`` names
    the axis along which the groups differ
    (:attr:`bnlab.parallel.DataParallel.group_axis`) and they are averaged
    over it after the step, so every device keeps the same
    state: the mean is then the global batch mean, the variance the mean of
    the within-group variances (what the groups normalize with).
    """

    def loss_fn(params, batch_stats, x, y):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss, acc = task_loss(outputs, y, num_classes)
        return loss, (updates.get("batch_stats", batch_stats), acc)

    vg = parallel.value_and_grad(
        loss_fn, style=style, axis_name=axis_name, has_aux=True
    )

    def step(state: TrainState, x, y):
        (loss, (batch_stats, acc)), grads = vg(state.params, state.batch_stats, x, y)
        if axis_name is not None:
            acc = lax.pmean(acc, axis_name)
            if average_stats is not None:
                batch_stats = lax.pmean(batch_stats, average_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            step=state.step + 1,
            key=state.key,
        )
        return new, {"loss": loss, "accuracy": acc}

    return step


class Interval(NamedTuple):
    """Train metrics since the last record, summed on the device.

    Attributes:
      loss_sum: sum of the steps' mean losses.
      accuracy_sum: sum of the steps' batch accuracies.
      count: number of steps summed.
      first_bad: first step whose loss was NaN/Inf, or -1.
    """

    loss_sum: jax.Array
    accuracy_sum: jax.Array
    count: jax.Array
    first_bad: jax.Array

    @classmethod
    def zeros(cls) -> Interval:
        f, i = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        return cls(f, f, i, i - 1)

    @classmethod
    def from_host(cls, d: dict[str, Any]) -> Interval:
        return cls(
            jnp.asarray(d["loss_sum"], jnp.float32),
            jnp.asarray(d["accuracy_sum"], jnp.float32),
            jnp.asarray(d["count"], jnp.int32),
            jnp.asarray(d.get("first_bad", -1), jnp.int32),
        )

    def to_host(self) -> dict[str, Any]:
        return {
            "loss_sum": float(self.loss_sum),
            "accuracy_sum": float(self.accuracy_sum),
            "count": int(self.count),
            "first_bad": int(self.first_bad),
        }

    def add(self, loss, accuracy, step) -> Interval:
        bad = ~jnp.isfinite(loss)
        first_bad = jnp.where(
            (self.first_bad < 0) & bad, step.astype(jnp.int32), self.first_bad
        )
        return Interval(
            self.loss_sum + loss.astype(jnp.float32),
            self.accuracy_sum + accuracy.astype(jnp.float32),
            self.count + 1,
            first_bad,
        )


def with_interval(step: Callable, gather: bool = False) -> Callable:
    """``(state, interval, *batch) -> (state, interval)``: the train step with
    its metrics summed on the device, so nothing is read back per step. With
    ``gather`` the batch is ``(x_all, y_all, indices)`` and rows are gathered
    inside the step (data kept on the device)."""

    def run(state, interval, *batch):
        if gather:
            x_all, y_all, idx = batch
            batch = (x_all[idx], y_all[idx])
        state, metrics = step(state, *batch)
        return state, interval.add(metrics["loss"], metrics["accuracy"], state.step)

    return run


def make_eval_step(model, num_classes: int, use_batch_stats: bool = False) -> Callable:
    """``eval(params, batch_stats, x, y) -> (sum loss, sum correct)``.

    Running statistics by default (test time, as the paper prescribes);
    ``use_batch_stats`` normalises each test batch with its own statistics.
    """

    def evaluate(params: Any, batch_stats: Any, x, y):
        variables = {"params": params, "batch_stats": batch_stats}
        if use_batch_stats:
            outputs, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            outputs = model.apply(variables, x, train=False)
        loss, acc = task_loss(outputs, y, num_classes)
        n = x.shape[0]
        return loss * n, acc * n

    return jax.jit(evaluate)
