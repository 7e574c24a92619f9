"""The generated sections of docs/reproduction.md, from the committed results.

    python docs/readme_numbers.py          # rewrite docs/reproduction.md's sections
    python docs/readme_numbers.py --check  # exit 1 if they differ

Sections: between ``<!-- quick:begin -->`` / ``<!-- quick:end -->`` the
transcript of the committed quick run (``experiments/results/quick/``, as
``bnlab reproduce --quick`` printed it); between ``numbers:begin`` /
``numbers:end`` the confirmatory full run's outcomes
(``experiments/results/full/``) and the quick runs' agreement with it (the
committed quick run and ``experiments/results/quick-<first seed>/``); between ``benchmarks:begin`` / ``benchmarks:end`` the benchmarks.
tests/test_docs.py fails if the guide differs from this output, so every
number there comes from a file a command wrote. (The README quotes none of
them, so re-running an experiment never rewrites it.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "full"
QUICK = ROOT / "experiments" / "results" / "quick"
# quick runs with more fresh seeds (--first-seed N --out .../quick-N)
REPLICAS = sorted((ROOT / "experiments" / "results").glob("quick-[0-9]*"))
BENCH = ROOT / "benchmarks" / "results"
GUIDE = ROOT / "docs" / "reproduction.md"
# the full run's report, as a link from the guide
REPORT_LINK = os.path.relpath(RESULTS / "REPORT.md", GUIDE.parent)
if str(ROOT) not in sys.path:  # experiments/ is imported from the tree
    sys.path.insert(0, str(ROOT))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _verdicts(directory: Path) -> list[dict]:
    from experiments.reproduce import EXPERIMENTS

    return [
        _load(directory / name / "verdict.json")
        for name in EXPERIMENTS
        if (directory / name / "verdict.json").exists()
    ]


def quick_transcript() -> str:
    """What ``bnlab reproduce --quick`` printed (stdout) for the committed
    quick run, rebuilt from its verdicts by the same functions."""
    from experiments.report import tally
    from experiments.reproduce import summary_line

    verdicts = _verdicts(QUICK)
    if not verdicts:
        return "No quick run is committed yet."
    width = max(len(v["experiment"]) for v in verdicts)
    lines = [summary_line(v, width, f"{v['seconds']:.0f} s") for v in verdicts]
    total = sum(v["seconds"] for v in verdicts)
    lines.append(
        f"{tally(verdicts)} in {total:.0f} s; report: "
        "runs/reproduce-quick/REPORT.md (and REPORT.html)"
    )
    commit = str(verdicts[0].get("provenance", {}).get("commit"))[:10]
    seeds = verdicts[0]["seeds"]
    return "\n".join(
        [
            f"Committed quick run (seeds {seeds[0]}-{seeds[-1]}, commit {commit}, "
            f"{verdicts[0]['environment']['machine']}; {total / 60:.1f} min of "
            "experiments):",
            "",
            "```",
            *lines,
            "```",
        ]
    )


def _first_check(v: dict) -> dict:
    """The check that decides the claim's outcome (the first with it)."""
    return next(
        (c for c in v["checks"] if c["outcome"]["outcome"] == v["verdict"]),
        v["checks"][0],
    )


def _reproduction() -> list[str]:
    from experiments.report import measured, outcome_text

    out = [
        "| experiment | outcome | seeds | deciding check: measured [95% interval] "
        "(criterion) | registration | time |",
        "|---|---|---|---|---|---|",
    ]
    from experiments.reproduce import EXPERIMENTS

    verdicts = _verdicts(RESULTS)
    if not verdicts:
        return [
            "No confirmatory full run is committed yet: the designs are registered "
            "in `experiments/registry.json`; `bnlab reproduce --out "
            "experiments/results/full` runs them on the registered seeds."
        ]
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
        if v["checks"]:
            c = _first_check(v)
            what = (
                f"{c['quantity']}: {measured(c['measured'])} ({c['criterion']}): "
                f"{outcome_text(c['outcome'])}"
            )
            if len(v["checks"]) > 1:
                ok = sum(x["pass"] for x in v["checks"])
                what += f"; {ok}/{len(v['checks'])} checks supported"
        else:
            what = "reported, no criterion"
        what = what.replace("|", "\\|")  # inside a table cell
        name = v["experiment"]
        r = v.get("registration") or {}
        reg = r.get("status", "-")
        if r.get("registered_at"):  # which registration: the time it was written
            reg += f", registered {r['registered_at'][:16].replace('T', ' ')}Z"
        out.append(
            f"| [{name}]({REPORT_LINK}#{name}) | {v['verdict'].replace('_', ' ')} | "
            f"{len(v['seeds'])} | {what} | {reg} | {v['seconds']:.0f} s |"
        )
    summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items()))
    total = sum(v["seconds"] for v in verdicts)
    first = verdicts[0]
    commits = sorted(
        {str(v.get("provenance", {}).get("commit"))[:10] for v in verdicts}
    )
    commit = ("commits " if len(commits) > 1 else "commit ") + ", ".join(commits)
    lo = min(v["seeds"][0] for v in verdicts)
    hi = max(v["seeds"][-1] for v in verdicts)
    todo = [n for n in EXPERIMENTS if n not in {v["experiment"] for v in verdicts}]
    pending = (
        [
            "",
            f"Not finished yet ({len(todo)} of {len(EXPERIMENTS)}; the same command "
            f"resumes): {', '.join(todo)}.",
        ]
        if todo
        else []
    )
    return [
        f"Confirmatory full run (`bnlab reproduce --out experiments/results/full`, "
        f"Fashion-MNIST, the registered seeds {lo}-{hi}, {commit}, "
        f"{first['environment']['machine']}): {summary}; {total / 60:.1f} min of "
        "experiment time in all.",
        "",
        *out,
        *pending,
    ]


