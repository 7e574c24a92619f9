"""A run directory: one writer at a time, checked before any work, and a
``metrics.jsonl`` that is never lost, torn or invalid JSON.

Layout: ``config.json``, ``metrics.jsonl``, ``checkpoints/<step>/`` (orbax),
``corrupt/<step>[.<n>]/`` (checkpoints set aside), ``metrics.jsonl.bad``
(lines that could not be read, kept), ``.lock`` (the writer's pid; the lock
itself is held on the directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "METRICS_FILE",
    "DiskFullError",
    "RunDirError",
    "RunLock",
    "WriteError",
    "WritePermissionError",
    "append_record",
    "check_run_dir",
    "jsonable",
    "lock_run_dir",
    "os_error_kind",
    "read_records",
    "rewrite_records",
    "write_json",
]

METRICS_FILE = "metrics.jsonl"


class RunDirError(OSError):
    """The run directory cannot be used (in use, not a directory, not
    readable or writable, replaced while running); the message says which
    path and what to do."""


class WriteError(RunDirError):
    """Writing a checkpoint or record failed (exit 6 in the CLI); earlier
    checkpoints and records are kept, and the same command resumes once the
    cause is fixed."""


class DiskFullError(WriteError):
    """No space left (or over quota) while writing a checkpoint or record."""


class WritePermissionError(WriteError, PermissionError):
    """No permission to write a checkpoint or record (or a read-only file
    system)."""


def os_error_kind(e: BaseException | None) -> str | None:
    """What an error from the OS, orbax or TensorStore (or anything in its
    chain of causes) means for a run: ``"disk_full"``, ``"permission"``,
    ``"missing"`` (a file or directory is gone), ``"link"`` (a symbolic link
    where a file was expected), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        text = str(e)
        if code in (errno.ENOSPC, errno.EDQUOT) or (
            "No space left" in text or "RESOURCE_EXHAUSTED" in text
        ):
            return "disk_full"
        if (
            isinstance(e, PermissionError)
            or code in (errno.EACCES, errno.EPERM, errno.EROFS)
            or "Permission denied" in text
            or "PERMISSION_DENIED" in text
        ):
            return "permission"
        if code == errno.ELOOP:
            return "link"
        if (
            isinstance(e, FileNotFoundError)
            or code == errno.ENOENT
            # TensorStore's ENOENT: a write under a directory that is gone
            or ("NOT_FOUND" in text and "Error writing" in text)
            # orbax finalizing a save whose temporary directory is gone
            or text.startswith("Checkpoint directory does not exist:")
        ):
            return "missing"
        e = e.__cause__ or e.__context__
    return None


def check_run_dir(workdir: Path) -> None:
    """Creates ``workdir`` if needed; fails early if any part is unusable."""
    try:
        _check_run_dir(workdir)
    except PermissionError as e:
        raise RunDirError(
            f"cannot use run directory {workdir}: permission denied on "
            f"{e.filename or workdir}."
        ) from None


def _check_run_dir(workdir: Path) -> None:
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
        if p.is_symlink():
            raise RunDirError(
                f"{p} is a symbolic link; bnlab does not write through links. Move "
                "it away or use another --workdir."
            )
        if p.exists() and p.is_dir() != want_dir:
            kind = "a directory" if want_dir else "a file"
            raise RunDirError(
                f"{p} exists but is not {kind}; move it away or use another --workdir."
            )


