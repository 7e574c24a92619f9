"""REPORT.md and a self-contained REPORT.html from the experiments' verdicts.

Everything in the report is generated from the verdicts (measured values,
intervals, the pre-registered criteria as data, the history of changed
designs, provenance): no number is written by hand.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from experiments import protocol

__all__ = ["conflicts", "markdown_html", "tally", "write"]

# The claims' outcomes in the order the report counts them.
WORDS = ("SUPPORTED", "CONTRADICTED", "INCONCLUSIVE", "NOT_TESTABLE")
RESULTS = Path(__file__).resolve().parent / "results"
PILOTS = RESULTS / "pilots"


def tally(verdicts: list[dict]) -> str:
    """``"n claims: a SUPPORTED, b CONTRADICTED, ..."`` (reports apart).

    Example:
      >>> tally([{"verdict": "SUPPORTED"}, {"verdict": "REPORT"}])
      '1 claim: 1 SUPPORTED, 0 CONTRADICTED, 0 INCONCLUSIVE, 0 NOT TESTABLE; 1 reported without a criterion'
    """
    judged = [v for v in verdicts if v["verdict"] != "REPORT"]
    counts = ", ".join(
        f"{sum(v['verdict'] == w for v in judged)} {w.replace('_', ' ')}" for w in WORDS
    )
    plural = "" if len(judged) == 1 else "s"
    return (
        f"{len(judged)} claim{plural}: {counts}; "
        f"{len(verdicts) - len(judged)} reported without a criterion"
    )


def conflicts(runs: dict[str, list[dict]]) -> list[str]:
    """Checks SUPPORTED in one run and CONTRADICTED in another (``runs``:
    label -> verdicts), as ``"experiment/check: label OUTCOME, ..."``; the
    quick run must never contradict the full run this way (INCONCLUSIVE at
    one scale is allowed).

    Example:
      >>> def v(o):
      ...     return [{"experiment": "e", "checks": [{"id": "c", "outcome": {"outcome": o}}]}]
      >>> conflicts({"full": v("SUPPORTED"), "quick": v("INCONCLUSIVE")})
      []
      >>> conflicts({"full": v("SUPPORTED"), "quick": v("CONTRADICTED")})
      ['e/c: full SUPPORTED, quick CONTRADICTED']
    """
    seen: dict[str, dict[str, str]] = {}
    for label, verdicts in runs.items():
        for v in verdicts:
            for c in v.get("checks", []):
                o = (c.get("outcome") or {}).get("outcome")
                if o:
                    seen.setdefault(f"{v['experiment']}/{c['id']}", {})[label] = o
    return [
        f"{key}: " + ", ".join(f"{k} {o}" for k, o in by.items())
        for key, by in seen.items()
        if {"SUPPORTED", "CONTRADICTED"} <= set(by.values())
    ]


def measured(v: Any) -> str:
    """Compact text of a measured value (numbers, lists, dicts, intervals)."""
    if isinstance(v, dict) and "ci" in v and "value" in v:
        lo, hi = v["ci"]
        value = protocol.fmt(v["value"], digits=None)  # the report's style
        if lo == hi:
            return value
        return f"{value} [{protocol.fmt(lo, digits=None)}, {protocol.fmt(hi, digits=None)}]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {measured(x)}" for k, x in v.items())
    if isinstance(v, list):
        if len(v) > 8:
            return "[" + ", ".join(measured(x) for x in v[:8]) + ", ...]"
        return "[" + ", ".join(measured(x) for x in v) + "]"
    if isinstance(v, (int, float)) or v is None:
        return protocol.fmt(v, digits=None)
    return str(v)


def _cell(text: Any) -> str:
    """Text for a Markdown table cell (a bare ``|`` would end the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


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


def _checks(v: dict) -> list[dict]:
    rows = []
    for c in v["checks"]:
        row = {
            "check": c["quantity"]
            + (f" ({c['measured']['note']})" if c["measured"].get("note") else ""),
            "measured (95% interval)": c["measured"],
            "criterion": c["criterion"]
            + (
                f"; contradicted past {c['null']:g}"
                if c.get("null") is not None
                else ""
            ),
            "source": c["source"],
        }
        if c.get("outcome"):
            row["outcome"] = outcome_text(c["outcome"])
        else:  # verdicts written before outcomes
            row["outcome"] = "PASS" if c["pass"] else "FAIL"
        if c.get("premise"):
            p = c["premise"]
            row["premise"] = ("holds: " if p["holds"] else "ABSENT: ") + p["text"]
        if c.get("sensitivity"):
            row["sensitivity"] = sensitivity_text(c["sensitivity"])
        rows.append(row)
    return rows


def sensitivity_text(s: dict) -> str:
    """``constant: v1 OUTCOME, v2* OUTCOME, ...`` (``*`` the registered)."""
    parts = []
    for k, o in s["outcomes"].items():
        star = "*" if float(k) == float(s["value"]) else ""
        parts.append(f"{k}{star} {str(o).replace('_', ' ')}")
    return f"{s['constant']}: " + ", ".join(parts)


def outcome_text(o: dict) -> str:
    """A check's three-way outcome (:func:`experiments.protocol.decide`)."""
    text = str(o.get("outcome", "")).replace("_", " ")
    if o.get("seeds_needed"):
        text += f" ({o['seeds_needed']} seeds would decide)"
    return text


def registration_text(r: dict | None) -> str:
    """The registration a verdict ran under, or "" when it records none."""
    if not r:
        return ""
    design = f"design {str(r.get('digest'))[:12]}"
    if r.get("status") == "confirmatory":
        return f"confirmatory: {design} registered at {r.get('registered_at')}"
    if r.get("status") == "pilot":
        return f"pilot (seeds in the pilot range): {design}, exploratory"
    return f"{r.get('status')}: {design} not registered before the run"


def power_text(v: dict) -> str:
    """Seeds reached vs planned, and the plan's basis."""
    n = len(v.get("seeds", []))
    plan = (v.get("registration") or {}).get("power_plan")
    if not plan:
        return f"{n} seeds; no registered power plan"
    text = f"{n} seeds (planned {plan.get('seeds')}"
    if plan.get("pilot"):
        text += (
            f" from pilot {plan['pilot']} ({plan.get('pilot_scale')} scale, "
            f"{plan.get('pilot_design', 'a design')}), seeds {plan.get('pilot_seeds')}"
        )
    text += ")"
    if plan.get("underpowered"):
        text += (
            "; underpowered at the cap (an INCONCLUSIVE outcome was expected "
            f"unless the effect exceeds the pilot's): {', '.join(plan['underpowered'])}"
        )
    return text


def _reported(v: dict) -> list[dict]:
    return [
        {"reported": k, "value (95% interval)": m} for k, m in v["reported"].items()
    ]


def _history(v: dict) -> list[dict]:
    return [
        {
            "date": h.get("date", ""),
            "earlier design / criterion": h.get("criterion", ""),
            "its result": pilot_result(h["pilot"], v)
            if h.get("pilot")
            else run_result(h["run"], v)
            if h.get("run")
            else f"{h.get('result', '')} (typed in HISTORY before pilots were "
            "committed: not checkable from a file)",
            "why it changed": h.get("why", ""),
        }
        for h in v.get("history", [])
    ]


def run_result(run: str, v: dict, root: Path = RESULTS) -> str:
    """A HISTORY row's result, generated from the judging run of an earlier
    design that it names (``"run"``: a directory under
    ``experiments/results``, e.g. ``superseded/full-6e0f946``), labelled with
    that verdict's registration status."""
    return pilot_result(run, v, root, label="run")


def pilot_result(
    pilot: str | None, v: dict, root: Path = PILOTS, label: str = "pilot"
) -> str:
    """A HISTORY row's result, generated from the pilot run it names
    (``experiments/results/pilots/<pilot>/<experiment>/verdict.json``)."""
    if not pilot:
        return ""
    f = root / pilot / v["experiment"] / "verdict.json"
    if not f.exists():
        return f"({label} {pilot}: no verdict at {f.relative_to(root.parent)})"
    import json

    p = json.loads(f.read_text())
    checks = "; ".join(
        f"{c['id']}: {measured(c['measured'])} "
        + (
            outcome_text(c["outcome"])
            if c.get("outcome")
            else ("PASS" if c["pass"] else "FAIL")
        )
        for c in p.get("checks", [])
    )
    commit = str((p.get("provenance") or {}).get("commit"))[:10]
    if label == "run":
        label = f"{(p.get('registration') or {}).get('status', 'unregistered')} run"
    return (
        f"{p.get('verdict')} ({label} {pilot}: {p.get('scale')}, seeds "
        f"{p.get('seeds')}, commit {commit}): {checks}"
    )


def method_text() -> str:
    """The METHOD section: the protocol module's docstring, once."""
    doc = protocol.__doc__ or ""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else doc
    return re.sub(
        r"``([^`]+)``", r"`\1`", re.sub(r":(?:func|class):`~?([^`]+)`", r"`\1`", body)
    )


def _inline_html(text: str) -> str:
    """Escaped text with Markdown's ``code`` spans and **bold** as HTML
    (bold is not looked for inside code)."""
    out = []
    for i, piece in enumerate(re.split(r"`([^`]*)`", text)):
        if i % 2:
            out.append(f"<code>{html.escape(piece)}</code>")
        else:
            out.append(
                re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(piece))
            )
    return "".join(out)


