"""The "x30" claim: BN tolerates much higher learning rates (Ioffe & Szegedy
2015, sec. 4.2: BN-x30 trains, the baseline at such rates does not).

6 x 256 ReLU MLP, batch 128, plain SGD, 3000 steps (quick: digits, 6 x 64,
600 steps), learning rates 0.01 .. 30, with and without BN, every arm of a
group in one vmapped program.

"Diverged" = non-finite parameters at some point, or a final train loss no
better than chance (>= ln 10), on every seed. "10x" and "30x" are the
nearest grid values. Accuracies are final test accuracies, means over seeds.

    python -m experiments.lr_robustness [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import math

import numpy as np
import optax

from experiments import _harness as H
from experiments._models import MLP

NAME = "lr_robustness"
CLAIM = (
    "(e) BN allows a much higher learning rate (the paper's x30): the baseline "
    "diverges at 10x its best rate while BN at 30x still reaches the "
    "baseline's best accuracy."
)
LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
CHANCE_LOSS = math.log(10)


def nearest(lr: float) -> int:
    return int(np.argmin(np.abs(np.log(np.asarray(LRS)) - math.log(lr))))


def run(ctx: H.Context) -> dict:
    widths = ctx.pick((64,) * 6, (256,) * 6)
    steps = ctx.steps(600, 3000)
    seeds = list(range(ctx.seeds))
    arm_seeds = [s for _ in LRS for s in seeds]
    arm_lrs = [lr for lr in LRS for _ in seeds]
    acc, loss, div = {}, {}, {}
    for arm, norm in (("baseline", "none"), ("bn", "before")):
        r = H.train_group(
            ctx,
            H.Group(
                name=arm,
                model=MLP(widths=widths, activation="relu", norm=norm),
                seeds=arm_seeds,
                hparams={"lr": arm_lrs},
                make_tx=lambda hp: optax.sgd(hp["lr"]),
                steps=steps,
                batch_size=128,
                eval_every=ctx.every(200, 500),
            ),
        )
        shape = (len(LRS), len(seeds))
        acc[arm] = r.test_accuracy[-1].reshape(shape)
        loss[arm] = r.train_loss[-1].reshape(shape)
        bad = r.diverged | ~(r.train_loss[-1] < CHANCE_LOSS)
        div[arm] = bad.reshape(shape)
    ok = ~div["baseline"]
    base_mean = np.where(
        ok.any(1),
        np.where(ok, acc["baseline"], 0).sum(1) / np.maximum(ok.sum(1), 1),
        -1,
    )  # mean over the seeds that did not diverge; -1 if all did
    best_i = int(np.argmax(base_mean))
    best_lr, best_acc = LRS[best_i], float(base_mean[best_i])
    i10, i30 = nearest(10 * best_lr), nearest(30 * best_lr)
    in_grid = 30 * best_lr <= LRS[-1] * 1.5
    base_div_10 = bool(div["baseline"][i10].all()) and i10 != best_i
    bn_acc_30 = float(np.mean(np.where(div["bn"][i30], 0.0, acc["bn"][i30])))
    checks = [
        H.check(
            f"baseline at 10x its best lr ({LRS[i10]:g}; best {best_lr:g}) diverges",
            {
                "diverged_per_seed": div["baseline"][i10].tolist(),
                "final_train_loss": loss["baseline"][i10].tolist(),
            },
            "non-finite, or final train loss >= ln 10, on every seed",
            base_div_10,
        ),
        H.check(
            f"BN at 30x the baseline's best lr ({LRS[i30]:g}): final test accuracy",
            {"bn": bn_acc_30, "baseline_best": best_acc},
            ">= baseline best - 0.01",
            in_grid and bn_acc_30 >= best_acc - 0.01,
        ),
    ]
    table = []
    for i, lr in enumerate(LRS):
        row = {"lr": f"{lr:g}"}
        for arm in ("baseline", "bn"):
            cells = [
                "div" if div[arm][i, s] else f"{acc[arm][i, s]:.3f}"
                for s in range(len(seeds))
            ]
            row[arm] = " / ".join(cells)
        table.append(row)
    records = [
        {
            "arm": arm,
            "lr": lr,
            "seed": s,
            "final_test_accuracy": acc[arm][i, s],
            "final_train_loss": loss[arm][i, s],
            "diverged": bool(div[arm][i, s]),
        }
        for arm in ("baseline", "bn")
        for i, lr in enumerate(LRS)
        for s in range(len(seeds))
    ]
    _figure(ctx, acc, div, best_lr)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["lr_sweep.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP {widths}, "
            f"{steps} steps of 128, plain SGD. Table cells: final test accuracy "
            "per seed ('div' = diverged)."
        ),
        extra={"baseline_best_lr": best_lr, "baseline_best_accuracy": best_acc},
    )


def _figure(ctx, acc, div, best_lr) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, color in (("baseline", "tab:gray"), ("bn", "tab:blue")):
        a = np.where(div[arm], 0.1, acc[arm])  # diverged shown at chance
        ax.plot(
            LRS,
            a.mean(1),
            "o-",
            color=color,
            label="with BN" if arm == "bn" else "without BN",
        )
        ax.fill_between(LRS, a.min(1), a.max(1), color=color, alpha=0.2)
    for k, ls in ((1, "-"), (10, "--"), (30, ":")):
        ax.axvline(
            best_lr * k, color="k", lw=0.7, ls=ls, label=f"{k}x baseline's best lr"
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD)")
    ax.set_ylabel("final test accuracy (diverged = chance)")
    ax.set_title("Learning-rate sweep")
    ax.legend(fontsize=8)
    ctx.save_figure(fig, "lr_sweep")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
