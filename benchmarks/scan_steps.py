"""Why conv nets train with a few unrolled steps per call on CPU: XLA:CPU
and ``lax.scan``.

One SGD step of ResNet-20 (bnlab BN, batch 32 of 28x28x1) timed three ways
in the same run: a jitted step called from Python ``K`` times, ``K`` steps
inside one jitted ``lax.scan`` (what ``bnlab.train.fit`` does between
evaluations), and the same scan unrolled (``fit(..., steps_per_call=K,
unroll=True)``).
Seconds per step, best of 3 rounds' medians.

    python -m benchmarks.scan_steps            # K = 5
    python -m benchmarks.scan_steps --smoke
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import bnlab.linen
from benchmarks import common
from bnlab.models import ResNet20


def make(blocks: int, batch: int, size: int, k: int):
    """(python_loop, scanned, unrolled, state): each runs ``k`` SGD steps on
    one batch."""
    model = ResNet20(norm=bnlab.linen.BatchNorm, blocks_per_stage=blocks)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 1))
    y = jnp.arange(batch) % 10
    variables = model.init(jax.random.key(1), x, train=False)
    tx = optax.sgd(0.05, momentum=0.9)
    state = (variables, tx.init(variables["params"]))

    def step(state, _=None):
        variables, opt = state

        def loss(params):
            logits, upd = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, y
            ).mean(), upd

        (_, upd), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        updates, opt = tx.update(g, opt, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return ({**variables, **upd, "params": params}, opt), None

    one = jax.jit(lambda s: step(s)[0])

    def python_loop(state):
        for _ in range(k):
            state = one(state)
        return state

    scanned = jax.jit(lambda s: jax.lax.scan(step, s, length=k)[0])
    unrolled = jax.jit(lambda s: jax.lax.scan(step, s, length=k, unroll=True)[0])
    jax.block_until_ready(python_loop(state))  # compile outside the timing
    return python_loop, scanned, unrolled, state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="K steps per measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    blocks, batch, size, k, reps = (
        (1, 4, 8, 2, 1) if args.smoke else (3, 32, 28, args.steps, args.reps)
    )
    loop, scanned, unrolled, state = make(blocks, batch, size, k)
    compiled_scan, _ = common.compile_fn(scanned, state)
    compiled_unrolled, _ = common.compile_fn(unrolled, state)
    med = common.time_interleaved(
        {
            "python loop of jitted steps": (loop, (state,)),
            "lax.scan": (compiled_scan, (state,)),
            "lax.scan, unroll=True": (compiled_unrolled, (state,)),
        },
        reps,
        warmup=1,
    )
    dev = jax.devices()[0]
    base = med["python loop of jitted steps"]
    rows = [
        {
            "device": f"{dev.platform}: {dev.device_kind}",
            "how": name,
            "s_per_step": t / k,
            "vs_python_loop": t / base,
            "steps": k,
        }
        for name, t in med.items()
    ]
    table = "\n".join(
        [
            f"ResNet with bnlab BN ({blocks} blocks per stage), batch {batch} of {size}x{size}x1, "
            f"{k} SGD steps per measurement:",
            "",
            "| how | s / step | vs Python loop |",
            "|---|---|---|",
            *(
                f"| {r['how']} | {r['s_per_step']:.3f} | {r['vs_python_loop']:.1f}x |"
                for r in rows
            ),
        ]
    )
    print(table)
    name = f"scan_steps_{dev.platform}" + ("_smoke" if args.smoke else "")
    common.write(
        name, common.metadata("scan_steps", smoke=args.smoke), rows, table, args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
