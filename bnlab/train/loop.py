"""``fit``: a researcher's own Flax model and data, seeds x hyper-parameters
as arms of one vmapped program, on every local device, resumable bit-exactly.

One path for a batch: example indices (a pure function of the arm's seed and
the step) -> the examples (gathered on the device when the data fits there,
read from the source by the host otherwise) -> ``vmap`` of one arm's step
over the arms, ``lax.scan`` over the steps between two evaluation or
checkpoint points -> evaluation and records -> an orbax checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from bnlab import parallel as bn_parallel
from bnlab.data import pipeline
from bnlab.data.sources import Dataset
from bnlab.train.arms import Arm, arm_map, make_arms, stacked
from bnlab.train.checkpoint import (
    Checkpointer,
    NonFiniteError,
    finalized_steps,
    read_state,
)
from bnlab.train.early import EarlyStopping, Tracker
from bnlab.train.evaluate import Evaluator
from bnlab.train.model import ModelFns, model_fns
from bnlab.train.options import (
    Evaluation,
    Placement,
    RunLength,
    Training,
    check_workdir,
)
from bnlab.train.progress import Progress
from bnlab.train.rundir import (
    METRICS_FILE,
    RunLock,
    append_record,
    check_run_dir,
    read_records,
    rewrite_records,
    write_json,
)
from bnlab.train.splits import Splits, fingerprint, length, make_splits, read
from bnlab.train.step import (
    Interval,
    TrainState,
    check_outputs,
    default_loss,
    make_arm_init,
    make_arm_step,
    metric_names,
)

__all__ = ["DATA_AXIS", "FitResult", "Loaded", "fit", "load", "make_chunk"]

DATA_AXIS = bn_parallel.DATA
# A training set up to this size (per device) is kept on the device and each
# step gathers its rows there; larger ones are read by the host per step.
DEVICE_DATA_BYTES = 2**30
# Keys of the run configuration that may change between a run and its resume.
RUN_LENGTH_KEYS = tuple(f.name for f in dataclasses.fields(RunLength))
_RESERVED = ("opt_state", "step", "rng", "stopped_at", "interval", "best")


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      variables: the final variables (``params``, ``batch_stats``, ...) as
        numpy arrays with a leading axis of arms.
      arms: the arms, in the order of that axis.
      records: every record of ``metrics.jsonl`` (one per evaluation and arm).
      stopped_at: per arm, None, or the step whose loss or state was not
        finite (the arm kept its last finite state).
      step: the step the run reached.
      early_stopping: with ``early_stopping=``, per arm ``{"best",
        "best_step", "done_at"}``; the best variables are ``best``.
      best: with ``early_stopping=``, each arm's variables at its best
        evaluation (leading axis of arms), else None.
    """

    variables: dict
    arms: list[Arm]
    records: list[dict]
    stopped_at: list[int | None]
    step: int
    early_stopping: list[dict] | None = None
    best: dict | None = None

    def table(self) -> str:
        """The arms as a table: index, seed, hyper-parameters, stopped.

        Example:
          >>> print(FitResult({}, make_arms((0, 1), {"lr": [0.1]}), [], [None, 7], 9).table())
          arm  seed   lr  stopped_at
            0     0  0.1           -
            1     1  0.1           7
        """
        return _arms_table([(a.seed, a.hparams) for a in self.arms], self.stopped_at)

    def __repr__(self) -> str:
        return f"FitResult(step={self.step}, {len(self.arms)} arm(s))\n{self.table()}"

    def arm(self, i: int) -> dict:
        """The variables of arm ``i``, as ``model.apply`` takes them."""
        return jax.tree.map(lambda a: a[i], self.variables)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values (evaluations, arms))`` of a record key (NaN where
        absent or null), e.g. ``result.curve("val_accuracy")``."""
        steps = sorted({r["step"] for r in self.records})
        pos = {s: i for i, s in enumerate(steps)}
        out = np.full((len(steps), len(self.arms)), np.nan)
        for r in self.records:
            v = r.get(key)
            if v is not None:
                out[pos[r["step"]], r["arm"]] = v
        return np.asarray(steps), out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything :func:`fit` derives from its arguments before any work."""

    fns: ModelFns
    arms: list[Arm]
    hp: dict[str, np.ndarray]
    splits: Splits
    loss_fn: Callable
    metrics: list[str]
    layout: bn_parallel.ArmsLayout
    config: dict
    on_device: bool
    run_length: RunLength
    training: Training
    evaluation: Evaluation
    placement: Placement
    early_stopping: EarlyStopping | None
    arm_state: TrainState  # one arm's, abstract
    convolves: bool


# -------------------------------------------------------------------- fit


