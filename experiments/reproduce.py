"""``bnlab reproduce``: run every experiment, judge each claim, write a report.

    bnlab reproduce --quick               # embedded data, a few minutes on CPU
    bnlab reproduce                       # Fashion-MNIST, 3 seeds per arm
    bnlab reproduce --only ioffe_fig1,hessian --out runs/mine

Each experiment writes ``metrics.jsonl``, ``verdict.json`` and figures under
``OUT/<name>/``. Running the same command again resumes: finished
experiments are not recomputed and unfinished training resumes from its last
checkpoint, with results identical to an uninterrupted run.
``OUT/REPORT.md`` and the self-contained ``OUT/REPORT.html`` hold every
verdict with its numbers, figures and command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import IO

import jax

from experiments import _harness as H
from experiments import report

# In the report's order: the lecture's claims (a)-(e), then the papers'
# measurements of why BN works, then the research variants.
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
    # research variants
    "norm_batch_size",
    "ghost_gap",
    "renorm_small_batch",
    "sync_bn",
    "noisy_bn",
    "zero_init_gamma",
)
OPTIONAL = ()  # experiments that run only when named with --only


def _names(only: str | None) -> list[str]:
    from bnlab.train import ConfigError

    known = EXPERIMENTS + OPTIONAL
    if not only:
        return list(EXPERIMENTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown experiment(s) {bad}; choose from {list(known)}.")
    return names


def _done(path: Path, scale: str, seeds: int) -> dict | None:
    """A finished experiment's verdict, if it was run at this scale."""
    f = path / "verdict.json"
    if not f.exists():
        return None
    verdict = json.loads(f.read_text())
    if verdict.get("scale") != scale or verdict.get("seeds") != seeds:
        from bnlab.train import ConfigError

        raise ConfigError(
            f"{path} holds a {verdict.get('scale')} run with {verdict.get('seeds')} "
            "seeds; use another --out or delete it."
        )
    return verdict


class _Bar:
    """Progress over experiments and over the steps of the current group."""

    def __init__(self, stream: IO | None, total: int):
        self.stream = stream
        self.rich = None
        if stream is not None and stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.rich = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=stream),
            )
            self.exp = self.rich.add_task("experiments", total=total)
            self.steps = self.rich.add_task("", total=1)
            self.rich.start()

    def experiment(self, name: str, done: int) -> None:
        if self.rich is not None:
            self.rich.update(
                self.exp, completed=done, description=f"experiments ({name})"
            )

    def steps_done(self, done: int, total: int, label: str) -> None:
        if self.rich is not None:
            self.rich.update(
                self.steps, completed=done, total=total, description=f"  {label}"
            )

    def line(self, text: str) -> None:
        if self.rich is not None:
            self.rich.console.print(text)
        elif self.stream is not None:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


def run(
    out: str | Path | None = None,
    quick: bool = False,
    only: str | None = None,
    seeds: int | None = None,
    progress: IO | None = sys.stderr,
    smoke: bool = False,
) -> list[dict]:
    """Runs (or resumes) the experiments; writes the report; returns verdicts.

    ``smoke`` runs a few steps of each (on the quick data) to check that
    everything runs; its verdicts mean nothing.
    """
    quick = quick or smoke
    names = _names(only)
    seeds = seeds or (2 if quick else 3)
    if seeds < 1:
        from bnlab.train import ConfigError

        raise ConfigError(f"--seeds {seeds}: use at least 1.")
    out = Path(out or ("runs/reproduce-quick" if quick else "runs/reproduce"))
    out.mkdir(parents=True, exist_ok=True)
    bar = _Bar(progress, len(names))
    started = time.perf_counter()
    verdicts = []
    try:
        for i, name in enumerate(names):
            bar.experiment(name, i)
            verdict = _done(
                out / name, "smoke" if smoke else "quick" if quick else "full", seeds
            )
            if verdict is None:
                module = importlib.import_module(f"experiments.{name}")
                ctx = H.Context(name, out / name, quick, seeds, bar.steps_done, smoke)
                with jax.numpy_dtype_promotion("standard"):
                    verdict = module.run(ctx)
                state = f"{verdict['seconds']:.0f} s"
            else:
                state = "already done"
            verdicts.append(verdict)
            width = max(map(len, names))
            bar.line(f"{verdict['verdict']:<6} {name:<{width}}  ({state})")
        bar.experiment("done", len(names))
    finally:
        bar.close()
    wall = time.perf_counter() - started
    md, html = report.write(out, quick=quick, seeds=seeds, wall_seconds=wall)
    if progress is not None:
        passed = sum(v["verdict"] == "PASS" for v in verdicts)
        print(
            f"{passed}/{len(verdicts)} claims PASS in {wall:.0f} s; report: {md} "
            f"(and {html.name})",
            file=progress,
        )
    return verdicts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="a few steps each (CI)")
    args = p.parse_args(argv)
    run(args.out, args.quick, args.only, args.seeds, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
