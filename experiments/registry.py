"""Registration as data: each experiment's design, fixed before the seeds that
judge it.

A design's digest is the SHA-256 of the experiment module's source, the
protocol's source (:mod:`experiments.protocol`) and the experiment's criteria
as data; :func:`register` writes it with the seeds, the scale, the power plan,
the UTC time and the git commit to a JSON registry (committed beside the
results, ``experiments/registry.json`` by default). A verdict is
"confirmatory" when a registration of its design (same digest, and the same
seeds and scale) was written before its run started, else "exploratory"
(:func:`status`). A changed design needs a new registration: earlier
registrations stay in the file, in order.

    python -m experiments.registry --quick --first-seed 7100   # register
    python -m experiments.registry --only placement --seeds 8  # (then run)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from experiments import protocol

__all__ = [
    "CONFIRMATORY",
    "DEFAULT_PATH",
    "EXPLORATORY",
    "FIRST_SEED",
    "MAX_SEEDS",
    "MIN_SEEDS",
    "PILOT_SEEDS",
    "criteria_data",
    "design_digest",
    "imported_helpers",
    "is_pilot",
    "latest",
    "load",
    "load_committed",
    "power_plan",
    "register",
    "registration",
    "status",
]

HERE = Path(__file__).resolve().parent  # the experiments package
DEFAULT_PATH = HERE / "registry.json"
# Seeds that design experiments (pilots, probes, earlier runs): never the
# seeds that judge them. Registration refuses them; a run on them is a pilot.
PILOT_SEEDS = range(0, 3000)
# The default first seed of a run that judges (quick and full); smoke runs
# judge nothing and use the quick seeds.
FIRST_SEED = {"smoke": 3000, "quick": 3000, "full": 4000}
# Seed counts a power plan may ask for: at least 5; at most this per scale
# (the run's time budget: quick <= 8 min, full <= 120 min on 2 cores).
MIN_SEEDS = 5
MAX_SEEDS = {"smoke": 2, "quick": 5, "full": 10}
CONFIRMATORY = "confirmatory"
EXPLORATORY = "exploratory"
_FORMAT = 1


def _module(name_or_module: str | ModuleType) -> ModuleType:
    if isinstance(name_or_module, ModuleType):
        return name_or_module
    return importlib.import_module(f"experiments.{name_or_module}")


def criteria_data(module: str | ModuleType) -> list[dict[str, Any]]:
    """An experiment's criteria as plain data (every field of each
    :class:`~experiments.protocol.Criterion`, in the module's order)."""
    return [dataclasses.asdict(c) for c in _module(module).CRITERIA]


def without_history(source: str) -> str:
    r"""A module's source without its top-level ``HISTORY = ...`` statement.

    Example:
      >>> without_history("A = 1\nHISTORY = [\n    {'x': 1},\n]\nB = 2\n")
      'A = 1\nB = 2\n'
    """
    import ast

    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "HISTORY" for t in targets):
            del lines[node.lineno - 1 : node.end_lineno]
            break
    return "".join(lines)


def design_digest(module: str | ModuleType) -> str:
    """SHA-256 of an experiment's design: its module's source, the
    protocol's source and its criteria as data (canonical JSON), each
    length-prefixed so that no two designs share a byte stream.

    A change to any of them (a threshold, a depth, a statistic in the
    protocol) changes the digest. The module's ``HISTORY`` is left out: it
    records earlier designs and their pilots, which a new row must be able
    to add after the pilot it names without changing the design piloted.
    The source of every other module of ``experiments`` that the module
    imports at its top level (:func:`imported_helpers`, e.g. the count
    statistics of :mod:`experiments.exact`) is part of the design too.
    Code outside these files (bnlab itself) is recorded by the commit, not
    by the digest.
    """
    m = _module(module)
    if getattr(m, "__file__", None) is None:
        raise ValueError(f"{m.__name__} has no source file: its design has no digest")
    parts = [
        without_history(Path(m.__file__).read_text()).encode(),
        Path(protocol.__file__).read_bytes(),
        json.dumps(criteria_data(m), sort_keys=True).encode(),
    ]
    for helper in imported_helpers(m):  # e.g. experiments.exact; none: as before
        parts.append(f"experiments.{helper}".encode())
        parts.append((HERE / f"{helper}.py").read_bytes())
    h = hashlib.sha256()
    for part in parts:
        h.update(f"{len(part)}:".encode())
        h.update(part)
    return h.hexdigest()


