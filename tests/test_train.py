"""The open trainer: your own model and data, arms, devices, exact resume,
standard orbax checkpoints, the presets on top."""

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import bnlab.linen
import bnlab.nnx
from bnlab import data
from bnlab.models import MLP
from bnlab.train import (
    ConfigError,
    NonFiniteError,
    fit,
    fit_config,
    load,
    load_config,
    make_arms,
)
from tests import fit_script
from tests.settled import no_stray_reads
from tests.test_multihost import ROOT, _free_port, run_processes


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's schedules mix int32 steps with Python floats, which the suite's
    # strict promotion (conftest) rejects; bnlab's own code runs strict.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def _assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), "not bit-identical"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


DIGITS = data.load("digits")


def _mlp(axis_name=None, **kw):
    norm = functools.partial(bnlab.linen.BatchNorm, axis_name=axis_name)
    return MLP(widths=(32, 32), num_outputs=10, norm=norm, **kw)


def _fit(workdir, **kw):
    args = {
        "optimizer": lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        "seeds": (0, 1),
        "hparams": {"lr": [0.05, 0.2]},
        "steps": 20,
        "batch_size": 32,
        "eval_every": 10,
    } | kw
    model = args.pop("model", None) or _mlp()
    return fit(model, args.pop("data", DIGITS), workdir, **args)


# ----------------------------------------------------------------- presets


def test_digits_preset_reaches_95_percent(tmp_path):
    fit_config(load_config("digits"), tmp_path)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_accuracy"] >= 0.95, last


@pytest.mark.parametrize(
    "spec,overrides,match",
    [
        (None, ["lrate=0.1"], "unknown config key 'lrate'"),
        (None, ["lr=fast"], "not a valid float"),
        (None, ["norm=middle"], "norm='middle' is not one of"),
        (None, ["steps=0"], "steps=0 must be >= 1"),
        ("nope", [], "neither a preset"),
        (None, ["dataset=synthetic", "model=cnn"], "use model='mlp'"),
        (None, ["width=1000000000"], "width=1000000000 is outside"),
        (None, ["depth=10000000"], "depth=10000000 is outside"),
        (None, ["width=60000", "depth=900"], "parameters"),
    ],
)
def test_config_errors_say_what_to_change(spec, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(spec, overrides)


def test_impossible_device_split_fails_before_any_work(tmp_path):
    config = load_config("digits", ["parallel=shard_map", "batch_size=100"])
    with pytest.raises(ConfigError, match="does not divide over 8 devices"):
        fit_config(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_preset_schedules_work_under_strict_promotion(schedule):
    # A user's code may run strict promotion; optax's schedules mix Python
    # floats with the int32 step count, which strict mode refuses.
    from bnlab.train.presets import build_optimizer

    config = load_config(
        "digits",
        [f"schedule={schedule}", "steps=40", "step_every=10", "warmup_steps=5"],
    )
    tx = build_optimizer(config)
    params = {"w": jnp.ones(3)}

    @jax.jit
    def step(opt_state):
        updates, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
        return updates["w"][0], opt_state

    state = tx.init(params)
    with jax.numpy_dtype_promotion("strict"):  # not this module's fixture
        for _ in range(40):
            update, state = step(state)
    assert jnp.isfinite(update)
    if schedule != "constant":  # the schedule has moved the step size
        assert abs(float(update)) < config.lr * 0.99


def test_json_config_file_and_type_errors(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.05, "depth": 2}))
    assert load_config(str(f)).depth == 2
    f.write_text(json.dumps({"depth": "two"}))
    with pytest.raises(ConfigError, match="depth='two' has type str; expected int"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    f.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(f))


def test_synthetic_regression_mse_and_no_accuracy(tmp_path):
    config = load_config(
        None,
        [
            "dataset=synthetic",
            "lr=0.01",
            "steps=300",
            "eval_every=300",
            "checkpoint_every=300",
        ],
    )
    fit_config(config, tmp_path)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_accuracy" not in last
    assert last["test_loss"] < 0.05  # noise variance is 0.01


# --------------------------------------------------------------- your model


