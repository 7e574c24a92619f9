"""Batch renormalization vs BN (Ioffe 2017, arXiv:1702.03275): when the
examples BN normalizes over are few (micro-batches) or not i.i.d., the
batch statistics seen in training differ from the population statistics
used at inference; renorm's correction (r, d) removes the mismatch.

A 3-layer ReLU MLP (He init) whose normalization is BN or batch renorm as a
per-arm switch of one program (:class:`RenormMLP`: renorm with ``r_max = 1,
d_max = 0`` is BN exactly, so the switch is the arm's ``r_max`` / ``d_max``
schedule, passed through ``fit``'s ``train_kwargs``; arms of one seed start
from the same weights). SGD with momentum 0.9, batches of 32, as
in Ioffe's two experiments:

- micro-batches: each batch of 32 i.i.d. examples is normalized as 8
  micro-batches of 4, each with its own statistics (the loss is over the
  whole batch; the running statistics follow the whole batch);
- non-i.i.d. (judged): Ioffe's own design, each batch of 32 holds 16
  pairs of examples of the same class, normalized together; reported beside
  it, the earlier design of 2 classes per batch (16 examples of each).
  ``fit`` has no sampler, so the training set is rebuilt as class-pure
  groups (an example is a group of 2, or 16, examples of one class; the
  model flattens groups into rows and the loss scores every row): fit's
  per-seed shuffle then draws random groups. Groups are fixed (each example
  keeps its group across epochs), where Ioffe drew fresh pairs every step.
  With 10 classes, pairs change little: an i.i.d. batch of 32 holds about
  9.7 distinct classes and one of 16 pairs about 8.5, where on ImageNet
  pairs halve them; the judged check is still Ioffe's design (issue 21),
  and the milder mismatch is a reason it may not separate the variants.

Renorm follows the paper's schedule scaled to the run (plain BN for the
first 5 %, r_max 1 -> 3 by 50 %, d_max 0 -> 5 by 30 %). Every variant gets
its own lr grid, chosen on validation and extended past an edge it chose
(:meth:`protocol.Context.fit_grid`); inference uses the running statistics
(momentum 0.99). The runs are short (1000 steps of 32 at full scale, 0.6
epochs): the claim is judged at the end of that run, and whether each arm
reached a plateau (:func:`protocol.plateau`) is reported per arm.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab
from bnlab.models import kernel_init
from experiments import protocol as P

NAME = "renorm_small_batch"
CLAIM = (
    "Batch renormalization beats BN with micro-batches of 4 and with non-i.i.d. "
    "batches (Ioffe 2017), at the end of a short run (under one epoch at full "
    "scale; plateau reported per arm)."
)
# lr grid per setting (the same for both variants), placed by quick pilots
# (2026-12-01) around both variants' best: 2-class batches want a smaller lr;
# a variant that chooses an edge gets the next value past it (fit_grid)
LRS = {
    "micro": (0.01, 0.03, 0.1),
    "classes2": (0.001, 0.003, 0.01),
    "pairs": (0.003, 0.01, 0.03),
}
BATCH = 32
MICRO = 4
VARIANTS = {0: "BN", 1: "batch renorm"}
GROUP = {"classes2": BATCH // 2, "pairs": 2}  # class-pure group sizes
SETTINGS = {
    "micro": f"micro-batches of {MICRO} (batch {BATCH})",
    "pairs": f"non-i.i.d.: {BATCH // 2} class-pure pairs per batch (Ioffe's)",
    "classes2": f"non-i.i.d.: 2 classes per batch ({BATCH // 2} + {BATCH // 2})",
}
# the equal-tuning rule's limits on an extended lr grid
LR_LIMITS = (1e-4, 1.0)
_SRC = (
    "Ioffe 2017 (small and non-i.i.d. minibatches: renorm several points above "
    "BN); threshold of the earlier design (2026-11-20), kept"
)
CRITERIA = [
    P.Criterion(
        "micro_batches",
        f"micro-batches of {MICRO}: renorm - BN test accuracy at the end of the run "
        "(paired by seed, each at its lr chosen on validation)",
        ">=",
        0.02,
        _SRC,
        null=0.0,
    ),
    P.Criterion(
        "non_iid",
        f"non-i.i.d. batches as Ioffe 2017: {BATCH // 2} class-pure pairs per batch "
        f"of {BATCH}; renorm - BN test accuracy at the end of the run (paired by "
        "seed, each at its lr chosen on validation)",
        ">=",
        0.02,
        _SRC,
        null=0.0,
    ),
]
HISTORY = [
    {
        "date": "2026-11-20",
        "criterion": "renorm - BN >= 2 points on mean final test accuracy (3 seeds, "
        "fixed lr): (i) batches of 4, lr 0.01; (ii) batches of 32 drawn from 2 "
        "classes each, lr 0.05",
        "result": "PASS: 3.7 and 49.1 points (means, no interval)",
        "why": "no interval, 3 seeds, no lr tuned per variant (issue 16); (i) used a "
        "batch of 4 where Ioffe normalizes micro-batches of 4 inside a batch of "
        "32 (now as Ioffe); (ii) is kept, and Ioffe's class-pure pairs are "
        "reported beside it",
    },
    {
        "date": "2026-12-01",
        "criterion": "non-i.i.d. as Ioffe's 16 class-pure pairs per batch of 32: "
        "renorm - BN >= 2 points (quick-scale pilot, 5 seeds, lr tuned)",
        "result": "FAIL at quick: -0.07 points [-1.4, 1.3]",
        "why": "with 10 classes, pairs leave batches nearly i.i.d. (about 8.5 "
        "distinct classes of 32 examples against 9.7), where on ImageNet they halve "
        "the classes per batch; the criterion went back to the earlier design's 2 "
        "classes per batch, and the pairs are reported",
    },
    {
        "date": "2026-12-05",
        "criterion": "non_iid judged on 2 classes per batch (16 + 16), renorm - BN "
        ">= 0.02 (Ioffe's 16 class-pure pairs reported only); every lr chosen on a "
        "fixed grid of 3 (BN's at an edge in two settings); no null",
        "pilot": "full-1000",
        "why": "the swap to 2 classes per batch (2026-12-01) followed a failing "
        "pilot, not the source: Ioffe 2017 (sec. 4.3) builds non-i.i.d. batches "
        "of 32 from 16 pairs of one class, so that is the judged design again "
        "(issue 21), the 2-class design reported; grids extend past a chosen edge "
        "for every variant (equal tuning); null 0 so that CONTRADICTED means "
        "renorm is worse, not short of 2 points",
    },
    {
        "date": "2026-12-05",
        "criterion": "this design (pilot)",
        "pilot": "quick-300",
        "why": "pilot of the registered design; nothing changed after it but the "
        "claim's wording, which now says what was measured (the end of a short "
        "run, plateau reported per arm; issue 21's narrower-claim rule)",
    },
]


# ------------------------------------------------------------------ model


class GroupRenorm(nn.Module):
    """Batch renorm (BN when ``r_max = 1, d_max = 0``) over ``groups``
    contiguous groups of the batch, each with its own statistics; the
    running statistics follow the whole batch's exact moments."""

    groups: int = 1
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool, r_max=1.0, d_max=0.0):
        f = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (f,))
        bias = self.param("bias", nn.initializers.zeros, (f,))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (f,))
        var = self.variable("batch_stats", "var", jnp.ones, (f,))
        stats = bnlab.BatchStats(mean.value, var.value)
        if not train:
            return bnlab.batch_norm(x, stats, scale, bias, train=False)[0]

        def renorm(xg):
            return bnlab.batch_renorm(
                xg,
                stats,
                scale,
                bias,
                train=True,
                r_max=r_max,
                d_max=d_max,
                momentum=self.momentum,
            )

        if self.groups == 1:
            y, new = renorm(x)
        else:
            n = x.shape[0]
            y = jax.vmap(lambda xg: renorm(xg)[0])(
                x.reshape(self.groups, n // self.groups, f)
            ).reshape(n, f)
            new = bnlab.batch_norm(x, stats, train=True, momentum=self.momentum)[1]
        if not self.is_initializing():
            mean.value, var.value = new.mean, new.var
        return y


class RenormMLP(nn.Module):
    """Dense -> (renorm | BN) -> ReLU layers. Inputs may carry extra leading
    axes (pairs ``(b, 2, features)``): rows are flattened for the layers and
    the outputs get the leading axes back. ``r_max`` / ``d_max`` come per
    training step through ``fit``'s ``train_kwargs``."""

    widths: tuple[int, ...]
    num_outputs: int = 10
    groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool, r_max=1.0, d_max=0.0):
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        k_init = kernel_init("he")
        for width in self.widths:
            h = nn.Dense(width, use_bias=False, kernel_init=k_init)(h)
            h = nn.relu(GroupRenorm(self.groups)(h, train, r_max, d_max))
        out = nn.Dense(self.num_outputs, kernel_init=k_init)(h)
        return out.reshape(*lead, self.num_outputs)