def imported_helpers(module: str | ModuleType) -> list[str]:
    """The modules of ``experiments`` (other than the protocol, which every
    design includes) that an experiment imports at its top level, and those
    they import in turn, sorted: ``from experiments import exact``, ``from
    experiments.exact import ...`` and ``import experiments.exact``. An
    import under ``if __name__ == "__main__":`` (the command line) is not
    part of the design.

    Example:
      >>> imported_helpers("placement")
      []
    """
    import ast

    found: set[str] = set()
    todo = [Path(_module(module).__file__)]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "experiments":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "experiments."
            ):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [
                    a.name.split(".")[1]
                    for a in node.names
                    if a.name.startswith("experiments.")
                ]
            for n in names:
                if n != "protocol" and n not in found and (HERE / f"{n}.py").exists():
                    found.add(n)
                    todo.append(HERE / f"{n}.py")
    return sorted(found)


def _utc(t: dt.datetime | str | float) -> dt.datetime:
    """A time as an aware UTC datetime (ISO text, epoch seconds or a
    datetime; a naive datetime is taken as UTC)."""
    if isinstance(t, (int, float)):
        return dt.datetime.fromtimestamp(t, dt.UTC)
    if isinstance(t, str):
        t = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return _utc(t).isoformat(timespec="microseconds").replace("+00:00", "Z")


def load(path: str | Path = DEFAULT_PATH) -> dict[str, Any]:
    """The registry at ``path`` (an empty one if there is no file)."""
    path = Path(path)
    if not path.exists():
        return {"format": _FORMAT, "experiments": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), dict):
        raise ValueError(f"{path} is not a registry: no 'experiments' mapping")
    return data


def is_pilot(seeds: Iterable[int]) -> bool:
    """Whether any of ``seeds`` is in :data:`PILOT_SEEDS`."""
    return any(int(s) in PILOT_SEEDS for s in seeds)


def load_committed(path: str | Path = DEFAULT_PATH) -> tuple[dict[str, Any], str]:
    """The registry as the checkout's HEAD commit holds it, and where it was
    read from: only a committed registration can precede a run verifiably
    (an edit of the working file could be written at any time): in a git
    checkout, a registry HEAD does not hold is empty. Outside a checkout,
    the file itself.

    Raises:
      ValueError: the registry cannot be parsed.
    """
    import subprocess

    path = Path(path).resolve()
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=path.parent if path.parent.exists() else None,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if top.returncode == 0:
            rel = path.relative_to(Path(top.stdout.strip()).resolve())
            shown = subprocess.run(
                ["git", "show", f"HEAD:{rel.as_posix()}"],
                cwd=top.stdout.strip(),
                capture_output=True,
                text=True,
                timeout=10,
            )
            if shown.returncode == 0:
                return _parse(shown.stdout, f"HEAD:{rel.as_posix()}"), "HEAD"
            return {"format": _FORMAT, "experiments": {}}, "HEAD (not committed)"
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return load(path), "file"


def _parse(text: str, where: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("experiments"), dict):
        raise ValueError(f"{where} is not a registry: no 'experiments' mapping")
    return data


