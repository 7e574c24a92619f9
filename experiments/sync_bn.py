"""Sync BN vs per-device BN: with 2 examples per device, per-device
statistics are too noisy; statistics synchronised over the devices make one
step exactly the step of one device holding the whole batch.

8 devices are simulated inside the model: the batch is split along a named
``jax.vmap`` axis, over which bnlab's collectives run as under pmap /
shard_map (exactly, in one process on one device). :class:`DeviceSimMLP`
computes, from the same weights, four ways of taking a training step, and a
per-arm gate picks one (so all are arms of one program and arms of one seed
start from the same weights): one device with the whole batch of 16; 8
devices x 2 with synchronised statistics; 8 devices x 2 each normalizing
its own 2 examples (per-device BN); and the permutation control, one device
with each batch's examples permuted (the same maths in another float32
summation order). A 3-layer ReLU MLP (He init), SGD with momentum 0.9,
batch 16; every arm gets its own lr grid, chosen on validation and extended
past an edge it chose (:meth:`protocol.Context.fit_grid`). Final accuracies
are those at the end of the run (1000 steps at full scale); whether each arm
reached a plateau is reported per arm.

Equality is judged where it is a property: one step from identical weights.
At initialization and 10 points along every trajectory, the probe takes the
arm's current weights and one fixed batch and computes the loss, gradient
and new running statistics of one device and of the other three ways; their
relative differences are recorded. Over a run, rounding differences grow
chaotically (REFERENCE.md sec. 8), so the runs are compared by their final
accuracies, and the permutation control shows how far two runs of the same
maths drift apart.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import bnlab
from bnlab.models import kernel_init, set_gates
from experiments import exact as X
from experiments import protocol as P

NAME = "sync_bn"
CLAIM = (
    "Sync BN over 8 devices with 2 examples each takes the step of one device "
    "with the whole batch (to float32 rounding) and, over a run, ends within the "
    "test set's resolution of one device's test accuracy on most seeds; "
    "per-device BN is >= 5 points worse."
)
DEVICES = 8
BATCH = 16
LRS = (0.003, 0.01, 0.03)
MODES = {
    0: "one device, batch 16",
    1: f"sync BN, {DEVICES} devices x {BATCH // DEVICES}",
    2: f"per-device BN, {DEVICES} devices x {BATCH // DEVICES}",
    3: "one device, permuted batch (control)",
}
KINDS = ("sync", "local", "perm")  # probe: compared with one device
TOL = 1e-5
LR_LIMITS = (1e-4, 0.3)  # the equal-tuning rule's limits on an extended grid
# Test examples per scale: the equivalence margin is the resolution of one
# accuracy measured on this test set.
TEST_EXAMPLES = {"quick": 2000, "full": 10000}


def resolution(n: int) -> float:
    """The 95 % half-width of one accuracy on ``n`` test examples at its
    widest (p = 0.5): 1.96 * sqrt(0.25 / n), rounded to 0.1 point."""
    return round(1.96 * math.sqrt(0.25 / n), 3)


MARGIN = {scale: resolution(n) for scale, n in TEST_EXAMPLES.items()}
MAJORITY = 0.5
# A share of seeds has an exact interval: 5 of 5 leaves its lower end at
# 0.478 < MAJORITY (no outcome but INCONCLUSIVE); 6 of 6 gives 0.54. The power
# plan asks for at least this many.
MIN_SEEDS = 6
CRITERIA = [
    P.Criterion(
        "one_step_equal",
        "one step from identical weights, sync vs one device: largest relative "
        "difference of loss, gradient and new running statistics (max over the "
        "points along every sync trajectory, all seeds and lrs)",
        "<=",
        TOL,
        "issue 16 (1e-5 relative: ~100x float32's 6e-8 rounding, room for the "
        "summation order of 8 devices)",
    ),
    P.Criterion(
        "final_equal",
        "share of seeds on which sync BN ends within the margin of one device: "
        "|sync - one device| test accuracy at the end of the run (mean of the "
        "last 3 evaluations, at one device's lr chosen on validation) <= the "
        "test set's resolution (1.0 point full, 2.2 quick), with its exact "
        "Clopper-Pearson 95% interval (the per-seed differences tie at 0, where "
        "a t interval has zero width)",
        ">",
        MAJORITY,
        "'ends as well', stated as what this test set can resolve: sync BN takes "
        "one device's step (the check above), but rounding differences grow over a "
        "run (REFERENCE.md sec. 8), so two runs of the same maths are not bitwise "
        "equal at the end and 'to float32 rounding' is not claimed for them; the "
        "margin is the resolution of one accuracy on this test set (95% "
        "half-width at p = 0.5, 1.96 sqrt(0.25 / N): 1.0 point for N = 10,000 at "
        "full scale, 2.2 for N = 2,000 at quick), fixed from N, not from measured "
        "accuracies; 'as well' as most seeds (a binomial test against 0.5: one "
        "seed's chaotic drift does not make a method train worse). "
        "CONTRADICTED: most seeds differ by more",
    ),
    P.Criterion(
        "per_device_worse",
        "one device - per-device BN: test accuracy at the end of the run (each at "
        "its lr chosen on validation, paired by seed)",
        ">=",
        0.05,
        "issue 16 (>= 5 points); Ioffe 2017 and Wu & He 2018: BN degrades sharply "
        "at 2 examples per normalization batch",
        null=0.0,
    ),
]
HISTORY = [
    {
        "date": "2026-11-20",
        "criterion": "sync vs one device: max |parameter difference| / max "
        "|parameter| <= 1e-5 after 2000 steps of training; one device - "
        "per-device BN >= 5 points (3 seeds, lr 0.02)",
        "result": "FAIL: 0.196 after training (4.5e-7 after 100 steps); "
        "per-device 42.7 points worse (pass)",
        "why": "equality after a long run cannot hold in float32: the same arm "
        "with each batch permuted differs as much (0.17-0.24 after 2000 steps). "
        "Equality is now checked one step from identical weights along the "
        "trajectory, and the runs by their final accuracies (issue 16)",
    },
    {
        "date": "2026-12-05",
        "criterion": "final_equal within +-0.015 at both scales, 'about the "
        "half-width of a 5-seed interval of one arm's accuracy'; lrs on a fixed "
        "grid; per_device_worse without a null",
        "pilot": "full-1000",
        "why": "the stated reason did not hold (the measured half-widths are 0.35 "
        "points full, 0.7 quick), and a margin measured on seeds is not a fixed "
        "one (issue 21): the margin is now the resolution of one accuracy on the "
        "scale's test set (1.0 point full, 2.2 quick), fixed from the test set's "
        "size; grids extend past a chosen edge (equal tuning); per_device_worse "
        "gets null 0 so that CONTRADICTED means per-device BN is better",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946 (pilot)",
        "pilot": "quick-300",
        "why": "pilot of that design; nothing changed after it",
    },
    {
        "date": "2026-12-05",
        "criterion": "the design registered at 6e0f946: final_equal as a paired t "
        "interval of sync - one device within +-the test set's resolution, under "
        "the claim 'trains as well (to float32 rounding)'",
        "run": "superseded/full-6e0f946",
        "why": "the review of issue 21 (written before this result existed, "
        "docs/reproduction.md at 685662f): the margin (the resolution of one "
        "accuracy, 1 / 2.2 points) is much wider than 'to float32 rounding' "
        "suggests, and the per-seed differences tie at 0 (a zero-width t "
        "interval at quick scale). The claim now says what is tested, within the "
        "test set's resolution; the margin is unchanged",
    },
    {
        "date": "2026-12-05",
        "criterion": "this design (full-scale pilot, for the power plan)",
        "pilot": "full-2500",
        "why": "pilot of the design registered next; nothing changed after it. "
        "Before it, a review of the draft (never run) found that judging the "
        "range over seeds could never be CONTRADICTED when the differences tie at "
        "0, and that judging the worst seed would let one seed's chaotic rounding "
        "drift (as large as the permutation control's) contradict 'trains as "
        "well': hence the share of seeds within the margin, an exact test against "
        "a majority (experiments.exact.share_within); 5 seeds cannot decide it, "
        "so a quick run is INCONCLUSIVE by construction",
    },
]


# ------------------------------------------------------------------ model


def forward(p, s, x, depth: int, *, train: bool, axis_name=None, momentum=0.9):
    """The MLP as a pure function of its parameters ``p`` and running
    statistics ``s``: ``(logits, new statistics)``."""
    new = {}
    h = x
    for i in range(depth):
        h = h @ p[f"kernel_{i}"]
        stats = bnlab.BatchStats(s[f"mean_{i}"], s[f"var_{i}"])
        h, ns = bnlab.batch_norm(
            h,
            stats,
            p[f"scale_{i}"],
            p[f"bias_{i}"],
            train=train,
            momentum=momentum,
            axis_name=axis_name,
        )
        new[f"mean_{i}"], new[f"var_{i}"] = ns.mean, ns.var
        h = jax.nn.relu(h)
    return h @ p["out_kernel"] + p["out_bias"], new


def permutation(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation of ``n`` rows and its inverse."""
    perm = np.random.default_rng([0, 7]).permutation(n)
    return perm, np.argsort(perm)


