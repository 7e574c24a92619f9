"""Many small BN layers: 50 x (Dense 256 -> BN -> ReLU), batch 64, one SGD
step. Per-layer overheads (a conditional, an extra kernel, a host round
trip) add up here, while the op table's large layers hide them.

bnlab vs Flax Linen (fast variance, and two-pass) in the same run. Two
timings: per step (each jitted step timed from the host) and device time
(K steps chained in one jitted fori_loop, each consuming the previous step's
parameters and statistics).

    python -m benchmarks.deep_small              # CPU defaults
    python -m benchmarks.deep_small --device-time 50
    python -m benchmarks.deep_small --smoke
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnlab.linen
from benchmarks import common


class Deep(nn.Module):
    norm: object
    layers: int = 50
    width: int = 256

    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(self.layers):
            x = nn.Dense(self.width, use_bias=False)(x)
            x = nn.relu(self.norm(use_running_average=not train)(x))
        return nn.Dense(10)(x)


NORMS = {
    "bnlab": functools.partial(bnlab.linen.BatchNorm),
    "flax_fast": functools.partial(nn.BatchNorm, use_fast_variance=True),
    "flax_two_pass": functools.partial(nn.BatchNorm, use_fast_variance=False),
}


def make(norm, layers, width, batch, k):
    model = Deep(norm=norm, layers=layers, width=width)
    x = jax.random.normal(jax.random.key(0), (batch, width))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    v = model.init(jax.random.key(2), x)

    def step(v):
        def loss(p):
            out, upd = model.apply({**v, "params": p}, x, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(out)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1)), upd

        (_, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        params = jax.tree.map(lambda a, b: a - 0.01 * b, v["params"], g)
        return {"params": params, **upd}

    if k:
        return (lambda v: jax.lax.fori_loop(0, k, lambda _, v: step(v), v)), v
    return step, v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=50)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device-time", type=int, default=0, metavar="K")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    layers, reps = (3, 2) if args.smoke else (args.layers, args.reps)
    k = args.device_time
    fns = {}
    for name, norm in NORMS.items():
        f, v = make(norm, layers, args.width, args.batch, k)
        compiled, _ = common.compile_fn(f, v)
        fns[name] = (compiled, (v,))
    med = common.time_interleaved(fns, reps)
    per = {n: t / max(k, 1) for n, t in med.items()}
    dev = jax.devices()[0]
    rows = [
        {
            "device": f"{dev.platform}: {dev.device_kind}",
            "impl": n,
            "ms_per_step": t * 1e3,
            "ratio_to_flax_fast": t / per["flax_fast"],
            "timing": f"device time ({k} chained steps)" if k else "per step",
            "layers": layers,
            "batch": args.batch,
        }
        for n, t in per.items()
    ]
    table = "\n".join(
        [
            f"{layers} x (Dense {args.width} -> BN -> ReLU), batch {args.batch}, one SGD "
            f"step, {'device time' if k else 'per step'}:",
            "",
            "| impl | ms / step | vs Flax fast |",
            "|---|---|---|",
            *(
                f"| {r['impl']} | {r['ms_per_step']:.3f} | {r['ratio_to_flax_fast']:.3f}x |"
                for r in rows
            ),
        ]
    )
    print(table)
    name = f"deep_small_{dev.platform}{'_device' if k else ''}" + (
        "_smoke" if args.smoke else ""
    )
    common.write(
        name,
        common.metadata("deep_small", chained_steps=k or None),
        rows,
        table,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
