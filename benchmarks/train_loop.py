"""The trainer's overheads: ``bnlab.train.fit`` vs a minimal jitted loop, arms
as one program vs arms run one after another, and the cost of a checkpoint.

1. Loop: both train the ``digits`` preset (3 x 128 MLP with BN, SGD-momentum,
   cosine schedule, batch 128) for the same steps. The minimal loop keeps the
   training set on the device, gathers each batch inside one jitted step
   (state donated) and reads nothing back until the end; ``fit`` does what a
   real run does: shuffled batches, an evaluation on the test set, a record
   and an orbax checkpoint every 200 steps. Timed after compilation: the
   minimal loop from its second step, ``fit`` from its first progress call
   (the first chunk of steps done) until it returns, the final checkpoint's
   wait included. Ratio = fit steps/s / minimal steps/s.
2. Arms: ``fit`` with 1, 4, 16, 64 arms (seeds) of the same model vs the
   same arms trained one ``fit`` call after another; arm-steps/s, compile
   included (what a user waits for), same steps and evaluations.
3. Checkpoint: the time ``fit``'s checkpointer blocks the training loop per
   save (digests + orbax's synchronous part) and the time until the save is
   on disk, for the digits MLP state (1 arm and 16 arms).

    python -m benchmarks.train_loop            # loop: best of 3 rounds
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
import optax

from benchmarks import common
from bnlab import data as bn_data
from bnlab.train import build_model, build_optimizer, fit, fit_config, load_config
from bnlab.train.checkpoint import Checkpointer


def minimal_loop(config, steps: int) -> float:
    """Steps/s of a bare jitted loop: data on device, no host round trips."""
    ds = bn_data.load(config.dataset, seed=config.seed)
    model = build_model(config, ds.num_classes)
    tx = build_optimizer(config)
    variables = model.init(jax.random.key(0), ds.x_train[:2], train=False)
    state = (
        variables["params"],
        variables["batch_stats"],
        tx.init(variables["params"]),
    )
    x_all, y_all = jax.device_put((ds.x_train, ds.y_train))
    order = np.random.default_rng(0).integers(
        0, len(ds.x_train), (steps, config.batch_size)
    )
    order = jax.device_put(order.astype(np.int32))

    @functools.partial(jax.jit, donate_argnums=0)
    def run_step(state, i):
        params, batch_stats, opt = state
        idx = order[i]

        def loss(p):
            out, upd = model.apply(
                {"params": p, "batch_stats": batch_stats},
                x_all[idx],
                train=True,
                mutable=["batch_stats"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(out, y_all[idx])
            return ce.mean(), upd["batch_stats"]

        (_, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), new_stats, opt

    state = run_step(jax.device_put(state), 0)  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state = run_step(state, i)
    jax.block_until_ready(state)
    return steps / (time.perf_counter() - t0)


def fit_rate(config, steps: int) -> float:
    """Steps/s of ``fit`` from its first progress call (compilation done) to
    its return: every evaluation, checkpoint and the final wait included."""
    first = []

    def progress(p):
        if not first and "event" not in p:
            first.append((time.perf_counter(), p["step"]))

    with tempfile.TemporaryDirectory() as tmp:
        fit_config(config, Path(tmp) / "run", on_progress=progress)
        t0, done = first[0]
        return (steps - done) / (time.perf_counter() - t0)


def arms_rate(config, arms: int, steps: int, together: bool) -> float:
    """Arm-steps/s of ``arms`` seeds, as one fit or one fit per seed."""
    ds = bn_data.load(config.dataset, seed=0)
    model = build_model(config, ds.num_classes)
    tx = build_optimizer(config)
    kw = {
        "optimizer": tx,
        "steps": steps,
        "batch_size": config.batch_size,
        "eval_every": steps // 2,
        "devices": jax.devices()[:1],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if together:
            fit(model, ds, Path(tmp) / "all", seeds=range(arms), **kw)
        else:
            for s in range(arms):
                fit(model, ds, Path(tmp) / str(s), seeds=(s,), **kw)
    return arms * steps / (time.perf_counter() - t0)


def save_cost(config, arms: int, saves: int) -> tuple[float, float]:
    """(ms the loop is blocked per save, ms until the save is on disk)."""
    ds = bn_data.load(config.dataset, seed=0)
    model = build_model(config, ds.num_classes)
    tx = build_optimizer(config)

    def one(seed):
        v = model.init(jax.random.key(seed), ds.x_train[:2], train=False)
        return {**v, "opt_state": tx.init(v["params"]), "step": np.int32(0)}

    tree = jax.jit(jax.vmap(one))(np.arange(arms))
    blocked, total = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "checkpoints", 3, arms)
        for i in range(1, saves + 1):
            t0 = time.perf_counter()
            ckpt.save(i, tree, {"config": {}})
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            if i > 1:  # the first save creates the directories
                blocked.append(t1 - t0)
                total.append(t2 - t0)
        ckpt.close()
    return 1e3 * float(np.median(blocked)), 1e3 * float(np.median(total))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    steps, rounds = (60, 1) if args.smoke else (args.steps, args.rounds)
    arm_counts, arm_steps, saves = (
        ((1, 2), 10, 2) if args.smoke else ((1, 4, 16, 64), 400, 12)
    )
    every = 20 if args.smoke else 200
    config = load_config(
        "digits",
        [f"steps={steps}", f"eval_every={every}", f"checkpoint_every={every}"],
    )
    dev = jax.devices()[0]
    device = f"{dev.platform}: {dev.device_kind}"
    with jax.numpy_dtype_promotion("standard"):
        best = {"fit": 0.0, "minimal": 0.0}
        for _ in range(rounds):  # interleaved; best round of each
            best["minimal"] = max(best["minimal"], minimal_loop(config, steps))
            best["fit"] = max(best["fit"], fit_rate(config, steps))
        arms_cfg = load_config("digits", [f"steps={arm_steps}"])
        arms_rows = []
        for n in arm_counts:
            # one round: a ratio of several x, and one fit per arm at 64 arms
            # is most of the benchmark's time
            together = arms_rate(arms_cfg, n, arm_steps, True)
            alone = arms_rate(arms_cfg, n, arm_steps, False)
            arms_rows.append({"arms": n, "one_program": together, "sequential": alone})
        save_rows = []
        for n in (1, 16):
            blocked, total = save_cost(config, n, saves)
            save_rows.append({"arms": n, "blocked_ms": blocked, "on_disk_ms": total})
    ratio = best["fit"] / best["minimal"]
    rows = [
        {
            "kind": "loop",
            "device": device,
            "steps": steps,
            "fit_steps_per_sec": best["fit"],
            "minimal_steps_per_sec": best["minimal"],
            "ratio": ratio,
        },
        *(
            {"kind": "arms", "device": device, "steps": arm_steps, **r}
            for r in arms_rows
        ),
        *({"kind": "checkpoint", "device": device, **r} for r in save_rows),
    ]
    table = "\n".join(
        [
            "| device | steps | fit steps/s | minimal loop steps/s | fit / minimal |",
            "|---|---|---|---|---|",
            f"| {device} | {steps} | {best['fit']:.0f} | {best['minimal']:.0f} | "
            f"{ratio:.2f} |",
            "",
            "| arms | one program: arm-steps/s | one fit per arm: arm-steps/s | speed-up |",
            "|---|---|---|---|",
            *(
                f"| {r['arms']} | {r['one_program']:.0f} | {r['sequential']:.0f} | "
                f"{r['one_program'] / r['sequential']:.1f}x |"
                for r in arms_rows
            ),
            "",
            "| arms | loop blocked per save (ms) | save on disk (ms) |",
            "|---|---|---|",
            *(
                f"| {r['arms']} | {r['blocked_ms']:.1f} | {r['on_disk_ms']:.1f} |"
                for r in save_rows
            ),
        ]
    )
    print(table)
    name = f"train_loop_{dev.platform}" + ("_smoke" if args.smoke else "")
    common.write(
        name,
        common.metadata(
            "train_loop", steps=steps, arm_steps=arm_steps, smoke=args.smoke
        ),
        rows,
        table,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
