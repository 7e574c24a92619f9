"""``bnlab reproduce``: run every experiment, judge each claim, write a report.

The ``bnlab`` command reaches this module through its ``bnlab.commands``
entry point (``pyproject.toml``); the command line, the progress display and
the exit codes are ``bnlab.cli``'s. This module holds the list of
experiments and what one invocation does: for each experiment, reuse its
verified verdict or run it (training resumes from its checkpoints), then
write ``REPORT.md`` and a self-contained ``REPORT.html``.

    bnlab reproduce --quick                 # the shipped 14x14 subset, minutes
    bnlab reproduce                         # Fashion-MNIST, 5 seeds per arm
    bnlab reproduce --first-seed 100        # the same with fresh seeds
    python -m experiments.registry --first-seed 7200   # register, run nothing

Each verdict records its registration (:mod:`experiments.registry`):
"confirmatory" when its design was registered with these seeds before the
run started, else "exploratory"; and each check its three-way outcome
(:func:`experiments.protocol.decide`) beside PASS/FAIL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib
import json
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from bnlab.train.rundir import jsonable
from experiments import protocol, report
from experiments import registry as reg

# In the report's order: the lecture's claims (a)-(e), then the papers'
# measurements of why BN works, then the research variants, then the
# phenomena of issue 17.
EXPERIMENTS = (
    "feature_scale",
    "bn_properties",
    "placement",
    "inference_stats",
    "ioffe_fig1",
    "lr_robustness",
    "ioffe_table",
    "sigmoid_depth",
    "smoothness",
    "hessian",
    "norm_batch_size",
    "ghost_gap",
    "renorm_small_batch",
    "sync_bn",
    "noisy_bn",
    "zero_init_gamma",
    "weight_decay",
    "conv_claims",
    "shift_stats",
    "regularizer",
    "init_gradients",
)
# The lecture's claims (a)-(e): a quick run must agree with the full run here.
LECTURE = EXPERIMENTS[:8]
DEFAULT_SEEDS = {"smoke": 2, "quick": 5, "full": 5}


@dataclasses.dataclass(frozen=True)
class Options:
    """One invocation's settings (checked by :func:`options`)."""

    names: list[str]
    out: Path
    scale: str
    seeds: list[int]
    register: bool = False
    registry: Path = reg.DEFAULT_PATH

    @property
    def command(self) -> str:
        parts = ["bnlab reproduce"]
        if self.scale != "full":
            parts.append(f"--{self.scale}")
        parts.append(f"--seeds {len(self.seeds)}")
        if self.seeds[0]:
            parts.append(f"--first-seed {self.seeds[0]}")
        return " ".join(parts)


def missing_requirements() -> list[str]:
    """Packages ``run`` needs that cannot be imported (checked before any
    work, so that a missing one costs no computation)."""
    missing = []
    for module in ("matplotlib",):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def options(
    out: str | Path | None = None,
    quick: bool = False,
    only: str | None = None,
    seeds: int | None = None,
    first_seed: int = 0,
    smoke: bool = False,
    register: bool = False,
    registry: str | Path | None = None,
) -> Options:
    """Checked settings of one invocation.

    ``register``: write the registrations of these experiments and seeds
    to ``registry`` (default :data:`experiments.registry.DEFAULT_PATH`) and
    run nothing; otherwise ``registry`` is the one verdicts are checked
    against.

    Raises:
      ValueError: an unknown experiment, or a seed count / first seed that
        cannot run.
    """
    scale = "smoke" if smoke else "quick" if quick else "full"
    names = list(EXPERIMENTS)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        bad = [n for n in names if n not in EXPERIMENTS]
        if bad:
            raise ValueError(
                f"unknown experiment(s) {bad}; choose from {list(EXPERIMENTS)}."
            )
    n = DEFAULT_SEEDS[scale] if seeds is None else seeds
    if n < 2 and scale != "smoke":
        raise ValueError(
            f"--seeds {n}: intervals need at least 2 seeds (the full run uses 5)."
        )
    if n < 1:
        raise ValueError(f"--seeds {n}: use at least 1.")
    if first_seed < 0 or first_seed + n > 2**31:
        raise ValueError(f"--first-seed {first_seed}: use a non-negative integer.")
    default = {"smoke": "runs/reproduce-smoke", "quick": "runs/reproduce-quick"}
    path = Path(out or default.get(scale, "runs/reproduce"))
    return Options(
        names,
        path,
        scale,
        list(range(first_seed, first_seed + n)),
        register,
        reg.DEFAULT_PATH if registry is None else Path(registry),
    )


# -------------------------------------------------------------- provenance


# Untracked files here change what runs (a new module, a stray copy that
# shadows one), so they make the tree dirty; untracked files elsewhere (notes)
# do not, nor run outputs under experiments/results (an interrupted run there
# leaves untracked verdicts that its resumption would otherwise call dirty).
CODE_PATHS = ("bnlab", "experiments", ":(exclude)experiments/results")


