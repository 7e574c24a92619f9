"""Batch renormalization vs BN (Ioffe 2017, arXiv:1702.03275): with tiny
micro-batches and with non-i.i.d. batches, training with batch statistics
does not match inference with running statistics; renorm corrects it.

3 x 128 ReLU MLP on Fashion-MNIST (quick: digits, 3 x 64), SGD momentum 0.9,
3000 steps (quick: 1000): (i) micro-batches of 4 i.i.d. examples, lr 0.01;
(ii) batches of 32 drawn from only 2 classes each (16 + 16), lr 0.05. BN vs
batch renorm with the paper's schedule scaled to the run (r_max 1 -> 3 by
50%, d_max 0 -> 5 by 30%, plain BN for the first 5%). Inference uses the
running statistics (BN momentum 0.99). Final test accuracy, means over
seeds.

    python -m experiments.renorm_small_batch [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import numpy as np

import bnlab
from experiments import _harness as H
from experiments._models import MLP, bn_factory

NAME = "renorm_small_batch"
CLAIM = (
    "Batch renormalization beats BN by >= 2 points with micro-batches of 4 and "
    "with non-i.i.d. batches (Ioffe 2017)."
)


def non_iid_sampler(y: np.ndarray, batch: int, classes_per_batch: int = 2):
    by_class = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]

    def sample(seed: int, step: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step, 7])
        cls = rng.choice(len(by_class), classes_per_batch, replace=False)
        per = batch // classes_per_batch
        return np.concatenate([rng.choice(by_class[c], per) for c in cls])

    return sample


def run(ctx: H.Context) -> dict:
    width = ctx.pick(64, 128)
    steps = ctx.steps(1000, 3000)
    seeds = list(range(ctx.seeds))
    r_sched, d_sched = bnlab.renorm_schedules(
        warmup_steps=max(steps // 20, 1),
        r_max_step=max(steps // 2, 2),
        d_max_step=max(3 * steps // 10, 2),
    )
    settings = {
        "micro-batch 4": {"batch": 4, "lr": 0.01, "sampler": None},
        "non-iid (2 classes / batch)": {
            "batch": 32,
            "lr": 0.05,
            "sampler": non_iid_sampler(ctx.data.y_train, 32),
        },
    }
    acc = {}
    for setting, cfg in settings.items():
        for variant in ("BN", "renorm"):
            model = MLP(
                widths=(width,) * 3,
                activation="relu",
                norm="before",
                norm_layer=bn_factory(renorm=variant == "renorm"),
            )
            r = H.train_group(
                ctx,
                H.Group(
                    name=f"{'micro' if cfg['batch'] == 4 else 'noniid'}_{variant}",
                    model=model,
                    seeds=seeds,
                    hparams={"lr": [cfg["lr"]] * len(seeds)},
                    make_tx=H.momentum_sgd,
                    steps=steps,
                    batch_size=cfg["batch"],
                    eval_every=ctx.every(250, 500),
                    sampler=cfg["sampler"],
                    train_kwargs=(
                        lambda t: {
                            "norm_kwargs": {"r_max": r_sched(t), "d_max": d_sched(t)}
                        }
                    )
                    if variant == "renorm"
                    else None,
                ),
            )
            acc[(setting, variant)] = r.test_accuracy[-1].tolist()
    checks = []
    for setting in settings:
        gain = float(np.mean(acc[(setting, "renorm")]) - np.mean(acc[(setting, "BN")]))
        checks.append(
            H.check(
                f"{setting}: renorm - BN final test accuracy",
                gain,
                ">= 0.02 (2 points)",
                gain >= 0.02,
            )
        )
    table = [
        {
            "setting": s,
            "BN": H.fmt(*H.mean_spread(acc[(s, "BN")])),
            "batch renorm": H.fmt(*H.mean_spread(acc[(s, "renorm")])),
        }
        for s in settings
    ]
    records = [
        {"setting": s, "variant": v, "test_accuracy": a} for (s, v), a in acc.items()
    ]
    return H.write_outputs(
        ctx,
        CLAIM,
        checks,
        records,
        table,
        [],
        notes=f"{'digits' if ctx.quick else 'Fashion-MNIST'}, MLP 3 x {width}, {steps} steps; inference with running statistics.",
    )


if __name__ == "__main__":
    raise SystemExit(H.main(run, NAME))
