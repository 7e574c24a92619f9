"""``fit``: data -> step -> metrics/checkpoints, resumable bit-exactly.

The host never waits for a step's values except at evaluation / checkpoint
points: train metrics are summed on the device (:class:`Interval`), one step
is kept in flight while the next batch is prepared, and on a single device
the whole training set stays on the device and each step gathers its rows.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnlab import data as bn_data
from bnlab.parallel import DataParallel
from bnlab.train.checkpoint import Checkpointer, NonFiniteError
from bnlab.train.config import RUN_LENGTH_FIELDS, Config, ConfigError
from bnlab.train.rundir import (
    METRICS_FILE,
    append_record,
    check_run_dir,
    lock_run_dir,
    read_records,
    rewrite_records,
)
from bnlab.train.state import TrainState, build_model, build_optimizer, init_state
from bnlab.train.step import Interval, make_eval_step, make_train_step, with_interval

__all__ = ["METRICS_FILE", "fit"]

# Keep a single-device training set on the device up to this size.
DEVICE_DATA_BYTES = 2**30


def _same_run(saved: dict[str, Any], config: Config) -> list[str]:
    now = config.to_dict()
    return sorted(
        k for k in now if k not in RUN_LENGTH_FIELDS and saved.get(k) != now[k]
    )


def _devices() -> dict[str, int]:
    return {"devices": jax.device_count(), "processes": jax.process_count()}


def fit(
    config: Config,
    workdir: str | Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final host state.

    Writes ``config.json``, ``metrics.jsonl`` (one JSON record per evaluation;
    ``train_loss`` / ``train_accuracy`` are means over the steps since the
    previous record) and orbax checkpoints under ``checkpoints/``. If
    ``workdir`` holds checkpoints of the same run, training resumes from the
    newest verified one and ends with bit-identical results to an
    uninterrupted run. One run at a time may use a ``workdir``.

    Args:
      config: the run.
      workdir: output directory (created).
      on_progress: called after every step with ``step``, ``total``,
        ``rate`` (steps/s after compilation, or None), ``eta`` (seconds or
        None) and the last record's ``train_loss`` / ``test_accuracy`` (or
        None); it never waits for the device.

    Returns:
      The final :class:`TrainState` as host arrays.

    Raises:
      ConfigError: before any work, if the config cannot run here.
      RunDirError: the run directory is in use or unusable, or the disk is
        full (earlier checkpoints are kept).
      CheckpointMismatchError: the checkpoints were written by a different
        model; nothing is moved.
      NonFiniteError: the loss became NaN/Inf (names the step); no checkpoint
        with non-finite values is written. Checked at evaluation and
        checkpoint steps, so the run stops at the next of those.
    """
    if config.parallel == "pmap" and jax.process_count() > 1:
        raise ConfigError(
            "parallel='pmap' checkpoints process-local copies; for several "
            "processes use parallel='shard_map' or 'jit'."
        )
    config.check_devices(jax.device_count(), jax.process_count())
    workdir = Path(workdir).absolute()
    leader = jax.process_index() == 0
    if leader:
        check_run_dir(workdir)
    with lock_run_dir(workdir) if leader else contextlib.nullcontext():
        return _Run(config, workdir, on_progress).train()


