"""Claim (d): at test time use statistics accumulated during training, not
the test batch's; and how good running averages (EMA) are depends on
momentum and training length (Wu & Johnson 2021, arXiv:2105.07576).

A 3-layer ReLU MLP (He init) with BN before every activation, SGD with
momentum 0.9 at lr 0.05 (one fixed rate: the arms compared here are ways to
evaluate the same trained network, not networks to tune), batch 128, BN
momentum ``MOMENTA`` (Flax's convention: the weight of the old value) as
arms of one program (the momentum is passed per arm at each step; it does
not change the training trajectory, only the running averages), checkpoints
every ``SHORT`` steps. At ``SHORT`` steps and at the end, the test accuracy
of each network evaluated with:

- its running averages (EMA);
- population statistics recomputed over ``POP_BATCHES`` training batches of
  256 with the weights frozen (``bnlab.precise_stats``, PreciseBN);
- each test batch's own statistics, at test batch sizes ``TEST_BATCHES``.

    python -m experiments.inference_stats [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab
import bnlab.linen
from bnlab.train import load
from experiments import exact as X
from experiments import protocol as P

NAME = "inference_stats"
CLAIM = (
    "(d) At test time use statistics accumulated in training: per-batch "
    "statistics fail for small test batches, and population statistics beat "
    "lagging running averages."
)
TEST_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MOMENTA = (0.9, 0.999)
SHORT = 200
POP_BATCHES = 100
LR = 0.05
NOT_WORSE = 0.005
LAG_GAP = 0.05
CRITERIA = [
    P.Criterion(
        "batch_of_one",
        "test accuracy with each test batch's own statistics at test batch size 1, "
        "the best of the (momentum, length) cells per seed, on the worst seed (an "
        "identity on every seed: experiments.exact.every_seed; the accuracies tie "
        "at chance, where a t interval has no width to speak of)",
        "<=",
        0.15,
        "a batch of one normalizes every feature to 0 (BN outputs beta): the "
        "prediction is constant, chance (0.1) on balanced classes; plus 0.05",
    ),
    P.Criterion(
        "population_not_worse",
        "population statistics - EMA: test accuracy, the worst (momentum, length) "
        "cell per seed",
        ">=",
        -NOT_WORSE,
        "population statistics are what the EMA estimates (the lecture: use "
        "statistics accumulated in training); never worse beyond half a point, "
        "fixed before the run",
    ),
    P.Criterion(
        "lagging_ema",
        f"population statistics - EMA with momentum {MOMENTA[-1]} after {SHORT} "
        "steps: test accuracy (paired by seed)",
        ">=",
        LAG_GAP,
        f"Wu & Johnson 2021 sec. 3 (EMA lags the weights): after {SHORT} steps an EMA "
        f"of momentum {MOMENTA[-1]} still weighs its initial value (0, 1) by "
        f"{MOMENTA[-1] ** SHORT:.2f}; the earlier design's 5 points, kept",
        null=0.0,
    ),
]
HISTORY = [
    {
        "date": "2026-11-20",
        "criterion": "batch statistics at test batch size 1 <= 0.15 on every run; "
        "population >= EMA - 0.001 in every cell (means); momentum 0.999 after 200 "
        "steps: population - EMA >= 0.05; 3 seeds, quick scale on digits",
        "result": "PASS",
        "why": "issue 16: intervals over 5 seeds, paired by seed, Fashion-MNIST at "
        "both scales; the margin of 0.001 (ten test images of 10k) is now half a "
        "point on an interval of per-seed worst cells",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946: batch_of_one as a t "
        "interval of the per-seed accuracies",
        "run": "superseded/full-6e0f946",
        "why": "the second review of issue 21: the per-seed accuracies tie at "
        "chance (two values, 0.10006 and 0.10016), and a t interval on tied values "
        "is the statistic the issue rules out; the claim is an identity (a batch "
        "of one outputs beta), judged on its worst seed (experiments.exact."
        "every_seed); the other checks are unchanged.",
    },
]


class BNMLP(nn.Module):
    """Dense -> BN -> ReLU blocks whose BN momentum is a call argument (so
    that it can differ per arm of one program)."""

    widths: tuple[int, ...]
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x, train: bool, momentum=MOMENTA[0]):
        x = x.reshape((x.shape[0], -1))
        for width in self.widths:
            x = nn.Dense(width, kernel_init=nn.initializers.he_normal())(x)
            x = bnlab.linen.BatchNorm(use_running_average=not train, momentum=momentum)(
                x
            )
            x = nn.relu(x)
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.he_normal())(x)


def evaluators(model: BNMLP):
    """``evaluate(v, population, x, y)`` -> correct test predictions per arm
    with the running averages, with the population statistics and with each
    test batch's own statistics at every size of TEST_BATCHES (one compiled
    program over a leading axis of arms); and the train-mode apply of every
    arm at once, for ``bnlab.precise_stats``."""

    def correct(logits, y):
        return jnp.sum(jnp.argmax(logits, -1) == y)

    def one(vi, pop, x, y):
        out = {
            "ema": correct(model.apply(vi, x, train=False), y),
            "population": correct(
                model.apply({**vi, "batch_stats": pop}, x, train=False), y
            ),
        }
        out["batch"] = {}
        for b in TEST_BATCHES:  # each batch of b with its own statistics

            def batch(xi, vi=vi):
                logits, _ = model.apply(vi, xi, train=True, mutable=["batch_stats"])
                return logits

            logits = jax.vmap(batch)(x.reshape(-1, b, x.shape[-1]))
            out["batch"][b] = correct(logits.reshape(len(x), -1), y)
        return out

    evaluate = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))

    def run_train(v, x, mutable):
        return jax.vmap(lambda vi: model.apply(vi, x, train=True, mutable=mutable))(v)

    return evaluate, run_train


def run(ctx: P.Context) -> P.Outcome:
    data = ctx.data
    width = ctx.pick(64, 128)
    steps = ctx.steps(1000, 4000, 8)
    short = ctx.steps(SHORT, SHORT, 4)
    model = BNMLP((width,) * 3)
    ctx.fit(
        "arms",
        model,
        hparams=[{"bn_momentum": m, "lr": LR} for m in MOMENTA],
        optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        train_kwargs=lambda step, hp: {"momentum": hp["bn_momentum"]},
        steps=steps,
        batch_size=128,
        eval_every=short,
        checkpoint_every=short,
        keep_checkpoints=steps // short + 1,
    )
    evaluate, run_train = evaluators(model)
    n_pop = min(POP_BATCHES, len(data.x_train) // 256)
    pop_batches = [data.x_train[i * 256 : (i + 1) * 256] for i in range(n_pop)]
    x_te, y_te = data.x_test, data.y_test
    n_te = len(x_te) // max(TEST_BATCHES) * max(TEST_BATCHES)
    x_te, y_te = jnp.asarray(x_te[:n_te]), jnp.asarray(y_te[:n_te])
    cells = {}  # (momentum, steps) -> {"ema", "population", "batch": {b}} per seed
    for length in (short, steps):
        run_dir = load(ctx.out / "arms", step=length)
        v = run_dir.variables  # stacked over arms (a FitResult)
        population = bnlab.precise_stats(run_train, v, pop_batches)
        with warnings.catch_warnings():  # b = 1: BN warns that it outputs beta
            warnings.simplefilter("ignore")
            acc = jax.tree.map(
                lambda c: np.asarray(c) / n_te, evaluate(v, population, x_te, y_te)
            )
        position = {
            (a.hparams["bn_momentum"], a.seed): i for i, a in enumerate(run_dir.arms)
        }
        for m in MOMENTA:
            idx = [position[(m, seed)] for seed in ctx.seeds]
            cells[(m, length)] = jax.tree.map(lambda a, idx=idx: a[idx], acc)
    keys = list(cells)
    b1_best = np.max([cells[k]["batch"][1] for k in keys], axis=0)
    worst = np.min([cells[k]["population"] - cells[k]["ema"] for k in keys], axis=0)
    lag = cells[(MOMENTA[-1], short)]
    measured = {
        "batch_of_one": X.every_seed(b1_best, "best cell per seed"),
        "population_not_worse": P.mean_ci(worst),
        "lagging_ema": P.paired_ci(lag["population"], lag["ema"]),
    }
    reported = {
        f"population - EMA, momentum {m}, {length} steps (paired by seed)": P.paired_ci(
            cells[(m, length)]["population"], cells[(m, length)]["ema"]
        )
        for m, length in keys
    }
    table = []
    for m, length in keys:
        c = cells[(m, length)]
        row = {
            "BN momentum": m,
            "steps": length,
            "EMA": P.fmt(P.mean_ci(c["ema"])),
            "population": P.fmt(P.mean_ci(c["population"])),
        }
        for b in (1, 4, 16, 256):
            row[f"batch statistics, test batch {b}"] = P.fmt(P.mean_ci(c["batch"][b]))
        table.append(row)
    records = [
        {
            "bn_momentum": m,
            "steps": length,
            "seed": s,
            "ema": cells[(m, length)]["ema"][i],
            "population": cells[(m, length)]["population"][i],
            "batch_stats": {
                str(b): cells[(m, length)]["batch"][b][i] for b in TEST_BATCHES
            },
        }
        for m, length in keys
        for i, s in enumerate(ctx.seeds)
    ]
    figure = _figure(ctx, cells, (short, steps))
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        reported=reported,
        notes=(
            f"{ctx.data_name}; MLP 3 x {width} with BN, ReLU, He init; SGD momentum "
            f"0.9, lr {LR:g}, batch 128; population statistics over {n_pop} training "
            f"batches of 256; test accuracy on the first {n_te} test images (whole "
            "batches of every size). Cells in the table: mean [95% interval] over "
            "seeds."
        ),
    )


def _figure(ctx, cells, lengths) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(11, 3.8), sharey=True)
    for ax, length in zip(axes, lengths, strict=True):
        # the weights do not depend on the BN momentum (only the running
        # averages do): test-batch and population statistics are the same
        c = cells[(MOMENTA[0], length)]
        ax.plot(
            TEST_BATCHES,
            [c["batch"][b].mean() for b in TEST_BATCHES],
            "ko-",
            label="test-batch statistics",
        )
        ax.axhline(c["population"].mean(), color="k", ls=":", label="population")
        for m, color in zip(MOMENTA, ("tab:blue", "tab:orange"), strict=True):
            ax.axhline(
                cells[(m, length)]["ema"].mean(),
                color=color,
                ls="--",
                label=f"EMA, momentum {m}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("test batch size")
        ax.set_title(f"after {length} steps")
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    axes[-1].legend(fontsize=7)
    return ctx.save_figure(fig, "inference")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
