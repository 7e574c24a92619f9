"""Orbax checkpoints: save every N steps, keep K, fall back past corrupt ones.

Never pickle: arrays go through orbax's standard (tensorstore) format and the
metadata (config, step, data position) through JSON.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """Training produced NaN/Inf; the message names the step."""


def _all_finite(tree: Any) -> bool:
    for leaf in jax.tree.leaves(tree):
        arr = leaf
        if hasattr(arr, "addressable_data") and not getattr(
            arr, "is_fully_addressable", True
        ):
            arr = arr.addressable_data(0)
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return False
    return True


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with safe resume.

    Args:
      directory: where step directories go.
      keep: how many checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves asynchronously; refuses (NonFiniteError) non-finite state."""
        if not _all_finite(state):
            raise NonFiniteError(
                f"state after step {step} holds NaN/Inf; not checkpointed. Lower the "
                "learning rate or check the data."
            )
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        if not saved:
            raise RuntimeError(
                f"checkpoint for step {step} was not written (it exists already in "
                f"{self.directory})."
            )

    def restore_latest(
        self, target: Any, check_meta: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[Any, dict[str, Any]] | None:
        """Newest readable checkpoint as ``(state, meta)``, or None.

        ``check_meta`` sees each candidate's metadata first; what it raises
        (e.g. a config mismatch) propagates untouched. A checkpoint that then
        fails to restore (corrupt or partly written) is moved aside to
        ``<directory>/../corrupt/<step>`` with a warning and the previous one
        is tried: nothing is deleted, and that step can be saved again later.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                ).meta
                meta = dict(meta)
            except Exception as e:  # orbax raises many types for corrupt files
                self._set_aside(step, e)
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
                )
                return restored.state, meta
            except Exception as e:
                self._set_aside(step, e)
        return None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_raw(self, step: int) -> Any:
        """The saved arrays of ``step`` as plain nested dicts (for inspection)."""
        return self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        ).state

    def _set_aside(self, step: int, error: Exception) -> None:
        aside = self.directory.parent / "corrupt" / str(step)
        warnings.warn(
            f"checkpoint step {step} in {self.directory} cannot be restored "
            f"({type(error).__name__}: {str(error)[:200]}); moved it to {aside} and "
            "falling back to the previous checkpoint.",
            RuntimeWarning,
            stacklevel=3,
        )
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                shutil.rmtree(aside)
            shutil.move(str(self.directory / str(step)), str(aside))
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
