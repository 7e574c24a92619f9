"""Ghost BN and the generalization gap (Hoffer et al. 2017, arXiv:1705.08741):
large-batch training generalizes worse; normalizing over small "ghost"
batches inside the large batch closes much of the gap.

5 x 512 ReLU MLP with BN on Fashion-MNIST (quick: digits, 5 x 128), the same
number of epochs (4; quick: 30) with batch 128 (quick: 32), batch 4096
(quick: 512), and batch 4096 with ghost batches of 128 (quick: 512 / 32);
SGD momentum 0.9, lr 0.05 at the small batch and 0.05 * sqrt(ratio) at the
large one (Hoffer et al.'s square-root scaling). Gap closed = (ghost -
large) / (small - large) in final test accuracy, means over seeds.

    python -m experiments.ghost_gap [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import math

import numpy as np

from experiments import _harness as H
from experiments._models import MLP, bn_factory

NAME = "ghost_gap"
# What the committed full run shows and why, written after it (the
# criteria above were fixed before it and are not changed).
DISCUSSION = """Ghost BN recovers 35 % of the large-batch gap (0.719 ->
0.772 vs 0.874 at batch 128), below the 50 % criterion. With 4 epochs the
batch-4096 arms take only 58 steps, so they are also under-trained, and
ghost batches cannot help with that part of the gap; Hoffer et al. train
large batches for more steps ("train longer") together with ghost BN."""
CLAIM = (
    "Ghost BN (statistics over small sub-batches of a large batch) closes at "
    "least half of the large-batch generalization gap (Hoffer et al. 2017)."
)


def run(ctx: H.Context) -> dict:
    width = ctx.pick(128, 512)
    small, large = ctx.pick((32, 512), (128, 4096))
    epochs = ctx.pick(30, 4)
    n = len(ctx.data.x_train)
    seeds = list(range(ctx.seeds))
    lr_large = 0.05 * math.sqrt(large / small)
    arms = {
        "small": (small, 0.05, None),
        "large": (large, lr_large, None),
        "large_ghost": (large, lr_large, small),
    }
    acc = {}
    for name, (b, lr, ghost) in arms.items():
        steps = ctx.steps(max(epochs * n // b, 1), max(epochs * n // b, 1))
        r = H.train_group(
            ctx,
            H.Group(
                name=name,
                model=MLP(
                    widths=(width,) * 5,
                    activation="relu",
                    norm="before",
                    norm_layer=bn_factory(ghost_size=ghost),
                ),
                seeds=seeds,
                hparams={"lr": [lr] * len(seeds)},
                make_tx=H.momentum_sgd,
                steps=steps,
                batch_size=b,
                eval_every=max(steps // 4, 1),
            ),
        )
        acc[name] = r.test_accuracy[-1].tolist()
    m = {k: float(np.mean(v)) for k, v in acc.items()}
    gap = m["small"] - m["large"]
    closed = (m["large_ghost"] - m["large"]) / gap if gap > 0 else float("nan")
    checks = [
        H.check(
            "gap closed by ghost BN: (ghost - large) / (small - large)",
            {"closed": closed, "gap": gap},
            ">= 0.5 (and a gap > 0 to close)",
            gap > 0 and closed >= 0.5,
        )
    ]
    table = [
        {
            "arm": f"{name} (batch {b}{', ghost ' + str(g) if g else ''}, lr {lr:.3g})",
            "final test accuracy": H.fmt(*H.mean_spread(acc[name])),
        }
        for name, (b, lr, g) in arms.items()
    ]
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        [{"arm": k, "test_accuracy": v} for k, v in acc.items()],
        table,
        [],
        notes=f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 5 x {width}, {epochs} epochs per arm.",
    )


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