def _agreement() -> list[str]:
    """Each claim's outcome in the full run next to each quick run's (the
    committed one and the fresh-seed replicas), and the checks SUPPORTED at
    one scale and CONTRADICTED at the other (there must be none)."""
    from experiments.report import conflicts
    from experiments.reproduce import EXPERIMENTS

    runs = [("full", RESULTS), ("quick", QUICK), *((d.name, d) for d in REPLICAS)]
    found = {label: {v["experiment"]: v for v in _verdicts(d)} for label, d in runs}
    heads = []
    for label, _ in runs:
        seeds = sorted({s for v in found[label].values() for s in v["seeds"]})
        span = f"seeds {seeds[0]}-{seeds[-1]}" if seeds else "not run"
        heads.append(f"{label.replace('quick-', 'quick ')} ({span})")
    out = [
        "Quick vs full (`bnlab reproduce --quick --first-seed N --out "
        "experiments/results/quick-N` wrote each replica): a quick run may be "
        "INCONCLUSIVE where the full run decides (fewer, smaller images), but no "
        "check may be SUPPORTED at one scale and CONTRADICTED at the other.",
        "",
        "| experiment | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for name in EXPERIMENTS:
        cells = [
            found[label].get(name, {}).get("verdict", "-").replace("_", " ")
            for label, _ in runs
        ]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    bad = conflicts({label: list(found[label].values()) for label, _ in runs})
    out += [
        "",
        "Checks SUPPORTED in one run and CONTRADICTED in another: "
        + ("; ".join(bad) if bad else "none")
        + ".",
    ]
    return out


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
    rows = _load(BENCH / "train_loop_cpu.json")["rows"]
    tl = next(r for r in rows if r["kind"] == "loop")
    lines.append(
        f"- `bnlab.train.fit` (digits preset, evaluation and a checkpoint every 200 "
        f"steps) runs at {tl['fit_steps_per_sec']:.0f} steps/s, "
        f"{tl['ratio']:.2f}x a minimal jitted loop ({tl['minimal_steps_per_sec']:.0f} "
        "steps/s) (`python -m benchmarks.train_loop`)."
    )
    arms = [r for r in rows if r["kind"] == "arms"]
    lines.append(
        "- Arms as one program vs one `fit` per arm (arm-steps/s, compilation "
        "included): "
        + ", ".join(
            f"{r['arms']} arm{'s' * (r['arms'] > 1)} "
            f"{r['one_program'] / r['sequential']:.1f}x"
            for r in arms
        )
        + "."
    )
    saves = [r for r in rows if r["kind"] == "checkpoint"]
    lines.append(
        "- A checkpoint blocks the training loop "
        + ", ".join(
            f"{r['blocked_ms']:.0f} ms ({r['arms']} arm{'s' * (r['arms'] > 1)})"
            for r in saves
        )
        + " (digests and orbax's synchronous part); orbax finishes writing in the "
        "background, on disk after "
        + ", ".join(f"{r['on_disk_ms']:.0f} ms" for r in saves)
        + "."
    )
    return lines


def render() -> str:
    """The full run's verdicts and the quick runs' agreement with it."""
    return "\n".join([*_reproduction(), "", *_agreement()]) + "\n"


def benchmarks() -> str:
    return "\n".join(_speed()) + "\n"


SECTIONS = {"quick": quick_transcript, "numbers": render, "benchmarks": benchmarks}


def rewrite(text: str) -> str:
    """``text`` with every generated section replaced by its render."""
    import re

    for name, fn in SECTIONS.items():
        body = fn()
        if not body.endswith("\n"):
            body += "\n"
        text = re.sub(
            rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)",
            lambda m, body=body: m.group(1) + body + m.group(2),
            text,
            flags=re.S,
        )
    return text


if __name__ == "__main__":
    text = GUIDE.read_text()
    new = rewrite(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else 1)
    GUIDE.write_text(new)
