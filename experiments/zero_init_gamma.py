"""Zero-init gamma in residual blocks (Goyal et al. 2017, arXiv:1706.02677,
sec. 5.1): starting each residual block's last BN scale at 0 makes every
block the identity at initialization.

ResNet-20 (bnlab.models.ResNet20 with bnlab BN) on Fashion-MNIST 28x28
(quick: ResNet-8, one block per stage, on digits 8x8), batch 32, SGD
momentum 0.9, lr 0.05, 400 steps (quick: 100), with and without zero-init
of the last gamma. Reported (no
criterion): test accuracy over training.

    python -m experiments.zero_init_gamma [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np

from bnlab.models import ResNet20
from experiments import _harness as H
from experiments._models import bn_factory

NAME = "zero_init_gamma"
CLAIM = "Report: ResNet-20 with vs without zero-initialized last BN scale per block (Goyal et al. 2017)."


def zero_last_gamma(variables: dict, hp: dict) -> dict:
    """``hp["zero"] == 1``: the last BN scale of every residual block starts
    at 0, as ``ResNet20(zero_init_last_gamma=True)`` (its ``BatchNorm_1``)."""
    params = dict(variables["params"])
    for name, block in params.items():
        if name.startswith("BasicBlock"):
            bn = dict(block["BatchNorm_1"])
            bn["scale"] = bn["scale"] * (1 - hp["zero"])
            params[name] = {**block, "BatchNorm_1": bn}
    return {**variables, "params": params}


def run(ctx: H.Context) -> dict:
    steps = ctx.steps(100, 400)
    seeds = list(range(ctx.seeds))
    res = {}
    arms = (("zero-init gamma", 1.0), ("gamma = 1", 0.0))
    depth = ctx.pick(1, 3)
    model = ResNet20(num_outputs=10, norm=bn_factory(), blocks_per_stage=depth)
    # Quick (8x8 digits): both arms and all seeds in one vmapped program (the
    # arms differ only in the initial last-gamma, set by post_init). Full: one
    # group per arm and seed, since vmapping convolutions over arms with their
    # own weights makes XLA:CPU run grouped convolutions, far slower on 28x28.
    groups = (
        [[(z, s) for _, z in arms for s in seeds]]
        if ctx.quick
        else [[(z, s)] for _, z in arms for s in seeds]
    )
    acc = {}
    for g in groups:
        r = H.train_group(
            ctx,
            H.Group(
                name="g_" + "_".join(f"{int(z)}{s}" for z, s in g),
                model=model,
                seeds=[s for _, s in g],
                hparams={"lr": [0.05] * len(g), "zero": [z for z, _ in g]},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=32,
                eval_every=ctx.every(50, 100),
                post_init=zero_last_gamma,
                scan=False,  # convolutions: see Group.scan
            ),
            data=ctx.images,
        )
        for i, (z, s) in enumerate(g):
            acc[(z, s)] = (r.steps, r.test_accuracy[:, i])
    for name, z in arms:
        steps_axis = acc[(z, seeds[0])][0]
        curve = np.stack([acc[(z, s)][1] for s in seeds], 1)
        res[name] = H.Result(steps_axis, curve, curve, curve, [None], {}, np.zeros(1))
    table = [
        {
            "arm": k,
            **{
                f"test acc @ {s}": H.fmt(*H.mean_spread(r.test_accuracy[i]))
                for i, s in enumerate(r.steps)
            },
        }
        for k, r in res.items()
    ]
    records = H.curve_records(res, test_accuracy="test_accuracy")
    fig = H.plot_curves(
        ctx,
        "zero_init",
        {k: (r.steps, r.test_accuracy) for k, r in res.items()},
        "ResNet: zero-init last gamma",
    )
    net = "ResNet-8 (1 block per stage)" if ctx.quick else "ResNet-20"
    return H.write_outputs(
        ctx,
        CLAIM,
        [],
        records,
        table,
        [fig],
        notes=(
            f"{'digits 8x8' if ctx.quick else 'Fashion-MNIST 28x28'}, {net}, "
            f"batch 32, {steps} steps, one compiled program per seed; no criterion."
        ),
    )


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
