"""Claim (d): at test time use statistics accumulated during training, not
the test batch's; and how good running averages (EMA) are depends on
momentum and training length (Wu & Johnson 2021, arXiv:2105.07576).

3 x 128 ReLU MLP with BN on Fashion-MNIST (quick: digits, 3 x 64), SGD
momentum 0.9, lr 0.05, batch 128, BN momentum 0.9 and 0.999, after 200 and
4000 steps (quick: 200 and 1000). Test accuracy with: the running averages
(EMA); population statistics recomputed over 100 training batches of 256
with the weights frozen (bnlab.precise_stats); each test batch's own
statistics at test batch sizes 1..256.

Criteria: batch statistics at batch size 1 are at chance (<= 0.15); in every
(momentum, steps) cell population statistics are at least as good as EMA
(within 0.001, ten test images); EMA with momentum 0.999 after 200 steps is
>= 5 points worse than population statistics.

    python -m experiments.inference_stats [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bnlab
from experiments import _harness as H
from experiments._models import MLP, bn_factory

NAME = "inference_stats"
CLAIM = (
    "(d) At test time use statistics accumulated in training: per-batch "
    "statistics fail for small test batches, and population statistics beat "
    "lagging running averages."
)
TEST_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MOMENTA = (0.9, 0.999)


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    lengths = (ctx.steps(200, 200, 4), ctx.steps(1000, 4000, 8))
    seeds = list(range(ctx.seeds))
    data = ctx.data
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    rows = []
    n_pop = min(100, len(data.x_train) // 256)
    pop_batches = [
        jnp.asarray(data.x_train[i * 256 : (i + 1) * 256]) for i in range(n_pop)
    ]
    for momentum in MOMENTA:
        model = MLP(
            widths=(width,) * 3,
            activation="relu",
            norm="before",
            norm_layer=bn_factory(momentum),
        )

        def run_train(v, x, mutable, model=model):  # one per model: compiled once
            return model.apply(v, x, train=True, mutable=mutable)

        for steps in lengths:
            r = H.train_group(
                ctx,
                H.Group(
                    name=f"m{momentum}_s{steps}",
                    model=model,
                    seeds=seeds,
                    hparams={"lr": [0.05] * len(seeds)},
                    make_tx=H.momentum_sgd,
                    steps=steps,
                    batch_size=128,
                    eval_every=steps,
                    eval_at_zero=False,
                ),
            )

            for s in seeds:
                v = H.arm_slice(r.variables, s)
                ema = _accuracy(model, v, x_te, y_te)
                pop_stats = bnlab.precise_stats(run_train, v, pop_batches)
                pop = _accuracy(model, {**v, "batch_stats": pop_stats}, x_te, y_te)
                by_batch = {
                    b: _batch_stat_accuracy(model, v, x_te, y_te, b)
                    for b in TEST_BATCHES
                }
                rows.append(
                    {
                        "momentum": momentum,
                        "steps": steps,
                        "seed": s,
                        "ema": ema,
                        "population": pop,
                        "batch_stats": by_batch,
                    }
                )

    def cell(m, st, key):
        return [r[key] for r in rows if r["momentum"] == m and r["steps"] == st]

    b1 = [r["batch_stats"][1] for r in rows]
    pop_ge = {
        f"m={m}, {st} steps": (
            float(np.mean(cell(m, st, "population"))),
            float(np.mean(cell(m, st, "ema"))),
        )
        for m in MOMENTA
        for st in lengths
    }
    short = lengths[0]  # 200 steps (smoke: 4)
    gap = float(
        np.mean(cell(0.999, short, "population")) - np.mean(cell(0.999, short, "ema"))
    )
    checks = [
        H.check(
            "test accuracy with batch statistics at test batch size 1 (every run)",
            {"max": max(b1)},
            "<= 0.15 (chance)",
            max(b1) <= 0.15,
        ),
        H.check(
            "population statistics vs EMA, each cell (population, EMA)",
            pop_ge,
            "population >= EMA - 0.001 in every cell",
            all(p >= e - 0.001 for p, e in pop_ge.values()),
        ),
        H.check(
            f"momentum 0.999 after {short} steps: population - EMA",
            gap,
            ">= 0.05 (5 points)",
            gap >= 0.05,
        ),
    ]
    table = []
    for m in MOMENTA:
        for st in lengths:
            sel = [r for r in rows if r["momentum"] == m and r["steps"] == st]
            row = {
                "BN momentum": m,
                "steps": st,
                "EMA": H.fmt(*H.mean_spread([r["ema"] for r in sel])),
                "population": H.fmt(*H.mean_spread([r["population"] for r in sel])),
            }
            for b in (1, 4, 16, 256):
                row[f"batch stats, b={b}"] = H.fmt(
                    *H.mean_spread([r["batch_stats"][b] for r in sel])
                )
            table.append(row)
    _figure(ctx, rows, lengths)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        rows,
        table,
        ["inference.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 3 x {width}; "
            f"population statistics over {n_pop} training batches of 256. "
            "BN momentum in Flax's convention (weight of the old value)."
        ),
    )


def _accuracy(model, v, x, y) -> float:
    logits = _eval_fn(model)(v, x)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


_EVAL: dict = {}


def _eval_fn(model):
    if model not in _EVAL:
        _EVAL[model] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return _EVAL[model]


def _batch_stat_accuracy(model, v, x, y, b) -> float:
    import warnings

    n = (len(x) // b) * b
    key = (model, "batch")
    if key not in _EVAL:
        _EVAL[key] = jax.jit(
            jax.vmap(
                lambda v, xb: model.apply(v, xb, train=True, mutable=["batch_stats"])[
                    0
                ],
                in_axes=(None, 0),
            )
        )
    with warnings.catch_warnings():  # b = 1: BN warns that there are no statistics
        warnings.simplefilter("ignore")
        logits = _EVAL[key](v, x[:n].reshape(n // b, b, -1)).reshape(n, -1)
    return float(jnp.mean(jnp.argmax(logits, -1) == y[:n]))


def _figure(ctx, rows, lengths) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(11, 3.8), sharey=True)
    for ax, st in zip(axes, lengths, strict=True):
        for m, color in zip(MOMENTA, ("tab:blue", "tab:orange"), strict=True):
            sel = [r for r in rows if r["momentum"] == m and r["steps"] == st]
            bs = [np.mean([r["batch_stats"][b] for r in sel]) for b in TEST_BATCHES]
            ax.plot(TEST_BATCHES, bs, "o-", color=color, label=f"batch stats (m={m})")
            ax.axhline(
                np.mean([r["ema"] for r in sel]),
                color=color,
                ls="--",
                label=f"EMA (m={m})",
            )
            ax.axhline(
                np.mean([r["population"] for r in sel]),
                color=color,
                ls=":",
                label=f"population (m={m})",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test batch size")
        ax.set_title(f"after {st} steps")
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=7)
    ctx.save_figure(fig, "inference")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