def test_arms_are_seeds_times_hparams_in_order():
    arms = make_arms((0, 1, 2), {"lr": [0.1, 0.3]})
    assert [(a.seed, a.hparams["lr"]) for a in arms] == [
        (0, 0.1),
        (1, 0.1),
        (2, 0.1),
        (0, 0.3),
        (1, 0.3),
        (2, 0.3),
    ]
    arms = make_arms(4, [{"lr": 0.1, "wd": 0.0}, {"lr": 0.2, "wd": 1e-4}])
    assert [a.hparams for a in arms] == [
        {"lr": 0.1, "wd": 0.0},
        {"lr": 0.2, "wd": 1e-4},
    ]
    for bad, match in (
        ({"lr": 0.1}, "must be a list"),
        ({"lr": ["fast"]}, "must be a number"),
        ([{"lr": 0.1}, {"wd": 0.1}], "same keys"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            make_arms((0,), bad)
    with pytest.raises(ValueError, match="repeat a seed"):
        make_arms((0, 0), None)


def test_own_model_four_arms_records_and_result(tmp_path):
    r = _fit(tmp_path, validation=0.1)
    assert len(r.arms) == 4 and r.step == 20
    last = [rec for rec in r.records if rec["step"] == 20]
    assert [rec["arm"] for rec in last] == [0, 1, 2, 3]
    assert [(rec["seed"], rec["hparams"]["lr"]) for rec in last] == [
        (0, 0.05),
        (1, 0.05),
        (0, 0.2),
        (1, 0.2),
    ]
    for rec in last:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert np.isfinite(rec[key]), (key, rec)
        assert rec["test_accuracy"] > 0.3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"]["val"] == round(0.1 * len(DIGITS.x_train))
    steps, acc = r.curve("val_accuracy")
    assert steps.tolist() == [10, 20] and acc.shape == (2, 4)
    # each arm's variables drive the model directly
    logits = _mlp().apply(r.arm(3), DIGITS.x_test, train=False)
    acc3 = float(jnp.mean(jnp.argmax(logits, -1) == DIGITS.y_test))
    assert acc3 == pytest.approx(last[3]["test_accuracy"], abs=1e-6)


def test_arms_in_one_program_equal_arms_trained_alone(tmp_path):
    # Vmapping arms must not mix them: arm 3 (seed 1, lr 0.2) trained alone
    # gives the same parameters (to float32 rounding of a batched matmul).
    both = _fit(tmp_path / "all")
    alone = _fit(tmp_path / "one", seeds=(1,), hparams={"lr": [0.2]})
    np.testing.assert_allclose(
        _flat(alone.arm(0)), _flat(both.arm(3)), rtol=1e-5, atol=1e-6
    )


def test_validation_split_is_fixed_disjoint_and_seed_independent():
    ds = DIGITS.with_validation(0.2)
    again = DIGITS.with_validation(0.2)
    np.testing.assert_array_equal(ds.x_val, again.x_val)
    assert len(ds.x_train) + len(ds.x_val) == len(DIGITS.x_train)
    rows = {r.tobytes() for r in DIGITS.x_train.reshape(len(DIGITS.x_train), -1)}
    train = {r.tobytes() for r in ds.x_train.reshape(len(ds.x_train), -1)}
    val = {r.tobytes() for r in ds.x_val.reshape(len(ds.x_val), -1)}
    assert train | val <= rows and len(train & val) <= 2  # digits has duplicates
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="fraction"):
            DIGITS.with_validation(bad)


def test_nnx_model_trains_through_a_factory(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 32, use_bias=False, rngs=rngs)
            self.bn = bnlab.nnx.BatchNorm(32, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.l2 = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

    r = _fit(tmp_path, model=lambda rngs: Net(rngs), steps=40, eval_every=40)
    assert min(rec["test_accuracy"] for rec in r.records) > 0.5
    assert set(r.arm(0)) == {"params", "batch_stats", "rngs"}
    mean = r.arm(0)["batch_stats"]["bn"]["mean"]
    assert np.abs(mean).max() > 0  # running statistics were updated
    # the variables load back into the NNX model
    m = Net(nnx.Rngs(0))
    nnx.update(m, nnx.State({"bn": {"mean": nnx.BatchStat(jnp.asarray(mean))}}))
    with pytest.raises(TypeError, match="function that builds it"):
        _fit(tmp_path / "bad", model=Net(nnx.Rngs(0)))


def test_streamed_source_equals_arrays_in_memory(tmp_path):
    ds = DIGITS
    streamed = data.StreamingDataset(
        data.ArraySource(ds.x_train, ds.y_train),
        data.ArraySource(ds.x_test, ds.y_test),
        10,
    )

    class GrainLike:  # len + getitem only, e.g. a grain MapDataset of pairs
        def __len__(self):
            return len(ds.x_train)

        def __getitem__(self, i):
            return ds.x_train[i], ds.y_train[i]

    plain = data.StreamingDataset(GrainLike(), None, 10)
    a = _fit(tmp_path / "a", validation=0.2)
    b = _fit(tmp_path / "b", data=streamed, validation=0.2)
    c = _fit(tmp_path / "c", data=plain, validation=0.2)
    _assert_bit_identical(a.variables, b.variables)
    _assert_bit_identical(a.variables, c.variables)
    assert "test_accuracy" not in c.records[-1]


def test_custom_loss_and_metrics(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 5)).astype(np.float32)
    y = (x @ np.arange(5.0) + 3).astype(np.float32)
    ds = data.Dataset(x[:200], y[:200], x[200:], y[200:], num_classes=0)

    def huber(out, target):
        err = out[:, 0] - target
        return jnp.mean(optax.huber_loss(err)), {"mae": jnp.mean(jnp.abs(err))}

    model = MLP(widths=(16,), num_outputs=1, norm=bnlab.linen.BatchNorm)
    r = fit(
        model,
        ds,
        tmp_path,
        optimizer=optax.adam(0.01),
        steps=50,
        batch_size=20,
        loss=huber,
    )
    last = r.records[-1]
    assert {"train_mae", "test_mae", "test_loss"} <= set(
        last
    ) and "test_accuracy" not in last
    assert last["test_mae"] < r.records[0]["test_mae"]


def test_a_diverging_arm_stops_alone_and_is_named(tmp_path):
    model = MLP(
        widths=(32,),
        num_outputs=10,
        placement="none",
        init_scheme="normal",
        init_std=30.0,
    )
    with pytest.warns(
        RuntimeWarning, match=r"arm 1 \(seed 0, lr=1e\+30\).*NaN/Inf at step"
    ):
        r = _fit(
            tmp_path,
            model=model,
            seeds=(0,),
            hparams={"lr": [0.01, 1e30]},
            optimizer=lambda hp: optax.sgd(hp["lr"]),
            steps=30,
        )
    assert r.stopped_at[0] is None and r.stopped_at[1] is not None
    last = [rec for rec in r.records if rec["step"] == 30]
    assert last[0]["test_accuracy"] is not None and last[1]["test_accuracy"] is None
    assert last[1]["stopped_at"] == r.stopped_at[1]
    assert all(np.isfinite(_flat(r.arm(1))))  # kept its last finite state
    with pytest.raises(NonFiniteError, match="every arm"):
        _fit(
            tmp_path / "all",
            model=model,
            seeds=(0,),
            hparams={"lr": [1e30]},
            optimizer=lambda hp: optax.sgd(hp["lr"]),
            steps=30,
        )
    for step_dir in (tmp_path / "all" / "checkpoints").glob("*"):
        pytest.fail(
            f"a checkpoint was written for a run that only diverged: {step_dir}"
        )


def test_probe_train_kwargs_and_post_init(tmp_path):
    seen = []

    def probe(variables, hp):
        return {
            "lr": hp["lr"],
            "kernel_norm": jnp.linalg.norm(variables["params"]["Dense_0"]["kernel"]),
        }

    def post_init(variables, hp):
        seen.append(True)
        p = variables["params"]
        return {
            **variables,
            "params": {**p, "Dense_0": {"kernel": p["Dense_0"]["kernel"] * 0}},
        }

    r = _fit(tmp_path, probe=probe, post_init=post_init, eval_at_start=True)
    first = [rec for rec in r.records if rec["step"] == 0]
    assert [rec["probe"]["lr"] for rec in first] == pytest.approx(
        [0.05, 0.05, 0.2, 0.2]
    )
    assert all(rec["probe"]["kernel_norm"] == 0 for rec in first) and seen


# --------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "style,devices", [("auto", 8), ("auto", 2), ("shard_map", 8), ("pmap", 8)]
)
def test_eight_devices_give_the_numbers_of_one(tmp_path, style, devices):
    # Tolerance: float32 summation order differs between layouts (a batch
    # split over devices, arms batched differently); over 20 SGD steps the
    # parameters agree to ~1e-6 relative (measured 2.4e-7 absolute); 1e-5
    # relative to the largest parameter allows for other CPUs.
    axis = None if style == "auto" else "data"
    one = _fit(tmp_path / "one", devices=jax.devices()[:1])
    many = _fit(
        tmp_path / style,
        model=_mlp(axis_name=axis),
        parallel=style,
        devices=jax.devices()[:devices] if style != "pmap" else None,
    )
    a, b = _flat(one.variables), _flat(many.variables)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))
    for r1, r2 in zip(one.records, many.records, strict=True):
        assert r1["test_accuracy"] == pytest.approx(r2["test_accuracy"], abs=3e-3)


