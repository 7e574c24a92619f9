"""Collectives per BN layer and time per BN layer on several devices.

Counts cross-device collectives in the jaxpr of one train-mode BN forward and
of its gradient w.r.t. x (``benchmarks.jaxpr_tools.count_collectives``:
"always" vs "conditional", i.e. inside a ``cond`` branch; bnlab has none), and times one BN
layer forward and forward+backward under shard_map over all devices, for
bnlab vs Flax fast vs Flax two-pass. Run with simulated devices on CPU:

    python -m benchmarks.collectives            # sets 8 CPU devices itself
    python -m benchmarks.collectives --smoke
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "--no-simulate" not in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnlab
from benchmarks import common
from benchmarks.jaxpr_tools import count_collectives


def bn_fns(c: int):
    stats = bnlab.init_batch_stats(c)
    g, b = jnp.ones(c), jnp.zeros(c)

    def ours(x):
        return bnlab.batch_norm(x, stats, g, b, train=True, axis_name="batch")[0]

    def flax(fast):
        mod = nn.BatchNorm(
            use_running_average=False, axis_name="batch", use_fast_variance=fast
        )
        v = {"params": {"scale": g, "bias": b}, "batch_stats": stats._asdict()}
        return lambda x: mod.apply(v, x, mutable=["batch_stats"])[0]

    return {"bnlab": ours, "flax_fast": flax(True), "flax_two_pass": flax(False)}


def run(shape: tuple[int, ...], reps: int) -> list[dict]:
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    x = jax.device_put(
        jax.random.normal(jax.random.key(0), shape), NamedSharding(mesh, P("batch"))
    )
    rows, fns = [], {}
    for name, f in bn_fns(shape[-1]).items():

        def fwd_bwd(x, f=f):
            return jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)

        for mode, g in (("fwd", f), ("fwd_bwd", fwd_bwd)):
            sm = jax.shard_map(g, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
            counts = count_collectives(jax.make_jaxpr(sm)(x))
            compiled, compile_s = common.compile_fn(sm, x)
            fns[(name, mode)] = (compiled, (x,))
            rows.append(
                {
                    "impl": name,
                    "mode": mode,
                    "always": counts["always"],
                    "conditional": counts["conditional"],
                    "compile_s": compile_s,
                    "shape": list(shape),
                    "devices": jax.device_count(),
                }
            )
    med = common.time_interleaved(fns, reps)
    for r in rows:
        r["median_ms"] = med[(r["impl"], r["mode"])] * 1e3
        r["ratio_to_bnlab"] = med[(r["impl"], r["mode"])] / med[("bnlab", r["mode"])]
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| impl | mode | collectives (always + conditional) | median ms | vs bnlab |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['impl']} | {r['mode']} | {r['always']} + {r['conditional']} | "
            f"{r['median_ms']:.2f} | {r['ratio_to_bnlab']:.2f}x |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("--no-simulate", action="store_true", help="use the real devices")
    args = p.parse_args(argv)
    shape = (64, 8, 8, 16) if args.smoke else (256, 28, 28, 64)
    rows = run(shape, 2 if args.smoke else args.reps)
    md = table(rows)
    print(md)
    name = (
        "collectives_smoke"
        if args.smoke
        else f"collectives_{jax.devices()[0].platform}"
    )
    common.write(
        name,
        common.metadata("collectives", shape=shape, smoke=args.smoke),
        rows,
        md,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
