"""Shared machinery of the experiments: context, data, many arms trained as
one program, resumable through bnlab's checkpoints, figures and verdicts.

An *arm* is one model trained with one seed and one set of hyper-parameters.
Arms of the same architecture form a *group* and train together: parameters
are stacked along a leading arm axis, one jitted ``vmap`` step updates every
arm, and ``lax.scan`` runs the steps between two evaluation points without
returning to Python. Metrics reach the host only at evaluation points. After
each chunk the stacked state goes through :class:`bnlab.train.Checkpointer`
(digest-checked), so an interrupted run resumes where it stopped and a
finished group is never recomputed; batch ``i`` of an arm is a pure function
of its seed and ``i`` (:class:`bnlab.data.BatchStream`), so resumed results
are identical to uninterrupted ones.

Uses bnlab's public API only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnlab
from bnlab import data as bn_data
from bnlab.train import Checkpointer

os.environ.setdefault("MPLBACKEND", "Agg")

__all__ = ["Context", "Group", "Result", "check", "steps_to"]


# ------------------------------------------------------------------ context


@dataclasses.dataclass
class Context:
    """Where an experiment writes, at which scale, and how it reports progress.

    Attributes:
      name: experiment name (its module name).
      out: the experiment's run directory.
      quick: small scale on embedded data (digits, wine, synthetic).
      seeds: seeds per arm.
      progress: ``progress(done, total, label)`` for the steps bar, or None.
      smoke: a few steps only, to check that the experiment runs (CI); its
        verdicts mean nothing.
    """

    name: str
    out: Path
    quick: bool
    seeds: int
    progress: Callable[[int, int, str], None] | None = None
    smoke: bool = False
    training: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()

    @property
    def scale(self) -> str:
        return "smoke" if self.smoke else "quick" if self.quick else "full"

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def steps(self, quick: int, full: int, smoke: int = 8) -> int:
        """Training steps at this scale."""
        return smoke if self.smoke else self.pick(quick, full)

    def every(self, quick: int, full: int) -> int:
        """Steps between evaluations at this scale."""
        return 4 if self.smoke else self.pick(quick, full)

    @functools.cached_property
    def images(self) -> bn_data.Dataset:
        """Images ``(N, H, W, 1)``: digits 8x8 (quick) or Fashion-MNIST."""
        return bn_data.load("digits" if self.quick else "fashion_mnist")

    @functools.cached_property
    def data(self) -> bn_data.Dataset:
        """Images flattened to vectors: digits (quick) or Fashion-MNIST."""
        ds = bn_data.load("digits" if self.quick else "fashion_mnist")
        flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
        return bn_data.Dataset(
            flat(ds.x_train), ds.y_train, flat(ds.x_test), ds.y_test, ds.num_classes
        )

    def figure(self, stem: str) -> Path:
        return self.out / f"{stem}.png"

    def save_figure(self, fig: Any, stem: str) -> str:
        """Lays out, writes ``stem.png`` and closes a matplotlib figure;
        returns the file name (as ``write_outputs`` lists figures)."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(self.figure(stem), dpi=110)
        plt.close(fig)
        return f"{stem}.png"


def check(name: str, measured: Any, criterion: str, passed: bool) -> dict:
    """One numeric check of a verdict."""
    return {
        "name": name,
        "criterion": criterion,
        "measured": _jsonable(measured),
        "pass": bool(passed),
    }


def write_outputs(
    ctx: Context,
    claim: str,
    checks: list[dict],
    records: list[dict],
    table: list[dict],
    figures: list[str],
    notes: str = "",
    extra: dict | None = None,
) -> dict:
    """``metrics.jsonl`` and ``verdict.json`` in the experiment's directory."""
    with open(ctx.out / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(_jsonable(r), allow_nan=False) + "\n")
    verdict = {
        "experiment": ctx.name,
        "claim": claim,
        "scale": ctx.scale,
        "seeds": ctx.seeds,
        # no criterion (a measurement the issue asks to report): REPORT
        "verdict": "REPORT"
        if not checks
        else "PASS"
        if all(c["pass"] for c in checks)
        else "FAIL",
        "checks": checks,
        "table": _jsonable(table),
        "figures": figures,
        "notes": notes,
        "command": f"python -m experiments.{ctx.name}"
        + (" --quick" if ctx.quick else "")
        + f" --seeds {ctx.seeds}",
        "environment": environment(),
        "seconds": time.perf_counter() - ctx.started,
        "training": ctx.training,
        **(_jsonable(extra) if extra else {}),
    }
    tmp = ctx.out / "verdict.json.tmp"
    tmp.write_text(json.dumps(verdict, indent=1, allow_nan=False))
    tmp.replace(ctx.out / "verdict.json")
    return verdict