def fit(
    model: Any,
    data: Dataset | pipeline.StreamingDataset,
    workdir: str | Path,
    *,
    optimizer: optax.GradientTransformation | Callable[[dict], Any],
    steps: int,
    batch_size: int,
    seeds: Sequence[int] | int = (0,),
    hparams: Mapping[str, Sequence[float]]
    | Sequence[Mapping[str, float]]
    | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    validation: float | None = None,
    loss: Callable[[Any, Any], Any] | None = None,
    parallel: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    devices: Sequence[Any] | None = None,
    bn_group_size: int = 0,
    probe: Callable[[dict, dict], Any] | None = None,
    train_kwargs: Callable[[jax.Array, dict], dict] | None = None,
    post_init: Callable[[dict, dict], dict] | None = None,
    rng_streams: Sequence[str] = ("dropout",),
    eval_at_start: bool = False,
    eval_batch_size: int = 1000,
    eval_train: int = 0,
    eval_batch_stats: bool = False,
    steps_per_call: int | None = None,
    unroll: int | bool = 1,
    batch_order: Callable[[int, int], np.ndarray] | None = None,
    config: Mapping[str, Any] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    quiet: bool = False,
    early_stopping: EarlyStopping | None = None,
) -> FitResult:
    """Trains (or resumes) every arm of a model in ``workdir``.

    Arms are ``seeds x hparams``: with ``seeds=(0, 1, 2)`` and
    ``hparams={"lr": [0.1, 0.3]}`` six models train as one vmapped program.
    An arm's seed fixes its initialization and its data order (arms with the
    same seed are paired). If ``workdir`` holds checkpoints of the same run,
    training resumes from the newest verified one and ends with the same
    bits as an uninterrupted run. One run at a time may use a ``workdir``.

    Writes ``config.json``, ``metrics.jsonl`` (one JSON record per
    evaluation and arm: ``step``, ``arm``, ``seed``, ``hparams``, the mean
    ``train_loss`` and ``train_<metric>`` since the previous record,
    ``val_*`` / ``test_*`` loss and metrics with running statistics,
    ``steps_per_sec``; metrics of an arm that stopped are null) and orbax
    checkpoints in ``checkpoints/<step>/state`` (the model's own tree by
    name; :func:`load` reads them back).

    Devices: by default every device, one mesh ``arms x data`` chosen by
    :func:`bnlab.parallel.arms_layout` (arms spread first, then each arm's
    batch split with exact global statistics).

    Args:
      model: a ``flax.linen.Module`` called as ``model.apply(variables, x,
        train=bool)``, or a function ``rngs -> flax.nnx.Module`` (switched
        with ``.train()`` / ``.eval()``).
      data: a :class:`bnlab.data.Dataset` (arrays) or a
        :class:`bnlab.data.StreamingDataset` (sources read by index).
      workdir: the run directory (created).
      optimizer: an optax transformation, or ``hparams -> transformation``
        (the arm's hyper-parameters as traced scalars).
      steps: total training steps per arm.
      batch_size: examples per step and arm.
      seeds: the arms' seeds.
      hparams: a grid ``{name: [values]}`` or a list of settings.
      eval_every: steps between evaluations (and at the end); default
        ``steps // 10``.
      checkpoint_every: steps between checkpoints (and at the end); default
        ``eval_every``.
      keep_checkpoints: how many checkpoints to keep.
      validation: carve this fraction of the training set out as the
        validation split (fixed, seed-independent), unless ``data`` has one.
      loss: ``(outputs, targets) -> mean loss`` or ``(loss, {metric:
        value})``; default softmax cross-entropy with accuracy on integer
        labels (``num_classes > 0``), mean squared error otherwise.
      parallel: ``"auto"``, ``"shard_map"`` or ``"pmap"`` (see
        :class:`bnlab.parallel.ArmsLayout`; the last two need BN layers with
        ``axis_name=bnlab.train.DATA_AXIS``).
      mesh: an explicit mesh with axes ``("arms", "data")``.
      devices: the devices to use (default all; ``jax.devices()[:1]`` for
        one).
      bn_group_size: shard_map / pmap: devices per BN statistics group.
      probe: ``(variables, hparams) -> pytree`` computed per arm at every
        evaluation, recorded under ``"probe"``.
      train_kwargs: ``(step, hparams) -> dict`` of extra keyword arguments of
        the model in training.
      post_init: ``(variables, hparams) -> variables`` applied to each arm's
        initial variables.
      rng_streams: Linen RNG streams drawn in training (each step folds the
        arm's key with the step).
      eval_at_start: also evaluate before the first step.
      eval_batch_size: examples per evaluation batch.
      eval_train: also evaluate this many training examples (a fixed subset)
        with running statistics: records ``trainset_*``.
      eval_batch_stats: also evaluate the test set with each batch's own
        statistics: records ``test_batch_stats_*``.
      steps_per_call: steps per compiled call (a ``lax.scan``); default:
        chosen by fit and recorded in ``config.json`` under ``execution``: on
        XLA:CPU a model with convolutions runs one compiled step per call
        (XLA:CPU runs convolutions several times slower inside loops), other
        models up to 100 steps per call (1 for streamed data).
      unroll: ``lax.scan``'s unroll (compiles longer; rarely needed).
      batch_order: ``(seed, step) -> example indices (batch_size,)`` of the
        training set for an arm's step (e.g. non-i.i.d. batches); it must be
        a pure function of its arguments, so that a resumed run reads the
        same batches. Default: shuffled epochs
        (:class:`bnlab.data.EpochOrder`).
      config: your own description of the run (JSON), recorded in
        ``config.json``; a resume must agree on it.
      on_progress: called after every compiled call with ``step``,
        ``total``, ``rate`` (steps/s after compilation, or None), ``eta``,
        ``evaluated`` (whether the step was an evaluation) and the last
        record's means over arms (``train_loss``, ``val_accuracy`` /
        ``test_accuracy`` when present); and with ``{"event": text}`` when
        the run compiles or resumes. Default: a progress bar on stderr
        (a terminal), else one line per evaluation.
      quiet: show no progress (when ``on_progress`` is None).
      early_stopping: an :class:`EarlyStopping` rule: the run stops when
        every arm's metric has stopped improving, and each arm's best
        variables are kept in its checkpoints (``FitResult.best``,
        ``load(workdir, best=True)``); resumes stop at the same step.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError / TypeError: before any work, for arguments that cannot run.
      RunDirError: the run directory is in use, unusable, or replaced while
        running; WriteError (DiskFullError, WritePermissionError): a
        checkpoint or record could not be written (earlier ones kept).
      CheckpointMismatchError: the checkpoints belong to another model or
        configuration; nothing is moved.
      NonFiniteError: every arm's loss became NaN/Inf (names the steps).

    Example:
      >>> import flax.linen as nn, numpy as np, optax, tempfile, bnlab.linen
      >>> from bnlab.data import Dataset
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.Dense(16)(x)
      ...         x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
      ...         return nn.Dense(3)(nn.relu(x))
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(96, 4)).astype(np.float32)
      >>> y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)
      >>> ds = Dataset(x[:64], y[:64], x[64:], y[64:], num_classes=3)
      >>> result = fit(Net(), ds, tempfile.mkdtemp(), seeds=(0, 1),
      ...              hparams={"lr": [0.1, 0.3]}, batch_size=16, steps=20,
      ...              optimizer=lambda hp: optax.sgd(hp["lr"]))
      >>> len(result.arms), result.step
      (4, 20)
    """
    run_length = RunLength.make(steps, eval_every, checkpoint_every, keep_checkpoints)
    training = Training.make(
        optimizer=optimizer,
        loss=loss,
        batch_size=batch_size,
        rng_streams=rng_streams,
        train_kwargs=train_kwargs,
        post_init=post_init,
        batch_order=batch_order,
    )
    evaluation = Evaluation.make(
        batch_size=eval_batch_size,
        train_examples=eval_train,
        batch_stats=eval_batch_stats,
        at_start=eval_at_start,
        probe=probe,
    )
    placement = Placement.make(
        parallel=parallel,
        mesh=mesh,
        devices=devices,
        bn_group_size=bn_group_size,
        steps_per_call=steps_per_call,
        unroll=unroll,
    )
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            "early_stopping must be a bnlab.train.EarlyStopping, e.g. "
            "EarlyStopping('val_loss', patience=5)."
        )
    if on_progress is not None and not callable(on_progress):
        raise TypeError("on_progress must be a function of one dict, or None.")
    workdir = check_workdir(workdir)
    plan = _plan(
        model,
        make_splits(data, validation),
        make_arms(seeds, hparams),
        validation=validation,
        config=config,
        run_length=run_length,
        training=training,
        evaluation=evaluation,
        placement=placement,
        early_stopping=early_stopping,
    )
    leader = jax.process_index() == 0
    shown = None
    if on_progress is None and not quiet and leader:
        shown = on_progress = Progress(label=workdir.name or "fit")
    with _one_run_per_process():
        if leader:
            check_run_dir(workdir)
        lock = RunLock(workdir) if leader else None
        try:
            return _Run(plan, workdir, lock, on_progress).train()
        finally:
            if lock is not None:
                lock.release()
            if shown is not None:
                shown.close()


