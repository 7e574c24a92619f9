"""Ghorbani et al. 2019 (arXiv:1901.10159): BN removes the large outlier
eigenvalues of the loss Hessian, but only when the statistics are those of
the batch (the gradient flows through them); with frozen population
statistics the outliers are back.

3 x 128 ReLU MLP on Fashion-MNIST (quick: digits, 3 x 64), SGD momentum 0.9,
lr 0.05, batch 128, 1000 steps (quick: 300). At initialization and at the
end, the top Hessian eigenvalue (power iteration, 100 Hessian-vector
products; bnlab.diagnostics.top_hessian_eigenvalue) of the loss on a fixed
batch of 1000 training examples (quick: 512) for: the network without BN;
the BN network with batch statistics; the BN network normalizing with
population statistics (bnlab.precise_stats over 50 batches of 256).
Both ratios are checked at both points.

    python -m experiments.hessian [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bnlab
from bnlab.diagnostics import top_hessian_eigenvalue
from experiments import _harness as H
from experiments._models import MLP

NAME = "hessian"
# What the committed full run shows and why, written after it (the
# criteria above were fixed before it and are not changed).
DISCUSSION = """At initialization the network without BN has the smaller top eigenvalue
(0.19x BN-batch), so the first check fails; after 1000 steps the ratio is
3.3 and BN with population statistics is 6-7x BN-batch at both points, as
the paper says. Our reading: with Flax's default (LeCun-normal) init the
un-normalized 3-layer ReLU net starts with small outputs (each ReLU layer
halves the second moment) and a flat loss, while BN rescales every layer to
unit variance from the first step; the outlier eigenvalues Ghorbani et al. describe grow during training.
The criterion at initialization is kept as it was set before the run."""
CLAIM = (
    "BN with batch statistics removes the large Hessian eigenvalues; the same "
    "network with frozen population statistics has them (Ghorbani et al. 2019)."
)


def eigen_fn(model, mode: str):
    """Jitted ``(variables, x, y, key) -> top eigenvalue`` (compiled once)."""

    def top(variables, x, y, key):
        def loss(params):
            v = {**variables, "params": params}
            if mode == "batch":
                logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
            else:  # no BN, or BN with the (population) statistics in `variables`
                logits = model.apply(v, x, train=False)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

        return top_hessian_eigenvalue(loss, variables["params"], key, iters=100)

    return jax.jit(top)


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    steps = ctx.steps(300, 1000)
    n = ctx.pick(512, 1000)
    seeds = list(range(ctx.seeds))
    data = ctx.data
    x, y = jnp.asarray(data.x_train[:n]), jnp.asarray(data.y_train[:n])
    n_pop = min(50, len(data.x_train) // 256)
    pop_batches = [
        jnp.asarray(data.x_train[i * 256 : (i + 1) * 256]) for i in range(n_pop)
    ]
    eig = {}  # (variant, when) -> per seed
    for arm, norm in (("nobn", "none"), ("bn", "before")):
        model = MLP(widths=(width,) * 3, activation="relu", norm=norm)
        r = H.train_group(
            ctx,
            H.Group(
                name=arm,
                model=model,
                seeds=seeds,
                hparams={"lr": [0.05] * len(seeds)},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=128,
                eval_every=steps,
            ),
        )

        def run_train(v, xb, mutable, model=model):
            return model.apply(v, xb, train=True, mutable=mutable)

        modes = {m: eigen_fn(model, m) for m in ("none", "batch", "pop")}

        def top_eig(v, mode, key, modes=modes):
            return float(modes[mode](v, x, y, key))

        for s in seeds:
            for when, v in (
                ("init", model.init(jax.random.key(s), x[:2], train=False)),
                ("trained", H.arm_slice(r.variables, s)),
            ):
                key = jax.random.key(1000 + s)
                if norm == "none":
                    eig.setdefault(("no BN", when), []).append(top_eig(v, "none", key))
                    continue
                eig.setdefault(("BN, batch statistics", when), []).append(
                    top_eig(v, "batch", key)
                )
                pop = bnlab.precise_stats(run_train, v, pop_batches)
                eig.setdefault(("BN, population statistics", when), []).append(
                    top_eig({**v, "batch_stats": pop}, "pop", key)
                )
            if ctx.progress:
                ctx.progress(s + 1, len(seeds), f"{NAME} {arm} eigenvalues")
    checks = []
    for when in ("init", "trained"):
        m = {k[0]: float(np.mean(v)) for k, v in eig.items() if k[1] == when}
        r1 = m["no BN"] / m["BN, batch statistics"]
        r2 = m["BN, population statistics"] / m["BN, batch statistics"]
        label = "at initialization" if when == "init" else f"after {steps} steps"
        checks.append(
            H.check(f"{label}: top eigenvalue, no BN / BN batch", r1, ">= 2", r1 >= 2)
        )
        checks.append(
            H.check(
                f"{label}: top eigenvalue, BN population / BN batch",
                r2,
                ">= 2",
                r2 >= 2,
            )
        )
    table = [
        {
            "network": k[0],
            "when": k[1],
            "top Hessian eigenvalue": H.fmt(*H.mean_spread(v), 3),
        }
        for k, v in sorted(eig.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
    records = [{"network": k[0], "when": k[1], "per_seed": v} for k, v in eig.items()]
    _figure(ctx, eig)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["eigenvalues.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 3 x {width}; "
            f"loss on {n} fixed training examples; population statistics over "
            f"{n_pop} batches of 256."
        ),
    )


def _figure(ctx, eig) -> None:
    import matplotlib.pyplot as plt

    names = ("no BN", "BN, batch statistics", "BN, population statistics")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    xs = np.arange(len(names))
    for off, when in ((-0.18, "init"), (0.18, "trained")):
        vals = [np.mean(eig[(nm, when)]) for nm in names]
        ax.bar(xs + off, vals, 0.35, label=when)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.legend()
    ctx.save_figure(fig, "eigenvalues")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
