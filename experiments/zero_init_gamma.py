"""Zero-init gamma in residual blocks (Goyal et al. 2017, arXiv:1706.02677,
sec. 5.1): starting each residual block's last BN scale at 0 makes every
block the identity at initialization.

ResNet-20 (bnlab.models.ResNet20 with bnlab BN) on Fashion-MNIST 28x28
(quick: digits 8x8), batch 32, SGD momentum 0.9, lr 0.05, 400 steps (quick:
150), with and without zero-init of the last gamma. Reported (no
criterion): test accuracy over training.

    python -m experiments.zero_init_gamma [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np
import optax

from bnlab.models import ResNet20
from experiments import _harness as H
from experiments._models import bn_factory

NAME = "zero_init_gamma"
CLAIM = "Report: ResNet-20 with vs without zero-initialized last BN scale per block (Goyal et al. 2017)."


def run(ctx: H.Context) -> dict:
    steps = ctx.steps(150, 400)
    seeds = list(range(ctx.seeds))
    res = {}
    for name, zero in (("zero-init gamma", True), ("gamma = 1", False)):
        res[name] = H.train_group(
            ctx,
            H.Group(
                name="zero" if zero else "ones",
                model=ResNet20(
                    num_outputs=10, norm=bn_factory(), zero_init_last_gamma=zero
                ),
                seeds=seeds,
                hparams={"lr": [0.05] * len(seeds)},
                make_tx=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
                steps=steps,
                batch_size=32,
                eval_every=ctx.every(50, 100),
            ),
            data=ctx.images,
        )
    table = [
        {
            "arm": k,
            **{
                f"test acc @ {s}": H.fmt(*H.mean_spread(r.test_accuracy[i]))
                for i, s in enumerate(r.steps)
            },
        }
        for k, r in res.items()
    ]
    records = [
        {"arm": k, "step": s, "test_accuracy": r.test_accuracy[i]}
        for k, r in res.items()
        for i, s in enumerate(r.steps)
    ]
    _figure(ctx, res)
    return H.write_outputs(
        ctx,
        CLAIM,
        [],
        records,
        table,
        ["zero_init.png"],
        notes=f"{'digits 8x8' if ctx.quick else 'Fashion-MNIST 28x28'}, ResNet-20, batch 32, {steps} steps; no criterion.",
    )


def _figure(ctx, res) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, r in res.items():
        ax.plot(r.steps, np.nanmean(r.test_accuracy, 1), "o-", label=k)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title("ResNet-20: zero-init last gamma")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.figure("zero_init"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