_RUNNING = threading.Lock()


@contextlib.contextmanager
def _one_run_per_process() -> Iterator[None]:
    """One :func:`fit` at a time in a process: orbax's checkpointing and
    the signal handling around a save are process-wide, and two runs in
    two threads interfere (a failed save, a false "checkpoints
    disappeared")."""
    if not _RUNNING.acquire(blocking=False):
        raise RuntimeError(
            "another fit is running in this process (in another thread); run fits "
            "one after the other, or in separate processes."
        )
    try:
        yield
    finally:
        _RUNNING.release()


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
    if layout.style == "auto" or layout.data_shards == 1 or not mutable:
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
            "layers with axis_name=bnlab.train.DATA_AXIS, or use parallel='auto'."
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


def _plan(
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
) -> _Plan:
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
    layout = bn_parallel.arms_layout(
        len(arms),
        training.batch_size,
        style=placement.parallel,
        mesh=placement.mesh,
        devices=placement.devices,
        bn_group_size=placement.bn_group_size,
    )
    x0, y0 = read(splits.train, np.arange(min(2, n_train)))
    x0 = jnp.asarray(x0)
    variables = _trace(
        "model (initializing on data's training examples)",
        fns.init,
        jax.random.key(0),
        x0,
    )
    clash = sorted(set(variables) & set(_RESERVED))
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
    hp = stacked(arms)
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
    if early_stopping is not None:
        keys = _record_keys(splits, metrics, evaluation)
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
        "metrics": metrics,
        "parallel_style": layout.style,
        **dataclasses.asdict(run_length),
        "early_stopping": None if early_stopping is None else early_stopping.config(),
        "config": _jsonable(dict(config or {})),
    }
    run_config = json.loads(json.dumps(run_config))  # as it reads back from disk
    return _Plan(
        fns,
        arms,
        hp,
        splits,
        loss_fn,
        metrics,
        layout,
        run_config,
        on_device,
        run_length,
        training,
        evaluation,
        placement,
        early_stopping,
        arm_state,
        convolves,
    )


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


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):  # in an order that does not vary by run
        return sorted((_jsonable(v) for v in x), key=json.dumps)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def make_chunk(
    arm_step: Callable, *, gather: bool, unroll: int | bool = 1, scan: bool = True
) -> Callable:
    """The steps between two evaluation or checkpoint points as one function
    of the arm-stacked state: ``lax.scan`` over steps of ``vmap`` over arms
    (with ``scan=False``: exactly one step, no loop, for a Python loop of
    compiled steps).

    With ``gather``: ``chunk(state, hparams, x_all, y_all, idx)`` with the
    whole training set on the device and ``idx`` the example indices
    ``(steps, arms, batch)``; else ``chunk(state, hparams, xs, ys)`` with the
    examples themselves ``(steps, arms, batch, ...)``.
    """
    vstep = arm_map(arm_step)

    def run(body, state, xs):
        if scan:
            return jax.lax.scan(body, state, xs, unroll=unroll)[0]
        return body(state, jax.tree.map(lambda a: a[0], xs))[0]

    if gather:

        def chunk(state, hp, x_all, y_all, idx):
            def body(st, idx_t):
                return vstep(st, x_all[idx_t], y_all[idx_t], hp), None

            return run(body, state, idx)

        return chunk

    def streamed(state, hp, xs, ys):
        def body(st, batch):
            return vstep(st, *batch, hp), None

        return run(body, state, (xs, ys))

    return streamed


