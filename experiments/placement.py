"""Claim (c): in a deep network normalize every layer; whether BN goes before
or after the activation matters little.

A deep ReLU MLP (12 layers, He init) with four placements: no BN, BN after the first
layer only, BN before every activation (the paper's), BN after every
activation; all placements are arms of one program (a gated
``bnlab.models.VariantMLP``: arms with one seed share their weights). SGD
with momentum 0.9, batch 128, the same number of steps for every placement;
every placement gets its own learning-rate grid, chosen on validation (mean
of the last 3 evaluations over seeds) and extended past an edge it chose
(:meth:`experiments.protocol.Context.fit_grid`: the same rule for every
placement). Reported per seed: test accuracy at the chosen rate, averaged
over the last 3 evaluations (not one snapshot); whether each placement's
validation curve reached a plateau (:func:`experiments.protocol.plateau`) is
reported beside it, since the claim is judged at this budget.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from bnlab.models import VariantMLP, set_gates
from experiments import protocol as P

NAME = "placement"
DEPTH = 12  # the lecture's "deep" network, as first designed (2026-12-01)
STEPS = {"quick": 400, "full": 1500}  # about 5.7 / 3.6 epochs of batch 128
CLAIM = (
    f"(c) In a deep ({DEPTH}-layer) net normalize at every layer; whether BN goes "
    "before or after the activation matters little (test accuracy after the same "
    f"number of steps for every placement: {STEPS['full']} steps of 128, about 3.6 "
    "epochs)."
)
PLACEMENTS = {  # code -> (label, gates)
    0: ("no BN", {}),
    1: ("BN after the first layer only", {"bn_before": "first"}),
    2: ("BN before every activation", {"bn_before": 1.0}),
    3: ("BN after every activation", {"bn_after": 1.0}),
}
# every placement's first grid; fit_grid extends it past an edge it chose
LRS = (0.01, 0.03, 0.1, 0.3)
LR_LIMITS = (1e-4, 3.0)
MARGIN = 0.01
CRITERIA = [
    P.Criterion(
        "every_layer_helps",
        "BN before every activation - no BN: test accuracy (paired by seed)",
        ">=",
        MARGIN,
        "Ioffe & Szegedy 2015 sec. 3 (BN at every layer); at least the "
        "equivalence margin below, so that the margin is smaller than BN's effect; "
        "null 0 (no effect)",
        null=0.0,
    ),
    P.Criterion(
        "every_layer_beats_first",
        "BN before every activation - BN after the first layer only: test accuracy",
        ">",
        0.0,
        "the lecture: every layer's output is the next layer's input, so "
        "normalize each",
    ),
    P.Criterion(
        "before_after_equivalent",
        "BN before - BN after the activation: test accuracy (paired by seed)",
        "within",
        MARGIN,
        "the lecture: before or after matters little; margin 1 point, fixed "
        "before the run (two one-sided tests)",
    ),
]
HISTORY = [
    {
        "date": "2026-12-05",
        "criterion": "this design (pilot)",
        "pilot": "quick-200",
        "why": "pilot of the registered design; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "8 x 64 (quick) / 8 x 128 (full), 300 / 1200 steps, lr grid "
        "(0.003, 0.01, 0.03, 0.1) without extension; before - no BN > 0, before - "
        "first > 0, (before - no BN) - |before - after| > 0 (a margin measured on "
        "the same seeds)",
        "pilot": "full-1000",
        "why": "issue 21's review: depth 12 -> 8, >= 0.01 -> > 0 and the margin "
        "measured on the same seeds were all loosened after a failing pilot, with no "
        "reason from the source. Back to the design as first written: the lecture's "
        "claim is about a deep network (12 layers), 'matters little' is an "
        "equivalence against the fixed 1-point margin (two one-sided tests; at quick "
        "scale it may be INCONCLUSIVE), and the lr grid is the first one, extended "
        "past an edge an arm chooses (protocol.Context.fit_grid)",
    },
    {
        "date": "2026-12-01",
        "criterion": "before - no BN >= 0.01, before - first > 0, |before - after| "
        "within 0.01 (a fixed equivalence margin of 1 point); 12 x 64 at quick scale, "
        "lr grid (0.01 ... 0.3), then 8 x 64 with (0.003 ... 0.1) (no BN diverged at "
        "0.1 and 0.3; the quick run must stay within its time budget)",
        "result": "pilots at quick scale, seeds 0-4: 12 layers: 0.021 [0.010, 0.032], "
        "0.012 [0.004, 0.020], 0.017 [0.012, 0.023] (FAIL); 8 layers: 0.030 [0.009, "
        "0.051] (FAIL), 0.011 [0.002, 0.021], 0.0003 [-0.018, 0.018] (FAIL)",
        "why": "a pre-run review: with 5 seeds and 2000 quick test images the paired "
        "difference of two placements has a 95 % half-width of about 1 point, so a "
        "fixed 1-point margin cannot pass at quick scale whatever the truth, while it "
        "can at full scale: quick and full would disagree by design. The margin is "
        "now BN's own effect, measured on the same seeds",
    },
    {
        "date": "2026-11-20",
        "criterion": "|before - after| <= 2 points and before, after > no BN, on "
        "mean final test accuracy (3 seeds, lr 0.02 for all, 6 x 128)",
        "result": "PASS at 2000 steps (0.41 points); on held-out seeds 3-5 it failed "
        "at every evaluation from 1000 to 1800 steps",
        "why": "one final snapshot, no tuning per arm and no interval; 'every "
        "layer' was never tested (issue 16)",
    },
]


def post_init(depth: int):
    """Each arm's gates from its ``placement`` code (traced)."""

    def gates(variables, hp):
        code = hp["placement"]
        first = (jnp.arange(depth) == 0).astype(jnp.float32)
        before = jnp.where(code == 1, first, jnp.where(code == 2, 1.0, 0.0))
        return set_gates(
            variables, bn_before=before, bn_after=jnp.where(code == 3, 1.0, 0.0)
        )

    return gates


