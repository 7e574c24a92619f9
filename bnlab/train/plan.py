"""What :func:`bnlab.train.fit` derives from its arguments before any work:
the model traced on the data, the loss and optimizer checked, the device
layout, the run's configuration (its identity on resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnlab.train.arms import Arm, stacked
from bnlab.train.early import EarlyStopping
from bnlab.train.layout import ArmsLayout, arms_layout
from bnlab.train.model import ModelFns, model_fns
from bnlab.train.options import (
    Evaluation,
    Placement,
    RunLength,
    Training,
)
from bnlab.train.rundir import jsonable
from bnlab.train.splits import Splits, fingerprint, length, read
from bnlab.train.step import (
    TrainState,
    check_outputs,
    default_loss,
    make_arm_init,
    metric_names,
)

# A training set up to this size (per device) is kept on the device and each
# step gathers its rows there; larger ones are read by the host per step.
DEVICE_DATA_BYTES = 2**30
# Names of the saved state next to the model's collections.
RESERVED = ("opt_state", "step", "rng", "stopped_at", "interval", "best")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything :func:`fit` derives from its arguments before any work."""

    fns: ModelFns
    arms: list[Arm]
    hp: dict[str, np.ndarray]
    splits: Splits
    loss_fn: Callable
    metrics: list[str]
    layout: ArmsLayout
    config: dict
    on_device: bool
    run_length: RunLength
    training: Training
    evaluation: Evaluation
    placement: Placement
    early_stopping: EarlyStopping | None
    arm_state: TrainState  # one arm's, abstract
    convolves: bool


def _trace(what: str, fn: Callable, *args: Any) -> Any:
    """``jax.eval_shape(fn, *args)``, an error naming ``what`` to fix."""
    try:
        return jax.eval_shape(fn, *args)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise type(e)(f"{what}: {type(e).__name__}: {e}") from None


def _check_bn_axis(fns: ModelFns, variables: Any, x: Any, layout: Any) -> None:
    """With shard_map / pmap each device sees a part of an arm's batch, so a
    model with running statistics must reduce them over the data axis (BN
    layers with ``axis_name=bnlab.train.DATA_AXIS``); without it the
    statistics are per device (and the compiled loop fails). Traced with
    the axis bound: a collective over it must appear."""
    mutable = [k for k in variables if k != "params"]
    if layout.style == "jit" or layout.data_shards == 1 or not mutable:
        return
    axis = layout.bn_axis
    jaxpr = jax.make_jaxpr(
        lambda v, x: fns.apply(v, x, True, None, None)[1],
        axis_env=[(axis, layout.data_shards)],
    )(variables, x)

    def collective(jp) -> bool:
        for eqn in jp.eqns:
            axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
            axes = axes if isinstance(axes, tuple) else (axes,)
            if axis in axes:
                return True
            if any(collective(sub) for sub in jax.core.jaxprs_in_params(eqn.params)):
                return True
        return False

    if not collective(jaxpr.jaxpr):
        raise ValueError(
            f"model: with parallel={layout.style!r} each arm's batch is split over "
            f"{layout.data_shards} devices, but its running statistics "
            f"({', '.join(mutable)}) are not reduced over the data axis: build its BN "
            "layers with axis_name=bnlab.train.DATA_AXIS, or use parallel='jit'."
        )


def _check_optimizer(training: Training, params: Any, hp: dict) -> None:
    """Builds, initializes and applies the optimizer on abstract values:
    a problem shows now, named, not inside the compiled step."""

    def one_update(hp, params):
        tx = training.optimizer(hp)
        state = tx.init(params)
        return tx.update(params, state, params)[0]

    try:
        _trace("optimizer", one_update, hp, params)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        raise TypeError(
            "optimizer: optax checks some arguments in Python (e.g. a schedule's "
            "peak value), which an arm's traced hyper-parameter cannot pass. Scale "
            "a unit schedule instead: lambda hp: optax.sgd(lambda step: hp['lr'] * "
            "optax.warmup_cosine_decay_schedule(0.0, 1.0, 50, 500)(step)), or give "
            "the value as a Python number outside hparams."
        ) from None


