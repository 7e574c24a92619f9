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
    """One invocation's settings (checked by :func:`options`).

    ``seeds`` maps each experiment to its seeds: the registered ones when the
    command names none (a confirmatory run), else ``--seeds`` from
    ``--first-seed``. ``pilots``: the pilot runs a registration's power plan
    reads (``--register``)."""

    names: list[str]
    out: Path
    scale: str
    seeds: dict[str, list[int]]
    register: bool = False
    registry: Path = reg.DEFAULT_PATH
    pilots: tuple[Path, ...] = ()

    def command(self, name: str | None = None) -> str:
        """The command that runs ``name`` (or every experiment, when its
        seeds are the same) with these seeds."""
        parts = ["bnlab reproduce"]
        if self.scale != "full":
            parts.append(f"--{self.scale}")
        seeds = self.seeds[name] if name else self.seeds[self.names[0]]
        if name is not None or len({tuple(v) for v in self.seeds.values()}) == 1:
            parts.append(f"--seeds {len(seeds)} --first-seed {seeds[0]}")
        if name is not None:
            parts.append(f"--only {name}")
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


PILOTS = report.PILOTS  # experiments/results/pilots/, one definition


def options(
    out: str | Path | None = None,
    quick: bool = False,
    only: str | None = None,
    seeds: int | None = None,
    first_seed: int | None = None,
    smoke: bool = False,
    register: bool = False,
    registry: str | Path | None = None,
    pilots: Sequence[str | Path] | None = None,
) -> Options:
    """Checked settings of one invocation.

    Seeds: with neither ``seeds`` nor ``first_seed``, each experiment runs
    the seeds registered for its current design at this scale (the
    committed registry), else :data:`DEFAULT_SEEDS` from
    :data:`experiments.registry.FIRST_SEED` (outside the pilot seeds).

    ``register``: write the registrations of these experiments to
    ``registry`` (default :data:`experiments.registry.DEFAULT_PATH`) and run
    nothing; each experiment's seed count comes from its power plan on the
    ``pilots`` (directories of pilot verdicts, searched in order; default
    the committed pilots of this scale) unless ``seeds`` is given. Pilot
    seeds (:data:`experiments.registry.PILOT_SEEDS`) cannot be registered.

    Raises:
      ValueError: an unknown experiment, a seed count / first seed that
        cannot run, or pilot seeds to register.
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
    if seeds is not None and seeds < 2 and scale != "smoke":
        raise ValueError(
            f"--seeds {seeds}: intervals need at least 2 seeds (use 5 or more)."
        )
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds {seeds}: use at least 1.")
    if first_seed is not None and not 0 <= first_seed <= 2**31 - 100:
        raise ValueError(f"--first-seed {first_seed}: use a non-negative integer.")
    path_of = reg.DEFAULT_PATH if registry is None else Path(registry)
    pilot_dirs = tuple(Path(p) for p in (pilots or _default_pilots(scale)))
    first = reg.FIRST_SEED[scale] if first_seed is None else first_seed
    per_name: dict[str, list[int]] = {}
    committed = None
    for name in names:
        if register:
            n = seeds or reg.power_plan(name, pilot_dirs, scale)["seeds"]
        elif seeds is None and first_seed is None:
            if committed is None:
                committed = _committed(path_of)
            entry = reg.latest(committed, name, scale)
            if entry is not None:
                per_name[name] = [int(s) for s in entry["seeds"]]
                continue
            n = DEFAULT_SEEDS[scale]
        else:
            n = seeds or DEFAULT_SEEDS[scale]
        per_name[name] = list(range(first, first + n))
    if register:
        pilot = sorted(
            {s for v in per_name.values() for s in v if s in reg.PILOT_SEEDS}
        )
        if pilot:
            raise ValueError(
                f"seeds {pilot[0]}..{pilot[-1]} are pilot seeds "
                f"({reg.PILOT_SEEDS.start}-{reg.PILOT_SEEDS.stop - 1}: they designed "
                "the experiments and cannot judge them); register fresh seeds, e.g. "
                f"--first-seed {reg.FIRST_SEED['full']}."
            )
    default = {"smoke": "runs/reproduce-smoke", "quick": "runs/reproduce-quick"}
    return Options(
        names,
        Path(out or default.get(scale, "runs/reproduce")),
        scale,
        per_name,
        register,
        path_of,
        pilot_dirs,
    )


def _default_pilots(scale: str) -> list[Path]:
    """The committed pilot runs of a scale, newest first (by modification of
    their report; a full-scale plan falls back to quick pilots)."""
    if not PILOTS.exists():
        return []

    def runs(prefix: str) -> list[Path]:
        found = [
            p for p in PILOTS.iterdir() if p.is_dir() and p.name.startswith(prefix)
        ]
        return sorted(found, key=lambda p: p.name, reverse=True)

    full, quick = runs("full-"), runs("quick-")
    return full + quick if scale == "full" else quick


def _committed(path: Path) -> dict[str, Any]:
    try:
        return reg.load_committed(path)[0]
    except ValueError as e:
        raise ValueError(f"the registry {path} cannot be read: {e}") from e


# -------------------------------------------------------------- provenance


# Untracked files here change what runs (a new module, a stray copy that
# shadows one), so they make the tree dirty; untracked files elsewhere (notes)
# do not, nor run outputs under experiments/results (an interrupted run there
# leaves untracked verdicts that its resumption would otherwise call dirty).
CODE_PATHS = (
    "bnlab",
    "experiments",
    ":(exclude)experiments/results",
    ":(exclude)experiments/registry.json",  # data, written before it is committed
)


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
    seeds = opts.seeds[directory.name]
    if verdict.get("scale") != opts.scale or verdict.get("seeds") != seeds:
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


def _outcome(check: dict[str, Any]) -> str | None:
    """A check's outcome (None in a verdict written before outcomes)."""
    return (check.get("outcome") or {}).get("outcome")