def _state_tree(state: TrainState) -> dict:
    """The state as saved: the model's collections by name, then training."""
    return {
        **state.variables,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "stopped_at": state.stopped_at,
        "interval": {
            "count": state.interval.count,
            "loss": state.interval.loss,
            "metrics": state.interval.metrics,
        },
    }


def _from_tree(tree: dict, like: TrainState) -> TrainState:
    variables = {k: tree[k] for k in like.variables}
    opt_state = jax.tree.unflatten(
        jax.tree.structure(like.opt_state), jax.tree.leaves(tree["opt_state"])
    )
    i = tree["interval"]
    return TrainState(
        variables,
        opt_state,
        tree["step"],
        tree["rng"],
        tree["stopped_at"],
        Interval(i["count"], i["loss"], dict(i["metrics"])),
    )


def _execution(plan: _Plan) -> dict[str, Any]:
    """How the steps between two evaluation or checkpoint points run: a
    ``lax.scan`` of up to ``steps_per_call`` steps per compiled call (few
    host round trips: fastest for MLPs everywhere), or one compiled call per
    step from a Python loop (XLA:CPU runs convolutions inside loops several
    times slower than outside them, jax-ml/jax#12868: a small CNN took 32 ms
    per step in a scan vs 2.8 ms per step in a loop of jitted steps)."""
    backend = jax.default_backend()
    given = plan.placement.steps_per_call
    if backend == "cpu" and plan.convolves and given in (None, 1):
        # one step per call; the host waits for the device every 100 steps
        # (or at the next evaluation or checkpoint), not after every step
        return {
            "backend": backend,
            "scan": False,
            "steps_per_call": 1,
            "sync_every": 100,
            "why": "convolutions on XLA:CPU run faster outside loops",
        }
    spc = given or (100 if plan.on_device else 1)
    why = "steps_per_call given" if given else "few host round trips"
    return {
        "backend": backend,
        "scan": True,
        "steps_per_call": spc,
        "sync_every": spc,
        "why": why,
    }


