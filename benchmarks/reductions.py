"""Why bnlab's train forward is slower than Flax's fast path on XLA:CPU.

Times the statistics reductions alone, per call (best of 3 rounds' medians,
interleaved), on one array: Flax's raw moments ``sum(x), sum(x*x)`` against
the shifted sums ``sum(x - s), sum((x - s)**2)`` that exactness needs (fused
by XLA as written, and as bnlab computes them), the elementwise ``x - s``
alone, bnlab's whole :func:`bnlab.batch_moments`, and other ways to write
the shifted sums (one variadic reduce, a transposed layout, an einsum, a
matmul with ones).

    python -m benchmarks.reductions            # (4096, 1024) float32
    python -m benchmarks.reductions --smoke
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import bnlab
from benchmarks import common


def candidates() -> dict:
    """name -> function of ``x`` (features last, reduced over axis 0)."""

    def shifted(x):
        d = x - x[0]
        return jnp.sum(d, 0), jnp.sum(d * d, 0)

    def variadic(x):  # both sums in one reduce op
        d = x - x[0]
        zero = jnp.zeros((), x.dtype)
        return jax.lax.reduce(
            (d, d * d), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,)
        )

    def transposed(x):  # features first: reduce the minor axis
        d = (x - x[0]).T
        return jnp.sum(d, 1), jnp.sum(d * d, 1)

    def einsum(x):
        d = x - x[0]
        return jnp.sum(d, 0), jnp.einsum("nc,nc->c", d, d)

    def ones_matmul(x):
        d = x - x[0]
        ones = jnp.ones((x.shape[0],), x.dtype)
        return ones @ d, ones @ (d * d)

    return {
        "sum(x)": lambda x: jnp.sum(x, 0),
        "sum(x), sum(x*x) (Flax fast)": lambda x: (jnp.sum(x, 0), jnp.sum(x * x, 0)),
        "sum(x - s)": lambda x: jnp.sum(x - x[0], 0),
        "sum(x - s), sum((x - s)^2) (one fusion)": shifted,
        "x - s (elementwise only)": lambda x: x - x[0],
        "bnlab.batch_moments": lambda x: bnlab.batch_moments(x),
        "shifted: one variadic reduce": variadic,
        "shifted: transposed layout": transposed,
        "shifted: einsum for the squares": einsum,
        "shifted: ones @ d": ones_matmul,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows, feats, reps = (
        (64, 8, 2) if args.smoke else (args.rows, args.features, args.reps)
    )
    x = jax.random.normal(jax.random.key(0), (rows, feats)) + 3.0
    fns = {}
    for name, f in candidates().items():
        compiled, _ = common.compile_fn(f, x)
        fns[name] = (compiled, (x,))
    med = common.time_interleaved(fns, reps)
    base = med["sum(x), sum(x*x) (Flax fast)"]
    dev = jax.devices()[0]
    out_rows = [
        {
            "device": f"{dev.platform}: {dev.device_kind}",
            "op": n,
            "ms": t * 1e3,
            "vs_raw_moments": t / base,
            "shape": [rows, feats],
        }
        for n, t in med.items()
    ]
    table = "\n".join(
        [
            f"Statistics reductions over axis 0 of a ({rows}, {feats}) float32 array, per call:",
            "",
            "| op | ms | vs raw moments |",
            "|---|---|---|",
            *(
                f"| {r['op']} | {r['ms']:.3f} | {r['vs_raw_moments']:.2f}x |"
                for r in out_rows
            ),
        ]
    )
    print(table)
    name = f"reductions_{dev.platform}" + ("_smoke" if args.smoke else "")
    common.write(
        name, common.metadata("reductions", smoke=args.smoke), out_rows, table, args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
