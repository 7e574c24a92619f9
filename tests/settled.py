"""Checks that a block of code leaves nothing running behind it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def no_stray_reads() -> Iterator[None]:
    """Fails unless every asyncio task started in the block is done when it
    ends, and no exception is reported as unraisable (garbage collected).

    orbax reads a checkpoint as asyncio tasks; a read left pending on a
    closed event loop reports "Event loop is closed" whenever its
    TensorStore future completes, far from the failure. Checking the tasks
    when the block ends finds such a read at once, without waiting for it.
    """
    tasks: list[asyncio.Task] = []
    stray: list = []
    create_task = asyncio.BaseEventLoop.create_task

    def recording(self, *args, **kwargs):
        task = create_task(self, *args, **kwargs)
        tasks.append(task)
        return task

    hook = sys.unraisablehook
    asyncio.BaseEventLoop.create_task = recording
    sys.unraisablehook = stray.append
    try:
        yield
        pending = [t for t in tasks if not t.done()]
        assert tasks, "no asyncio task was started: this check checks nothing"
        assert not pending, f"{len(pending)} of {len(tasks)} reads left pending"
        gc.collect()
        assert not stray, [f"{u.exc_type.__name__}: {u.exc_value}" for u in stray]
    finally:
        asyncio.BaseEventLoop.create_task = create_task
        sys.unraisablehook = hook
