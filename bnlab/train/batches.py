"""The steps between two host synchronizations: each arm's batches (a pure
function of its seed and the step) and the compiled training of them, as a
``lax.scan`` of steps or a Python loop of compiled steps (chosen per backend
and model)."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from bnlab.data import pipeline
from bnlab.train.arms import arm_map
from bnlab.train.layout import ARMS
from bnlab.train.options import (
    RunLength,
)
from bnlab.train.plan import Plan
from bnlab.train.splits import length, read
from bnlab.train.step import (
    TrainState,
    make_arm_step,
)


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


def execution_plan(plan: Plan) -> dict[str, Any]:
    """How the steps between two evaluation or checkpoint points run: a
    ``lax.scan`` of up to ``steps_per_call`` steps per compiled call (few
    host round trips: fastest for MLPs everywhere), or one compiled call per
    step from a Python loop (XLA:CPU runs convolutions inside loops several
    times slower than outside them, jax-ml/jax#12868: ``python -m
    benchmarks.scan_steps`` ran ResNet steps 12.9x slower in a rolled scan)."""
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


class Batches:
    """Each arm's batches (a pure function of its seed and the step) and
    the compiled training of the steps between two boundaries."""

    def __init__(self, plan: Plan, execution: dict[str, Any]):
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
        shardings are known here (one process, ``jit`` style)."""
        layout = self.layout
        if self.scan or not self.plan.on_device or layout.style != "jit":
            return
        if jax.process_count() > 1:
            return

        def sds(tree, spec):
            sharding = layout.sharding(spec)
            return jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding),
                tree,
            )

        args = (
            sds(state, P(ARMS)),
            sds(self.hp, P(ARMS)),
            *sds(self.data, P()),
            sds(
                jax.ShapeDtypeStruct((1, len(self.plan.arms), self.batch), np.int32),
                P(None, ARMS, layout.data_axes),
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


def boundaries(start: int, run_length: RunLength, steps_per_call: int) -> Iterator[int]:
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