def test_layout_rule_and_explicit_mesh():
    from bnlab.train.layout import arms_layout

    assert (arms_layout(1, 128).arm_shards, arms_layout(1, 128).data_shards) == (1, 8)
    assert (arms_layout(16, 128).arm_shards, arms_layout(16, 128).data_shards) == (8, 1)
    assert (arms_layout(6, 128).arm_shards, arms_layout(6, 128).data_shards) == (2, 4)
    mesh = jax.make_mesh((4, 2), ("arms", "data"))
    assert arms_layout(8, 32, mesh=mesh).devices == 8
    with pytest.raises(ValueError, match="do not divide over the mesh's 4"):
        arms_layout(6, 32, mesh=mesh)
    with pytest.raises(ValueError, match="bn_group_size=3 does not divide"):
        arms_layout(1, 32, style="shard_map", bn_group_size=3)


# -------------------------------------------- resume, checkpoints, loading


@pytest.mark.slow  # a subprocess
def test_sigkill_at_a_seeded_step_then_resume_is_bit_identical(tmp_path):
    # A model that is not a preset (Flax's and bnlab's BN), 4 arms, killed at
    # a random evaluation (seeded, so a failure reproduces), resumed. The
    # child stops at that step (its records written, its newest checkpoint on
    # disk) and waits: the kill lands there, not wherever the run has got to.
    # Evaluations every 5 steps, checkpoints every 10: at a step between two
    # checkpoints, the resume rewrites the records after the last one.
    kill_at = 5 * random.Random(1234).randint(2, 11)
    ref, run = tmp_path / "ref", tmp_path / "killed"
    cmd = [sys.executable, "-m", "tests.fit_script"]
    every = ["--every", "5", "--checkpoint-every", "10"]
    subprocess.run(
        [*cmd, str(ref), *every], check=True, env=_env(), capture_output=True
    )
    err = tmp_path / "killed.stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [*cmd, str(run), *every, "--pause-at", str(kill_at)],
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    watchdog = threading.Timer(300, proc.kill)  # a hang ends the readline
    watchdog.start()
    try:
        said = proc.stdout.readline().strip()
        assert said == f"paused at {kill_at}", (said, err.read_text()[-3000:])
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    metrics = run / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 4 * kill_at // 5
    subprocess.run(
        [*cmd, str(run), *every], check=True, env=_env(), capture_output=True
    )
    a, b = load(ref), load(run)
    assert a.step == b.step == 60
    _assert_bit_identical(a.variables, b.variables)

    def strip(p):  # each (step, arm) once, the same values
        return [
            {k: v for k, v in json.loads(line).items() if k != "steps_per_sec"}
            for line in p.read_text().splitlines()
        ]

    assert strip(ref / "metrics.jsonl") == strip(metrics)


