"""REPORT.md and a self-contained REPORT.html from the experiments' verdicts."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["write"]


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3g}"
    return f"{v:.4g}"


def measured(v: Any) -> str:
    """Compact text of a measured value (numbers, lists, dicts)."""
    if isinstance(v, dict):
        return "; ".join(f"{k}: {measured(x)}" for k, x in v.items())
    if isinstance(v, list):
        if len(v) > 8:
            return "[" + ", ".join(measured(x) for x in v[:8]) + ", ...]"
        return "[" + ", ".join(measured(x) for x in v) + "]"
    if isinstance(v, (int, float)) or v is None:
        return _num(v)
    return str(v)


def _discussion(name: str, quick: bool) -> str:
    """The experiment module's ``DISCUSSION`` of its full-run result (full
    reports only): what we think explains a FAIL."""
    if quick:
        return ""
    import importlib

    text = getattr(importlib.import_module(f"experiments.{name}"), "DISCUSSION", "")
    return " ".join(text.split())


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a bare ``|`` would end the cell)."""
    return str(text).replace("|", "\\|")


def _table_md(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(map(_cell, cols)) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append(
            "| " + " | ".join(_cell(measured(r.get(c, ""))) for c in cols) + " |"
        )
    return "\n".join(out)


def _table_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(measured(r.get(c, '')))}</td>" for c in cols)
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdicts(out: Path) -> list[dict]:
    from experiments.reproduce import EXPERIMENTS, OPTIONAL

    found = []
    for name in EXPERIMENTS + OPTIONAL:
        f = out / name / "verdict.json"
        if f.exists():
            found.append(json.loads(f.read_text()))
    return found


def _throughput(verdicts: list[dict]) -> dict:
    arms = sum(t["arms"] for v in verdicts for t in v.get("training", []))
    arm_steps = sum(
        t["arms"] * t["steps"] for v in verdicts for t in v.get("training", [])
    )
    secs = sum(t["seconds"] for v in verdicts for t in v.get("training", []))
    return {"arms": arms, "arm_steps": arm_steps, "seconds": secs}


def write(out: Path, quick: bool, seeds: int, wall_seconds: float) -> tuple[Path, Path]:
    """Writes ``out/REPORT.md`` and ``out/REPORT.html``; returns both paths."""
    verdicts = _verdicts(out)
    env = verdicts[0]["environment"] if verdicts else {}
    tp = _throughput(verdicts)
    command = (
        f"bnlab reproduce{' --quick' if quick else ''} --seeds {seeds} --out {out}"
    )
    exp_seconds = sum(v.get("seconds", 0.0) for v in verdicts)
    head = [
        "# bnlab reproduce: Batch Normalization's claims, tested",
        "",
        f"- Command: `{command}`",
        f"- Scale: {'quick (embedded data: digits, wine, synthetic)' if quick else 'full (Fashion-MNIST)'}, {seeds} seeds per arm",
        f"- Date: {env.get('date', '?')}; device: {env.get('device', '?')}; machine: {env.get('machine', '?')}",
        f"- Versions: Python {env.get('python', '?')}, jax {env.get('jax', '?')}, flax {env.get('flax', '?')}, bnlab {env.get('bnlab', '?')}",
        f"- Time: this invocation {wall_seconds:.0f} s; the experiments' own runs "
        f"{exp_seconds:.0f} s in all (an experiment resumed or skipped counts the run that finished it)",
        (
            f"- Training throughput: {tp['arms']} arms trained as vmapped programs, "
            f"{tp['arm_steps'] / max(tp['seconds'], 1e-9):,.0f} arm-steps/s "
            f"({tp['arms'] / max(tp['seconds'], 1e-9) * 60:.1f} arms/min) over "
            f"{tp['seconds']:.0f} s of training"
            if tp["seconds"]
            else "- Training throughput: no training in this invocation (all results reused)"
        ),
        "",
        "## Summary",
        "",
        "| experiment | claim | verdict | checks |",
        "|---|---|---|---|",
    ]
    for v in verdicts:
        ok = sum(c["pass"] for c in v["checks"])
        head.append(
            f"| [{v['experiment']}](#{v['experiment']}) | {_cell(v['claim'])} | "
            f"**{v['verdict']}** | {ok}/{len(v['checks'])} |"
        )
    md = [*head, ""]
    for v in verdicts:
        md += [
            f'<a id="{v["experiment"]}"></a>',
            f"## {v['experiment']}: {v['verdict']}",
            "",
            f"**Claim.** {v['claim']}",
            "",
            "| check | measured | criterion | result |",
            "|---|---|---|---|",
        ]
        for c in v["checks"]:
            md.append(
                f"| {_cell(c['name'])} | {_cell(measured(c['measured']))} | "
                f"{_cell(c['criterion'])} | "
                f"{'PASS' if c['pass'] else 'FAIL'} |"
            )
        md.append("")
        for fig in v["figures"]:
            md += [f"![{v['experiment']} {fig}]({v['experiment']}/{fig})", ""]
        md += [_table_md(v["table"]), ""]
        if v.get("notes"):
            md += [f"*Notes.* {v['notes']}", ""]
        discussion = _discussion(v["experiment"], quick)
        if discussion:
            md += [f"*Discussion (written after the full run).* {discussion}", ""]
        md += [
            f"*Command.* `{v['command']} --out {out / v['experiment']}` "
            f"({v.get('seconds', 0):.0f} s)",
            "",
        ]
    md_path = out / "REPORT.md"
    md_path.write_text("\n".join(md))
    html_path = out / "REPORT.html"
    html_path.write_text(_html(out, verdicts, head, quick))
    return md_path, html_path


