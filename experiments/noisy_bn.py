"""Noisy BN (Santurkar et al. 2018, arXiv:1805.11604, sec. 2.1, Fig. 2):
inject noise with a non-zero mean and a non-unit variance after every BN
layer, redrawn every step, so that each layer's input distribution shifts
all the time ("internal covariate shift" by construction), and see whether
training suffers.

A 4-layer ReLU MLP (He init), no BN or BN before every activation followed
by ``y * (1 + level * a) + level * b`` (``a, b ~ N(0, 1)`` per feature,
redrawn every training step; no noise at inference), all as gated arms of
one program (:class:`NoisyMLP`; arms of one seed start from the same
weights). SGD with momentum 0.9, batch 128; every arm gets its own lr grid,
chosen on validation. Reported, without a criterion (the paper's
"performance is almost unaffected" depends on a noise magnitude it does not
fix in a form we can match): test accuracy at the chosen lr and, at the
end, the instability of the last hidden layer's input in training (over 8
noise draws on one fixed batch, the standard deviation of each unit's
median input, averaged over units).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from bnlab.models import kernel_init, set_gates
from experiments import protocol as P

NAME = "noisy_bn"
CLAIM = (
    "Report: BN with noise injected after every layer (input distributions "
    "shifting every step) vs plain BN and no BN (Santurkar et al. 2018, Fig. 2)."
)
CRITERIA: list = []
HISTORY: list = []
LRS = (0.01, 0.03, 0.1)


class NoisyMLP(nn.Module):
    """Dense -> [BN -> noise] -> ReLU layers. Gates: ``gates/bn`` (0 or 1)
    and ``gates/level`` (the noise level); the noise comes from the
    ``noise`` RNG stream in training only."""

    widths: tuple[int, ...]
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        use_bn = self.variable("gates", "bn", lambda: jnp.zeros((), jnp.float32)).value
        level = self.variable("gates", "level", lambda: jnp.zeros((), jnp.float32))
        level = level.value
        k_init = kernel_init("he")
        h = x.reshape(x.shape[0], -1)
        bn = functools.partial(bnlab.linen.BatchNorm, momentum=0.9)
        noisy = train and self.has_rng("noise")
        if noisy:  # every layer's (a, b) in one draw
            draws = jax.random.normal(
                self.make_rng("noise"), (len(self.widths), 2, max(self.widths))
            )
        for i, width in enumerate(self.widths):
            h = nn.Dense(width, kernel_init=k_init)(h)
            y = bn(use_running_average=not train)(h)
            if noisy:
                a, b = draws[i, 0, :width], draws[i, 1, :width]
                y = y * (1 + level * a)[None] + (level * b)[None]
            h = jnp.where(use_bn > 0.5, y, h)
            self.sow("intermediates", f"act_input_{i}", h)
            h = nn.relu(h)
        return nn.Dense(self.num_outputs, kernel_init=k_init)(h)


def instability(model, x, depth: int, draws: int = 8):
    """``(variables, hp) -> scalar``: the mean over units of the standard
    deviation, over ``draws`` noise draws, of each unit's median input to the
    last activation (training mode, fixed batch ``x``)."""

    def f(variables, hp):
        del hp

        def median_input(key):
            _, cols = model.apply(
                variables,
                x,
                train=True,
                mutable=["batch_stats", "intermediates"],
                rngs={"noise": key},
            )
            h = cols["intermediates"][f"act_input_{depth - 1}"][0]
            return jnp.median(h, axis=0)

        meds = jax.vmap(median_input)(jax.random.split(jax.random.key(0), draws))
        return jnp.mean(jnp.std(meds, axis=0))

    return f


def run(ctx: P.Context) -> P.Outcome:
    width, depth = 64, 4
    steps = ctx.steps(300, 1000)
    every = max(steps // 4, 1)
    levels = (0.0, 0.5, 1.0)
    variants = {"no BN": (0.0, 0.0)} | {f"BN, noise {lv:g}": (1.0, lv) for lv in levels}
    data = ctx.data
    x = jnp.asarray(data.x_train[-256:])
    model = NoisyMLP((width,) * depth)
    result = ctx.fit(
        "arms",
        model,
        hparams=[
            {"bn": b, "level": lv, "lr": lr}
            for b, lv in variants.values()
            for lr in LRS
        ],
        optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        post_init=lambda v, hp: set_gates(v, bn=hp["bn"], level=hp["level"]),
        probe=instability(model, x, depth),
        rng_streams=("noise",),
        steps=steps,
        batch_size=128,
        eval_every=every,
    )
    tuned = {
        name: P.tune(result, where={"bn": b, "level": lv})
        for name, (b, lv) in variants.items()
    }
    shift = {}
    for name, (b, lv) in variants.items():
        t = tuned[name]
        _, v = P.grid_by_hparams(result, "probe", "lr", {"bn": b, "level": lv})
        shift[name] = v[-1, t.index, :]
    plain = tuned["BN, noise 0"].report
    reported = {}
    for name in variants:
        reported[f"{name}: test accuracy"] = P.mean_ci(tuned[name].report)
    for name in variants:
        if name not in ("no BN", "BN, noise 0"):
            reported[f"{name} - plain BN: test accuracy (paired)"] = P.paired_ci(
                tuned[name].report, plain
            )
        if name != "no BN":
            reported[f"{name} - no BN: test accuracy (paired)"] = P.paired_ci(
                tuned[name].report, tuned["no BN"].report
            )
    table = [
        {
            "arm": name,
            "chosen lr (validation)": tuned[name].text(),
            "validation accuracy by lr": ", ".join(
                f"{lr:g}: {a:.3f}" for lr, a in zip(LRS, tuned[name].val, strict=True)
            ),
            "test accuracy (95% interval)": P.fmt(P.mean_ci(tuned[name].report)),
            "input instability at the end": P.fmt(P.mean_ci(shift[name])),
        }
        for name in variants
    ]
    records = [
        {
            "arm": name,
            "lr": tuned[name].value,
            "seed": s,
            "test_accuracy": float(tuned[name].report[i]),
            "instability": float(shift[name][i]),
        }
        for name in variants
        for i, s in enumerate(ctx.seeds)
    ]
    figure = _figure(ctx, result, variants, tuned)
    return P.Outcome(
        {},
        reported=reported,
        table=table,
        figures=[figure],
        records=records,
        notes=(
            f"{ctx.data_name}; MLP {depth} x {width}, ReLU, He init; {steps} steps of "
            f"SGD (momentum 0.9), batch 128; noise levels {levels}; lr grid {LRS} "
            "per arm, chosen on validation (mean of the last 3 evaluations); test "
            "accuracy = mean of the last 3 evaluations. Instability on 256 fixed "
            "training examples, 8 noise draws. No criterion: a measurement."
        ),
    )


def _figure(ctx, result, variants, tuned) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps, _ = result.curve("test_accuracy")
    for name, (b, lv) in variants.items():
        _, acc = P.grid_by_hparams(
            result, "test_accuracy", "lr", {"bn": b, "level": lv}
        )
        curve = acc[:, tuned[name].index, :]
        ax.plot(
            steps,
            np.nanmean(curve, 1),
            "o-",
            label=f"{name} (lr {tuned[name].value:g})",
        )
        ax.fill_between(steps, np.nanmin(curve, 1), np.nanmax(curve, 1), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (band: min-max over seeds)")
    ax.set_title("BN with noise injected after every layer")
    ax.legend(fontsize=8)
    return ctx.save_figure(fig, "noisy_bn")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
