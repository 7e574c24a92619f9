"""fit's options that change what a run keeps, evaluates or compiles, each
checked against what it promises: checkpoints kept, batch-statistics and
training-subset evaluations recomputed here, a scan's unroll."""

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import bnlab.linen
from bnlab.data import Dataset
from bnlab.train import fit, load


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's schedules mix int32 steps with Python floats (see test_train)
    with jax.numpy_dtype_promotion("standard"):
        yield


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(8)(x)
        x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


N_TRAIN, N_TEST = 60, 40


def _ds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN + N_TEST, 4)).astype(np.float32)
    y = (np.abs(x[:, 0] * 2).astype(np.int32)) % 3
    return Dataset(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], num_classes=3)


def _fit(workdir, **kw):
    args = dict(
        optimizer=optax.sgd(0.1),
        steps=10,
        batch_size=8,
        eval_every=5,
        seeds=(0, 1),
        quiet=True,
    )
    return fit(Net(), _ds(), workdir, **(args | kw))


def _loss_and_accuracy(logits, labels):
    """Mean softmax cross-entropy and accuracy in float64 numpy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    per_example = -log_p[np.arange(len(labels)), labels]
    return per_example, float(np.mean(np.argmax(z, axis=1) == labels))


def _last(records, arm):
    return max((r for r in records if r["arm"] == arm), key=lambda r: r["step"])


def test_keep_checkpoints_leaves_only_the_newest(tmp_path):
    r = _fit(tmp_path, steps=12, eval_every=2, keep_checkpoints=2)
    assert r.step == 12
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [10, 12]
    assert load(tmp_path, step=10).step == 10
    with pytest.raises(FileNotFoundError, match="has no checkpoint 8"):
        load(tmp_path, step=8)


def test_eval_batch_stats_normalizes_each_test_batch_by_its_own_statistics(
    tmp_path,
):
    # 40 test examples in batches of 16: 16, 16 and an unpadded 8.
    r = _fit(tmp_path, eval_batch_stats=True, eval_batch_size=16)
    ds = _ds()
    for arm in range(2):
        rec = _last(r.records, arm)
        logits = np.concatenate(
            [
                Net().apply(
                    r.arm(arm), ds.x_test[i : i + 16], train=True, mutable=True
                )[0]
                for i in (0, 16, 32)
            ]
        )
        per_example, accuracy = _loss_and_accuracy(logits, ds.y_test)
        assert rec["test_batch_stats_loss"] == pytest.approx(
            per_example.mean(), rel=1e-5
        )
        assert rec["test_batch_stats_accuracy"] == pytest.approx(accuracy)
        # not the running-statistics evaluation under another name
        running = Net().apply(r.arm(arm), ds.x_test, train=False)
        assert rec["test_loss"] == pytest.approx(
            _loss_and_accuracy(running, ds.y_test)[0].mean(), rel=1e-5
        )
        assert rec["test_loss"] != pytest.approx(rec["test_batch_stats_loss"])
    plain = _fit(tmp_path / "plain")
    assert not any(k.startswith("test_batch_stats") for k in plain.records[-1])


def test_eval_train_evaluates_a_subset_of_that_many_training_examples(tmp_path):
    ds = _ds()
    n = 7
    r = _fit(tmp_path, eval_train=n)
    everything = _fit(tmp_path / "all", eval_train=10 * N_TRAIN)
    for result in (r, everything):
        assert {"trainset_loss", "trainset_accuracy"} <= set(result.records[-1])
    assert not any(k.startswith("trainset") for k in _fit(tmp_path / "no").records[0])
    for arm in range(2):
        # more than the training set: the whole of it, with running statistics
        logits = Net().apply(everything.arm(arm), ds.x_train, train=False)
        per_example, accuracy = _loss_and_accuracy(logits, ds.y_train)
        rec = _last(everything.records, arm)
        assert rec["trainset_loss"] == pytest.approx(per_example.mean(), rel=1e-5)
        assert rec["trainset_accuracy"] == pytest.approx(accuracy)
        # n examples: a count of n in the accuracy, a sum of n losses
        logits = Net().apply(r.arm(arm), ds.x_train, train=False)
        per_example = np.sort(_loss_and_accuracy(logits, ds.y_train)[0])
        rec = _last(r.records, arm)
        correct = rec["trainset_accuracy"] * n
        assert correct == pytest.approx(round(correct), abs=1e-5)
        total = rec["trainset_loss"] * n
        assert per_example[:n].sum() * (1 - 1e-5) <= total
        assert total <= per_example[-n:].sum() * (1 + 1e-5)


def test_unroll_gives_the_variables_of_a_rolled_scan(tmp_path):
    kw = dict(steps=12, eval_every=6, steps_per_call=3)
    rolled = _fit(tmp_path / "rolled", unroll=1, **kw)
    unrolled = _fit(tmp_path / "unrolled", unroll=2, **kw)
    assert unrolled.step == 12
    execution = json.loads((tmp_path / "unrolled" / "config.json").read_text())
    assert execution["execution"]["scan"]
    assert execution["execution"]["steps_per_call"] == 3
    for a, b in zip(
        jax.tree.leaves(rolled.variables),
        jax.tree.leaves(unrolled.variables),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # and it trained: not the initial variables
    first = _fit(tmp_path / "none", steps=1, eval_every=1, steps_per_call=1)
    assert not np.allclose(
        np.asarray(first.variables["params"]["Dense_0"]["kernel"]),
        np.asarray(unrolled.variables["params"]["Dense_0"]["kernel"]),
    )
