"""Nothing lost, nothing silently wrong: faults injected into checkpoints,
metrics and run directories, two runs on one workdir, disk full."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnlab import train
from bnlab.train import (
    Checkpointer,
    CheckpointMismatchError,
    DiskFullError,
    RunDirError,
    load_config,
    rundir,
)
from tests.test_multihost import ROOT

SHORT = ["steps=30", "checkpoint_every=10", "eval_every=10", "schedule=constant"]


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax mixes ints and floats
        yield


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _cli(workdir, *args):
    return [sys.executable, "-m", "bnlab", "train", "--workdir", str(workdir), *args]


def _target(config):
    from bnlab import data as bn_data

    ds = bn_data.load(config.dataset, seed=config.seed)
    model = train.build_model(config, ds.num_classes, None)
    return train.init_state(config, model, train.build_optimizer(config), ds.x_train)


def _restore(workdir, config):
    ckpt = Checkpointer(workdir / "checkpoints", 3)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ckpt.restore_latest(_target(config))
        return out, [str(w.message) for w in caught]
    finally:
        ckpt.close()


def _rewrite_item(workdir, step, edit):
    """Re-saves checkpoint ``step`` with ``edit(arrays, meta)`` applied: what
    a bit flip that still decodes, or a hand-edited meta, looks like."""
    ckpt = Checkpointer(workdir / "checkpoints", 3)
    arrays, meta = ckpt._read(step)
    ckpt.close()
    edit(arrays, meta)
    shutil.rmtree(workdir / "checkpoints" / str(step))
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(create=True),
        item_names=("state",),
    )
    item = {
        "arrays": arrays,
        "meta_json": np.frombuffer(json.dumps(meta).encode(), np.uint8),
    }
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(item)))
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 30-step digits run with checkpoints at 10, 20, 30 (copied per test)."""
    work = tmp_path_factory.mktemp("trained") / "run"
    with jax.numpy_dtype_promotion("standard"):
        train.fit(load_config("digits", SHORT), work)
    return work


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


# ------------------------------------------------------- checkpoint contents