def _html(out: Path, verdicts: list[dict], head_md: list[str], quick: bool) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>bnlab reproduce report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}",
        "td,th{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left;vertical-align:top}",
        ".PASS{color:#0a7a2f;font-weight:bold}.FAIL{color:#b00020;font-weight:bold}"
        ".REPORT{color:#555;font-weight:bold}",
        "img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 0.2em}",
        "</style></head><body>",
        "<h1>bnlab reproduce: Batch Normalization's claims, tested</h1><ul>",
    ]
    for line in head_md[2:]:
        if line.startswith("- "):
            parts.append(f"<li>{html.escape(line[2:]).replace('`', '')}</li>")
    parts.append(
        "</ul><h2>Summary</h2><table><tr><th>experiment</th><th>claim</th><th>verdict</th></tr>"
    )
    for v in verdicts:
        parts.append(
            f"<tr><td><a href='#{v['experiment']}'>{v['experiment']}</a></td>"
            f"<td>{html.escape(v['claim'])}</td><td class='{v['verdict']}'>{v['verdict']}</td></tr>"
        )
    parts.append("</table>")
    for v in verdicts:
        parts.append(
            f"<h2 id='{v['experiment']}'>{v['experiment']}: "
            f"<span class='{v['verdict']}'>{v['verdict']}</span></h2>"
            f"<p><b>Claim.</b> {html.escape(v['claim'])}</p>"
        )
        rows = [
            {
                "check": c["name"],
                "measured": c["measured"],
                "criterion": c["criterion"],
                "result": "PASS" if c["pass"] else "FAIL",
            }
            for c in v["checks"]
        ]
        parts.append(_table_html(rows))
        for fig in v["figures"]:
            path = out / v["experiment"] / fig
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(
                    f"<p><img alt='{html.escape(fig)}' src='data:image/png;base64,{data}'></p>"
                )
        parts.append(_table_html(v["table"]))
        if v.get("notes"):
            parts.append(f"<p><i>Notes.</i> {html.escape(v['notes'])}</p>")
        discussion = _discussion(v["experiment"], quick)
        if discussion:
            parts.append(
                "<p><i>Discussion (written after the full run).</i> "
                f"{html.escape(discussion)}</p>"
            )
        parts.append(
            f"<p><i>Command.</i> <code>{html.escape(v['command'])}</code> ({v.get('seconds', 0):.0f} s)</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