class _Batches:
    """Each arm's batches (a pure function of its seed and the step) and
    the compiled training of the steps between two boundaries."""

    def __init__(self, plan: _Plan, execution: dict[str, Any]):
        self.plan, self.layout = plan, plan.layout
        n_train, batch = length(plan.splits.train), plan.training.batch_size
        custom = plan.training.batch_order
        # per seed: step -> the arm's example indices (batch,)
        self.orders = {
            a.seed: (
                pipeline.EpochOrder(n_train, batch, a.seed).indices
                if custom is None
                else functools.partial(
                    _checked_order, custom, a.seed, batch=batch, n=n_train
                )
            )
            for a in plan.arms
        }
        self.scan = execution["scan"]
        self.batch = batch
        self.step_exec: concurrent.futures.Future | None = None
        training = plan.training
        step_fn = make_arm_step(
            plan.fns,
            training.optimizer,
            plan.loss_fn,
            style=self.layout.style,
            axis_name=self.layout.grad_axis,
            average_axis=self.layout.average_axis,
            rng_streams=training.rng_streams if plan.fns.kind == "linen" else (),
            train_kwargs=training.train_kwargs,
        )
        chunk = make_chunk(
            step_fn,
            gather=plan.on_device,
            unroll=plan.placement.unroll,
            scan=self.scan,
        )
        self.hp = self.layout.put_arms(plan.hp)
        if plan.on_device:
            self.compiled = self.layout.compile(chunk, n_arms=2, n_replicated=2)
            self.data = self.layout.put_replicated(
                tuple(map(np.asarray, plan.splits.train))
            )
        else:
            self.compiled = self.layout.compile(chunk, n_arms=2, n_replicated=0)
            self.data = ()

    def precompile(self, state: TrainState) -> None:
        """Starts compiling the one-step call of a Python loop of steps in a
        thread (``state``: abstract), so that it overlaps the model's
        initialization; the first step waits for it. Only where the call's
        shardings are known here (one process, ``auto`` style)."""
        layout = self.layout
        if self.scan or not self.plan.on_device or layout.style != "auto":
            return
        if jax.process_count() > 1:
            return

        def sds(tree, spec):
            sharding = layout._sharding(spec)
            return jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding),
                tree,
            )

        args = (
            sds(state, P(bn_parallel.ARMS)),
            sds(self.hp, P(bn_parallel.ARMS)),
            *sds(self.data, P()),
            sds(
                jax.ShapeDtypeStruct((1, len(self.plan.arms), self.batch), np.int32),
                P(None, bn_parallel.ARMS, layout._data_axes),
            ),
        )
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self.step_exec = pool.submit(lambda: self.compiled.lower(*args).compile())
        pool.shutdown(wait=False)

    def indices(self, a: int, b: int) -> np.ndarray:
        """Example indices ``(steps a..b-1, arms, batch)``, int32."""
        per_seed = {
            s: np.stack([order(i) for i in range(a, b)])
            for s, order in self.orders.items()
        }
        return np.stack([per_seed[arm.seed] for arm in self.plan.arms], axis=1).astype(
            np.int32
        )

    def _call(self, state: TrainState, idx: np.ndarray) -> TrainState:
        if self.plan.on_device:
            fn = self.compiled
            if self.step_exec is not None and len(idx) == 1:
                fn = self.step_exec.result()
            return fn(state, self.hp, *self.data, self.layout.put_chunk(idx))
        batch = read(self.plan.splits.train, idx)
        return self.compiled(state, self.hp, *self.layout.put_chunk(batch))

    def train(self, state: TrainState, a: int, b: int) -> TrainState:
        """The state after steps ``a..b-1`` (dispatched; not waited for)."""
        idx = self.indices(a, b)
        if self.scan:
            return self._call(state, idx)
        for t in range(b - a):
            state = self._call(state, idx[t : t + 1])
        return state


