"""Ioffe & Szegedy 2015 (arXiv:1502.03167), Figure 1, on Fashion-MNIST:
BN speeds up training and keeps the distribution of a sigmoid's input
stable (less internal covariate shift).

784-100-100-100-10 sigmoid MLP, weights ~ N(0, 0.01^2), batch 60, SGD lr
0.1, 50k steps (quick: digits, 3000 steps), with and without BN before each
sigmoid. Recorded every evaluation: test accuracy, and the 15/50/85th
percentiles of the sigmoid inputs of the last hidden layer (units 0-9) on a
fixed set of test examples, in inference mode.

Drift of a unit = max - min over training of its median sigmoid input; a
network's drift = mean over the 10 units; compared as means over seeds.

    python -m experiments.ioffe_fig1 [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np
import optax

from bnlab.diagnostics import percentiles
from experiments import _harness as H
from experiments._models import MLP

NAME = "ioffe_fig1"
CLAIM = (
    "(e) BN speeds up convergence and stabilises the distribution of a "
    "sigmoid's input over training (Ioffe & Szegedy 2015, Fig. 1)."
)
THRESHOLD = 0.80
UNITS = 10
PROBE_EXAMPLES = 1000


def probe(model):
    def f(variables, hp, data):
        _, _, x_te, _ = data
        _, cols = model.apply(
            variables, x_te[:PROBE_EXAMPLES], train=False, mutable=["intermediates"]
        )
        z = cols["intermediates"]["last_sigmoid_input"][0][:, :UNITS]
        return percentiles(z, (15.0, 50.0, 85.0), axis=0)  # (3, UNITS)

    return f


def run(ctx: H.Context) -> dict:
    steps = ctx.steps(3000, 50_000)
    every = ctx.every(100, 500)
    seeds = list(range(ctx.seeds))
    results = {}
    for arm, norm in (("baseline", "none"), ("bn", "before")):
        model = MLP(
            widths=(100, 100, 100), activation="sigmoid", norm=norm, init_std=0.01
        )
        results[arm] = H.train_group(
            ctx,
            H.Group(
                name=arm,
                model=model,
                seeds=seeds,
                hparams={"lr": [0.1] * len(seeds)},
                make_tx=lambda hp: optax.sgd(hp["lr"]),
                steps=steps,
                batch_size=60,
                eval_every=every,
                probe=probe(model),
            ),
        )
    summary = {}
    for arm, r in results.items():
        to = [
            H.steps_to(r.steps, r.test_accuracy[:, i], THRESHOLD)
            for i in range(len(seeds))
        ]
        med = np.array(
            [np.asarray(p)[:, 1, :] for p in r.probes]
        )  # (evals, arms, units)
        drift = (med.max(0) - med.min(0)).mean(-1)  # per arm
        summary[arm] = {
            "steps_to_threshold": to,
            "final_accuracy": r.test_accuracy[-1].tolist(),
            "max_accuracy": np.nanmax(r.test_accuracy, 0).tolist(),
            "median_drift": drift.tolist(),
        }
    b, n = summary["bn"], summary["baseline"]
    never = (
        steps * 10
    )  # a run that never reaches the threshold counts as later than the end
    t_b = np.mean([s if s is not None else never for s in b["steps_to_threshold"]])
    t_n = np.mean([s if s is not None else never for s in n["steps_to_threshold"]])
    acc_gap = float(np.mean(b["final_accuracy"]) - np.mean(n["final_accuracy"]))
    drift_ratio = float(np.mean(n["median_drift"]) / np.mean(b["median_drift"]))
    checks = [
        H.check(
            f"steps to {THRESHOLD:.2f} test accuracy, BN / baseline (mean over seeds)",
            {
                "bn": b["steps_to_threshold"],
                "baseline": n["steps_to_threshold"],
                "ratio": t_b / t_n,
            },
            "<= 1/5 (a run that never gets there counts as 10x the run length)",
            t_b <= t_n / 5,
        ),
        H.check(
            "final test accuracy, BN - baseline (mean over seeds)",
            acc_gap,
            ">= 0.005 (0.5 points)",
            acc_gap >= 0.005,
        ),
        H.check(
            "drift of the median sigmoid input, baseline / BN",
            {
                "ratio": drift_ratio,
                "bn": b["median_drift"],
                "baseline": n["median_drift"],
            },
            ">= 2",
            drift_ratio >= 2,
        ),
    ]
    table = [
        {
            "arm": arm,
            f"steps to {THRESHOLD}": ", ".join(
                "never" if s is None else str(s)
                for s in summary[arm]["steps_to_threshold"]
            ),
            "final test accuracy": H.fmt(
                *H.mean_spread(summary[arm]["final_accuracy"])
            ),
            "max test accuracy": H.fmt(*H.mean_spread(summary[arm]["max_accuracy"])),
            "median drift": H.fmt(*H.mean_spread(summary[arm]["median_drift"])),
        }
        for arm in ("baseline", "bn")
    ]
    records = [
        {
            "arm": arm,
            "step": s,
            "test_accuracy": r.test_accuracy[i],
            "train_loss": r.train_loss[i],
            "percentiles_unit0": np.asarray(r.probes[i])[:, :, 0],
        }
        for arm, r in results.items()
        for i, s in enumerate(r.steps)
    ]
    _figure(ctx, results)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["fig1.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, {steps} steps, "
            f"evaluation every {every} steps; percentiles on the first "
            f"{PROBE_EXAMPLES} test examples in inference mode."
        ),
        extra={"summary": summary},
    )


def _figure(ctx: H.Context, results: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arm, color in (("baseline", "tab:gray"), ("bn", "tab:blue")):
        r = results[arm]
        acc = r.test_accuracy
        axes[0].plot(
            r.steps,
            np.nanmean(acc, 1),
            color=color,
            label="with BN" if arm == "bn" else "without BN",
        )
        axes[0].fill_between(
            r.steps, np.nanmin(acc, 1), np.nanmax(acc, 1), color=color, alpha=0.2
        )
    axes[0].axhline(THRESHOLD, color="k", lw=0.6, ls=":")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("(a) test accuracy (band: min-max over seeds)")
    axes[0].legend()
    for ax, arm, title in (
        (axes[1], "baseline", "(b) without BN"),
        (axes[2], "bn", "(c) with BN"),
    ):
        r = results[arm]
        p = np.array([np.asarray(q)[0, :, 0] for q in r.probes])  # seed 0, unit 0
        for k, style in zip(range(3), (":", "-", ":"), strict=True):
            ax.plot(r.steps, p[:, k], "k" + style)
        ax.set_title(f"{title}: sigmoid input, 15/50/85th pct")
        ax.set_xlabel("training step")
    ctx.save_figure(fig, "fig1")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