def latest(registry: Mapping[str, Any], name: str, scale: str) -> dict[str, Any] | None:
    """The registration of ``name`` at ``scale`` whose digest is the current
    design's and whose seeds start at :data:`FIRST_SEED` (the default run;
    replications registered on other seeds do not replace it), else the one
    of that design whose seeds start lowest (a design registered again after
    a change gets its fresh default seeds first, its replications above
    them, in any order of registration), or None."""
    digest = design_digest(name)
    entries = [
        e
        for e in registry.get("experiments", {}).get(name, [])
        if e.get("scale") == scale and e.get("digest") == digest
    ]
    default = [e for e in entries if e.get("seeds", [None])[0] == FIRST_SEED[scale]]
    found = default or entries
    if not found:
        return None
    low = min(e["seeds"][0] for e in found)
    return max(
        (e for e in found if e["seeds"][0] == low),
        key=lambda e: _utc(e["registered_at"]),
    )


def power_plan(
    name: str, pilots: Sequence[str | Path], scale: str = "full"
) -> dict[str, Any]:
    """How many seeds ``name`` needs, from the spread of its checks in a
    pilot run (directories of verdicts).

    The pilot is, among ``pilots`` holding a verdict of ``name``: one of the
    current design (its verdict's recorded digest) before one of an earlier
    design, one of this scale before another, then the first in ``pilots``
    order. Per check with per-seed values: the pilot interval's centre ``c``
    and half-width ``h`` over ``n0`` seeds; the seeds ``n`` at which an
    interval of that centre and spread decides (clears the threshold, or the
    null on the other side; ``within``: the margin) are the smallest ``n >=
    5`` with ``h sqrt(n0 / n) t(n - 1) / t(n0 - 1) < d``, ``d`` the centre's
    distance to the bound it would cross. The experiment asks for the
    largest ``n`` over its checks, at least the module's own ``MIN_SEEDS``
    when it has one (an exact interval on a count needs a number of seeds
    before any outcome is possible), capped at :data:`MAX_SEEDS`; a check that
    no ``n`` up to the cap decides is listed as underpowered and gets the cap
    (expect INCONCLUSIVE unless its effect is larger than the pilot's). Ratios
    (geometric means) are planned on the log scale; a share of seeds (a
    quantity naming a "share", per-seed values 0, 0.5 or 1) exactly: the
    smallest ``n`` whose Clopper-Pearson interval at the pilot's share decides.
    """
    module = _module(name)
    own = int(getattr(module, "MIN_SEEDS", 0))  # a module's own floor (counts)
    cap = MAX_SEEDS[scale]
    floor = min(max(MIN_SEEDS, own), cap)
    digest = design_digest(module)
    found = []
    for order, pilot in enumerate(pilots):
        f = Path(pilot) / name / "verdict.json"
        if f.exists():
            v = json.loads(f.read_text())
            same = (v.get("registration") or {}).get("digest") == digest
            found.append((not same, v.get("scale") != scale, order, Path(pilot), v))
    for _, _, _, pilot, verdict in sorted(found, key=lambda x: x[:3]):
        checks = {c["id"]: c for c in verdict.get("checks", [])}
        rows, needs = [], []
        for crit in module.CRITERIA:
            c = checks.get(crit.id)
            if c is None:
                rows.append({"check": crit.id, "basis": "not in this pilot"})
                continue
            rows.append(_check_plan(crit, c, scale, cap))
            if rows[-1].get("seeds") is not None:
                needs.append(rows[-1]["seeds"])
        if not any("centre" in r or r.get("seeds") for r in rows):
            continue
        same = (verdict.get("registration") or {}).get("digest") == digest
        under = [r["check"] for r in rows if r.get("seeds") is None and "centre" in r]
        # a check no seed count up to the cap decides gets the cap: its effect
        # is small next to its noise, so it gets every seed the budget allows
        n = max([floor, *[min(x, cap) for x in needs], *([cap] if under else [])])
        return {
            "seeds": n,
            "pilot": pilot.name,
            "pilot_design": "this design" if same else "an earlier design",
            "pilot_seeds": verdict.get("seeds"),
            "pilot_commit": (verdict.get("provenance") or {}).get("commit"),
            "pilot_scale": verdict.get("scale"),
            "checks": rows,
            "underpowered": under,
            "basis": f"the largest of the checks' seeds (>= {floor}, <= {cap})",
        }
    return {
        "seeds": floor,
        "basis": "no pilot measured this design's checks: the minimum seed count",
    }


