"""Experiments: a smoke run of every experiment, the report, resuming after an
interruption with identical results, the demo."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from experiments import _harness as H
from experiments import reproduce
from experiments._models import MLP
from tests.test_multihost import ROOT


@pytest.fixture(autouse=True)
def _user_code_promotion():
    # Experiments are user code (optax mixes ints and floats, models rely on
    # rank broadcasting); the library itself is tested strict elsewhere.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        verdicts = reproduce.run(out, smoke=True, seeds=1, progress=None)
    return out, verdicts


def test_every_experiment_runs_and_writes_its_outputs(smoke):
    out, verdicts = smoke
    assert [v["experiment"] for v in verdicts] == list(reproduce.EXPERIMENTS)
    for v in verdicts:
        d = out / v["experiment"]
        if v["checks"]:
            assert v["verdict"] in ("PASS", "FAIL"), v["experiment"]
        else:  # a measurement the issues ask to report, without a criterion
            assert v["verdict"] == "REPORT" and v["table"], v["experiment"]
        assert json.loads((d / "verdict.json").read_text())["claim"] == v["claim"]
        lines = (d / "metrics.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line) is not None for line in lines)
        for fig in v["figures"]:
            assert (d / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    report = (out / "REPORT.md").read_text()
    page = (out / "REPORT.html").read_text()
    for v in verdicts:
        assert f"## {v['experiment']}: {v['verdict']}" in report
        assert f"id='{v['experiment']}'" in page
    n_figs = sum(len(v["figures"]) for v in verdicts)
    assert page.count("data:image/png;base64,") == n_figs  # self-contained


def test_a_second_run_recomputes_nothing(smoke):
    out, verdicts = smoke
    t0 = time.perf_counter()
    again = reproduce.run(out, smoke=True, seeds=1, progress=None)
    assert time.perf_counter() - t0 < 10
    assert again == verdicts
    with pytest.raises(Exception, match=r"holds a smoke run with 1 seeds"):
        reproduce.run(out, quick=True, seeds=1, progress=None)


def test_unknown_experiment_name_is_a_clear_error(tmp_path):
    from bnlab.train import ConfigError

    with pytest.raises(ConfigError, match=r"unknown experiment.*'nope'"):
        reproduce.run(tmp_path, smoke=True, only="nope", progress=None)


def _group(steps=12):
    return H.Group(
        name="g",
        model=MLP(widths=(16, 16), activation="relu", norm="before"),
        seeds=[0, 1, 0],
        hparams={"lr": [0.1, 0.1, 0.5]},
        make_tx=lambda hp: optax.sgd(hp["lr"], momentum=0.9),
        steps=steps,
        batch_size=32,
        eval_every=4,
    )


def test_an_interrupted_group_resumes_to_identical_results(tmp_path):
    ref = H.train_group(H.Context("t", tmp_path / "ref", True, 1), _group())
    calls = []

    def interrupt(done, total, label):
        calls.append(done)
        if done == 8:  # Ctrl-C after the second chunk's checkpoint
            raise KeyboardInterrupt

    ctx = H.Context("t", tmp_path / "run", True, 1, interrupt)
    with pytest.raises(KeyboardInterrupt):
        H.train_group(ctx, _group())
    resumed = H.train_group(H.Context("t", tmp_path / "run", True, 1), _group())
    assert calls == [4, 8]
    np.testing.assert_array_equal(resumed.test_accuracy, ref.test_accuracy)
    np.testing.assert_array_equal(resumed.train_loss, ref.train_loss)
    for a, b in zip(
        jax.tree.leaves(resumed.variables), jax.tree.leaves(ref.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_arms_in_one_program_equal_arms_trained_alone(tmp_path):
    # Vmapping arms must not mix them: arm 2 (seed 0, lr 0.5) trained alone
    # gives the same numbers as inside the group.
    both = H.train_group(H.Context("t", tmp_path / "all", True, 1), _group(8))
    alone = _group(8)
    alone.seeds, alone.hparams, alone.name = [0], {"lr": [0.5]}, "alone"
    one = H.train_group(H.Context("t", tmp_path / "one", True, 1), alone)
    np.testing.assert_allclose(
        one.test_accuracy[:, 0], both.test_accuracy[:, 2], atol=1e-6
    )
    np.testing.assert_allclose(one.train_loss[1:, 0], both.train_loss[1:, 2], rtol=1e-5)


def test_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)

    def cli(out):
        return [
            sys.executable,
            "-m",
            "bnlab",
            "reproduce",
            "--quick",
            "--seeds",
            "1",
            "--only",
            "placement",
            "--out",
            str(out),
            "--quiet",
        ]

    subprocess.run(
        cli(tmp_path / "ref"), env=env, check=True, capture_output=True, timeout=600
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        cli(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # kill in group 2
        if (run / "placement" / "before" / "checkpoints").is_dir() and any(
            p.name.isdigit()
            for p in (run / "placement" / "before" / "checkpoints").iterdir()
        ):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "finished before it was killed"
    assert not (run / "placement" / "verdict.json").exists()
    subprocess.run(cli(run), env=env, check=True, capture_output=True, timeout=600)

    def results(out):
        v = json.loads((out / "placement" / "verdict.json").read_text())
        return (
            v["checks"],
            v["table"],
            (out / "placement" / "metrics.jsonl").read_text(),
        )

    assert results(run) == results(tmp_path / "ref")


def test_demo_runs_and_reports(tmp_path):
    from experiments import demo

    out = tmp_path / "demo"
    assert demo.main(["--steps", "40", "--out", str(out)]) == 0
    assert (out / "no_BN" / "metrics.jsonl").exists()