def test_a_changed_value_that_still_decodes_is_caught_by_its_digest(run_copy):
    def flip(arrays, meta):
        a = arrays["float32"]
        a.view(np.uint32)[7] ^= 1 << 3  # one bit of one parameter

    _rewrite_item(run_copy, 30, flip)
    (state, meta), msgs = _restore(run_copy, load_config("digits", SHORT))
    assert meta["step"] == 20
    assert (run_copy / "corrupt" / "30").is_dir()
    assert any("SHA-256" in m and "30" in m for m in msgs), msgs


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_flipped_bytes_on_disk_never_restore_silently(run_copy, where):
    files = [
        f
        for f in (run_copy / "checkpoints" / "30").rglob("*")
        if f.is_file() and "/d/" in str(f)
    ]
    big = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(big.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    big.write_bytes(bytes(data))
    (state, meta), msgs = _restore(run_copy, load_config("digits", SHORT))
    assert meta["step"] == 20, "a changed checkpoint was restored"
    assert (run_copy / "corrupt" / "30").is_dir()
    assert any("step 30" in m for m in msgs), msgs


@pytest.mark.parametrize(
    "edit",
    [
        lambda a, m: m.pop("config"),
        lambda a, m: m.update(data_position=7),
        lambda a, m: m.update(step=99),
        lambda a, m: m.update(format=1),
    ],
    ids=["no_config", "data_position", "step", "format"],
)
def test_inconsistent_meta_is_set_aside_not_a_crash(run_copy, edit):
    _rewrite_item(run_copy, 30, edit)
    (state, meta), msgs = _restore(run_copy, load_config("digits", SHORT))
    assert meta["step"] == 20 and (run_copy / "corrupt" / "30").is_dir(), msgs


def test_a_checkpoint_of_another_model_stops_and_moves_nothing(run_copy, monkeypatch):
    # A code change: same config, one more layer. Readable but mismatched is
    # not corrupt: stop, name the leaves, keep every file where it is.
    import bnlab.train.loop as loop_mod

    def wider(config, *args):
        model = train.build_model(config, *args)
        return model.clone(widths=(128, 128, 128, 64))

    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    monkeypatch.setattr(loop_mod, "build_model", wider)
    with pytest.raises(CheckpointMismatchError, match=r"not in the checkpoint"):
        train.fit(load_config("digits", [*SHORT, "steps=40"]), run_copy)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before
    assert not (run_copy / "corrupt").exists()


def test_resuming_with_fewer_steps_changes_no_file(run_copy):
    files = {p: p.read_bytes() for p in run_copy.glob("*.json*")}
    with pytest.warns(UserWarning, match="already holds step 30 >= steps=20"):
        state = train.fit(load_config("digits", [*SHORT, "steps=20"]), run_copy)
    assert int(state.step) == 30
    assert {p: p.read_bytes() for p in run_copy.glob("*.json*")} == files


def test_resuming_on_another_device_count_warns(run_copy, monkeypatch):
    import bnlab.train.loop as loop_mod

    monkeypatch.setattr(loop_mod, "_devices", lambda: {"devices": 4, "processes": 1})
    train.fit(load_config("digits", [*SHORT, "steps=31"]), run_copy)  # single: same
    work = run_copy.parent / "jit"
    config = load_config("digits", [*SHORT, "parallel=jit", "steps=10"])
    monkeypatch.undo()
    train.fit(config, work)
    monkeypatch.setattr(loop_mod, "_devices", lambda: {"devices": 4, "processes": 1})
    with pytest.warns(UserWarning, match="reductions run in another order"):
        train.fit(config.replace(steps=11), work)


# ----------------------------------------------------------- metrics file


def test_a_torn_last_record_is_dropped_with_a_warning(run_copy):
    path = run_copy / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 40, "train_lo')
    with pytest.warns(RuntimeWarning, match="line 4 is not a valid record"):
        train.fit(load_config("digits", [*SHORT, "steps=40"]), run_copy)
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_nan_metrics_are_written_as_null(tmp_path):
    path = tmp_path / "m.jsonl"
    rundir.append_record(path, {"step": 1, "loss": float("nan"), "x": [float("inf")]})
    assert json.loads(path.read_text()) == {"step": 1, "loss": None, "x": [None]}


def test_sigkill_during_the_metrics_rewrite_never_loses_records(tmp_path):
    # A child rewrites a large metrics file back and forth between two
    # versions; killed at random moments, the file is always one of them.
    path = tmp_path / "metrics.jsonl"
    a = [{"step": i, "v": "a" * 200} for i in range(20000)]
    b = [{"step": i, "v": "b" * 200} for i in range(20000)]
    rundir.rewrite_records(path, a)
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from bnlab.train import rundir
        a = [{{"step": i, "v": "a" * 200}} for i in range(20000)]
        b = [{{"step": i, "v": "b" * 200}} for i in range(20000)]
        print("ready", flush=True)
        while True:
            rundir.rewrite_records(Path({str(path)!r}), b)
            rundir.rewrite_records(Path({str(path)!r}), a)
        """
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.6)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        got = rundir.read_records(path)
        assert got in (a, b), f"{len(got)} records after a kill"


# ------------------------------------------------------- run directories


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    work = tmp_path / "run"
    first = subprocess.Popen(
        _cli(work, "--config", "digits", "--quiet", "--steps", "100000"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / "config.json").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run(
            _cli(work, "--config", "digits", "--quiet", "--steps", "100000"),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 4, second.stderr
        assert f"in use by another bnlab run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the dead run's lock: nothing stale blocks a resume.
    with rundir.lock_run_dir(work):
        pass


@pytest.mark.parametrize("blocker", ["checkpoints", "metrics.jsonl", "workdir"])
def test_unusable_run_directories_fail_before_any_work(tmp_path, blocker):
    work = tmp_path / "run"
    if blocker == "workdir":
        work.write_text("a file")
    else:
        work.mkdir()
        target = work / blocker
        target.mkdir() if blocker == "metrics.jsonl" else target.write_text("x")
    t0 = time.perf_counter()
    with pytest.raises(RunDirError, match="not a"):
        train.fit(load_config("digits", SHORT), work)
    assert time.perf_counter() - t0 < 10  # fails before training


def test_disk_full_is_one_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    # A real full disk: a 2 MB tmpfs holds a few checkpoints, then runs out.
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if mounted.returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = subprocess.run(
            _cli(
                mnt / "run",
                "--config",
                "digits",
                "--quiet",
                "--steps",
                "400",
                "--checkpoint-every",
                "10",
                "--set",
                "keep_checkpoints=100",
            ),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 6, run.stderr[-2000:]
        assert "disk full" in run.stderr or "No space" in run.stderr
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        ckpt = Checkpointer(mnt / "run" / "checkpoints", 100)
        try:
            assert ckpt.all_steps(), "earlier checkpoints were lost"
        finally:
            ckpt.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_while_writing_metrics(tmp_path, monkeypatch):
    real_open = open

    def full(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(DiskFullError, match="No space left"):
        rundir.append_record(tmp_path / "metrics.jsonl", {"step": 1})


# -------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["--set", "lr=inf"], 2, "lr=inf is outside its valid range"),
        (["--set", "nope=1"], 2, "unknown config key"),
        (
            ["--config", "fashion_cnn", "--set", "data_dir=/nonexistent"],
            5,
            "data_dir /nonexistent lacks",
        ),
    ],
)
def test_cli_expected_failures_are_one_line_with_their_exit_code(
    tmp_path, args, code, match
):
    run = subprocess.run(
        _cli(tmp_path / "run", "--quiet", *args),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == code, run.stderr
    assert match in run.stderr and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("bnlab ")]
    assert len(errors) == 1, run.stderr


def test_cli_help_version_presets_and_print_config():
    def cli(*a):
        return subprocess.run(
            [sys.executable, "-m", "bnlab", *a],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert cli("--version").stdout.startswith("bnlab ")
    help_text = cli("train", "--help").stdout
    assert "``" not in help_text and "bn_momentum" in help_text
    assert "digits_sigmoid" in help_text and "exit codes" in help_text
    assert "fashion_cnn" in cli("train", "--list-presets").stdout
    printed = json.loads(cli("train", "--print-config", "--set", "lr=0.3").stdout)
    assert printed["lr"] == 0.3