def schedule(steps: int):
    """``train_kwargs``: the renorm schedule for arms with ``renorm = 1``,
    ``r_max = 1, d_max = 0`` (BN) for the others."""
    r, d = bnlab.renorm_schedules(
        warmup_steps=max(steps // 20, 1),
        r_max_step=max(steps // 2, 2),
        d_max_step=max(3 * steps // 10, 2),
    )

    def kwargs(step, hp):
        on = hp["renorm"] > 0.5
        return {
            "r_max": jnp.where(on, r(step), 1.0),
            "d_max": jnp.where(on, d(step), 0.0),
        }

    return kwargs


# ------------------------------------------------------------------- data


def grouped_dataset(ds, k: int):
    """``ds`` with every split as groups ``(n, k, features)``: training
    groups hold ``k`` examples of one class (a fixed random grouping per
    class; the remainder of a class is dropped); validation and test groups
    are consecutive examples (inference uses running statistics, so their
    grouping does not matter; the last ``len % k`` examples are dropped)."""
    rng = np.random.default_rng([0, 1702])
    groups = []
    for c in np.unique(ds.y_train):
        members = rng.permutation(np.flatnonzero(ds.y_train == c))
        groups.append(members[: len(members) // k * k].reshape(-1, k))
    groups = np.concatenate(groups)

    def consecutive(x, y):
        n = len(y) // k * k
        return x[:n].reshape(n // k, k, -1), y[:n].reshape(n // k, k)

    x_val, y_val = consecutive(ds.x_val, ds.y_val)
    x_test, y_test = consecutive(ds.x_test, ds.y_test)
    return ds._replace(
        x_train=ds.x_train[groups],
        y_train=ds.y_train[groups],
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
    )


# -------------------------------------------------------------------- run


def run(ctx: P.Context) -> P.Outcome:
    width, depth = 64, 3
    steps = ctx.steps(600, 1000, smoke=20)
    every = max(steps // 4, 1)
    groups = {"micro": BATCH // MICRO, "classes2": 1, "pairs": 1}
    data = {"micro": ctx.data}
    batch = {"micro": BATCH}
    for s, k in GROUP.items():  # an example is a group of k
        data[s], batch[s] = grouped_dataset(ctx.data, k), BATCH // k
    tuned, results, plateaus = {}, {}, {}
    for s in SETTINGS:
        results[s] = ctx.fit_grid(
            s,
            RenormMLP((width,) * depth, 10, groups=groups[s]),
            arms=[{"renorm": float(v)} for v in VARIANTS],
            grid=LRS[s],
            limits=LR_LIMITS,
            optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
            train_kwargs=schedule(steps),
            steps=steps,
            batch_size=batch[s],
            eval_every=every,
            data=data[s],
        )
        for v in VARIANTS:
            where = {"renorm": float(v)}
            tuned[(s, v)] = results[s].tune(where=where)
            plateaus[(s, v)] = P.plateau(
                results[s], where=where, hp="lr", value=tuned[(s, v)].value
            )

    def diff(s):
        return P.paired_ci(tuned[(s, 1)].report, tuned[(s, 0)].report)

    measured = {"micro_batches": diff("micro"), "non_iid": diff("pairs")}
    reported = {
        "non-i.i.d., 2 classes per batch (the earlier design): renorm - BN test "
        "accuracy": diff("classes2")
    }
    table = [
        {
            "setting": label,
            "variant": VARIANTS[v],
            "chosen lr (validation)": tuned[(s, v)].text(),
            "validation accuracy by lr": ", ".join(
                f"{lr:g}: {a:.3f}"
                for lr, a in zip(tuned[(s, v)].grid, tuned[(s, v)].val, strict=True)
            ),
            "test accuracy (95% interval)": P.fmt(P.mean_ci(tuned[(s, v)].report)),
            "plateau (validation)": plateaus[(s, v)].text,
        }
        for s, label in SETTINGS.items()
        for v in VARIANTS
    ]
    records = [
        {
            "setting": s,
            "variant": VARIANTS[v],
            "lr": tuned[(s, v)].value,
            "seed": seed,
            "test_accuracy": float(a),
        }
        for s in SETTINGS
        for v in VARIANTS
        for seed, a in zip(ctx.seeds, tuned[(s, v)].report, strict=True)
    ]
    extended = "; ".join(
        f"{SETTINGS[s]}: {VARIANTS[int(e['arm']['renorm'])]} {e['edge']} {e['lr']:.3g}"
        for s in SETTINGS
        for e in results[s].extensions
    )
    figure = _figure(ctx, results, tuned)
    grids = "; ".join(f"{SETTINGS[k]} {v}" for k, v in LRS.items())
    k16 = GROUP["classes2"]
    kept_val = len(data["classes2"].y_val) * k16
    kept_test = len(data["classes2"].y_test) * k16
    return P.Outcome(
        measured,
        reported=reported,
        table=table,
        figures=[figure],
        records=records,
        notes=(
            f"{ctx.data_name}; MLP {depth} x {width}, ReLU, He init; {steps} steps of "
            f"SGD (momentum 0.9), {BATCH} examples per batch; lr grids: {grids}, "
            "each variant's chosen on validation (mean of the last 3 evaluations); "
            "test accuracy with running statistics (momentum 0.99), mean of the "
            f"last 3 evaluations. Grids extended past a chosen edge (equal "
            f"tuning, limits {LR_LIMITS}): {extended or 'none'}. With groups of "
            f"{k16}, validation and test keep {kept_val} and {kept_test} examples "
            "(the remainder of a group is dropped). Plateau: validation accuracy "
            f"rose < {P.PLATEAU_RISE:g} over the last third of the run; the claim "
            f"is judged at the end of the run ({steps} steps) whether or not."
        ),
    )


def _figure(ctx, results, tuned) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(16, 4), sharey=True)
    for ax, (s, label) in zip(axes, SETTINGS.items(), strict=True):
        steps, _ = results[s].curve("test_accuracy")
        for v, color in ((0, "tab:gray"), (1, "tab:blue")):
            _, acc = P.grid_by_hparams(
                results[s], "test_accuracy", "lr", {"renorm": float(v)}
            )
            curve = acc[:, tuned[(s, v)].index, :]
            ax.plot(
                steps,
                np.nanmean(curve, 1),
                "o-",
                color=color,
                label=f"{VARIANTS[v]} (lr {tuned[(s, v)].value:g})",
            )
            ax.fill_between(
                steps, np.nanmin(curve, 1), np.nanmax(curve, 1), color=color, alpha=0.2
            )
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.legend()
    axes[0].set_ylabel("test accuracy, running statistics (band: min-max)")
    return ctx.save_figure(fig, "renorm")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
