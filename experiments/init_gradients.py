"""Gradient explosion at initialization in deep BN networks (Yang et al. 2019,
arXiv:1902.08129).

Yang et al.'s mean-field theory of BN networks ``x_l = relu(BN(W_l x_{l-1}))``
predicts that, at initialization, the squared gradient norm of a layer's
weights grows geometrically towards the input: ``||dL/dW_l||^2 ~
lambda_G^(L - l)``, with ``lambda_G -> pi / (pi - 1) ~ 1.467`` per layer for
ReLU as batch size and width grow (their Thm. 3.10 and Fig. 2; the same
factor as ``E[relu(z)^2] / Var[relu(z)]`` for a standard normal ``z``, which
BN's division by the batch standard deviation multiplies into the backward
pass at every layer). Weight scale and activation cannot remove it: BN
itself causes it. A residual connection ``x_l = x_{l-1} +
relu(BN(W_l x_{l-1}))`` makes the branch a shrinking share (about ``1/l``)
of the trunk's variance, so the per-layer factor tends to 1 and the growth
is polynomial, not geometric (De & Smith 2020, arXiv:2002.10444, sec. 2).

Measured: per-layer weight-gradient norms of the cross-entropy on one
training batch per seed, at initialization (He init, no training), for
depths 10, 25, 50, 100 of a BN-ReLU MLP with and without residual
connections, and of a ReLU MLP without BN (He init keeps gradient norms
constant, He et al. 2015). The hidden layers are one ``nn.scan`` over
identical blocks with a traced depth (one compilation for every depth). The
per-layer growth factor is fitted by least squares to ``log ||dL/dW_l||^2``
over the hidden layers, leaving out two layers at each end (the first sees
the raw input, the last the readout): :func:`bnlab.diagnostics.geometric_rate`.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from bnlab import diagnostics
from experiments import protocol as P

NAME = "init_gradients"
CLAIM = (
    "At initialization, a deep BN-ReLU MLP's weight gradients grow geometrically "
    "towards the input at Yang et al.'s rate pi/(pi-1) per layer; residual "
    "connections remove the geometric growth."
)
LAMBDA_G = math.pi / (math.pi - 1.0)  # Yang et al. 2019, ReLU, batch -> inf
DEPTHS = (10, 25, 50, 100)
JUDGED_DEPTHS = (25, 50, 100)  # depth 10 leaves 6 layers between the ends
VARIANTS = {  # code -> (label, bn gate, residual gate)
    "bn": ("BN-ReLU MLP", 1.0, 0.0),
    "bn_residual": ("BN-ReLU MLP, residual", 1.0, 1.0),
    "plain": ("ReLU MLP without BN", 0.0, 0.0),
}
SKIP = 2  # layers left out of the fit at each end
RATE_TOLERANCE = 0.05
RESIDUAL_SHARE = 0.1
CRITERIA = [
    P.Criterion(
        "bn_rate_matches_theory",
        "BN-ReLU MLP: largest |fitted per-layer growth of ||dL/dW_l||^2 / "
        "(pi/(pi-1)) - 1| over depths 25, 50, 100",
        "<=",
        RATE_TOLERANCE,
        "Yang et al. 2019 (arXiv:1902.08129) Thm. 3.10: lambda_G -> pi/(pi-1) for "
        "ReLU as batch -> inf; 5 % allows the O(1/batch) and O(1/width) "
        "corrections of the finite net (batch >= 128, width >= 64), fixed before "
        "the run",
    ),
    P.Criterion(
        "residual_removes_explosion",
        "BN-ReLU MLP with residual connections, depth 100: (fitted per-layer "
        "growth - 1) / (pi/(pi-1) - 1)",
        "<=",
        RESIDUAL_SHARE,
        "De & Smith 2020 (arXiv:2002.10444) sec. 2: the residual branch's share "
        "of the variance falls as 1/l, so the growth per layer is 1 + O(1/l) "
        "and its geometric fit over 100 layers keeps at most a tenth of the "
        "plain net's excess (threshold fixed before the run)",
    ),
]
HISTORY: list[dict] = []


class Block(nn.Module):
    """One hidden layer: Dense -> BN (gated) -> ReLU, optionally residual;
    ``on`` = 0 makes it the identity (layers beyond the depth in use)."""

    width: int
    norm: functools.partial

    @nn.compact
    def __call__(self, x: jax.Array, gates: tuple) -> tuple[jax.Array, None]:
        bn_on, residual, on = gates
        he = nn.initializers.he_normal()
        h = nn.Dense(self.width, use_bias=False, kernel_init=he)(x)
        h = jnp.where(bn_on > 0.5, self.norm(use_running_average=False)(h), h)
        h = nn.relu(h)
        h = jnp.where(residual > 0.5, x + h, h)
        return jnp.where(on > 0.5, h, x), None


class DeepMLP(nn.Module):
    """Up to ``max_depth`` hidden layers of one width (the first maps the
    input), the others one ``nn.scan``; traced gates choose BN, the residual
    connection and the depth in use (layers beyond it are the identity, so
    the network, its outputs and its gradients are those of that depth)."""

    width: int
    max_depth: int
    norm: functools.partial = functools.partial(bnlab.linen.BatchNorm)

    @nn.compact
    def __call__(self, x: jax.Array, gates: tuple) -> jax.Array:
        bn_on, residual, depth = gates
        he = nn.initializers.he_normal()
        h = nn.Dense(self.width, use_bias=False, kernel_init=he)(x)
        h = jnp.where(bn_on > 0.5, self.norm(use_running_average=False)(h), h)
        x = nn.relu(h)
        n = self.max_depth - 1
        scan = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=0,
            length=n,
        )
        per_layer = (
            jnp.broadcast_to(bn_on, (n,)),
            jnp.broadcast_to(residual, (n,)),
            (jnp.arange(n) < depth - 1).astype(jnp.float32),
        )
        x, _ = scan(self.width, self.norm, name="blocks")(x, per_layer)
        return nn.Dense(10, kernel_init=he)(x)


def layer_norms(width: int, max_depth: int):
    """``f(seeds, x, y, bn_on, residual, depth) -> (arms, max_depth)``:
    squared gradient norms of the hidden layers' kernels (first layer
    first; zero beyond ``depth``) at initialization, vmapped over arms
    (``depth`` is one traced scalar: one compilation serves every depth)."""
    model = DeepMLP(width, max_depth)

    def one(seed, x, y, bn_on, residual, depth):
        gates = (bn_on, residual, depth)
        v = model.init(jax.random.key(seed), x[:2], gates)

        def loss(params):
            out, _ = model.apply(
                {**v, "params": params}, x, gates, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

        g = jax.grad(loss)(v["params"])
        first = jnp.sum(jnp.square(g["Dense_0"]["kernel"]))[None]
        rest = jnp.sum(jnp.square(g["blocks"]["Dense_0"]["kernel"]), axis=(1, 2))
        return jnp.concatenate([first, rest])

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None)))


def run(ctx: P.Context) -> P.Outcome:
    width = ctx.pick(64, 128)
    batch = ctx.pick(128, 256)
    depths = (6, 10) if ctx.smoke else DEPTHS
    judged = depths[-1:] if ctx.smoke else JUDGED_DEPTHS
    deepest = depths[-1]
    if ctx.smoke:
        width, batch = 16, 16
    data = ctx.data
    seeds = list(ctx.seeds)
    # one batch per seed, drawn from the training split by the seed
    xs, ys = [], []
    for s in seeds:
        idx = np.random.default_rng([s, 1902]).permutation(len(data.x_train))[:batch]
        xs.append(data.x_train[idx])
        ys.append(data.y_train[idx])
    xs, ys = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))
    n_s = len(seeds)
    norms: dict[tuple[str, int], np.ndarray] = {}
    f = layer_norms(width, deepest)
    codes = list(VARIANTS)
    bn = jnp.asarray([VARIANTS[c][1] for c in codes for _ in seeds])
    res = jnp.asarray([VARIANTS[c][2] for c in codes for _ in seeds])
    seed_arr = jnp.asarray(seeds * len(codes), jnp.uint32)
    x_arms = jnp.tile(xs, (len(codes), 1, 1))
    y_arms = jnp.tile(ys, (len(codes), 1))
    for depth in depths:
        out = np.asarray(f(seed_arr, x_arms, y_arms, bn, res, depth), np.float64)
        for i, c in enumerate(codes):
            norms[(c, depth)] = out[i * n_s : (i + 1) * n_s, :depth]  # (seeds, depth)

    def rate(c, depth):
        """Per seed: fitted growth factor towards the input."""
        return np.asarray(
            [
                float(diagnostics.geometric_rate(n[::-1], skip=SKIP))
                for n in norms[(c, depth)]
            ]
        )

    rates = {(c, d): rate(c, d) for c in VARIANTS for d in depths}
    dev = np.max(
        np.stack([np.abs(rates[("bn", d)] / LAMBDA_G - 1.0) for d in judged]), axis=0
    )
    share = (rates[("bn_residual", deepest)] - 1.0) / (LAMBDA_G - 1.0)
    measured = {
        "bn_rate_matches_theory": P.mean_ci(dev),
        "residual_removes_explosion": P.mean_ci(share),
    }
    reported = {
        f"rate_{c}_depth{d}": P.mean_ci(rates[(c, d)]) for c in VARIANTS for d in depths
    }
    table = []
    for c, (label, _, _) in VARIANTS.items():
        for d in depths:
            n = norms[(c, d)]
            growth = np.log(n[:, 1] / n[:, -1])  # second layer over the last
            table.append(
                {
                    "network": label,
                    "depth": d,
                    "fitted growth per layer (95% interval)": P.fmt(
                        P.mean_ci(rates[(c, d)]), 4
                    ),
                    "predicted (BN, no residual)": LAMBDA_G if c == "bn" else None,
                    "log(||dW_2||^2 / ||dW_L||^2)": P.fmt(P.mean_ci(growth)),
                }
            )
    records = [
        {
            "network": VARIANTS[c][0],
            "depth": d,
            "seed": s,
            "grad_norm_sq": norms[(c, d)][i].tolist(),
            "rate": float(rates[(c, d)][i]),
        }
        for c in VARIANTS
        for d in depths
        for i, s in enumerate(seeds)
    ]
    figure = _figure(ctx, norms, rates, depths)
    notes = (
        f"{ctx.data_name}, one batch of {batch} training examples per seed; MLPs "
        f"of width {width}, He init, no training; {n_s} seeds. Growth fitted over "
        f"layers {SKIP + 1} to L - {SKIP} (first layer = 1). Prediction pi/(pi-1) "
        f"= {LAMBDA_G:.4f} per layer (squared norms)."
    )
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        notes=notes,
        reported=reported,
    )


def _figure(ctx, norms, rates, depths) -> str:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    deepest = depths[-1]
    for c, (label, _, _) in VARIANTS.items():
        n = norms[(c, deepest)]
        layers = np.arange(1, deepest + 1)
        a.plot(layers, np.log10(n).mean(0), label=label)
        r = np.asarray([rates[(c, d)].mean() for d in depths])
        lo = np.asarray([rates[(c, d)].min() for d in depths])
        hi = np.asarray([rates[(c, d)].max() for d in depths])
        b.errorbar(depths, r, yerr=[r - lo, hi - r], marker="o", label=label)
    a.set_xlabel("layer (1 = input side)")
    a.set_ylabel("log10 ||dL/dW_l||^2 (mean over seeds)")
    a.set_title(f"Gradient norms at init, depth {deepest}")
    a.legend(fontsize=7)
    b.axhline(LAMBDA_G, color="k", ls="--", lw=0.8, label="pi/(pi-1) (Yang et al.)")
    b.axhline(1.0, color="grey", ls=":", lw=0.8)
    b.set_xlabel("depth L")
    b.set_ylabel("fitted growth per layer (min-max over seeds)")
    b.set_title("Growth rate vs depth")
    b.legend(fontsize=7)
    return ctx.save_figure(fig, "init_gradients")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
