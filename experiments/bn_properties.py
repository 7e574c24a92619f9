"""Claim (b): BN normalizes each feature over the mini-batch, and the
learnable gamma / beta can undo it; it makes a layer invariant to the scale
of its weights (Ioffe & Szegedy 2015, arXiv:1502.03167, sec. 3 and 3.3).

Measured per seed on a random batch ``u`` (mean 5, std 3, so that the mean
dominates and rounding is amplified: the hard case) and a random layer
``W``, in float32 with ``bnlab.batch_norm`` in train mode, each against a
float64 reference written here (not bnlab's code):

- the per-feature mean and variance of BN's output (0 and ``v / (v + eps)``);
- the identity restored with ``gamma = sqrt(v + eps)``, ``beta = mean``;
- ``BN(u (aW)) - BN(u W)`` and ``a grad(aW) - grad(W)`` for ``a`` in
  ``SCALES``: zero in exact arithmetic without ``eps`` (the paper's
  identity); with ``eps`` both differ by an exact, computable amount, so the
  float32 difference is compared with the float64 difference, for small
  ``a`` too, where ``eps`` is comparable to ``a^2 v``.

Tolerances are float32 rounding bounds, not fitted numbers: an error is
divided by ``L * 2**-24 * M``, where ``L`` is the length of the reductions
the quantity passes through (the batch ``n`` for BN's sums, the fan-in ``d``
for the matmul ``uW``) and ``M`` the magnitude that rounding errors scale
with (e.g. ``max |x| / std`` per feature: an error in a sum of ``x`` moves the
normalized output by that error over the std). ``L * 2**-24 * M`` is the
classical worst-case bound of recursive summation (Higham, Accuracy and
Stability of Numerical Algorithms, 2002, sec. 4.2: ``|error| <= gamma_L
sum |terms|``, ``gamma_L ~ L u``); rounding errors in practice grow like
``sqrt(L) u``, so a correct float32 implementation stays well below 1,
and a wrong formula (a missing term, the unbiased variance, a wrong
epsilon) errs by orders of magnitude more. Each criterion is the worst
seed's largest ratio: a property of every input, not an average.

    python -m experiments.bn_properties [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bnlab
from experiments import protocol as P

NAME = "bn_properties"
CLAIM = (
    "(b) BN normalizes each feature over the mini-batch to zero mean and unit "
    "variance, learnable gamma/beta can restore the identity, and BN(aWu) = "
    "BN(Wu) with the gradient w.r.t. aW equal to the gradient w.r.t. W over a."
)
U = 2.0**-24  # float32 unit roundoff
EPS = 1e-5
SCALES = (0.01, 0.1, 0.5, 2.0, 10.0, 100.0)
_BOUND = (
    "float32 rounding bound L * 2**-24 * M (Higham 2002, sec. 4.2: recursive "
    "summation of L terms errs by at most ~L u times the sum of their magnitudes)"
)
CRITERIA = [
    P.Criterion(
        "mean_zero",
        "worst seed: per-feature |mean| of BN's output / bound (L = batch n, M = "
        "max|x| / std)",
        "<=",
        1.0,
        f"Ioffe & Szegedy 2015 sec. 3 (zero mean); {_BOUND}",
    ),
    P.Criterion(
        "variance_one",
        "worst seed: per-feature |var - v/(v+eps)| of BN's output / bound (L = n, M = "
        "(max|x| / std)^2, which also covers one-pass E[x^2] - E[x]^2)",
        "<=",
        1.0,
        f"Ioffe & Szegedy 2015 sec. 3 (unit variance); {_BOUND}",
    ),
    P.Criterion(
        "identity_restored",
        "worst seed: |BN(x; gamma = sqrt(v + eps), beta = mean) - x| / bound "
        "(L = n + 4, M = "
        "max|x| per feature)",
        "<=",
        1.0,
        f"Ioffe & Szegedy 2015 sec. 3 (gamma, beta can represent the identity); "
        f"{_BOUND}",
    ),
    P.Criterion(
        "scale_invariance",
        "worst seed: |[BN(u aW) - BN(u W)] in float32 - the same in float64| / "
        "bound over a in "
        "SCALES (L = 2 (n + 2d + 2), M = max_i sum_k |u_ik W_kj| / std)",
        "<=",
        1.0,
        f"Ioffe & Szegedy 2015 sec. 3.3 (BN(aWu) = BN(Wu)); {_BOUND}",
    ),
    P.Criterion(
        "gradient_scaling",
        "worst seed: |[a grad(aW) - grad(W)] in float32 - the same in float64| / "
        "bound over a "
        "(L = 4 (n + d + 4), M = (|u|^T |dL/dx|) (1 + max_i sum_k |u_ik W_kj| / std))",
        "<=",
        1.0,
        f"Ioffe & Szegedy 2015 sec. 3.3 (d BN(aWu) / d(aW) = (1/a) d BN(Wu) / dW); "
        f"{_BOUND}",
    ),
]
HISTORY = [
    {
        "date": "2026-11-20",
        "criterion": "every error <= 1e-5 (absolute) for a in {0.5, 2, 10, 100}; "
        "a = 0.01, 0.1 reported (epsilon error not predicted)",
        "result": "PASS on seeds 0-2; seeds 18 and 19 fail (1.12e-5, 1.05e-5)",
        "why": "1e-5 is at float32 rounding level for these magnitudes (issue 16): "
        "tolerances are now float32 bounds scaled to each computation, and the "
        "epsilon effect is computed exactly in float64 instead of excluded",
    }
]


# ----------------------------------------------------------- references


def reference(u, w, target):
    """float64 BN in train mode and the gradient of the loss w.r.t. ``w``,
    written from the paper's formulas (sec. 3), not from bnlab's code.

    Returns ``(y, dL/dW, dL/dx)`` for ``L = mean((tanh(BN(u w)) - target)^2)``.
    """
    x = u @ w
    mean = x.mean(0)
    std = np.sqrt(((x - mean) ** 2).mean(0) + EPS)
    y = (x - mean) / std
    th = np.tanh(y)
    dy = 2.0 * (th - target) * (1.0 - th**2) / target.size
    dx = (dy - dy.mean(0) - y * (dy * y).mean(0)) / std
    return y, u.T @ dx, dx


def _bn(x, g=None, b=None):
    """bnlab's BN in train mode (the implementation under test)."""
    stats = bnlab.init_batch_stats(x.shape[-1])
    return bnlab.batch_norm(x, stats, g, b, train=True, epsilon=EPS)[0]


