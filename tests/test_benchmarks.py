"""The benchmark scripts run (smoke mode, tiny shapes) and write sane rows.

No wall-clock assertions: smoke timings on a shared CPU say nothing about
speed. What is checked is that every row holds the columns the READMEs
quote, that every measured quantity is a positive finite number (a zero or
NaN time is a broken timer), that every ratio is the quotient of the rows it
names, and the measurements that are not timings (collective counts,
accuracy at mean 1e4).
"""

import doctest
import json
import math
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
        (["benchmarks.fit_vs_hand"], "fit_vs_hand_cpu_smoke"),
        (["benchmarks.checkpoint_blocking"], "checkpoint_blocking_cpu_smoke"),
    ],
)
def test_benchmark_scripts_run(args, stem, tmp_path):
    out = _run(args, tmp_path)
    assert "bnlab" in out or "fit" in out
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["rows"]
    assert result["meta"].get("smoke") is not False
    assert (tmp_path / f"{stem}.md").read_text().count("|") > 4
    check_rows(args[0].split(".")[1], result)


# Per script: the columns docs/readme_numbers.py and benchmarks/README.md quote.
QUOTED = {
    "bn_op": ("impl", "mode", "shape", "dtype", "median_ms", "ratio_to_bnlab"),
    "collectives": ("impl", "mode", "always", "conditional", "median_ms"),
    "throughput": ("impl", "step_ms", "images_per_s", "step_time_vs_flax"),
    "deep_small": ("impl", "ms_per_step", "ratio_to_flax_fast"),
    "train_loop": ("kind", "device"),
    "reductions": ("op", "ms", "vs_raw_moments"),
    "scan_steps": ("how", "s_per_step", "vs_python_loop"),
    "fit_vs_hand": ("kind", "model", "device", "ratio"),
    "checkpoint_blocking": ("params", "bnlab_blocked_ms", "orbax_blocked_ms", "ratio"),
}
# Measured quantities: positive and finite where present.
MEASURED = {
    "median_ms",
    "compile_s",
    "achieved_GBps",
    "copy_GBps",
    "step_ms",
    "images_per_s",
    "ms_per_step",
    "fit_steps_per_sec",
    "minimal_steps_per_sec",
    "one_program",
    "sequential",
    "blocked_ms",
    "on_disk_ms",
    "ms",
    "s_per_step",
    "hand_steps_per_sec",
    "hand_arm_steps_per_sec",
    "fit_arm_steps_per_sec",
    "bnlab_blocked_ms",
    "orbax_blocked_ms",
    "bnlab_on_disk_ms",
    "orbax_on_disk_ms",
}
# Memory statistics are not available on every backend: None or positive.
OPTIONAL = {"peak_bytes", "temp_bytes", "peak_vs_flax"}
# ratio column: (measured column, baseline row, columns that group rows)
RATIOS = {
    "ratio_to_bnlab": ("median_ms", {"impl": "bnlab"}, ("shape", "dtype", "mode")),
    "step_time_vs_flax": ("step_ms", {"impl": "flax"}, ()),
    "ratio_to_flax_fast": ("ms_per_step", {"impl": "flax_fast"}, ()),
    "vs_raw_moments": ("ms", {"op": "sum(x), sum(x*x) (Flax fast)"}, ()),
    "vs_python_loop": ("s_per_step", {"how": "python loop of jitted steps"}, ()),
}


def _positive(name, value):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), name
    assert math.isfinite(value) and value > 0, (name, value)


def check_rows(script, result):
    rows = result["rows"]
    for row in rows:
        missing = [c for c in QUOTED[script] if c not in row]
        assert not missing, (script, missing, row)
        checked = MEASURED | set(RATIOS) | {"ratio"}
        for name, value in row.items():
            if name in checked or (name in OPTIONAL and value is not None):
                _positive(name, value)
    for ratio, (column, base, group) in RATIOS.items():
        for row in (r for r in rows if ratio in r):
            (baseline,) = [
                r
                for r in rows
                if all(r[k] == v for k, v in base.items())
                and all(r.get(k) == row.get(k) for k in group)
            ]
            assert math.isclose(
                row[ratio], row[column] / baseline[column], rel_tol=1e-9
            ), (ratio, row, baseline)
    if script == "train_loop":
        (row,) = [r for r in rows if r["kind"] == "loop"]
        expected = row["fit_steps_per_sec"] / row["minimal_steps_per_sec"]
        assert math.isclose(row["ratio"], expected, rel_tol=1e-9)
        arms = [r for r in rows if r["kind"] == "arms"]
        assert arms and all(
            {"arms", "one_program", "sequential"} <= set(r) for r in arms
        )
        saves = [r for r in rows if r["kind"] == "checkpoint"]
        assert [r["arms"] for r in saves] == [1, 16]
        assert all(r["blocked_ms"] <= r["on_disk_ms"] for r in saves)
    if script == "collectives":
        # one all_gather forward, one psum backward, no branch (jaxpr counts)
        counts = {r["mode"]: r["always"] for r in rows if r["impl"] == "bnlab"}
        assert counts == {"fwd": 1, "fwd_bwd": 2}
        assert all(r["conditional"] == 0 for r in rows)
    if script == "bn_op":
        # the README's exactness line: bnlab exact, Flax's fast variance not
        accuracy = result["meta"]["accuracy_at_1e4"]
        assert accuracy["bnlab"] < 1e-5 < 1e-2 < accuracy["flax_fast"]


@pytest.mark.slow  # a subprocess
def test_jaxpr_tools_examples_run():
    # benchmarks/ is outside the doctest paths: run its analysis examples here.
    from benchmarks import jaxpr_tools

    result = doctest.testmod(jaxpr_tools)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "benchmarks" / "results").glob("*.json")),
    ids=lambda p: p.name,
)
def test_committed_results_hold_sane_rows(path):
    # The numbers the READMEs quote come from these files.
    script = next(s for s in QUOTED if path.name.startswith(s))
    check_rows(script, json.loads(path.read_text()))
