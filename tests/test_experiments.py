"""The README's main command runs end to end (shortened)."""

import os
import subprocess
import sys

from tests.test_multihost import ROOT


def test_demo_runs_and_reports():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "--steps", "30"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "BN vs no BN at the same learning rate" in out
    assert out.count("final train loss") == 3