def markdown_html(text: str) -> str:
    r"""HTML of the Markdown subset the METHOD section uses: paragraphs
    (blank-line separated), ``- `` list items (continued by indented lines),
    ``**bold**`` and ```code``` spans; everything else is escaped text.

    Example:
      >>> markdown_html("- **Data.** a\n  b `x<y`\n- c")
      '<ul><li><strong>Data.</strong> a b <code>x&lt;y</code></li><li>c</li></ul>'
    """
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        items: list[list[str]] = []
        para: list[str] = []
        for line in block.splitlines():
            if line.startswith(("- ", "* ")):
                items.append([line[2:].strip()])
            elif items and line[:1].isspace():
                items[-1].append(line.strip())
            else:  # text outside a list: a paragraph of its own
                if items:
                    blocks.append(_list_html(items))
                    items = []
                para.append(line.strip())
                continue
            if para:
                blocks.append(f"<p>{_inline_html(' '.join(para))}</p>")
                para = []
        if items:
            blocks.append(_list_html(items))
        if para:
            blocks.append(f"<p>{_inline_html(' '.join(para))}</p>")
    return "\n".join(blocks)


def _list_html(items: list[list[str]]) -> str:
    return (
        "<ul>"
        + "".join(f"<li>{_inline_html(' '.join(i))}</li>" for i in items)
        + "</ul>"
    )


