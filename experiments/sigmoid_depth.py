"""Sigmoid networks and depth: without BN, gradients vanish with depth and
deep sigmoid networks do not train; with BN they do at every depth (Ioffe &
Szegedy 2015, sec. 3.3 and 4.2.1).

Sigmoid MLPs of 3, 5 and 8 (quick: 3 and 8) hidden layers of 128 (quick: 64) on Fashion-MNIST
(quick: digits), SGD with momentum 0.9, lr 0.05, batch 128, 2000 steps
(quick: 400), with and without BN. Recorded: final test accuracy and the
gradient norm of every layer on a fixed training batch at initialization
and at the end.

    python -m experiments.sigmoid_depth [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bnlab.diagnostics import layer_grad_norms
from experiments import _harness as H
from experiments._models import MLP

NAME = "sigmoid_depth"
CLAIM = (
    "(e) Without BN, deep sigmoid networks do not train (gradients vanish with "
    "depth); with BN they train at every depth."
)
DEPTHS = (3, 5, 8)


def grad_probe(model):
    def f(variables, hp, data):
        x_tr, y_tr, _, _ = data

        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params},
                x_tr[:512],
                train=True,
                mutable=["batch_stats"],
            )
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(512), y_tr[:512]])

        norms = layer_grad_norms(jax.grad(loss)(variables["params"]))
        dense = sorted(
            (k for k in norms if "Dense" in k), key=lambda k: int(k.split("_")[-1])
        )
        return jnp.stack([norms[k] for k in dense])

    return f


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    steps = ctx.steps(400, 2000)
    seeds = list(range(ctx.seeds))
    res = {}
    depths = ctx.pick((3, 8), DEPTHS)
    for depth in depths:
        for norm in ("none", "before"):
            model = MLP(widths=(width,) * depth, activation="sigmoid", norm=norm)
            r = H.train_group(
                ctx,
                H.Group(
                    name=f"depth{depth}_{'bn' if norm == 'before' else 'nobn'}",
                    model=model,
                    seeds=seeds,
                    hparams={"lr": [0.05] * len(seeds)},
                    make_tx=H.momentum_sgd,
                    steps=steps,
                    batch_size=128,
                    eval_every=steps // 4,
                    probe=grad_probe(model),
                ),
            )
            res[(depth, norm)] = r
    acc = {k: r.test_accuracy[-1] for k, r in res.items()}
    deep_nobn = float(np.mean(acc[(8, "none")]))
    bn_worst = min(float(np.mean(acc[(d, "before")])) for d in depths)
    checks = [
        H.check(
            "depth 8 without BN: final test accuracy",
            deep_nobn,
            "<= 0.15",
            deep_nobn <= 0.15,
        ),
        H.check(
            "with BN: final test accuracy at every depth (worst depth)",
            {str(d): float(np.mean(acc[(d, "before")])) for d in depths},
            ">= 0.80 at every depth",
            bn_worst >= 0.80,
        ),
    ]
    table = []
    for d in depths:
        for norm in ("none", "before"):
            r = res[(d, norm)]
            g0 = np.mean(np.asarray(r.probes[0]), 0)  # mean over seeds, per layer
            g1 = np.mean(np.asarray(r.probes[-1]), 0)
            table.append(
                {
                    "depth": d,
                    "BN": "yes" if norm == "before" else "no",
                    "final test accuracy": H.fmt(*H.mean_spread(acc[(d, norm)])),
                    "grad norm first/last hidden layer, init": f"{g0[0]:.2e} / {g0[-2]:.2e}",
                    "same, end": f"{g1[0]:.2e} / {g1[-2]:.2e}",
                }
            )
    records = [
        {
            "depth": d,
            "bn": norm == "before",
            "step": s,
            "test_accuracy": res[(d, norm)].test_accuracy[i],
            "layer_grad_norms": res[(d, norm)].probes[i],
        }
        for (d, norm) in res
        for i, s in enumerate(res[(d, norm)].steps)
    ]
    _figure(ctx, res)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["grad_norms.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, width {width}, "
            f"{steps} steps; gradient norms of each Dense layer's parameters on "
            "512 training examples (train mode), mean over seeds."
        ),
    )


def _figure(ctx, res) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, which, title in (
        (axes[0], 0, "at initialization"),
        (axes[1], -1, "after training"),
    ):
        for (d, norm), r in res.items():
            g = np.mean(np.asarray(r.probes[which]), 0)
            ax.plot(
                np.arange(1, len(g) + 1),
                g,
                "o-" if norm == "before" else "s--",
                label=f"depth {d}, {'BN' if norm == 'before' else 'no BN'}",
            )
        ax.set_yscale("log")
        ax.set_xlabel("layer (input -> output)")
        ax.set_title(f"gradient norm per layer, {title}")
    axes[0].set_ylabel("||dL/dW||")
    axes[1].legend(fontsize=7)
    ctx.save_figure(fig, "grad_norms")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
