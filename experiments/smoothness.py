"""Santurkar et al. 2018 (arXiv:1805.11604), Fig. 4: BN makes the loss
landscape smoother: along the gradient the loss varies less, the gradient
changes less, and the effective beta-smoothness is smaller.

4 x 256 ReLU MLP on Fashion-MNIST (quick: digits, 4 x 64), plain SGD at lr
0.1 and (control) 0.3, batch 128, 2000 steps (quick: 400), with and without
BN. Every 100 steps (quick: 50), on a fixed training batch of 512 (quick:
256) in train mode: move along the negative gradient by eta in
{0.5, 1, 2, 4} x lr and record the loss range, the largest gradient change
||g(w - eta g) - g(w)|| and beta = max ||g change|| / ||w change||
(bnlab.diagnostics.landscape_probe). Ratios no-BN / BN of the means over
probe points (from the first one after step 0) and seeds.

    python -m experiments.smoothness [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnlab.diagnostics import landscape_probe
from experiments import _harness as H
from experiments._models import MLP

NAME = "smoothness"
CLAIM = (
    "BN makes the loss landscape smoother (Santurkar et al. 2018): less loss "
    "variation and gradient change along the gradient, smaller effective "
    "beta-smoothness."
)
FACTORS = (0.5, 1.0, 2.0, 4.0)
LRS = (0.1, 0.3)


def probe(model, n):
    def f(variables, hp, data):
        x_tr, y_tr, _, _ = data
        x, y = x_tr[-n:], y_tr[-n:]  # a fixed training batch

        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(n), y])

        etas = hp["lr"] * jnp.asarray(FACTORS)
        r = landscape_probe(loss, variables["params"], etas)
        return jnp.stack([r["loss_range"], r["max_grad_change"], r["beta"]])

    return f


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 256)
    steps = ctx.steps(400, 2000)
    n = ctx.pick(256, 512)
    seeds = list(range(ctx.seeds))
    metrics = {}
    for arm, norm in (("nobn", "none"), ("bn", "before")):
        model = MLP(widths=(width,) * 4, activation="relu", norm=norm)
        r = H.train_group(
            ctx,
            H.Group(
                name=arm,
                model=model,
                seeds=[s for _ in LRS for s in seeds],
                hparams={"lr": [lr for lr in LRS for _ in seeds]},
                make_tx=lambda hp: optax.sgd(hp["lr"]),
                steps=steps,
                batch_size=128,
                eval_every=ctx.every(50, 100),
                probe=probe(model, n),
            ),
        )
        p = np.array([np.asarray(q) for q in r.probes[1:]])  # (probes, arms, 3)
        p = p.reshape(len(p), len(LRS), len(seeds), 3)
        metrics[arm] = {
            "steps": r.steps[1:],
            "probes": p,
            "acc": r.test_accuracy[-1].reshape(len(LRS), len(seeds)),
        }
    names = ("loss range", "gradient change", "beta-smoothness")
    ratios = {}
    for j, lr in enumerate(LRS):
        ratios[lr] = {
            nm: float(
                np.nanmean(metrics["nobn"]["probes"][:, j, :, k])
                / np.nanmean(metrics["bn"]["probes"][:, j, :, k])
            )
            for k, nm in enumerate(names)
        }
    r01 = ratios[0.1]
    checks = [
        H.check(
            "lr 0.1: loss range along the gradient, no BN / BN",
            r01["loss range"],
            ">= 3",
            r01["loss range"] >= 3,
        ),
        H.check(
            "lr 0.1: gradient change, no BN / BN",
            r01["gradient change"],
            ">= 2",
            r01["gradient change"] >= 2,
        ),
        H.check(
            "lr 0.1: effective beta-smoothness, no BN / BN",
            r01["beta-smoothness"],
            "> 1",
            r01["beta-smoothness"] > 1,
        ),
    ]
    table = [
        {
            "lr": lr,
            **{f"{nm} (no BN / BN)": f"{ratios[lr][nm]:.2f}" for nm in names},
            "final test acc no BN": H.fmt(*H.mean_spread(metrics["nobn"]["acc"][j])),
            "final test acc BN": H.fmt(*H.mean_spread(metrics["bn"]["acc"][j])),
        }
        for j, lr in enumerate(LRS)
    ]
    records = [
        {
            "arm": arm,
            "lr": lr,
            "step": st,
            **{nm: m["probes"][i, j, :, k] for k, nm in enumerate(names)},
        }
        for arm, m in metrics.items()
        for j, lr in enumerate(LRS)
        for i, st in enumerate(m["steps"])
    ]
    _figure(ctx, metrics, names)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["landscape.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 4 x {width}, "
            f"{steps} steps; lr 0.3 is the control (reported, not checked)."
        ),
        extra={"ratios": {str(k): v for k, v in ratios.items()}},
    )


def _figure(ctx, metrics, names) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k, (ax, nm) in enumerate(zip(axes, names, strict=True)):
        for arm, color in (("nobn", "tab:gray"), ("bn", "tab:blue")):
            m = metrics[arm]
            v = m["probes"][:, 0, :, k]  # lr 0.1
            ax.plot(
                m["steps"],
                np.nanmean(v, 1),
                color=color,
                label="BN" if arm == "bn" else "no BN",
            )
            ax.fill_between(
                m["steps"], np.nanmin(v, 1), np.nanmax(v, 1), color=color, alpha=0.2
            )
        ax.set_yscale("log")
        ax.set_title(f"{nm} (lr 0.1)")
        ax.set_xlabel("training step")
    axes[0].legend()
    ctx.save_figure(fig, "landscape")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
