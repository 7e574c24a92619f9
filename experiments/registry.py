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
    "criteria_data",
    "design_digest",
    "load",
    "register",
    "registration",
    "status",
]

DEFAULT_PATH = Path(__file__).resolve().parent / "registry.json"
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


def design_digest(module: str | ModuleType) -> str:
    """SHA-256 of an experiment's design: its module's source, the
    protocol's source and its criteria as data (canonical JSON), each
    length-prefixed so that no two designs share a byte stream.

    A change to any of them (a threshold, a depth, a statistic in the
    protocol) changes the digest. Code outside these two files (bnlab itself)
    is recorded by the commit, not by the digest.
    """
    m = _module(module)
    if getattr(m, "__file__", None) is None:
        raise ValueError(f"{m.__name__} has no source file: its design has no digest")
    parts = [
        Path(m.__file__).read_bytes(),
        Path(protocol.__file__).read_bytes(),
        json.dumps(criteria_data(m), sort_keys=True).encode(),
    ]
    h = hashlib.sha256()
    for part in parts:
        h.update(f"{len(part)}:".encode())
        h.update(part)
    return h.hexdigest()


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
    times = sorted(
        _utc(e["registered_at"])
        for e in data.get("experiments", {}).get(name, [])
        if e.get("digest") == digest
        and (seeds is None or list(e.get("seeds", [])) == list(seeds))
        and (scale is None or e.get("scale") == scale)
        and _utc(e["registered_at"]) < start
    )
    if not times:
        return {"status": EXPLORATORY, "digest": digest, "registered_at": None}
    return {"status": CONFIRMATORY, "digest": digest, "registered_at": _iso(times[0])}


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
    p.add_argument("--first-seed", type=int, default=0, dest="first_seed")
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
