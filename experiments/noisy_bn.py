"""Noisy BN (Santurkar et al. 2018, arXiv:1805.11604, sec. 2.1): inject noise
with non-zero mean and non-unit variance after every BN layer, redrawn every
step, so the layer inputs' distributions shift all the time ("internal
covariate shift" by construction), and see whether training suffers.

4 x 128 ReLU MLP on Fashion-MNIST (quick: digits, 4 x 64), SGD momentum 0.9,
lr 0.02, 2000 steps (quick: 300); noise levels 0 (plain BN), 0.5, 1, 2
(quick: 0, 1, 2) (``y * (1 + level a) + level b``, a, b ~ N(0, 1) per
feature and step), and
a network without BN. Reported (no criterion): final test accuracy and the
instability of the last hidden layer's inputs in training (the mean over
units of the standard deviation, over 8 noise draws on the same batch, of
each unit's median input).

    python -m experiments.noisy_bn [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _harness as H
from experiments._models import MLP, NoisyBN

NAME = "noisy_bn"
CLAIM = (
    "Report: BN with noise injected after every layer (distributions shifting "
    "every step) vs plain BN and no BN (Santurkar et al. 2018)."
)
LEVELS = (0.0, 0.5, 1.0, 2.0)


def instability(model, n=256, draws=8):
    def f(variables, hp, data):
        x_tr = data[0][:n]

        def median_input(k):
            _, cols = model.apply(
                variables,
                x_tr,
                train=True,
                mutable=["batch_stats", "intermediates"],
                rngs={"noise": k},
            )
            return jnp.median(cols["intermediates"]["last_sigmoid_input"][0], axis=0)

        meds = jax.vmap(median_input)(jax.random.split(jax.random.key(0), draws))
        return jnp.mean(jnp.std(meds, axis=0))

    return f


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    steps = ctx.steps(300, 2000)
    seeds = list(range(ctx.seeds))
    levels = ctx.pick((0.0, 1.0, 2.0), LEVELS)
    arms = {f"noise {lv:g}": functools.partial(NoisyBN, level=lv) for lv in levels}
    arms["no BN"] = None
    res = {}
    for i, (name, layer) in enumerate(arms.items()):
        model = MLP(
            widths=(width,) * 4,
            norm="none" if layer is None else "before",
            norm_layer=layer,
        )
        res[name] = H.train_group(
            ctx,
            H.Group(
                name=f"arm{i}",
                model=model,
                seeds=seeds,
                hparams={"lr": [0.02] * len(seeds)},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=128,
                eval_every=ctx.every(125, 500),
                noise=True,
                probe=instability(model),
            ),
        )
    table = [
        {
            "arm": k,
            "final test accuracy": H.fmt(*H.mean_spread(r.test_accuracy[-1])),
            "input instability (end)": H.fmt(
                *H.mean_spread(np.asarray(r.probes[-1])), 3
            ),
        }
        for k, r in res.items()
    ]
    records = H.curve_records(res, test_accuracy="test_accuracy", instability="probes")
    fig = H.plot_curves(
        ctx,
        "noisy_bn",
        {k: (r.steps, r.test_accuracy) for k, r in res.items()},
        "BN with noise injected after every layer",
    )
    return H.write_outputs(
        ctx,
        CLAIM,
        [],
        records,
        table,
        [fig],
        notes=f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 4 x {width}, {steps} steps; no criterion (a measurement to report).",
    )


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