def environment() -> dict:
    import flax

    dev = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "bnlab": bnlab.__version__,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def steps_to(steps: Sequence[int], values: Sequence[float], threshold: float):
    """First step at which ``values`` reaches ``threshold`` (None if never)."""
    for s, v in zip(steps, values, strict=True):
        if v is not None and v >= threshold:
            return int(s)
    return None


# ------------------------------------------------------------------ training


@dataclasses.dataclass
class Group:
    """Arms of one architecture, trained together.

    Attributes:
      name: unique within the experiment (names the checkpoint directory).
      model: a Flax Linen module called as ``model(x, train=...)``.
      seeds: per arm: init and data-order seed.
      hparams: per arm values (arrays of length ``n_arms``), e.g. ``lr``.
      make_tx: ``make_tx(hp) -> optax transform``; ``hp`` holds one arm's
        (traced) hyper-parameters.
      steps: training steps.
      batch_size: examples per step and arm.
      eval_every: steps per chunk (evaluation, probes, checkpoint).
      probe: optional ``probe(variables, hp, data) -> pytree`` evaluated for
        each arm at every evaluation point (and at step 0).
      eval_at_zero: also evaluate before training.
      sampler: optional ``sampler(seed, step) -> example indices`` (host,
        numpy); default: shuffled epochs (:class:`bnlab.data.BatchStream`).
      noise: pass ``rngs={"noise": key(seed, step)}`` to the model in training
        (for layers that draw fresh noise every step).
      train_kwargs: optional ``train_kwargs(step) -> dict`` of extra keyword
        arguments of the model in training (e.g. a batch-renorm schedule).
      post_init: optional ``post_init(variables, hp) -> variables`` applied
        to each arm's initial variables (arms that differ only in their
        initialization then share one program).
      scan: run the steps of a chunk in one ``lax.scan``; False: a Python loop
        of jitted steps (XLA:CPU runs convolutions about 10x slower inside a
        loop: 1.10 vs 0.11 s per ResNet-20 step, ``python -m
        benchmarks.scan_steps``).
    """

    name: str
    model: Any
    seeds: Sequence[int]
    hparams: dict[str, Sequence[float]]
    make_tx: Callable[[dict], optax.GradientTransformation]
    steps: int
    batch_size: int
    eval_every: int
    probe: Callable | None = None
    eval_at_zero: bool = True
    sampler: Callable[[int, int], np.ndarray] | None = None
    noise: bool = False
    train_kwargs: Callable[[jax.Array], dict] | None = None
    post_init: Callable[[dict, dict], dict] | None = None
    scan: bool = True

    @property
    def n_arms(self) -> int:
        return len(self.seeds)


@dataclasses.dataclass
class Result:
    """Per evaluation point: ``steps``; per arm (axis 1): ``test_accuracy``,
    ``test_loss``, ``train_loss`` (mean over the chunk), ``probes``; the
    final stacked ``variables``; ``diverged`` per arm."""

    steps: list[int]
    test_accuracy: np.ndarray  # (evals, arms)
    test_loss: np.ndarray
    train_loss: np.ndarray
    probes: list[Any]
    variables: dict
    diverged: np.ndarray


def _loss_acc(logits, y):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def evaluate(model, variables, x, y, batch: int = 2000):
    """Test loss and accuracy of one arm with running statistics."""
    total_loss = total_acc = 0.0
    for i in range(0, len(x), batch):
        logits = model.apply(variables, x[i : i + batch], train=False)
        loss, acc = _loss_acc(logits, y[i : i + batch])
        n = len(x[i : i + batch])
        total_loss, total_acc = total_loss + loss * n, total_acc + acc * n
    return total_loss / len(x), total_acc / len(x)


