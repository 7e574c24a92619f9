"""Nothing silently wrong through ``fit``: every argument, split and label is
checked before any work (the workdir is not even created), with one error
that names the argument to fix."""

import json
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnlab.linen
import bnlab.nnx
from bnlab.data import ArraySource, Dataset, StreamingDataset
from bnlab.train import fit, load, nnx_update


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's schedules mix int32 steps with Python floats (see test_train)
    with jax.numpy_dtype_promotion("standard"):
        yield


class Net(nn.Module):
    outputs: int = 3

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(8)(x)
        x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(self.outputs)(nn.relu(x))


def _data(n=64, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.abs(x[:, 0] * 2).astype(np.int32)) % classes
    return x, y


def _ds(**kw):
    x, y = _data()
    fields = dict(
        x_train=x[:48],
        y_train=y[:48],
        x_test=x[48:],
        y_test=y[48:],
        num_classes=3,
    )
    return Dataset(**(fields | kw))


def _fit(workdir, model=None, data=None, **kw):
    args = (
        dict(optimizer=optax.sgd(0.1), steps=4, batch_size=8, eval_every=2, quiet=True)
        | kw
    )
    return fit(model or Net(), data if data is not None else _ds(), workdir, **args)


def _refused(tmp_path, match, error=(ValueError, TypeError), **kw):
    workdir = tmp_path / "refused"
    with pytest.raises(error, match=match):
        _fit(workdir, **kw)
    assert not workdir.exists(), "the workdir was created before the error"


# ------------------------------------------------------------ labels, splits

x, y = _data()


@pytest.mark.parametrize(
    "fields,match",
    [
        (
            {"y_train": np.where(y[:48] == 0, -1, y[:48])},
            r"data.y_train holds label -1",
        ),
        ({"y_test": np.full(16, 3)}, r"data.y_test holds label 3 .*\[0, 3\)"),
        ({"y_train": y[:48].astype(np.float32)}, "integer class labels"),
        (
            {"y_train": y[:48, None], "y_test": y[48:, None]},
            r"labels of shape \(2, 1\).*logits of shape \(2, 1, 3\)",
        ),
        ({"y_train": y[:50]}, "x_train has 48 examples but data.y_train has 50"),
        ({"y_train": y[:40]}, "x_train has 48 examples but data.y_train has 40"),
        ({"x_val": x[:5]}, "data.x_val is given but data.y_val is None"),
        ({"x_test": x[:0], "y_test": y[:0]}, "the test split has no examples"),
        ({"x_test": x[48:, :3]}, r"data.x_test has examples of shape \(3,\)"),
        ({"num_classes": -1}, "num_classes=-1 must be an integer >= 0"),
    ],
)
def test_bad_splits_and_labels_are_refused_before_any_work(tmp_path, fields, match):
    _refused(tmp_path, match, data=_ds(**fields))


def test_labels_of_a_streamed_array_source_are_checked(tmp_path):
    bad = np.where(y == 2, 7, y)
    data = StreamingDataset(ArraySource(x, bad), None, num_classes=3)
    _refused(tmp_path, r"data.train \(its y\) holds label 7", data=data)
    _refused(tmp_path, "data.train is None", data=StreamingDataset(None, None, 3))


def test_a_list_of_examples_is_an_array(tmp_path):
    result = _fit(
        tmp_path / "run",
        data=_ds(x_train=x[:48].tolist(), y_train=y[:48].tolist()),
    )
    assert result.step == 4


def test_ragged_streamed_examples_name_the_source(tmp_path):
    class Ragged:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return np.zeros(4 if i % 2 else 5, np.float32), 0

    data = StreamingDataset(Ragged(), None, num_classes=3)
    with pytest.raises(ValueError, match="different shapes"):
        _fit(tmp_path / "run", data=data)


# ------------------------------------------------ model outputs and the loss


def test_a_model_too_narrow_for_the_classes_names_model(tmp_path):
    _refused(
        tmp_path,
        r"model: .*\(2, 5\).*num_classes=10",
        model=Net(5),
        data=_ds(num_classes=10),
    )


