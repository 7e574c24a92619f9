"""A run directory: one writer at a time, checked before any work, and a
``metrics.jsonl`` that is never lost, torn or invalid JSON.

Layout: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/`` (orbax),
``corrupt/<step>/`` (checkpoints set aside), ``.lock`` (the writer's pid).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "DiskFullError",
    "RunDirError",
    "append_record",
    "check_run_dir",
    "lock_run_dir",
    "read_records",
    "rewrite_records",
]

METRICS_FILE = "metrics.jsonl"


class RunDirError(OSError):
    """The run directory cannot be used (in use, not a directory, not
    writable); the message says which path and what to do."""


class DiskFullError(RunDirError):
    """Writing a checkpoint or record failed for lack of space (or
    permission); earlier checkpoints are kept."""


def check_run_dir(workdir: Path) -> None:
    """Creates ``workdir`` if needed; fails early if any part is unusable."""
    if workdir.exists() and not workdir.is_dir():
        raise RunDirError(f"--workdir {workdir} is a file, not a directory.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"cannot create run directory {workdir}: {e.strerror}."
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {workdir} is not writable.")
    for name, want_dir in (
        ("checkpoints", True),
        ("corrupt", True),
        (METRICS_FILE, False),
        ("config.json", False),
    ):
        p = workdir / name
        if p.exists() and p.is_dir() != want_dir:
            kind = "a directory" if want_dir else "a file"
            raise RunDirError(
                f"{p} exists but is not {kind}; move it away or use another --workdir."
            )


@contextlib.contextmanager
def lock_run_dir(workdir: Path):
    """Exclusive lock on ``workdir/.lock`` for the life of the run.

    ``flock`` locks are released by the OS when the process dies, so a
    SIGKILL never leaves a stale lock. A second run gets a
    :class:`RunDirError` naming the holder's pid.
    """
    path = workdir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunDirError(
                f"{workdir} is in use by another bnlab run (pid {holder}); wait "
                "for it to finish, stop it, or use another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _finite_json(value: Any) -> Any:
    """NaN/Inf become null, so every line is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _line(record: dict[str, Any]) -> str:
    return json.dumps(_finite_json(record), allow_nan=False) + "\n"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Appends one JSON line and flushes it to disk.

    Raises:
      DiskFullError: no space (or no permission) to write it.
    """
    try:
        with open(path, "a") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise DiskFullError(
                f"cannot write {path}: {e.strerror}; earlier records and "
                "checkpoints are kept. Free space and run the same command again "
                "to resume."
            ) from None
        raise


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``path``; an unreadable line (e.g. torn by a kill during
    a write) is dropped with a warning naming it."""
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record")
            out.append(record)
        except ValueError:
            warnings.warn(
                f"{path}: line {i} is not a valid record ({line[:60]!r}); dropping it.",
                RuntimeWarning,
                stacklevel=2,
            )
    return out


def rewrite_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Replaces ``path`` atomically (temp file, fsync, rename): a kill at any
    moment leaves either the old file or the new one, never an empty one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(_line(r) for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
