"""Claim (c): in a deep network normalize every layer; before or after the
activation makes little difference.

6 x 128 ReLU MLP on Fashion-MNIST (quick: digits, 6 x 64), SGD with momentum
0.9, lr 0.02, batch 128, 2000 steps (quick: 600). Arms: no BN; BN before
every activation (the paper's); BN after every activation; BN after the first
Dense layer only. Compared: final test accuracy, means over seeds.

    python -m experiments.placement [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np

from experiments import _harness as H
from experiments._models import MLP

NAME = "placement"
CLAIM = (
    "(c) In deep nets normalize at every layer; whether BN goes before or after "
    "the activation matters little."
)
ARMS = {
    "none": "no BN",
    "before": "BN before act, every layer",
    "after": "BN after act, every layer",
    "first": "BN in the first layer only",
}


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    steps = ctx.steps(600, 2000)
    seeds = list(range(ctx.seeds))
    res = {}
    for norm in ARMS:
        res[norm] = H.train_group(
            ctx,
            H.Group(
                name=norm,
                model=MLP(widths=(width,) * 6, activation="relu", norm=norm),
                seeds=seeds,
                hparams={"lr": [0.02] * len(seeds)},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=128,
                eval_every=ctx.every(100, 200),
            ),
        )
    acc = {k: float(np.mean(r.test_accuracy[-1])) for k, r in res.items()}
    gap = abs(acc["before"] - acc["after"])
    checks = [
        H.check(
            "|before - after| final test accuracy",
            gap,
            "<= 0.02 (2 points)",
            gap <= 0.02,
        ),
        H.check(
            "before and after both beat no BN",
            {k: acc[k] for k in ("none", "before", "after")},
            "before > none and after > none",
            acc["before"] > acc["none"] and acc["after"] > acc["none"],
        ),
    ]
    table = [
        {
            "arm": ARMS[k],
            "final test accuracy": H.fmt(*H.mean_spread(r.test_accuracy[-1])),
            "max test accuracy": H.fmt(*H.mean_spread(np.nanmax(r.test_accuracy, 0))),
            "final train loss": H.fmt(*H.mean_spread(r.train_loss[-1])),
        }
        for k, r in res.items()
    ]
    records = H.curve_records(
        res, test_accuracy="test_accuracy", train_loss="train_loss"
    )
    fig = H.plot_curves(
        ctx,
        "placement",
        {ARMS[k]: (r.steps, r.test_accuracy) for k, r in res.items()},
        "Where BN goes",
    )
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        [fig],
        notes=f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 6 x {width}, ReLU, {steps} steps.",
    )


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