def _boundaries(
    start: int, run_length: RunLength, steps_per_call: int
) -> Iterator[int]:
    """Ends of the compiled calls after ``start``: multiples of one length
    (so one program serves them all, plus the tail's), the largest divisor
    of ``gcd(eval_every, checkpoint_every)`` not above ``steps_per_call``;
    every evaluation and checkpoint step is one. They depend only on the
    step, so a resumed run makes the same calls. Lazy: a long run does not
    hold a list of them."""
    period = math.gcd(run_length.eval_every, run_length.checkpoint_every)
    size = max(d for d in range(1, min(period, steps_per_call) + 1) if period % d == 0)
    first = (start // size + 1) * size
    return itertools.chain(range(first, run_length.steps, size), [run_length.steps])


class _Records:
    """``metrics.jsonl`` of a run: records appended as evaluations finish,
    the run directory's identity checked before every write, and records a
    restart drops kept in ``metrics.jsonl.dropped`` (never lost)."""

    def __init__(self, workdir: Path, lock: RunLock | None):
        self.path = workdir / METRICS_FILE
        self.lock = lock
        self.last: dict[str, Any] = {}

    def _check(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def keep_until(self, step: int) -> None:
        """Keeps the records up to ``step`` (where the run resumes); later
        ones (from after the checkpoint, or of an earlier run when ``step``
        is 0) move to ``metrics.jsonl.dropped`` with a warning."""
        if self.lock is None:
            return
        self._check()
        records = read_records(self.path)
        kept = [r for r in records if r["step"] <= step]
        dropped = [r for r in records if r["step"] > step]
        if dropped:
            aside = self.path.with_name(self.path.name + ".dropped")
            for r in dropped:
                append_record(aside, r)
            warnings.warn(
                f"{self.path}: {len(dropped)} record(s) after step {step} (where "
                f"this run {'resumes' if step else 'starts'}) are kept in {aside}.",
                UserWarning,
                stacklevel=4,
            )
        rewrite_records(self.path, kept)  # also drops lines kept in .bad

    def append(self, records: list[dict[str, Any]]) -> None:
        self.last = _summary(records)
        if self.lock is None:
            return
        self._check()
        for r in records:
            append_record(self.path, r)


class _Run:
    """One call of :func:`fit`: set up, restore or start, then the loop."""

    def __init__(
        self,
        plan: _Plan,
        workdir: Path,
        lock: RunLock | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ):
        self.plan = plan
        self.workdir = workdir
        self.lock = lock
        self.records = _Records(workdir, lock)
        self.progress = on_progress
        self.n = len(plan.arms)
        self.warned_stopped: set[int] = set()
        self.warned: set[str] = set()
        rule = plan.early_stopping
        self.tracker = None if rule is None else Tracker(rule, self.n)
        self.best = None  # with early stopping: each arm's best variables

    def _event(self, text: str, step: int) -> None:
        """A line of progress (compiling, resumed, stopped early): the dict
        also has the step reached, so a callback that reads it works."""
        if self.progress is not None:
            total = self.plan.run_length.steps
            self.progress(
                {"event": text, "step": step, "total": total, "rate": None, "eta": None}
            )

    # ------------------------------------------------------------ build

    def _init_fn(self):
        plan = self.plan
        x0, _ = read(plan.splits.train, np.arange(min(2, length(plan.splits.train))))
        return jax.vmap(
            make_arm_init(
                plan.fns,
                plan.training.optimizer,
                plan.metrics,
                jnp.asarray(x0),
                plan.training.post_init,
            )
        )

    def _fresh(self) -> TrainState:
        seeds = np.asarray([a.seed for a in self.plan.arms], np.uint32)
        # Runs once: XLA's cheapest optimization level compiles it ~3x faster
        # (random initializers are slow to optimize) and it is still exact.
        init = jax.jit(self._init_fn()).lower(seeds, self.plan.hp)
        state = init.compile(compiler_options={"xla_backend_optimization_level": 0})(
            seeds, self.plan.hp
        )
        return self.plan.layout.put_arms(jax.device_get(state))

    def _abstract_state(self) -> TrainState:
        """The arms' stacked state, abstract (shapes and dtypes)."""
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((self.n, *s.shape), s.dtype),
            self.plan.arm_state,
        )

    def _abstract(self) -> Any:
        """The saved tree's shapes, dtypes and shardings (restore target)."""
        shapes = self._abstract_state()
        layout = self.plan.layout
        tree = _state_tree(shapes)
        if self.plan.early_stopping is not None:
            tree["best"] = shapes.variables
        if layout.style == "pmap":
            return tree
        sharding = jax.sharding.NamedSharding(
            layout.mesh, jax.sharding.PartitionSpec("arms")
        )
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
        )

    # ------------------------------------------------------------ resume

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(text, UserWarning, stacklevel=6)

    def _check_meta(self, meta: dict) -> bool:
        saved = meta.get("config", {})
        now = self.plan.config
        ignored = (*RUN_LENGTH_KEYS, "execution")
        if any(
            saved.get(k) != now.get(k)
            for k in set(now) | set(saved)
            if k not in ignored and not k.startswith("_")
        ):
            return False
        if saved.get("steps") != now["steps"]:
            self._warn_once(
                "steps",
                f"resuming a {saved.get('steps')}-step run with steps={now['steps']}: "
                "a learning-rate schedule that depends on the run length now follows "
                "the new total, so the run differs from either length trained from "
                "scratch.",
            )
        devices = {
            "devices": self.plan.layout.devices,
            "processes": jax.process_count(),
        }
        saved_devices = {k: meta.get(k) for k in devices}
        if saved_devices != devices:
            self._warn_once(
                "devices",
                f"resuming on {devices} where the checkpoint was written on "
                f"{saved_devices}: reductions may run in another order, so results "
                "can differ from an uninterrupted run by float rounding.",
            )
        return True

    def _restore(self, ckpt: Checkpointer, fresh: TrainState) -> TrainState | None:
        restored = ckpt.restore_latest(self._abstract(), self._check_meta)
        if restored is None:
            return None
        tree = restored[0]
        state = _from_tree(tree, fresh)
        best = tree.get("best")
        if self.plan.layout.style == "pmap":
            state = self.plan.layout.put_arms(jax.device_get(state))
            best = None if best is None else self.plan.layout.put_arms(best)
        self.best = best
        return state

    # ------------------------------------------------------------- train

    def train(self) -> FitResult:
        plan = self.plan
        execution = _execution(plan)
        batches = _Batches(plan, execution)
        # compiling the step (seconds for a ResNet) overlaps initialization
        batches.precompile(self._abstract_state())
        fresh = self._fresh()
        ckpt = Checkpointer(
            self.workdir / "checkpoints", plan.run_length.keep_checkpoints, self.n
        )
        try:
            state = self._restore(ckpt, fresh)
            start = 0 if state is None else int(self._host_scalar(state.step))
            if self.tracker is not None:
                self.tracker.replay(
                    [
                        r
                        for r in read_records(self.records.path, False)
                        if r["step"] <= start
                    ]
                )
            if self.tracker is not None and start and self.tracker.all_done:
                self._event(f"stopped early at step {start} (early_stopping)", start)
                ckpt.close()
                return self._result(state, read_records(self.records.path, False))
            if start >= plan.run_length.steps:
                warnings.warn(
                    f"{self.workdir} already holds step {start} >= steps="
                    f"{plan.run_length.steps}: nothing to train, no file was changed; "
                    "pass a larger steps to continue the run.",
                    UserWarning,
                    stacklevel=3,
                )
                ckpt.close()
                return self._result(state, read_records(self.records.path, False))
            if start:
                self._event(
                    f"resumed from step {start} (its checkpoint verified)", start
                )
            state = state if state is not None else fresh
            if self.tracker is not None and self.best is None:
                self.best = jax.tree.map(jnp.copy, state.variables)
            self.records.keep_until(start)
            if self.lock is not None:
                write_json(
                    self.workdir / "config.json", plan.config | {"execution": execution}
                )
            state = self._loop(ckpt, state, start, execution, batches)
        except BaseException:
            # finish (or abandon) the save in flight; the error that stopped
            # the run is the one to report
            with contextlib.suppress(Exception):
                ckpt.close()
            raise
        ckpt.close()
        return self._result(state, read_records(self.records.path))

    def _host_scalar(self, arr) -> int:
        host = self.plan.layout.host(arr)
        return int(np.asarray(host).reshape(-1)[0])

    def _result(self, state: TrainState, records: list[dict]) -> FitResult:
        host = self.plan.layout.host(state)
        stopped = [None if s < 0 else int(s) for s in np.asarray(host.stopped_at)]
        early = best = None
        if self.tracker is not None:
            early = self.tracker.summary()
            best = self.plan.layout.host(self.best)
        return FitResult(
            host.variables,
            self.plan.arms,
            records,
            stopped,
            int(host.step[0]),
            early,
            best,
        )

    def _loop(
        self,
        ckpt: Checkpointer,
        state: TrainState,
        start: int,
        execution: dict,
        batches: _Batches,
    ) -> TrainState:
        plan, layout, run_length = self.plan, self.plan.layout, self.plan.run_length
        reset = layout.compile(
            lambda st: st._replace(interval=jax.tree.map(jnp.zeros_like, st.interval)),
            n_arms=1,
            n_replicated=0,
        )
        evaluator = Evaluator(
            plan.splits, plan.loss_fn, plan.fns, plan.evaluation, layout
        )
        keep_best = layout.compile(
            lambda best, variables, improved: jax.tree.map(
                lambda b, v: jnp.where(
                    improved.reshape(improved.shape + (1,) * (v.ndim - 1)), v, b
                ),
                best,
                variables,
            ),
            n_arms=3,
            n_replicated=0,
        )
        if start == 0 and plan.evaluation.at_start:
            self._record(0, state, evaluator, None, batches.hp)
        self._event(
            "compiling the training step"
            + (" (a scan of steps)" if execution["scan"] else ""),
            start,
        )
        t_ready = rate = None
        done_at_ready = prev = start
        for stop in _boundaries(start, run_length, execution["sync_every"]):
            state = batches.train(state, prev, stop)
            prev = stop
            self._check_stopped(state)  # waits for the steps
            if t_ready is None:
                t_ready, done_at_ready = time.perf_counter(), stop
            elif stop > done_at_ready:
                rate = (stop - done_at_ready) / max(time.perf_counter() - t_ready, 1e-9)
            evaluated = run_length.is_eval(stop)
            done = False
            if evaluated:
                records = self._record(stop, state, evaluator, rate, batches.hp)
                if self.tracker is not None:
                    improved = np.zeros(self.n, bool)
                    improved[self.tracker.update(records)] = True
                    if improved.any():
                        self.best = keep_best(
                            self.best, state.variables, layout.put_arms(improved)
                        )
                    done = self.tracker.all_done
                state = reset(state)
            if done or run_length.is_checkpoint(stop):
                self._save(ckpt, stop, state)
            if self.progress is not None:
                eta = None if rate is None else (run_length.steps - stop) / rate
                self.progress(
                    {"step": stop, "total": run_length.steps, "rate": rate, "eta": eta}
                    | {"evaluated": evaluated}
                    | self.records.last
                )
            if done:
                self._event(f"stopped early at step {stop} (early_stopping)", stop)
                break
        return state

    def _save(self, ckpt: Checkpointer, step: int, state: TrainState) -> None:
        if self.lock is not None:
            self.lock.check()
        layout = self.plan.layout
        tree = _state_tree(state)
        if self.tracker is not None:
            tree["best"] = self.best
        if layout.style == "pmap":
            tree = layout.host(tree)
        meta = {
            "config": self.plan.config,
            "devices": layout.devices,
            "processes": jax.process_count(),
        }
        ckpt.save(step, tree, meta)

    def _check_stopped(self, state: TrainState) -> None:
        stopped = np.asarray(self.plan.layout.host(state.stopped_at))
        new = [
            (i, int(s))
            for i, s in enumerate(stopped)
            if s >= 0 and i not in self.warned_stopped
        ]
        if (stopped >= 0).all():
            where = ", ".join(
                f"{self.plan.arms[i].label()} at step {int(s)}"
                for i, s in enumerate(stopped)
            )
            raise NonFiniteError(
                f"the loss (or the new state) became NaN/Inf in every arm ({where}); "
                "training stopped. No checkpoint holds non-finite values. Lower the "
                "learning rate or check the data."
            )
        for i, s in new:
            self.warned_stopped.add(i)
            warnings.warn(
                f"{self.plan.arms[i].label()}: the loss (or the new state) became "
                f"NaN/Inf at step {s}; this arm stopped there (it keeps its last "
                "finite state, its later metrics are null); the other arms go on.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _record(self, step, state, evaluator, rate, hp) -> list[dict[str, Any]]:
        plan = self.plan
        interval = plan.layout.host(state.interval)
        stopped = np.asarray(plan.layout.host(state.stopped_at))
        evals = evaluator(
            plan.layout.eval_view(state).variables, plan.layout.eval_view(hp)
        )
        records = [
            _arm_record(step, arm, interval, stopped[i] < 0, stopped[i], evals, rate)
            | {"arm": i}
            for i, arm in enumerate(plan.arms)
        ]
        self.records.append(records)
        return records


def _arm_record(step, arm, interval, alive, stopped, evals, rate) -> dict[str, Any]:
    """One arm's record: train means since the last record, evaluations."""
    i = arm.index
    count = int(interval.count[i])

    def mean(total):
        return float(total) / count if alive and count else None

    r: dict[str, Any] = {
        "step": step,
        "arm": i,
        "seed": arm.seed,
        "hparams": arm.hparams,
        "train_loss": mean(interval.loss[i]),
    }
    for m, totals in interval.metrics.items():
        r[f"train_{m}"] = mean(totals[i])
    for key, values in evals.items():
        if key == "probe":
            r["probe"] = (
                jax.tree.map(lambda a: np.asarray(a[i]).tolist(), values)
                if alive
                else None
            )
        else:
            r[key] = float(values[i]) if alive else None
    r["stopped_at"] = None if alive else int(stopped)
    r["steps_per_sec"] = rate
    return r


def _checked_order(order, seed: int, step: int, *, batch: int, n: int) -> np.ndarray:
    idx = np.asarray(order(seed, step))
    if idx.shape != (batch,) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            f"batch_order(seed={seed}, step={step}) returned {idx.dtype} of shape "
            f"{idx.shape}; it must return {batch} integer example indices."
        )
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(
            f"batch_order(seed={seed}, step={step}) returned indices outside the "
            f"training set's {n} examples."
        )
    return idx


