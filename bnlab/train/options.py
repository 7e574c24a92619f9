"""The options of :func:`bnlab.train.fit`, validated once into frozen, typed
objects before any work: how long to train (:class:`RunLength`), how one step
trains (:class:`Training`), how to evaluate (:class:`Evaluation`) and where
to run (:class:`Placement`). Each error names the argument of ``fit`` to
fix."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from bnlab.parallel import canonical_style

__all__ = [
    "MAX_STEPS",
    "Evaluation",
    "Placement",
    "RunLength",
    "Training",
    "check_workdir",
    "optimizer_fn",
]

# TrainState.step is int32.
MAX_STEPS = 2**31 - 1
# Characters orbax cannot have in a checkpoint path: it finds a save's files
# with glob(), which reads them as a pattern (the checkpoint then cannot be
# read back).
_GLOB_CHARACTERS = "[]*?\\"


def positive(name: str, value: Any, *, default: int | None = None) -> int:
    """``value`` as a positive int (``default`` when None)."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)


def check_workdir(workdir: Any) -> Path:
    """The run directory as an absolute path, or one error naming the
    problem (before anything is created)."""
    if not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(
            f"workdir must be a path (str or pathlib.Path), got "
            f"{type(workdir).__name__}."
        )
    text = os.fspath(workdir)
    if isinstance(text, bytes) or not text.strip():
        raise ValueError(
            f"workdir={workdir!r} names no directory; give the run's own directory, "
            "e.g. 'runs/my-run'."
        )
    path = Path(text).absolute()
    bad = sorted({c for c in str(path) if c in _GLOB_CHARACTERS})
    if bad:
        raise ValueError(
            f"workdir={str(path)!r} contains {' '.join(bad)}: orbax (the checkpoint "
            "library) reads these as glob patterns and could not read the "
            "checkpoints back; use a directory name without them."
        )
    limit = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    name_limit = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    # room for checkpoints/<step>.orbax-checkpoint-tmp/state/ocdbt.process_0/...
    if len(os.fsencode(path)) > limit - 200:
        raise ValueError(
            f"workdir is {len(os.fsencode(path))} bytes long; the checkpoints' "
            f"paths inside it would pass the system's limit of {limit}. Use a "
            "shorter path."
        )
    long = [p for p in path.parts if len(os.fsencode(p)) > name_limit]
    if long:
        raise ValueError(
            f"workdir has a name of {len(os.fsencode(long[0]))} bytes "
            f"({long[0][:40]}...); the file system allows {name_limit}."
        )
    return path


