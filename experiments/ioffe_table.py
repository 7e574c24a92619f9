"""A miniature of Ioffe & Szegedy 2015 (arXiv:1502.03167), Figures 2 and 3
(the Inception table): steps to reach the baseline's accuracy, for the
paper's arms.

A 6-layer MLP (He init), SGD with momentum 0.9, batch 128. Arms, as in the
paper: Baseline (ReLU, no BN, its learning rate eta chosen on validation
from a grid), BN-Baseline (BN before every activation, eta), BN-x5 (5 eta),
BN-x30 (30 eta), BN-x5-Sigmoid (sigmoid with BN, 5 eta), and the sigmoid
network without BN, which gets its own grid (so that "does not train" is not
a matter of its rate). Both grids extend past an edge their choice sits on
(:meth:`protocol.Context.fit_grid`, the same rule for both). Two programs of gated ``bnlab.models.VariantMLP``
arms (the BN arms' rates depend on the baseline's choice); arms with one seed
share their initial weights and data order.

Steps to a validation-accuracy threshold fixed as a fraction
(``THRESHOLD_FRACTION``) of the tuned Baseline's validation plateau (mean of
its last 3 evaluations over seeds), per seed, as ratios paired by seed.
Censoring, stated: in a ratio ``a / b``, a seed of ``b`` that never reaches
the threshold counts as the run length (a lower bound: the ratio can only be
smaller in truth); a seed of ``a`` that never reaches it makes the ratio
infinite (a ``<`` criterion fails). Accuracies are test accuracies at the end
of training (the test set only reports). ``THRESHOLD_FRACTION`` (0.95,
registered before any run) is a free constant: the two steps-ratio checks
also report their outcome at 0.9 and 0.99.

    python -m experiments.ioffe_table [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np
import optax

import bnlab.linen
from bnlab.models import VariantMLP, set_gates
from experiments import exact as X
from experiments import protocol as P

NAME = "ioffe_table"
CLAIM = (
    "(e) BN reaches a given accuracy in fewer steps, more so at 5x its "
    "learning rate, and trains a sigmoid network that, on most seeds, does not "
    "train without it (Ioffe & Szegedy 2015, Fig. 2-3)."
)
DEPTH = 6
# the two networks without BN, each its own grid of the same size
LRS = {"Baseline": (0.01, 0.03, 0.1), "Sigmoid": (0.1, 0.3, 1.0)}
# BN arms: (sigmoid, multiple of the Baseline's chosen rate)
BN_ARMS = {
    "BN-Baseline": (0.0, 1.0),
    "BN-x5": (0.0, 5.0),
    "BN-x30": (0.0, 30.0),
    "BN-x5-Sigmoid": (1.0, 5.0),
}
THRESHOLD_FRACTION = 0.95
FRACTION_NEIGHBOURS = (0.9, 0.99)  # the sensitivity row's values
LR_LIMITS = (1e-3, 3.0)  # the equal-tuning rule's limits on an extended grid
CHANCE = 0.1
CHANCE_MARGIN = 0.05
MAJORITY = 0.5
# A share of seeds has an exact interval: 0 of 5 seeds leaves its upper end at
# 0.52 > MAJORITY (no outcome but INCONCLUSIVE); 0 of 6 gives 0.46. The power
# plan asks for at least this many.
MIN_SEEDS = 6
SIGMOID_SHARE = 0.9
CRITERIA = [
    P.Criterion(
        "bn_faster",
        f"steps to {THRESHOLD_FRACTION:g} x the Baseline's validation plateau, "
        "BN-Baseline / Baseline (geometric mean of per-seed ratios)",
        "<",
        1.0,
        "Ioffe & Szegedy 2015 Fig. 2-3: BN-Baseline reaches Inception's accuracy in "
        "fewer steps (13.3M vs 31.0M)",
        null=1.0,
    ),
    P.Criterion(
        "more_so_at_5x",
        "the same steps, BN-x5 / BN-Baseline (geometric mean of per-seed ratios)",
        "<",
        1.0,
        "Ioffe & Szegedy 2015 Fig. 3: BN-x5 needs fewer steps than BN-Baseline "
        "(2.1M vs 13.3M)",
        null=1.0,
    ),
    P.Criterion(
        "sigmoid_without_bn",
        "share of seeds on which the sigmoid network without BN trains (test "
        f"accuracy at its chosen rate > chance + {CHANCE_MARGIN:g}), with its exact "
        "Clopper-Pearson 95% interval (a network that does not train predicts one "
        "class: its accuracy ties at chance, so a count, not a t interval)",
        "<",
        MAJORITY,
        "Ioffe & Szegedy 2015 sec. 4.2.2: without BN the sigmoid Inception never "
        f"exceeded chance; chance here is {CHANCE:g}; 'does not train' as most "
        "seeds (a binomial test against 0.5); CONTRADICTED when the whole interval "
        "lies above 0.5 (most seeds train)",
    ),
    P.Criterion(
        "sigmoid_with_bn",
        "test accuracy, BN-x5-Sigmoid / Baseline (geometric mean of per-seed ratios)",
        ">=",
        SIGMOID_SHARE,
        "Ioffe & Szegedy 2015 Fig. 3: BN-x5-Sigmoid 69.8% vs Inception's 72.2% "
        f"(0.967 of it); at least {SIGMOID_SHARE:g} of the Baseline",
    ),
]
HISTORY = [
    {
        "date": "2026-12-05",
        "criterion": "this design (full-scale pilot, for the power plan)",
        "pilot": "full-2500",
        "why": "pilot of the design registered next; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946: sigmoid_without_bn as a t "
        "interval of the test accuracy, <= chance + 0.05",
        "run": "superseded/full-6e0f946",
        "why": "the review of issue 21 (written before this result existed, "
        "docs/reproduction.md at 685662f): a network that does not train scores "
        "exactly chance on every seed, and a t interval on tied values has zero "
        "width (the quick run's 0.1 [0.1, 0.1] SUPPORTED, against the full run's "
        "CONTRADICTED); 'does not train' is a count of seeds, now judged with an "
        "exact Clopper-Pearson interval against a majority. The other checks are "
        "unchanged",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946 (pilot)",
        "pilot": "quick-100",
        "why": "pilot of that design; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "the same criteria and threshold fraction 0.95; the two grids "
        "without BN fixed (both chose their bottom edge at full scale); no "
        "sensitivity row; no null for the steps ratios",
        "pilot": "full-1000",
        "why": "issue 21: the verdict of the steps-ratio checks flipped with the "
        "threshold fraction (0.95 FAIL, 0.99 and 1.00 PASS on the same run), so its "
        "outcome at 0.9 and 0.99 is now reported beside it (0.95 stays registered); "
        "grids extend past a chosen edge for both networks without BN (equal "
        "tuning); null 1 so that CONTRADICTED means BN is slower",
    },
    {
        "date": "2026-12-01",
        "criterion": "the same criteria, 400 steps at quick scale, grids of 4 rates",
        "result": "pilot at quick scale, seeds 0-4: bn_faster 0.977 [0.738, 1.29] "
        "FAIL, "
        "more_so_at_5x 1.13 [0.861, 1.48] FAIL, sigmoid_without_bn 0.1 PASS, "
        "sigmoid_with_bn 0.971 [0.937, 1.01] PASS",
        "why": "not a change of criterion: 300 steps and grids of 3 rates (the "
        "choices were interior) to fit the quick budget; a full-scale probe (2 "
        "seeds) gave the same picture (BN-Baseline and BN-x5 no faster than the "
        "Baseline)",
    },
    {
        "date": "2026-11-20",
        "criterion": "steps to 0.87 test accuracy (digits at quick scale: 0.94), "
        "BN-x5 / Baseline <= 0.6 and BN-Baseline / Baseline <= 0.75 (a seed that "
        "never gets there counted as 10x the run length); max test accuracy of "
        "sigmoid without BN (x5) <= 0.15, of BN-x5-Sigmoid >= 0.85; eta = 0.01 "
        "for all, 3 seeds, means",
        "result": "PASS with BN-x5 / Baseline = 0.14, which existed only because one "
        "Baseline seed peaked at 0.8694 against 0.87 and counted as 30000 steps "
        "(without it 0.61, FAIL); held-out seeds 0.55 and 0.61; quick scale ratio 1.0",
        "why": "issue 16: the threshold comes from the tuned Baseline's validation "
        "plateau, rates are chosen on validation, censoring is stated, ratios are "
        "paired by seed with intervals, and the claim's 'more so at 5x' is checked",
    },
]


def make_model(width: int) -> VariantMLP:
    # BN is passed as VariantMLP's alternative normalization before the
    # activation (gate `alt_before`): with `norm` set, VariantMLP would also
    # compute an unused BN after every activation in every arm.
    return VariantMLP(
        (width,) * DEPTH, 10, alt_norm=bnlab.linen.BatchNorm, init_scheme="he"
    )


def post_init(variables, hp):
    return set_gates(variables, alt_before=hp["bn"], sigmoid=hp["sigmoid"])


def arm_indices(result, hparams: dict, seeds) -> list[int]:
    """Indices of the arms with exactly these hyper-parameters, in seed order."""
    return [
        next(a.index for a in result.arms if a.seed == s and a.hparams == hparams)
        for s in seeds
    ]


def fit_with(results: list, hparams: dict):
    """The fit (of ``results``) whose arms include these hyper-parameters
    (an arm's seeds are all in one fit)."""
    for r in results:
        if any(a.hparams == hparams for a in r.arms):
            return r
    raise KeyError(hparams)


def run(ctx: P.Context) -> P.Outcome:
    data = ctx.data
    width = ctx.pick(64, 128)
    steps = ctx.steps(300, 2000, 20)
    # a multiple or divisor of fit's 100-step chunks: one compiled chunk length
    every = ctx.every(20, 100, 5)
    model = make_model(width)
    common = dict(
        optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        post_init=post_init,
        # no dropout: without RNG streams VariantMLP draws no dropout masks
        rng_streams=(),
        steps=steps,
        batch_size=128,
        eval_every=every,
        # the test set only reports: evaluated once, at the end
        data=data._replace(x_test=None, y_test=None),
    )
    no_bn = ctx.fit_grid(
        "without_bn",
        model,
        arms=[{"bn": 0.0, "sigmoid": float(arm == "Sigmoid")} for arm in LRS],
        grid=lambda a: LRS["Sigmoid" if a["sigmoid"] else "Baseline"],
        limits=LR_LIMITS,
        **common,
    )
    tuned = {
        arm: no_bn.tune(
            where={"bn": 0.0, "sigmoid": float(arm == "Sigmoid")},
            report="val_accuracy",
        )
        for arm in LRS
    }
    eta = tuned["Baseline"].value
    with_bn = ctx.fit(
        "with_bn",
        model,
        hparams=[
            {"bn": 1.0, "sigmoid": sig, "lr": mult * eta}
            for sig, mult in BN_ARMS.values()
        ],
        **common,
    )
    eval_steps, _ = no_bn.curve("val_accuracy")
    hp = {
        "Baseline": {"bn": 0.0, "sigmoid": 0.0, "lr": eta},
        "Sigmoid": {"bn": 0.0, "sigmoid": 1.0, "lr": tuned["Sigmoid"].value},
        **{
            arm: {"bn": 1.0, "sigmoid": sig, "lr": mult * eta}
            for arm, (sig, mult) in BN_ARMS.items()
        },
    }
    results = {
        arm: fit_with(no_bn.results if arm in LRS else [with_bn], hp[arm]) for arm in hp
    }
    idx = {arm: arm_indices(results[arm], hp[arm], ctx.seeds) for arm in hp}
    curves = {
        arm: results[arm].curve("val_accuracy")[1][:, idx[arm]] for arm in hp
    }  # (evals, seeds)
    plateau = float(tuned["Baseline"].val[tuned["Baseline"].index])

    def steps_at(fraction: float) -> dict:
        return {
            arm: [
                P.steps_to(eval_steps, curves[arm][:, i], fraction * plateau)
                for i in range(len(ctx.seeds))
            ]
            for arm in hp
        }

    fractions = sorted({THRESHOLD_FRACTION, *FRACTION_NEIGHBOURS})
    to_at = {f: steps_at(f) for f in fractions}
    to = to_at[THRESHOLD_FRACTION]
    threshold = THRESHOLD_FRACTION * plateau
    accuracy = P.make_accuracy(model)
    test = {
        arm: accuracy(
            P.select_arms(results[arm].variables, idx[arm]), data.x_test, data.y_test
        )
        for arm in hp
    }
    # a stopped (diverged) arm keeps its last finite state; count it at chance
    for arm in hp:
        stopped = [results[arm].stopped_at[i] is not None for i in idx[arm]]
        test[arm] = np.where(stopped, CHANCE, test[arm])

    def ratio(a, b, fraction=THRESHOLD_FRACTION):
        r, never_a, never_b = P.steps_ratio(
            to_at[fraction][a], to_at[fraction][b], steps
        )
        return P.ratio_ci(
            r,
            np.ones(len(r)),
            note=f"{a} never reached it: {never_a} seed(s) (ratio infinite); "
            f"{b} never reached it: {never_b} (counted as {steps} steps)",
        )

    measured = {
        "bn_faster": ratio("BN-Baseline", "Baseline"),
        "more_so_at_5x": ratio("BN-x5", "BN-Baseline"),
        "sigmoid_without_bn": X.share_above(
            test["Sigmoid"], CHANCE + CHANCE_MARGIN, "train"
        ),
        "sigmoid_with_bn": P.ratio_ci(test["BN-x5-Sigmoid"], test["Baseline"]),
    }
    n = len(ctx.seeds)

    def outcome_at(c_id: str, a: str, b: str) -> P.Sensitivity:
        c = next(c for c in CRITERIA if c.id == c_id)

        def at(f: float) -> str:
            m = ratio(a, b, f)
            return P.decide(m.low, m.high, c.op, c.at(ctx.scale), c.null, n).outcome

        return P.Sensitivity(
            "THRESHOLD_FRACTION (of the Baseline's validation plateau)",
            THRESHOLD_FRACTION,
            P.sensitivity(at, THRESHOLD_FRACTION, FRACTION_NEIGHBOURS),
        )

    def trains_at(margin: float) -> str:
        m = X.share_above(test["Sigmoid"], CHANCE + margin, "train")
        return P.decide(m.low, m.high, "<", MAJORITY, None, n).outcome

    sensitivity = {
        "sigmoid_without_bn": P.Sensitivity(
            "chance margin (trains: accuracy > 0.1 + margin)",
            CHANCE_MARGIN,
            P.sensitivity(trains_at, CHANCE_MARGIN, [0.02, 0.1]),
        ),
        "bn_faster": outcome_at("bn_faster", "BN-Baseline", "Baseline"),
        "more_so_at_5x": outcome_at("more_so_at_5x", "BN-x5", "BN-Baseline"),
    }
    reported = {
        "steps to the threshold, BN-x5 / Baseline": ratio("BN-x5", "Baseline"),
        "steps to the threshold, BN-x30 / Baseline": ratio("BN-x30", "Baseline"),
        "test accuracy, BN-x30 - Baseline (paired by seed)": P.paired_ci(
            test["BN-x30"], test["Baseline"]
        ),
    }
    table = []
    for arm in hp:
        table.append(
            {
                "arm": arm,
                "lr": hp[arm]["lr"],
                "lr chosen from (validation)": ", ".join(
                    f"{lr:g}: {v:.3f}"
                    for lr, v in zip(tuned[arm].grid, tuned[arm].val, strict=True)
                )
                + ("; chosen at the grid's edge" if "edge" in tuned[arm].text() else "")
                if arm in tuned
                else f"{hp[arm]['lr'] / eta:g} x Baseline's",
                f"steps to {threshold:.3f} (validation), per seed": ", ".join(
                    "never" if s is None else str(s) for s in to[arm]
                ),
                "test accuracy at the end (95% interval)": P.fmt(P.mean_ci(test[arm])),
            }
        )
    records = [
        {
            "arm": arm,
            "seed": s,
            "lr": hp[arm]["lr"],
            "steps_to_threshold": to[arm][i],
            "threshold": threshold,
            "test_accuracy": test[arm][i],
        }
        for arm in hp
        for i, s in enumerate(ctx.seeds)
    ]
    figure = _figure(ctx, eval_steps, curves, threshold)
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        reported=reported,
        sensitivity=sensitivity,
        notes=(
            f"{ctx.data_name}; MLP {DEPTH} x {width}, He init; SGD momentum 0.9, "
            f"{steps} steps of 128, validation every {every} steps. Rates chosen on "
            f"validation: Baseline eta = {tuned['Baseline'].text()} from "
            f"{tuned['Baseline'].grid}, sigmoid without BN "
            f"{tuned['Sigmoid'].text()} from {tuned['Sigmoid'].grid} (grids "
            f"{LRS['Baseline']} and {LRS['Sigmoid']}, "
            + (
                f"extended past a chosen edge: {no_bn.extensions}"
                if no_bn.extensions
                else "not extended: both choices interior"
            )
            + "). "
            f"Threshold {THRESHOLD_FRACTION:g} x the Baseline's validation plateau "
            f"({plateau:.3f}). A diverged arm's test accuracy counts as chance."
        ),
    )


def _figure(ctx, eval_steps, curves, threshold) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, c in curves.items():
        ls = "-" if arm.startswith("BN") else "--"
        ax.plot(eval_steps, np.nanmean(c, 1), ls, label=arm)
    ax.axhline(threshold, color="k", lw=0.6, ls=":", label="threshold")
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.set_title("Miniature of Ioffe & Szegedy Fig. 2/3")
    ax.legend(fontsize=7, ncol=2)
    return ctx.save_figure(fig, "curves")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
