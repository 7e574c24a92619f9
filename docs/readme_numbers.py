"""The README's numbers, generated from the committed results.

    python docs/readme_numbers.py   # print the section between the README's
                                    # numbers:begin / numbers:end markers

tests/test_readme.py fails if the README's section differs from this output,
so every number there comes from a file a command wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "cpu"
BENCH = ROOT / "benchmarks" / "results"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _fmt(v) -> str:
    sys.path.insert(0, str(ROOT))
    from experiments.report import measured

    return measured(v)


def _reproduction() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from experiments.reproduce import EXPERIMENTS

    out = [
        "| experiment | verdict | what was measured (criterion) | time |",
        "|---|---|---|---|",
    ]
    counts: dict[str, int] = {}
    total = 0.0
    for name in EXPERIMENTS:
        f = RESULTS / name / "verdict.json"
        if not f.exists():
            continue
        v = _load(f)
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
        total += v["seconds"]
        if v["checks"]:
            c = v["checks"][0]
            what = f"{c['name']}: {_fmt(c['measured'])} ({c['criterion']})"
            if len(v["checks"]) > 1:
                what += f"; +{len(v['checks']) - 1} more"
        else:
            what = "reported, no criterion"
        what = what.replace("|", "\\|")  # inside a table cell
        out.append(
            f"| [{name}](experiments/results/cpu/REPORT.md#{name}) | "
            f"{v['verdict']} | {what} | {v['seconds']:.0f} s |"
        )
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return [
        f"Full CPU run (`bnlab reproduce --out experiments/results/cpu`, Fashion-MNIST, "
        f"3 seeds per arm, 2-core CPU): {summary}; {total / 60:.1f} min of "
        "experiment time in all.",
        "",
        *out,
    ]


def _speed() -> list[str]:
    op = _load(BENCH / "bn_op_cpu.json")
    acc = op["meta"]["accuracy_at_1e4"]
    lines = [
        f"- Exactness: max |y - y_float64| of a train-mode forward at mean 1e4, "
        f"std 1 (float32, fresh state): bnlab {acc['bnlab']:.1g}, Flax fast "
        f"variance {acc['flax_fast']:.2g}, Flax two-pass {acc['flax_two_pass']:.2g} "
        "(`python -m benchmarks.bn_op`).",
    ]
    labels = {
        "train_fwd": "train forward",
        "train_fwd_bwd": "train forward+backward",
        "eval_fwd": "eval forward",
    }
    for mode in labels:
        ratios = {}
        for r in op["rows"]:
            if r["mode"] == mode and r["impl"] in ("bnlab", "flax_fast"):
                ratios.setdefault((r["shape"], r["dtype"]), {})[r["impl"]] = r[
                    "median_ms"
                ]
        vals = sorted(d["bnlab"] / d["flax_fast"] for d in ratios.values())
        lines.append(
            f"- BN op on CPU, {labels[mode]}: bnlab / Flax fast "
            f"{vals[0]:.2f}x to {vals[-1]:.2f}x over {len(vals)} shapes and dtypes "
            "(per-call time, best of 3 rounds)."
        )
    deep = _load(BENCH / "deep_small_cpu.json")
    r = next(r for r in deep["rows"] if r["impl"] == "bnlab")
    lines.append(
        f"- 50 x (Dense 256 -> BN -> ReLU), one SGD step on CPU: bnlab / Flax "
        f"fast {r['ratio_to_flax_fast']:.2f}x (`python -m benchmarks.deep_small`)."
    )
    rn = _load(BENCH / "throughput_resnet20_cpu_1dev.json")
    r = next(r for r in rn["rows"] if r["impl"] == "bnlab")
    lines.append(
        f"- ResNet-20 train step (batch 128, CPU, 1 device): bnlab / Flax BN "
        f"{r['step_time_vs_flax']:.2f}x (`python -m benchmarks.throughput`)."
    )
    tl = _load(BENCH / "train_loop_cpu.json")["rows"][0]
    lines.append(
        f"- `bnlab.train.fit` (digits, evaluation and a checkpoint every 200 "
        f"steps) runs at {tl['fit_steps_per_sec']:.0f} steps/s, "
        f"{tl['ratio']:.2f}x a minimal jitted loop ({tl['minimal_steps_per_sec']:.0f} "
        "steps/s) (`python -m benchmarks.train_loop`)."
    )
    return lines


def render() -> str:
    return "\n".join([*_reproduction(), "", *_speed()]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
