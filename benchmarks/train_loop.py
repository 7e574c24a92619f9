"""Training-loop overhead: ``bnlab.train.fit`` vs a minimal jitted loop.

Both train the same model (the ``digits`` preset: 3 x 128 MLP with BN,
SGD-momentum, cosine schedule, batch 128) for the same number of steps. The
minimal loop keeps the whole training set on the device, gathers each batch
inside one jitted step (state donated) and never reads a value back until the
end; ``fit``
does everything a real run does: shuffled batches, evaluation on the test set
and an orbax checkpoint every 200 steps, ``metrics.jsonl``. Both are timed
after compilation: the minimal loop from its second step, ``fit`` from the
end of its first step (its progress callback) until it returns, the final
checkpoint's wait included. Ratio = fit steps/s / minimal steps/s.

    python -m benchmarks.train_loop            # 2000 steps, 3 rounds
    python -m benchmarks.train_loop --smoke    # seconds
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from bnlab import data as bn_data
from bnlab.train import build_model, build_optimizer, fit, init_state, load_config
from bnlab.train.step import make_train_step


def minimal_loop(config, steps: int) -> float:
    """Steps/s of a bare jitted loop: data on device, no host round trips."""
    ds = bn_data.load(config.dataset, seed=config.seed)
    model = build_model(config, ds.num_classes, None)
    tx = build_optimizer(config)
    state = init_state(config, model, tx, ds.x_train)
    step = make_train_step(model, tx, ds.num_classes, "single", None)
    x_all, y_all = jax.device_put((ds.x_train, ds.y_train))
    order = np.random.default_rng(0).integers(
        0, len(ds.x_train), (steps, config.batch_size)
    )
    order = jax.device_put(order.astype(np.int32))

    @functools.partial(jax.jit, donate_argnums=0)
    def run_step(state, i):
        idx = order[i]
        return step(state, x_all[idx], y_all[idx])[0]

    state = run_step(jax.device_put(state), 0)  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state = run_step(state, i)
    jax.block_until_ready(state)
    return steps / (time.perf_counter() - t0)


def fit_rate(config, steps: int) -> float:
    """Steps/s of ``fit`` from its first finished step (compilation done) to
    its return: every evaluation, checkpoint and the final wait included."""
    first = []

    def progress(p):
        if not first:
            first.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        fit(config, Path(tmp) / "run", on_progress=progress)
        return (steps - 1) / (time.perf_counter() - first[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    steps, rounds = (60, 1) if args.smoke else (args.steps, args.rounds)
    config = load_config(
        "digits",
        [f"steps={steps}", "eval_every=200", "checkpoint_every=200"],
    )
    with jax.numpy_dtype_promotion("standard"):
        best = {"fit": 0.0, "minimal": 0.0}
        for _ in range(rounds):  # interleaved; best round of each
            best["minimal"] = max(best["minimal"], minimal_loop(config, steps))
            best["fit"] = max(best["fit"], fit_rate(config, steps))
    ratio = best["fit"] / best["minimal"]
    dev = jax.devices()[0]
    rows = [
        {
            "device": f"{dev.platform}: {dev.device_kind}",
            "steps": steps,
            "fit_steps_per_sec": best["fit"],
            "minimal_steps_per_sec": best["minimal"],
            "ratio": ratio,
        }
    ]
    table = "\n".join(
        [
            "| device | steps | fit steps/s | minimal loop steps/s | fit / minimal |",
            "|---|---|---|---|---|",
            f"| {rows[0]['device']} | {steps} | {best['fit']:.0f} | "
            f"{best['minimal']:.0f} | {ratio:.2f} |",
        ]
    )
    print(table)
    name = f"train_loop_{dev.platform}" + ("_smoke" if args.smoke else "")
    common.write(
        name, common.metadata("train_loop", steps=steps), rows, table, args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
