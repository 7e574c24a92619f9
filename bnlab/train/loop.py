"""``fit``: data -> step -> metrics/checkpoints, resumable bit-exactly."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnlab import data as bn_data
from bnlab.parallel import DataParallel
from bnlab.train.checkpoint import Checkpointer, NonFiniteError
from bnlab.train.config import RUN_LENGTH_FIELDS, Config, ConfigError
from bnlab.train.state import TrainState, build_model, build_optimizer, init_state
from bnlab.train.step import make_eval_step, make_train_step

__all__ = ["fit"]

METRICS_FILE = "metrics.jsonl"


def _same_run(saved: dict[str, Any], config: Config) -> list[str]:
    now = config.to_dict()
    return sorted(
        k for k in now if k not in RUN_LENGTH_FIELDS and saved.get(k) != now[k]
    )


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops records written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= last_step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def evaluate(eval_step, params, batch_stats, x, y, batch: int = 1000) -> dict:
    total_loss = total_correct = 0.0
    for i in range(0, len(x), batch):
        loss, correct = eval_step(
            params, batch_stats, x[i : i + batch], y[i : i + batch]
        )
        total_loss += float(loss)
        total_correct += float(correct)
    return {"loss": total_loss / len(x), "accuracy": total_correct / len(x)}


def fit(
    config: Config,
    workdir: str | Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainState:
    """Trains (or resumes) the run in ``workdir``; returns the final host state.

    Writes ``config.json``, ``metrics.jsonl`` (one JSON record per evaluation)
    and orbax checkpoints under ``checkpoints/``. If ``workdir`` holds
    checkpoints of the same run, training resumes from the newest readable
    one and ends with bit-identical results to an uninterrupted run.

    Args:
      config: the run.
      workdir: output directory (created).
      on_progress: called with a dict after every step (for progress bars).

    Returns:
      The final :class:`TrainState` as host arrays.

    Raises:
      ConfigError: before any work, if the config cannot run here.
      NonFiniteError: the loss became NaN/Inf (names the step); no checkpoint
        with non-finite values is written.
    """
    if config.parallel == "pmap" and jax.process_count() > 1:
        raise ConfigError(
            "parallel='pmap' checkpoints process-local copies; for several "
            "processes use parallel='shard_map' or 'jit'."
        )
    config.check_devices(jax.device_count(), jax.process_count())
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    ds = bn_data.load(config.dataset, config.data_dir, seed=config.seed)
    stream = bn_data.BatchStream(ds.x_train, ds.y_train, config.batch_size, config.seed)
    dp = DataParallel(config.parallel)
    num_outputs = ds.num_classes or 1
    model = build_model(config, num_outputs, dp.axis_name)
    tx = build_optimizer(config)
    state = init_state(config, model, tx, ds.x_train)

    ckpt = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    metrics_path = workdir / METRICS_FILE

    def check_meta(meta: dict[str, Any]) -> None:
        diff = _same_run(meta["config"], config)
        if diff:
            raise ConfigError(
                f"{workdir} holds checkpoints of a different run (differs in "
                f"{diff}); use a new --workdir or the same config."
            )
        if meta["config"]["steps"] != config.steps and config.schedule != "constant":
            warnings.warn(
                f"resuming a {meta['config']['steps']}-step run with steps="
                f"{config.steps}: the {config.schedule} learning-rate schedule now "
                "follows the new total, so the run differs from either length "
                "trained from scratch.",
                UserWarning,
                stacklevel=3,
            )

    try:
        restored = ckpt.restore_latest(state, check_meta)
    except ConfigError:
        ckpt.close()
        raise
    if restored is not None:
        state, meta = restored
        if int(meta["data_position"]) != int(state.step):
            raise RuntimeError(
                f"checkpoint meta says data position {meta['data_position']} but "
                f"step {int(state.step)}: the checkpoint is inconsistent."
            )
        if jax.process_index() == 0:
            _truncate_metrics(metrics_path, int(state.step))
    elif jax.process_index() == 0:
        metrics_path.unlink(missing_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    start = int(state.step)
    train_step = dp.compile(
        make_train_step(model, tx, ds.num_classes, config.parallel, dp.axis_name)
    )
    eval_fns = {"test": make_eval_step(model, ds.num_classes)}
    if config.eval_batch_stats:
        eval_fns["test_batch_stats"] = make_eval_step(model, ds.num_classes, True)
    state = dp.put_state(state)

    def scalar(a) -> float:
        a = np.asarray(a if dp.style != "pmap" else a[0])
        return float(a)

    def check_finite(step: int, metrics) -> float:
        loss = scalar(metrics["loss"])
        if not np.isfinite(loss):
            raise NonFiniteError(
                f"loss is {loss} at step {step}; training stopped. No checkpoint "
                "after that step was written. Lower lr or check the data."
            )
        return loss

    t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start
    pending = None  # (step, metrics) checked one step later: keeps the device busy
    try:
        for step in range(start + 1, config.steps + 1):
            x, y = stream.batch(step - 1)
            state, metrics = train_step(state, *dp.put_batch((x, y)))
            if pending is not None:
                check_finite(*pending)
            pending = (step, metrics)
            is_last = step == config.steps
            do_eval = step % config.eval_every == 0 or is_last
            do_ckpt = step % config.checkpoint_every == 0 or is_last
            if on_progress is not None or do_eval or do_ckpt:
                loss = check_finite(*pending)
                pending = None
            if on_progress is not None:
                on_progress(
                    {
                        "step": step,
                        "total": config.steps,
                        "loss": loss,
                        "accuracy": scalar(metrics["accuracy"]),
                        "elapsed": time.perf_counter() - t0,
                    }
                )
            # one host copy per step, shared by evaluation and (pmap) saving
            host = (
                dp.local_copy(state)
                if do_eval or (do_ckpt and dp.style == "pmap")
                else None
            )
            if do_eval:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "train_loss": loss,
                    "train_accuracy": scalar(metrics["accuracy"]),
                    "steps_per_sec": (step - last_step) / max(now - last_t, 1e-9),
                }
                for name, fn in eval_fns.items():
                    r = evaluate(
                        fn, host.params, host.batch_stats, ds.x_test, ds.y_test
                    )
                    record[f"{name}_loss"] = r["loss"]
                    record[f"{name}_accuracy"] = r["accuracy"]
                if not ds.num_classes:  # regression: losses are MSE, no accuracy
                    record = {k: v for k, v in record.items() if "accuracy" not in k}
                last_t, last_step = time.perf_counter(), step
                if jax.process_index() == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if do_ckpt:
                ckpt.save(
                    step,
                    host if dp.style == "pmap" else state,
                    {"config": config.to_dict(), "step": step, "data_position": step},
                )
        if pending is not None:
            check_finite(*pending)
    finally:
        ckpt.close()
    return dp.local_copy(state)
