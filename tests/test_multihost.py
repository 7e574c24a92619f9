"""Sync BN over 2 processes x 4 CPU devices with jax.distributed (gloo)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(module: str, args_for, n: int, timeout: float = TIMEOUT_S):
    """Starts n processes; returns [(rc, stdout, stderr)] or fails clearly.

    A process that fails makes the others pointless (they would block in a
    collective), so on the first failure or at the deadline all are killed.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args_for(i))],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + timeout
    reason = None
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            reason = "a process failed"
            break
        if time.monotonic() > deadline:
            reason = f"timed out after {timeout:.0f}s"
            break
        time.sleep(0.2)
    if reason:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [(p.wait(), *p.communicate()) for p in procs]
    if reason or any(rc != 0 for rc, _, _ in outs):
        report = "\n".join(
            f"--- process {i} rc={rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
            for i, (rc, out, err) in enumerate(outs)
        )
        pytest.fail(
            f"multi-process run failed ({reason or 'non-zero exit'}):\n{report}"
        )
    return outs


@pytest.mark.slow
def test_two_processes_sync_bn_over_all_devices():
    port = _free_port()
    outs = run_processes("tests.multihost_worker", lambda i: (port, i, 2), 2)
    for _rc, out, _ in outs:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["devices"] == 8
        for key in (
            "pmap_mean_rel",
            "pmap_var_rel",
            "shard_map_mean_rel",
            "shard_map_var_rel",
        ):
            assert result[key] < 1e-5, result


@pytest.mark.slow
def test_a_failing_process_ends_the_run_quickly_and_clearly():
    port = _free_port()
    # process 1 gets an impossible id: it fails at once, process 0 would wait
    # for it forever in initialize(); the runner must kill it and say why
    # (a hang would end at the runner's deadline with "timed out" instead).
    with pytest.raises(pytest.fail.Exception, match="a process failed"):
        run_processes("tests.multihost_worker", lambda i: (port, 7 * i, 2), 2)