def _forward_and_grad(u, w, target):
    def loss(w):
        x = u @ w
        y = _bn(x)
        return jnp.mean((jnp.tanh(y) - target) ** 2), (x, y)

    (_, (x, y)), g = jax.value_and_grad(loss, has_aux=True)(w)
    return x, y, g


# float32, compiled once per shape: every weight scale in one call
forward_and_grad32 = jax.jit(jax.vmap(_forward_and_grad, in_axes=(None, 0, None)))
restore32 = jax.jit(_bn)


def one_seed(seed: int, batch: int, din: int, dout: int) -> dict:
    rng = np.random.default_rng([seed, 1502])
    u = (rng.standard_normal((batch, din)) * 3 + 5).astype(np.float32)
    w = (rng.standard_normal((din, dout)) / np.sqrt(din)).astype(np.float32)
    target = rng.standard_normal((batch, dout)).astype(np.float32)
    n, d = batch, din
    scales = (1.0, *SCALES)
    ws = np.stack([np.float32(a) * w for a in scales])  # a W, rounded to float32
    x32, y32, g32 = (
        np.asarray(v, np.float64) for v in forward_and_grad32(u, ws, target)
    )
    u64, t64 = u.astype(np.float64), target.astype(np.float64)
    abs_u = np.abs(u64)

    # mean and variance of the output, against the exact statistics of BN's
    # own float32 input
    x64 = x32[0]  # BN's float32 input, exactly
    var64 = x64.var(0)
    std64 = np.sqrt(var64 + EPS)
    r = np.abs(x64).max(0) / std64  # max |x| / std per feature
    y = y32[0]
    mean_ratio = np.abs(y.mean(0)) / (n * U * r)
    var_ratio = np.abs(y.var(0) - var64 / (var64 + EPS)) / (n * U * r**2)

    # identity restored by gamma = sqrt(v + eps), beta = mean
    restored = np.asarray(
        restore32(u @ w, std64.astype(np.float32), x64.mean(0).astype(np.float32)),
        np.float64,
    )
    ident_ratio = np.abs(restored - x64) / ((n + 4) * U * np.abs(x64).max(0))

    # scale invariance of outputs and gradients, against float64: the exact
    # differences (zero without eps) are computed, not assumed
    refs = [reference(u64, a * w.astype(np.float64), t64) for a in scales]

    def magnitudes(i):
        """M of the outputs per feature and of the gradient per weight."""
        wa = ws[i].astype(np.float64)
        xa = u64 @ wa
        m_out = (abs_u @ np.abs(wa)).max(0) / np.sqrt(xa.var(0) + EPS)
        return m_out, (abs_u.T @ np.abs(refs[i][2])) * (1.0 + m_out)

    m_out1, m_grad1 = magnitudes(0)
    out_l, grad_l = 2 * (n + 2 * d + 2), 4 * (n + d + 4)
    per_scale = {}
    for i, a in enumerate(scales[1:], start=1):
        m_out_a, m_grad_a = magnitudes(i)
        diff32, diff64 = y32[i] - y32[0], refs[i][0] - refs[0][0]
        out_ratio = np.abs(diff32 - diff64) / (out_l * U * (m_out_a + m_out1))
        gdiff32, gdiff64 = a * g32[i] - g32[0], a * refs[i][1] - refs[0][1]
        grad_ratio = np.abs(gdiff32 - gdiff64) / (grad_l * U * (a * m_grad_a + m_grad1))
        per_scale[a] = {
            "output_ratio": float(out_ratio.max()),
            "gradient_ratio": float(grad_ratio.max()),
            # what the paper's identity (no eps) would call the error
            "output_difference": float(np.abs(diff32).max()),
            "gradient_difference": float(np.abs(gdiff32).max() / np.abs(g32[0]).max()),
            "epsilon_effect": float(np.abs(diff64).max()),
        }
    return {
        "seed": seed,
        "mean_zero": float(mean_ratio.max()),
        "variance_one": float(var_ratio.max()),
        "identity_restored": float(ident_ratio.max()),
        "scale_invariance": max(p["output_ratio"] for p in per_scale.values()),
        "gradient_scaling": max(p["gradient_ratio"] for p in per_scale.values()),
        "max_abs_mean": float(np.abs(y.mean(0)).max()),
        "per_scale": {str(a): p for a, p in per_scale.items()},
        "mean_over_std": float((np.abs(x64.mean(0)) / std64).max()),
    }


