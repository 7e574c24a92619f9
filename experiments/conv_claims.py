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
validation (mean of the last 3 evaluations over seeds). Convolutions are
written as 9 shifted matrix products (:class:`ShiftConv`): XLA:CPU runs
``lax.conv`` per arm as a grouped convolution under ``vmap`` and slowly
inside ``lax.scan``; matrix products vmap into batched products.

Measured, as in ``ioffe_table`` and ``lr_robustness``: steps to
``THRESHOLD_FRACTION`` of the tuned baseline's validation plateau (per seed,
a ratio; a baseline seed that never gets there counts as the run length, a
lower bound); each variant's usable rate (the largest rate whose validation
score is within ``WITHIN`` of that seed's best, a grid rate: no
interpolation towards a rate that diverged);
BN at 30x the baseline's chosen rate; test accuracy of the final weights.
"""

from __future__ import annotations

import dataclasses
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

NAME = "conv_claims"
CLAIM = (
    "(e) on a conv net: with BN a residual network reaches the baseline's accuracy "
    "in fewer steps, tolerates >= 10x higher rates, trains at 30x the "
    "baseline's rate and is more accurate at the end of a short run than the same "
    "network without BN (SkipInit)."
)
VARIANTS = {"skipinit": 0.0, "bn": 1.0}  # variant -> its `bn` gate
LABELS = {"skipinit": "no BN, SkipInit", "bn": "BN"}
GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
LRS = {"skipinit": GRID, "bn": GRID}  # one grid: below either's best to past 30x
CHANNELS = (8, 16, 32)
CHANCE = 0.1
WITHIN = 0.01
THRESHOLD_FRACTION = 0.95
RANGE = 10.0
CRITERIA = [
    P.Criterion(
        "bn_faster",
        f"steps to {THRESHOLD_FRACTION:g} x the baseline's validation plateau, BN / "
        "SkipInit, each at its chosen lr (geometric mean of per-seed ratios)",
        "<",
        1.0,
        "Ioffe & Szegedy 2015 sec. 4.2.2 (Inception, a conv net): BN-Baseline "
        "reached Inception's accuracy in 13.3M vs 31.0M steps",
    ),
    P.Criterion(
        "usable_range",
        f"largest lr within {WITHIN:g} of the variant's own best validation "
        "accuracy, BN / SkipInit (geometric mean of per-seed ratios)",
        ">=",
        RANGE,
        "Ioffe & Szegedy 2015 sec. 4.2.2: BN-x5 and BN-x30 train; issue 16 fixes "
        "'much higher' as >= 10x, one point of validation accuracy as 'usable'",
    ),
    P.Criterion(
        "bn_30x",
        "test accuracy: BN at 30x SkipInit's chosen lr - SkipInit at its chosen lr "
        "(paired by seed; a diverged arm counts as 0)",
        ">",
        0.0,
        "Ioffe & Szegedy 2015 Table 2: BN-x30 ends above Inception (74.8% vs 72.2%)",
    ),
    P.Criterion(
        "bn_more_accurate",
        "test accuracy: BN - SkipInit, each at its chosen lr (paired by seed)",
        ">",
        0.0,
        "Ioffe & Szegedy 2015 Table 2: BN-Baseline 72.7% vs Inception 72.2%; De & "
        "Smith 2020 Table 2: SkipInit close to, but below, BN at small batch sizes",
    ),
]
HISTORY = [
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


def steps_to(
    steps: np.ndarray, curves: np.ndarray, threshold: float, cap: int
) -> tuple[np.ndarray, int]:
    """Per seed (curves: (evals, seeds)): the first evaluation step reaching
    ``threshold``, ``cap`` (the run length) for a seed that never does; and
    the number of such seeds."""
    out, never = [], 0
    for c in curves.T:
        s = P.steps_to(steps, [v if np.isfinite(v) else None for v in c], threshold)
        never += s is None
        out.append(cap if s is None else s)
    return np.asarray(out, np.float64), never


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
    settings = [{"bn": b, "lr": lr} for v, b in VARIANTS.items() for lr in LRS[v]]
    result = ctx.fit(
        "arms",
        model,
        hparams=settings,
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
    acc_test = P.make_accuracy(model, batch=1000)(
        {k: result.variables[k] for k in ("params", "batch_stats", "gates")},
        images.x_test,
        images.y_test,
    )
    dead = np.asarray([s is not None for s in result.stopped_at])
    acc_test = np.where(dead, 0.0, acc_test)  # a diverged arm counts as 0
    evals, _ = result.curve("val_accuracy")
    score, use, tuned, curve, test = {}, {}, {}, {}, {}
    for v, b in VARIANTS.items():
        score[v], _ = P.plateau_scores(result, {"bn": b}, CHANCE)
        use[v] = P.usable_rate(score[v], LRS[v], WITHIN)
        tuned[v] = P.tune(result, where={"bn": b})
        _, val = P.grid_by_hparams(result, "val_accuracy", "lr", {"bn": b})
        curve[v] = val  # (evals, lrs, seeds)
        test[v] = np.asarray(
            [[acc_test[_arm(result, b, lr, s)] for s in seeds] for lr in LRS[v]]
        )  # (lrs, seeds)
    base, bn = tuned["skipinit"], tuned["bn"]
    plateau = float(np.mean(curve["skipinit"][-3:, base.index, :]))
    threshold = THRESHOLD_FRACTION * plateau
    t_base, never = steps_to(
        evals, curve["skipinit"][:, base.index, :], threshold, steps
    )
    t_bn, bn_never = steps_to(evals, curve["bn"][:, bn.index, :], threshold, steps)
    i30 = int(np.argmin(np.abs(np.log(LRS["bn"]) - math.log(30 * base.value))))
    lr30 = LRS["bn"][i30]
    t_bn30, _ = steps_to(evals, curve["bn"][:, i30, :], threshold, steps)
    x30 = lr30 / base.value
    bn_30x = P.paired_ci(
        test["bn"][i30],
        test["skipinit"][base.index],
        note=f"BN at lr {lr30:g} = {x30:.3g}x SkipInit's {base.value:g}",
    )
    if not 30 / math.sqrt(3) <= x30 <= 30 * math.sqrt(3):  # the grid misses 30x
        bn_30x = P.Measured(
            math.nan,
            -math.inf,
            math.inf,
            None,
            f"untested: the grid's rate nearest 30x SkipInit's chosen lr is {x30:.3g}x",
        )
    measured = {
        "bn_faster": P.ratio_ci(t_bn, t_base),
        "usable_range": P.ratio_ci(use["bn"], use["skipinit"]),
        "bn_30x": bn_30x,
        "bn_more_accurate": P.paired_ci(
            test["bn"][bn.index], test["skipinit"][base.index]
        ),
    }
    censored = int(np.sum(use["bn"] >= LRS["bn"][-1]))
    if np.any(use["skipinit"] >= LRS["skipinit"][-1]):  # no ratio can be measured
        measured["usable_range"] = P.Measured(
            math.nan,
            -math.inf,
            math.inf,
            tuple(use["skipinit"]),
            "SkipInit usable at the top of the grid on some seed: no ratio",
        )
    elif censored:
        measured["usable_range"] = dataclasses.replace(
            measured["usable_range"],
            note=f"{censored} BN seed(s) usable at the top of its grid: counted there "
            "(a lower bound)",
        )
    if never or bn_never:
        measured["bn_faster"] = dataclasses.replace(
            measured["bn_faster"],
            note=f"seeds that never reached the threshold, counted as the run length: "
            f"SkipInit {never} (the ratio is then an upper bound), BN {bn_never} "
            "(a lower bound)",
        )
    reported = {
        f"steps_bn_at_{lr30:g}_over_bn_at_its_lr": P.ratio_ci(t_bn30, t_bn),
        "usable_lr_bn": P.mean_ci(use["bn"]),
        "usable_lr_skipinit": P.mean_ci(use["skipinit"]),
        "threshold_val_accuracy": P.Measured(threshold, threshold, threshold),
    }
    table = []
    for v, b in VARIANTS.items():
        for j, lr in enumerate(LRS[v]):
            stopped = sum(
                result.stopped_at[_arm(result, b, lr, s)] is not None for s in seeds
            )
            table.append(
                {
                    "variant": LABELS[v],
                    "lr": lr,
                    "validation score (mean of seeds)": float(np.mean(score[v][j])),
                    "test accuracy (95% interval)": P.fmt(P.mean_ci(test[v][j])),
                    "diverged seeds": stopped,
                    "chosen (validation)": "yes" if tuned[v].value == lr else "",
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
        for j, lr in enumerate(LRS[v])
        for i, s in enumerate(seeds)
    ]
    figure = _figure(ctx, evals, curve, score, tuned, threshold)
    notes = (
        f"{ctx.data_name} images; SmallResNet (channels {CHANNELS}), He init; SGD "
        f"momentum 0.9, cosine-decayed lr, batch {batch}, {steps} steps; "
        f"validation on {n_val} "
        f"examples every {every} steps; chosen lr: SkipInit {base.value:g}, BN "
        f"{bn.value:g}; threshold {threshold:.3f} = {THRESHOLD_FRACTION:g} x "
        f"SkipInit's plateau; test accuracy of the final weights."
    )
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        notes=notes,
        reported=reported,
    )


def _arm(result, bn: float, lr: float, seed: int) -> int:
    for a in result.arms:
        if a.seed == seed and a.hparams["bn"] == bn and a.hparams["lr"] == lr:
            return a.index
    raise KeyError((bn, lr, seed))


def _figure(ctx, evals, curve, score, tuned, threshold) -> str:
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
        b.plot(LRS[v], m, f"C{j}", marker="o", label=LABELS[v])
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