def make_plan(
    model: Any,
    splits: Splits,
    arms: list[Arm],
    *,
    validation: float | None,
    config: Mapping[str, Any] | None,
    run_length: RunLength,
    training: Training,
    evaluation: Evaluation,
    placement: Placement,
    early_stopping: EarlyStopping | None,
) -> Plan:
    """Everything fit derives from its (validated) options; every check
    that needs the model runs here, before any file is written."""
    fns = model_fns(model)
    n_train = length(splits.train)
    if training.batch_size > n_train:
        warnings.warn(
            f"batch_size={training.batch_size} is larger than the training set "
            f"({n_train} examples): each batch repeats examples.",
            UserWarning,
            stacklevel=3,
        )
    if config is not None and not isinstance(config, Mapping):
        raise TypeError("config must be a dict describing the run (JSON).")
    layout = arms_layout(
        len(arms),
        training.batch_size,
        style=placement.parallel,
        mesh=placement.mesh,
        devices=placement.devices,
        bn_group_size=placement.bn_group_size,
    )
    hp = stacked(arms)
    traced = _trace_model(fns, splits, training, evaluation, layout, hp)
    if early_stopping is not None:
        keys = _record_keys(splits, traced.metrics, evaluation)
        if early_stopping.metric not in keys:
            raise ValueError(
                f"early_stopping: the records have no {early_stopping.metric!r}; "
                f"follow one of {sorted(keys)}."
            )
    on_device = False
    if splits.in_memory:
        x, y = splits.train
        on_device = (x.nbytes + y.nbytes) <= DEVICE_DATA_BYTES
    run_config = {
        "model": f"{fns.kind}:{fns.name}",
        "model_digest": hashlib.sha256(fns.description.encode()).hexdigest()[:16],
        "arms": [{"seed": a.seed, "hparams": a.hparams} for a in arms],
        "batch_size": training.batch_size,
        "validation": validation,
        "data": {
            "train": n_train,
            "val": None if splits.val is None else length(splits.val),
            "test": None if splits.test is None else length(splits.test),
            "num_classes": splits.num_classes,
            "sha256": fingerprint(splits),
        },
        "metrics": traced.metrics,
        "parallel_style": layout.style,
        **dataclasses.asdict(run_length),
        "early_stopping": None if early_stopping is None else early_stopping.config(),
        "config": jsonable(dict(config or {})),
    }
    run_config = json.loads(json.dumps(run_config))  # as it reads back from disk
    return Plan(
        fns,
        arms,
        hp,
        splits,
        traced.loss_fn,
        traced.metrics,
        layout,
        run_config,
        on_device,
        run_length,
        training,
        evaluation,
        placement,
        early_stopping,
        traced.arm_state,
        traced.convolves,
    )


class _Traced(NamedTuple):
    loss_fn: Callable
    metrics: list[str]
    arm_state: TrainState
    convolves: bool


def _trace_model(fns, splits, training, evaluation, layout, hp) -> _Traced:
    """The model, loss, optimizer, post_init and probe traced on the data's
    first examples (abstract values: nothing runs), each failure named."""
    x0, y0 = read(splits.train, np.arange(min(2, length(splits.train))))
    x0 = jnp.asarray(x0)
    variables = _trace(
        "model (initializing on data's training examples)",
        fns.init,
        jax.random.key(0),
        x0,
    )
    clash = sorted(set(variables) & set(RESERVED))
    if clash:
        raise ValueError(
            f"the model has variable collection(s) {clash}, names fit uses for the "
            "training state; rename them."
        )
    if "params" not in variables:
        raise ValueError("the model has no 'params' collection: nothing to train.")
    outputs, convolves = _trace_apply(fns, variables, x0)
    _check_bn_axis(fns, variables, x0, layout)
    targets = jax.ShapeDtypeStruct(y0.shape, y0.dtype)
    if training.loss is None:
        check_outputs(outputs, targets, splits.num_classes)
    loss_fn = training.loss or default_loss(splits.num_classes)
    try:
        metrics = metric_names(loss_fn, outputs, targets)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise type(e)(
            f"loss: on the model's outputs {jax.tree.map(jnp.shape, outputs)} and "
            f"data's targets of shape {y0.shape}: {type(e).__name__}: {e}"
        ) from None
    one_hp = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in hp}
    _check_optimizer(training, variables["params"], one_hp)
    arm_state = jax.eval_shape(  # post_init and the optimizer's state, traced
        make_arm_init(fns, training.optimizer, metrics, x0, training.post_init),
        jax.ShapeDtypeStruct((), jnp.uint32),
        one_hp,
    )
    if evaluation.probe is not None:
        probed = _trace("probe", evaluation.probe, variables, one_hp)
        if not all(
            isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(probed)
        ):
            raise TypeError("probe: it must return a pytree of arrays or numbers.")
    return _Traced(loss_fn, metrics, arm_state, convolves)


def _trace_apply(fns: ModelFns, variables: Any, x: Any) -> tuple[Any, bool]:
    """The model's outputs (abstract) in inference, and whether its forward
    pass convolves: one trace."""
    try:
        jaxpr, outputs = jax.make_jaxpr(
            lambda v, x: fns.apply(v, x, False, None, None)[0], return_shape=True
        )(variables, x)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise type(e)(
            f"model (applying it to data's training examples): {type(e).__name__}: {e}"
        ) from None

    def walk(jp) -> bool:
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            if any(walk(sub) for sub in jax.core.jaxprs_in_params(eqn.params)):
                return True
        return False

    return outputs, walk(jaxpr.jaxpr)


def _record_keys(splits: Splits, metrics: list[str], evaluation: Evaluation) -> set:
    """The numeric keys every record of the run has."""
    names = ["train"] + [
        k for k in ("val", "test") if splits.named().get(k) is not None
    ]
    if evaluation.train_examples:
        names.append("trainset")
    if evaluation.batch_stats and splits.test is not None:
        names.append("test_batch_stats")
    return {f"{n}_{m}" for n in names for m in ("loss", *metrics)}