class _Run:
    """One call of :func:`fit`: everything it sets up, then the loop."""

    def __init__(self, config, workdir, on_progress):
        self.config, self.workdir, self.on_progress = config, workdir, on_progress
        self.leader = jax.process_index() == 0
        self.metrics_path = workdir / METRICS_FILE
        self.ds = bn_data.load(config.dataset, config.data_dir, seed=config.seed)
        if config.batch_size > len(self.ds.x_train):
            warnings.warn(
                f"batch_size={config.batch_size} is larger than the training set "
                f"({len(self.ds.x_train)} examples): each batch repeats examples.",
                UserWarning,
                stacklevel=3,
            )
        self.stream = bn_data.BatchStream(
            self.ds.x_train, self.ds.y_train, config.batch_size, config.seed
        )
        self.dp = DataParallel(config.parallel, bn_group_size=config.bn_group_size)
        self.model = build_model(
            config, self.ds.num_classes or 1, self.dp.bn_axis_name, self.dp.bn_groups
        )
        self.tx = build_optimizer(config)

    # ------------------------------------------------------------ resume

    def _check_meta(self, meta: dict[str, Any]) -> None:
        config = self.config
        diff = _same_run(meta["config"], config)
        if diff:
            raise ConfigError(
                f"{self.workdir} holds checkpoints of a different run (differs in "
                f"{diff}); use a new --workdir or the same config."
            )
        if meta["config"]["steps"] != config.steps and config.schedule != "constant":
            warnings.warn(
                f"resuming a {meta['config']['steps']}-step run with steps="
                f"{config.steps}: the {config.schedule} learning-rate schedule now "
                "follows the new total, so the run differs from either length "
                "trained from scratch.",
                UserWarning,
                stacklevel=4,
            )
        saved = {k: meta.get(k) for k in _devices()}
        if config.parallel != "single" and saved != _devices():
            warnings.warn(
                f"resuming on {_devices()} where the checkpoint was written on "
                f"{saved}: reductions run in another order, so results differ "
                "from an uninterrupted run by float rounding (~1e-8).",
                UserWarning,
                stacklevel=4,
            )

    def _restore(self, ckpt: Checkpointer, fresh: TrainState):
        restored = ckpt.restore_latest(fresh, self._check_meta)
        if restored is None:
            if self.leader:
                rewrite_records(self.metrics_path, [])
            return fresh, Interval.zeros()
        state, meta = restored
        step = int(state.step)
        if self.leader:
            kept = [r for r in read_records(self.metrics_path) if r["step"] <= step]
            rewrite_records(self.metrics_path, kept)
        interval = meta.get("interval")
        return state, Interval.zeros() if interval is None else Interval.from_host(
            interval
        )

    # ------------------------------------------------------------- train

    def train(self) -> TrainState:
        config, dp = self.config, self.dp
        fresh = init_state(config, self.model, self.tx, self.ds.x_train)
        ckpt = Checkpointer(self.workdir / "checkpoints", config.keep_checkpoints)
        try:
            state, interval = self._restore(ckpt, fresh)
            start = int(state.step)
            if start >= config.steps:
                warnings.warn(
                    f"{self.workdir} already holds step {start} >= steps="
                    f"{config.steps}: nothing to train. Its files are unchanged; "
                    "pass a larger --steps to continue the run.",
                    UserWarning,
                    stacklevel=3,
                )
                return jax.device_get(state)
            if self.leader:
                (self.workdir / "config.json").write_text(
                    json.dumps(config.to_dict(), indent=1)
                )
            return self._loop(ckpt, dp.put_state(state), dp.put_state(interval), start)
        finally:
            ckpt.close()

    def _batches(self, start: int):
        """Compiled step and, per step, its batch arguments (prepared while the
        previous step runs)."""
        config, dp, ds = self.config, self.dp, self.ds
        step = make_train_step(
            self.model,
            self.tx,
            ds.num_classes,
            config.parallel,
            dp.axis_name,
            average_stats=dp.group_axis,
        )
        on_device = (
            config.parallel == "single"
            and ds.x_train.nbytes + ds.y_train.nbytes <= DEVICE_DATA_BYTES
        )
        if on_device:
            data = jax.device_put((ds.x_train, ds.y_train))
            compiled = dp.compile(with_interval(step, gather=True), replicated=2)

            def args(i):
                return (*data, self.stream.indices(i).astype(np.int32))

        else:
            compiled = dp.compile(with_interval(step), replicated=2)

            def args(i):
                return dp.put_batch(self.stream.batch(i))

        return compiled, args

    def _loop(self, ckpt, state, interval, start: int) -> TrainState:
        config, dp = self.config, self.dp
        train_step, batch_args = self._batches(start)
        evaluator = _Evaluator(self.model, self.ds, config.eval_batch_stats, dp)
        evaluator.compile(
            state if config.parallel == "single" else dp.local_copy(state)
        )
        last = {"train_loss": None, "test_accuracy": None}
        t_ready = None  # when the first step (and compilation) finished
        last_t, last_step = time.perf_counter(), start
        args = batch_args(start)
        in_flight = None
        for step in range(start + 1, config.steps + 1):
            state, interval = train_step(state, interval, *args)
            if step < config.steps:
                args = batch_args(step)  # while the device runs this step
            if in_flight is not None:  # at most one step ahead of the device
                jax.block_until_ready(in_flight)
            in_flight = interval
            if t_ready is None:
                jax.block_until_ready(interval)
                t_ready, ready_step = time.perf_counter(), step
                last_t, last_step = t_ready, step
            is_last = step == config.steps
            do_eval = step % config.eval_every == 0 or is_last
            do_ckpt = step % config.checkpoint_every == 0 or is_last
            if do_eval or do_ckpt:
                sums = dp.local_copy(interval)
                if sums.first_bad >= 0:
                    raise NonFiniteError(
                        f"loss is NaN/Inf at step {int(sums.first_bad)}; training "
                        "stopped. No checkpoint after that step was written. Lower "
                        "lr or check the data."
                    )
            host = (
                dp.local_copy(state)
                if (do_eval and config.parallel != "single")
                or (do_ckpt and dp.style == "pmap")
                else None
            )
            if do_eval:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "train_loss": float(sums.loss_sum) / int(sums.count),
                    "train_accuracy": float(sums.accuracy_sum) / int(sums.count),
                    # after compilation; None when no step ran since then
                    "steps_per_sec": (step - last_step) / max(now - last_t, 1e-9)
                    if step > last_step
                    else None,
                    **evaluator(state if host is None else host),
                }
                if not self.ds.num_classes:  # regression: MSE, no accuracy
                    record = {k: v for k, v in record.items() if "accuracy" not in k}
                if self.leader:
                    append_record(self.metrics_path, record)
                last = {
                    "train_loss": record["train_loss"],
                    "test_accuracy": record.get("test_accuracy"),
                }
                interval = dp.put_state(Interval.zeros())
                sums = Interval.zeros()
                in_flight = None
                last_t, last_step = time.perf_counter(), step
            if do_ckpt:
                meta = {
                    "config": config.to_dict(),
                    "step": step,
                    "data_position": step,
                    "interval": Interval(*map(np.asarray, sums)).to_host(),
                    **_devices(),
                }
                ckpt.save(step, host if dp.style == "pmap" else state, meta)
            if self.on_progress is not None:
                rate = eta = None
                if step > ready_step:
                    rate = (step - ready_step) / max(
                        time.perf_counter() - t_ready, 1e-9
                    )
                    eta = (config.steps - step) / rate
                self.on_progress(
                    {"step": step, "total": config.steps, "rate": rate, "eta": eta}
                    | last
                )
        return dp.local_copy(state)