def step_ways(p, s, x, depth: int, devices: int, momentum=0.9) -> dict:
    """``{way: (logits, new statistics)}`` of one training step's forward pass
    for the four ways (rows of ``logits`` in ``x``'s order)."""
    n = x.shape[0]
    split = x.reshape(devices, n // devices, *x.shape[1:])

    def on_devices(axis_name, reduce):
        logits, new = jax.vmap(
            lambda xd: forward(
                p, s, xd, depth, train=True, axis_name=axis_name, momentum=momentum
            ),
            axis_name="devices",
        )(split)
        return logits.reshape(n, -1), jax.tree.map(reduce, new)

    perm, inv = permutation(n)
    logits_p, new_p = forward(p, s, x[perm], depth, train=True, momentum=momentum)
    return {
        "one": forward(p, s, x, depth, train=True, momentum=momentum),
        # synced statistics are the same on every device
        "sync": on_devices("devices", lambda a: a[0]),
        # per-device running statistics: the devices' average
        "local": on_devices(None, lambda a: jnp.mean(a, axis=0)),
        "perm": (logits_p[inv], new_p),
    }


class DeviceSimMLP(nn.Module):
    """Dense -> BN -> ReLU layers (He init) trained in one of four ways, the
    per-arm gate ``gates/mode``: 0 one device, 1 sync over ``devices``
    simulated devices, 2 per-device BN, 3 one device with the batch
    permuted. Evaluation is the same for all (running statistics)."""

    widths: tuple[int, ...]
    num_outputs: int = 10
    devices: int = DEVICES
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        mode = self.variable("gates", "mode", lambda: jnp.zeros((), jnp.float32)).value
        x = x.reshape(x.shape[0], -1)
        he = kernel_init("he")
        p, stats = {}, {}
        d_in = x.shape[-1]
        for i, w in enumerate(self.widths):
            p[f"kernel_{i}"] = self.param(f"kernel_{i}", he, (d_in, w))
            p[f"scale_{i}"] = self.param(f"scale_{i}", nn.initializers.ones, (w,))
            p[f"bias_{i}"] = self.param(f"bias_{i}", nn.initializers.zeros, (w,))
            stats[f"mean_{i}"] = self.variable(
                "batch_stats", f"mean_{i}", jnp.zeros, (w,)
            )
            stats[f"var_{i}"] = self.variable("batch_stats", f"var_{i}", jnp.ones, (w,))
            d_in = w
        p["out_kernel"] = self.param("out_kernel", he, (d_in, self.num_outputs))
        p["out_bias"] = self.param(
            "out_bias", nn.initializers.zeros, (self.num_outputs,)
        )
        s = {k: v.value for k, v in stats.items()}
        depth = len(self.widths)
        if not train or self.is_initializing():
            return forward(p, s, x, depth, train=False)[0]
        ways = step_ways(p, s, x, depth, self.devices, self.momentum)
        names = ("one", "sync", "local", "perm")

        def pick(parts):
            out = parts[0]
            for code in range(1, len(parts)):
                out = jax.tree.map(
                    lambda a, b, c=code: jnp.where(mode == c, b, a), out, parts[code]
                )
            return out

        logits = pick([ways[k][0] for k in names])
        new = pick([ways[k][1] for k in names])
        for k, v in stats.items():
            v.value = new[k]
        return logits


def probe(depth: int, x, y, devices: int = DEVICES):
    """``(variables, hp) -> {way: relative difference from one device, ...,
    "slice": 64 parameters}``: one step's loss, gradient and new running
    statistics from the arm's current weights on the fixed batch ``(x, y)``."""
    n = len(y)

    def f(variables, hp):
        del hp
        p, s = variables["params"], variables["batch_stats"]

        def loss(p, way):
            logits, new = step_ways(p, s, x, depth, devices)[way]
            ll = jax.nn.log_softmax(logits)[jnp.arange(n), y]
            return -jnp.mean(ll), new

        out = {}
        for way in ("one", *KINDS):
            (value, new), grad = jax.value_and_grad(loss, has_aux=True)(p, way)
            out[way] = (value, grad, new)

        def rel(a, b):
            a, b = (
                jax.flatten_util.ravel_pytree(a)[0],
                jax.flatten_util.ravel_pytree(b)[0],
            )
            return jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)

        ref = out["one"]
        diffs = {
            way: jnp.max(jnp.stack([rel(out[way][k], ref[k]) for k in range(3)]))
            for way in KINDS
        }
        return {**diffs, "slice": p["kernel_1"].ravel()[:64]}

    return f