def provenance(root: str | Path | None = None) -> dict[str, Any]:
    """The code that produced a result: git commit and whether the tree had
    uncommitted changes (or, outside a checkout, the bnlab version).

    ``dirty`` counts a change to any tracked file and any untracked (not
    ignored) file under :data:`CODE_PATHS`; ``root`` is the checkout (this
    one by default)."""
    import bnlab

    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    out: dict[str, Any] = {"bnlab": bnlab.__version__, "commit": None, "dirty": None}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
        )

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            tracked = git("status", "--porcelain", "--untracked-files=no")
            code = git(
                "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS
            )
            if tracked.returncode == 0 and code.returncode == 0:
                out["dirty"] = bool(tracked.stdout.strip() or code.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def environment() -> dict[str, Any]:
    import flax

    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": protocol.jax_device_note(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }


# ----------------------------------------------------------------- verdicts


def _digest(verdict: dict[str, Any], directory: Path) -> str:
    body = {k: v for k, v in verdict.items() if k != "digest"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    metrics = directory / "metrics.jsonl"
    h.update(metrics.read_bytes() if metrics.exists() else b"")
    return h.hexdigest()


def _stored(directory: Path, opts: Options) -> dict | None:
    """A finished experiment's verdict, if it is intact and of this scale and
    these seeds; None (recompute) if absent or if it fails its digest."""
    f = directory / "verdict.json"
    if not f.exists():
        return None
    try:
        verdict = json.loads(f.read_text())
        ok = isinstance(verdict, dict) and verdict.get("digest") == _digest(
            verdict, directory
        )
    except (ValueError, OSError):
        ok = False
    if not ok:
        warnings.warn(
            f"{f} is not the verdict this program wrote (edited, truncated or "
            "corrupt: it fails its SHA-256); recomputing it from the experiment's "
            "checkpoints.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if verdict.get("scale") != opts.scale or verdict.get("seeds") != opts.seeds:
        from bnlab.train import ConfigError

        raise ConfigError(
            f"{directory} holds a {verdict.get('scale')} run with seeds "
            f"{verdict.get('seeds')}; use another --out or delete it."
        )
    return verdict


def _write(directory: Path, verdict: dict[str, Any]) -> None:
    from bnlab.train.rundir import write_json

    verdict["digest"] = _digest(verdict, directory)
    write_json(directory / "verdict.json", verdict)


def verdict_of(
    module: Any, ctx: protocol.Context, outcome: protocol.Outcome, seconds: float
) -> dict[str, Any]:
    """The judged verdict of one experiment run (criteria from the module,
    measurements from its outcome)."""
    missing = [c.id for c in module.CRITERIA if c.id not in outcome.measured]
    if missing:
        raise RuntimeError(f"{module.NAME} measured nothing for criteria {missing}")
    checks = []
    for c in module.CRITERIA:
        m = outcome.measured[c.id]
        premise = outcome.premises.get(c.id)
        decision = protocol.decide_check(
            c, m, ctx.scale, premise=premise is None or premise.holds
        )
        sens = outcome.sensitivity.get(c.id)
        checks.append(
            {
                "id": c.id,
                "quantity": c.quantity,
                "op": c.op,
                "threshold": c.at(ctx.scale),
                "null": c.null,
                "criterion": c.text(ctx.scale, exact=m.low == m.high),
                "source": c.source,
                "measured": m.to_json(),
                "pass": decision.outcome == protocol.SUPPORTED,
                "outcome": decision.to_json(),
                "premise": None if premise is None else premise._asdict(),
                "sensitivity": None if sens is None else sens.to_json(),
            }
        )
    verdict = claim_outcome([c["outcome"]["outcome"] for c in checks])
    return {
        "experiment": module.NAME,
        "claim": module.CLAIM,
        "scale": ctx.scale,
        "seeds": ctx.seeds,
        "verdict": verdict,
        "checks": checks,
        "reported": {k: m.to_json() for k, m in outcome.reported.items()},
        "table": jsonable(outcome.table),
        "figures": outcome.figures,
        "notes": outcome.notes,
        "history": list(getattr(module, "HISTORY", [])),
        "seconds": seconds,
        "training": ctx.training,
    }


def claim_outcome(outcomes: Sequence[str]) -> str:
    """A claim's outcome from its checks': CONTRADICTED if any check is,
    SUPPORTED if every check is, else INCONCLUSIVE if any check is, else
    NOT_TESTABLE (a premise absent, nothing contradicted or undecided);
    REPORT for an experiment without criteria.

    Example:
      >>> claim_outcome(["SUPPORTED", "INCONCLUSIVE"]), claim_outcome([])
      ('INCONCLUSIVE', 'REPORT')
    """
    if not outcomes:
        return "REPORT"
    if protocol.CONTRADICTED in outcomes:
        return protocol.CONTRADICTED
    if all(o == protocol.SUPPORTED for o in outcomes):
        return protocol.SUPPORTED
    if protocol.INCONCLUSIVE in outcomes:
        return protocol.INCONCLUSIVE
    return protocol.NOT_TESTABLE


def _records(directory: Path, records: list[dict]) -> None:
    from bnlab.train.rundir import rewrite_records

    rewrite_records(directory / "metrics.jsonl", [jsonable(r) for r in records])


def summary_line(verdict: dict[str, Any], width: int, state: str) -> str:
    """One line of the transcript; a FAIL names its first failing check."""
    line = f"{verdict['verdict']:<6} {verdict['experiment']:<{width}}  ({state})"
    if verdict["verdict"] == "FAIL":
        c = next(c for c in verdict["checks"] if not c["pass"])
        m = c["measured"]
        lo, hi = m["ci"]
        line += (
            f": {c['quantity']} = {protocol.fmt(m['value'])} "
            f"[{protocol.fmt(lo)}, {protocol.fmt(hi)}], "
            f"needs {c['op']} {c['threshold']:g}"
        )
    return line


# ---------------------------------------------------------------------- run


def run(
    opts: Options,
    progress: Any = None,
    show: Callable[[str], None] = print,
) -> list[dict]:
    """Runs (or reuses) the experiments of ``opts``; writes the report;
    returns the verdicts. ``show`` prints a result line (stdout);
    ``progress`` is the command's progress display (stderr).

    With ``opts.register`` it only registers (:func:`register`) and returns
    no verdicts."""
    from bnlab.train.rundir import RunLock, check_run_dir

    if opts.register:
        register(opts, show)
        return []

    opts.out.mkdir(parents=True, exist_ok=True)
    check_run_dir(opts.out)
    lock = RunLock(opts.out)  # one reproduce per --out
    try:
        return _run(opts, progress, show)
    finally:
        lock.release()


def register(opts: Options, show: Callable[[str], None] = print) -> dict[str, dict]:
    """Writes the registration of each experiment of ``opts`` (its design
    digest, the seeds and scale, a power plan, the time and the commit) to
    ``opts.registry``, runs nothing; returns the entries by name."""
    prov = provenance()
    if prov.get("dirty"):
        warnings.warn(
            "registering a design with uncommitted changes: commit them, or the "
            "registered digest names code that no commit holds.",
            RuntimeWarning,
            stacklevel=2,
        )
    entries = reg.register(
        opts.names, opts.seeds, None, opts.registry, scale=opts.scale, provenance=prov
    )
    width = max(map(len, opts.names))
    for name, e in entries.items():
        show(
            f"registered {name:<{width}}  {opts.scale}, seeds {e['seeds']}, design "
            f"{e['digest'][:12]} at {e['registered_at']}"
        )
    show(f"{len(entries)} registrations in {opts.registry}; nothing was run")
    return entries


def _registry(opts: Options) -> dict[str, Any]:
    from bnlab.train import ConfigError

    try:
        return reg.load(opts.registry)
    except ValueError as e:  # json.JSONDecodeError is one
        raise ConfigError(f"the registry {opts.registry} cannot be read: {e}") from e


def _run(opts: Options, progress: Any, show: Callable[[str], None]) -> list[dict]:
    started = time.perf_counter()
    # registrations count only if written before this moment, read once here
    started_at = dt.datetime.now(dt.UTC)
    registrations = _registry(opts)
    prov, env = provenance(), environment()
    verdicts = []
    width = max(map(len, opts.names))
    for i, name in enumerate(opts.names):
        if progress is not None:
            progress.experiment(name, i)
        directory = opts.out / name
        verdict = _stored(directory, opts)
        if verdict is None:
            module = importlib.import_module(f"experiments.{name}")
            ctx = protocol.Context(name, directory, opts.scale, opts.seeds, progress)
            # the design as it is when the run starts (not as it may be after)
            registration = reg.registration(
                name, registrations, started_at, seeds=opts.seeds, scale=opts.scale
            )
            t0 = time.perf_counter()
            with jax.numpy_dtype_promotion("standard"):
                outcome = module.run(ctx)
            verdict = verdict_of(module, ctx, outcome, time.perf_counter() - t0)
            verdict["command"] = f"{opts.command} --only {name}"
            verdict["environment"] = env
            verdict["provenance"] = {**prov, "data": ctx.data_provenance()}
            verdict["registration"] = registration
            _records(directory, outcome.records)
            _write(directory, verdict)
            state = f"{verdict['seconds']:.0f} s"
        else:
            state = "already done"
        verdicts.append(verdict)
        show(summary_line(verdict, width, state))
    if progress is not None:
        progress.experiment("done", len(opts.names))
    wall = time.perf_counter() - started
    md, html = report.write(opts.out, verdicts, opts.command, opts.scale, wall)
    judged = [v for v in verdicts if v["checks"]]
    passed = sum(v["verdict"] == "PASS" for v in judged)
    show(
        f"{passed}/{len(judged)} claims PASS in {wall:.0f} s; report: {md} "
        f"(and {html.name})"
    )
    return verdicts


def main(name: str) -> int:
    """``python -m experiments.NAME [--quick] [--seeds N] [--out DIR]``: the
    same as ``bnlab reproduce --only NAME ...``."""
    import sys

    from bnlab.cli import main as cli

    return cli(["reproduce", "--only", name, *sys.argv[1:]])
