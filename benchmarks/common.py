"""Shared benchmark plumbing: interleaved timing, metadata, result files."""

from __future__ import annotations

import datetime
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def compile_fn(fn: Callable, *args) -> tuple[Callable, float]:
    """AOT-compiles ``jax.jit(fn)`` for ``args``; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_interleaved(
    fns: dict[str, tuple[Callable, tuple]], reps: int, rounds: int = 3, warmup: int = 2
) -> dict[str, float]:
    """Seconds per call: the best of ``rounds`` medians of ``reps`` calls.

    Calls are interleaved in a shuffled order so drift and position effects
    hit all functions alike; taking the best
    round's median discards rounds disturbed by other load on the machine.
    """
    for f, args in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f(*args))
    best = {k: float("inf") for k in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            shuffle(order)  # no function always runs first (or after another)
            for name in order:
                f, args = fns[name]
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[name].append(time.perf_counter() - t0)
        for k, v in times.items():
            best[k] = min(best[k], statistics.median(v))
    return best


def metadata(name: str, **extra: Any) -> dict[str, Any]:
    dev = jax.devices()[0]
    import flax

    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{dev.platform}: {dev.device_kind}",
        "device_count": jax.device_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        **extra,
    }


def write(
    name: str, meta: dict, rows: list[dict], table: str, out: str | Path | None
) -> None:
    """JSON + Markdown under ``out`` (default benchmarks/results)."""
    out = RESULTS if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1)
    )
    header = f"<!-- {json.dumps(meta)} -->\n"
    (out / f"{name}.md").write_text(header + table + "\n")
