"""Early stopping on a validation metric and each arm's best variables:
decided from the records, kept in the checkpoints, resumed bit-exactly."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnlab.linen
from bnlab.data import Dataset
from bnlab.train import EarlyStopping, fit, load
from bnlab.train.early import Tracker


def _records(step, values, stopped=None):
    stopped = stopped or {}
    return [
        {"step": step, "arm": i, "val_loss": v, "stopped_at": stopped.get(i)}
        for i, v in enumerate(values)
    ]


def test_tracker_follows_each_arm_by_hand():
    t = Tracker(EarlyStopping("val_loss", patience=2, min_delta=0.1), 2)
    assert t.update(_records(10, [1.0, 2.0])) == [0, 1]  # first values are best
    assert t.update(_records(20, [0.95, 1.5])) == [1]  # arm 0: 0.05 < min_delta
    assert t.update(_records(30, [0.5, 1.45])) == [0]  # arm 1: a first miss
    assert t.done_at == [None, None]
    assert t.update(_records(40, [0.6, 1.6])) == []  # arm 1: 2nd miss -> done
    assert t.done_at == [None, 40] and not t.all_done
    assert t.update(_records(50, [0.7, 0.1])) == []  # a done arm is not followed
    assert t.done_at == [50, 40] and t.all_done
    assert t.summary() == [
        {"best": 0.5, "best_step": 30, "done_at": 50},
        {"best": 1.5, "best_step": 20, "done_at": 40},
    ]
    replayed = Tracker(t.rule, 2)
    history = [(10, [1.0, 2.0]), (20, [0.95, 1.5]), (30, [0.5, 1.45])]
    history += [(40, [0.6, 1.6]), (50, [0.7, 0.1])]
    replayed.replay([r for s, v in reversed(history) for r in _records(s, v)])
    assert replayed.summary() == t.summary()


def test_max_mode_nan_and_a_stopped_arm():
    rule = EarlyStopping("val_accuracy", patience=1)
    assert rule.direction == "max"
    t = Tracker(rule, 2)
    recs = [
        {"step": 5, "arm": 0, "val_accuracy": 0.5, "stopped_at": None},
        {"step": 5, "arm": 1, "val_accuracy": None, "stopped_at": 3},
    ]
    assert t.update(recs) == [0]
    assert t.done_at == [None, 5]  # an arm stopped on NaN/Inf is done
    recs[0]["val_accuracy"] = float("nan")
    t.update(recs)
    assert t.done_at == [5, 5]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"patience": 0}, "patience=0"),
        ({"mode": "up"}, "mode='up'"),
        ({"min_delta": -1.0}, "min_delta=-1.0"),
    ],
)
def test_bad_rules_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kw)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16)(x)
        x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    noisy = rng.random(160) < 0.3  # label noise: the model can over-fit
    y[noisy] = rng.integers(0, 3, noisy.sum())
    return Dataset(
        x[:64],
        y[:64],
        x[128:],
        y[128:],
        num_classes=3,
        x_val=x[64:128],
        y_val=y[64:128],
    )


DATA = _data()
RULE = EarlyStopping("val_loss", patience=3)


def _fit(workdir, steps=600, **kw):
    kw.setdefault("early_stopping", RULE)
    with jax.numpy_dtype_promotion("standard"):
        return fit(
            Net(),
            DATA,
            workdir,
            optimizer=optax.adam(0.05),
            steps=steps,
            batch_size=16,
            eval_every=10,
            seeds=(0, 1),
            quiet=True,
            **kw,
        )


def _val_loss(variables):
    logits = Net().apply(variables, jnp.asarray(DATA.x_val), train=False)
    return float(
        optax.softmax_cross_entropy_with_integer_labels(logits, DATA.y_val).mean()
    )


def test_a_run_stops_early_keeps_each_arms_best_and_resumes_to_the_same_bits(tmp_path):
    whole = _fit(tmp_path / "whole")
    assert whole.step < 600, "the rule never stopped this over-fitting run"
    assert all(e["done_at"] is not None for e in whole.early_stopping)
    for i, e in enumerate(whole.early_stopping):
        best = jax.tree.map(lambda a, i=i: a[i], whole.best)
        assert abs(_val_loss(best) - e["best"]) < 1e-5  # the record's value
        assert e["best_step"] < e["done_at"]
    loaded = load(tmp_path / "whole", best=True)
    for i in range(2):
        for a, b in zip(
            jax.tree.leaves(loaded.arm(i)),
            jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i], whole.best)),
            strict=True,
        ):
            assert np.array_equal(a, b)
    # interrupted after 20 steps (a shorter run), then resumed to the end
    _fit(tmp_path / "parts", steps=20)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="resuming a 20-step run")
        parts = _fit(tmp_path / "parts")
    assert parts.step == whole.step
    assert parts.early_stopping == whole.early_stopping
    for a, b in zip(
        jax.tree.leaves((parts.best, parts.variables)),
        jax.tree.leaves((whole.best, whole.variables)),
        strict=True,
    ):
        assert np.array_equal(a, b)
    # a finished run is not trained again
    again = _fit(tmp_path / "whole")
    assert again.step == whole.step and len(again.records) == len(whole.records)


def test_an_unknown_metric_and_load_best_without_a_rule(tmp_path):
    with pytest.raises(ValueError, match="no 'val_f1'"):
        _fit(tmp_path / "a", early_stopping=EarlyStopping("val_f1"))
    with jax.numpy_dtype_promotion("standard"):
        fit(
            Net(),
            DATA,
            tmp_path / "b",
            optimizer=optax.sgd(0.1),
            steps=4,
            batch_size=8,
            quiet=True,
        )
    with pytest.raises(ValueError, match="without early_stopping"):
        load(tmp_path / "b", best=True)
