"""Sync BN vs per-device BN: with 2 examples per device, per-device
statistics are too noisy; synchronised (global) statistics train exactly
like one device holding the whole batch.

8 simulated devices (a named vmap axis, whose collectives JAX runs exactly as
under pmap / shard_map), 2 examples each (global batch 16). Arms: bnlab BN
synchronised over the devices; the same model on one device with the whole
batch of 16 (the same wrapper with 1 device, so that both start from the same
weights: Flax derives initial weights from the module path); per-device BN
(each device normalizes its 2 examples: ghost batches of 2). 3 x 128 ReLU MLP on Fashion-MNIST (quick: digits, 3 x 64),
SGD momentum 0.9, lr 0.02, 2000 steps (quick: 500).

    python -m experiments.sync_bn [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _harness as H
from experiments._models import MLP, DeviceSim, bn_factory

NAME = "sync_bn"
# What the committed full run shows and why, written after it (the
# criteria above were fixed before it and are not changed).
DISCUSSION = """Per step the synchronized statistics equal the one-device full batch to
rounding (parameter difference 4.5e-7 of their size after 100 steps), but
the criterion was checked after 2000 steps of SGD, where the difference
from another summation order over 8 devices has grown chaotically to 0.13
(1000 steps) and 0.20 (2000 steps); the accuracies stay close (0.819 vs
0.825), while per-device BN on 2 examples is 40 points worse. The check
should have been on a short horizon (or per step); it is kept as set."""
CLAIM = (
    "Sync BN over 8 devices with 2 examples each equals single-device "
    "full-batch training; per-device BN is >= 5 points worse."
)


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    steps = ctx.steps(500, 2000)
    seeds = list(range(ctx.seeds))
    widths = (width,) * 3
    models = {
        "sync (8 devices x 2)": DeviceSim(widths=widths, devices=8),
        "one device, batch 16": DeviceSim(widths=widths, devices=1),
        "per-device (8 x 2)": MLP(
            widths=widths, norm="before", norm_layer=bn_factory(ghost_size=2)
        ),
    }
    res = {}

    def param_slice(v, h, data):  # a fixed slice of the parameters, per eval
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(v["params"])])
        return flat[:256]

    for i, (name, model) in enumerate(models.items()):
        res[name] = H.train_group(
            ctx,
            H.Group(
                name=f"arm{i}",
                model=model,
                seeds=seeds,
                hparams={"lr": [0.02] * len(seeds)},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=16,
                eval_every=ctx.every(50, 100),
                probe=param_slice,
            ),
        )
    sync, one, local = (res[k] for k in models)
    growth = []  # reported, not checked: how a rounding-level difference grows
    for i, s in enumerate(one.steps):
        a, b = np.asarray(sync.probes[i]), np.asarray(one.probes[i])
        rel_i = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        growth.append({"step": s, "relative difference": rel_i})

    def params(r):
        return jax.tree.leaves(r.variables["params"])

    diffs = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(params(sync), params(one), strict=True)
    ]
    scale = max(float(np.max(np.abs(b))) for b in params(one))
    rel = max(diffs) / scale
    acc = {k: r.test_accuracy[-1].tolist() for k, r in res.items()}
    gap = float(
        np.mean(acc["one device, batch 16"]) - np.mean(acc["per-device (8 x 2)"])
    )
    checks = [
        H.check(
            "sync vs one device: max |param difference| / max |param| after training",
            rel,
            "<= 1e-5",
            rel <= 1e-5,
        ),
        H.check(
            "one device - per-device BN: final test accuracy",
            gap,
            ">= 0.05 (5 points)",
            gap >= 0.05,
        ),
    ]
    table = [
        {"arm": k, "final test accuracy": H.fmt(*H.mean_spread(v))}
        for k, v in acc.items()
    ]
    shown = {growth[0]["step"], growth[1]["step"], growth[len(growth) // 2]["step"]}
    table += [
        {
            "arm": f"sync vs one device after {g['step']} steps",
            "final test accuracy": f"relative parameter difference {g['relative difference']:.1e}",
        }
        for g in growth
        if g["step"] in shown | {growth[-1]["step"]}
    ]
    records = H.curve_records(res, test_accuracy="test_accuracy")
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        [],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 3 x {width}, {steps} "
            "steps of 16. History: a first full run compared the sync arm with a "
            "plain MLP whose initial weights differed (Flax derives them from the "
            "module path): parameters 62% apart, accuracies 0.819 vs 0.821. The "
            "single-device arm is now the same wrapper with one device. The "
            "difference of a fixed 256-value slice of the parameters at each "
            "evaluation is reported (not checked) to show how a rounding-level "
            "difference (another summation order over 8 devices) grows with "
            "training."
        ),
        extra={"difference_growth": growth},
    )


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
