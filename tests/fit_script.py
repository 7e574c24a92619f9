"""A researcher's own model trained through ``bnlab.train.fit`` (used by the
tests in a fresh process: kill -9 and resume, several processes).

    python -m tests.fit_script WORKDIR [--steps N] [--devices D] [--distributed ADDR,NUM,ID]

A small Linen CNN that is not one of bnlab's models, with Flax's own
BatchNorm and bnlab's, 2 seeds x 2 learning rates = 4 arms on digits.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--every", type=int, default=5)
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
    run(args.workdir, args.steps, args.every, args.parallel)
    return 0


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


def run(workdir, steps, every, parallel="auto"):
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
            checkpoint_every=every,
            validation=0.1,
            parallel=parallel,
            steps_per_call=every,
        )


if __name__ == "__main__":
    sys.exit(main())