@dataclasses.dataclass(frozen=True)
class RunLength:
    """How long to train and when to evaluate and checkpoint.

    Attributes:
      steps: total steps per arm.
      eval_every: steps between evaluations (and at the end).
      checkpoint_every: steps between checkpoints (and at the end).
      keep_checkpoints: checkpoints kept.
    """

    steps: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int

    @classmethod
    def make(
        cls,
        steps: Any,
        eval_every: Any,
        checkpoint_every: Any,
        keep_checkpoints: Any,
    ) -> RunLength:
        steps = positive("steps", steps)
        if steps > MAX_STEPS:
            raise ValueError(
                f"steps={steps} is more than a run can count (the step is int32, "
                f"at most {MAX_STEPS})."
            )
        eval_every = positive("eval_every", eval_every, default=max(steps // 10, 1))
        return cls(
            steps,
            eval_every,
            positive("checkpoint_every", checkpoint_every, default=eval_every),
            positive("keep_checkpoints", keep_checkpoints),
        )

    def is_eval(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.steps

    def is_checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps


def optimizer_fn(optimizer: Any) -> Callable[[dict], optax.GradientTransformation]:
    """``hparams -> transformation`` whose result is checked."""
    if isinstance(optimizer, optax.GradientTransformation):
        return lambda hp: optimizer
    if not callable(optimizer):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation or a function of the "
            "arm's hyper-parameters returning one, e.g. lambda hp: optax.sgd(hp['lr'])."
        )

    def make(hp: dict) -> optax.GradientTransformation:
        tx = optimizer(hp)
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"optimizer(hparams) returned {type(tx).__name__}; it must return an "
                "optax transformation, e.g. lambda hp: optax.sgd(hp['lr'])."
            )
        return tx

    return make


def _hook(name: str, value: Any) -> Callable | None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function or None, got {type(value)}.")
    return value


@dataclasses.dataclass(frozen=True)
class Training:
    """How one arm's step trains.

    Attributes:
      optimizer: ``hparams -> optax transformation`` (checked).
      loss: ``(outputs, targets) -> loss`` or ``(loss, metrics)``; None for
        the default of the data (cross-entropy or squared error).
      batch_size: examples per step and arm.
      rng_streams: Linen RNG streams drawn in training.
      train_kwargs: ``(step, hparams) -> dict`` of model keyword arguments.
      post_init: ``(variables, hparams) -> variables``.
      batch_order: ``(seed, step) -> indices``, or None for shuffled epochs.
    """

    optimizer: Callable[[dict], optax.GradientTransformation]
    loss: Callable | None
    batch_size: int
    rng_streams: tuple[str, ...]
    train_kwargs: Callable | None
    post_init: Callable | None
    batch_order: Callable | None

    @classmethod
    def make(
        cls,
        *,
        optimizer: Any,
        loss: Any,
        batch_size: Any,
        rng_streams: Any,
        train_kwargs: Any,
        post_init: Any,
        batch_order: Any,
    ) -> Training:
        if isinstance(rng_streams, (str, bytes)) or not isinstance(
            rng_streams, Sequence
        ):
            raise TypeError(
                f"rng_streams={rng_streams!r} must be a sequence of stream names, "
                "e.g. ('dropout',)."
            )
        if not all(isinstance(s, str) and s for s in rng_streams):
            raise TypeError(f"rng_streams={rng_streams!r} must hold names (str).")
        return cls(
            optimizer_fn(optimizer),
            _hook("loss", loss),
            positive("batch_size", batch_size),
            tuple(rng_streams),
            _hook("train_kwargs", train_kwargs),
            _hook("post_init", post_init),
            _hook("batch_order", batch_order),
        )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What each evaluation computes.

    Attributes:
      batch_size: examples per evaluation batch.
      train_examples: training examples also evaluated (``trainset_*``).
      batch_stats: also evaluate the test set with batch statistics.
      at_start: also evaluate before the first step.
      probe: ``(variables, hparams) -> pytree`` per arm, or None.
    """

    batch_size: int
    train_examples: int
    batch_stats: bool
    at_start: bool
    probe: Callable | None

    @classmethod
    def make(
        cls,
        *,
        batch_size: Any,
        train_examples: Any,
        batch_stats: Any,
        at_start: Any,
        probe: Any,
    ) -> Evaluation:
        if (
            isinstance(train_examples, bool)
            or not isinstance(train_examples, (int, np.integer))
            or train_examples < 0
        ):
            raise ValueError(f"eval_train={train_examples!r} must be an integer >= 0.")
        return cls(
            positive("eval_batch_size", batch_size),
            int(train_examples),
            bool(batch_stats),
            bool(at_start),
            _hook("probe", probe),
        )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and how the arms run.

    Attributes:
      parallel: ``"jit"``, ``"shard_map"`` or ``"pmap"``.
      mesh: an explicit ``("arms", "data")`` mesh, or None.
      devices: the devices to use, or None for all.
      bn_group_size: devices per BN statistics group (0: all).
      steps_per_call: steps per compiled call, or None to choose.
      unroll: ``lax.scan``'s unroll.
    """

    parallel: str
    mesh: jax.sharding.Mesh | None
    devices: tuple | None
    bn_group_size: int
    steps_per_call: int | None
    unroll: int | bool

    @classmethod
    def make(
        cls,
        *,
        parallel: Any,
        mesh: Any,
        devices: Any,
        bn_group_size: Any,
        steps_per_call: Any,
        unroll: Any,
    ) -> Placement:
        if devices is not None:
            devices = tuple(devices)
            if not devices:
                raise ValueError(
                    "devices=[] gives no device; pass None for all devices or e.g. "
                    "jax.devices()[:1]."
                )
        if steps_per_call is not None:
            steps_per_call = positive("steps_per_call", steps_per_call)
        if not isinstance(unroll, (bool, int, np.integer)) or (
            not isinstance(unroll, bool) and unroll < 1
        ):
            raise ValueError(f"unroll={unroll!r} must be True, False or an int >= 1.")
        return cls(
            canonical_style(parallel),
            mesh,
            devices,
            bn_group_size,
            steps_per_call,
            unroll,
        )