def test_checkpoints_restore_with_plain_orbax_by_name(tmp_path):
    r = _fit(tmp_path)
    path = tmp_path / "checkpoints" / "20" / "state"
    restored = ocp.StandardCheckpointer().restore(path)
    assert {"params", "batch_stats", "opt_state", "step", "rng"} <= set(restored)
    kernel = restored["params"]["Dense_0"]["kernel"]
    assert kernel.shape == (4, 64, 32)  # arms first
    np.testing.assert_array_equal(
        np.asarray(kernel), r.variables["params"]["Dense_0"]["kernel"]
    )
    np.testing.assert_array_equal(np.asarray(restored["step"]), [20] * 4)
    loaded = load(tmp_path)
    assert loaded.step == 20 and len(loaded.arms) == 4
    assert (loaded.arms[2].seed, loaded.arms[2].hparams) == (0, {"lr": 0.2})
    assert loaded.records == r.records  # one type for a run and its load
    _assert_bit_identical(loaded.arm(1), r.arm(1))
    assert load(tmp_path, step=10).step == 10
    with pytest.raises(FileNotFoundError, match="has no checkpoint 7"):
        load(tmp_path, step=7)


@pytest.fixture(scope="module")
def ten_steps(tmp_path_factory):
    work = tmp_path_factory.mktemp("ten_steps")
    _fit(work, steps=10)
    return work


def _flip(f, at=1 / 3):
    """Inverts the byte at fraction ``at`` of file ``f``."""
    raw = bytearray(f.read_bytes())
    raw[int(len(raw) * at)] ^= 0xFF
    f.write_bytes(bytes(raw))