def run(ctx: P.Context) -> P.Outcome:
    batch, din, dout = ctx.pick((64, 32, 16), (256, 128, 64))
    rows = [one_seed(s, batch, din, dout) for s in ctx.seeds]
    measured = {}
    for c in CRITERIA:
        v = [r[c.id] for r in rows]
        worst = max(v)
        measured[c.id] = P.Measured(
            worst,
            worst,
            worst,
            tuple(v),
            note=f"the worst of {len(v)} seeds (a property of every input)",
        )
    table = [
        {
            "quantity": c.quantity,
            "error / bound, worst seed": f"{measured[c.id].value:.3g}",
            "median seed": f"{np.median(measured[c.id].per_seed):.3g}",
        }
        for c in CRITERIA
    ]
    for a in SCALES:
        table.append(
            {
                "quantity": f"a = {a:g}: max |BN(u aW) - BN(u W)| (float32); of it "
                "the exact epsilon effect (float64)",
                "error / bound, worst seed": "{:.3g}; {:.3g}".format(
                    max(r["per_scale"][str(a)]["output_difference"] for r in rows),
                    max(r["per_scale"][str(a)]["epsilon_effect"] for r in rows),
                ),
                "median seed": "",
            }
        )
    figure = _figure(ctx, rows)
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=rows,
        notes=(
            f"float32, batch n = {batch}, d = {din} -> {dout} features, epsilon "
            f"{EPS:g}; inputs u ~ 5 + 3 N(0, 1) (largest |mean| / std of a "
            f"feature: {max(r['mean_over_std'] for r in rows):.3g}); "
            f"a in {list(SCALES)}. The last rows show why the epsilon effect is "
            "computed rather than ignored: at small a it exceeds rounding."
        ),
    )


def _figure(ctx: P.Context, rows: list[dict]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for key, style, label in (
        ("output_difference", "o-", "max |BN(u aW) - BN(u W)|"),
        ("epsilon_effect", "k--", "its exact epsilon effect (float64)"),
        ("output_ratio", "s:", "float32 error / rounding bound"),
    ):
        vals = np.array([[r["per_scale"][str(a)][key] for a in SCALES] for r in rows])
        ax.plot(SCALES, vals.max(0), style, label=f"{label} (worst seed)")
    ax.axhline(1.0, color="r", lw=0.8, ls=":", label="bound (criterion: <= 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight scale a")
    ax.set_title("Scale invariance of BN, float32")
    ax.legend(fontsize=7)
    return ctx.save_figure(fig, "scale_invariance")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
