"""The ``bnlab`` command: argument parsing and progress only.

bnlab train --workdir runs/digits --config digits --set lr=0.3 --steps 800
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["main"]


class Progress:
    """A one-line progress bar on a terminal; a line per 10% otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_print = 0.0
        self.last_decile = -1
        self.first_step = None

    def __call__(self, p: dict[str, Any]) -> None:
        if self.first_step is None:
            self.first_step = p["step"] - 1
        done, total = p["step"], p["total"]
        rate = (done - self.first_step) / max(p["elapsed"], 1e-9)
        frac = done / total
        text = (
            f"step {done}/{total} loss {p['loss']:.4f} acc {p['accuracy']:.3f} "
            f"{rate:.1f} steps/s"
        )
        now = time.monotonic()
        if self.tty:
            if now - self.last_print > 0.1 or done == total:
                bar = "#" * int(30 * frac)
                self.stream.write(f"\r[{bar:<30}] {text}")
                if done == total:
                    self.stream.write("\n")
                self.stream.flush()
                self.last_print = now
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            print(text, file=self.stream, flush=True)


def _train(args: argparse.Namespace) -> int:
    from bnlab.train.config import ConfigError, load_config

    overrides = list(args.set or [])
    for flag, key in (
        ("steps", "steps"),
        ("seed", "seed"),
        ("checkpoint_every", "checkpoint_every"),
        ("eval_every", "eval_every"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"bnlab train: config error: {e}", file=sys.stderr)
        return 2

    import json
    from pathlib import Path

    from bnlab.train import NonFiniteError, fit

    workdir = Path(args.workdir)
    resuming = (workdir / "checkpoints").is_dir() and any(
        (workdir / "checkpoints").iterdir()
    )
    print(
        f"{'resuming' if resuming else 'starting'} run in {workdir} "
        f"({config.model} on {config.dataset}, {config.steps} steps, "
        f"parallel={config.parallel})",
        file=sys.stderr,
    )
    try:
        fit(config, workdir, on_progress=None if args.quiet else Progress())
    except ConfigError as e:
        print(f"bnlab train: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"bnlab train: {e}", file=sys.stderr)
        return 3
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    if lines:
        last = json.loads(lines[-1])
        summary = ", ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k.startswith("test")
        )
        print(f"final (step {last['step']}): {summary}")
    print(
        f"results: {workdir / 'metrics.jsonl'}, checkpoints: {workdir / 'checkpoints'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument(
        "--workdir", required=True, help="run directory (resumes if it has checkpoints)"
    )
    t.add_argument("--config", default=None, help="preset name or JSON file")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key"
    )
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--checkpoint-every", type=int, dest="checkpoint_every")
    t.add_argument("--eval-every", type=int, dest="eval_every")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.add_argument(
        "--distributed",
        metavar="ADDR,NUM,ID",
        help="call jax.distributed.initialize(ADDR, NUM, ID) first (CPU: gloo)",
    )
    args = parser.parse_args(argv)
    if args.distributed:
        import jax

        addr, num, pid = args.distributed.split(",")
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(addr, num_processes=int(num), process_id=int(pid))
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
