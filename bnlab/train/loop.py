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
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnlab.data import pipeline
from bnlab.data.sources import Dataset
from bnlab.train.arms import make_arms
from bnlab.train.batches import Batches, boundaries, execution_plan, make_chunk
from bnlab.train.checkpoint import (
    Checkpointer,
    NonFiniteError,
)
from bnlab.train.early import EarlyStopping, Tracker
from bnlab.train.evaluate import Evaluator
from bnlab.train.layout import DATA
from bnlab.train.options import (
    Evaluation,
    Placement,
    RunLength,
    Training,
    check_workdir,
)
from bnlab.train.plan import Plan, make_plan
from bnlab.train.progress import Progress
from bnlab.train.records import Records, arm_record
from bnlab.train.result import FitResult, Loaded, load
from bnlab.train.rundir import (
    RunLock,
    check_run_dir,
    read_records,
    write_json,
)
from bnlab.train.splits import make_splits
from bnlab.train.state import StateStore
from bnlab.train.step import (
    TrainState,
)

__all__ = ["DATA_AXIS", "FitResult", "Loaded", "fit", "load", "make_chunk"]

DATA_AXIS = DATA
# Keys of the run configuration that may change between a run and its resume.


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
    parallel: str = "jit",
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
    :func:`bnlab.train.layout.arms_layout` (arms spread first, then each arm's
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
      parallel: ``"jit"``, ``"shard_map"`` or ``"pmap"``
        (:data:`bnlab.parallel.STYLES`; ``"auto"`` is an older name of
        ``"jit"``; see
        :mod:`bnlab.train.layout`; the last two need BN layers with
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
    plan = make_plan(
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


class _Run:
    """One call of :func:`fit`: set up, restore or start, then the loop."""

    def __init__(
        self,
        plan: Plan,
        workdir: Path,
        lock: RunLock | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ):
        self.plan = plan
        self.workdir = workdir
        self.lock = lock
        self.records = Records(workdir, lock)
        self.progress = on_progress
        self.n = len(plan.arms)
        self.warned_stopped: set[int] = set()
        rule = plan.early_stopping
        self.tracker = None if rule is None else Tracker(rule, self.n)
        self.store = StateStore(plan, keep_best=rule is not None)

    def _event(self, text: str, step: int) -> None:
        """A line of progress (compiling, resumed, stopped early): the dict
        also has the step reached, so a callback that reads it works."""
        if self.progress is not None:
            total = self.plan.run_length.steps
            self.progress(
                {"event": text, "step": step, "total": total, "rate": None, "eta": None}
            )

    # ------------------------------------------------------------- train

    def train(self) -> FitResult:
        plan = self.plan
        execution = execution_plan(plan)
        batches = Batches(plan, execution)
        # compiling the step (seconds for a ResNet) overlaps initialization
        batches.precompile(self.store.abstract_state())
        fresh = self.store.fresh()
        ckpt = Checkpointer(
            self.workdir / "checkpoints", plan.run_length.keep_checkpoints, self.n
        )
        try:
            state = self.store.restore(ckpt, fresh)
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
            if self.tracker is not None and self.store.best is None:
                self.store.best = jax.tree.map(jnp.copy, state.variables)
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
            best = self.plan.layout.host(self.store.best)
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
        batches: Batches,
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
        for stop in boundaries(start, run_length, execution["sync_every"]):
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
                        self.store.best = keep_best(
                            self.store.best, state.variables, layout.put_arms(improved)
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
        self.store.save(ckpt, step, state)

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
            arm_record(step, arm, interval, stopped[i] < 0, stopped[i], evals, rate)
            | {"arm": i}
            for i, arm in enumerate(plan.arms)
        ]
        self.records.append(records)
        return records
