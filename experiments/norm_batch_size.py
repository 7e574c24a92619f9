"""Normalization batch size (Wu & Johnson 2021, arXiv:2105.07576, sec. 4):
BN degrades when it normalizes over very few examples; LayerNorm and
GroupNorm, which do not normalize over the batch, do not.

3 x 128 ReLU MLP on Fashion-MNIST (quick: digits, 3 x 64), batch size b in
{2, 4, ..., 128}, SGD momentum 0.9 with lr = 0.1 * b / 128 (linear scaling),
2 epochs (quick: 3) at every b, with bnlab BN, Flax LayerNorm and Flax
GroupNorm (8 groups; full run only). Quick: b in {2, 4, 32, 128} (each
size is its own compiled program). BN is evaluated with population statistics
(PreciseBN, bnlab.precise_stats over 100 training batches of 256), so that
inaccurate running averages do not confound the result.

    python -m experiments.norm_batch_size [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import bnlab
from experiments import _harness as H
from experiments._models import MLP, stateless_norm

NAME = "norm_batch_size"
# What the committed full run shows and why, written after it (the
# criteria above were fixed before it and are not changed).
DISCUSSION = """BN collapses at b=2 (0.41 vs 0.864 at b >= 32) as
the paper reports, but at b=4 it is only 3.5 points down (criterion 1.5,
passes), and LayerNorm's accuracy spread over batch sizes is 1.08 points
against a limit of 1: it drifts down from 0.856 at b <= 16 to 0.846 at
b=128, because the run length is fixed in epochs, so large batches take
fewer steps. That is a property of the protocol (epochs with linearly
scaled lr), not of LayerNorm; GroupNorm shows the same drift."""
CLAIM = (
    "BN needs a large enough normalization batch: at 2-4 examples it is clearly "
    "worse, while LayerNorm is flat across batch sizes (Wu & Johnson 2021)."
)
SIZES = (2, 4, 8, 16, 32, 64, 128)
NORMS = {
    "BN": None,
    "LayerNorm": stateless_norm(nn.LayerNorm),
    "GroupNorm": stateless_norm(nn.GroupNorm, num_groups=8),
}


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    epochs = ctx.pick(3, 2)
    seeds = list(range(ctx.seeds))
    data = ctx.data
    n = len(data.x_train)
    pop = [
        jnp.asarray(data.x_train[i * 256 : (i + 1) * 256])
        for i in range(min(100, n // 256))
    ]
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    sizes = ctx.pick((2, 4, 32, 128), SIZES)
    if ctx.smoke:
        sizes = (2, 4, 32)
    norms = {k: v for k, v in NORMS.items() if k != "GroupNorm" or not ctx.quick}
    acc = {k: {} for k in norms}
    for kind, layer in norms.items():
        model = MLP(
            widths=(width,) * 3, activation="relu", norm="before", norm_layer=layer
        )

        def run_train(v, x, mutable, model=model):
            return model.apply(v, x, train=True, mutable=mutable)

        for b in sizes:
            steps = ctx.steps(epochs * n // b, epochs * n // b)
            r = H.train_group(
                ctx,
                H.Group(
                    name=f"{kind}_b{b}",
                    model=model,
                    seeds=seeds,
                    hparams={"lr": [0.1 * b / 128] * len(seeds)},
                    make_tx=H.momentum_sgd,
                    steps=steps,
                    batch_size=b,
                    eval_every=steps,
                    eval_at_zero=False,
                ),
            )
            if kind != "BN":
                acc[kind][b] = r.test_accuracy[-1].tolist()
                continue
            per_seed = []
            for s in seeds:
                v = H.arm_slice(r.variables, s)
                v = {**v, "batch_stats": bnlab.precise_stats(run_train, v, pop)}
                logits = model.apply(v, x_te, train=False)
                per_seed.append(float(jnp.mean(jnp.argmax(logits, -1) == y_te)))
            acc[kind][b] = per_seed
    mean = {k: {b: float(np.mean(v)) for b, v in d.items()} for k, d in acc.items()}
    big = float(np.mean([mean["BN"][b] for b in sizes if b >= 32]))
    ln = list(mean["LayerNorm"].values())
    checks = [
        H.check(
            "BN at b=2: accuracy below the mean over b >= 32",
            big - mean["BN"][2],
            ">= 0.05 (5 points)",
            big - mean["BN"][2] >= 0.05,
        ),
        H.check(
            "BN at b=4: accuracy below the mean over b >= 32",
            big - mean["BN"][4],
            ">= 0.015 (1.5 points)",
            big - mean["BN"][4] >= 0.015,
        ),
        H.check(
            "LayerNorm: max - min accuracy over batch sizes",
            max(ln) - min(ln),
            "<= 0.01 (1 point)",
            max(ln) - min(ln) <= 0.01,
        ),
    ]
    table = [
        {"batch size": b, **{k: H.fmt(*H.mean_spread(acc[k][b])) for k in norms}}
        for b in sizes
    ]
    records = [
        {"norm": k, "batch_size": b, "test_accuracy": acc[k][b]}
        for k in norms
        for b in sizes
    ]
    _figure(ctx, mean, sizes)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        ["batch_size.png"],
        notes=(
            f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 3 x {width}, "
            f"{epochs} epochs at each batch size, lr 0.1 * b / 128; BN columns "
            "use population statistics. The batch size is the total batch (and "
            "BN's normalization batch): LayerNorm's spread measures what the "
            "batch size alone does to training."
        ),
    )


def _figure(ctx, mean, sizes) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, m in mean.items():
        ax.plot(sizes, [1 - m[b] for b in sizes], "o-", label=k)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (= BN's normalization batch)")
    ax.set_ylabel("test error")
    ax.set_title("Normalization batch size")
    ax.legend()
    ctx.save_figure(fig, "batch_size")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