class _Evaluator:
    """Test-set loss/accuracy with running statistics (and optionally with
    test-batch statistics), summed on the device, read back once."""

    def __init__(self, model, ds, batch_stats: bool, dp: DataParallel, batch=1000):
        self.fns = {"test": make_eval_step(model, ds.num_classes)}
        if batch_stats:
            self.fns["test_batch_stats"] = make_eval_step(model, ds.num_classes, True)
        self.batches = [
            jax.device_put((ds.x_test[i : i + batch], ds.y_test[i : i + batch]))
            for i in range(0, len(ds.x_test), batch)
        ]
        self.n = len(ds.x_test)
        self.compiled: dict[tuple, Any] = {}

    def compile(self, state) -> None:
        """Compiles every evaluation function for every test-batch shape now,
        so that no compilation falls inside training (``state`` as later
        passed to ``__call__``)."""
        for name, fn in self.fns.items():
            for x, y in self.batches:
                key = (name, x.shape)
                if key not in self.compiled:
                    lowered = fn.lower(state.params, state.batch_stats, x, y)
                    self.compiled[key] = lowered.compile()

    def __call__(self, state) -> dict[str, float]:
        out = {}
        for name, fn in self.fns.items():
            loss = correct = jnp.zeros((), jnp.float32)
            for x, y in self.batches:
                run = self.compiled.get((name, x.shape), fn)
                bl, bc = run(state.params, state.batch_stats, x, y)
                loss, correct = loss + bl, correct + bc
            out[f"{name}_loss"] = float(loss) / self.n
            out[f"{name}_accuracy"] = float(correct) / self.n
        return out
