"""A researcher's own model trained through ``bnlab.train.fit`` (used by the
tests in a fresh process: kill -9 and resume, several processes).

    python -m tests.fit_script WORKDIR [--steps N] [--devices D] [--distributed ADDR,NUM,ID]
        [--every E] [--checkpoint-every C] [--pause-at S]

A small Linen CNN that is not one of bnlab's models, with Flax's own
BatchNorm and bnlab's, 2 seeds x 2 learning rates = 4 arms on digits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument(
        "--pause-at",
        type=int,
        default=None,
        help="after step S (evaluated, its checkpoints on disk) print 'paused at "
        "S' and wait for stdin to close: a parent kills the run at a known point",
    )
    p.add_argument("--distributed", default=None)
    p.add_argument("--parallel", default="auto")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if args.distributed:
        addr, num, pid = args.distributed.split(",")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(addr, num_processes=int(num), process_id=int(pid))
    run(
        args.workdir,
        args.steps,
        args.every,
        args.parallel,
        checkpoint_every=args.checkpoint_every,
        on_progress=None if args.pause_at is None else _pauser(args),
    )
    return 0


def _pauser(args):
    """fit's on_progress that stops the run at step ``args.pause_at`` until
    stdin closes (then the process exits: the parent is gone)."""
    from pathlib import Path

    from bnlab.train.checkpoint import finalized_steps

    every = args.checkpoint_every or args.every
    ckpts = Path(args.workdir) / "checkpoints"

    def on_progress(p):
        if p.get("step") != args.pause_at or p.get("event"):
            return
        # the checkpoint before the pause is written in the background
        newest = args.pause_at - args.pause_at % every
        deadline = time.monotonic() + 60
        while newest and newest not in finalized_steps(ckpts):
            if time.monotonic() > deadline:
                print(f"checkpoint {newest} not finalized after 60 s", flush=True)
                os._exit(3)
            time.sleep(0.01)
        print(f"paused at {args.pause_at}", flush=True)
        sys.stdin.read()
        os._exit(4)

    return on_progress


def model(axis_name=None):
    import flax.linen as nn

    import bnlab.linen

    class SmallCNN(nn.Module):
        """conv - Flax BN - relu - conv - bnlab BN - relu - pool - dense."""

        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(8, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, axis_name=axis_name)(x)
            x = nn.relu(x)
            x = nn.Conv(8, (3, 3), use_bias=False)(x)
            x = bnlab.linen.BatchNorm(
                use_running_average=not train, axis_name=axis_name
            )(x)
            x = nn.relu(x).mean(axis=(1, 2))
            return nn.Dense(10)(x)

    return SmallCNN()


def run(
    workdir, steps, every, parallel="auto", checkpoint_every=None, on_progress=None
):
    import jax
    import optax

    from bnlab import data
    from bnlab.train import DATA_AXIS, fit

    with jax.numpy_dtype_promotion("standard"):
        return fit(
            model(None if parallel == "auto" else DATA_AXIS),
            data.load("digits"),
            workdir,
            optimizer=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
            seeds=(0, 1),
            hparams={"lr": [0.05, 0.2]},
            steps=steps,
            batch_size=32,
            eval_every=every,
            checkpoint_every=checkpoint_every or every,
            validation=0.1,
            parallel=parallel,
            steps_per_call=every,
            on_progress=on_progress,
        )


if __name__ == "__main__":
    sys.exit(main())
