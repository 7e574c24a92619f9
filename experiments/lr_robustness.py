"""The "x30" claim: BN tolerates much higher learning rates (Ioffe & Szegedy
2015, arXiv:1502.03167, sec. 4.2.1-4.2.2: BN-x30 trains, the network without
BN does not at such rates).

A 6-layer ReLU MLP (He init), SGD with a cosine-decayed rate (the paper
decays its rates too, faster for BN-x5/x30), batch 128, with and without BN
before every activation: both are arms of one program (a gated
``bnlab.models.VariantMLP``; arms with one seed share their initial weights
and data order), each over its own learning-rate grid ``LRS`` (half decades,
the same size, each reaching from below its best to where it fails). Both
scales train for the same number of steps, not epochs: whether a high rate
settles within a point of the best is a matter of the number of updates
(probes: at 200 steps BN's usable rate was ~1 at quick scale, at 1200 steps
~3 at both scales). For the same reason the quick scale's 14x14 images are
multiplied by 2: with a quarter of the pixels their squared norm, which sets
the largest rate the first layer tolerates, would be 4x smaller than the
full scale's. Both arms search the same grid ``LRS`` (half decades, from
below the baseline's best to where BN fails: the same tuning budget). Per
seed, each arm's score at each rate is the mean validation accuracy of the
last 3 evaluations (an arm that diverged scores chance, 0.1); its *usable
rate* is the largest grid rate whose score is within ``WITHIN`` of its own
best (no interpolation: between a rate that trains and one that diverges
there is no measured score to interpolate). The criterion is BN's usable
rate over the baseline's, paired by seed; with one grid for both, a ratio
is a power of sqrt(10), and "at least 10x" means BN's usable rate is at
least two grid steps above the baseline's on (nearly) every seed. The
paper's "30x" is reported: BN at 30x the baseline's chosen rate (chosen on
validation, over seeds) against the baseline at its rate, on the test set.

    python -m experiments.lr_robustness [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optax

import bnlab.linen
from bnlab.models import VariantMLP, set_gates
from experiments import protocol as P

NAME = "lr_robustness"
CLAIM = (
    "(e) BN allows much higher learning rates (the paper's BN-x30): the range of "
    "rates that train within a point of the best is at least 10x wider with BN."
)
GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
LRS = {0.0: GRID, 1.0: GRID}  # baseline, BN: the same grid
CHANCE = 0.1
ARMS = {"baseline": 0.0, "bn": 1.0}  # arm -> its `bn` gate
LABELS = {"baseline": "without BN", "bn": "with BN"}
WITHIN = 0.01
FULL_PIXELS = 28 * 28
RANGE = 10.0
CRITERIA = [
    P.Criterion(
        "usable_range",
        f"largest lr within {WITHIN:g} of the arm's own best validation accuracy, BN / "
        "baseline (geometric mean of per-seed ratios)",
        ">=",
        RANGE,
        "Ioffe & Szegedy 2015 sec. 4.2.2: BN-x5 and BN-x30 train where the baseline's "
        "rate could not be raised; issue 16 fixes 'much higher' as >= 10x (one point "
        "of validation accuracy as 'usable')",
    ),
]
HISTORY = [
    {
        "date": "2026-12-01",
        "criterion": "the same ratio >= 10, with grids (0.03 ... 1) without and "
        "(0.3 ... 10) with BN, the usable rate interpolated in log lr up to the next "
        "grid rate (also when that rate diverged, scoring chance)",
        "result": "pilot at quick scale, seeds 0-4: 13.2 [9.56, 18.3], FAIL",
        "why": "a pre-run review: interpolating towards a diverged rate (score 0.1) "
        "moves the estimate by a different fraction of a grid step than between two "
        "rates that train, which favoured the arm that degrades gently (BN); "
        "different grids are unequal tuning budgets. Criterion unchanged",
    },
    {
        "date": "2026-12-01",
        "criterion": "the same ratio >= 10, trained for the same number of epochs as "
        "the full run (200 steps at quick scale), one grid (0.03 ... 10) for both "
        "arms, quick images unscaled, score = last 3 of 4 evaluations",
        "result": "pilot at quick scale, seeds 0-4: 6.64 [4.54, 9.70], FAIL; full-scale "
        "probes at 1200 steps: 23 (seed 0), 10 and 10 (seeds 1, 2)",
        "why": "whether a high rate settles within a point of the best depends on the "
        "number of updates (a probe at 500 steps gave ~10 at both scales) and on the "
        "squared input norm (4x smaller on 14x14 images): the quick run now matches "
        "the full run's steps and input norm, and its score is the end of the "
        "decayed run; each arm's own grid reaches from below its best to where it "
        "fails",
    },
    {
        "date": "2026-11-20",
        "criterion": "the baseline diverges at 10x its best lr (best chosen on final "
        "test accuracy) and BN at 30x reaches the baseline's best test accuracy - 0.01",
        "result": "PASS by 0.0004; the baseline's best lr (0.1 over 0.3) decided by "
        "0.4 "
        "points on the test set; quick (digits) FAIL: best 0.3, so '30x' was lr 10, "
        "where BN collapsed",
        "why": "issue 16: rates chosen on validation; each arm's usable range from its "
        "own best; a paired ratio with its interval; the 30x claim reported",
    },
]


def make_model(width: int, depth: int) -> VariantMLP:
    # BN is passed as VariantMLP's alternative normalization before the
    # activation (gate `alt_before`): with `norm` set, VariantMLP would also
    # compute an unused BN after every activation in every arm.
    return VariantMLP(
        (width,) * depth, 10, alt_norm=bnlab.linen.BatchNorm, init_scheme="he"
    )


def post_init(variables, hp):
    return set_gates(variables, alt_before=hp["bn"])


def final_test_accuracy(result, accuracy, hp: dict, seeds, data) -> np.ndarray:
    """Per seed, the test accuracy at the end of the arm with these
    hyper-parameters (0 where it diverged)."""
    idx = [
        next(a.index for a in result.arms if a.seed == s and a.hparams == hp)
        for s in seeds
    ]
    v = P.select_arms(result.variables, idx)
    stopped = np.array([result.stopped_at[i] is not None for i in idx])
    return np.where(stopped, 0.0, accuracy(v, data.x_test, data.y_test))


def nearest(lr: float, grid: tuple) -> int:
    return int(np.argmin(np.abs(np.log(np.asarray(grid)) - math.log(lr))))


def run(ctx: P.Context) -> P.Outcome:
    width, depth = ctx.pick(64, 128), 6
    data = ctx.data
    # the squared input norm of Fashion-MNIST's 784 pixels (see the docstring)
    gain = float(np.sqrt(FULL_PIXELS / data.x_train.shape[1]))
    if gain != 1.0:
        data = data._replace(
            x_train=data.x_train * gain,
            x_val=data.x_val * gain,
            x_test=data.x_test * gain,
        )
    steps = ctx.steps(1200, 1200)
    # the rate decays to 0: the plateau is the end of the run, so the last 3
    # evaluations (of which the score is the mean) lie in its last quarter
    every = ctx.every(100, 100)
    settings = [{"bn": b, "lr": lr} for b, grid in LRS.items() for lr in grid]
    model = make_model(width, depth)
    result = ctx.fit(
        "arms",
        model,
        hparams=settings,
        optimizer=lambda hp: optax.sgd(optax.cosine_decay_schedule(hp["lr"], steps)),
        post_init=post_init,
        # no dropout: without RNG streams VariantMLP draws no dropout masks
        rng_streams=(),
        steps=steps,
        batch_size=128,
        eval_every=every,
        # the test set only reports: evaluated once, at the end
        data=data._replace(x_test=None, y_test=None),
    )
    score, diverged, use, tuned = {}, {}, {}, {}
    for a, b in ARMS.items():
        score[a], diverged[a] = P.plateau_scores(result, {"bn": b}, CHANCE)
        use[a] = P.usable_rate(score[a], LRS[b], WITHIN)
        tuned[a] = P.tune(result, where={"bn": b}, report="val_accuracy")
    base_lr = tuned["baseline"].value
    bn_grid = LRS[ARMS["bn"]]
    i30 = nearest(30 * base_lr, bn_grid)
    accuracy = P.make_accuracy(model)
    test = {
        name: final_test_accuracy(result, accuracy, hp, ctx.seeds, data)
        for name, hp in (
            ("bn30", {"bn": ARMS["bn"], "lr": bn_grid[i30]}),
            ("baseline", {"bn": ARMS["baseline"], "lr": base_lr}),
        )
    }
    measured = {"usable_range": P.ratio_ci(use["bn"], use["baseline"])}
    censored = {a: int(np.sum(use[a] >= GRID[-1])) for a in ARMS}
    if censored["baseline"]:  # its true usable rate is unknown: no ratio
        measured["usable_range"] = P.Measured(
            math.nan,
            -math.inf,
            math.inf,
            tuple(use["baseline"]),
            f"{censored['baseline']} baseline seed(s) usable at the top of the grid: "
            "no ratio can be measured",
        )
    elif censored["bn"]:
        measured["usable_range"] = dataclasses.replace(
            measured["usable_range"],
            note=f"{censored['bn']} BN seed(s) usable at the top of the grid: counted "
            "there (a lower bound)",
        )
    reported = {
        "BN's usable lr / the baseline's chosen lr (geometric mean over seeds)": (
            P.ratio_ci(use["bn"], np.full(len(ctx.seeds), base_lr))
        ),
        f"BN at {bn_grid[i30] / base_lr:.3g}x the baseline's chosen lr (lr "
        f"{bn_grid[i30]:g}) - the baseline at its chosen lr: test accuracy (paired "
        "by seed)": P.paired_ci(
            test["bn30"], test["baseline"], note="a diverged arm counts as accuracy 0"
        ),
    }
    table = []
    for a, b in ARMS.items():
        for i, lr in enumerate(LRS[b]):
            table.append(
                {
                    "arm": LABELS[a],
                    "lr": lr,
                    "validation accuracy per seed (last 3 evaluations)": " / ".join(
                        "div" if d else f"{v:.3f}"
                        for v, d in zip(score[a][i], diverged[a][i], strict=True)
                    ),
                }
            )
        table.append(
            {
                "arm": LABELS[a],
                "lr": "usable (largest within a point of its best)",
                "validation accuracy per seed (last 3 evaluations)": " / ".join(
                    f"{v:.3g}" for v in use[a]
                ),
            }
        )
    records = [
        {
            "arm": a,
            "lr": lr,
            "seed": s,
            "validation_score": score[a][i, j],
            "diverged": bool(diverged[a][i, j]),
            "usable_lr": use[a][j],
        }
        for a, b in ARMS.items()
        for i, lr in enumerate(LRS[b])
        for j, s in enumerate(ctx.seeds)
    ]
    figure = _figure(ctx, score, use, base_lr)
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        reported=reported,
        notes=(
            f"{ctx.data_name} (pixels x {gain:g}); MLP {depth} x {width}, ReLU, He "
            "init; SGD with the "
            f"rate cosine-decayed to 0, {steps} steps of 128, validation every "
            f"{every} steps; lr grid {GRID} for both arms. "
            f"'div' = the arm stopped (non-finite loss; it scores chance, {CHANCE:g}). "
            f"The baseline's chosen lr (validation, over seeds): {base_lr:g}; BN's: "
            f"{tuned['bn'].value:g}."
        ),
    )


def _figure(ctx, score, use, base_lr) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a, color in (("baseline", "tab:gray"), ("bn", "tab:blue")):
        grid, s, label = LRS[ARMS[a]], score[a], LABELS[a]  # diverged: chance
        ax.plot(grid, s.mean(1), "o-", color=color, label=label)
        ax.fill_between(grid, s.min(1), s.max(1), color=color, alpha=0.2)
        ax.axvline(
            float(np.exp(np.mean(np.log(use[a])))),
            color=color,
            ls="--",
            lw=0.8,
            label=f"{label}: usable lr (geometric mean)",
        )
    ax.axvline(30 * base_lr, color="k", ls=":", lw=0.8, label="30x baseline's lr")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD)")
    ax.set_ylabel(f"validation accuracy, last 3 evaluations (diverged = {CHANCE:g})")
    ax.set_title("Learning-rate sweep (band: min-max over seeds)")
    ax.legend(fontsize=7)
    return ctx.save_figure(fig, "lr_sweep")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