def train_group(ctx: Context, group: Group, data: bn_data.Dataset | None = None):
    """Trains every arm of ``group`` (resuming if checkpoints exist)."""
    data = data or ctx.data
    x_tr, y_tr = jax.device_put((data.x_train, data.y_train))
    x_te, y_te = jax.device_put((data.x_test, data.y_test))
    model, n = group.model, group.n_arms
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in group.hparams.items()}
    seeds = np.asarray(group.seeds)
    config = {
        "group": group.name,
        "seeds": [int(s) for s in seeds],
        "hparams": {k: [float(v) for v in vs] for k, vs in group.hparams.items()},
        "steps": group.steps,
        "batch_size": group.batch_size,
        "eval_every": group.eval_every,
        "scale": ctx.scale,
        "model": repr(model),
    }

    def init_one(seed, h):
        variables = model.init(jax.random.key(seed), x_tr[:2], train=False)
        if group.post_init is not None:
            variables = group.post_init(variables, h)
        opt = group.make_tx(h).init(variables["params"])
        return {"variables": variables, "opt": opt}

    state = jax.jit(jax.vmap(init_one))(jnp.asarray(seeds), hp)

    def step_one(st, h, idx, seed, t):
        variables = st["variables"]
        rngs = (
            {"noise": jax.random.fold_in(jax.random.key(seed), t)}
            if group.noise
            else None
        )

        extra = {} if group.train_kwargs is None else group.train_kwargs(t)

        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params},
                x_tr[idx],
                train=True,
                mutable=["batch_stats"],
                rngs=rngs,
                **extra,
            )
            loss, _ = _loss_acc(logits, y_tr[idx])
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        tx = group.make_tx(h)
        upd, opt = tx.update(grads, st["opt"], variables["params"])
        new_vars = {
            **variables,
            **updates,
            "params": optax.apply_updates(variables["params"], upd),
        }
        return {"variables": new_vars, "opt": opt}, loss

    seed_arr = jnp.asarray(seeds)

    def body(st, xs):
        idx_t, t = xs
        return jax.vmap(step_one, in_axes=(0, 0, 0, 0, None))(
            st, hp, idx_t, seed_arr, t
        )

    @jax.jit
    def scanned(state, idx, t0):  # idx: (steps, arms, batch)
        ts = t0 + jnp.arange(idx.shape[0])
        state, losses = jax.lax.scan(body, state, (idx, ts))
        return state, jnp.mean(losses, axis=0)

    one_step = jax.jit(lambda st, idx_t, t: body(st, (idx_t, t)))

    def looped(state, idx, t0):
        total = 0.0
        for i in range(idx.shape[0]):
            state, loss = one_step(state, idx[i], t0 + i)
            total = total + loss  # stays on the device
        return state, total / idx.shape[0]

    chunk = scanned if group.scan else looped

    @jax.jit
    def eval_all(variables):
        return jax.vmap(lambda v: evaluate(model, v, x_te, y_te))(variables)

    probe = None
    if group.probe is not None:
        probe = jax.jit(
            jax.vmap(lambda v, h: group.probe(v, h, (x_tr, y_tr, x_te, y_te)))
        )

    streams = {
        int(s): bn_data.BatchStream(
            data.x_train, data.y_train, group.batch_size, int(s), 0, 1
        )
        for s in set(seeds.tolist())
    }

    def indices(start, stop):
        if group.sampler is not None:
            draw = group.sampler
        else:
            draw = lambda s, i: streams[s].indices(i)  # noqa: E731
        per_seed = {
            s: np.stack([draw(s, i) for i in range(start, stop)]) for s in streams
        }
        return np.stack([per_seed[int(s)] for s in seeds], axis=1).astype(np.int32)

    ckpt = Checkpointer(ctx.out / group.name / "checkpoints", keep=1)
    records: list[dict] = []
    diverged = np.zeros(n, bool)
    start = 0

    def record(step, train_loss, state):
        loss, acc = eval_all(state["variables"])
        r = {
            "step": step,
            "train_loss": np.where(diverged, np.nan, train_loss),
            "test_loss": np.where(diverged, np.nan, np.asarray(loss)),
            "test_accuracy": np.where(diverged, np.nan, np.asarray(acc)),
        }
        if probe is not None:
            r["probe"] = jax.tree.map(np.asarray, probe(state["variables"], hp))
        records.append(_jsonable(r))

    try:
        restored = ckpt.restore_latest(
            {"state": state, "diverged": np.zeros(n, np.int32)},
            check_meta=lambda m: _same_config(m, config, ctx),
        )
        if restored is not None:
            saved, meta = restored
            state = jax.device_put(saved["state"])
            diverged = np.asarray(saved["diverged"]).astype(bool)
            records = meta["records"]
            start = int(meta["step"])
        elif group.eval_at_zero:
            record(0, np.full(n, np.nan), state)
        t0, trained = time.perf_counter(), 0
        while start < group.steps:
            stop = min(start + group.eval_every, group.steps)
            trained += stop - start
            state, train_loss = chunk(
                state, jax.device_put(indices(start, stop)), jnp.int32(start)
            )
            finite = _finite_per_arm(state)
            if not finite.all():  # diverged arms: zeroed, masked from now on
                diverged |= ~finite
                state = _zero_arms(state, ~finite)
            record(stop, np.asarray(train_loss), state)
            ckpt.save(
                stop,
                {"state": state, "diverged": diverged.astype(np.int32)},
                {
                    "config": config,
                    "step": stop,
                    "data_position": stop,
                    "records": records,
                },
            )
            start = stop
            if ctx.progress is not None:
                ctx.progress(stop, group.steps, group.name)
        if trained:
            ctx.training.append(
                {
                    "group": group.name,
                    "arms": n,
                    "steps": trained,
                    "seconds": time.perf_counter() - t0,
                }
            )
    finally:
        ckpt.close()
    arr = lambda k: np.array(  # noqa: E731
        [[np.nan if v is None else v for v in r[k]] for r in records], np.float64
    )
    return Result(
        steps=[r["step"] for r in records],
        test_accuracy=arr("test_accuracy"),
        test_loss=arr("test_loss"),
        train_loss=arr("train_loss"),
        probes=[r.get("probe") for r in records],
        variables=jax.device_get(state["variables"]),
        diverged=diverged,
    )