class RunLock:
    """Exclusive lock of a run directory for the life of a run.

    The ``flock`` is held on the directory itself, which cannot be unlinked
    from under the holder (deleting ``.lock`` changes nothing), and is
    released by the OS when the process dies, so a SIGKILL never leaves a
    stale lock. A second run is refused with the holder's pid. A run whose
    directory is deleted or replaced while it runs (``rm -rf`` and a new run
    in the same place) is stopped by :meth:`check` before its next write, so
    two runs never write into one directory.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        self._inode = os.fstat(self._fd).st_ino
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirError(
                f"{workdir} is in use by another bnlab run (pid {self._holder()}); "
                "wait for it to finish, stop it, or use another --workdir."
            ) from None
        try:
            self._write_pid()
        except BaseException:
            self.release()
            raise

    def _holder(self) -> str:
        try:
            fd = os.open(self.workdir / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return "?"
        try:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)

    def _write_pid(self) -> None:
        path = self.workdir / ".lock"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunDirError(
                    f"{path} is a symbolic link; bnlab refuses to write through it. "
                    "Remove it and run again."
                ) from None
            if e.errno == errno.EISDIR:
                raise RunDirError(
                    f"{path} is a directory; remove it (bnlab keeps its lock file "
                    "there) and run again."
                ) from None
            raise RunDirError(f"cannot write {path}: {e.strerror}.") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunDirError(f"{path} is not a regular file; remove it.")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        finally:
            os.close(fd)

    def check(self) -> None:
        """Raises :class:`RunDirError` if the directory was deleted or
        replaced since the lock was taken."""
        try:
            now = os.stat(self.workdir).st_ino
        except FileNotFoundError:
            now = None
        if now != self._inode:
            raise RunDirError(
                f"{self.workdir} was deleted or replaced while this run was using "
                "it; stopping so that two runs never write into one directory. "
                "Its last checkpoint and records are gone with it."
            )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


@contextlib.contextmanager
def lock_run_dir(workdir: Path):
    """:class:`RunLock` of ``workdir`` as a context manager."""
    lock = RunLock(workdir)
    try:
        yield lock
    finally:
        lock.release()


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON data, the same on every run: mappings become dicts
    with string keys, lists and tuples lists, sets sorted lists, numpy and
    JAX arrays nested lists, numpy scalars Python numbers, NaN and Inf
    ``None`` (valid JSON, as in ``metrics.jsonl``), anything else its
    ``repr``.

    Example:
      >>> import numpy as np
      >>> from bnlab.train.rundir import jsonable
      >>> jsonable({"lr": np.float32(0.5), 1: (np.arange(2), float("nan"), {3})})
      {'lr': 0.5, '1': [[0, 1], None, [3]]}
    """
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):  # in an order that does not vary by run
        return sorted((jsonable(v) for v in x), key=json.dumps)
    if isinstance(x, np.ndarray) or _is_jax_array(x):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return repr(x)


def _is_jax_array(x: Any) -> bool:
    jax = sys.modules.get("jax")  # without jax imported, x is no jax.Array
    return jax is not None and isinstance(x, jax.Array)


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


def _write_error(path: Path, e: OSError) -> RunDirError | None:
    kind = os_error_kind(e)
    if kind == "disk_full":
        return DiskFullError(
            f"disk full while writing {path}; earlier records and checkpoints "
            "are kept. Free space and run the same command again to resume."
        )
    if kind == "missing":
        return RunDirError(
            f"cannot write {path}: its directory is gone (deleted or moved while "
            "this run was using it); stopping so that nothing is written elsewhere."
        )
    if kind == "permission":
        return WritePermissionError(
            f"cannot write {path}: {e.strerror or 'permission denied'}; earlier "
            "records and checkpoints are kept. Fix the permissions and run the "
            "same command again."
        )
    if kind == "link":
        return RunDirError(
            f"{path} is a symbolic link; bnlab does not write through links. "
            "Move it away and run again."
        )
    return None


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Appends one JSON line and flushes it to disk (never through a
    symbolic link).

    Raises:
      WriteError: no space or no permission to write it.
      RunDirError: ``path`` is a symbolic link, or its directory is gone.
    """
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666
        )
        with os.fdopen(fd, "a") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        mapped = _write_error(path, e)
        if mapped is not None:
            raise mapped from None
        raise


def _valid(record: Any) -> bool:
    step = record.get("step") if isinstance(record, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and step >= 0


def read_records(path: Path, keep_bad: bool = True) -> list[dict[str, Any]]:
    """The valid records of ``path`` (JSON objects with an integer ``step``).

    Lines that are not (torn by a kill during a write, edited, junk) are
    dropped with ONE warning, and with ``keep_bad`` appended to
    ``<path>.bad`` first, so nothing is lost.
    """
    if not path.exists():
        return []
    out, bad = [], []
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _valid(record):
                out.append(record)
            else:
                bad.append((i, line if line.endswith("\n") else line + "\n"))
    if bad:
        where = ""
        if keep_bad:
            backup = path.with_name(path.name + ".bad")
            try:
                with open(backup, "a") as f:
                    f.writelines(line for _, line in bad)
                where = f"; they are kept in {backup}"
            except OSError as e:
                where = f" (and could not be copied to {backup}: {e.strerror})"
        first = bad[0][1].strip()[:60]
        warnings.warn(
            f"{path}: {len(bad)} line(s) are not valid metrics records (first: line "
            f"{bad[0][0]}, {first!r}); they are left out{where}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def rewrite_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Replaces ``path`` atomically (temp file, fsync, rename): a kill at any
    moment leaves either the old file or the new one, never an empty one.
    The file keeps its permissions.

    Raises:
      WriteError: no space or no permission to write it.
    """
    _atomic_write(path, "".join(_line(r) for r in records))


def write_json(path: Path, value: Any) -> None:
    """``path`` holds ``value`` as JSON, replaced atomically.

    Raises:
      WriteError: no space or no permission to write it.
    """
    _atomic_write(path, json.dumps(value, indent=1) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        mapped = _write_error(path, e)
        if mapped is not None:
            raise mapped from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
