"""One process of the 2-process sync-BN check (run by test_multihost.py).

    python -m tests.multihost_worker PORT PROCESS_ID NUM_PROCESSES

Each process owns 4 CPU devices and half of a fixed global batch; BN statistics
are synchronised over all 8 devices with pmap and with shard_map, and compared
with the float64 full-batch statistics. Prints one JSON line; exit 0 iff exact.
"""

import json
import os
import sys

LOCAL_DEVICES = 4
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnlab  # noqa: E402

B, C = 64, 5


def main() -> int:
    port, pid, nproc = (int(a) for a in sys.argv[1:4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=nproc,
        process_id=pid,
        initialization_timeout=60,
    )
    assert jax.device_count() == nproc * LOCAL_DEVICES, jax.devices()
    rng = np.random.default_rng(0)
    x = (1e3 + rng.standard_normal((B, C))).astype(np.float32)
    per_proc = B // nproc
    x_local = x[pid * per_proc : (pid + 1) * per_proc]
    true_mean = x.astype(np.float64).mean(0)
    true_var = x.astype(np.float64).var(0)
    stats = bnlab.init_batch_stats(C)

    def bn(x, stats):
        return bnlab.batch_norm(x, stats, train=True, axis_name="batch", momentum=0.0)

    # pmap over this process's devices; the axis spans all processes' devices.
    _, s_pmap = jax.pmap(bn, axis_name="batch", in_axes=(0, None))(
        x_local.reshape(LOCAL_DEVICES, -1, C), stats
    )
    pmap_mean, pmap_var = np.asarray(s_pmap.mean), np.asarray(s_pmap.var)

    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    xg = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("batch")), x_local, (B, C)
    )
    f = jax.jit(
        jax.shard_map(
            bn, mesh=mesh, in_specs=(P("batch"), P()), out_specs=(P("batch"), P())
        )
    )
    _, s_sm = f(xg, jax.device_put(stats, NamedSharding(mesh, P())))
    sm_mean = np.asarray(s_sm.mean.addressable_data(0))
    sm_var = np.asarray(s_sm.var.addressable_data(0))

    def rel(a, b):
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))

    result = {
        "process": pid,
        "devices": jax.device_count(),
        "pmap_mean_rel": rel(pmap_mean, true_mean[None]),
        "pmap_var_rel": rel(pmap_var, true_var[None]),
        "shard_map_mean_rel": rel(sm_mean, true_mean),
        "shard_map_var_rel": rel(sm_var, true_var),
    }
    print(json.dumps(result), flush=True)
    ok = max(v for k, v in result.items() if k.endswith("_rel")) < 1e-5
    jax.distributed.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