def _same_config(meta: dict, config: dict, ctx: Context) -> None:
    from bnlab.train import ConfigError

    if meta["config"] != json.loads(json.dumps(config)):
        raise ConfigError(
            f"{ctx.out} holds results of different settings for "
            f"'{config['group']}' (e.g. another scale or seed count); use another "
            "--out or delete that directory."
        )


def _finite_per_arm(state) -> np.ndarray:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    ok = [
        np.all(np.isfinite(np.asarray(x)).reshape(len(x), -1), axis=1) for x in leaves
    ]
    return np.logical_and.reduce(ok)


def _zero_arms(state, bad: np.ndarray):
    mask = jnp.asarray(bad)

    def zero(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(m, jnp.zeros((), x.dtype), x)

    return jax.tree.map(zero, state)


def momentum_sgd(hp: dict) -> optax.GradientTransformation:
    """SGD with momentum 0.9 at the arm's ``hp["lr"]`` (most experiments')."""
    return optax.sgd(hp["lr"], momentum=0.9)


def plot_curves(
    ctx: Context,
    stem: str,
    curves: dict[str, tuple[Sequence[int], np.ndarray]],
    title: str,
    ylabel: str = "test accuracy (mean over seeds)",
    hline: float | None = None,
) -> str:
    """One figure of per-arm curves ``{label: (steps, values (evals, seeds))}``
    (mean over seeds); returns the PNG's file name."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (steps, values) in curves.items():
        v = np.asarray(values, np.float64)
        ok = ~np.all(np.isnan(v), axis=1)
        mean = np.where(ok, np.nanmean(np.where(ok[:, None], v, 0.0), axis=1), np.nan)
        ax.plot(
            np.asarray(steps)[ok], mean[ok], "-" if "BN" in label else "--", label=label
        )
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.6, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ctx.save_figure(fig, stem)


def arm_slice(variables: Any, i: int) -> Any:
    """One arm's variables out of a stacked tree."""
    return jax.tree.map(lambda a: a[i], variables)


def curve_records(results: dict[str, Result], **fields: str) -> list[dict]:
    """One record per arm name and evaluation step: ``{"arm", "step", key:
    getattr(result, attribute)[i]}`` for each ``key=attribute``."""
    return [
        {"arm": k, "step": s, **{key: getattr(r, a)[i] for key, a in fields.items()}}
        for k, r in results.items()
        for i, s in enumerate(r.steps)
    ]


def mean_spread(values: np.ndarray, axis: int = -1) -> tuple[float, float]:
    """Mean and standard deviation over seeds (NaN-aware)."""
    v = np.asarray(values, np.float64)
    if np.all(np.isnan(v)):
        return float("nan"), float("nan")
    return float(np.nanmean(v, axis=axis)), float(np.nanstd(v, axis=axis))


def fmt(mean: float, spread: float | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if spread is None or math.isnan(spread):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def main(run: Callable[[Context], dict], name: str, argv=None) -> int:
    """``python -m experiments.NAME [--quick] [--seeds N] [--out DIR]``."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}")
    p.add_argument("--quick", action="store_true", help="small scale, embedded data")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm")
    p.add_argument("--out", default=None, help="run directory")
    args = p.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 3)
    out = Path(args.out or f"runs/{name}{'-quick' if args.quick else ''}")

    def progress(done, total, label):
        print(f"  {label}: {done}/{total}", flush=True)

    with jax.numpy_dtype_promotion("standard"):
        verdict = run(Context(name, out, args.quick, seeds, progress))
    print(f"{name}: {verdict['verdict']} -> {out / 'verdict.json'}")
    for c in verdict["checks"]:
        print(f"  [{'PASS' if c['pass'] else 'FAIL'}] {c['name']}: {c['measured']}")
    return 0