def test_load_refuses_a_changed_byte(ten_steps, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(ten_steps, work)
    files = [
        f
        for f in (work / "checkpoints" / "10" / "state").rglob("*")
        if f.is_file() and "/d/" in str(f)
    ]
    _flip(max(files, key=lambda f: f.stat().st_size), at=0.5)
    with pytest.raises(
        ValueError, match=r"checkpoint 10 in .*(SHA-256|cannot be read)"
    ):
        load(work)


@pytest.mark.parametrize(
    "where, damage",
    [
        ("d", _flip),
        ("d", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
        ("d", lambda f: f.write_bytes(b"")),
        ("manifest.ocdbt", Path.unlink),
        ("_METADATA", lambda f: f.write_bytes(b"")),
    ],
    ids=["index_flipped", "index_truncated", "index_empty", "no_manifest", "no_tree"],
)
def test_load_of_damaged_files_fails_clearly_and_leaves_no_stray_reads(
    ten_steps, tmp_path, where, damage
):
    # The tree index (state/d/*, outside ocdbt.process_*) is read before any
    # array: damaging it fails every read, and orbax leaves the other reads
    # pending on a closed event loop unless bnlab settles them.
    work = tmp_path / "run"
    shutil.copytree(ten_steps, work)
    state = work / "checkpoints" / "10" / "state"
    (target,) = (state / where).iterdir() if where == "d" else (state / where,)
    damage(target)
    with (
        no_stray_reads(),
        pytest.raises(ValueError, match=r"checkpoint 10 in .* cannot be read: its"),
    ):
        load(work)


def test_resume_continues_where_an_uninterrupted_run_would(tmp_path):
    ref = _fit(tmp_path / "ref", steps=30)
    _fit(tmp_path / "run", steps=20)
    with pytest.warns(UserWarning, match="resuming a 20-step run with steps=30"):
        cont = _fit(tmp_path / "run", steps=30)
    _assert_bit_identical(ref.variables, cont.variables)


def test_a_foreign_config_is_refused_and_nothing_moves(tmp_path):
    _fit(tmp_path, steps=10)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    from bnlab.train import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="another run configuration"):
        _fit(tmp_path, steps=20, hparams={"lr": [0.05, 0.3]})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert not (tmp_path / "corrupt").exists()


# ------------------------------------------------------------ processes


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["auto", "shard_map"])
def test_two_processes_of_four_devices_equal_one_of_eight(tmp_path, parallel):
    ref = fit_script.run(tmp_path / "ref", 20, 10, parallel)
    port = _free_port()
    work = tmp_path / "multi"

    def args(i):
        return [
            str(work),
            "--steps",
            "20",
            "--every",
            "10",
            "--devices",
            "4",
            "--parallel",
            parallel,
            "--distributed",
            f"127.0.0.1:{port},2,{i}",
        ]

    run_processes("tests.fit_script", args, 2, timeout=300)
    multi = load(work)
    for i in range(4):
        np.testing.assert_allclose(
            _flat(multi.arm(i)), _flat(ref.arm(i)), rtol=1e-5, atol=1e-6
        )


def test_nothing_is_loaded_with_pickle(ten_steps, monkeypatch):
    # Loading a run and the shipped data never unpickles (a checkpoint or a
    # data file from elsewhere could run code).
    import pickle

    def refused(*args, **kwargs):
        raise AssertionError("unpickled")

    real_np_load = np.load

    def np_load(*args, allow_pickle=False, **kwargs):
        assert not allow_pickle, "np.load(allow_pickle=True)"
        return real_np_load(*args, allow_pickle=False, **kwargs)

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refused)
    monkeypatch.setattr(np, "load", np_load)
    assert load(ten_steps).step == 10
    assert len(data.load("digits").x_train) > 0


@pytest.mark.slow  # a subprocess
def test_warnings_of_a_clean_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(tmp_path, steps=10)
    assert Path(tmp_path / "config.json").exists()


def test_a_custom_batch_order_is_used_and_checked(tmp_path):
    # Non-i.i.d. batches (each batch from 2 classes), a pure function of
    # (seed, step): used as given, and resumable like the default order.
    y = DIGITS.y_train
    by_class = [np.flatnonzero(y == c) for c in range(10)]

    def two_classes(seed, step):
        rng = np.random.default_rng([seed, step])
        a, b = rng.choice(10, 2, replace=False)
        return np.concatenate(
            [rng.choice(by_class[a], 16), rng.choice(by_class[b], 16)]
        )

    r = _fit(tmp_path / "a", batch_order=two_classes, steps=10)
    again = _fit(tmp_path / "b", batch_order=two_classes, steps=10)
    _assert_bit_identical(r.variables, again.variables)
    plain = _fit(tmp_path / "c", steps=10)
    assert not np.array_equal(_flat(plain.variables), _flat(r.variables))
    with pytest.raises(ValueError, match="must return 32 integer example indices"):
        _fit(tmp_path / "bad", batch_order=lambda s, i: np.arange(5), steps=2)
