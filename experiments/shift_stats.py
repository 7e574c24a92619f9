"""Test-time distribution shift and BN's statistics (AdaBN, Li et al. 2016,
arXiv:1603.04779; Schneider et al. 2020, arXiv:2006.16971).

A BN network normalizes with population statistics estimated on its
training data. When the test inputs shift, those statistics no longer
center and scale the pre-activations; re-estimating them on the (unlabeled)
shifted test data ("AdaBN") restores the normalization. Shifts with a known
cause make the prediction exact: a contrast or brightness change is an
affine map of every pixel, ``x -> a x + b``, so the first layer's
pre-activations change by a per-unit affine map that re-estimated BN
statistics remove exactly: AdaBN then gives the clean accuracy back.
Gaussian noise is not affine: re-estimation helps only partly (Schneider et
al. Fig. 2). And re-estimation has traps: statistics of a test batch of a
few examples are noisy (Schneider et al. sec. 3 mix them with the training
statistics for that reason), batches of one class carry the class in their
statistics, which normalization then removes (non-i.i.d.), and a test set
whose *labels* shift (a subset of the classes) changes the statistics for a
reason that is not a covariate shift: re-estimating them then hurts.

Design: one fit of a BN-ReLU MLP (He init, BN before each ReLU, SGD with
momentum 0.9, batch 128), lr chosen on validation; then, on each seed's
trained network, test accuracy under each shift with (a) the training
population statistics (running averages), (b) statistics re-estimated on
the shifted test set (:func:`bnlab.precise_stats`, batches of 500, or 8 for
the batch-size trap of re-estimation), (c) each test batch normalized with
its own statistics, i.i.d. batches of 8 or 500 or class-sorted batches
of 100. Labels are never used to adapt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab
import bnlab.linen
from bnlab.models import MLP
from experiments import exact as X
from experiments import protocol as P

NAME = "shift_stats"
CLAIM = (
    "Under a test-time covariate shift, BN statistics re-estimated on the shifted "
    "test data (AdaBN) recover accuracy that the training statistics lose (for "
    "contrast and brightness, back to AdaBN's own accuracy on clean data up to "
    "float rounding, within half a point on every seed; part of it for noise); "
    "re-estimation fails with "
    "small or class-sorted batches and under label shift; on clean data it "
    "changes accuracy by less than 1 point."
)
LRS = (0.03, 0.1, 0.3)
CONTRAST = 0.3  # x -> m + CONTRAST (x - m), m the training set's mean pixel
BRIGHTNESS = 0.3  # x -> x + BRIGHTNESS (pixels in [0, 1], not clipped)
NOISE = 0.3  # x -> x + N(0, NOISE^2)
SUBSET = (0, 1, 2)  # the label-shift test set: these classes only
BIG, SMALL, SORTED = 500, 8, 100  # batch sizes
SHIFTS = ("clean", "contrast", "brightness", "noise")
# equivalence margin of AdaBN on clean data, and its neighbours (sensitivity)
CLEAN_MARGIN = 0.01
CLEAN_MARGIN_NEIGHBOURS = (0.005, 0.02)
LR_LIMITS = (1e-3, 3.0)  # the equal-tuning rule's limits on the lr grid
CRITERIA = [
    P.Criterion(
        "shift_hurts_source_stats",
        "largest test accuracy change with training statistics, shifted - clean, "
        "over contrast, brightness and noise (the shifts are real)",
        "<=",
        -0.05,
        "Li et al. 2016 (arXiv:1603.04779) sec. 1, Schneider et al. 2020 "
        "(arXiv:2006.16971) Fig. 1: covariate shift degrades a BN network with "
        "its training statistics; 5 points, fixed before the run",
    ),
    P.Criterion(
        "affine_shift_recovered",
        "|AdaBN accuracy on contrast or brightness - AdaBN accuracy on clean "
        "data|, the larger of the two shifts, on the worst seed (an identity holds "
        "on each seed, not on average; experiments.exact.every_seed); the "
        "reference is AdaBN on clean data, not the training statistics on clean "
        "data (that gap is adabn_clean_no_harm's)",
        "<=",
        0.005,
        "an affine pixel map changes each first-layer pre-activation by an affine "
        "map that re-estimated BN statistics remove exactly (Li et al. 2016 "
        "sec. 3.1); 0.5 points allows float rounding at decision boundaries",
    ),
    P.Criterion(
        "adabn_helps_noise",
        "test accuracy under Gaussian noise: AdaBN - training statistics",
        ">",
        0.0,
        "Schneider et al. 2020 Fig. 2 and Table 1: re-estimation improves "
        "accuracy on noise corruptions",
    ),
    P.Criterion(
        "adabn_clean_no_harm",
        "clean test accuracy: AdaBN - training statistics",
        "within",
        CLEAN_MARGIN,
        "Li et al. 2016 (AdaBN) sec. 3.1: without a shift the re-estimated "
        "statistics are the training population's own, so re-estimating them "
        "leaves accuracy unchanged (equivalence); margin 1 point, as first "
        "written (2026-12-01, before any pilot)",
    ),
    P.Criterion(
        "small_batch_trap",
        f"clean test accuracy, each batch normalized with its own statistics: "
        f"batches of {SMALL} - batches of {BIG}",
        "<",
        0.0,
        "Schneider et al. 2020 sec. 3 (statistics of n examples are noisy, so they "
        "mix them with the training statistics); Nado et al. 2020 "
        "(arXiv:2006.10963) Fig. 2",
    ),
    P.Criterion(
        "non_iid_trap",
        f"clean test accuracy, own statistics: class-sorted batches of {SORTED} - "
        f"i.i.d. batches of {BIG}",
        "<=",
        -0.2,
        "batch statistics of one class hold the class mean, which normalization "
        "removes (Ioffe & Szegedy 2015 sec. 3 assume i.i.d. batches); 20 points, "
        "fixed before the run",
    ),
    P.Criterion(
        "label_shift_trap",
        f"test accuracy on classes {SUBSET} only: AdaBN (re-estimated on that "
        "subset) - training statistics",
        "<",
        0.0,
        "a label shift is not a covariate shift: the statistics change because "
        "the classes do, and re-estimating them moves every class's features "
        "(Schneider et al. 2020 sec. 6 limitations)",
    ),
]
HISTORY = [
    {
        "date": "2026-12-01",
        "criterion": "clean test accuracy, AdaBN - training statistics, within "
        "+-0.01 (equivalence)",
        "result": "quick-scale pilot: 0.0066 [-0.0049, 0.018], FAIL by the "
        "interval's upper end",
        "why": "'no harm' is a non-inferiority claim; an equivalence test also "
        "fails when re-estimation helps, which it can on clean data because "
        "running averages lag the weights (Wu & Johnson 2021, arXiv:2105.07576)",
    },
    {
        "date": "2026-12-05",
        "criterion": "clean test accuracy, AdaBN - training statistics >= -0.01 "
        "(non-inferiority); lr chosen on a fixed grid (at its edge at full scale)",
        "pilot": "full-1000",
        "why": "the switch to non-inferiority followed a failing pilot; AdaBN's "
        "premise (Li et al. 2016 sec. 3.1) is that on the source domain the "
        "statistics are the same population's, an equivalence, so the check is "
        "the equivalence as first written, margin 1 point (issue 21); a gain "
        "from lagging running averages larger than 1 point now counts against "
        "it; the lr grid extends past a chosen edge",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946 (pilot)",
        "pilot": "quick-300",
        "why": "pilot of that design; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946: affine_shift_recovered as "
        "a t interval of the per-seed largest |AdaBN shifted - AdaBN clean|; the "
        "claim's 'all of it' without its reference",
        "run": "superseded/full-6e0f946",
        "why": "the review of issue 21 (written before this result existed, "
        "docs/reproduction.md at 685662f): the per-seed values tie at 0, where a t "
        "interval has zero width; the claim is an identity on every seed (Li et "
        "al. 2016 sec. 3.1); the claim now names its reference, AdaBN on clean "
        "data",
    },
    {
        "date": "2026-12-05",
        "criterion": "this design (full-scale pilot, for the power plan)",
        "pilot": "full-2500",
        "why": "pilot of the design registered next; nothing changed after it. "
        "Before it, a review of the draft (never run) found that a range over "
        "seeds whose lower end is the best seed can never be CONTRADICTED when "
        "the values tie at 0: the identity is judged on its worst seed (one seed "
        "past 0.5 points contradicts it)",
    },
]


def _model(width: int) -> MLP:
    return MLP(
        (width,) * 3,
        10,
        placement="before",
        norm=functools.partial(bnlab.linen.BatchNorm, momentum=0.9),
        init_scheme="he",
    )


def shifted(x: np.ndarray, kind: str, mean_pixel: float, seed: int) -> np.ndarray:
    """The test inputs under one shift (pixels in [0, 1], not clipped)."""
    if kind == "clean":
        return x
    if kind == "contrast":
        return (mean_pixel + CONTRAST * (x - mean_pixel)).astype(np.float32)
    if kind == "brightness":
        return (x + BRIGHTNESS).astype(np.float32)
    if kind == "noise":
        rng = np.random.default_rng([seed, 2006])
        return (x + NOISE * rng.standard_normal(x.shape)).astype(np.float32)
    raise ValueError(f"unknown shift {kind!r}")


class Evaluator:
    """Accuracies of the seeds' networks (variables stacked on axis 0)."""

    def __init__(self, model: MLP):
        self.model = model

        def acc_pop(v, x, y):
            out = model.apply(v, x, train=False)
            return jnp.mean((jnp.argmax(out, -1) == y).astype(jnp.float32))

        def acc_own(v, xb, yb):  # (batches, n, ...): each its own statistics
            def one(b):
                out, _ = model.apply(v, b[0], train=True, mutable=["batch_stats"])
                return jnp.sum((jnp.argmax(out, -1) == b[1]).astype(jnp.float32))

            return jnp.sum(jax.lax.map(one, (xb, yb))) / (xb.shape[0] * xb.shape[1])

        self.pop = jax.jit(jax.vmap(acc_pop, in_axes=(0, 0, None)))
        self.own = jax.jit(jax.vmap(acc_own, in_axes=(0, 0, None)))

        def collect(v, x, mutable):
            return jax.vmap(
                lambda vv, xx: model.apply(vv, xx, train=True, mutable=mutable)
            )(v, x)

        self.collect = collect

    def adapted(self, variables: dict, x: np.ndarray, batch: int) -> dict:
        """``variables`` with statistics re-estimated on ``x`` ``(seeds, N,
        ...)`` in equal batches of at most ``batch`` (fewer than their number
        of examples left out)."""
        k = -(-x.shape[1] // batch)
        size = x.shape[1] // k
        batches = [jnp.asarray(x[:, i * size : (i + 1) * size]) for i in range(k)]
        stats = bnlab.precise_stats(self.collect, variables, batches)
        return {**variables, "batch_stats": stats}


def run(ctx: P.Context) -> P.Outcome:
    width = ctx.pick(64, 128)
    steps = ctx.steps(400, 1500)
    every = ctx.every(100, 250)
    data = ctx.data
    model = _model(width)
    grid = ctx.fit_grid(
        "train",
        model,
        arms=[{}],
        grid=LRS,
        limits=LR_LIMITS,
        optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        steps=steps,
        batch_size=128,
        eval_every=every,
        steps_per_call=every,
    )
    tuned = grid.tune()
    plateau = P.plateau(grid, where={}, hp="lr", value=tuned.value)
    seeds = list(ctx.seeds)
    result = next(
        r for r in grid.results if any(a.hparams["lr"] == tuned.value for a in r.arms)
    )
    chosen = [
        a.index
        for a in sorted(result.arms, key=lambda a: a.seed)
        if a.hparams["lr"] == tuned.value
    ]  # in seed order
    variables = jax.tree.map(
        lambda a: jnp.asarray(a[np.asarray(chosen)]),
        {k: result.variables[k] for k in ("params", "batch_stats")},
    )
    ev = Evaluator(model)
    mean_pixel = float(np.mean(data.x_train))
    x_test, y_test = data.x_test, data.y_test
    n_test = len(x_test)
    n_s = len(seeds)
    if ctx.smoke:
        n_test = 2 * BIG
        x_test, y_test = x_test[:n_test], y_test[:n_test]

    def per_seed(kind):  # (seeds, N, d)
        return np.stack([shifted(x_test, kind, mean_pixel, s) for s in seeds])

    acc: dict[str, np.ndarray] = {}
    y_all = jnp.asarray(y_test)
    for kind in SHIFTS:
        xs = per_seed(kind)
        acc[f"{kind}/source"] = np.asarray(ev.pop(variables, jnp.asarray(xs), y_all))
        ada = ev.adapted(variables, xs, BIG)
        acc[f"{kind}/adabn"] = np.asarray(ev.pop(ada, jnp.asarray(xs), y_all))
        if kind == "noise":  # the batch size of re-estimation (one shift)
            ada_small = ev.adapted(variables, xs, SMALL)
            acc[f"{kind}/adabn_b{SMALL}"] = np.asarray(
                ev.pop(ada_small, jnp.asarray(xs), y_all)
            )
        for size in (SMALL, BIG):
            m = (n_test // size) * size
            xb = jnp.asarray(xs[:, :m].reshape(n_s, m // size, size, -1))
            yb = jnp.asarray(y_test[:m].reshape(m // size, size))
            acc[f"{kind}/own_b{size}"] = np.asarray(ev.own(variables, xb, yb))
    # non-i.i.d.: class-sorted batches of SORTED (clean data)
    order = np.argsort(y_test, kind="stable")
    m = (n_test // SORTED) * SORTED
    xs_sorted = jnp.asarray(
        np.broadcast_to(x_test[order][:m], (n_s, m, x_test.shape[1])).reshape(
            n_s, m // SORTED, SORTED, -1
        )
    )
    ys_sorted = jnp.asarray(y_test[order][:m].reshape(m // SORTED, SORTED))
    acc["clean/own_sorted"] = np.asarray(ev.own(variables, xs_sorted, ys_sorted))
    # label shift: a test set of SUBSET's classes only
    keep = np.isin(y_test, SUBSET)
    x_sub = np.broadcast_to(x_test[keep], (n_s, int(keep.sum()), x_test.shape[1]))
    y_sub = jnp.asarray(y_test[keep])
    acc["subset/source"] = np.asarray(ev.pop(variables, jnp.asarray(x_sub), y_sub))
    ada_sub = ev.adapted(variables, np.asarray(x_sub), BIG)
    acc["subset/adabn"] = np.asarray(ev.pop(ada_sub, jnp.asarray(x_sub), y_sub))

    drops = np.stack(
        [acc[f"{k}/source"] - acc["clean/source"] for k in SHIFTS[1:]]
    )  # (shifts, seeds)
    measured = {
        "shift_hurts_source_stats": P.mean_ci(np.max(drops, axis=0)),
        "affine_shift_recovered": X.every_seed(
            np.max(
                np.abs(
                    np.stack(
                        [
                            acc[f"{k}/adabn"] - acc["clean/adabn"]
                            for k in ("contrast", "brightness")
                        ]
                    )
                ),
                axis=0,
            )
        ),
        "adabn_helps_noise": P.paired_ci(acc["noise/adabn"], acc["noise/source"]),
        "adabn_clean_no_harm": P.paired_ci(acc["clean/adabn"], acc["clean/source"]),
        "small_batch_trap": P.paired_ci(
            acc[f"clean/own_b{SMALL}"], acc[f"clean/own_b{BIG}"]
        ),
        "non_iid_trap": P.paired_ci(acc["clean/own_sorted"], acc[f"clean/own_b{BIG}"]),
        "label_shift_trap": P.paired_ci(acc["subset/adabn"], acc["subset/source"]),
    }
    reported = {
        f"adabn_b{SMALL}_minus_b{BIG}_noise": P.paired_ci(
            acc[f"noise/adabn_b{SMALL}"], acc["noise/adabn"]
        )
    }
    columns = {
        "training statistics": "source",
        f"AdaBN (batches of {BIG})": "adabn",
        f"AdaBN (batches of {SMALL})": f"adabn_b{SMALL}",
        f"own statistics, batches of {BIG}": f"own_b{BIG}",
        f"own statistics, batches of {SMALL}": f"own_b{SMALL}",
    }
    table = [
        {
            "test data": kind,
            **{
                col: P.fmt(P.mean_ci(acc[f"{kind}/{key}"]))
                for col, key in columns.items()
                if f"{kind}/{key}" in acc
            },
        }
        for kind in SHIFTS
    ]
    table.append(
        {
            "test data": "clean",
            f"own statistics, class-sorted batches of {SORTED}": P.fmt(
                P.mean_ci(acc["clean/own_sorted"])
            ),
        }
    )
    table.append(
        {
            "test data": f"classes {SUBSET} only (label shift)",
            "training statistics": P.fmt(P.mean_ci(acc["subset/source"])),
            f"AdaBN (batches of {BIG})": P.fmt(P.mean_ci(acc["subset/adabn"])),
        }
    )
    records = [
        {"evaluation": k, "seed": s, "test_accuracy": float(v)}
        for k, vals in acc.items()
        for s, v in zip(seeds, vals, strict=True)
    ]
    figure = _figure(ctx, acc)
    clean = measured["adabn_clean_no_harm"]
    sensitivity = {
        "adabn_clean_no_harm": P.Sensitivity(
            "equivalence margin",
            CLEAN_MARGIN,
            P.sensitivity(
                lambda v: P.decide(clean.low, clean.high, "within", v).outcome,
                CLEAN_MARGIN,
                CLEAN_MARGIN_NEIGHBOURS,
            ),
        )
    }
    extended = ", ".join(f"{e['edge']} {e['lr']:g}" for e in grid.extensions)
    notes = (
        f"{ctx.data_name}; MLP 3 x {width}, BN before each ReLU, He init; SGD "
        f"momentum 0.9, batch 128, {steps} steps, lr {tuned.text()} chosen on "
        f"validation from {grid.values()} (grid {LRS}, extended past a chosen "
        f"edge within {LR_LIMITS}: {extended or 'none'}); plateau: "
        f"{plateau.text}. Shifts: contrast x -> m + {CONTRAST:g} (x - m) "
        f"(m = {mean_pixel:.3f}, the training mean pixel), brightness x + "
        f"{BRIGHTNESS:g}, Gaussian noise of std {NOISE:g}; label shift: test "
        f"examples of classes {SUBSET} only ({int(keep.sum())} examples). The "
        f"(unlabeled) test set itself is the adaptation data, as in AdaBN."
    )
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        notes=notes,
        reported=reported,
        sensitivity=sensitivity,
    )


def _figure(ctx, acc) -> str:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(SHIFTS))
    for j, (key, label) in enumerate(
        (("source", "training statistics"), ("adabn", "AdaBN"))
    ):
        m = [acc[f"{k}/{key}"].mean() for k in SHIFTS]
        lo = [acc[f"{k}/{key}"].min() for k in SHIFTS]
        hi = [acc[f"{k}/{key}"].max() for k in SHIFTS]
        a.bar(x + 0.4 * j - 0.2, m, 0.4, label=label)
        a.errorbar(
            x + 0.4 * j - 0.2,
            m,
            yerr=[np.subtract(m, lo), np.subtract(hi, m)],
            fmt="none",
            color="k",
            lw=0.8,
        )
    a.set_xticks(x, SHIFTS)
    a.set_ylabel("test accuracy (bars: min-max over seeds)")
    a.set_title("Shift: training vs re-estimated statistics")
    a.legend(fontsize=7)
    traps = {
        f"own, i.i.d. {BIG}": acc[f"clean/own_b{BIG}"],
        f"own, i.i.d. {SMALL}": acc[f"clean/own_b{SMALL}"],
        f"own, sorted {SORTED}": acc["clean/own_sorted"],
        "subset: training": acc["subset/source"],
        "subset: AdaBN": acc["subset/adabn"],
    }
    b.bar(range(len(traps)), [v.mean() for v in traps.values()], color="C2")
    b.set_xticks(range(len(traps)), list(traps), rotation=20, fontsize=7)
    b.set_title("Traps of re-estimation (clean data)")
    return ctx.save_figure(fig, "shift_stats")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