def _check_plan(crit: Any, c: Mapping[str, Any], scale: str, cap: int) -> dict:
    import math

    m = c.get("measured") or {}
    per_seed = [v for v in (m.get("per_seed") or []) if v is not None]
    lo, hi = (m.get("ci") or [None, None])[:2]
    row: dict[str, Any] = {"check": crit.id}
    if len(per_seed) < 2 or lo is None or hi is None or lo == hi:
        row["basis"] = "no spread over seeds in the pilot (an exact quantity)"
        row["seeds"] = None if lo is None else MIN_SEEDS
        return row
    t, null = crit.at(scale), crit.null
    if "share" in crit.quantity.lower() and set(per_seed) <= {0.0, 0.5, 1.0}:
        return _count_plan(row, crit.op, t, null, per_seed, cap)
    geometric = (
        crit.op != "within"
        and lo > 0
        and (null == 1.0 or "ratio" in crit.quantity.lower())
    )
    f = math.log if geometric else float
    try:
        a, b, t_, null_ = f(lo), f(hi), f(t), None if null is None else f(null)
    except ValueError:
        geometric, a, b, t_, null_ = False, lo, hi, t, null
    centre, half, n0 = (a + b) / 2, (b - a) / 2, len(per_seed)
    if crit.op == "within":
        d = abs(abs(centre) - t_)
    else:
        up = crit.op in (">=", ">")
        supports = centre > t_ if up else centre < t_
        contradicts = null_ is not None and (centre < null_ if up else centre > null_)
        # between the null and the threshold no seed count decides (as decide)
        bound = t_ if supports else null_ if contradicts else None
        d = 0.0 if bound is None else abs(centre - bound)
    row.update(
        centre=math.exp(centre) if geometric else centre,
        half_width=half,
        pilot_seeds=n0,
        scale="log" if geometric else "linear",
    )
    need = None
    for n in _seed_counts(cap):
        if half * math.sqrt(n0 / n) * protocol.t975(n - 1) / protocol.t975(n0 - 1) < d:
            need = n
            break
    row["seeds"] = need
    return row


def _seed_counts(cap: int) -> range:
    """The seed counts a plan tries: from :data:`MIN_SEEDS` (or the cap, if
    lower; never under 2) up to the cap."""
    return range(max(2, min(MIN_SEEDS, cap)), cap + 1)


def _count_plan(
    row: dict, op: str, t: float, null: float | None, per_seed: list, cap: int
) -> dict:
    """A share of seeds (1, 0, or 0.5 undetermined) planned exactly: the
    smallest ``n`` at which the pilot's share, as a count of ``n``, gets a
    Clopper-Pearson interval that decides (:func:`protocol.decide`)."""
    share = sum(per_seed) / len(per_seed)
    row.update(centre=share, pilot_seeds=len(per_seed), scale="count")
    row["seeds"] = None
    for n in _seed_counts(cap):
        k = min(n, max(0, round(share * n)))
        ci = protocol.exact_sign_test(k, n)
        outcome = protocol.decide(ci.low, ci.high, op, t, null).outcome
        if outcome in (protocol.SUPPORTED, protocol.CONTRADICTED):
            row["seeds"] = n
            break
    return row


