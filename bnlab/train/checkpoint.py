"""Orbax checkpoints in orbax's standard layout, verified by SHA-256.

Layout of ``<workdir>/checkpoints/<step>/``:

- ``state/``: one ``StandardSave`` item, the training state as the model's
  own tree, every leaf with a leading axis of arms: ``params``,
  ``batch_stats`` (and any other model collection), ``opt_state``, ``step``,
  ``rng``, ``stopped_at``, ``interval``. Plain orbax restores it by name
  from an absolute path (orbax refuses relative ones):
  ``StandardCheckpointer().restore(Path("run/checkpoints/100/state").absolute())``.
- ``meta/``: a ``JsonSave`` item: the run's configuration and arms, the tree
  layout, and a SHA-256 of every leaf of every arm (and of the metadata).

orbax does not check array contents (a flipped byte in a saved array can
restore silently), so every restore checks the digests and finiteness
before the state is used. Sharded arrays are written by orbax from their
shards, without gathering to one host; each process hashes the arm rows it
holds and the digests are gathered (a few bytes per arm). Saves are
asynchronous: training continues while orbax writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bnlab.train.rundir import (
    DiskFullError,
    RunDirError,
    WritePermissionError,
    os_error_kind,
)

__all__ = [
    "FORMAT",
    "CheckpointMismatchError",
    "Checkpointer",
    "NonFiniteError",
    "finalized_steps",
    "leaf_path",
    "tree_signature",
]

# meta keys written by every save; a checkpoint whose meta lacks one is unusable
REQUIRED_META = ("config", "step", "tree", "digests", "format")
FORMAT = 3


class NonFiniteError(FloatingPointError):
    """Training produced NaN/Inf in every arm; the message names the step."""


class CheckpointMismatchError(ValueError):
    """The checkpoints belong to another model or configuration; nothing is
    moved or deleted."""


# ------------------------------------------------------------------ trees


def leaf_path(path: tuple) -> str:
    """``"params/Dense_0/kernel"``: a pytree path as plain names, the same
    for a NamedTuple field, a dict key or a list index (so a tree restored
    by plain orbax, where NamedTuples become dicts, has the same paths)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [
        (leaf_path(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def tree_signature(tree: Any) -> list[list[Any]]:
    """``[[path, shape, dtype], ...]`` of a pytree (arrays or abstract)."""
    return [
        [path, list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
        for path, leaf in _leaves(tree)
    ]


def _row_digest(row: np.ndarray) -> str:
    row = np.ascontiguousarray(row)
    h = hashlib.sha256(f"{row.dtype.str}{row.shape}".encode())
    h.update(row.view(np.uint8).reshape(-1) if row.size else b"")
    return h.hexdigest()


def _arm_blocks(leaf: Any, n_arms: int) -> Iterable[tuple[int, np.ndarray]]:
    """``(first arm, rows)`` blocks of ``leaf`` held by this process, each
    row once (only the first replica of a shard)."""
    if isinstance(leaf, jax.Array):
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:
                start = (shard.index[0].start or 0) if shard.index else 0
                yield start, np.asarray(shard.data)
        return
    yield 0, np.asarray(leaf)[:n_arms]


def _digests(tree: Any, n_arms: int) -> tuple[dict[str, list[str]], list[bool]]:
    """SHA-256 of every arm row of every leaf, and per arm whether all its
    floating values are finite; gathered over processes."""
    leaves = _leaves(tree)
    raw = np.zeros((len(leaves), n_arms, 32), np.uint8)
    have = np.zeros((len(leaves), n_arms), bool)
    finite = np.ones(n_arms, bool)
    for j, (_, leaf) in enumerate(leaves):
        for start, block in _arm_blocks(leaf, n_arms):
            if np.issubdtype(block.dtype, np.inexact):
                rows = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                finite[start : start + len(block)] &= rows
            for i, row in enumerate(block):
                raw[j, start + i] = np.frombuffer(
                    bytes.fromhex(_row_digest(row)), np.uint8
                )
                have[j, start + i] = True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        all_raw, all_have, all_finite = (
            np.asarray(a)
            for a in multihost_utils.process_allgather((raw, have, finite))
        )
        pick = np.argmax(all_have, axis=0)  # a process that holds each row
        raw = np.take_along_axis(all_raw, pick[None, :, :, None], 0)[0]
        have = all_have.any(0)
        finite = all_finite.all(0)
    if not have.all():
        raise RuntimeError("internal: some arm rows of the state were not hashed")
    digests = {
        path: [raw[j, a].tobytes().hex() for a in range(n_arms)]
        for j, (path, _) in enumerate(leaves)
    }
    return digests, finite.tolist()


def _host_view(leaf: Any) -> Any:
    """A numpy view of a one-device array (no copy on CPU), which keeps its
    buffer alive when the training step donates the array; a host copy of a
    sharded one."""
    if isinstance(leaf, jax.Array):
        return np.asarray(leaf)
    return leaf


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def finalized_steps(directory: Path) -> list[int]:
    """Steps with a finished checkpoint in ``directory`` (orbax's temporary
    directories of a save that was interrupted are not checkpoints)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    try:
        return sorted(ocp.path.step.checkpoint_steps(directory))
    except OSError as e:
        if os_error_kind(e) != "permission":
            raise
        raise RunDirError(
            f"cannot read {directory}: permission denied. Fix its permissions "
            f"(e.g. chmod -R u+rwX {directory}) and run again; nothing was moved."
        ) from None


# -------------------------------------------------------------- errors


def _unreadable(path: Path) -> Path | None:
    """The first file or directory under ``path`` this process cannot read."""
    if not os.access(path, os.R_OK | os.X_OK):
        return path
    for root, dirs, files in os.walk(path, onerror=lambda e: None):
        for d in dirs:
            if not os.access(Path(root) / d, os.R_OK | os.X_OK):
                return Path(root) / d
        for f in files:
            if not os.access(Path(root) / f, os.R_OK):
                return Path(root) / f
    return None


def _permission_error(directory: Path, step: int) -> RunDirError:
    path = _unreadable(directory / str(step)) or directory / str(step)
    return RunDirError(
        f"cannot read checkpoint {step}: permission denied on {path}. Fix the "
        f"permissions (e.g. chmod -R u+rwX {directory}) and run again; "
        "nothing was moved."
    )


class _SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first cancels the tasks still
    pending on it and lets them finish (what ``asyncio.run`` does), and
    drops callbacks that arrive after it closed (a TensorStore read that
    completes after its task was cancelled) instead of raising."""

    def close(self) -> None:
        pending = [t for t in asyncio.all_tasks(self) if not t.done()]
        if pending and not self.is_running() and not self.is_closed():
            for task in pending:
                task.cancel()
            self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()

    def call_soon(self, callback, *args, context=None):
        if self.is_closed():
            return None
        return super().call_soon(callback, *args, context=context)

    def call_soon_threadsafe(self, callback, *args, context=None):
        if self.is_closed():
            return None
        return super().call_soon_threadsafe(callback, *args, context=context)


_READING = threading.Lock()  # one policy swap at a time


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _SettlingLoop()


def _read(restore: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``(restore(), None)``, or ``(None, error)`` when orbax cannot read.

    orbax runs a restore's reads as asyncio tasks on a fresh event loop that
    it closes without cancelling them. When one read fails (a damaged file),
    the others stay pending on TensorStore futures, and when those complete
    (in TensorStore's threads, at any later time) they report "Event loop
    is closed" as unraisable exceptions far from the failure (in pytest, a
    later test fails). So while reading, new event loops are
    :class:`_SettlingLoop` s: they cancel and settle their pending tasks
    before they close, and drop callbacks that arrive after.
    """
    with _READING:
        previous = _swap_policy(_SettlingPolicy())
        try:
            return restore(), None
        except Exception as e:
            return None, e
        finally:
            _swap_policy(previous)


def _swap_policy(policy: Any) -> Any:
    """Installs ``policy``; returns the one it replaces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # policies, in 3.14
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(policy)
    return previous


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block are delivered when it
    ends (main thread only; elsewhere a no-op, signals go to the main thread).

    orbax's save starts background threads that wait on each other; an
    exception raised by a signal handler in the middle (``KeyboardInterrupt``,
    the CLI's SIGTERM) leaves some waiting for a signal that never comes, and
    the process then hangs at exit instead of stopping.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: set outside Python, cannot be restored
            previous[sig] = handler
            signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


@contextlib.contextmanager
def io_errors(what: str, directory: Path):
    """Maps a full disk / no permission while writing to a
    :class:`bnlab.train.WriteError` (exit 6): one line, earlier checkpoints
    are kept; a directory gone to :class:`RunDirError`."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:
        kind = os_error_kind(e)
        if kind == "disk_full":
            raise DiskFullError(
                f"disk full while {what} in {directory}; earlier checkpoints are "
                "kept. Free space and run the same command again to resume."
            ) from None
        if kind == "permission":
            raise WritePermissionError(
                f"permission denied while {what} in {directory}; earlier "
                "checkpoints are kept. Fix the permissions and run again to resume."
            ) from None
        if kind == "missing":
            raise RunDirError(
                f"{directory} disappeared while {what} (deleted or moved while this "
                "run was using it); stopping so that nothing is written elsewhere."
            ) from None
        raise


def _release_waiting_orbax_threads() -> int:
    """After a failed save: wakes orbax's threads that wait for a signal of
    the failed save (cancelled first, so they end without writing).

    orbax 0.12 runs a save's steps in threads that wait for the previous
    step's signal; when a step fails (e.g. its temporary directory cannot be
    created) the later ones wait for their timeout (10 minutes), and the
    interpreter waits for them at exit. This uses orbax's private
    ``_SignalingThread``; where orbax has none, nothing is done."""
    try:
        from orbax.checkpoint._src.futures import future as orbax_future
    except ImportError:  # pragma: no cover - another orbax layout
        return 0
    thread_type = getattr(orbax_future, "_SignalingThread", None)
    if thread_type is None:  # pragma: no cover
        return 0
    released = 0
    for thread in threading.enumerate():
        if isinstance(thread, thread_type) and thread.is_alive():
            thread.cancel()
            with contextlib.suppress(Exception):
                orbax_future.set_signals(
                    thread._receive_signals, operation_id=thread._operation_id
                )
                released += 1
    return released


# ---------------------------------------------------------- checkpointer


class Checkpointer:
    """Verified, asynchronous orbax checkpoints of an arm-stacked state.

    Args:
      directory: where step directories go (``<workdir>/checkpoints``).
      keep: how many checkpoints to keep.
      n_arms: the leading (arms) size of every leaf.
      async_save: write in the background (orbax's async checkpointing).
    """

    def __init__(self, directory: str | Path, keep: int, n_arms: int, async_save=True):
        self.directory = Path(directory).absolute()
        self.n_arms = n_arms
        self._saver = concurrent.futures.ThreadPoolExecutor(1, "bnlab-checkpoint")
        self._pending: concurrent.futures.Future | None = None
        finalized_steps(self.directory)  # readable, or RunDirError now
        with io_errors("opening the checkpoint directory", self.directory):
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=True,
                    enable_async_checkpointing=async_save,
                ),
                item_names=("state", "meta"),
            )

    # ---------------------------------------------------------------- save

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> None:
        """Saves ``tree`` (arm-stacked leaves) at ``step`` with digests.

        In one process the training thread only takes host views of the
        arrays (no copy on CPU; the copy orbax makes anyway on an
        accelerator): the digests and orbax's save run in a background
        thread, and an error of that save is raised by the next
        :meth:`save`, :meth:`wait` or :meth:`close`. Several processes
        hash their rows and gather the digests here, in step.

        Raises:
          NonFiniteError: an arm's state holds NaN/Inf (nothing is written).
          WriteError: the disk is full or not writable (earlier checkpoints
            are kept).
        """
        self._join()
        if jax.process_count() > 1:
            self._write(step, tree, meta, _digests(tree, self.n_arms))
            return
        host = jax.tree.map(_host_view, tree)  # the views keep the buffers alive
        self._pending = self._saver.submit(self._write_in_background, step, host, meta)

    def _write_in_background(self, step: int, host: Any, meta: dict) -> None:
        try:
            self._write(step, host, meta, _digests(host, self.n_arms))
            with io_errors(f"writing checkpoint {step}", self.directory):
                self._manager.wait_until_finished()
        except BaseException:
            _release_waiting_orbax_threads()
            raise

    def _write(self, step: int, tree: Any, meta: dict, hashed: tuple) -> None:
        digests, finite = hashed
        if not all(finite):
            bad = [i for i, ok in enumerate(finite) if not ok]
            raise NonFiniteError(
                f"state after step {step} holds NaN/Inf in arm(s) {bad}; not "
                "checkpointed."
            )
        meta = {
            **meta,
            "step": step,
            "format": FORMAT,
            "tree": tree_signature(tree),
            "digests": digests,
        }
        meta["meta_digest"] = _meta_digest(meta)
        with (
            io_errors(f"writing checkpoint {step}", self.directory),
            _signals_deferred(),
        ):
            self._probe_writable(step)
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
                ),
            )
        if not saved:
            raise RuntimeError(
                f"checkpoint for step {step} was not written (it exists already in "
                f"{self.directory})."
            )

    def _probe_writable(self, step: int) -> None:
        """Creates and removes a directory where orbax will create the
        step's: orbax's save, when it cannot create its temporary directory,
        leaves threads waiting for a signal that never comes, and the process
        then never exits (orbax 0.12). A failure here is the same error,
        raised before orbax starts."""
        if jax.process_index() != 0:
            return
        probe = self.directory / f".bnlab-probe-{step}-{os.getpid()}"
        os.mkdir(probe)
        os.rmdir(probe)

    def _join(self) -> None:
        """Waits for the background save; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # ------------------------------------------------------------- restore

    def steps(self) -> list[int]:
        """Finished checkpoints, oldest first."""
        return finalized_steps(self.directory)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata of ``step`` (checked: required keys, digest).

        Raises:
          ValueError: unreadable, or not consistent (a corrupt checkpoint).
          RunDirError: permission denied.
        """
        return read_meta(self.directory, step)

    def restore_latest(
        self,
        target: Any,
        check_meta: Callable[[dict[str, Any]], bool] | None = None,
    ) -> tuple[Any, dict[str, Any]] | None:
        """Newest verified checkpoint as ``(state, meta)``, or None.

        ``target`` is the state's abstract tree (``jax.ShapeDtypeStruct`` s
        with shardings): arrays come back placed like it. ``check_meta``
        sees each candidate's metadata first and returns False for a
        checkpoint of another configuration (set aside when an older one
        matches; when none matches, :class:`CheckpointMismatchError` and
        nothing moves). A checkpoint whose arrays do not match ``target``
        raises :class:`CheckpointMismatchError` (nothing moved). One that
        cannot be read, has inconsistent metadata, or whose arrays fail their
        digest or hold NaN/Inf is moved to ``<directory>/../corrupt/`` (never
        over an earlier copy) with a warning, and the previous one is tried.
        Unreadable for lack of permission: :class:`RunDirError`, nothing moved.
        """
        signature = tree_signature(target)
        metas = self._candidates(check_meta, signature)
        for step, meta in metas.items():
            if isinstance(meta, str):
                self._set_aside(step, meta)
                continue
            if meta["tree"] != signature:
                raise CheckpointMismatchError(_mismatch_message(step, meta, signature))
            state, problem = self._read_verified(step, meta, target)
            if problem:
                self._set_aside(step, problem)
                continue
            return state, meta
        return None

    def _candidates(self, check_meta, signature) -> dict[int, dict | str]:
        """Newest first: each checkpoint's metadata, or why it is unusable
        (unreadable, or of another configuration while an older one is of
        this one). Raises when every readable one is of another run."""
        metas: dict[int, dict | str] = {}
        for step in sorted(self.steps(), reverse=True):
            try:
                metas[step] = self.read_meta(step)
            except ValueError as e:
                metas[step] = str(e)
        readable = [s for s, m in metas.items() if isinstance(m, dict)]
        foreign = [s for s in readable if check_meta and not check_meta(metas[s])]
        if foreign and len(foreign) == len(readable):
            newest = metas[foreign[0]]
            if newest["tree"] != signature:  # the most specific account
                raise CheckpointMismatchError(
                    _mismatch_message(foreign[0], newest, signature)
                )
            raise CheckpointMismatchError(
                f"{self.directory} holds checkpoints {foreign} of another run "
                "configuration (a different model, data, arms or hyper-parameters); "
                "use a new --workdir, or the configuration that wrote them. Nothing "
                "was moved."
            )
        for s in foreign:
            metas[s] = (
                "it was written by another run configuration, and older checkpoints "
                "match this one"
            )
        return metas

    def _read_verified(self, step: int, meta: dict, target: Any) -> tuple[Any, str]:
        """``(state, "")``, or ``(None, why it cannot be used)``."""
        problem = _layout_problem(self.directory / str(step) / "state", meta)
        if problem:
            return None, problem
        state, error = _read(
            lambda: self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        )
        if error is not None:
            if os_error_kind(error) == "permission":
                raise _permission_error(self.directory, step) from None
            return None, f"{type(error).__name__}: {str(error)[:200]}"
        return state, _verify(state, meta, self.n_arms) or ""

    def _set_aside(self, step: int, why: str) -> None:
        """Moves checkpoint ``step`` to ``corrupt/<step>[.<n>]`` (a new name,
        never over an earlier copy), or fails with nothing moved."""
        src = self.directory / str(step)
        corrupt = self.directory.parent / "corrupt"
        aside = corrupt / str(step)
        n = 0
        while aside.exists():
            n += 1
            aside = corrupt / f"{step}.{n}"
        older = [s for s in self.steps() if s < step]
        then = (
            f"falling back to checkpoint {max(older)}"
            if older
            else "no older checkpoint is left: training starts from step 0"
        )
        if jax.process_index() == 0:
            try:
                corrupt.mkdir(exist_ok=True)
                os.rename(src, aside)
            except OSError as e:
                raise RunDirError(
                    f"checkpoint {step} in {self.directory} cannot be restored "
                    f"({why}), and it cannot be moved aside to {aside} "
                    f"({e.strerror}); nothing was moved. Fix the permissions of "
                    f"{self.directory.parent} and run again."
                ) from None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"bnlab set aside {step}")
        warnings.warn(
            f"checkpoint {step} in {self.directory} cannot be restored ({why}); "
            f"moved it to {aside}; {then}.",
            RuntimeWarning,
            stacklevel=3,
        )
        self._manager.reload()

    # ------------------------------------------------------------- finish

    def wait(self) -> None:
        """Waits until every save is on disk (raises a save's error)."""
        self._join()
        with io_errors("finishing a checkpoint", self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight, then closes (errors mapped like
        :meth:`save`'s)."""
        try:
            self.wait()
        finally:
            self._saver.shutdown(wait=True)
            with io_errors("closing the checkpoints", self.directory):
                self._manager.close()


def _verify(state: Any, meta: dict[str, Any], n_arms: int) -> str | None:
    digests, finite = _digests(state, n_arms)
    saved = meta["digests"]
    if set(digests) != set(saved):
        missing = sorted(set(saved) - set(digests))
        extra = sorted(set(digests) - set(saved))
        return (
            f"its arrays are not the ones saved (missing {missing[:5]}, unknown "
            f"{extra[:5]})"
        )
    bad = sorted(p for p, d in digests.items() if saved.get(p) != d)
    if bad:
        return (
            f"array(s) {bad[:5]} do not match the SHA-256 recorded when the "
            "checkpoint was saved (bytes changed on disk)"
        )
    if not all(finite):
        return "it holds NaN/Inf"
    return None


def _meta_problem(meta: Any, step: int) -> str | None:
    if not isinstance(meta, dict):
        return "its metadata is not a JSON object"
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        return f"its metadata lacks {missing}"
    if meta.get("meta_digest") != _meta_digest(meta):
        return "its metadata does not match the SHA-256 recorded at save time"
    if meta["format"] != FORMAT:
        return f"its metadata says format {meta['format']!r}, not {FORMAT}"
    if not isinstance(meta["config"], dict) or not isinstance(meta["tree"], list):
        return "its metadata 'config' / 'tree' have the wrong type"
    if meta["step"] != step:
        return f"its metadata says step {meta['step']}, but it is stored as step {step}"
    return None


def _mismatch_message(step: int, meta: dict[str, Any], signature: list) -> str:
    saved = {p: (tuple(s), d) for p, s, d in meta["tree"]}
    now = {p: (tuple(s), d) for p, s, d in signature}
    diffs = [f"{p}: missing from the model" for p in sorted(set(saved) - set(now))]
    diffs += [f"{p}: not in the checkpoint" for p in sorted(set(now) - set(saved))]
    diffs += [
        f"{p}: checkpoint {saved[p][1]}{saved[p][0]} vs model {now[p][1]}{now[p][0]}"
        for p in sorted(set(saved) & set(now))
        if saved[p] != now[p]
    ]
    shown = "; ".join(diffs[:6]) + (
        f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else ""
    )
    return (
        f"checkpoint {step} was saved from a different model ({shown}). Nothing was "
        "moved: restore it with the code that wrote it, or use a new --workdir."
    )


# ---------------------------------------------------------------- load


def _restore_on_one_device(path: Path) -> Any:
    """The state item at ``path`` on one local device, whatever the layout
    it was saved from."""
    layout = ocp.StandardCheckpointHandler().metadata(path)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
        getattr(layout, "tree", layout),
    )
    return ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        path, ocp.args.StandardRestore(target)
    )


def read_meta(directory: Path, step: int) -> dict[str, Any]:
    """The checked metadata of checkpoint ``step`` in ``directory``: the one
    reader of ``meta/`` for resume and :func:`bnlab.train.load`.

    Raises:
      RunDirError: a file or directory of the checkpoint cannot be read for
        lack of permission (nothing is moved).
      ValueError: unreadable otherwise, or inconsistent (damaged).
    """
    path = Path(directory) / str(step)
    if _unreadable(path) is not None:
        raise _permission_error(Path(directory), step)
    meta, error = _read(
        lambda: ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path / "meta")
    )
    if error is not None:
        if os_error_kind(error) == "permission":
            raise _permission_error(Path(directory), step) from None
        raise ValueError(
            f"its metadata cannot be read ({type(error).__name__}: {str(error)[:200]})"
        )
    problem = _meta_problem(meta, step)
    if problem:
        raise ValueError(problem)
    return meta


def _layout_problem(path: Path, meta: dict[str, Any]) -> str | None:
    """What orbax's own record of the state item (``_METADATA``,
    ``_sharding``) gets wrong against the saved tree, or None: a file that
    plain orbax needs is damaged, or an array is missing from it."""
    layout, error = _read(lambda: ocp.StandardCheckpointHandler().metadata(path))
    if error is not None:
        return (
            "its files are damaged or incomplete (orbax cannot read its layout: "
            f"{type(error).__name__}: {str(error)[:200]})"
        )
    tree = getattr(layout, "tree", layout)
    saved = {p: tuple(shape) for p, shape, _ in meta["tree"]}
    found = {p: tuple(m.shape) for p, m in _leaves(tree)}
    if found != saved:
        missing = sorted(set(saved) - set(found))
        other = sorted(p for p in set(saved) & set(found) if saved[p] != found[p])
        return (
            "its files are damaged or incomplete (orbax's record of its arrays "
            f"does not match the saved tree: missing {missing[:5]}, other shapes "
            f"{other[:5]}, unknown {sorted(set(found) - set(saved))[:5]})"
        )
    return None


def read_state(
    directory: Path, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A verified checkpoint as host (numpy) arrays, without the model:
    ``(tree, meta)`` of ``step`` (default: the newest finished one).

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: it fails its digests, its files cannot be read (damaged),
        or its metadata is inconsistent.
      RunDirError: its files cannot be read for lack of permission.
    """
    directory = Path(directory).absolute()
    steps = finalized_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"{directory} has no checkpoint {step}; it has steps {steps}."
        )
    path = directory / str(step)
    try:
        meta = read_meta(directory, step)
    except ValueError as e:
        raise ValueError(f"checkpoint {step} in {directory}: {e}.") from None
    problem = _layout_problem(path / "state", meta)
    if problem:
        raise ValueError(
            f"checkpoint {step} in {directory} cannot be read: {problem}. Load "
            f"another step (it has {steps}) or restore the directory from a copy."
        )
    tree, error = _read(lambda: _restore_on_one_device(path / "state"))
    if error is not None:
        if os_error_kind(error) == "permission":
            raise _permission_error(directory, step)
        raise ValueError(
            f"checkpoint {step} in {directory} cannot be read: its files are "
            f"damaged or incomplete ({type(error).__name__}: {str(error)[:200]}). "
            f"Load another step (it has {steps}) or restore the directory from a "
            "copy."
        )
    tree = jax.tree.map(np.asarray, tree)
    n_arms = len(meta["config"].get("arms", [None]))
    problem = _verify(tree, meta, n_arms)
    if problem:
        raise ValueError(f"checkpoint {step} in {directory}: {problem}.")
    return tree, meta
