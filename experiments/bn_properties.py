"""Claim (b): BN normalizes each feature over the mini-batch, and the
learnable gamma / beta can undo it; it makes a layer invariant to the scale
of its weights (Ioffe & Szegedy 2015, sec. 3 and 3.3).

Measured on random batches (float32, bnlab.batch_norm in train mode):
per-feature mean and variance of BN's output; the identity restored with
gamma = sqrt(var + eps), beta = mean; BN(a W u) = BN(W u) and
d loss / d(a W) = (d loss / d W) / a for a in {0.5, 2, 10, 100}, where
a^2 var >> eps. The identity is exact only without epsilon (the paper's
derivation): BN(aWu) divides by sqrt(a^2 var + eps), so for small a the
error is ~eps / (2 a^2 var); a = 0.01 and 0.1 are reported to show it.

    python -m experiments.bn_properties [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bnlab
from experiments import _harness as H

NAME = "bn_properties"
CLAIM = (
    "(b) BN normalizes each feature over the mini-batch to zero mean and unit "
    "variance, learnable gamma/beta can restore the identity, and BN(aWu) = "
    "BN(Wu) with the gradient w.r.t. aW equal to the gradient w.r.t. W over a."
)
TOL = 1e-5
SCALES = (0.5, 2.0, 10.0, 100.0)  # checked: a^2 var >> eps
SMALL_SCALES = (0.01, 0.1)  # reported: epsilon matters there
EPS = 1e-5


def one_seed(seed: int, batch: int, din: int, dout: int) -> dict:
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    u = jax.random.normal(k1, (batch, din)) * 3 + 5
    w = jax.random.normal(k2, (din, dout)) / np.sqrt(din)
    target = jax.random.normal(k3, (batch, dout))
    stats = bnlab.init_batch_stats(dout)
    x = u @ w

    def bn(x, g=None, b=None):
        return bnlab.batch_norm(x, stats, g, b, train=True, epsilon=EPS)[0]

    y = jax.jit(bn)(x)
    mean, var = np.asarray(y.mean(0)), np.asarray(y.var(0))
    xd = np.asarray(x, np.float64)
    expected_var = xd.var(0) / (xd.var(0) + EPS)  # epsilon shrinks it slightly
    # identity: gamma = sqrt(var + eps), beta = mean
    g = jnp.asarray(np.sqrt(xd.var(0) + EPS), jnp.float32)
    b = jnp.asarray(xd.mean(0), jnp.float32)
    restored = jax.jit(bn)(x, g, b)
    identity_err = float(np.max(np.abs(np.asarray(restored) - xd) / (np.abs(xd) + 1)))

    def loss(w):
        return jnp.mean((jnp.tanh(bn(u @ w)) - target) ** 2)

    grad = jax.jit(jax.grad(loss))
    g_w = np.asarray(grad(w), np.float64)
    out_err, grad_err = [], []
    for a in SCALES + SMALL_SCALES:
        ya = jax.jit(bn)(u @ (a * w))
        out_err.append(float(np.max(np.abs(np.asarray(ya) - np.asarray(y)))))
        g_aw = np.asarray(grad(a * w), np.float64)
        grad_err.append(float(np.max(np.abs(g_aw * a - g_w)) / np.max(np.abs(g_w))))
    del k4
    return {
        "seed": seed,
        "max_abs_mean": float(np.max(np.abs(mean))),
        "max_var_error": float(np.max(np.abs(var - expected_var))),
        "identity_error": identity_err,
        "scale_invariance_error": max(out_err[: len(SCALES)]),
        "gradient_scaling_error": max(grad_err[: len(SCALES)]),
        "per_scale": {
            str(a): {"output": o, "gradient": gr}
            for a, o, gr in zip(SCALES + SMALL_SCALES, out_err, grad_err, strict=True)
        },
        "x_var": float(xd.var(0).mean()),
    }


def run(ctx: H.Context) -> dict:
    batch, din, dout = ctx.pick((64, 32, 16), (256, 128, 64))
    rows = []
    for seed in range(ctx.seeds):
        rows.append(one_seed(seed, batch, din, dout))
        if ctx.progress:
            ctx.progress(seed + 1, ctx.seeds, NAME)
    worst = {
        k: max(r[k] for r in rows) for k in rows[0] if k not in ("seed", "per_scale")
    }
    checks = [
        H.check(label, worst[key], f"<= {TOL:g}", worst[key] <= TOL)
        for label, key in (
            ("per-feature |mean| of BN output", "max_abs_mean"),
            ("per-feature |var - var/(var+eps)| of BN output", "max_var_error"),
            (
                "gamma = sqrt(var+eps), beta = mean restore the input (relative error)",
                "identity_error",
            ),
            (
                "max |BN(aWu) - BN(Wu)| over a in " + str(SCALES),
                "scale_invariance_error",
            ),
            (
                "max |a grad(aW) - grad(W)| / max |grad(W)| over a",
                "gradient_scaling_error",
            ),
        )
    ]
    table = [
        {
            "quantity": c["name"],
            "worst over seeds": f"{c['measured']:.2e}",
            "criterion": c["criterion"],
        }
        for c in checks
    ]
    _figure(ctx, rows)
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        rows,
        table,
        ["scale_invariance.png"],
        notes=(
            f"float32, batch {batch}, {din} -> {dout} features, epsilon {EPS}. "
            "History: a first pilot checked a in {0.01, 0.1, 10, 100} and "
            "failed (2.7e-2) at a = 0.01 and 0.1, where epsilon is comparable "
            "to a^2 var; the paper's identity ignores epsilon, so the check "
            "now covers a^2 var >> eps and the small scales are reported with "
            "their predicted epsilon error."
        ),
    )


def _figure(ctx: H.Context, rows: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        ax.plot(
            SCALES,
            [r["per_scale"][str(a)]["output"] + 1e-12 for a in SCALES],
            "o-",
            label=f"output, seed {r['seed']}",
        )
        ax.plot(
            SCALES,
            [r["per_scale"][str(a)]["gradient"] + 1e-12 for a in SCALES],
            "s--",
            label=f"gradient, seed {r['seed']}",
        )
    ax.axhline(TOL, color="k", lw=0.8, ls=":", label="criterion 1e-5")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight scale a")
    ax.set_ylabel("max error (float32)")
    ax.set_title("BN(aWu) vs BN(Wu), and a grad(aW) vs grad(W)")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "scale_invariance")


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