def _summary(records: list[dict]) -> dict[str, Any]:
    """Means over arms of what the progress line shows."""
    out = {}
    for key in ("train_loss", "val_accuracy", "test_accuracy"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


# ------------------------------------------------------------------- load


class Loaded(NamedTuple):
    """A run read back by :func:`load`.

    Attributes:
      variables: per arm, the variables as ``model.apply`` takes them
        (numpy arrays).
      arms: per arm, ``{"seed", "hparams"}``.
      step: the checkpoint's step.
      config: the run's ``config.json`` contents (as saved with the
        checkpoint).
      stopped_at: per arm, None or the step at which it stopped.
    """

    variables: list[dict]
    arms: list[dict]
    step: int
    config: dict
    stopped_at: list[int | None]

    def table(self) -> str:
        """The arms as a table: index, seed, hyper-parameters, stopped."""
        return _arms_table(
            [(a["seed"], a["hparams"]) for a in self.arms], self.stopped_at
        )

    def __repr__(self) -> str:
        return f"Loaded(step={self.step}, {len(self.arms)} arm(s))\n{self.table()}"


def _arms_table(arms: list[tuple[int, dict]], stopped: list[int | None]) -> str:
    keys = sorted({k for _, hp in arms for k in hp})
    rows = [["arm", "seed", *keys, "stopped_at"]]
    for i, ((seed, hp), s) in enumerate(zip(arms, stopped, strict=True)):
        rows.append(
            [
                str(i),
                str(seed),
                *(f"{hp[k]:g}" for k in keys),
                "-" if s is None else str(s),
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows
    )


def load(workdir: str | Path, step: int | None = None, *, best: bool = False) -> Loaded:
    """The variables of every arm of a run, verified, for your own code.

    Reads the newest finished checkpoint of ``workdir`` (or ``step``) with
    orbax, checks every array against the SHA-256 recorded when it was saved,
    and returns each arm's model variables (``params``, ``batch_stats``, ...)
    as numpy arrays. No model is needed. With ``best``: each arm's variables
    at its best evaluation (a run with ``early_stopping``).

    Raises:
      FileNotFoundError: no such run or checkpoint.
      ValueError: the checkpoint fails its digests, misses an array, or its
        files cannot be read (damaged).
      RunDirError: a file of the checkpoint cannot be read for lack of
        permission.

    Example:
      >>> run = load(workdir)  # doctest: +SKIP
      >>> logits = model.apply(run.variables[0], x, train=False)  # doctest: +SKIP
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory.")
    if not finalized_steps(directory):
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    tree, meta = read_state(directory, step)
    config = meta["config"]
    arms = config.get("arms", [])
    if best:
        if "best" not in tree:
            raise ValueError(
                f"{workdir} was trained without early_stopping: it keeps no best "
                "variables; load(workdir) gives the last ones."
            )
        source = tree["best"]
    else:
        source = {k: v for k, v in tree.items() if k not in _RESERVED}
    variables = [
        {c: jax.tree.map(lambda a, i=i: a[i], v) for c, v in source.items()}
        for i in range(len(arms))
    ]
    stopped = [None if s < 0 else int(s) for s in np.asarray(tree["stopped_at"])]
    return Loaded(variables, arms, int(meta["step"]), config, stopped)
