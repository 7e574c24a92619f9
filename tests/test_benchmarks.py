"""The benchmark scripts run (smoke mode, tiny shapes); no timing assertions."""

import doctest
import json
import os
import subprocess
import sys

import pytest

from tests.test_multihost import ROOT


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", *args, "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,stem",
    [
        (["benchmarks.bn_op"], "bn_op_smoke"),
        (["benchmarks.collectives"], "collectives_smoke"),
        (["benchmarks.throughput"], "throughput_resnet20_smoke_1dev"),
        (
            ["benchmarks.bn_op", "--device-time", "3", "--impls", "flax_fast"],
            "bn_op_smoke",
        ),
        (
            ["benchmarks.deep_small", "--device-time", "3"],
            "deep_small_cpu_device_smoke",
        ),
        (["benchmarks.train_loop"], "train_loop_cpu_smoke"),
        (["benchmarks.reductions"], "reductions_cpu_smoke"),
        (["benchmarks.scan_steps"], "scan_steps_cpu_smoke"),
    ],
)
def test_benchmark_scripts_run(args, stem, tmp_path):
    out = _run(args, tmp_path)
    assert "bnlab" in out or "fit" in out
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["rows"]
    assert result["meta"].get("smoke") is not False
    assert (tmp_path / f"{stem}.md").read_text().count("|") > 4


def test_jaxpr_tools_examples_run():
    # benchmarks/ is outside the doctest paths: run its analysis examples here.
    from benchmarks import jaxpr_tools

    result = doctest.testmod(jaxpr_tools)
    assert result.attempted >= 2 and result.failed == 0
