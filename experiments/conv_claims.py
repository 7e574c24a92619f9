"""Claim (e) on a convolutional network (Ioffe & Szegedy 2015,
arXiv:1502.03167, sec. 4.2 on Inception), against a strong baseline without
BN (SkipInit, De & Smith 2020, arXiv:2002.10444).

Ioffe & Szegedy made the claim on a convolutional network: with BN,
Inception reached its accuracy in fewer steps (13.3M vs 31.0M at the same
rate), trained at 30x its rate (BN-x30) and ended more accurate. Without BN
a residual network's variance grows with depth unless the residual branches
start small: SkipInit multiplies each branch by a learnable scalar that
starts at 0, which De & Smith found recovers most of what BN gives residual
networks at moderate batch sizes. That is the baseline here, so that BN is
not credited with fixing a bad initialization.

Design: a small residual network (:class:`SmallResNet`: a 3x3 stride-2 stem
to 7x7 maps, plus a 2x2 max pool at full scale's 28x28, as ResNet's ImageNet
stem; three basic blocks of 8, 16, 32 channels at strides 1, 2, 2; global
average pool), He init, SGD with momentum 0.9 and a cosine-decayed rate
(the paper decays its rates too), batch 32, two variants as gates of one
program (arms with one seed share their initial weights and data order): BN
after every convolution, or no BN with SkipInit's scalar on every residual
branch. Both variants get the same grid of 5 half-decade rates, from below
either's best to past 30x the baseline's (a quick-scale pilot), chosen on
validation (mean of the last 3 evaluations over seeds) and extended past an
edge a variant chooses (:meth:`protocol.Context.fit_grid`, the same rule for
both). The run is short: 480 steps of 32 at full scale (0.28 epochs), 120
at quick scale; the claims are judged in that regime ("in a short run"), not
after training to convergence as in the paper, and each variant's plateau
(:func:`protocol.plateau`) is reported. Convolutions are
written as 9 shifted matrix products (:class:`ShiftConv`): XLA:CPU runs
``lax.conv`` per arm as a grouped convolution under ``vmap`` and slowly
inside ``lax.scan``; matrix products vmap into batched products.

Measured, as in ``ioffe_table``: steps to ``THRESHOLD_FRACTION`` of the
tuned baseline's validation score (per seed, a ratio; a baseline seed that
never gets there counts as the run length, a lower bound of its steps; a BN
seed that never gets there makes its ratio infinite); BN at 30x the
baseline's chosen rate (premise: the grid has a rate within a factor sqrt(3)
of 30x); test accuracy of the final weights.

"Tolerates >= 10x higher rates" is a count, tested exactly
(:func:`protocol.exact_sign_test`), because a grid rate is not a continuous
measurement and a bisection per seed (as ``lr_robustness`` does on an MLP)
would cost this conv net several times its budget. Per seed and variant, a
rate is usable if it did not diverge and its validation score is within
``WITHIN`` of that seed's best; the largest usable grid rate ``lo`` and the
next rate ``hi`` bracket the variant's true limit (usability assumed
monotone). A seed *meets* the claim if BN's ``lo`` >= 10x SkipInit's ``hi``
(BN's limit is surely >= 10x), *fails* it if BN's ``hi`` <= 10x SkipInit's
``lo`` (surely < 10x), and is *undetermined* otherwise (a censored top, or
brackets that straddle 10x). The check is the share of seeds that meet it,
with a Clopper-Pearson 95 % interval whose lower end counts the undetermined
seeds as failing and whose upper end counts them as meeting it: "> 0.5" (a
majority of seeds, i.e. the median seed) is SUPPORTED only if the
conservative lower end clears 0.5, CONTRADICTED only if the upper end is
below it. With 5 seeds neither can happen (5 of 5 gives [0.48, 1]): the
power plan needs >= 6 seeds to decide. ``WITHIN`` and ``THRESHOLD_FRACTION``
are free constants: their sensitivity rows give the outcome at neighbouring
values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from experiments import protocol as P
from experiments.exact import share_meeting

NAME = "conv_claims"
CLAIM = (
    "(e) on a conv net, in a short run (480 steps of 32 at full scale, 0.28 "
    "epochs): with BN a residual network reaches the baseline's accuracy in "
    "fewer steps, tolerates >= 10x higher rates on most seeds, trains at 30x "
    "the baseline's rate and is more accurate at the end of the run than the "
    "same network without BN (SkipInit)."
)
VARIANTS = {"skipinit": 0.0, "bn": 1.0}  # variant -> its `bn` gate
LABELS = {"skipinit": "no BN, SkipInit", "bn": "BN"}
GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
LRS = {"skipinit": GRID, "bn": GRID}  # one grid: below either's best to past 30x
CHANNELS = (8, 16, 32)
CHANCE = 0.1
WITHIN = 0.01
THRESHOLD_FRACTION = 0.95
FRACTION_NEIGHBOURS = (0.9, 0.99)  # the sensitivity row's values
WITHIN_NEIGHBOURS = (0.005, 0.02)
LR_LIMITS = (0.003, 30.0)  # the equal-tuning rule's limits on an extended grid
RANGE = 10.0
MAJORITY = 0.5
# usable_range is a share of seeds with an exact (Clopper-Pearson) interval:
# at 5 seeds even 5 of 5 leaves its lower end at 0.478 < MAJORITY, so no
# outcome but INCONCLUSIVE is possible; 8 seeds decide 8 of 8 (lower end
# 0.69) or 0 of 8 (upper end 0.31). The power plan asks for at least this.
MIN_SEEDS = 8
CRITERIA = [
    P.Criterion(
        "bn_faster",
        f"steps to {THRESHOLD_FRACTION:g} x SkipInit's final validation score (mean "
        "of its last 3 evaluations), BN / SkipInit, each at its chosen lr, in the "
        "short run (geometric mean of per-seed ratios)",
        "<",
        1.0,
        "Ioffe & Szegedy 2015 sec. 4.2.2 (Inception, a conv net): BN-Baseline "
        "reached Inception's accuracy in 13.3M vs 31.0M steps",
        null=1.0,
    ),
    P.Criterion(
        "usable_range",
        "share of seeds on which BN's largest usable lr (validation score within "
        f"{WITHIN:g} of the seed's best, not diverged) is >= {RANGE:g}x SkipInit's, "
        "decided from the grid brackets (undetermined seeds count against the "
        "claim at the interval's lower end and for it at its upper end); exact "
        "Clopper-Pearson interval",
        ">",
        MAJORITY,
        "Ioffe & Szegedy 2015 sec. 4.2.2: BN-x5 and BN-x30 train; issue 16 fixes "
        "'much higher' as >= 10x, one point of validation accuracy as 'usable'; "
        "'on most seeds' = a majority (a sign test against 0.5)",
    ),
    P.Criterion(
        "bn_30x",
        "test accuracy at the end of the short run: BN at 30x SkipInit's chosen lr - "
        "SkipInit at its chosen lr (paired by seed; a diverged arm counts as chance, 0.1); "
        "premise: the grid has a rate within sqrt(3) of 30x",
        ">",
        0.0,
        "Ioffe & Szegedy 2015 Table 2: BN-x30 ends above Inception (74.8% vs 72.2%)",
        null=0.0,
    ),
    P.Criterion(
        "bn_more_accurate",
        "test accuracy at the end of the short run: BN - SkipInit, each at its "
        "chosen lr (paired by seed)",
        ">",
        0.0,
        "Ioffe & Szegedy 2015 Table 2: BN-Baseline 72.7% vs Inception 72.2%; De & "
        "Smith 2020 Table 2: SkipInit close to, but below, BN at small batch sizes",
        null=0.0,
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
        "criterion": "the design registered at 6e0f946: bn_30x counted a diverged "
        "arm's test accuracy as 0",
        "run": "superseded/full-6e0f946",
        "why": "the review of issue 21 (written before this result existed, "
        "docs/reproduction.md at 685662f): a diverged network is no better than a "
        "guess, chance (0.1) on a balanced 10-class test set, while 0 would be a "
        "network that is always wrong; counting 0 overstates what BN loses at 30x. "
        "A diverged arm now counts as chance; the other checks are unchanged",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946 (pilot)",
        "pilot": "quick-100",
        "why": "pilot of that design; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "usable_range: the ratio of the variants' largest usable GRID "
        "rates (within 0.01 of the best) >= 10, a t interval of the log ratios; "
        "the claim and its criteria without the run's length; lrs on a fixed grid; "
        "a BN seed that never reached the threshold counted as the run length; "
        "30x untested as an infinite interval",
        "pilot": "full-1000",
        "why": "issue 21: a t interval on a grid-valued quantity (ratios 1, 3, 3.3, "
        "10, 30 ...) is not a measurement; a per-seed bisection would cost this conv "
        "net several times its budget, so the claim is now tested as a count, "
        "exactly, with undetermined seeds counted against it where that is "
        "conservative. The run sees 0.28 epochs at full scale (Ioffe & Szegedy "
        "train Inception for millions of steps): the claim now says 'in a short "
        "run'. Grids extend past a chosen edge (equal tuning); a BN seed that never "
        "reaches the threshold makes its ratio infinite (as ioffe_table); the 30x "
        "check's missing rate is a premise (NOT TESTABLE). Null 1 for the steps "
        "ratio and 0 for the differences",
    },
    {
        "date": "2026-12-01",
        "criterion": "the same four criteria; constant rates, SkipInit's grid "
        "(0.003 ... 0.3), BN's (0.03 ... 3)",
        "result": "pilot at quick scale, seeds 0-4: bn_faster 0.38 [0.27, 0.55] "
        "PASS, usable_range 0.75 [0.41, 1.39] FAIL, bn_30x -0.55 [-0.61, -0.49] "
        "FAIL, bn_more_accurate 0.099 [0.026, 0.17] PASS",
        "why": "not a change of criterion: BN's best rate was the bottom of its "
        "grid (a grid must reach below the best), and a constant rate judges high "
        "rates at an arbitrary point of their noise; now one grid for both and a "
        "cosine decay (the paper decays its rates; as lr_robustness). The next "
        "pilot: 0.41 [0.26, 0.65] PASS, 1.22 [0.45, 3.29] FAIL, -0.49 [-0.65, "
        "-0.33] FAIL, 0.070 [0.033, 0.11] PASS; the grid's lowest rate (0.01, "
        "worst for both) was then dropped for the budget",
    },
    {
        "date": "2026-12-01",
        "criterion": "the usable rate interpolated in log lr up to the next grid "
        "rate (also towards a diverged rate); BN at the grid rate nearest 30x",
        "result": "the pilot above (usable_range 1.22 [0.45, 3.29] FAIL)",
        "why": "a pre-run review: interpolating towards a diverged rate favours the "
        "arm that degrades gently; a '30x' check at a grid rate far from 30x tests "
        "something else (now untested, an infinite interval, when the nearest rate "
        "is more than sqrt(3) away). Thresholds unchanged",
    },
]


class ShiftConv(nn.Module):
    """A 'SAME' convolution as a sum of shifted matrix products (vmaps into
    batched products; see the module docstring).

    Attributes:
      features: output channels.
      kernel: square kernel size (odd).
      stride: spatial stride.
    """

    features: int
    kernel: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, cin = self.kernel, self.stride, x.shape[-1]
        w = self.param(
            "kernel", nn.initializers.he_normal(), (k, k, cin, self.features)
        )
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        h, wd = x.shape[1], x.shape[2]
        ho, wo = -(-h // s), -(-wd // s)
        p = k // 2
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        out = b
        for dy in range(k):
            for dx in range(k):
                tap = xp[
                    :, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s
                ]
                out = out + jnp.einsum("bhwc,cd->bhwd", tap, w[dy, dx])
        return out


class SmallResNet(nn.Module):
    """A small residual network with two gates (``gates`` collection): ``bn``
    (BN after every convolution) and ``skipinit`` (each residual branch times
    a learnable scalar that starts at 0; 1 otherwise).

    Attributes:
      norm: BN factory, called with ``use_running_average``.
      channels: channels of the three stages.
      pool_stem: a 2x2 max pool after the stem (28x28 inputs).
    """

    norm: Callable[..., nn.Module]
    channels: tuple[int, ...] = CHANNELS
    pool_stem: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn_on = self.variable("gates", "bn", lambda: jnp.ones((), jnp.float32)).value
        skip = self.variable(
            "gates", "skipinit", lambda: jnp.zeros((), jnp.float32)
        ).value

        def norm(h):
            bn = self.norm(use_running_average=not train)(h)
            return jnp.where(bn_on > 0.5, bn, h)

        x = nn.relu(norm(ShiftConv(self.channels[0], 3, 2)(x)))
        if self.pool_stem:
            x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
        for i, c in enumerate(self.channels):
            stride = 1 if i == 0 else 2
            y = nn.relu(norm(ShiftConv(c, 3, stride)(x)))
            y = norm(ShiftConv(c, 3, 1)(y))
            alpha = self.param(f"skipinit_{i}", nn.initializers.zeros, ())
            y = y * jnp.where(skip > 0.5, alpha, 1.0)
            if x.shape != y.shape:
                x = norm(ShiftConv(c, 1, stride)(x))
            x = nn.relu(x + y)
        return nn.Dense(10, kernel_init=nn.initializers.he_normal())(
            jnp.mean(x, axis=(1, 2))
        )


def post_init(variables: dict, hp: dict) -> dict:
    bn = hp["bn"]
    return {**variables, "gates": {"bn": bn, "skipinit": 1.0 - bn}}


def steps_to(steps: np.ndarray, curves: np.ndarray, threshold: float) -> list:
    """Per seed (curves: (evals, seeds)): the step at which the curve first
    reaches ``threshold`` (:func:`protocol.steps_to`), None if never."""
    return [
        P.steps_to(steps, [v if np.isfinite(v) else None for v in c], threshold)
        for c in curves.T
    ]


def bracket(
    values: list[float], score: np.ndarray, diverged: np.ndarray, within: float
) -> tuple[float, float]:
    """One seed's bracket ``(lo, hi)`` of a variant's largest usable rate on
    its grid (``score``, ``diverged``: per sorted grid value): ``lo`` the
    largest usable value (not diverged, score within ``within`` of the best;
    NaN if none), ``hi`` the next value above it (inf when ``lo`` is the
    top: censored).

    Example:
      >>> bracket([0.1, 0.3, 1.0], np.array([0.8, 0.795, 0.5]), np.zeros(3, bool), 0.01)
      (0.3, 1.0)
    """
    usable = ~np.asarray(diverged) & (np.asarray(score) >= np.max(score) - within)
    if not usable.any():
        return math.nan, math.nan
    i = int(np.flatnonzero(usable).max())
    return float(values[i]), (
        math.inf if i == len(values) - 1 else float(values[i + 1])
    )


def meets_range(bn: tuple, base: tuple, factor: float) -> float:
    """Whether BN's largest usable rate is >= ``factor`` x the baseline's on
    one seed, from the two brackets ``(lo, hi)``: 1.0 surely (BN's ``lo`` >=
    ``factor`` x the baseline's ``hi``), 0.0 surely not (BN's ``hi`` <=
    ``factor`` x the baseline's ``lo``), 0.5 undetermined (the brackets
    straddle the factor, a censored top, or no usable rate).

    Example:
      >>> meets_range((3.0, 10.0), (0.1, 0.3), 10), meets_range((0.3, 1.0), (0.1, 0.3), 10)
      (1.0, 0.0)
      >>> meets_range((1.0, 3.0), (0.1, 0.3), 10)
      0.5
    """
    (b_lo, b_hi), (s_lo, s_hi) = bn, base
    if math.isnan(b_lo) or math.isnan(s_lo):
        return 0.5
    if b_lo >= factor * s_hi:
        return 1.0
    if b_hi <= factor * s_lo:
        return 0.0
    return 0.5


def run(ctx: P.Context) -> P.Outcome:
    steps = ctx.steps(120, 480)
    every = ctx.every(20, 40)
    batch = 32
    images = ctx.images
    n_val = ctx.pick(len(images.x_val), 2000)
    # test only at the end (final weights): evaluating it at every evaluation
    # would cost more than the training at this budget
    data = images._replace(
        x_val=images.x_val[:n_val], y_val=images.y_val[:n_val], x_test=None, y_test=None
    )
    model = SmallResNet(
        norm=functools.partial(bnlab.linen.BatchNorm, momentum=0.9),
        # smoke: one stage (compilation dominates a smoke run)
        channels=CHANNELS[:1] if ctx.smoke else CHANNELS,
        pool_stem=images.x_train.shape[1] > 14,
    )
    grid = ctx.fit_grid(
        "arms",
        model,
        arms=[{"bn": b} for b in VARIANTS.values()],
        grid=lambda arm: LRS[_variant(arm["bn"])],
        limits=LR_LIMITS,
        optimizer=lambda hp: optax.sgd(
            optax.cosine_decay_schedule(hp["lr"], steps), momentum=0.9
        ),
        post_init=post_init,
        steps=steps,
        batch_size=batch,
        eval_every=every,
        steps_per_call=every,
        data=data,
    )
    seeds = list(ctx.seeds)
    accuracy = P.make_accuracy(model, batch=1000)
    acc_test = {}  # (bn, lr, seed) -> test accuracy (chance where it diverged)
    for r in grid.results:
        acc = accuracy(
            {k: r.variables[k] for k in ("params", "batch_stats", "gates")},
            images.x_test,
            images.y_test,
        )
        for a in r.arms:
            dead = r.stopped_at[a.index] is not None
            # a diverged network predicts no better than a guess: chance,
            # not 0 (0 would be a network that is always wrong)
            acc_test[(a.hparams["bn"], a.hparams["lr"], a.seed)] = (
                CHANCE if dead else float(acc[a.index])
            )
    evals, _ = grid.curve("val_accuracy")
    values, score, diverged, tuned, curve, test, plateau = {}, {}, {}, {}, {}, {}, {}
    for v, b in VARIANTS.items():
        values[v] = grid.values({"bn": b})
        score[v], diverged[v] = P.plateau_scores(grid, {"bn": b}, CHANCE)
        tuned[v] = grid.tune(where={"bn": b}, report="val_accuracy")
        _, curve[v] = P.grid_by_hparams(grid, "val_accuracy", "lr", {"bn": b})
        test[v] = np.asarray(
            [[acc_test[(b, lr, s)] for s in seeds] for lr in values[v]]
        )  # (lrs, seeds)
        plateau[v] = P.plateau(grid, where={"bn": b}, hp="lr", value=tuned[v].value)
    base, bn = tuned["skipinit"], tuned["bn"]
    final = float(np.mean(curve["skipinit"][-3:, base.index, :]))

    def faster_at(fraction: float) -> P.Measured:
        threshold = fraction * final
        t_base = steps_to(evals, curve["skipinit"][:, base.index, :], threshold)
        t_bn = steps_to(evals, curve["bn"][:, bn.index, :], threshold)
        ratios, bn_never, base_never = P.steps_ratio(t_bn, t_base, steps)
        return P.ratio_ci(
            ratios,
            np.ones(len(ratios)),
            note=f"seeds that never reached {threshold:.3f}: BN {bn_never} (ratio "
            f"infinite), SkipInit {base_never} (counted as the run length, {steps} "
            "steps: the ratio is then an upper bound)",
        )

    def range_at(within: float) -> P.Measured:
        per_seed = []
        for j in range(len(seeds)):
            br = {
                v: bracket(values[v], score[v][:, j], diverged[v][:, j], within)
                for v in VARIANTS
            }
            per_seed.append(meets_range(br["bn"], br["skipinit"], RANGE))
        return share_meeting(per_seed)

    faster = {
        f: faster_at(f) for f in sorted({THRESHOLD_FRACTION, *FRACTION_NEIGHBOURS})
    }
    ranges = {w: range_at(w) for w in sorted({WITHIN, *WITHIN_NEIGHBOURS})}
    threshold = THRESHOLD_FRACTION * final
    i30 = int(np.argmin(np.abs(np.log(values["bn"]) - math.log(30 * base.value))))
    lr30 = values["bn"][i30]
    x30 = lr30 / base.value
    bn_30x = P.paired_ci(
        test["bn"][i30],
        test["skipinit"][base.index],
        note=f"BN at lr {lr30:g} = {x30:.3g}x SkipInit's {base.value:g}",
    )
    near30 = 30 / math.sqrt(3) <= x30 <= 30 * math.sqrt(3)
    t_bn30 = steps_to(evals, curve["bn"][:, i30, :], threshold)
    t_bn = steps_to(evals, curve["bn"][:, bn.index, :], threshold)
    measured = {
        "bn_faster": faster[THRESHOLD_FRACTION],
        "usable_range": ranges[WITHIN],
        "bn_30x": bn_30x,
        "bn_more_accurate": P.paired_ci(
            test["bn"][bn.index], test["skipinit"][base.index]
        ),
    }
    premises = {
        "bn_30x": P.Premise(
            near30,
            f"the grid's rate nearest 30x SkipInit's chosen lr {base.value:g} is "
            f"{lr30:g} = {x30:.3g}x"
            + ("" if near30 else " (more than sqrt(3) from 30x: 30x is not tested)"),
        )
    }
    n = len(seeds)

    def outcome(c_id: str, m: P.Measured) -> str:
        c = next(c for c in CRITERIA if c.id == c_id)
        return P.decide(m.low, m.high, c.op, c.at(ctx.scale), c.null, n).outcome

    sensitivity = {
        "bn_faster": P.Sensitivity(
            "THRESHOLD_FRACTION (of SkipInit's final validation score)",
            THRESHOLD_FRACTION,
            P.sensitivity(
                lambda f: outcome("bn_faster", faster[f]),
                THRESHOLD_FRACTION,
                FRACTION_NEIGHBOURS,
            ),
        ),
        "usable_range": P.Sensitivity(
            "WITHIN (how far below the seed's best a usable rate may score)",
            WITHIN,
            P.sensitivity(
                lambda w: outcome("usable_range", ranges[w]), WITHIN, WITHIN_NEIGHBOURS
            ),
        ),
    }
    reported = {
        f"steps to the threshold, BN at {lr30:g} / BN at its chosen lr": P.ratio_ci(
            P.steps_ratio(t_bn30, t_bn, steps)[0], np.ones(n)
        ),
        "threshold (validation accuracy)": P.Measured(threshold, threshold, threshold),
    }
    brackets = "; ".join(
        f"seed {s}: "
        + ", ".join(
            "{} [{:g}, {:g}]".format(
                LABELS[v],
                *bracket(values[v], score[v][:, j], diverged[v][:, j], WITHIN),
            )
            for v in VARIANTS
        )
        for j, s in enumerate(seeds)
    )
    table = []
    for v, b in VARIANTS.items():
        for j, lr in enumerate(values[v]):
            stopped = sum(_stopped(grid, b, lr, s) for s in seeds)
            table.append(
                {
                    "variant": LABELS[v],
                    "lr": lr,
                    "validation score (mean of seeds)": float(np.mean(score[v][j])),
                    "test accuracy (95% interval)": P.fmt(P.mean_ci(test[v][j])),
                    "diverged seeds": stopped,
                    "chosen (validation)": tuned[v].text()
                    if tuned[v].value == lr
                    else "",
                    "plateau at the end (chosen lr)": plateau[v].text
                    if tuned[v].value == lr
                    else "",
                }
            )
    records = [
        {
            "variant": LABELS[v],
            "lr": lr,
            "seed": s,
            "val_accuracy": curve[v][:, j, i].tolist(),
            "test_accuracy": float(test[v][j, i]),
        }
        for v in VARIANTS
        for j, lr in enumerate(values[v])
        for i, s in enumerate(seeds)
    ]
    figure = _figure(ctx, evals, curve, score, values, tuned, threshold)
    extended = (
        f"grids extended past a chosen edge: {grid.extensions}"
        if grid.extensions
        else "no grid extended (both choices interior)"
    )
    notes = (
        f"{ctx.data_name} images; SmallResNet (channels {CHANNELS}), He init; SGD "
        f"momentum 0.9, cosine-decayed lr, batch {batch}, {steps} steps "
        f"({steps * batch / len(images.x_train):.2f} epochs); validation on {n_val} "
        f"examples every {every} steps; chosen lr: SkipInit {base.text()}, BN "
        f"{bn.text()}; {extended}; threshold {threshold:.3f} = {THRESHOLD_FRACTION:g} "
        "x SkipInit's final validation score; test accuracy of the final weights. "
        f"Largest usable grid lr and the next one (within {WITHIN:g}): {brackets}."
    )
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        notes=notes,
        reported=reported,
        premises=premises,
        sensitivity=sensitivity,
    )


def _variant(bn: float) -> str:
    return next(v for v, b in VARIANTS.items() if b == bn)


def _stopped(grid: P.Grid, bn: float, lr: float, seed: int) -> bool:
    for r in grid.results:
        for a in r.arms:
            if a.seed == seed and a.hparams == {"bn": bn, "lr": lr}:
                return r.stopped_at[a.index] is not None
    raise KeyError((bn, lr, seed))


def _figure(ctx, evals, curve, score, values, tuned, threshold) -> str:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for j, v in enumerate(VARIANTS):
        c = curve[v][:, tuned[v].index, :]
        a.plot(
            evals,
            np.nanmean(c, 1),
            f"C{j}",
            label=f"{LABELS[v]} (lr {tuned[v].value:g})",
        )
        a.fill_between(
            evals, np.nanmin(c, 1), np.nanmax(c, 1), color=f"C{j}", alpha=0.2
        )
        m = score[v].mean(1)
        b.plot(values[v], m, f"C{j}", marker="o", label=LABELS[v])
    a.axhline(threshold, color="k", ls=":", lw=0.8)
    a.set_xlabel("training step")
    a.set_ylabel("validation accuracy (band: min-max over seeds)")
    a.set_title("Each variant at its chosen lr (dotted: threshold)")
    a.legend(fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("learning rate")
    b.set_ylabel("validation score (last 3 evaluations; diverged = 0.1)")
    b.set_title("Rate sensitivity")
    b.legend(fontsize=7)
    return ctx.save_figure(fig, "conv_claims")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
