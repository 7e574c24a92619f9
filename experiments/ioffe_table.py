"""A miniature of Ioffe & Szegedy 2015, Figures 2 and 3 (the Inception table):
steps to reach a given accuracy and the best accuracy, for the paper's arms.

6 x 128 MLP on Fashion-MNIST (quick: digits), SGD with momentum 0.9, batch
128, base learning rate eta = 0.01, 3000 steps (quick: 400), evaluation every
50 steps (quick: 25). Arms (as in the paper): Baseline (ReLU, no BN, eta),
BN-Baseline (BN, eta), BN-x5 (5 eta), BN-x30 (30 eta), BN-x5-Sigmoid (BN,
sigmoid, 5 eta), the sigmoid network without BN at 5 eta, and the baseline at
5 eta and 30 eta. Thresholds 0.85-0.88 (quick: digits 0.90-0.96).

    python -m experiments.ioffe_table [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np

from experiments import _harness as H
from experiments._models import MLP

NAME = "ioffe_table"
CLAIM = (
    "(e) BN reaches a given accuracy in fewer steps, more so at 5x its "
    "learning rate, and trains a sigmoid network that does not train "
    "without it (Ioffe & Szegedy 2015, Fig. 2-3)."
)
ETA = 0.01
# group -> (activation, norm, [(arm name, lr multiple)])
GROUPS = {
    "relu_nobn": (
        "relu",
        "none",
        [("Baseline", 1), ("Baseline-x5", 5), ("Baseline-x30", 30)],
    ),
    "relu_bn": ("relu", "before", [("BN-Baseline", 1), ("BN-x5", 5), ("BN-x30", 30)]),
    "sigmoid_bn": ("sigmoid", "before", [("BN-x5-Sigmoid", 5)]),
    "sigmoid_nobn": ("sigmoid", "none", [("Sigmoid-x5", 5)]),
}


def run(ctx: H.Context) -> dict:
    steps = ctx.steps(400, 3000)
    thresholds = ctx.pick((0.90, 0.92, 0.94, 0.96), (0.85, 0.86, 0.87, 0.88))
    seeds = list(range(ctx.seeds))
    curves, steps_axis = {}, None
    for gname, (act, norm, arms) in GROUPS.items():
        r = H.train_group(
            ctx,
            H.Group(
                name=gname,
                model=MLP(widths=(128,) * 6, activation=act, norm=norm),
                seeds=[s for _ in arms for s in seeds],
                hparams={"lr": [ETA * m for _, m in arms for _ in seeds]},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=128,
                eval_every=ctx.every(25, 50),
            ),
        )
        steps_axis = r.steps
        for i, (arm, _) in enumerate(arms):
            curves[arm] = r.test_accuracy[:, i * len(seeds) : (i + 1) * len(seeds)]
    summary = {}
    for arm, acc in curves.items():
        summary[arm] = {
            "steps_to": {
                f"{t:.2f}": [
                    H.steps_to(steps_axis, acc[:, s], t) for s in range(len(seeds))
                ]
                for t in thresholds
            },
            "max_accuracy": np.nanmax(np.nan_to_num(acc, nan=0.0), 0).tolist(),
        }
    key = f"{thresholds[2]:.2f}"  # 0.87 in the full run

    def mean_steps(arm):
        never = 10 * steps
        v = [never if s is None else s for s in summary[arm]["steps_to"][key]]
        return float(np.mean(v))

    base = mean_steps("Baseline")
    ratio_x5 = mean_steps("BN-x5") / base
    ratio_bn = mean_steps("BN-Baseline") / base
    sig_nobn = float(np.mean(summary["Sigmoid-x5"]["max_accuracy"]))
    sig_bn = float(np.mean(summary["BN-x5-Sigmoid"]["max_accuracy"]))
    low, high = ctx.pick((0.15, 0.85), (0.15, 0.85))
    checks = [
        H.check(
            f"steps to {key}: BN-x5 / Baseline", ratio_x5, "<= 0.6", ratio_x5 <= 0.6
        ),
        H.check(
            f"steps to {key}: BN-Baseline / Baseline",
            ratio_bn,
            "<= 0.75",
            ratio_bn <= 0.75,
        ),
        H.check(
            "max accuracy, sigmoid without BN (x5)",
            sig_nobn,
            f"<= {low}",
            sig_nobn <= low,
        ),
        H.check("max accuracy, BN-x5-Sigmoid", sig_bn, f">= {high}", sig_bn >= high),
    ]
    table = []
    for arm, s in summary.items():
        row = {"arm": arm}
        for t in thresholds:
            vals = s["steps_to"][f"{t:.2f}"]
            row[f"steps to {t:.2f}"] = (
                "never"
                if all(v is None for v in vals)
                else H.fmt(
                    *H.mean_spread([np.nan if v is None else v for v in vals]), 0
                )
                + (
                    ""
                    if all(v is not None for v in vals)
                    else f" ({sum(v is None for v in vals)} never)"
                )
            )
        row["max accuracy"] = H.fmt(*H.mean_spread(s["max_accuracy"]))
        table.append(row)
    records = [
        {"arm": arm, "step": st, "test_accuracy": curves[arm][i]}
        for arm in curves
        for i, st in enumerate(steps_axis)
    ]
    _figure(ctx, steps_axis, curves, thresholds)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["curves.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 6 x 128, SGD "
            f"momentum 0.9, eta = {ETA}, {steps} steps of 128; steps-to cells are "
            "means over seeds of the first evaluation at or above the threshold "
            "(a seed that never gets there counts as 10x the run length in the "
            "ratios)."
        ),
        extra={"summary": summary},
    )


def _figure(ctx, steps_axis, curves, thresholds) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, acc in curves.items():
        ls = "-" if arm.startswith("BN") else "--"
        ax.plot(steps_axis, np.nanmean(acc, 1), ls, label=arm)
    ax.axhline(thresholds[2], color="k", lw=0.6, ls=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("Miniature of Ioffe & Szegedy Fig. 2/3")
    ax.legend(fontsize=7, ncol=2)
    ctx.save_figure(fig, "curves")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
