"""``bnlab.train.fit`` vs the loop a researcher writes by hand, on the models
researchers train: the BN MLP, a small CNN and ResNet-20, on digits.

The hand loop is the one of Flax's examples: a jitted train step (state
donated), a Python loop over steps, each batch a numpy slice of a shuffled
epoch sent to the device, an evaluation of the test set and a plain orbax
``CheckpointManager`` save (asynchronous) every ``--every`` steps. ``fit``
trains the same model, data, optimizer and batch size, one arm on one device,
evaluating and checkpointing every ``--every`` steps (its verified checkpoints,
its records, its progress callback).

Per model: steady steps/s (after the first step for the hand loop, after
``fit``'s first progress call for ``fit``, every evaluation and save
included, the last save's wait too), and the fixed cost: the seconds from the
call to the first finished step(s), less those steps' time at the steady
rate (tracing, compilation, initialization, ``fit``'s checks). Arms rows:
``fit`` with 1, 4 and 16 seeds as one program vs the hand loop run once per
seed; arm-steps/s, compilation included.

    python -m benchmarks.fit_vs_hand            # the committed rows
    python -m benchmarks.fit_vs_hand --smoke    # seconds (MLP and CNN)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

import bnlab.linen
from benchmarks import common
from bnlab import data as bn_data
from bnlab.models import MLP, ResNet20
from bnlab.train import fit


class SmallCNN(nn.Module):
    """conv 16 -> BN -> relu -> conv 32 -> BN -> relu -> pool -> dense."""

    @nn.compact
    def __call__(self, x, train):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(len(x), -1))


def _models():
    bn = functools.partial(bnlab.linen.BatchNorm)
    return {
        "mlp": (MLP(widths=(128, 128, 128), num_outputs=10, norm=bn), False, 128),
        "small_cnn": (SmallCNN(), True, 64),
        "resnet20": (ResNet20(num_outputs=10, norm=bn), True, 64),
    }


def _data(image: bool) -> bn_data.Dataset:
    ds = bn_data.load("digits")
    if not image:
        return ds
    shape = (-1, 8, 8, 1)
    return ds._replace(
        x_train=ds.x_train.reshape(shape), x_test=ds.x_test.reshape(shape)
    )


OPTIMIZER = optax.sgd(0.05, momentum=0.9)


def hand_loop(model, ds, batch: int, steps: int, every: int, seed: int = 0):
    """(steady steps/s, fixed seconds) of the hand-written loop."""
    t0 = time.perf_counter()
    x, y = ds.x_train, ds.y_train
    variables = model.init(jax.random.key(seed), x[:2], train=False)
    state = (
        variables["params"],
        variables["batch_stats"],
        OPTIMIZER.init(variables["params"]),
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, xb, yb):
        params, stats, opt = state

        def loss(p):
            out, upd = model.apply(
                {"params": p, "batch_stats": stats},
                xb,
                train=True,
                mutable=["batch_stats"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()
            return ce, upd["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = OPTIMIZER.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    @jax.jit
    def correct(params, stats, xb, yb):
        out = model.apply({"params": params, "batch_stats": stats}, xb, train=False)
        return (out.argmax(-1) == yb).sum()

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    per_epoch = len(x) // batch
    with tempfile.TemporaryDirectory() as tmp:
        mgr = ocp.CheckpointManager(
            Path(tmp).absolute() / "ckpt",
            options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True),
        )
        t_first = None
        for i in range(steps):
            j = i % per_epoch
            if j == 0 and i:
                perm = rng.permutation(len(x))
            idx = perm[j * batch : (j + 1) * batch]
            state = step(state, x[idx], y[idx])
            if t_first is None:
                jax.block_until_ready(state)
                t_first = time.perf_counter()
            if (i + 1) % every == 0 or i + 1 == steps:
                test = [
                    (ds.x_test[k : k + 500], ds.y_test[k : k + 500])
                    for k in range(0, len(ds.x_test), 500)
                ]
                accuracy = sum(int(correct(*state[:2], *b)) for b in test) / len(
                    ds.x_test
                )
                assert accuracy >= 0.0  # read back, as a record would be
                mgr.save(i + 1, args=ocp.args.StandardSave(state))
        mgr.wait_until_finished()
        jax.block_until_ready(state)
        t_end = time.perf_counter()
        mgr.close()
    rate = (steps - 1) / (t_end - t_first)
    return rate, (t_first - t0) - 1 / rate


def fit_run(model, ds, batch: int, steps: int, every: int, seeds=(0,)):
    """(steady steps/s, fixed seconds, total seconds) of ``fit``."""
    first = []

    def progress(p):
        if "event" not in p and not first:
            first.append((time.perf_counter(), p["step"]))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fit(
            model,
            ds,
            Path(tmp) / "run",
            optimizer=OPTIMIZER,
            steps=steps,
            batch_size=batch,
            seeds=seeds,
            eval_every=every,
            checkpoint_every=every,
            devices=jax.devices()[:1],
            on_progress=progress,
        )
        t_end = time.perf_counter()
    t_first, done = first[0]
    rate = (steps - done) / (t_end - t_first) if steps > done else float("nan")
    return rate, (t_first - t0) - done / rate, t_end - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    steps = {"mlp": 3000, "small_cnn": 1000, "resnet20": 400}
    arm_counts = (1, 4, 16)
    arm_steps = 200
    every = args.every
    if args.smoke:
        steps = {k: 30 for k in steps}
        arm_counts, arm_steps, every = (1, 2), 10, 10
    dev = jax.devices()[0]
    device = f"{dev.platform}: {dev.device_kind}"
    rows = []
    models = _models()
    if args.smoke:  # ResNet-20 compiles for seconds: the rows' shape is the point
        del models["resnet20"]
    for name, (model, image, batch) in models.items():
        ds = _data(image)
        hand = hand_loop(model, ds, batch, steps[name], every)
        ours = fit_run(model, ds, batch, steps[name], every)
        rows.append(
            {
                "kind": "loop",
                "model": name,
                "device": device,
                "steps": steps[name],
                "batch": batch,
                "hand_steps_per_sec": hand[0],
                "fit_steps_per_sec": ours[0],
                "ratio": ours[0] / hand[0],
                "hand_fixed_s": hand[1],
                "fit_fixed_s": ours[1],
                "fixed_ratio": ours[1] / hand[1],
            }
        )
        if name == "resnet20" and not args.smoke:
            continue  # 16 ResNet-20 arms on 2 cores: too long for this table
        for n in arm_counts:
            t0 = time.perf_counter()
            for s in range(n):
                hand_loop(model, ds, batch, arm_steps, every, seed=s)
            hand_s = time.perf_counter() - t0
            fit_s = fit_run(model, ds, batch, arm_steps, every, seeds=tuple(range(n)))[
                2
            ]
            rows.append(
                {
                    "kind": "arms",
                    "model": name,
                    "device": device,
                    "arms": n,
                    "steps": arm_steps,
                    "hand_arm_steps_per_sec": n * arm_steps / hand_s,
                    "fit_arm_steps_per_sec": n * arm_steps / fit_s,
                    "ratio": hand_s / fit_s,
                }
            )
    table = "\n".join(
        [
            "| model | batch | steps | hand loop steps/s | fit steps/s | fit / hand | "
            "hand fixed (s) | fit fixed (s) | fixed fit / hand |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['model']} | {r['batch']} | {r['steps']} | "
                f"{r['hand_steps_per_sec']:.0f} | {r['fit_steps_per_sec']:.0f} | "
                f"{r['ratio']:.2f} | {r['hand_fixed_s']:.1f} | {r['fit_fixed_s']:.1f} | "
                f"{r['fixed_ratio']:.2f} |"
                for r in rows
                if r["kind"] == "loop"
            ),
            "",
            "| model | arms | hand loop per seed: arm-steps/s | fit, one program: "
            "arm-steps/s | fit / hand |",
            "|---|---|---|---|---|",
            *(
                f"| {r['model']} | {r['arms']} | {r['hand_arm_steps_per_sec']:.0f} | "
                f"{r['fit_arm_steps_per_sec']:.0f} | {r['ratio']:.2f} |"
                for r in rows
                if r["kind"] == "arms"
            ),
        ]
    )
    print(table)
    name = f"fit_vs_hand_{dev.platform}" + ("_smoke" if args.smoke else "")
    common.write(
        name,
        common.metadata("fit_vs_hand", every=every, smoke=args.smoke),
        rows,
        table,
        args.out,
    )
    return 0


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        raise SystemExit(main())