def register(
    names: Iterable[str],
    seeds: Sequence[int],
    power_plan: Mapping[str, Any] | None = None,
    path: str | Path = DEFAULT_PATH,
    *,
    scale: str = "full",
    now: dt.datetime | str | float | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Registers the current design of each experiment in ``names`` with
    these ``seeds``; writes the registry at ``path``; returns the entries
    by name.

    ``power_plan`` maps a name to its plan (any JSON: the pilot variance,
    the effect it was sized for, the seeds it asks for); a name without one
    records the seed count and says that no pilot sized it. A registration
    identical to an earlier one (design, seeds, scale, plan) is not repeated:
    the earlier, whose time precedes more runs, stands. ``now`` and
    ``provenance`` (``commit``, ``dirty``; default: this checkout's) are for
    tests.
    """
    if provenance is None:
        from experiments.reproduce import provenance as checkout

        provenance = checkout()
    when = _iso(dt.datetime.now(dt.UTC) if now is None else _utc(now))
    path = Path(path)
    data = load(path)
    plans = dict(power_plan or {})
    written = {}
    for name in names:
        plan = plans.get(name) or {
            "seeds": len(seeds),
            "basis": "the default seed count; no pilot variance sized it",
        }
        entry = {
            "digest": design_digest(name),
            "scale": scale,
            "seeds": [int(s) for s in seeds],
            "power_plan": plan,
            "registered_at": when,
            "commit": provenance.get("commit"),
            "dirty": provenance.get("dirty"),
        }
        entries = data["experiments"].setdefault(name, [])
        same = [e for e in entries if _same_design(e, entry)]
        if same:
            written[name] = same[0]
        else:
            entries.append(entry)
            written[name] = entry
    data["format"] = _FORMAT
    from bnlab.train.rundir import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    return written


def _same_design(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("digest", "scale", "seeds", "power_plan")
    return all(a.get(k) == b.get(k) for k in keys)


def registration(
    name: str,
    registry: Mapping[str, Any] | str | Path,
    run_started_at: dt.datetime | str | float,
    *,
    seeds: Sequence[int] | None = None,
    scale: str | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """What a verdict records: ``{"status", "digest", "registered_at"}``.

    ``status`` is "confirmatory" when the registry (a loaded one or its
    path) holds a registration of ``name`` whose digest is the current
    design's (``digest``, computed when None) and whose time precedes
    ``run_started_at``, and, when given, with the same ``seeds`` and
    ``scale``; ``registered_at`` is the earliest such registration's time.
    Else "exploratory" and ``registered_at`` None.
    """
    data = registry if isinstance(registry, Mapping) else load(registry)
    if digest is None:
        module = _module(name)
        if getattr(module, "__file__", None) is None:  # built in memory: no design
            return {"status": EXPLORATORY, "digest": None, "registered_at": None}
        digest = design_digest(module)
    start = _utc(run_started_at)
    found = sorted(
        (
            e
            for e in data.get("experiments", {}).get(name, [])
            if e.get("digest") == digest
            and (seeds is None or list(e.get("seeds", [])) == list(seeds))
            and (scale is None or e.get("scale") == scale)
            and _utc(e["registered_at"]) < start
        ),
        key=lambda e: _utc(e["registered_at"]),
    )
    if not found:
        return {"status": EXPLORATORY, "digest": digest, "registered_at": None}
    return {
        "status": CONFIRMATORY,
        "digest": digest,
        "registered_at": _iso(_utc(found[0]["registered_at"])),
        "commit": found[0].get("commit"),
        "power_plan": found[0].get("power_plan"),
    }


def status(
    name: str,
    registry: Mapping[str, Any] | str | Path,
    run_started_at: dt.datetime | str | float,
    **match: Any,
) -> str:
    """ "confirmatory" or "exploratory" (:func:`registration`'s status)."""
    return registration(name, registry, run_started_at, **match)["status"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.registry [--quick] [--only A,B] [--seeds N]
    [--first-seed F] [--registry PATH]``: ``bnlab reproduce --register``."""
    import argparse

    from experiments import reproduce

    p = argparse.ArgumentParser(prog="python -m experiments.registry")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--only", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--first-seed", type=int, default=None, dest="first_seed")
    p.add_argument("--registry", default=None)
    args = p.parse_args(argv)
    try:
        opts = reproduce.options(
            quick=args.quick,
            smoke=args.smoke,
            only=args.only,
            seeds=args.seeds,
            first_seed=args.first_seed,
            register=True,
            registry=args.registry,
        )
    except ValueError as e:
        p.error(str(e))
    reproduce.run(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
