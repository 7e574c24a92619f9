"""Ioffe & Szegedy 2015 (arXiv:1502.03167), Figure 1, on Fashion-MNIST:
BN speeds up training and keeps the distribution of a sigmoid's input
stable over training (less internal covariate shift).

The paper's own setup (sec. 4.1): an MLP with 3 hidden layers of 100
sigmoid units, weights initialized with small random Gaussian values (here
N(0, 0.01^2)), plain SGD, 60 examples per mini-batch; with and without BN
before each sigmoid. It is not the protocol's He init on purpose: the claim
is about this setup. Both arms are one program (a gated
``bnlab.models.VariantMLP``: arms with one seed share their initial weights
and data order), each with its own learning-rate grid, chosen on validation
(mean of the last 3 evaluations, over seeds) and extended past an edge its
choice sits on (:meth:`protocol.Context.fit_grid`, the same rule for both). Run length:
the paper's 50,000 steps of 60 at full scale (evaluated every 500 steps);
1000 steps at quick scale, where the baseline is still escaping its initial
plateau, so both claims are NOT TESTABLE there by their premise: the
training they describe (to the plateau) has not happened.

Measured at each arm's chosen rate, per seed:

- steps to a validation-accuracy threshold fixed as a fraction
  (``THRESHOLD_FRACTION``) of the tuned baseline's validation plateau, BN /
  baseline. Censoring, stated: a baseline seed that never reaches the
  threshold counts as the run length (a lower bound of its steps: the ratio
  can only be smaller in truth); a BN seed that never reaches it makes its
  ratio infinite (the criterion fails). The claim is "at least twice as
  fast" (<= 0.5; CONTRADICTED only if BN is slower). Steps are interpolated
  from the evaluation at initialization on. Premise: the tuned baseline's
  validation curve reached a plateau (:func:`plateau_by_thirds`; else NOT
  TESTABLE: the threshold would measure the run's length). ``THRESHOLD_FRACTION``
  is a free constant: the outcome at 0.9 and 0.99 is reported beside it.
- drift of the median sigmoid input: for units 0-9 of the last hidden layer,
  the median over 1000 fixed validation examples (inference mode) at every
  evaluation from initialization on; a unit's drift is its max - min over
  training, an arm's the mean over the 10 units; baseline / BN.

    python -m experiments.ioffe_fig1 [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from bnlab.diagnostics import percentiles
from bnlab.models import VariantMLP, set_gates
from experiments import protocol as P

NAME = "ioffe_fig1"
CLAIM = (
    "(e) BN speeds up convergence (at least 2x fewer steps to the baseline's "
    "accuracy) and stabilises the distribution of a sigmoid's input over "
    "training (Ioffe & Szegedy 2015, Fig. 1)."
)
WIDTHS = (100, 100, 100)
BATCH = 60
INIT_STD = 0.01
# each arm's own grid (same size), centred on its best in a quick-scale pilot
LRS = {"baseline": (1.0, 3.0, 10.0), "bn": (0.03, 0.1, 0.3)}
THRESHOLD_FRACTION = 0.95
FRACTION_NEIGHBOURS = (0.9, 0.99)  # the sensitivity row's values
LR_LIMITS = (0.003, 30.0)  # the equal-tuning rule's limits on an extended grid
SPEEDUP = 0.5  # at most half the baseline's steps: "much faster"
UNITS = 10
PROBE_EXAMPLES = 1000
DRIFT = 2.0
STEPS_FULL = 50_000  # Ioffe & Szegedy 2015 sec. 4.1: 50k steps of 60 examples
CRITERIA = [
    P.Criterion(
        "faster",
        f"steps to {THRESHOLD_FRACTION:g} x the tuned baseline's validation plateau, "
        "BN / baseline, each at its own tuned lr (geometric mean of per-seed ratios)",
        "<=",
        SPEEDUP,
        "Ioffe & Szegedy 2015 Fig. 1(a): BN 'helps the network train faster', its "
        "curve far above the baseline's early in training; the source lecture: 'BN "
        "converges much faster'. 'Much' as at least 2x fewer steps, the design as "
        "first written (issue 16); null 1 (CONTRADICTED: BN is slower); premise: "
        "the tuned baseline's validation curve reached a plateau (mean of its last "
        f"third of evaluations within {P.PLATEAU_RISE:g} of the third before), "
        "else NOT TESTABLE",
        null=1.0,
    ),
    P.Criterion(
        "stable_inputs",
        "drift of the median sigmoid input of the last hidden layer over training, "
        "baseline / BN (geometric mean of per-seed ratios)",
        ">=",
        DRIFT,
        "Ioffe & Szegedy 2015 Fig. 1(b, c): without BN the distribution of a "
        "sigmoid's input moves over training, with BN it is stable; the earlier "
        "design's factor 2, kept; null 1 (CONTRADICTED: BN's inputs drift as much "
        "or more), as every ratio check; premise: the training reached its plateau "
        "(the figure spans the whole 50,000-step run; the baseline's curve, as "
        "for 'faster'), else NOT TESTABLE",
        null=1.0,
    ),
]
HISTORY = [
    {
        "date": "2026-12-05",
        "criterion": "this design (its measurements piloted at full scale)",
        "pilot": "full-2600",
        "why": "the pilot of the design below, whose measurements this design "
        "keeps (it adds a premise): the power plan's source",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered second (50,000 steps at full scale): "
        "the plateau premise on 'faster' only",
        "run": "superseded/full-4100",
        "why": "its judging runs conflicted: stable_inputs CONTRADICTED at full "
        "(seeds 4100-4109: 1.41 [1.25, 1.59]) and SUPPORTED at quick (seeds "
        "3300-3304: 6.51 [3.90, 10.9]). The quick run's 1000 steps measure the "
        "drift over the escape from the initial plateau only, while Fig. 1(b, c) "
        "show it over the whole training (the paper's 50,000 steps): 'over "
        "training' gets the premise 'faster' has, a training run that reached "
        "its plateau. Found from judging runs, so the new design is judged on "
        "fresh seeds (full from 4200; quick 3400, 3500, 3600); the measurements "
        "and the threshold are unchanged. The second review of issue 21 also found "
        "its null missing (the threshold 2 acted as the null, so a ratio between 1 "
        "and 2 was CONTRADICTED, against the rule that a ratio's null is 1): null "
        "1 now, and the stable_inputs row of HISTORY's 6000-to-50,000 change was "
        "wrong to say 'unchanged' (the drift ratio fell from 5.1 to 2.3 with the "
        "longer run)",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered second (pilot)",
        "pilot": "full-2600",
        "why": "pilot of that design; nothing changed after it until its judging "
        "runs (row above)",
    },
    {
        "date": "2026-12-05",
        "criterion": "piloted, never registered: 6000 steps at full scale (the same "
        "epochs as quick), evaluated every 600; premise by protocol.plateau",
        "pilot": "full-2500",
        "why": "the premise was absent at full scale (the baseline still rising "
        "after 6000 steps), so the claim could not be tested in that regime: the "
        "full run now trains the paper's 50,000 steps of 60 (Ioffe & Szegedy 2015 "
        "sec. 4.1, Fig. 1(a)'s axis), evaluated every 500 steps so that steps to "
        "the threshold are resolved; with 100 evaluations the premise compares the "
        "means of the last two thirds (the largest of many noisy evaluations, "
        "protocol.plateau's rule, would always look like a rise). The criterion "
        "and the threshold are unchanged; quick scale stays at 1000 steps "
        "(NOT TESTABLE there)",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946: no premise on the "
        "baseline's plateau; steps to the threshold from the first evaluation "
        "after the start (a crossing before it counted as that evaluation's step)",
        "run": "superseded/full-6e0f946",
        "why": "the review of issue 21 (written before this result existed, "
        "docs/reproduction.md at 685662f): at quick scale the tuned baseline "
        "barely trains, so a fraction of its 'plateau' is a threshold near chance "
        "that measures the run's length; the baseline's plateau is now the "
        "premise of 'faster' (NOT TESTABLE without it, the same rule at both "
        "scales). A BN curve that crossed before the first evaluation was "
        "censored at it (an upper bound on BN's steps that favours the baseline); "
        "the crossing is now interpolated from the evaluation at initialization. "
        "stable_inputs is unchanged",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946 (pilot)",
        "pilot": "quick-100",
        "why": "pilot of that design; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "steps ratio BN / baseline < 1 ('faster', no factor); lrs on "
        "fixed grids (the baseline chose its bottom edge at full scale)",
        "pilot": "full-1000",
        "why": "issue 21: the criterion had been loosened from <= 0.5 to < 1 after "
        "the 0.509 pilot below; the source lecture's 'BN converges much faster' "
        "(and Fig. 1(a)'s gap) is a claim of a large factor, and any speed-up at "
        "all (< 1) is a narrower claim than the one reproduced, so the design as "
        "first written (<= 0.5) returns, with null 1: a shortfall between 0.5 and "
        "1 is INCONCLUSIVE, not a contradiction. The run length argument of the "
        "row below is real (the baseline's escape from the N(0, 0.01^2) plateau "
        "takes a fixed number of steps) and is why both scales train the same "
        "number of epochs. Grids extend past a chosen edge (equal tuning); the "
        "threshold fraction's sensitivity is reported",
    },
    {
        "date": "2026-12-01",
        "criterion": "the same steps ratio <= 0.5 ('at least twice as fast'); BN "
        "grid (0.1, 0.3, 1)",
        "result": "pilot at quick scale, seeds 0-4: 0.509 [0.33, 0.785], FAIL; BN "
        "chose lr 0.1, the edge of its grid",
        "why": "the paper claims 'faster', not a factor; the baseline's escape from "
        "the plateau of the N(0, 0.01^2) initialization takes a fixed number of "
        "steps, so a factor depends on the run length (6x longer at full scale); "
        "the BN grid moved down so that its choice is not at an edge",
    },
    {
        "date": "2026-11-20",
        "criterion": "steps to 0.80 test accuracy, BN / baseline <= 1/5 (a seed that "
        "never gets there counted as 10x the run length); final test accuracy BN - "
        "baseline >= 0.005; drift ratio >= 2 (means over 3 seeds); both arms at lr "
        "0.1; quick scale on digits",
        "result": "quick scale FAIL: the baseline never trained on digits (test "
        "accuracy 0.089), so its inputs did not drift",
        "why": "issue 16: each arm gets its own lr grid chosen on validation (the "
        "baseline trains at its own rate); the threshold comes from the tuned "
        "baseline's validation plateau; censoring is stated; intervals over 5 seeds",
    },
]


def plateau_by_thirds(curve: np.ndarray) -> P.Premise:
    """Whether a validation curve (mean over seeds, one value per
    evaluation) reached a plateau: the mean of its last third of evaluations
    rose less than :data:`protocol.PLATEAU_RISE` over the mean of the third
    before. Means of thirds, not single evaluations, because a curve
    evaluated 100 times is noisy from one evaluation to the next (the
    largest of many noisy values would always look like a rise).

    Example:
      >>> plateau_by_thirds(np.r_[np.linspace(0.1, 0.8, 4), np.full(8, 0.85)]).holds
      True
      >>> plateau_by_thirds(np.linspace(0.1, 0.8, 12)).holds
      False
    """
    c = np.asarray(curve, np.float64)
    c = c[np.isfinite(c)]
    k = len(c) // 3
    if k < 1:
        return P.Premise(False, f"{len(c)} finite evaluations: no plateau to check")
    rise = float(np.mean(c[-k:]) - np.mean(c[-2 * k : -k]))
    ok = rise < P.PLATEAU_RISE
    return P.Premise(
        ok,
        f"validation accuracy: the mean of the last {k} of {len(c)} evaluations "
        f"rose {rise:+.4f} over the {k} before ({'<' if ok else '>='} "
        f"{P.PLATEAU_RISE:g}: {'a plateau' if ok else 'still rising'})",
    )


def make_model() -> VariantMLP:
    # BN is passed as VariantMLP's alternative normalization before the
    # activation (gate `alt_before`): with `norm` set, VariantMLP would also
    # compute an unused BN after every activation in every arm.
    return VariantMLP(
        WIDTHS,
        10,
        alt_norm=bnlab.linen.BatchNorm,
        init_scheme="normal",
        init_std=INIT_STD,
        defaults={"sigmoid": 1.0},
    )


def post_init(variables, hp):
    return set_gates(variables, alt_before=hp["bn"])


def make_probe(model: VariantMLP, x: np.ndarray):
    """15/50/85th percentiles of units 0-9 of the last sigmoid's input over
    fixed examples, in inference mode: shape (3, UNITS)."""
    x = jnp.asarray(x)
    last = f"act_input_{len(WIDTHS) - 1}"

    def probe(variables, hp):
        _, cols = model.apply(variables, x, train=False, mutable=["intermediates"])
        z = cols["intermediates"][last][0][:, :UNITS]
        return percentiles(z, (15.0, 50.0, 85.0), axis=0)

    return probe


def probe_curve(result, n_rows: int) -> np.ndarray:
    """The probe over evaluations: (evaluations, arms, n_rows, UNITS), NaN
    where an arm had stopped."""
    steps = sorted({r["step"] for r in result.records})
    pos = {s: i for i, s in enumerate(steps)}
    out = np.full((len(steps), len(result.arms), n_rows, UNITS), np.nan)
    for r in result.records:
        if r.get("probe") is not None:
            out[pos[r["step"]], r["arm"]] = np.asarray(r["probe"])
    return out


def run(ctx: P.Context) -> P.Outcome:
    data = ctx.data
    steps = ctx.steps(1000, STEPS_FULL, 20)
    every = ctx.every(100, 500, 5)
    model = make_model()
    result = ctx.fit_grid(
        "arms",
        model,
        arms=[{"bn": 0.0}, {"bn": 1.0}],
        grid=lambda a: LRS["bn" if a["bn"] else "baseline"],
        limits=LR_LIMITS,
        optimizer=lambda hp: optax.sgd(hp["lr"]),
        post_init=post_init,
        # no dropout: without RNG streams VariantMLP draws no dropout masks
        rng_streams=(),
        steps=steps,
        batch_size=BATCH,
        eval_every=every,
        eval_at_start=True,
        probe=make_probe(model, data.x_val[:PROBE_EXAMPLES]),
        # the test set only reports: evaluated once, at the end
        data=data._replace(x_test=None, y_test=None),
    )
    arms = {"baseline": 0.0, "bn": 1.0}
    tuned = {
        a: result.tune(where={"bn": b}, report="val_accuracy") for a, b in arms.items()
    }
    eval_steps, _ = result.curve("val_accuracy")
    curves = {}  # arm -> (evals, seeds) validation accuracy at the tuned lr
    fits = {}  # arm -> the fit of its tuned lr (all its seeds are in one fit)
    chosen = {}  # arm -> arm indices of the tuned lr in that fit, in seed order
    for a, b in arms.items():
        _, val = P.grid_by_hparams(result, "val_accuracy", "lr", {"bn": b})
        curves[a] = val[:, tuned[a].index, :]
        hp = {"bn": b, "lr": tuned[a].value}
        fits[a] = next(
            r for r in result.results if any(x.hparams == hp for x in r.arms)
        )
        chosen[a] = [
            next(x.index for x in fits[a].arms if x.seed == s and x.hparams == hp)
            for s in ctx.seeds
        ]
    plateau = float(tuned["baseline"].val[tuned["baseline"].index])

    def steps_at(fraction: float) -> dict:
        # interpolated from the evaluation at initialization on: a curve that
        # reaches it at the first evaluation after the start crosses between
        # step 0 and that evaluation, not at it
        return {
            a: [
                P.steps_to(eval_steps, curves[a][:, i], fraction * plateau)
                for i in range(len(ctx.seeds))
            ]
            for a in arms
        }

    def faster_at(fraction: float) -> P.Measured:
        to = steps_at(fraction)
        # a baseline seed at the threshold already at initialization took no
        # steps: its ratio is undefined (NaN), and the premise fails
        start = [b == 0.0 for b in to["baseline"]]
        base = [1.0 if z else b for z, b in zip(start, to["baseline"], strict=True)]
        ratios, bn_never, base_never = P.steps_ratio(to["bn"], base, steps)
        ratios = [np.nan if z else r for z, r in zip(start, ratios, strict=True)]
        return P.ratio_ci(
            ratios,
            np.ones(len(ratios)),
            note=f"BN seeds that never reached the threshold: {bn_never} (ratio "
            f"infinite); baseline seeds that never reached it: {base_never} "
            f"(counted as the run length, {steps} steps)",
        )

    threshold = THRESHOLD_FRACTION * plateau
    to = steps_at(THRESHOLD_FRACTION)
    faster = {
        f: faster_at(f) for f in sorted({THRESHOLD_FRACTION, *FRACTION_NEIGHBOURS})
    }
    drift, test = {}, {}
    accuracy = P.make_accuracy(model)
    for a in arms:
        probes = probe_curve(fits[a], 3)  # (evals, arms, 3, UNITS)
        med = probes[:, chosen[a], 1, :]  # (evals, seeds, UNITS)
        drift[a] = (np.nanmax(med, 0) - np.nanmin(med, 0)).mean(-1)
        test[a] = accuracy(
            P.select_arms(fits[a].variables, chosen[a]), data.x_test, data.y_test
        )
    measured = {
        "faster": faster[THRESHOLD_FRACTION],
        "stable_inputs": P.ratio_ci(drift["baseline"], drift["bn"]),
    }
    # the threshold is a fraction of the baseline's plateau: without one it
    # would measure the run's length, not BN's speed
    base_plateau = plateau_by_thirds(np.nanmean(curves["baseline"], axis=1))
    at_start = sum(b == 0.0 for b in to["baseline"])
    premises = {
        "faster": P.Premise(
            base_plateau.holds and not at_start,
            f"the tuned baseline's validation curve: {base_plateau.text}; the "
            "threshold is a fraction of its plateau"
            + (f"; {at_start} baseline seed(s) start above it" if at_start else ""),
        ),
        # 'over training' is over the training the figure shows, to the plateau
        "stable_inputs": P.Premise(
            base_plateau.holds,
            f"the tuned baseline's validation curve: {base_plateau.text}; the drift "
            "is over a training run that reached its plateau",
        ),
    }
    c = CRITERIA[0]
    sensitivity = {
        "faster": P.Sensitivity(
            "THRESHOLD_FRACTION (of the tuned baseline's validation plateau)",
            THRESHOLD_FRACTION,
            P.sensitivity(
                lambda f: (
                    P.decide(
                        faster[f].low,
                        faster[f].high,
                        c.op,
                        c.at(ctx.scale),
                        c.null,
                        len(ctx.seeds),
                    ).outcome
                ),
                THRESHOLD_FRACTION,
                FRACTION_NEIGHBOURS,
            ),
        )
    }
    reported = {
        "final test accuracy, BN - baseline (paired by seed)": P.paired_ci(
            test["bn"], test["baseline"]
        ),
        "validation threshold (fraction of the tuned baseline's plateau)": P.Measured(
            threshold, threshold, threshold
        ),
    }
    table = []
    for a in arms:
        table.append(
            {
                "arm": "with BN" if a == "bn" else "baseline (no BN)",
                "chosen lr (validation)": tuned[a].text(),
                "validation accuracy by lr": ", ".join(
                    f"{lr:g}: {v:.3f}"
                    for lr, v in zip(tuned[a].grid, tuned[a].val, strict=True)
                ),
                f"steps to {threshold:.3f} (validation), per seed": ", ".join(
                    "never" if s is None else str(s) for s in to[a]
                ),
                "median-input drift (95% interval)": P.fmt(P.mean_ci(drift[a])),
                "final test accuracy (95% interval)": P.fmt(P.mean_ci(test[a])),
            }
        )
    records = [
        {
            "arm": a,
            "seed": s,
            "lr": tuned[a].value,
            "steps_to_threshold": to[a][i],
            "threshold": threshold,
            "median_drift": drift[a][i],
            "test_accuracy": test[a][i],
        }
        for a in arms
        for i, s in enumerate(ctx.seeds)
    ]
    figure = _figure(ctx, eval_steps, curves, fits, chosen, threshold, tuned)
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        reported=reported,
        sensitivity=sensitivity,
        premises=premises,
        notes=(
            f"{ctx.data_name}; the paper's setup: MLP {' x '.join(map(str, WIDTHS))} "
            f"sigmoid, weights N(0, {INIT_STD:g}^2), plain SGD, batch {BATCH}, "
            f"{steps} steps, validation every {every} steps from initialization; lr "
            f"grids {LRS['baseline']} (baseline) and {LRS['bn']} (BN), chosen on "
            "validation, "
            + (
                f"extended past a chosen edge: {result.extensions}"
                if result.extensions
                else "not extended (both choices interior)"
            )
            + f". Threshold {THRESHOLD_FRACTION:g} x the tuned baseline's "
            f"validation plateau ({plateau:.3f}). {faster[THRESHOLD_FRACTION].note}. "
            "Drift: median over "
            f"{PROBE_EXAMPLES} validation examples, units 0-{UNITS - 1} of the last "
            "hidden layer, inference mode. Test accuracy at the end of training."
        ),
    )


def _figure(ctx, eval_steps, curves, fits, chosen, threshold, tuned) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for a, color in (("baseline", "tab:gray"), ("bn", "tab:blue")):
        c = curves[a]
        axes[0].plot(
            eval_steps,
            np.nanmean(c, 1),
            color=color,
            label=f"{'with BN' if a == 'bn' else 'without BN'} (lr {tuned[a].value:g})",
        )
        axes[0].fill_between(
            eval_steps, np.nanmin(c, 1), np.nanmax(c, 1), color=color, alpha=0.2
        )
    axes[0].axhline(threshold, color="k", lw=0.6, ls=":", label="threshold")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("validation accuracy")
    axes[0].set_title("(a) validation accuracy (band: min-max over seeds)", fontsize=9)
    axes[0].legend(fontsize=8)
    for ax, a, title in (
        (axes[1], "baseline", "(b) without BN"),
        (axes[2], "bn", "(c) with BN"),
    ):
        p = probe_curve(fits[a], 3)[:, chosen[a][0], :, 0]  # seed 1, unit 0
        for k, style in zip(range(3), (":", "-", ":"), strict=True):
            ax.plot(eval_steps, p[:, k], "k" + style)
        ax.set_title(f"{title}: a sigmoid's input, 15/50/85th pct", fontsize=9)
        ax.set_xlabel("training step")
    return ctx.save_figure(fig, "fig1")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
