"""Weight decay on BN networks: scale invariance and the effective learning
rate (van Laarhoven 2017, arXiv:1706.05350; Hoffer et al. 2018,
arXiv:1803.01814; Li & Arora 2020, arXiv:1910.07454).

A weight ``w`` followed by BN is scale invariant: ``L(c w) = L(w)``. So its
gradient is orthogonal to it and scales as ``1 / ||w||``, a step of SGD
moves its direction by about ``lr / ||w||^2`` (the effective learning rate),
and ``||w||`` only grows without weight decay (``||w'||^2 = ||w||^2 +
lr^2 ||g||^2``): the effective rate decays. With weight decay ``wd`` the
norm settles where shrinking and growth balance, ``lr E||g||^2 = wd (2 - lr
wd) ||w||^2`` (``||w||^4 ~ lr / wd``), after about ``1 / (4 lr wd)`` steps.
Li & Arora: SGD with a fixed rate and weight decay equals SGD without weight
decay and an exponentially *increasing* rate ``lr (1 - lr wd)^(-2t-1)``.

Design: a BN-ReLU MLP (He init; BN before each activation; the hidden
kernels, all followed by BN, are the scale-invariant weights), plain SGD
(the papers' derivations; no momentum), batch 128. Weight decay applies to
the scale-invariant kernels only (BN's scale/offset and the readout train
without it in every arm), so that Li & Arora's equivalence is exact in
exact arithmetic. Norm dynamics: wd in {0, 5e-4, 5e-3} at lr 1 (plain SGD
at 1 takes the step of the papers' 0.1 with momentum 0.9; with wd = 5e-3 the
norm relaxes ``4 lr wd T`` >= 8 times over the run). Li & Arora's check: wd =
5e-3 at a fixed rate vs the equivalent exponential schedule without weight
decay, each with its own lr grid, chosen on validation (the paired test
difference at every rate of the grid is in the table). A probe records, at
every evaluation,
each hidden kernel's ``||w||^2`` and the mean squared norm of its
mini-batch gradient over fixed training batches (in training mode). On the
final weights: (i) the output with every hidden kernel scaled by ``c`` (and
BN's epsilon by ``c^2``, which makes the symmetry exact) equals the
original to float32 precision; (ii) the gradient's cosine with ``w`` and
``c ||g(c w)|| / ||g(w)||``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab.linen
from bnlab import diagnostics
from bnlab.models import MLP
from experiments import protocol as P

NAME = "weight_decay"
CLAIM = (
    "For weights followed by BN the loss is scale invariant: the gradient is "
    "orthogonal to w and scales as 1/||w||; without weight decay ||w|| grows and "
    "the effective lr = lr/||w||^2 decays, with it ||w|| reaches the equilibrium "
    "lr E||g||^2 = wd (2 - lr wd) ||w||^2; an exponentially increasing lr without "
    "wd matches a fixed lr with wd (Li & Arora)."
)
WDS = (0.0, 5e-4, 5e-3)
EXP_WD = 5e-3  # the exponential schedule equivalent to this weight decay
# Norm dynamics at one rate: plain SGD at 1.0 is the papers' 0.1 with momentum
# 0.9 (step lr / (1 - momentum)), and gives 4 lr wd T >> 1 for wd = 5e-3.
DYN_LR = 1.0
LRS = (0.03, 0.1, 0.3, 1.0)  # the compared arms' grid (Li & Arora's check)
EPS = 1e-5  # BN epsilon (bnlab's default)
SCALES = (0.1, 10.0)  # rescaling factors of the invariance checks
PROBE_BATCHES = 8
EQUIVALENCE_MARGIN = 0.01
# the first design's +-log(1.5) on the ratio lr E||g||^2 / (wd (2 - lr wd)
# ||w||^2), which is ||w||_eq^4 / ||w||^4, stated on the norm
EQUILIBRIUM_TOLERANCE = math.log(1.5) / 4
CRITERIA = [
    P.Criterion(
        "rescale_invariance",
        "max |f(c w) - f(w)| / max |f(w)| (logits in training mode, hidden kernels "
        "x c and BN epsilon x c^2, c in {0.1, 10}), trained weights (wd 5e-3)",
        "<=",
        1e-5,
        "van Laarhoven 2017 (arXiv:1706.05350) eq. 3: exact invariance, so only "
        "float32 rounding remains; 1e-5 = 84 float32 ulps of the largest logit, "
        "fixed before the run",
    ),
    P.Criterion(
        "grad_orthogonal",
        "max over hidden kernels of |cos(dL/dw, w)| on a training batch, trained "
        "weights (the model's own epsilon)",
        "<=",
        1e-3,
        "van Laarhoven 2017 eq. 8 (<dL/dw, w> = 0); 1e-3 is > 10x below the "
        "cosine of two random vectors of these sizes (1/sqrt(n): 0.009 for the "
        "quick scale's first layer, 0.003 for the full scale's) and "
        "> 10x above BN epsilon's effect (eps / var ~ 1e-5 to 1e-4)",
    ),
    P.Criterion(
        "grad_inverse_scaling",
        "max over hidden kernels and c in {0.1, 10} of |c ||g(c w)|| / ||g(w)|| - 1| "
        "(BN epsilon x c^2), trained weights",
        "<=",
        1e-4,
        "van Laarhoven 2017 eq. 9 (||g(c w)|| = ||g(w)|| / c), exact with epsilon "
        "scaled; 1e-4 allows float32 rounding of the gradient's norm (~840 ulps), "
        "fixed before the run",
    ),
    P.Criterion(
        "no_wd_effective_lr_decays",
        "wd = 0, lr 1: effective lr lr/||w||^2 at the end / at the start (geometric "
        "mean over hidden kernels)",
        "<",
        1.0,
        "van Laarhoven 2017 sec. 3, Hoffer et al. 2018 sec. 2: without weight "
        "decay ||w|| only grows (||w'||^2 = ||w||^2 + lr^2 ||g||^2)",
    ),
    P.Criterion(
        "wd_equilibrium",
        "wd = 5e-3, lr 1 (4 lr wd T >= 8): log(||w|| / ||w||_eq), ||w||_eq^4 = lr "
        "E||g||^2 ||w||^2 / (wd (2 - lr wd)) (||w||^4 ~ lr/wd), mean over hidden "
        "kernels and the last 3 evaluations",
        "within",
        EQUILIBRIUM_TOLERANCE,
        "van Laarhoven 2017 sec. 3, Hoffer et al. 2018 eq. 7, Li & Arora 2020: the "
        "equilibrium norm; tolerance log(1.5) on the ratio ||w||_eq^4 / ||w||^4 "
        "(the first design's, set before any pilot), i.e. about 10 % of the norm",
    ),
    P.Criterion(
        "exp_lr_matches_wd",
        "test accuracy: exponential lr without wd - fixed lr with wd = 5e-3 "
        "(each at its own chosen lr, paired by seed)",
        "within",
        EQUIVALENCE_MARGIN,
        "Li & Arora 2020 (arXiv:1910.07454) Thm. 1.1: the two are the same "
        "network at every step; margin 1 point (rounding makes long runs differ "
        "chaotically, so outcomes are compared, not weights), fixed before the run",
    ),
]
HISTORY = [
    {
        "date": "2026-12-01",
        "criterion": "wd = 5e-3 at its lr chosen on validation: log(lr E||g||^2 / "
        "(wd (2 - lr wd) ||w||^2)) within +-log(1.5), 600 steps at quick scale",
        "result": "pilot at quick scale, seeds 0-4: -3.02 [-3.13, -2.91], FAIL; the "
        "chosen lr was 0.1, so 4 lr wd T = 1.2: the He-initialized norm had not "
        "relaxed towards the equilibrium",
        "why": "the equilibrium is a prediction for T >> 1/(4 lr wd) steps (van "
        "Laarhoven 2017 sec. 3): the norm dynamics are measured at lr 1, the "
        "papers' 0.1 with momentum 0.9, where 4 lr wd T = 8 (quick) and 30 (full)",
    },
    {
        "date": "2026-12-01",
        "criterion": "the same log ratio at lr 1 (400 steps at quick scale) within "
        "+-log(1.5)",
        "result": "pilot at quick scale, seeds 0-4: -0.46 [-0.70, -0.22], FAIL",
        "why": "E||g||^2 falls as the loss falls, so the equilibrium moves during "
        "the run and the norm lags it by about one relaxation time (the ratio "
        "stays below 1); the issue asks for the equilibrium *norm* within a "
        "tolerance: the criterion was restated as log(||w|| / ||w||_eq) (= -log "
        "ratio / 4) within log(1.25), which passed the pilot (0.115 [0.055, 0.176]). "
        "A full-scale probe (1 seed) gave -0.054",
    },
    {
        "date": "2026-12-01",
        "criterion": "log(||w|| / ||w||_eq) within log(1.25), after the pilot above",
        "result": "not run at full scale",
        "why": "a pre-run review: log(1.25) on the norm is 2.2x looser than the first "
        "design's log(1.5) on the ratio and was chosen after that pilot failed; the "
        "tolerance is back to the first design's, stated on the norm (log(1.5) / "
        "4), and the full run judges it",
    },
]


class _Count(NamedTuple):
    count: jax.Array


def sgd_with_wd(depth: int):
    """``hp -> optax transformation``: plain SGD; weight decay ``hp["wd"]`` on
    the scale-invariant kernels (the ``depth`` hidden Dense kernels, each
    followed by BN); with ``hp["exp"]`` = 1 their rate is ``lr *
    exp_lr_factor(t, lr, hp["lam"])`` (Li & Arora); every other parameter
    trains at ``lr`` without weight decay."""
    hidden = _hidden(depth)

    def make(hp: dict) -> optax.GradientTransformation:
        def init(params):
            del params
            return _Count(jnp.zeros((), jnp.int32))

        def update(grads, state, params):
            lr = hp["lr"]
            factor = diagnostics.exp_lr_factor(state.count, lr, hp["lam"])
            grow = jnp.where(hp["exp"] > 0.5, factor, 1.0)

            def one(path, g, w):
                if str(getattr(path[0], "key", path[0])) in hidden:
                    return -lr * (grow * g + hp["wd"] * w)
                return -lr * g

            updates = jax.tree_util.tree_map_with_path(one, grads, params)
            return updates, _Count(state.count + 1)

        return optax.GradientTransformation(init, update)

    return make


def _settings() -> list[dict]:
    """Norm dynamics: every wd at DYN_LR; Li & Arora's pair: wd = EXP_WD and
    its exponential schedule at every lr of the grid (no arm twice)."""
    out = [{"wd": wd, "exp": 0.0, "lam": 0.0, "lr": DYN_LR} for wd in WDS]
    out += [
        {"wd": EXP_WD, "exp": 0.0, "lam": 0.0, "lr": lr} for lr in LRS if lr != DYN_LR
    ]
    out += [{"wd": 0.0, "exp": 1.0, "lam": EXP_WD, "lr": lr} for lr in LRS]
    return out


def _model(width: int, depth: int, eps: float = EPS) -> MLP:
    return MLP(
        (width,) * depth,
        10,
        placement="before",
        norm=functools.partial(bnlab.linen.BatchNorm, momentum=0.9, epsilon=eps),
        init_scheme="he",
    )


def _ce(out, y):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def make_probe(model: MLP, depth: int, xb: jax.Array, yb: jax.Array):
    """``probe(variables, hp) -> {"w2": (depth,), "g2": (depth,)}``: each hidden
    kernel's squared norm and its mean squared mini-batch gradient norm over
    the fixed batches ``xb, yb`` ``(batches, batch, ...)`` in training mode."""

    def grad_sq(variables, x, y):
        def loss(p):
            out, _ = model.apply(
                {**variables, "params": p}, x, train=True, mutable=["batch_stats"]
            )
            return _ce(out, y)

        g = jax.grad(loss)(variables["params"])
        return jnp.stack(
            [jnp.sum(jnp.square(g[f"Dense_{i}"]["kernel"])) for i in range(depth)]
        )

    def probe(variables, hp):
        del hp
        g2 = jax.lax.map(lambda b: grad_sq(variables, *b), (xb, yb)).mean(0)
        p = variables["params"]
        w2 = jnp.stack(
            [jnp.sum(jnp.square(p[f"Dense_{i}"]["kernel"])) for i in range(depth)]
        )
        return {"w2": w2, "g2": g2}

    return probe


def _scaled(params: dict, depth: int, c: float) -> dict:
    return {
        k: ({**v, "kernel": v["kernel"] * c} if k in _hidden(depth) else v)
        for k, v in params.items()
    }


def _hidden(depth: int) -> set[str]:
    return {f"Dense_{i}" for i in range(depth)}


def invariance_checks(width: int, depth: int):
    """``checks(variables, x, y) -> {name: (arms,)}``: (i) and (ii) on trained
    networks stacked along a leading arm axis (float32, training mode on the
    batch ``x, y``); one compiled program."""
    base = _model(width, depth)
    exact = {c: _model(width, depth, EPS * c * c) for c in SCALES}
    hidden = sorted(_hidden(depth))

    def one(variables, x, y):
        v = {k: variables[k] for k in ("params", "batch_stats")}

        def logits_and_grads(model, params):
            def loss(p):
                out, _ = model.apply(
                    {**v, "params": p}, x, train=True, mutable=["batch_stats"]
                )
                return _ce(out, y), out

            (_, out), g = jax.value_and_grad(loss, has_aux=True)(params)
            return out, g

        f1, g1 = logits_and_grads(base, v["params"])
        scale = jnp.max(jnp.abs(f1))
        out = {k: [] for k in ("invariance", "invariance_own_eps")}
        out |= {k: [] for k in ("scaling", "scaling_own_eps")}
        for c in SCALES:
            pc = _scaled(v["params"], depth, c)
            for model, suffix in ((exact[c], ""), (base, "_own_eps")):
                fc, gc = logits_and_grads(model, pc)
                out["invariance" + suffix].append(jnp.max(jnp.abs(fc - f1)) / scale)
                for k in hidden:
                    ratio = (
                        c
                        * jnp.linalg.norm(gc[k]["kernel"])
                        / jnp.linalg.norm(g1[k]["kernel"])
                    )
                    out["scaling" + suffix].append(jnp.abs(ratio - 1.0))
        dense = [*hidden, f"Dense_{depth}"]
        cos = diagnostics.radial_cosine(
            {k: {"kernel": g1[k]["kernel"]} for k in dense},
            {k: {"kernel": v["params"][k]["kernel"]} for k in dense},
        )
        res = {k: jnp.max(jnp.stack(vals)) for k, vals in out.items()}
        res["cos"] = jnp.max(jnp.abs(jnp.stack([cos[k] for k in hidden])))
        res["cos_readout"] = jnp.abs(cos[f"Dense_{depth}"])
        return res

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def run(ctx: P.Context) -> P.Outcome:
    width = ctx.pick(64, 128)
    depth = 3
    steps = ctx.steps(400, 1500)
    every = ctx.every(100, 250)
    batch = 128
    data = ctx.data
    model = _model(width, depth)
    rng = np.random.default_rng(1706)
    pick = rng.choice(len(data.x_train), PROBE_BATCHES * batch, replace=False)
    xb = jnp.asarray(data.x_train[pick].reshape(PROBE_BATCHES, batch, -1))
    yb = jnp.asarray(data.y_train[pick].reshape(PROBE_BATCHES, batch))
    result = ctx.fit(
        "arms",
        model,
        hparams=_settings(),
        optimizer=sgd_with_wd(depth),
        steps=steps,
        batch_size=batch,
        eval_every=every,
        steps_per_call=every,
        eval_at_start=True,
        probe=make_probe(model, depth, xb, yb),
    )
    seeds = list(ctx.seeds)
    index = {
        (a.hparams["wd"], a.hparams["exp"], a.hparams["lr"], a.seed): a.index
        for a in result.arms
    }

    def arms_of(wd: float, exp: float, lr: float) -> list[int]:
        return [index[(wd, exp, lr, s)] for s in seeds]

    evals, _ = result.curve("val_accuracy")
    probe = _probe_arrays(result, len(evals), depth)  # (evals, arms, depth)
    w2, g2 = probe["w2"], probe["g2"]

    # --- norm dynamics at DYN_LR: effective lr and the equilibrium balance
    dyn = {wd: arms_of(wd, 0.0, DYN_LR) for wd in WDS}
    eff = {wd: DYN_LR / w2[:, dyn[wd], :] for wd in WDS}  # (evals, seeds, depth)
    decay = np.exp(np.mean(np.log(eff[0.0][-1] / eff[0.0][0]), axis=-1))
    log_ratio = {
        wd: np.log(
            np.asarray(
                diagnostics.equilibrium_ratio(
                    DYN_LR, wd, g2[:, dyn[wd]], w2[:, dyn[wd]]
                )
            )
        )
        for wd in WDS[1:]
    }  # (evals, seeds, depth)

    def balance(wd):
        """log(||w|| / ||w||_eq) = -log(ratio) / 4, last 3 evaluations."""
        return -np.mean(log_ratio[wd][-3:], axis=(0, 2)) / 4.0

    # --- Li & Arora: exponential lr without wd vs fixed lr with wd, tuned
    fixed = P.tune(result, where={"wd": EXP_WD, "exp": 0.0})
    expo = P.tune(result, where={"wd": 0.0, "exp": 1.0})
    _, test_fixed = P.grid_by_hparams(
        result, "test_accuracy", "lr", {"wd": EXP_WD, "exp": 0.0}
    )
    _, test_expo = P.grid_by_hparams(
        result, "test_accuracy", "lr", {"wd": 0.0, "exp": 1.0}
    )

    # --- (i), (ii) on the final weights of the wd = EXP_WD arms at DYN_LR
    x_chk = jnp.asarray(data.x_train[pick[:batch]])
    y_chk = jnp.asarray(data.y_train[pick[:batch]])
    trained = jax.tree.map(lambda a: a[np.asarray(dyn[EXP_WD])], result.variables)
    checks = invariance_checks(width, depth)(trained, x_chk, y_chk)
    col = {k: np.asarray(v, np.float64) for k, v in checks.items()}
    measured = {
        "rescale_invariance": P.mean_ci(col["invariance"]),
        "grad_orthogonal": P.mean_ci(col["cos"]),
        "grad_inverse_scaling": P.mean_ci(col["scaling"]),
        "no_wd_effective_lr_decays": P.mean_ci(decay),
        "wd_equilibrium": P.mean_ci(balance(EXP_WD)),
        "exp_lr_matches_wd": P.paired_ci(expo.report, fixed.report),
    }
    reported = {
        "invariance_with_own_epsilon": P.mean_ci(col["invariance_own_eps"]),
        "inverse_scaling_with_own_epsilon": P.mean_ci(col["scaling_own_eps"]),
        "readout_cosine_(not_invariant)": P.mean_ci(col["cos_readout"]),
        **{
            f"log_norm_over_equilibrium_wd{wd:g}": P.mean_ci(balance(wd))
            for wd in WDS[1:]
        },
    }
    table = [
        {
            "arm": f"wd={wd:g}, lr={DYN_LR:g}",
            "||w||^2 start -> end (hidden mean)": (
                f"{np.mean(w2[0, dyn[wd]]):.3g} -> {np.mean(w2[-1, dyn[wd]]):.3g}"
            ),
            "effective lr start -> end": (
                f"{np.mean(eff[wd][0]):.3g} -> {np.mean(eff[wd][-1]):.3g}"
            ),
            "4 lr wd T (relaxations)": 4 * DYN_LR * wd * steps,
            "log(||w|| / ||w||_eq), last 3 evals": (
                P.fmt(P.mean_ci(balance(wd))) if wd else "n/a (no equilibrium)"
            ),
            "test accuracy (95% interval)": P.fmt(
                P.mean_ci(np.mean(_last(result, "test_accuracy", dyn[wd]), axis=0))
            ),
        }
        for wd in WDS
    ]
    for j, lr in enumerate(LRS):
        table.append(
            {
                "arm": f"exp lr (no wd) vs wd={EXP_WD:g}, lr={lr:g}",
                "test accuracy, exp - fixed (95% interval)": P.fmt(
                    P.paired_ci(
                        np.mean(test_expo[-3:, j], axis=0),
                        np.mean(test_fixed[-3:, j], axis=0),
                    )
                ),
                "validation: fixed / exp": f"{fixed.val[j]:.3f} / {expo.val[j]:.3f}",
                "chosen (validation)": ", ".join(
                    name
                    for name, t in (("fixed", fixed), ("exp", expo))
                    if t.value == lr
                )
                or "-",
            }
        )
    records = [
        {
            "arm": f"wd={wd:g}",
            "lr": DYN_LR,
            "seed": s,
            "steps": evals.tolist(),
            "w2": w2[:, i, :].tolist(),
            "g2": g2[:, i, :].tolist(),
        }
        for wd in WDS
        for s, i in zip(seeds, dyn[wd], strict=True)
    ] + [
        {"arm": name, "lr": t.value, "seed": s, "test_accuracy": float(a)}
        for name, t in (("fixed lr, wd", fixed), ("exp lr, no wd", expo))
        for s, a in zip(seeds, t.report, strict=True)
    ]
    figure = _figure(ctx, evals, eff, w2, dyn, log_ratio)
    notes = (
        f"{ctx.data_name}; MLP {depth} x {width}, BN before each ReLU, He init; "
        f"plain SGD, batch {batch}, {steps} steps; wd on the hidden kernels only. "
        f"Norm dynamics at lr {DYN_LR:g}; the Li & Arora pair (wd {EXP_WD:g}) "
        f"each tuned on lr grid {LRS} (validation, last 3 evaluations; chosen "
        f"{fixed.value:g} fixed, {expo.value:g} exponential). Gradient norms from "
        f"{PROBE_BATCHES} fixed training batches of {batch} at every evaluation. "
        f"Checks (i)-(ii) on the final weights of the wd={EXP_WD:g} arms, on one "
        f"training batch of {batch}."
    )
    return P.Outcome(
        measured,
        table=table,
        figures=[figure],
        records=records,
        notes=notes,
        reported=reported,
    )


def _last(result, key: str, arms: list[int], k: int = 3) -> np.ndarray:
    """The last ``k`` evaluations of ``key`` for ``arms``: ``(k, len(arms))``."""
    _, values = result.curve(key)
    return values[-k:, arms]


def _probe_arrays(result, n_evals: int, depth: int) -> dict[str, np.ndarray]:
    steps = sorted({r["step"] for r in result.records})
    pos = {s: i for i, s in enumerate(steps)}
    out = {k: np.full((n_evals, len(result.arms), depth), np.nan) for k in ("w2", "g2")}
    for r in result.records:
        if r.get("probe") is not None:
            for k in out:
                out[k][pos[r["step"]], r["arm"]] = r["probe"][k]
    return out


def _figure(ctx, steps, eff, w2, dyn, log_ratio) -> str:
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    color = {wd: f"C{i}" for i, wd in enumerate(WDS)}
    for wd in WDS:
        label = f"wd={wd:g}"
        a.plot(steps, np.sqrt(w2[:, dyn[wd]].mean(-1)).mean(1), color[wd], label=label)
        b.plot(steps, eff[wd].mean(-1).mean(1), color[wd], label=label)
    for wd, r in log_ratio.items():
        r = -r.mean(-1) / 4.0  # (evals, seeds)
        c.plot(steps, r.mean(1), color[wd], label=f"wd={wd:g}")
        c.fill_between(steps, r.min(1), r.max(1), color=color[wd], alpha=0.2)
    c.axhline(0.0, color="k", ls="--", lw=0.8)
    a.set_title(f"hidden-kernel norm ||w|| (lr {DYN_LR:g})")
    b.set_title("effective lr = lr / ||w||^2")
    b.set_yscale("log")
    c.set_title("log(||w|| / ||w||_eq) (0 = equilibrium)")
    for ax in (a, b, c):
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    return ctx.save_figure(fig, "weight_decay")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
