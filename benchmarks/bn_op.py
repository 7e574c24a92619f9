"""Op benchmark: train-mode BN forward and forward+backward under jit.

bnlab.batch_norm vs flax.linen.BatchNorm (fast variance and two-pass), same
inputs, same run, runs interleaved; compile time reported apart from the
steady-state median. Writes JSON to benchmarks/results/ and prints a Markdown
table. On a GPU it also reports achieved bandwidth: minimum bytes moved
(forward 3N reads+writes, fwd+bwd 8N: see benchmarks/README.md) / time.

    python -m benchmarks.bn_op                 # CPU, default shapes
    python -m benchmarks.bn_op --smoke         # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

import bnlab

SHAPES = {"nhwc": (128, 56, 56, 64), "dense": (4096, 1024)}
SMOKE_SHAPES = {"nhwc": (8, 8, 8, 16), "dense": (64, 32)}


def _impls(c: int):
    def bnlab_fn(x, g, b):
        return bnlab.batch_norm(x, bnlab.init_batch_stats(c), g, b, train=True)[0]

    def flax_fn(fast):
        mod = nn.BatchNorm(use_running_average=False, use_fast_variance=fast)
        stats = {"mean": jnp.zeros(c), "var": jnp.ones(c)}

        def f(x, g, b):
            v = {"params": {"scale": g, "bias": b}, "batch_stats": stats}
            return mod.apply(v, x, mutable=["batch_stats"])[0]

        return f

    return {
        "bnlab": bnlab_fn,
        "flax_fast": flax_fn(True),
        "flax_two_pass": flax_fn(False),
    }


def _modes(fn):
    fwd = jax.jit(fn)

    def loss(x, g, b, dy):
        return jnp.vdot(fn(x, g, b), dy)

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return {"fwd": (fwd, False), "fwd_bwd": (fwd_bwd, True)}


def bench(shapes: dict, reps: int, dtype=jnp.float32) -> list[dict]:
    rows = []
    for shape_name, shape in shapes.items():
        c = shape[-1]
        kx, kd = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, shape, dtype)
        dy = jax.random.normal(kd, shape, dtype)
        g, b = jnp.ones(c), jnp.zeros(c)
        impls = _impls(c)
        for mode in ("fwd", "fwd_bwd"):
            fns, compile_s, times = {}, {}, {}
            for name, fn in impls.items():
                f, needs_dy = _modes(fn)[mode]
                args = (x, g, b, dy) if needs_dy else (x, g, b)
                t0 = time.perf_counter()
                compiled = f.lower(*args).compile()
                compile_s[name] = time.perf_counter() - t0
                jax.block_until_ready(compiled(*args))  # warm-up
                fns[name] = (compiled, args)
                times[name] = []
            for _ in range(reps):  # interleaved so drift hits all alike
                for name, (compiled, args) in fns.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(*args))
                    times[name].append(time.perf_counter() - t0)
            n_bytes = x.size * x.dtype.itemsize
            min_bytes = (3 if mode == "fwd" else 8) * n_bytes
            base = statistics.median(times["bnlab"])
            for name in impls:
                med = statistics.median(times[name])
                rows.append(
                    {
                        "shape": shape_name,
                        "dims": list(shape),
                        "dtype": jnp.dtype(dtype).name,
                        "mode": mode,
                        "impl": name,
                        "median_ms": med * 1e3,
                        "compile_s": compile_s[name],
                        "ratio_to_bnlab": med / base,
                        "achieved_GBps": min_bytes / med / 1e9,
                        "reps": reps,
                    }
                )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| shape | mode | impl | median ms | vs bnlab | compile s | GB/s (min bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} {tuple(r['dims'])} | {r['mode']} | {r['impl']} | "
            f"{r['median_ms']:.2f} | {r['ratio_to_bnlab']:.2f}x | "
            f"{r['compile_s']:.2f} | {r['achieved_GBps']:.1f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="BN op benchmark")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few reps")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    reps = 3 if args.smoke else args.reps
    rows = bench(shapes, reps)
    dev = jax.devices()[0]
    meta = {
        "benchmark": "bn_op",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{dev.platform}: {dev.device_kind}",
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "smoke": args.smoke,
    }
    md = table(rows)
    print(json.dumps(meta))
    print(md)
    if not args.smoke or args.out != "benchmarks/results":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "smoke" if args.smoke else dev.platform
        (out / f"bn_op_{tag}.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1)
        )
        (out / f"bn_op_{tag}.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