def test_a_model_returning_a_tuple_or_a_vector_names_model(tmp_path):
    class Pair(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            out = nn.Dense(3)(x)
            return out, out

    class Vector(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(1)(x)[:, 0]

    _refused(tmp_path, "model: it returns a tuple", model=Pair())
    _refused(tmp_path, r"model: .*\(2,\)", model=Vector())


def test_regression_targets_of_shape_n_1_are_compared_not_broadcast(tmp_path):
    rng = np.random.default_rng(1)
    xr = rng.normal(size=(96, 4)).astype(np.float32)
    yr = (xr @ np.array([1.0, -2.0, 0.5, 0.0], np.float32))[:, None]
    data = Dataset(xr[:64], yr[:64], xr[64:], yr[64:], num_classes=0)
    result = _fit(
        tmp_path / "run",
        model=Net(1),
        data=data,
        optimizer=optax.adam(0.05),
        steps=200,
        eval_every=200,
    )
    # (B,) - (B, 1) broadcast to (B, B) would train to the mean (loss ~ 5)
    assert result.records[-1]["test_loss"] < 1.0, result.records[-1]
    _refused(
        tmp_path,
        r"model: .*\(2, 3\).*targets of shape \(2, 1\)",
        model=Net(3),
        data=data,
    )


def test_a_custom_loss_that_fails_names_loss(tmp_path):
    def loss(out, labels):
        return jnp.mean((out - labels) ** 2)  # (B, 3) - (B,): rank promotion

    _refused(tmp_path, "loss: on the model's outputs", loss=loss)


# -------------------------------------------------------- other arguments


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"seeds": (2**32,)}, r"seed 4294967296 must be an integer in \[0, 2\*\*32\)"),
        (
            {"hparams": {"lr": [1e-50]}, "optimizer": lambda hp: optax.sgd(hp["lr"])},
            "not representable in float32",
        ),
        (
            {"hparams": {"lr": [1e39]}, "optimizer": lambda hp: optax.sgd(hp["lr"])},
            "not representable in float32",
        ),
        ({"eval_every": 0}, "eval_every=0 must be a positive integer"),
        ({"checkpoint_every": 0}, "checkpoint_every=0 must be a positive integer"),
        ({"steps": 2**31 + 5}, "more than a run can count"),
        ({"optimizer": lambda hp: None}, "optimizer.*returned NoneType"),
        ({"optimizer": lambda hp: 0.1}, "optimizer.*returned float"),
        ({"post_init": lambda v, hp: None}, "post_init returned NoneType"),
        ({"probe": lambda v, hp: "text"}, "probe"),
        ({"devices": []}, r"devices=\[\] gives no device"),
        ({"rng_streams": "dropout"}, "rng_streams='dropout' must be a sequence"),
        ({"unroll": 0}, "unroll=0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, kw, match):
    _refused(tmp_path, match, **kw)


@pytest.mark.parametrize(
    "workdir", ["", "   ", "runs/sweep[lr=0.1]", "a\\b", "x" * 4045]
)
def test_workdirs_that_cannot_work_are_refused_with_one_line(
    tmp_path, monkeypatch, workdir
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir"):
        _fit(workdir)
    assert list(tmp_path.iterdir()) == []


def test_a_schedule_of_a_traced_hyper_parameter_says_how_to_write_it(tmp_path):
    def optimizer(hp):
        return optax.sgd(optax.warmup_cosine_decay_schedule(0.0, hp["lr"], 2, 4))

    _refused(
        tmp_path, "Scale a unit schedule", optimizer=optimizer, hparams={"lr": [0.1]}
    )

    def scaled(hp):
        unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 4)
        return optax.sgd(lambda step: hp["lr"] * unit(step))

    assert _fit(tmp_path / "ok", optimizer=scaled, hparams={"lr": [0.1]}).step == 4


def test_a_second_fit_in_another_thread_is_refused(tmp_path):
    started, release = threading.Event(), threading.Event()

    def hold(p):
        started.set()
        release.wait(60)

    worker = threading.Thread(
        target=lambda: _fit(tmp_path / "a", on_progress=hold, quiet=False)
    )
    worker.start()
    try:
        assert started.wait(120)
        with pytest.raises(RuntimeError, match="another fit is running"):
            _fit(tmp_path / "b")
    finally:
        release.set()
        worker.join(120)


def test_a_config_with_a_set_is_recorded_in_a_fixed_order(tmp_path):
    result = _fit(tmp_path / "run", config={"tags": {"b", "a", "c"}})
    assert result.step == 4
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["tags"] == ["a", "b", "c"]


# ------------------------------------------------------- a run's identity


def test_a_changed_module_field_or_test_set_does_not_resume(tmp_path):
    from bnlab.train import CheckpointMismatchError

    _fit(tmp_path / "run")
    with pytest.raises(CheckpointMismatchError):
        _fit(tmp_path / "run", model=_Momentum(), steps=6)
    changed_test = _ds(y_test=np.roll(y[48:], 1))
    with pytest.raises(CheckpointMismatchError):
        _fit(tmp_path / "run", data=changed_test, steps=6)
    with pytest.warns(UserWarning, match="resuming a 4-step run"):
        assert _fit(tmp_path / "run", steps=6).step == 6


class _Momentum(nn.Module):
    """Net with another BN momentum: the same shapes, another model."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(8)(x)
        x = bnlab.linen.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(nn.relu(x))


# -------------------------------------------------------- records kept


def test_records_a_restart_drops_are_kept_aside(tmp_path):
    import shutil

    run = tmp_path / "run"
    _fit(run, steps=10, eval_every=5)
    before = (run / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(run / "checkpoints")
    with pytest.warns(UserWarning, match="kept in"):
        _fit(run, steps=5, eval_every=5)
    dropped = (run / "metrics.jsonl.dropped").read_text().splitlines()
    assert dropped == before  # every record of the first run, in order
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert max(steps) == 5


def test_metrics_replaced_by_a_link_are_not_written_through(tmp_path):
    from bnlab.train import RunDirError

    run = tmp_path / "run"
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("")

    def swap(p):
        if p.get("step") == 2 and not (run / "metrics.jsonl").is_symlink():
            (run / "metrics.jsonl").unlink()
            (run / "metrics.jsonl").symlink_to(target)

    with pytest.raises(RunDirError, match="symbolic link"):
        _fit(run, on_progress=swap)
    assert target.read_text() == ""


# ------------------------------------------------------------- metrics


def test_a_non_decomposable_metric_is_computed_on_the_whole_split(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    xs = rng.normal(size=(n, 4)).astype(np.float32)
    ys = np.where(rng.random(n) < 0.9, 0, 1).astype(np.int32)  # imbalanced
    xs[ys == 1, 0] += 1.0
    data = Dataset(xs[:400], ys[:400], xs[400:], ys[400:], num_classes=2)

    def loss(out, labels):
        ce = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
        pred = jnp.argmax(out, -1)
        recalls = [
            jnp.sum((pred == c) & (labels == c)) / jnp.maximum(jnp.sum(labels == c), 1)
            for c in (0, 1)
        ]
        return ce, {"balanced_accuracy": (recalls[0] + recalls[1]) / 2}

    result = _fit(
        tmp_path / "run",
        model=Net(2),
        data=data,
        loss=loss,
        steps=40,
        eval_every=40,
        eval_batch_size=64,
    )
    logits = np.asarray(
        Net(2).apply(result.arm(0), jnp.asarray(xs[400:]), train=False), np.float64
    )
    pred, labels = logits.argmax(-1), ys[400:]
    want = np.mean([np.mean(pred[labels == c] == c) for c in (0, 1)])
    got = result.records[-1]["test_balanced_accuracy"]
    assert abs(got - want) < 1e-6, (got, want)


# ------------------------------------------------------------------ NNX


class Dropper(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = bnlab.nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))


def test_an_nnx_model_with_rng_streams_loads_back(tmp_path):
    result = _fit(tmp_path / "run", model=lambda rngs: Dropper(rngs))
    loaded = load(tmp_path / "run")
    model = nnx_update(Dropper(nnx.Rngs(5)), loaded.arm(0))
    model.eval()
    got = np.asarray(model(jnp.asarray(x[48:])))
    model2 = nnx_update(Dropper(nnx.Rngs(7)), result.arm(0))
    model2.eval()
    assert np.array_equal(got, np.asarray(model2(jnp.asarray(x[48:]))))


def test_a_run_whose_workdir_was_replaced_writes_nothing_into_the_new_one(tmp_path):
    from bnlab.train import RunDirError

    run = tmp_path / "run"

    def replace(p):
        if p.get("step") == 2 and not (tmp_path / "old").exists():
            run.rename(tmp_path / "old")
            run.mkdir()
            (run / "metrics.jsonl").write_text('{"step": 1, "run": "B"}\n')

    with pytest.raises(RunDirError, match="deleted or replaced"):
        _fit(run, on_progress=replace, checkpoint_every=4)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "run": "B"}\n'
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("parallel", ["shard_map", "pmap"])
def test_split_batches_need_bn_synced_over_the_data_axis(tmp_path, parallel):
    # was: a scan carry-type error from inside the compiled loop
    _refused(
        tmp_path,
        "axis_name=bnlab.train.DATA_AXIS",
        parallel=parallel,
        devices=jax.devices()[:4],
    )


def test_progress_is_shown_by_default_and_says_it_resumed(tmp_path, capsys):
    _fit(tmp_path / "run", quiet=False)
    err = capsys.readouterr().err
    assert "compiling the training step" in err
    assert "step 2/4" in err and "step 4/4" in err  # a line per evaluation
    with pytest.warns(UserWarning, match="resuming a 4-step run"):
        _fit(tmp_path / "run", quiet=False, steps=6)
    assert "resumed from step 4" in capsys.readouterr().err
    _fit(tmp_path / "quiet", quiet=True)
    assert capsys.readouterr().err == ""


def test_a_run_and_its_load_print_the_arms_table(tmp_path):
    result = _fit(
        tmp_path / "run",
        seeds=(3, 4),
        hparams={"lr": [0.1, 0.2]},
        optimizer=lambda hp: optax.sgd(hp["lr"]),
    )
    loaded = load(tmp_path / "run")
    assert result.table() == loaded.table()
    lines = repr(loaded).splitlines()
    assert lines[1].split() == ["arm", "seed", "lr", "stopped_at"]
    assert lines[-1].split() == ["3", "4", "0.2", "-"]


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3))(x.reshape(len(x), 2, 2, 1))
        x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x).reshape(len(x), -1))


def test_a_conv_net_on_cpu_runs_one_compiled_step_per_call(tmp_path):
    # XLA:CPU runs convolutions several times slower inside a loop (a scan of
    # steps): fit chooses a Python loop of compiled steps and records why
    import json

    _fit(tmp_path / "cnn", model=SmallCNN())
    _fit(tmp_path / "mlp")
    cnn = json.loads((tmp_path / "cnn" / "config.json").read_text())["execution"]
    mlp = json.loads((tmp_path / "mlp" / "config.json").read_text())["execution"]
    assert cnn["backend"] == "cpu"
    assert (cnn["scan"], cnn["steps_per_call"]) == (False, 1), cnn
    assert mlp["scan"] is True, mlp


def test_a_conv_net_resumes_to_the_same_bits(tmp_path):
    whole = _fit(tmp_path / "whole", model=SmallCNN(), steps=8)
    _fit(tmp_path / "parts", model=SmallCNN(), steps=4)
    with pytest.warns(UserWarning, match="resuming a 4-step run"):
        parts = _fit(tmp_path / "parts", model=SmallCNN(), steps=8)
    for a, b in zip(
        jax.tree.leaves(whole.variables), jax.tree.leaves(parts.variables), strict=True
    ):
        assert np.array_equal(a, b)


def test_os_errors_from_tensorstore_are_classified():
    from bnlab.train.rundir import os_error_kind

    gone = ValueError(
        'NOT_FOUND: Error opening "zarr" driver: Error writing "params.w/.zarray" in '
        'OCDBT database at local file "/x/checkpoints/100.orbax-checkpoint-tmp/"'
    )
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = gone
    assert os_error_kind(gone) == os_error_kind(wrapped) == "missing"
    assert os_error_kind(ValueError("NOT_FOUND: Error reading x")) is None
    # orbax's finalize of a save whose directory was deleted (seen in CI)
    finalize = ValueError(
        "Checkpoint directory does not exist: /x/checkpoints/100.orbax-checkpoint-"
        "tmp/state.orbax-checkpoint-tmp."
    )
    assert os_error_kind(finalize) == "missing"
    assert os_error_kind(ValueError("the checkpoint directory does not exist")) is None
    assert os_error_kind(OSError(28, "No space left on device")) == "disk_full"
    assert os_error_kind(PermissionError(13, "denied")) == "permission"