def summary_line(verdict: dict[str, Any], width: int, state: str) -> str:
    """One line of the transcript: the claim's outcome; one that is not
    SUPPORTED names its first check that is not, with its interval."""
    word = verdict["verdict"]
    line = f"{word:<12} {verdict['experiment']:<{width}}  ({state})"
    if word in ("REPORT", "PASS", protocol.SUPPORTED):
        return line
    c = next(
        (c for c in verdict["checks"] if _outcome(c) == word),
        next((c for c in verdict["checks"] if not c["pass"]), verdict["checks"][0]),
    )
    m = c["measured"]
    lo, hi = m["ci"]
    line += (
        f": {c['quantity']} = {protocol.fmt(m['value'])} "
        f"[{protocol.fmt(lo)}, {protocol.fmt(hi)}], criterion {c['op']} "
        f"{c['threshold']:g}"
    )
    if word == protocol.NOT_TESTABLE and c.get("premise"):
        line += f"; premise absent: {c['premise']['text']}"
    elif (c.get("outcome") or {}).get("seeds_needed"):
        line += f"; {c['outcome']['seeds_needed']} seeds would decide"
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
    digest, its seeds and scale, its power plan from the pilots, the time
    and the commit) to ``opts.registry``, runs nothing; returns the entries
    by name. Commit the registry before the run it is for: a run counts only
    registrations its checkout's HEAD holds."""
    prov = provenance()
    if prov.get("dirty"):
        warnings.warn(
            "registering a design with uncommitted changes: commit them, or the "
            "registered digest names code that no commit holds.",
            RuntimeWarning,
            stacklevel=2,
        )
    entries = {}
    for name in opts.names:
        plan = reg.power_plan(name, opts.pilots, opts.scale)
        if plan["seeds"] != len(opts.seeds[name]):  # --seeds overrode it
            plan = {**plan, "seeds": len(opts.seeds[name]), "overridden": True}
        entries.update(
            reg.register(
                [name],
                opts.seeds[name],
                {name: plan},
                opts.registry,
                scale=opts.scale,
                provenance=prov,
            )
        )
    width = max(map(len, opts.names))
    for name, e in entries.items():
        under = e["power_plan"].get("underpowered")
        show(
            f"registered {name:<{width}}  {opts.scale}, seeds {e['seeds'][0]}.."
            f"{e['seeds'][-1]} ({len(e['seeds'])}), design {e['digest'][:12]}"
            + (f"; underpowered: {', '.join(under)}" if under else "")
        )
    show(
        f"{len(entries)} registrations in {opts.registry}; nothing was run. Commit "
        "it before the run: only registrations in the commit a run starts from "
        "count."
    )
    return entries


def _registry(opts: Options) -> tuple[dict[str, Any], str]:
    from bnlab.train import ConfigError

    try:
        return reg.load_committed(opts.registry)
    except ValueError as e:  # json.JSONDecodeError is one
        raise ConfigError(f"the registry {opts.registry} cannot be read: {e}") from e


def _run(opts: Options, progress: Any, show: Callable[[str], None]) -> list[dict]:
    started = time.perf_counter()
    # registrations count only if written before this moment, read once here
    started_at = dt.datetime.now(dt.UTC)
    registrations, _ = _registry(opts)
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
            seeds = opts.seeds[name]
            ctx = protocol.Context(name, directory, opts.scale, seeds, progress)
            # the design as it is when the run starts (not as it may be after)
            registration = reg.registration(
                name, registrations, started_at, seeds=seeds, scale=opts.scale
            )
            if reg.is_pilot(seeds):
                registration = {**registration, "status": "pilot"}
            t0 = time.perf_counter()
            with jax.numpy_dtype_promotion("standard"):
                outcome = module.run(ctx)
            verdict = verdict_of(module, ctx, outcome, time.perf_counter() - t0)
            verdict["command"] = opts.command(name)
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
    md, html = report.write(opts.out, verdicts, opts.command(), opts.scale, wall)
    show(f"{report.tally(verdicts)} in {wall:.0f} s; report: {md} (and {html.name})")
    return verdicts


def main(name: str) -> int:
    """``python -m experiments.NAME [--quick] [--seeds N] [--out DIR]``: the
    same as ``bnlab reproduce --only NAME ...``."""
    import sys

    from bnlab.cli import main as cli

    return cli(["reproduce", "--only", name, *sys.argv[1:]])