def write(
    out: Path, verdicts: list[dict], command: str, scale: str, wall_seconds: float
) -> tuple[Path, Path]:
    """Writes ``out/REPORT.md`` and ``out/REPORT.html``; returns both paths."""
    first = verdicts[0] if verdicts else {}
    env = first.get("environment", {})
    prov = first.get("provenance", {})
    commits = sorted({str(v.get("provenance", {}).get("commit")) for v in verdicts})
    dirty = any(v.get("provenance", {}).get("dirty") for v in verdicts)
    seed_sets = sorted(
        {(v["seeds"][0], len(v["seeds"])) for v in verdicts if v.get("seeds")}
    )
    seeds = "; ".join(f"{n} from {a}" for a, n in seed_sets) or "none"
    roles = sorted(
        {(v.get("registration") or {}).get("status", "unregistered") for v in verdicts}
    )
    exp_seconds = sum(v.get("seconds", 0.0) for v in verdicts)
    train = [t for v in verdicts for t in v.get("training", [])]
    arm_steps = sum(t["arms"] * t["steps"] for t in train)
    train_s = sum(t["seconds"] for t in train)
    data = (
        "Fashion-MNIST 14x14 subset shipped with bnlab (10k/2k)"
        if scale != "full"
        else "Fashion-MNIST (60k/10k)"
    )
    head = [
        "# bnlab reproduce: Batch Normalization's claims, tested",
        "",
        f"- Command: `{command} --out {out}`",
        f"- Scale: {scale}; data: {data}; seeds per experiment: {seeds}",
        f"- Result: {tally(verdicts)}",
        f"- Registration: {', '.join(roles)}",
        f"- Code: commit {', '.join(commits)}"
        + (" (with uncommitted changes)" if dirty else "")
        + f"; bnlab {prov.get('bnlab', '?')}",
        f"- Date: {env.get('date', '?')}; device: {env.get('device', '?')}; "
        f"machine: {env.get('machine', '?')}; Python {env.get('python', '?')}, "
        f"jax {env.get('jax', '?')}, flax {env.get('flax', '?')}",
        f"- Time: {exp_seconds:.0f} s of experiments ({exp_seconds / 60:.1f} min; an "
        f"experiment reused from an earlier invocation counts the run that made it); "
        f"this invocation {wall_seconds:.0f} s",
        (
            f"- Training: {len(train)} fits, {arm_steps:,} arm-steps in {train_s:.0f} s "
            f"({arm_steps / max(train_s, 1e-9):,.0f} arm-steps/s, compilation included)"
            if train
            else "- Training: none recorded"
        ),
        "",
        "## Summary",
        "",
        "| experiment | claim | outcome | checks supported | seeds | registration | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        ok = sum(c["pass"] for c in v["checks"])
        status = (v.get("registration") or {}).get("status", "")
        head.append(
            f"| [{v['experiment']}](#{v['experiment']}) | {_cell(v['claim'])} | "
            f"**{v['verdict'].replace('_', ' ')}** | {ok}/{len(v['checks'])} | "
            f"{len(v.get('seeds', []))} | {status} | {v.get('seconds', 0):.0f} s |"
        )
    md = [*head, "", "## Method", "", method_text(), ""]
    for v in verdicts:
        md += [
            f'<a id="{v["experiment"]}"></a>',
            f"## {v['experiment']}: {v['verdict']}",
            "",
            f"**Claim.** {v['claim']}",
            "",
        ]
        if v.get("registration"):
            md += [f"*Registration.* {registration_text(v['registration'])}", ""]
        if v["checks"]:
            md += [f"*Power.* {power_text(v)}", ""]
        md += [
            _table_md(_checks(v)),
            "",
            _table_md(_reported(v)),
            "",
        ]
        for fig in v["figures"]:
            md += [f"![{v['experiment']} {fig}]({v['experiment']}/{fig})", ""]
        md += [_table_md(v["table"]), ""]
        if v.get("notes"):
            md += [f"*Notes.* {v['notes']}", ""]
        if v.get("history"):
            md += ["*History (earlier designs and criteria, kept as measured).*", ""]
            md += [_table_md(_history(v)), ""]
        md += [
            f"*Command.* `{v.get('command', '')} --out {out}` "
            f"({v.get('seconds', 0):.0f} s; commit "
            f"{str(v.get('provenance', {}).get('commit'))[:10]})",
            "",
        ]
    md_path = out / "REPORT.md"
    md_path.write_text("\n".join(md))
    html_path = out / "REPORT.html"
    html_path.write_text(_html(out, verdicts, head))
    return md_path, html_path


def _html(out: Path, verdicts: list[dict], head_md: list[str]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>bnlab reproduce report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}",
        "td,th{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left;"
        "vertical-align:top}",
        ".SUPPORTED,.PASS{color:#0a7a2f;font-weight:bold}"
        ".CONTRADICTED,.FAIL{color:#b00020;font-weight:bold}"
        ".INCONCLUSIVE{color:#9a6700;font-weight:bold}"
        ".NOT_TESTABLE,.REPORT{color:#555;font-weight:bold}",
        "img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;"
        "padding:0 0.2em}",
        "</style></head><body>",
        "<h1>bnlab reproduce: Batch Normalization's claims, tested</h1><ul>",
    ]
    for line in head_md[2:]:
        if line.startswith("- "):
            parts.append(f"<li>{html.escape(line[2:]).replace('`', '')}</li>")
    parts.append(
        "</ul><h2>Summary</h2><table><tr><th>experiment</th><th>claim</th>"
        "<th>verdict</th></tr>"
    )
    for v in verdicts:
        parts.append(
            f"<tr><td><a href='#{v['experiment']}'>{v['experiment']}</a></td>"
            f"<td>{html.escape(v['claim'])}</td>"
            f"<td class='{v['verdict']}'>{v['verdict']}</td></tr>"
        )
    parts.append("</table><h2>Method</h2>")
    parts.append(markdown_html(method_text()))
    for v in verdicts:
        parts.append(
            f"<h2 id='{v['experiment']}'>{v['experiment']}: "
            f"<span class='{v['verdict']}'>{v['verdict']}</span></h2>"
            f"<p><b>Claim.</b> {html.escape(v['claim'])}</p>"
        )
        if v.get("registration"):
            parts.append(
                "<p><i>Registration.</i> "
                f"{html.escape(registration_text(v['registration']))}</p>"
            )
        if v["checks"]:
            parts.append(f"<p><i>Power.</i> {html.escape(power_text(v))}</p>")
        parts.append(_table_html(_checks(v)))
        parts.append(_table_html(_reported(v)))
        for fig in v["figures"]:
            path = out / v["experiment"] / fig
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                parts.append(
                    f"<p><img alt='{html.escape(fig)}' "
                    f"src='data:image/png;base64,{data}'></p>"
                )
        parts.append(_table_html(v["table"]))
        if v.get("notes"):
            parts.append(f"<p><i>Notes.</i> {html.escape(v['notes'])}</p>")
        if v.get("history"):
            parts.append("<p><i>History (earlier designs and criteria).</i></p>")
            parts.append(_table_html(_history(v)))
        parts.append(
            f"<p><i>Command.</i> <code>{html.escape(v.get('command', ''))}</code> "
            f"({v.get('seconds', 0):.0f} s)</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