def run(ctx: P.Context) -> P.Outcome:
    width = ctx.pick(64, 128)
    depth = DEPTH
    steps = ctx.steps(STEPS["quick"], STEPS["full"])
    every = ctx.every(50, 150)
    model = VariantMLP(
        (width,) * depth,
        10,
        norm=functools.partial(bnlab.linen.BatchNorm, momentum=0.9),
        norm_after=True,
        init_scheme="he",
    )
    arms = [{"placement": float(c)} for c in PLACEMENTS]
    grid = ctx.fit_grid(
        "arms",
        model,
        arms=arms,
        grid=LRS,
        hp="lr",
        limits=LR_LIMITS,
        optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        post_init=post_init(depth),
        rng_streams=(),  # no dropout
        steps=steps,
        batch_size=128,
        eval_every=every,
    )
    tuned = {c: grid.tune(where=arms[c]) for c in PLACEMENTS}
    plateaus = {
        c: P.plateau(grid, where=arms[c], hp="lr", value=tuned[c].value)
        for c in PLACEMENTS
    }
    acc = {c: t.report for c, t in tuned.items()}
    measured = {
        "every_layer_helps": P.paired_ci(acc[2], acc[0]),
        "every_layer_beats_first": P.paired_ci(acc[2], acc[1]),
        "before_after_equivalent": P.paired_ci(acc[2], acc[3]),
    }
    n = len(ctx.seeds)

    def outcomes(cid: str, op: str, null: float | None):
        m = measured[cid]
        return P.sensitivity(
            lambda v: P.decide(m.low, m.high, op, v, null, n).outcome,
            MARGIN,
            [MARGIN / 2, 2 * MARGIN],
        )

    sensitivity = {
        "every_layer_helps": P.Sensitivity(
            "threshold (points of accuracy / 100)",
            MARGIN,
            outcomes("every_layer_helps", ">=", 0.0),
        ),
        "before_after_equivalent": P.Sensitivity(
            "equivalence margin",
            MARGIN,
            outcomes("before_after_equivalent", "within", None),
        ),
    }
    table = [
        {
            "placement": label,
            "chosen lr (validation)": tuned[c].text(),
            "validation accuracy by lr": ", ".join(
                f"{lr:.3g}: {v:.3f}"
                for lr, v in zip(tuned[c].grid, tuned[c].val, strict=True)
            ),
            "test accuracy (95% interval)": P.fmt(P.mean_ci(acc[c])),
            "plateau (validation, chosen lr)": plateaus[c].text,
        }
        for c, (label, _) in PLACEMENTS.items()
    ]
    figure = _figure(ctx, grid, tuned)
    records = [
        {
            "placement": PLACEMENTS[c][0],
            "lr": tuned[c].value,
            "seed": s,
            "test_accuracy": a,
            "plateau": plateaus[c].holds,
        }
        for c in PLACEMENTS
        for s, a in zip(ctx.seeds, acc[c], strict=True)
    ]
    extended = "; ".join(
        f"{PLACEMENTS[int(e['arm']['placement'])][0]}: {e['edge']} {e['lr']:g}"
        for e in grid.extensions
    )
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        sensitivity=sensitivity,
        notes=(
            f"{ctx.data_name}; MLP {depth} x {width}, ReLU, He init; {steps} steps "
            f"of 128 for every placement (the claim is at this budget; the plateau "
            f"column says whether each placement still rose); lr grid {LRS} per "
            f"placement, chosen on validation (mean of the last 3 evaluations), "
            f"extended past an edge an arm chose (limits {LR_LIMITS}): "
            f"{extended or 'no extension'}."
        ),
    )


def _figure(ctx, grid, tuned) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps, _ = grid.curve("val_accuracy")
    for c, (label, _) in PLACEMENTS.items():
        _, val = P.grid_by_hparams(grid, "val_accuracy", "lr", {"placement": float(c)})
        curve = val[:, tuned[c].index, :]
        ax.plot(steps, np.nanmean(curve, 1), label=f"{label} (lr {tuned[c].value:g})")
        ax.fill_between(steps, np.nanmin(curve, 1), np.nanmax(curve, 1), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (band: min-max over seeds)")
    ax.set_title("Where BN goes (each at its own best lr)")
    ax.legend(fontsize=7)
    return ctx.save_figure(fig, "placement")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
