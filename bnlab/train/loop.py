"""``fit``: a researcher's own Flax model and data, seeds x hyper-parameters
as arms of one vmapped program, on every local device, resumable bit-exactly.

One path for a batch: example indices (a pure function of the arm's seed and
the step) -> the examples (gathered on the device when the data fits there,
read from the source by the host otherwise) -> ``vmap`` of one arm's step
over the arms, ``lax.scan`` over the steps between two evaluation or
checkpoint points -> evaluation and records -> an orbax checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnlab import parallel as bn_parallel
from bnlab.data import pipeline
from bnlab.data.sources import Dataset, validation_size
from bnlab.train.arms import Arm, make_arms, stacked
from bnlab.train.checkpoint import (
    Checkpointer,
    NonFiniteError,
    finalized_steps,
    read_state,
)
from bnlab.train.model import model_fns
from bnlab.train.rundir import (
    METRICS_FILE,
    RunLock,
    append_record,
    check_run_dir,
    read_records,
    rewrite_records,
    write_json,
)
from bnlab.train.step import (
    Interval,
    TrainState,
    default_loss,
    make_arm_eval,
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
RUN_LENGTH_KEYS = ("steps", "eval_every", "checkpoint_every", "keep_checkpoints")
_RESERVED = ("opt_state", "step", "rng", "stopped_at", "interval")


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
    """

    variables: dict
    arms: list[Arm]
    records: list[dict]
    stopped_at: list[int | None]
    step: int

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


# ------------------------------------------------------------------- data


class _Splits(NamedTuple):
    """Training data as arrays (in memory) or sources (streamed)."""

    train: Any  # (x, y) arrays or a Source
    val: Any | None
    test: Any | None
    num_classes: int
    in_memory: bool


def _splits(data: Any, validation: float | None) -> _Splits:
    if isinstance(data, Dataset):
        ds = data
        if validation is not None:
            ds = ds.with_validation(validation)
        val = None if ds.x_val is None else (ds.x_val, ds.y_val)
        test = None if ds.x_test is None else (ds.x_test, ds.y_test)
        return _Splits((ds.x_train, ds.y_train), val, test, int(ds.num_classes), True)
    if isinstance(data, pipeline.StreamingDataset):
        train, val = data.train, data.val
        if validation is not None:
            if val is not None:
                raise ValueError(
                    "this StreamingDataset already has a validation source; pass "
                    "validation=None to use it."
                )
            n = len(train)
            k = validation_size(n, validation)
            perm = np.random.default_rng([0, 1729]).permutation(n)
            val = pipeline.Subset(train, np.sort(perm[:k]))
            train = pipeline.Subset(train, np.sort(perm[k:]))
        return _Splits(train, val, data.test, int(data.num_classes), False)
    raise TypeError(
        f"data must be a bnlab.data.Dataset (arrays in memory) or a "
        f"bnlab.data.StreamingDataset (sources read by index), got "
        f"{type(data).__name__}."
    )


def _length(split: Any) -> int:
    return len(split[0]) if isinstance(split, tuple) else len(split)


def _read(split: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(split, tuple):
        return split[0][indices], split[1][indices]
    return pipeline.read(split, indices)


def _fingerprint(split: Any) -> str:
    """A cheap identity of the training data (its labels and up to 256
    evenly spaced examples), checked when a run resumes."""
    n = _length(split)
    rows = np.unique(np.linspace(0, n - 1, min(n, 256)).astype(np.int64))
    x, y = _read(split, rows)
    h = hashlib.sha256(str(n).encode())
    h.update(np.ascontiguousarray(x).view(np.uint8).reshape(-1))
    h.update(np.ascontiguousarray(y).view(np.uint8).reshape(-1))
    return h.hexdigest()[:16]


# ------------------------------------------------------------- arguments


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)


