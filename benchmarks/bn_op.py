"""Op benchmark: one BN layer, train fwd / train fwd+bwd / eval fwd, under jit.

bnlab vs Flax Linen (fast variance and two-pass), Flax NNX, Haiku and
Equinox (the last two from the ``bench`` extra; skipped if not installed), on
NHWC (N,56,56,64), (N,28,28,128), (N,7,7,512) and dense (4096,1024), f32 and
bf16. Runs are interleaved, compile time is reported apart from the steady
state median, every ratio is to bnlab in the same run. The accuracy column is
the max |y - y_float64| in train mode on x = 1e4 + N(0, 1) from fresh state.
Achieved bandwidth = minimum bytes moved / time (fwd 3N, fwd+bwd 8N, eval 2N
elements), the physical limit on a GPU.

    python -m benchmarks.bn_op                 # CPU defaults (N=32)
    python -m benchmarks.bn_op --batch 128     # the paper-scale shapes
    python -m benchmarks.bn_op --smoke         # tiny shapes, seconds
    python -m benchmarks.bn_op --device-time 20  # chained calls: device time
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bnlab
from benchmarks import common

MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
MIN_ELEMENTS_MOVED = {"train_fwd": 3, "train_fwd_bwd": 8, "eval_fwd": 2}


def shapes(batch: int, smoke: bool) -> dict[str, tuple[int, ...]]:
    if smoke:
        return {"nhwc_56x56x64": (2, 8, 8, 16), "dense": (64, 32)}
    return {
        "nhwc_56x56x64": (batch, 56, 56, 64),
        "nhwc_28x28x128": (batch, 28, 28, 128),
        "nhwc_7x7x512": (batch, 7, 7, 512),
        "dense_4096x1024": (4096, 1024),
    }


def implementations(c: int, ndim: int, only: set[str] | None = None) -> dict[str, dict]:
    """name -> {"train": f(x, g, b) -> y, "eval": f(x, g, b) -> y}; ``only``
    keeps those names (bnlab always)."""
    stats = bnlab.init_batch_stats(c)
    mean, var = stats.mean, stats.var + 0.5  # non-trivial eval statistics
    impls = {
        "bnlab": {
            "train": lambda x, g, b: bnlab.batch_norm(x, stats, g, b, train=True)[0],
            "eval": lambda x, g, b: bnlab.batch_norm(
                x, bnlab.BatchStats(mean, var), g, b, train=False
            )[0],
        }
    }

    def linen(fast):
        mod = nn.BatchNorm(use_fast_variance=fast)

        def run(x, g, b, train):
            v = {
                "params": {"scale": g, "bias": b},
                "batch_stats": {
                    "mean": mean if not train else stats.mean,
                    "var": var if not train else stats.var,
                },
            }
            return mod.apply(
                v, x, use_running_average=not train, mutable=["batch_stats"]
            )[0]

        return {
            "train": functools.partial(run, train=True),
            "eval": functools.partial(run, train=False),
        }

    impls["flax_fast"] = linen(True)
    impls["flax_two_pass"] = linen(False)

    def nnx_run(x, g, b, train):
        m = nnx.BatchNorm(c, use_running_average=not train, rngs=nnx.Rngs(0))
        m.scale[...] = g
        m.bias[...] = b
        if not train:
            m.mean[...], m.var[...] = mean, var
        return m(x)

    impls["flax_nnx"] = {
        "train": functools.partial(nnx_run, train=True),
        "eval": functools.partial(nnx_run, train=False),
    }
    try:
        import haiku as hk

        def hk_fn(x, train):
            return hk.BatchNorm(True, True, 0.99)(x, is_training=train)

        tf = hk.transform_with_state(hk_fn)
        params, hstate = tf.init(
            jax.random.key(0), jnp.ones((2,) + (1,) * (ndim - 2) + (c,)), True
        )

        def hk_run(x, g, b, train):
            p = jax.tree.map(lambda a: a, params)
            p = {
                k: {
                    "scale": g.reshape(v["scale"].shape),
                    "offset": b.reshape(v["offset"].shape),
                }
                for k, v in p.items()
            }
            return tf.apply(p, hstate, None, x, train)[0]

        impls["haiku"] = {
            "train": functools.partial(hk_run, train=True),
            "eval": functools.partial(hk_run, train=False),
        }
    except ImportError:
        pass
    try:
        import equinox as eqx

        bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            c, axis_name="batch", mode="batch"
        )

        def eqx_run(x, g, b, train):
            m = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (g, b))
            state = jax.tree.unflatten(*reversed(jax.tree.flatten(st)))  # fresh copy
            # Equinox is per-example, channel-first, vmapped over the batch.
            xc = jnp.moveaxis(x, -1, 1)
            y, _ = jax.vmap(
                lambda xi: m(xi, state, inference=not train),
                axis_name="batch",
                in_axes=0,
                out_axes=(0, None),
            )(xc)
            return jnp.moveaxis(y, 1, -1)

        impls["equinox"] = {
            "train": functools.partial(eqx_run, train=True),
            "eval": functools.partial(eqx_run, train=False),
        }
    except ImportError:
        pass
    if only is not None:
        impls = {k: v for k, v in impls.items() if k in only or k == "bnlab"}
    return impls


def accuracy_at_1e4(impls: dict) -> dict[str, float]:
    x = (1e4 + jax.random.normal(jax.random.key(7), (256, 16))).astype(jnp.float32)
    xd = np.asarray(x, np.float64)
    ref = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)
    g, b = jnp.ones(16), jnp.zeros(16)
    out = {}
    for name, fs in impls.items():
        y = jax.jit(fs["train"])(x, g, b)
        out[name] = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
    return out


def _inputs(shape: tuple[int, ...], dtype, only: set[str] | None) -> tuple:
    """``x``, the output cotangent ``dy``, scale, bias and the implementations
    for one shape and dtype (the same in both timing modes)."""
    c = shape[-1]
    kx, kd = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    dy = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
    return x, dy, jnp.ones(c), jnp.zeros(c), implementations(c, len(shape), only)


def _per_call(fs: dict, mode: str, x, g, b, dy) -> tuple:
    """The function timed for ``mode`` and its arguments, one call each."""
    if mode == "train_fwd":
        return fs["train"], (x, g, b)
    if mode == "eval_fwd":
        return fs["eval"], (x, g, b)

    def f(x, g, b, dy, fwd=fs["train"]):
        _, vjp = jax.vjp(fwd, x, g, b)
        return vjp(dy.astype(_.dtype))

    return f, (x, g, b, dy)


def _chain(f, mode: str, k: int):
    """``k`` calls of ``f`` in one jitted ``fori_loop``, each consuming the
    previous call's whole output (train/eval forward: ``y`` is the next input;
    forward+backward: the gradient w.r.t. ``x`` is), so nothing is dead code
    and Python dispatch is paid once."""

    def run(x, g, b, dy):
        def body(_, x):
            if mode == "train_fwd_bwd":
                y, vjp = jax.vjp(f, x, g, b)
                return vjp(dy.astype(y.dtype))[0].astype(x.dtype)
            return f(x, g, b).astype(x.dtype)

        return jax.lax.fori_loop(0, k, body, x)

    return run


def bench(
    shape_map: dict, dtypes, reps: int, k: int = 0, only: set[str] | None = None
) -> list[dict]:
    """Time per call; with ``k``, device time: ``k`` chained calls per
    measurement (:func:`_chain`), divided by ``k``."""
    calls = max(k, 1)
    rows = []
    for dtype in dtypes:
        for shape_name, shape in shape_map.items():
            x, dy, g, b, impls = _inputs(shape, dtype, only)

            def copy_fn(x):  # x + 1: the bandwidth reference, timed the same way
                def add(_, x):
                    return x + jnp.ones((), x.dtype)

                return jax.lax.fori_loop(0, k, add, x) if k else add(0, x)

            copy, _ = common.compile_fn(copy_fn, x)
            copy_s = common.time_interleaved({"copy": (copy, (x,))}, reps)["copy"]
            copy_gbps = 2 * x.size * x.dtype.itemsize / (copy_s / calls) / 1e9
            for mode in MODES:
                fns, compile_s = {}, {}
                for name, fs in impls.items():
                    if k:
                        f = fs["eval"] if mode == "eval_fwd" else fs["train"]
                        fn, args = _chain(f, mode, k), (x, g, b, dy)
                    else:
                        fn, args = _per_call(fs, mode, x, g, b, dy)
                    compiled, compile_s[name] = common.compile_fn(fn, *args)
                    fns[name] = (compiled, args)
                med = common.time_interleaved(fns, reps)
                n_bytes = x.size * x.dtype.itemsize * MIN_ELEMENTS_MOVED[mode]
                for name in impls:
                    t = med[name] / calls
                    rows.append(
                        {
                            "shape": shape_name,
                            "dims": list(shape),
                            "dtype": jnp.dtype(dtype).name,
                            "mode": mode,
                            "impl": name,
                            "median_ms": t * 1e3,
                            "compile_s": compile_s[name],
                            "ratio_to_bnlab": med[name] / med["bnlab"],
                            "achieved_GBps": n_bytes / t / 1e9,
                            "reps": reps,
                            **({"chained_calls": k} if k else {}),
                            "copy_GBps": copy_gbps,
                        }
                    )
    return rows


def table(rows: list[dict], acc: dict[str, float]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    out = [
        "| shape | dtype | mode | " + " | ".join(impls) + " |",
        "|---|---|---|" + "---|" * len(impls),
    ]
    keys = list(dict.fromkeys((r["shape"], r["dtype"], r["mode"]) for r in rows))
    for key in keys:
        cells = {
            r["impl"]: r for r in rows if (r["shape"], r["dtype"], r["mode"]) == key
        }
        out.append(
            f"| {key[0]} | {key[1]} | {key[2]} | "
            + " | ".join(
                f"{cells[i]['median_ms']:.2f} ms ({cells[i]['ratio_to_bnlab']:.2f}x)"
                for i in impls
            )
            + " |"
        )
    out.append(
        "| max abs error at mean 1e4 (f32, train) | | | "
        + " | ".join(f"{acc.get(i, float('nan')):.2g}" for i in impls)
        + " |"
    )
    out += [
        "",
        "Achieved bandwidth of bnlab (minimum bytes / time) vs `x + 1` (2N bytes):",
        "",
        "| shape | dtype | mode | bnlab GB/s | copy GB/s | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["impl"] == "bnlab":
            out.append(
                f"| {r['shape']} | {r['dtype']} | {r['mode']} | "
                f"{r['achieved_GBps']:.1f} | {r['copy_GBps']:.1f} | "
                f"{r['achieved_GBps'] / r['copy_GBps']:.2f} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="BN op benchmark")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 reps")
    p.add_argument("--batch", type=int, default=32, help="N of the NHWC shapes")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--name", default=None, help="result file stem")
    p.add_argument(
        "--device-time",
        type=int,
        default=0,
        metavar="K",
        help="time K chained calls inside one jitted fori_loop (device time "
        "per call, dispatch amortised); 0: time calls one by one",
    )
    p.add_argument(
        "--impls", default=None, help="comma-separated subset (default: all found)"
    )
    p.add_argument(
        "--shapes", default=None, help="comma-separated subset of the shape names"
    )
    args = p.parse_args(argv)
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    reps = 2 if args.smoke else args.reps
    shape_map = shapes(args.batch, args.smoke)
    if args.shapes:
        shape_map = {k: v for k, v in shape_map.items() if k in args.shapes.split(",")}
    only = set(args.impls.split(",")) if args.impls else None
    rows = bench(shape_map, dtypes, reps, args.device_time, only)
    acc = accuracy_at_1e4(implementations(16, 2, only))
    md = table(rows, acc)
    meta = common.metadata(
        "bn_op",
        batch=args.batch,
        smoke=args.smoke,
        accuracy_at_1e4=acc,
        timing="device time: chained calls in a fori_loop"
        if args.device_time
        else "per call",
        chained_calls=args.device_time or None,
    )
    print(md)
    suffix = "_device" if args.device_time else ""
    name = args.name or (
        "bn_op_smoke" if args.smoke else f"bn_op_{jax.devices()[0].platform}{suffix}"
    )
    common.write(name, meta, rows, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
