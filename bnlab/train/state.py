"""A run's state in its checkpoints: fresh from the arms' seeds, restored
from the newest verified checkpoint of the same run (with the checks that
decide "the same run"), and saved as the model's own tree by name."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnlab.train.checkpoint import Checkpointer
from bnlab.train.options import RunLength
from bnlab.train.plan import Plan
from bnlab.train.splits import length, read
from bnlab.train.step import Interval, TrainState, make_arm_init

__all__ = ["RUN_LENGTH_KEYS", "StateStore"]

# Keys of the run configuration that may change between a run and its resume.
RUN_LENGTH_KEYS = tuple(f.name for f in dataclasses.fields(RunLength))


def state_tree(state: TrainState) -> dict:
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


def from_tree(tree: dict, like: TrainState) -> TrainState:
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


class StateStore:
    """The arms' state for one run: :meth:`fresh`, :meth:`restore`,
    :meth:`save`. With early stopping, each arm's best variables (``best``)
    ride in the same checkpoints."""

    def __init__(self, plan: Plan, keep_best: bool):
        self.plan = plan
        self.n = len(plan.arms)
        self.keep_best = keep_best
        self.best: Any = None
        self.warned: set[str] = set()

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

    def fresh(self) -> TrainState:
        seeds = np.asarray([a.seed for a in self.plan.arms], np.uint32)
        # Runs once: XLA's cheapest optimization level compiles it ~3x faster
        # (random initializers are slow to optimize) and it is still exact.
        init = jax.jit(self._init_fn()).lower(seeds, self.plan.hp)
        state = init.compile(compiler_options={"xla_backend_optimization_level": 0})(
            seeds, self.plan.hp
        )
        return self.plan.layout.put_arms(jax.device_get(state))

    def abstract_state(self) -> TrainState:
        """The arms' stacked state, abstract (shapes and dtypes)."""
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((self.n, *s.shape), s.dtype),
            self.plan.arm_state,
        )

    def abstract(self) -> Any:
        """The saved tree's shapes, dtypes and shardings (restore target)."""
        shapes = self.abstract_state()
        layout = self.plan.layout
        tree = state_tree(shapes)
        if self.keep_best:
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

    def restore(self, ckpt: Checkpointer, fresh: TrainState) -> TrainState | None:
        restored = ckpt.restore_latest(self.abstract(), self._check_meta)
        if restored is None:
            return None
        tree = restored[0]
        state = from_tree(tree, fresh)
        best = tree.get("best")
        if self.plan.layout.style == "pmap":
            state = self.plan.layout.put_arms(jax.device_get(state))
            best = None if best is None else self.plan.layout.put_arms(best)
        self.best = best
        return state

    def save(self, ckpt: Checkpointer, step: int, state: TrainState) -> None:
        """Saves the state (and the best variables) as checkpoint ``step``."""
        layout = self.plan.layout
        tree = state_tree(state)
        if self.keep_best:
            tree["best"] = self.best
        if layout.style == "pmap":
            tree = layout.host(tree)
        meta = {
            "config": self.plan.config,
            "devices": layout.devices,
            "processes": jax.process_count(),
        }
        ckpt.save(step, tree, meta)