def _as_optimizer(optimizer: Any) -> Callable[[dict], optax.GradientTransformation]:
    if isinstance(optimizer, optax.GradientTransformation):
        return lambda hp: optimizer
    if callable(optimizer):
        return optimizer
    raise TypeError(
        "optimizer must be an optax.GradientTransformation or a function of the "
        "arm's hyper-parameters returning one, e.g. lambda hp: optax.sgd(hp['lr'])."
    )


@dataclasses.dataclass
class _Plan:
    """Everything :func:`fit` derives from its arguments before any work."""

    fns: Any
    arms: list[Arm]
    hp: dict[str, np.ndarray]
    splits: _Splits
    loss_fn: Callable
    metrics: list[str]
    layout: bn_parallel.ArmsLayout
    config: dict
    on_device: bool


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
      steps_per_call: steps per compiled call (scanned); default: up to the
        next evaluation or checkpoint, at most 100 (1 for streamed data).
      unroll: ``lax.scan``'s unroll (``True`` for small conv nets on XLA:CPU,
        which runs convolutions slowly inside loops).
      batch_order: ``(seed, step) -> example indices (batch_size,)`` of the
        training set for an arm's step (e.g. non-i.i.d. batches); it must be
        a pure function of its arguments, so that a resumed run reads the
        same batches. Default: shuffled epochs
        (:class:`bnlab.data.EpochOrder`).
      config: your own description of the run (JSON), recorded in
        ``config.json``; a resume must agree on it.
      on_progress: called after every compiled call with ``step``,
        ``total``, ``rate`` (steps/s after compilation, or None), ``eta``
        and the last record's means over arms (``train_loss``,
        ``val_accuracy`` / ``test_accuracy`` when present).

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError / TypeError: before any work, for arguments that cannot run.
      RunDirError: the run directory is in use, unusable, or replaced while
        running; DiskFullError: the disk is full (earlier checkpoints kept).
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
    plan = _plan(
        model,
        data,
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        seeds=seeds,
        hparams=hparams,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        validation=validation,
        loss=loss,
        parallel=parallel,
        mesh=mesh,
        devices=devices,
        bn_group_size=bn_group_size,
        eval_train=eval_train,
        eval_batch_size=eval_batch_size,
        steps_per_call=steps_per_call,
        config=config,
    )
    workdir = Path(workdir).absolute()
    leader = jax.process_index() == 0
    if leader:
        check_run_dir(workdir)
    lock = RunLock(workdir) if leader else None
    try:
        return _Run(
            plan,
            workdir,
            lock,
            optimizer=_as_optimizer(optimizer),
            probe=probe,
            train_kwargs=train_kwargs,
            post_init=post_init,
            rng_streams=tuple(rng_streams),
            eval_at_start=eval_at_start,
            eval_batch_size=eval_batch_size,
            eval_train=eval_train,
            eval_batch_stats=eval_batch_stats,
            unroll=unroll,
            batch_order=batch_order,
            on_progress=on_progress,
        ).train()
    finally:
        if lock is not None:
            lock.release()


