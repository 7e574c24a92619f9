"""Train-step throughput and memory: ResNet with bnlab BN vs Flax BN vs no BN.

One SGD-momentum train step (forward, backward, update, BN statistics) of
ResNet-20 on batch 128 of synthetic 32x32x3 images, or ResNet-50-style on
224x224x3 (``--model resnet50``, for GPUs). Images/s from the median step
time (runs interleaved, compile time apart) and peak memory from XLA's
compiled memory analysis (arguments + outputs + temporaries - aliased).
With ``--devices 8`` on CPU the step is data parallel under shard_map over 8
simulated devices with synced BN.

    python -m benchmarks.throughput                     # 1 device
    python -m benchmarks.throughput --devices 8         # 8 simulated CPU devices
    python -m benchmarks.throughput --smoke
"""

from __future__ import annotations

import os
import sys


def _early_devices() -> None:
    if "--devices" in sys.argv and "jax" not in sys.modules:
        n = sys.argv[sys.argv.index("--devices") + 1]
        if n != "1":
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "")
                + f" --xla_force_host_platform_device_count={n}"
            )


_early_devices()

import argparse  # noqa: E402
import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bnlab.linen  # noqa: E402
from benchmarks import common  # noqa: E402
from bnlab import parallel  # noqa: E402
from bnlab.models import ResNet20, ResNet50  # noqa: E402


class NoNorm(nn.Module):
    """Identity with BN's constructor signature (the 'no BN' baseline)."""

    use_running_average: bool | None = None
    scale_init: object = None
    dtype: object = None

    def __call__(self, x):
        return x


def norms(axis_name):
    return {
        "bnlab": functools.partial(bnlab.linen.BatchNorm, axis_name=axis_name),
        "flax": functools.partial(nn.BatchNorm, axis_name=axis_name),
        "no_bn": NoNorm,
    }


def make_step(model, tx, style, axis_name):
    def loss_fn(params, stats, x, y):
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, upd.get("batch_stats", stats)

    vg = parallel.value_and_grad(
        loss_fn, style=style, axis_name=axis_name, has_aux=True
    )

    def step(params, stats, opt, x, y):
        (loss, stats), grads = vg(params, stats, x, y)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss

    return step


def run(model_name: str, batch: int, image: int, reps: int, dtype=None) -> list[dict]:
    n_dev = jax.device_count()
    style = "shard_map" if n_dev > 1 else "single"
    axis = "batch" if n_dev > 1 else None
    x = jax.random.normal(jax.random.key(0), (batch, image, image, 3))
    if dtype is not None:
        x = x.astype(dtype)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    tx = optax.sgd(0.1, momentum=0.9)
    fns, rows = {}, []
    for name, norm in norms(axis).items():
        cls = ResNet20 if model_name == "resnet20" else ResNet50
        model = cls(num_outputs=10, norm=norm, dtype=dtype)
        v = model.init(jax.random.key(2), x[:2], train=False)
        params, stats = v["params"], v.get("batch_stats", {})
        opt = tx.init(params)
        step = make_step(model, tx, style, axis)
        args = (params, stats, opt, x, y)
        if n_dev > 1:
            mesh = jax.make_mesh((n_dev,), ("batch",))
            step = jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(P(), P(), P(), P("batch"), P("batch")),
                out_specs=(P(), P(), P(), P()),
            )
            rep = NamedSharding(mesh, P())
            args = (
                *jax.device_put((params, stats, opt), rep),
                *jax.device_put((x, y), NamedSharding(mesh, P("batch"))),
            )
        compiled, compile_s = common.compile_fn(step, *args)
        mem = compiled.memory_analysis()
        peak = None
        if mem is not None:
            peak = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            )
        fns[name] = (compiled, args)
        rows.append(
            {
                "impl": name,
                "model": model_name,
                "dtype": jnp.dtype(dtype or jnp.float32).name,
                "batch": batch,
                "image": image,
                "devices": n_dev,
                "compile_s": compile_s,
                "peak_bytes": peak,
                "temp_bytes": None if mem is None else mem.temp_size_in_bytes,
            }
        )
    med = common.time_interleaved(fns, reps)
    for r in rows:
        t = med[r["impl"]]
        r.update(
            step_ms=t * 1e3,
            images_per_s=batch / t,
            step_time_vs_flax=t / med["flax"],
            peak_vs_flax=None
            if r["peak_bytes"] is None
            else r["peak_bytes"]
            / next(q["peak_bytes"] for q in rows if q["impl"] == "flax"),
        )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| model | devices | impl | step ms | images/s | step time vs Flax BN | "
        "peak memory MiB | vs Flax |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        pv = "n/a" if r["peak_vs_flax"] is None else f"{r['peak_vs_flax']:.3f}x"
        out.append(
            f"| {r['model']} b{r['batch']} {r['image']}px | {r['devices']} | "
            f"{r['impl']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['step_time_vs_flax']:.3f}x | {peak} | {pv} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet50"))
    p.add_argument("--devices", default="1", help="simulated CPU devices (set first)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image", type=int, default=None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    p.add_argument(
        "--dtype",
        default="float32",
        help="activation dtype (bfloat16: mixed precision; BN statistics stay float32)",
    )
    args = p.parse_args(argv)
    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    image = args.image or (32 if args.model == "resnet20" else 224)
    batch = args.batch
    if args.smoke:
        batch, image = 16, 16 if args.model == "resnet20" else 32
    rows = run(args.model, batch, image, 2 if args.smoke else args.reps, dtype)
    md = table(rows)
    print(md)
    name = args.name or (
        f"throughput_{args.model}_smoke_{jax.device_count()}dev"
        if args.smoke
        else f"throughput_{args.model}_{jax.devices()[0].platform}_{jax.device_count()}dev"
    ) + ("" if dtype is None else f"_{jnp.dtype(dtype).name}")
    common.write(
        name,
        common.metadata(
            "throughput", model=args.model, smoke=args.smoke, dtype=args.dtype
        ),
        rows,
        md,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
