"""How long a checkpoint blocks the training loop: ``fit``'s checkpointer
(integrity digests, orbax's standard layout) vs a plain orbax
``CheckpointManager`` save of the same state, in one run.

The state is one arm's as ``fit`` saves it: MLP kernels of the given size
(25M and 100M parameters) and SGD-momentum's trace of the same size, as
device arrays. Blocked = the time ``save`` takes before it returns (the loop
goes on after it); on disk = until the save is finished. Medians of
``--saves`` saves after a first one (which creates the directories); the two
checkpointers alternate.

    python -m benchmarks.checkpoint_blocking            # 25M and 100M
    python -m benchmarks.checkpoint_blocking --smoke    # 1M, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from benchmarks import common
from bnlab.train.checkpoint import Checkpointer


def state(params: int) -> dict:
    """Four square-ish kernels of ``params`` in all, and their momentum;
    a leading axis of one arm, as fit stacks arms."""
    width = int((params / 4) ** 0.5)
    kernels = {
        f"Dense_{i}": {"kernel": jnp.full((1, width, width), 0.01 * i, jnp.float32)}
        for i in range(4)
    }
    return {
        "params": kernels,
        "opt_state": jax.tree.map(jnp.zeros_like, kernels),
        "step": jnp.zeros((1,), jnp.int32),
    }


def measure(params: int, saves: int) -> dict:
    tree = state(params)
    jax.block_until_ready(tree)
    n = sum(a.size for a in jax.tree.leaves(tree["params"]))
    times = {"bnlab": [], "orbax": []}
    disk = {"bnlab": [], "orbax": []}
    with tempfile.TemporaryDirectory() as tmp:
        ours = Checkpointer(Path(tmp) / "bnlab", 2, 1)
        plain = ocp.CheckpointManager(
            Path(tmp).absolute() / "orbax",
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
            item_names=("state",),
        )
        for i in range(saves + 1):
            for name in ("bnlab", "orbax"):
                t0 = time.perf_counter()
                if name == "bnlab":
                    ours.save(i, tree, {"config": {}})
                else:
                    plain.save(
                        i, args=ocp.args.Composite(state=ocp.args.StandardSave(tree))
                    )
                t1 = time.perf_counter()
                ours.wait() if name == "bnlab" else plain.wait_until_finished()
                t2 = time.perf_counter()
                if i:
                    times[name].append(t1 - t0)
                    disk[name].append(t2 - t0)
        ours.close()
        plain.close()
    blocked = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "params": int(n),
        "bnlab_blocked_ms": blocked["bnlab"],
        "orbax_blocked_ms": blocked["orbax"],
        "ratio": blocked["bnlab"] / blocked["orbax"],
        "bnlab_on_disk_ms": 1e3 * statistics.median(disk["bnlab"]),
        "orbax_on_disk_ms": 1e3 * statistics.median(disk["orbax"]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sizes = (1_000_000,) if args.smoke else (25_000_000, 100_000_000)
    saves = 2 if args.smoke else args.saves
    dev = jax.devices()[0]
    device = f"{dev.platform}: {dev.device_kind}"
    rows = [{"device": device, **measure(n, saves)} for n in sizes]
    table = "\n".join(
        [
            "| device | parameters | bnlab blocked (ms) | orbax blocked (ms) | bnlab / "
            "orbax | bnlab on disk (ms) | orbax on disk (ms) |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['device']} | {r['params'] / 1e6:.0f}M | {r['bnlab_blocked_ms']:.1f} | "
                f"{r['orbax_blocked_ms']:.1f} | {r['ratio']:.2f} | "
                f"{r['bnlab_on_disk_ms']:.0f} | {r['orbax_on_disk_ms']:.0f} |"
                for r in rows
            ),
        ]
    )
    print(table)
    name = f"checkpoint_blocking_{dev.platform}" + ("_smoke" if args.smoke else "")
    common.write(
        name,
        common.metadata("checkpoint_blocking", saves=saves, smoke=args.smoke),
        rows,
        table,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
