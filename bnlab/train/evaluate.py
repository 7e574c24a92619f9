"""Evaluation of every arm: validation, test (and a training subset) with
running statistics, and optionally the test set with batch statistics.

Each split is cut into batches of one size (the last one padded, so one
compiled function serves every split); the model's outputs of every batch
stay on the device, and the loss function then sees the whole split at once
(:func:`bnlab.train.step.make_split_metrics`): ``val_<metric>`` is the
loss's metric of the whole validation split, whatever the metric is.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bnlab.train.arms import arm_map
from bnlab.train.options import Evaluation
from bnlab.train.splits import Splits, length, read
from bnlab.train.step import make_arm_outputs, make_split_metrics

__all__ = ["Evaluator"]


def _bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class Evaluator:
    """``evaluator(variables, hparams) -> {"<split>_loss": (arms,), ...}``.

    Args:
      splits: the run's data.
      loss_fn: the run's loss.
      fns: the model's functions.
      evaluation: what to evaluate.
      layout: the arms x data layout (placement and compilation).
    """

    def __init__(self, splits: Splits, loss_fn, fns, evaluation: Evaluation, layout):
        self.layout = layout
        sets = {k: v for k, v in splits.named().items() if k != "train"}
        if evaluation.train_examples:
            n_train = length(splits.train)
            n = min(evaluation.train_examples, n_train)
            perm = np.random.default_rng([0, 4242]).permutation(n_train)
            sets["trainset"] = read(splits.train, np.sort(perm[:n]))
        self.size = min(
            evaluation.batch_size, max(map(length, sets.values()), default=1)
        )
        # in memory: padded batches on the device once; streamed: read per call
        self.sets = {
            name: [
                self._padded(split, i, j) if isinstance(split, tuple) else (split, i, j)
                for i, j in _bounds(length(split), self.size)
            ]
            for name, split in sets.items()
        }
        self.outputs = layout.compile_eval(
            arm_map(make_arm_outputs(fns), in_axes=(0, None)), 1
        )
        self.metrics = {
            name: layout.compile_eval(
                arm_map(make_split_metrics(loss_fn, length(split)), (0, None)), 0
            )
            for name, split in sets.items()
        }
        self.batch_stats = None
        if evaluation.batch_stats and "test" in sets:
            test = sets["test"]
            self.batch_stats = (
                layout.compile_eval(
                    arm_map(make_arm_outputs(fns, batch_stats=True), (0, None)), 1
                ),
                self.metrics["test"],
                [  # unpadded: padding would change the batch's statistics
                    layout.put_eval(read(test, np.arange(i, j)))
                    for i, j in _bounds(length(test), self.size)
                ],
            )
        self.probe = None
        if evaluation.probe is not None:
            self.probe = layout.compile_eval(jax.vmap(evaluation.probe), 2)

    def _padded(self, split, i: int, j: int):
        x, y = read(split, np.arange(i, j))
        pad = self.size - (j - i)
        if pad:
            x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
            y = np.concatenate([y, np.repeat(y[:1], pad, axis=0)])
        return self.layout.put_eval((np.asarray(x), np.asarray(y)))

    def _split(self, name, outputs_fn, metrics_fn, variables, batches) -> dict:
        outs, ys = [], []
        for batch in batches:
            x, y = batch if len(batch) == 2 else self._padded(*batch)
            outs.append(outputs_fn(variables, x))
            ys.append(y)
        loss, metrics = metrics_fn(tuple(outs), tuple(ys))
        out = {f"{name}_loss": np.asarray(loss)}
        out.update({f"{name}_{m}": np.asarray(v) for m, v in metrics.items()})
        return out

    def __call__(self, variables: dict, hp: Any) -> dict[str, Any]:
        out = {}
        for name, batches in self.sets.items():
            out |= self._split(
                name, self.outputs, self.metrics[name], variables, batches
            )
        if self.batch_stats is not None:
            fn, metrics_fn, batches = self.batch_stats
            out |= self._split("test_batch_stats", fn, metrics_fn, variables, batches)
        if self.probe is not None:
            out["probe"] = jax.tree.map(np.asarray, self.probe(variables, hp))
        return out