def _plan(model, data, **kw) -> _Plan:
    steps = _positive("steps", kw["steps"])
    batch_size = _positive("batch_size", kw["batch_size"])
    eval_every = _positive("eval_every", kw["eval_every"] or max(steps // 10, 1))
    checkpoint_every = _positive(
        "checkpoint_every", kw["checkpoint_every"] or eval_every
    )
    keep = _positive("keep_checkpoints", kw["keep_checkpoints"])
    _positive("eval_batch_size", kw["eval_batch_size"])
    if kw["steps_per_call"] is not None:
        _positive("steps_per_call", kw["steps_per_call"])
    if isinstance(kw["eval_train"], bool) or int(kw["eval_train"]) < 0:
        raise ValueError(f"eval_train={kw['eval_train']!r} must be >= 0.")
    _as_optimizer(kw["optimizer"])
    fns = model_fns(model)
    arms = make_arms(kw["seeds"], kw["hparams"])
    splits = _splits(data, kw["validation"])
    n_train = _length(splits.train)
    if n_train == 0:
        raise ValueError("the training split has no examples.")
    if batch_size > n_train:
        warnings.warn(
            f"batch_size={batch_size} is larger than the training set ({n_train} "
            "examples): each batch repeats examples.",
            UserWarning,
            stacklevel=3,
        )
    loss_fn = kw["loss"] or default_loss(splits.num_classes)
    layout = bn_parallel.arms_layout(
        len(arms),
        batch_size,
        style=kw["parallel"],
        mesh=kw["mesh"],
        devices=kw["devices"],
        bn_group_size=kw["bn_group_size"],
    )
    x0, y0 = _read(splits.train, np.arange(min(2, n_train)))
    variables = jax.eval_shape(fns.init, jax.random.key(0), jnp.asarray(x0))
    clash = sorted(set(variables) & set(_RESERVED))
    if clash:
        raise ValueError(
            f"the model has variable collection(s) {clash}, names fit uses for the "
            "training state; rename them."
        )
    if "params" not in variables:
        raise ValueError("the model has no 'params' collection: nothing to train.")
    outputs = jax.eval_shape(
        lambda v, x: fns.apply(v, x, False, None, None)[0], variables, jnp.asarray(x0)
    )
    metrics = metric_names(loss_fn, outputs, jax.ShapeDtypeStruct(y0.shape, y0.dtype))
    on_device = False
    if splits.in_memory:
        x, y = splits.train
        on_device = (x.nbytes + y.nbytes) <= DEVICE_DATA_BYTES
    if kw["config"] is not None and not isinstance(kw["config"], Mapping):
        raise TypeError("config must be a dict describing the run (JSON).")
    run_config = {
        "model": f"{fns.kind}:{fns.name}",
        "arms": [{"seed": a.seed, "hparams": a.hparams} for a in arms],
        "batch_size": batch_size,
        "validation": kw["validation"],
        "data": {
            "train": n_train,
            "val": None if splits.val is None else _length(splits.val),
            "test": None if splits.test is None else _length(splits.test),
            "num_classes": splits.num_classes,
            "fingerprint": _fingerprint(splits.train),
        },
        "metrics": metrics,
        "parallel_style": layout.style,
        "steps": steps,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": keep,
        "config": _jsonable(dict(kw["config"] or {})),
    }
    run_config["_steps_per_call"] = kw["steps_per_call"] or (100 if on_device else 1)
    run_config = json.loads(json.dumps(run_config))  # as it reads back from disk
    return _Plan(
        fns,
        arms,
        stacked(arms),
        splits,
        loss_fn,
        metrics,
        layout,
        run_config,
        on_device,
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def arm_map(fn: Callable, in_axes: Any = 0) -> Callable:
    """``jax.vmap(fn, in_axes)`` over the leading (arm) axis, except that one
    arm (a static size of 1, e.g. one arm per device) is computed unbatched
    and given its axis back: XLA:CPU runs batched matmuls of batch 1 slower
    than plain ones (``python -m benchmarks.train_loop``: fit went from 0.49x
    to 0.75x of a minimal loop with this)."""
    mapped = jax.vmap(fn, in_axes=in_axes)

    def call(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        sizes = {
            leaf.shape[0]
            for a, ax in zip(args, axes, strict=True)
            if ax is not None
            for leaf in jax.tree.leaves(a)
        }
        if sizes != {1}:
            return mapped(*args)
        squeezed = [
            a if ax is None else jax.tree.map(lambda v: v[0], a)
            for a, ax in zip(args, axes, strict=True)
        ]
        return jax.tree.map(lambda v: v[None], fn(*squeezed))

    return call


def make_chunk(arm_step: Callable, *, gather: bool, unroll: int | bool = 1) -> Callable:
    """The steps between two evaluation or checkpoint points as one function
    of the arm-stacked state: ``lax.scan`` over steps of ``vmap`` over arms.

    With ``gather``: ``chunk(state, hparams, x_all, y_all, idx)`` with the
    whole training set on the device and ``idx`` the example indices
    ``(steps, arms, batch)``; else ``chunk(state, hparams, xs, ys)`` with the
    examples themselves ``(steps, arms, batch, ...)``.
    """
    vstep = arm_map(arm_step)
    if gather:

        def chunk(state, hp, x_all, y_all, idx):
            def body(st, idx_t):
                return vstep(st, x_all[idx_t], y_all[idx_t], hp), None

            return jax.lax.scan(body, state, idx, unroll=unroll)[0]

        return chunk

    def streamed(state, hp, xs, ys):
        def body(st, batch):
            return vstep(st, *batch, hp), None

        return jax.lax.scan(body, state, (xs, ys), unroll=unroll)[0]

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


class _Run:
    """One call of :func:`fit`: everything it sets up, then the loop."""

    def __init__(self, plan: _Plan, workdir: Path, lock: RunLock | None, **kw):
        self.plan = plan
        self.workdir = workdir
        self.lock = lock
        self.leader = jax.process_index() == 0
        self.kw = kw
        self.metrics_path = workdir / METRICS_FILE
        c = plan.config
        self.steps, self.eval_every = c["steps"], c["eval_every"]
        self.checkpoint_every = c["checkpoint_every"]
        self.n = len(plan.arms)
        n_train, batch, custom = (
            _length(plan.splits.train),
            c["batch_size"],
            kw["batch_order"],
        )
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
        self.last: dict[str, Any] = {}
        self.warned_stopped: set[int] = set()

    # ------------------------------------------------------------ build

    def _init_fn(self):
        plan, kw = self.plan, self.kw
        x0, _ = _read(plan.splits.train, np.arange(min(2, _length(plan.splits.train))))
        return jax.vmap(
            make_arm_init(
                plan.fns,
                kw["optimizer"],
                plan.metrics,
                jnp.asarray(x0),
                kw["post_init"],
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

    def _abstract(self) -> Any:
        """The saved tree's shapes, dtypes and shardings (restore target)."""
        seeds = np.zeros(self.n, np.uint32)
        shapes = jax.eval_shape(self._init_fn(), seeds, self.plan.hp)
        layout = self.plan.layout
        if layout.style == "pmap":
            return _state_tree(shapes)
        sharding = jax.sharding.NamedSharding(
            layout.mesh, jax.sharding.PartitionSpec("arms")
        )
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            _state_tree(shapes),
        )

    # ------------------------------------------------------------ resume

    def _check_meta(self, meta: dict) -> bool:
        saved = meta.get("config", {})
        now = self.plan.config
        same = all(
            saved.get(k) == now.get(k)
            for k in set(now) | set(saved)
            if k not in RUN_LENGTH_KEYS and not k.startswith("_")
        )
        if not same:
            return False
        old_steps = saved.get("steps")
        if old_steps != now["steps"] and not getattr(self, "_warned_steps", False):
            self._warned_steps = True
            warnings.warn(
                f"resuming a {old_steps}-step run with steps={now['steps']}: a "
                "learning-rate schedule that depends on the run length now follows "
                "the new total, so the run differs from either length trained from "
                "scratch.",
                UserWarning,
                stacklevel=5,
            )
        devices = {
            "devices": self.plan.layout.devices,
            "processes": jax.process_count(),
        }
        saved_devices = {k: meta.get(k) for k in devices}
        if saved_devices != devices and not getattr(self, "_warned_devices", False):
            self._warned_devices = True
            warnings.warn(
                f"resuming on {devices} where the checkpoint was written on "
                f"{saved_devices}: reductions may run in another order, so results "
                "can differ from an uninterrupted run by float rounding.",
                UserWarning,
                stacklevel=5,
            )
        return True

    def _restore(self, ckpt: Checkpointer, fresh: TrainState) -> TrainState | None:
        target = self._abstract()
        restored = ckpt.restore_latest(target, self._check_meta)
        if restored is None:
            return None
        tree, _ = restored
        state = _from_tree(tree, fresh)
        if self.plan.layout.style == "pmap":
            state = self.plan.layout.put_arms(jax.device_get(state))
        return state

    # ------------------------------------------------------------- train

    def train(self) -> FitResult:
        plan = self.plan
        fresh = self._fresh()
        ckpt = Checkpointer(
            self.workdir / "checkpoints", plan.config["keep_checkpoints"], self.n
        )
        try:
            state = self._restore(ckpt, fresh)
            start = 0 if state is None else int(self._host_scalar(state.step))
            if state is None:
                state = fresh
                if self.leader:
                    rewrite_records(self.metrics_path, [])
            if start >= self.steps:
                warnings.warn(
                    f"{self.workdir} already holds step {start} >= steps={self.steps}: "
                    "nothing to train, no file was changed; pass a larger steps to "
                    "continue the run.",
                    UserWarning,
                    stacklevel=3,
                )
                ckpt.close()
                return self._result(
                    state, read_records(self.metrics_path, keep_bad=False)
                )
            if self.leader:
                if start:
                    kept = [
                        r for r in read_records(self.metrics_path) if r["step"] <= start
                    ]
                    rewrite_records(self.metrics_path, kept)
                write_json(self.workdir / "config.json", plan.config)
            state = self._loop(ckpt, state, start)
        except BaseException:
            # finish (or abandon) the save in flight; the error that stopped
            # the run is the one to report
            with contextlib.suppress(Exception):
                ckpt.close()
            raise
        ckpt.close()
        return self._result(state, read_records(self.metrics_path))

    def _host_scalar(self, arr) -> int:
        host = self.plan.layout.host(arr)
        return int(np.asarray(host).reshape(-1)[0])

    def _result(self, state: TrainState, records: list[dict]) -> FitResult:
        host = self.plan.layout.host(state)
        stopped = [None if s < 0 else int(s) for s in np.asarray(host.stopped_at)]
        return FitResult(
            host.variables, self.plan.arms, records, stopped, int(host.step[0])
        )

    def _boundaries(self, start: int) -> list[int]:
        """Ends of the compiled calls: multiples of one length (so one
        program serves them all, plus the tail's), the largest divisor of
        ``gcd(eval_every, checkpoint_every)`` not above ``steps_per_call``;
        every evaluation and checkpoint step is one. They depend only on the
        step, so a resumed run makes the same calls."""
        spc = self.plan.config["_steps_per_call"]
        period = math.gcd(self.eval_every, self.checkpoint_every)
        length = max(d for d in range(1, min(period, spc) + 1) if period % d == 0)
        ends = list(range((start // length + 1) * length, self.steps, length))
        return [*ends, self.steps]

    def _loop(self, ckpt: Checkpointer, state: TrainState, start: int) -> TrainState:
        plan, kw = self.plan, self.kw
        layout = plan.layout
        step_fn = make_arm_step(
            plan.fns,
            kw["optimizer"],
            plan.loss_fn,
            style=layout.style,
            axis_name=layout.grad_axis,
            average_axis=layout.average_axis,
            rng_streams=kw["rng_streams"] if plan.fns.kind == "linen" else (),
            train_kwargs=kw["train_kwargs"],
        )
        chunk = make_chunk(step_fn, gather=plan.on_device, unroll=kw["unroll"])
        if plan.on_device:
            compiled = layout.compile(chunk, n_arms=2, n_replicated=2)
            x_all, y_all = layout.put_replicated(
                tuple(map(np.asarray, plan.splits.train))
            )

            def run_chunk(state, a, b):
                return compiled(
                    state, hp, x_all, y_all, layout.put_chunk(self._indices(a, b))
                )

        else:
            compiled = layout.compile(chunk, n_arms=2, n_replicated=0)

            def run_chunk(state, a, b):
                xs, ys = _read(plan.splits.train, self._indices(a, b))
                return compiled(state, hp, *layout.put_chunk((xs, ys)))

        hp = layout.put_arms(plan.hp)
        reset = layout.compile(
            lambda st: st._replace(interval=jax.tree.map(jnp.zeros_like, st.interval)),
            n_arms=1,
            n_replicated=0,
        )
        evaluator = _Evaluator(plan, kw, layout)
        if start == 0 and kw["eval_at_start"]:
            self._record(0, state, evaluator, rate=None, hp=hp)
        t_ready = rate = None
        done_at_ready = start
        prev = start
        for stop in self._boundaries(start):
            state = run_chunk(state, prev, stop)
            prev = stop
            self._check_stopped(state, stop)  # waits for the chunk
            if t_ready is None:
                t_ready, done_at_ready = time.perf_counter(), stop
            elif stop > done_at_ready:
                rate = (stop - done_at_ready) / max(time.perf_counter() - t_ready, 1e-9)
            if stop % self.eval_every == 0 or stop == self.steps:
                self._record(stop, state, evaluator, rate, hp)
                state = reset(state)
            if stop % self.checkpoint_every == 0 or stop == self.steps:
                if self.lock is not None:
                    self.lock.check()
                tree = _state_tree(state)
                if layout.style == "pmap":
                    tree = layout.host(tree)
                meta = {
                    "config": plan.config,
                    "devices": layout.devices,
                    "processes": jax.process_count(),
                }
                ckpt.save(stop, tree, meta)
            if kw["on_progress"] is not None:
                eta = None if rate is None else (self.steps - stop) / rate
                kw["on_progress"](
                    {"step": stop, "total": self.steps, "rate": rate, "eta": eta}
                    | self.last
                )
        return state

    def _indices(self, a: int, b: int) -> np.ndarray:
        """Example indices ``(steps a..b-1, arms, batch)``, int32."""
        per_seed = {
            s: np.stack([order(i) for i in range(a, b)])
            for s, order in self.orders.items()
        }
        return np.stack([per_seed[arm.seed] for arm in self.plan.arms], axis=1).astype(
            np.int32
        )

    def _check_stopped(self, state: TrainState, step: int) -> None:
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

    def _record(self, step, state, evaluator, rate, hp) -> None:
        plan = self.plan
        view = plan.layout.eval_view(state)
        interval = plan.layout.host(state.interval)
        stopped = np.asarray(plan.layout.host(state.stopped_at))
        evals = evaluator(view, plan.layout.eval_view(hp))
        records = []
        for i, arm in enumerate(plan.arms):
            alive = stopped[i] < 0
            count = int(interval.count[i])
            r: dict[str, Any] = {
                "step": step,
                "arm": i,
                "seed": arm.seed,
                "hparams": arm.hparams,
            }

            def mean(total, alive=alive, count=count):
                return float(total) / count if alive and count else None

            r["train_loss"] = mean(interval.loss[i])
            for m in plan.metrics:
                r[f"train_{m}"] = mean(interval.metrics[m][i])
            for key, values in evals.items():
                if key == "probe":
                    r["probe"] = (
                        jax.tree.map(lambda a, i=i: np.asarray(a[i]).tolist(), values)
                        if alive
                        else None
                    )
                else:
                    r[key] = float(values[i]) if alive else None
            r["stopped_at"] = None if alive else int(stopped[i])
            r["steps_per_sec"] = rate
            records.append(r)
        if self.leader:
            for r in records:
                append_record(self.metrics_path, r)
        self.last = _summary(records)


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


class _Evaluator:
    """Validation, test (and training-subset) metrics of every arm with
    running statistics, summed on the device, read back once. Every set is
    cut into padded batches of one size, so one compiled function serves
    them all."""

    def __init__(self, plan: _Plan, kw: dict, layout: bn_parallel.ArmsLayout):
        self.plan, self.layout = plan, layout
        splits = {}
        if plan.splits.val is not None:
            splits["val"] = plan.splits.val
        if plan.splits.test is not None:
            splits["test"] = plan.splits.test
        if kw["eval_train"]:
            n_train = _length(plan.splits.train)
            n = min(int(kw["eval_train"]), n_train)
            perm = np.random.default_rng([0, 4242]).permutation(n_train)
            splits["trainset"] = _read(plan.splits.train, np.sort(perm[:n]))
        self.size = min(
            kw["eval_batch_size"], max(map(_length, splits.values()), default=1)
        )
        self.sets = {}
        for name, split in splits.items():
            n = _length(split)
            chunks = [(i, min(i + self.size, n)) for i in range(0, n, self.size)]
            if isinstance(split, tuple):  # in memory: on the device once
                self.sets[name] = (n, [self._padded(split, i, j) for i, j in chunks])
            else:
                self.sets[name] = (n, [(split, i, j) for i, j in chunks])
        arm_eval = make_arm_eval(plan.fns, plan.loss_fn)
        self.fn = layout.compile_eval(
            arm_map(arm_eval, in_axes=(0, None, None, None)), 1
        )
        self.batch_stats = None
        if kw["eval_batch_stats"] and "test" in splits:
            split = splits["test"]
            n = _length(split)
            bs_eval = make_arm_eval(plan.fns, plan.loss_fn, batch_stats=True)
            self.batch_stats = (
                n,
                layout.compile_eval(arm_map(bs_eval, in_axes=(0, None, None, None)), 1),
                [
                    layout.put_eval(
                        (*_read(split, np.arange(i, j)), np.ones(j - i, bool))
                    )
                    for i, j in (
                        (i, min(i + self.size, n)) for i in range(0, n, self.size)
                    )
                ],
            )
        self.probe = None
        if kw["probe"] is not None:
            self.probe = layout.compile_eval(jax.vmap(kw["probe"]), 2)

    def _padded(self, split, i: int, j: int):
        x, y = _read(split, np.arange(i, j))
        pad = self.size - (j - i)
        valid = np.arange(self.size) < (j - i)
        if pad:
            x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
            y = np.concatenate([y, np.repeat(y[:1], pad, axis=0)])
        return self.layout.put_eval((np.asarray(x), np.asarray(y), valid))

    @staticmethod
    def _sum(fn, variables, batches):
        total_loss = totals = None
        for batch in batches:
            loss, metrics = fn(variables, *batch)
            if total_loss is None:
                total_loss, totals = loss, metrics
            else:
                total_loss = total_loss + loss
                totals = jax.tree.map(jnp.add, totals, metrics)
        return total_loss, totals

    def __call__(self, state: TrainState, hp) -> dict[str, Any]:
        variables = state.variables
        out = {}
        for name, (n, batches) in self.sets.items():
            batches = [  # streamed sets are read now
                self._padded(*b) if len(b) == 3 and not hasattr(b[0], "shape") else b
                for b in batches
            ]
            loss, totals = self._sum(self.fn, variables, batches)
            out[f"{name}_loss"] = np.asarray(loss) / n
            for m, v in totals.items():
                out[f"{name}_{m}"] = np.asarray(v) / n
        if self.batch_stats is not None:
            n, fn, batches = self.batch_stats
            loss, totals = self._sum(fn, variables, batches)
            out["test_batch_stats_loss"] = np.asarray(loss) / n
            for m, v in totals.items():
                out[f"test_batch_stats_{m}"] = np.asarray(v) / n
        if self.probe is not None:
            out["probe"] = jax.tree.map(np.asarray, self.probe(variables, hp))
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


def load(workdir: str | Path, step: int | None = None) -> Loaded:
    """The variables of every arm of a run, verified, for your own code.

    Reads the newest finished checkpoint of ``workdir`` (or ``step``) with
    orbax, checks every array against the SHA-256 recorded when it was saved,
    and returns each arm's model variables (``params``, ``batch_stats``, ...)
    as numpy arrays. No model is needed.

    Raises:
      FileNotFoundError: no such run or checkpoint.
      ValueError: the checkpoint fails its digests or its files cannot be
        read (damaged).

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
    collections = [k for k in tree if k not in _RESERVED]
    variables = [
        {c: jax.tree.map(lambda a, i=i: a[i], tree[c]) for c in collections}
        for i in range(len(arms))
    ]
    stopped = [None if s < 0 else int(s) for s in np.asarray(tree["stopped_at"])]
    return Loaded(variables, arms, int(meta["step"]), config, stopped)