# -------------------------------------------------------------------- run


def run(ctx: P.Context) -> P.Outcome:
    width, depth = 64, 3
    steps = ctx.steps(500, 1000, smoke=10)
    every = max(steps // 10, 1)
    data = ctx.data
    x, y = jnp.asarray(data.x_train[-BATCH:]), jnp.asarray(data.y_train[-BATCH:])
    model = DeviceSimMLP((width,) * depth)
    fit_kw = {
        "optimizer": lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        "post_init": lambda v, hp: set_gates(v, mode=hp["mode"]),
        "probe": probe(depth, x, y),
        "steps": steps,
        "batch_size": BATCH,
        "eval_every": every,
        "eval_at_start": True,
    }
    grid = ctx.fit_grid(
        "arms",
        model,
        arms=[{"mode": float(m)} for m in MODES],
        grid=LRS,
        limits=LR_LIMITS,
        **fit_kw,
    )
    seeds = ctx.seeds
    tuned = {m: grid.tune(where={"mode": float(m)}) for m in MODES}
    one_lr = tuned[0].value
    # sync and the control are compared at one device's lr: fit them there if
    # their own grids did not reach it
    missing = [
        {"mode": float(m), "lr": one_lr}
        for m in (1, 3)
        if one_lr not in grid.values({"mode": float(m)})
    ]
    if missing:
        grid.results.append(ctx.fit("at_one_lr", model, hparams=missing, **fit_kw))
    plateaus = {
        m: P.plateau(grid, where={"mode": float(m)}, hp="lr", value=tuned[m].value)
        for m in MODES
    }

    def at_lr(m, lr):  # per seed, mean test accuracy of the last 3 evaluations
        values, acc = P.grid_by_hparams(grid, "test_accuracy", "lr", {"mode": float(m)})
        return np.mean(acc[-3:, values.index(lr), :], axis=0)

    # one-step differences: (points, arms) per way, over every arm of a mode
    records = [r for res in grid.results for r in res.records]
    steps_axis = np.asarray(sorted({r["step"] for r in records}))
    diffs = {
        way: {m: _probe_values(grid, way, m, steps_axis) for m in MODES}
        for way in KINDS
    }
    sync_diffs = diffs["sync"][1]  # sync arms' own trajectories
    worst = float(np.nanmax(sync_diffs)) if np.isfinite(sync_diffs).any() else np.nan
    margin = MARGIN["quick" if ctx.quick else "full"]
    final_diff = at_lr(1, one_lr) - at_lr(0, one_lr)  # sync - one device
    measured = {
        "one_step_equal": P.Measured(
            worst,
            worst,
            worst,
            None,
            f"max over {sync_diffs.shape[0]} points x {sync_diffs.shape[1]} arms",
        ),
        "final_equal": X.share_within(final_diff, margin, "end within the margin"),
        "per_device_worse": P.paired_ci(tuned[0].report, tuned[2].report),
    }
    reported = {
        "permutation control - one device: test accuracy at the end (paired)": (
            P.paired_ci(at_lr(3, one_lr), at_lr(0, one_lr))
        ),
        "one step, per-device vs one device: largest relative difference (median "
        "over points and arms)": _median(diffs["local"][2]),
        "one step, permuted vs one device: largest relative difference (max over "
        "points and arms)": _max(diffs["perm"][3]),
    }
    drift = _drift(records, steps_axis, seeds, one_lr)

    def within_at(m: float) -> str:
        share = X.share_within(final_diff, m, "end within the margin")
        return P.decide(share.low, share.high, ">", MAJORITY).outcome

    sensitivity = {
        "final_equal": P.Sensitivity(
            "margin (the test set's resolution)",
            margin,
            P.sensitivity(within_at, margin, (margin / 2, 2 * margin)),
        )
    }
    table = [
        {
            "arm": MODES[m],
            "chosen lr (validation)": tuned[m].text(),
            "validation accuracy by lr": ", ".join(
                f"{lr:g}: {v:.3f}"
                for lr, v in zip(tuned[m].grid, tuned[m].val, strict=True)
            ),
            "test accuracy at its lr": P.fmt(P.mean_ci(tuned[m].report)),
            f"test accuracy at lr {one_lr:g}": P.fmt(P.mean_ci(at_lr(m, one_lr))),
            "one-step relative difference from one device (max over its arms)": (
                "0 (reference)"
                if m == 0
                else f"{np.nanmax(diffs[('sync', 'local', 'perm')[m - 1]][m]):.2e}"
            ),
            "plateau (validation, at its lr)": plateaus[m].text,
        }
        for m in MODES
    ]
    table += [
        {
            "arm": f"after {int(s)} steps: relative parameter difference from one "
            f"device (lr {one_lr:g}, max over seeds)",
            "sync": f"{drift[1][i]:.2e}",
            "permuted (control)": f"{drift[3][i]:.2e}",
        }
        for i, s in enumerate(steps_axis)
        if i in (1, 2, len(steps_axis) // 2, len(steps_axis) - 1)
    ]
    out_records = [
        {
            "step": int(s),
            "way": way,
            "mode_of_arms": MODES[m],
            "max_relative_difference": _finite(np.nanmax(diffs[way][m][i])),
        }
        for way in KINDS
        for m in MODES
        for i, s in enumerate(steps_axis)
    ] + [
        {"step": int(s), "arm": MODES[m], "relative_parameter_difference": float(d)}
        for m in (1, 3)
        for s, d in zip(steps_axis, drift[m], strict=True)
    ]
    figure = _figure(ctx, steps_axis, diffs, drift, one_lr)
    extended = ", ".join(
        f"{MODES[int(e['arm']['mode'])]} {e['edge']} {e['lr']:g}"
        for e in grid.extensions
    )
    return P.Outcome(
        measured,
        reported=reported,
        sensitivity=sensitivity,
        table=table,
        figures=[figure],
        records=out_records,
        notes=(
            f"{ctx.data_name}; MLP {depth} x {width}, ReLU, He init, BN momentum "
            f"0.9; {steps} steps of SGD (momentum 0.9), batch {BATCH}, lr grid "
            f"{LRS} per arm, chosen on validation (mean of the last 3 evaluations), "
            f"extended past a chosen edge within {LR_LIMITS}: {extended or 'none'}"
            f"{'; sync and the control also at ' + str(one_lr) if missing else ''}. "
            f"One-step probe at {len(steps_axis)} points (every {every} steps and at "
            f"initialization) on {BATCH} fixed training examples. The parameter "
            "drift compares 64 weights of the second layer between arms of one "
            "seed that start from the same weights."
        ),
    )


def _probe_values(grid, way, mode, steps_axis) -> np.ndarray:
    cols = []
    pos = {s: i for i, s in enumerate(steps_axis)}
    for result in grid.results:
        arms = [a.index for a in result.arms if a.hparams["mode"] == float(mode)]
        out = np.full((len(steps_axis), len(arms)), np.nan)
        col = {a: j for j, a in enumerate(arms)}
        for r in result.records:
            if r["arm"] in col and r.get("probe") is not None:
                out[pos[r["step"]], col[r["arm"]]] = r["probe"][way]
        cols.append(out)
    return np.concatenate(cols, axis=1)


def _drift(records, steps_axis, seeds, lr) -> dict:
    """Per mode (1, 3): max over seeds of the relative difference of the
    probe's parameter slice from the one-device arm of the same seed."""
    pos = {s: i for i, s in enumerate(steps_axis)}
    sl = {}
    for r in records:
        if r.get("probe") is not None and r["hparams"]["lr"] == lr:
            key = (r["hparams"]["mode"], r["seed"])
            sl.setdefault(key, {})[pos[r["step"]]] = np.asarray(r["probe"]["slice"])
    out = {}
    for m in (1, 3):
        d = np.full((len(steps_axis), len(seeds)), np.nan)
        for j, seed in enumerate(seeds):
            a, b = sl.get((float(m), seed), {}), sl.get((0.0, seed), {})
            for i in set(a) & set(b):
                d[i, j] = np.max(np.abs(a[i] - b[i])) / max(np.max(np.abs(b[i])), 1e-30)
        out[m] = np.nanmax(d, axis=1) if np.isfinite(d).any() else d[:, 0]
    return out


def _finite(v):
    return float(v) if np.isfinite(v) else None


def _median(a) -> P.Measured:
    v = float(np.nanmedian(a)) if np.isfinite(a).any() else np.nan
    return P.Measured(v, v, v)


def _max(a) -> P.Measured:
    v = float(np.nanmax(a)) if np.isfinite(a).any() else np.nan
    return P.Measured(v, v, v)


def _figure(ctx, steps, diffs, drift, lr) -> str:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for way, m, color, label in (
        ("sync", 1, "tab:blue", "sync, 8 devices"),
        ("perm", 3, "tab:orange", "permuted batch"),
        ("local", 2, "tab:red", "per-device BN"),
    ):
        v = diffs[way][m]
        a1.plot(steps, np.nanmax(v, 1), "o-", color=color, label=f"{label} (max)")
    a1.axhline(TOL, color="k", lw=0.8, ls="--", label=f"criterion {TOL:g}")
    a1.set_yscale("log")
    a1.set_xlabel("training step (weights of each arm's own trajectory)")
    a1.set_ylabel("one step: relative difference from one device")
    a1.legend(fontsize=8)
    for m, color, label in ((1, "tab:blue", "sync"), (3, "tab:orange", "permuted")):
        a2.plot(steps[1:], drift[m][1:], "o-", color=color, label=label)
    a2.set_yscale("log")
    a2.set_xlabel("training step")
    a2.set_ylabel(f"relative parameter difference from one device (lr {lr:g})")
    a2.set_title("arms of one seed, same start: how far they drift")
    a2.legend()
    return ctx.save_figure(fig, "sync_bn")


if __name__ == "__main__":
    from experiments.reproduce import main

    raise SystemExit(main(NAME))
