"""Registration as data (experiments/registry.py): a design digest per
experiment, a registry written before the run, each verdict's status
(confirmatory / exploratory) and three-way outcomes recorded by reproduce and
shown by the report; the HTML report's METHOD as a list. No training: an
experiment's ``run`` is replaced by one that returns fixed measurements."""

import datetime as dt
import doctest
import json
import types
import warnings
from pathlib import Path

import pytest

from experiments import protocol, registry, report, reproduce

ROOT = Path(__file__).resolve().parents[1]
PROV = {"commit": "c0ffee", "dirty": False}
EARLY = "2030-01-01T00:00:00Z"
START = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
LATE = "2030-01-03T00:00:00Z"


def _fake_module(tmp_path, source="x = 1\n", threshold=1.0):
    f = tmp_path / "fake_experiment.py"
    f.write_text(source)
    m = types.ModuleType("fake_experiment")
    m.__file__ = str(f)
    m.CRITERIA = [protocol.Criterion("a", "q", ">=", threshold, "s")]
    return m


# ------------------------------------------------------------------ digest


def test_design_digest_is_stable_and_per_experiment():
    d = registry.design_digest("placement")
    assert len(d) == 64 and int(d, 16) >= 0
    assert d == registry.design_digest("placement")
    assert d != registry.design_digest("bn_properties")


def test_design_digest_sees_source_criteria_and_protocol(tmp_path, monkeypatch):
    base = registry.design_digest(_fake_module(tmp_path))
    assert registry.design_digest(_fake_module(tmp_path, "x = 2\n")) != base
    assert registry.design_digest(_fake_module(tmp_path, threshold=0.5)) != base
    assert registry.design_digest(_fake_module(tmp_path)) == base
    other = tmp_path / "protocol_copy.py"
    other.write_text(Path(protocol.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(protocol, "__file__", str(other))
    assert registry.design_digest(_fake_module(tmp_path)) != base


def test_design_digest_sees_the_helpers_a_design_imports(tmp_path, monkeypatch):
    # a design that imports experiments.exact has its source in the digest;
    # an import under the command-line guard, or none, adds nothing
    plain = _fake_module(tmp_path, "x = 1\n")
    assert registry.imported_helpers(plain) == []
    guarded = 'if __name__ == "__main__":\n    from experiments import exact\n'
    assert registry.imported_helpers(_fake_module(tmp_path, guarded)) == []
    for line in (
        "from experiments import exact as X\n",
        "from experiments.exact import every_seed\n",
        "import experiments.exact\n",
        "from experiments import protocol as P, exact\n",
    ):
        assert registry.imported_helpers(_fake_module(tmp_path, line)) == ["exact"]
    source = "from experiments import exact as X\n"
    base = registry.design_digest(_fake_module(tmp_path, source))
    here = tmp_path / "pkg"
    here.mkdir()
    for f in ("exact.py", "protocol.py"):
        (here / f).write_text((registry.HERE / f).read_text())
    monkeypatch.setattr(registry, "HERE", here)
    assert registry.design_digest(_fake_module(tmp_path, source)) == base
    (here / "exact.py").write_text((here / "exact.py").read_text() + "# changed\n")
    assert registry.design_digest(_fake_module(tmp_path, source)) != base
    assert registry.imported_helpers("sigmoid_depth") == ["exact"]


def test_latest_is_the_default_registration_of_the_current_design():
    d = registry.design_digest("placement")

    def entry(first, when, digest=d):
        return {
            "scale": "quick",
            "digest": digest,
            "seeds": list(range(first, first + 5)),
            "registered_at": when,
        }

    reg = {
        "experiments": {
            "placement": [
                entry(3500, "2026-12-05T05:00:00Z"),
                entry(3300, "2026-12-05T04:00:00Z"),
                entry(3600, "2026-12-05T06:00:00Z"),
                entry(3000, "2026-12-05T07:00:00Z", digest="an earlier design"),
            ]
        }
    }
    # no registration of this design at 3000: the lowest first seed, whatever
    # the order of registration
    assert registry.latest(reg, "placement", "quick")["seeds"][0] == 3300
    reg["experiments"]["placement"].append(entry(3000, "2026-12-05T08:00:00Z"))
    assert registry.latest(reg, "placement", "quick")["seeds"][0] == 3000
    assert registry.latest(reg, "placement", "full") is None


def test_criteria_as_data_hold_every_field():
    (c, *_) = registry.criteria_data("placement")
    assert set(c) == {"id", "quantity", "op", "threshold", "source", "null"}


# ---------------------------------------------------------------- register


def test_register_writes_one_entry_per_experiment(tmp_path):
    path = tmp_path / "registry.json"
    plan = {"placement": {"seeds": 8, "pilot_sd": 0.004, "effect": 0.01}}
    out = registry.register(
        ["placement", "bn_properties"],
        range(7200, 7205),
        plan,
        path,
        now=EARLY,
        provenance=PROV,
    )
    data = json.loads(path.read_text())
    assert set(data["experiments"]) == {"placement", "bn_properties"}
    (e,) = data["experiments"]["placement"]
    assert e == out["placement"]
    assert e == {
        "digest": registry.design_digest("placement"),
        "scale": "full",
        "seeds": [7200, 7201, 7202, 7203, 7204],
        "power_plan": plan["placement"],
        "registered_at": "2030-01-01T00:00:00.000000Z",
        "commit": "c0ffee",
        "dirty": False,
    }
    # no plan given: the seed count, and that no pilot sized it
    assert data["experiments"]["bn_properties"][0]["power_plan"]["seeds"] == 5


def test_register_again_keeps_the_earlier_and_appends_a_change(tmp_path):
    path = tmp_path / "registry.json"
    registry.register(["placement"], [1, 2], None, path, now=EARLY, provenance=PROV)
    registry.register(["placement"], [1, 2], None, path, now=LATE, provenance=PROV)
    (e,) = registry.load(path)["experiments"]["placement"]
    assert e["registered_at"].startswith("2030-01-01")  # the earlier stands
    registry.register(["placement"], [3, 4], None, path, now=LATE, provenance=PROV)
    entries = registry.load(path)["experiments"]["placement"]
    assert [e["seeds"] for e in entries] == [[1, 2], [3, 4]]  # history kept


# ------------------------------------------------------------------ status


def _registered(tmp_path, when=EARLY, seeds=(0, 1), scale="full"):
    path = tmp_path / "registry.json"
    registry.register(
        ["placement"], seeds, None, path, scale=scale, now=when, provenance=PROV
    )
    return path


def test_status_confirmatory_only_if_registered_before_the_run(tmp_path):
    path = _registered(tmp_path)
    assert registry.status("placement", path, START) == "confirmatory"
    assert registry.status("placement", path, "2030-01-01T00:00:00Z") == (
        "exploratory"  # registered at the very moment: not before
    )
    late = _registered(tmp_path / "late", when=LATE)
    assert registry.status("placement", late, START) == "exploratory"
    assert registry.status("bn_properties", path, START) == "exploratory"
    assert registry.status("placement", tmp_path / "none.json", START) == (
        "exploratory"
    )


def test_status_exploratory_when_the_design_changed_after(tmp_path):
    path = _registered(tmp_path)
    data = registry.load(path)
    data["experiments"]["placement"][0]["digest"] = "0" * 64  # an older design
    assert registry.status("placement", data, START) == "exploratory"


def test_status_matches_seeds_and_scale_when_given(tmp_path):
    path = _registered(tmp_path, seeds=(7200, 7201))
    assert registry.status("placement", path, START, seeds=[7200, 7201]) == (
        "confirmatory"
    )
    assert registry.status("placement", path, START, seeds=[0, 1]) == "exploratory"
    assert registry.status("placement", path, START, scale="quick") == "exploratory"


def test_registration_names_the_digest_and_the_time(tmp_path):
    path = _registered(tmp_path)
    r = registry.registration("placement", path, START.timestamp())
    assert r["status"] == "confirmatory"
    assert r["digest"] == registry.design_digest("placement")
    assert r["registered_at"] == "2030-01-01T00:00:00.000000Z"
    assert r["power_plan"]["seeds"] == 2  # the plan the run was sized by
    r = registry.registration("placement", path, "2029-12-31T23:00:00+00:00")
    assert (r["status"], r["registered_at"]) == ("exploratory", None)


def test_a_registry_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "registry.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="not a registry"):
        registry.load(bad)


# --------------------------------------------------------------- reproduce


def test_reproduce_register_writes_the_registry_and_runs_nothing(tmp_path, monkeypatch):
    def no_run(ctx):
        raise AssertionError("--register ran an experiment")

    monkeypatch.setattr(
        reproduce, "provenance", lambda root=None: {"commit": "c0ffee", "dirty": False}
    )
    for name in ("placement", "bn_properties"):
        monkeypatch.setattr(f"experiments.{name}.run", no_run)
    path = tmp_path / "registry.json"
    opts = reproduce.options(
        tmp_path / "out",
        quick=True,
        only="placement,bn_properties",
        first_seed=7100,
        register=True,
        registry=path,
    )
    lines = []
    assert reproduce.run(opts, show=lines.append) == []
    assert not (tmp_path / "out").exists()
    data = registry.load(path)["experiments"]
    assert data["placement"][0]["seeds"] == list(range(7100, 7105))
    assert data["placement"][0]["scale"] == "quick"
    assert lines[0].startswith("registered placement")
    assert "nothing was run" in lines[-1] and "Commit it" in lines[-1]


def _quick_run(monkeypatch, module_name="bn_properties"):
    """``module.run`` replaced by fixed measurements of its criteria."""
    module = __import__(f"experiments.{module_name}", fromlist=["x"])

    def run(ctx):
        m = protocol.mean_ci([2.0, 2.2])
        return protocol.Outcome({c.id: m for c in module.CRITERIA})

    monkeypatch.setattr(module, "run", run)
    return module


@pytest.mark.parametrize("registered", [True, False])
def test_each_verdict_records_its_registration(tmp_path, monkeypatch, registered):
    _quick_run(monkeypatch)
    path = tmp_path / "registry.json"
    if registered:
        registry.register(
            ["bn_properties"], [3000, 3001], None, path, scale="smoke", provenance=PROV
        )
    opts = reproduce.options(
        tmp_path / "out", smoke=True, only="bn_properties", registry=path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (v,) = reproduce.run(opts, show=lambda s: None)
    r = v["registration"]
    assert r["digest"] == registry.design_digest("bn_properties")
    assert r["status"] == ("confirmatory" if registered else "exploratory")
    assert (r["registered_at"] is not None) == registered
    stored = json.loads(
        (tmp_path / "out" / "bn_properties" / "verdict.json").read_text()
    )
    assert stored["registration"] == r
    for c in v["checks"]:  # the three-way outcome beside PASS/FAIL
        assert c["outcome"]["outcome"] in (protocol.SUPPORTED, protocol.INCONCLUSIVE)
        assert (c["outcome"]["outcome"] == protocol.SUPPORTED) == c["pass"]
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert f"*Registration.* {r['status']}: design {r['digest'][:12]}" in md
    assert "| outcome |" in md
    page = (tmp_path / "out" / "REPORT.html").read_text()
    assert "<i>Registration.</i> " + r["status"] in page


def test_a_registration_written_during_the_run_does_not_count(tmp_path, monkeypatch):
    module = _quick_run(monkeypatch)
    path = tmp_path / "registry.json"
    inner = module.run

    def run(ctx):  # registers while it runs: too late
        registry.register(
            ["bn_properties"], [3000, 3001], None, path, scale="smoke", provenance=PROV
        )
        return inner(ctx)

    monkeypatch.setattr(module, "run", run)
    opts = reproduce.options(
        tmp_path / "out", smoke=True, only="bn_properties", registry=path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (v,) = reproduce.run(opts, show=lambda s: None)
    assert v["registration"]["status"] == "exploratory"


def test_committed_verdicts_without_the_new_fields_still_render(tmp_path):
    quick = ROOT / "experiments" / "results" / "pilots" / "quick-0"
    verdicts = [
        json.loads((quick / name / "verdict.json").read_text())
        for name in reproduce.EXPERIMENTS
        if (quick / name / "verdict.json").exists()
    ]
    assert verdicts and not any("registration" in v for v in verdicts)
    md, page = report.write(tmp_path, verdicts, "bnlab reproduce --quick", "quick", 1.0)
    text = md.read_text()
    assert "\n*Registration.* " not in text
    for v in verdicts:  # their PASS / FAIL as they were written
        assert f"## {v['experiment']}: {v['verdict']}" in text
        assert v["verdict"] in ("PASS", "FAIL", "REPORT")


# ------------------------------------------------------------------ report


def test_method_renders_as_a_list_in_html():
    text = "Intro with `code`.\n\n- **Data.** one\n  two <b>\n- **Arms.** three"
    assert report.markdown_html(text) == (
        "<p>Intro with <code>code</code>.</p>\n"
        "<ul><li><strong>Data.</strong> one two &lt;b&gt;</li>"
        "<li><strong>Arms.</strong> three</li></ul>"
    )
    # bold is not looked for inside code, and stray stars stay text
    assert report.markdown_html("`**x**` a * b") == ("<p><code>**x**</code> a * b</p>")


def test_report_html_method_has_no_raw_markdown(tmp_path):
    _, page = report.write(tmp_path, [], "bnlab reproduce", "full", 0.0)
    method = page.read_text().split("<h2>Method</h2>", 1)[1]
    assert "<ul><li><strong>Data.</strong>" in method
    assert "- **" not in method and "**" not in method


def test_outcome_and_registration_texts():
    assert report.outcome_text({"outcome": "INCONCLUSIVE", "seeds_needed": 12}) == (
        "INCONCLUSIVE (12 seeds would decide)"
    )
    assert report.outcome_text({"outcome": "NOT_TESTABLE"}) == "NOT TESTABLE"
    assert report.registration_text(None) == ""
    r = {"status": "exploratory", "digest": "ab" * 32, "registered_at": None}
    assert report.registration_text(r) == (
        "exploratory: design abababababab not registered before the run"
    )


def test_docstring_examples_run():
    # experiments/ is outside pytest's doctest paths
    for module in (protocol, report, registry):
        result = doctest.testmod(module)
        assert result.failed == 0 and (module is registry or result.attempted)


def test_a_module_without_source_has_no_digest_and_is_exploratory(monkeypatch):
    import sys

    probe = types.ModuleType("experiments._no_source")
    probe.CRITERIA = []
    monkeypatch.setitem(sys.modules, "experiments._no_source", probe)
    with pytest.raises(ValueError, match="no source file"):
        registry.design_digest("_no_source")
    r = registry.registration("_no_source", {"experiments": {}}, START)
    assert r == {"status": "exploratory", "digest": None, "registered_at": None}


def test_registry_command_registers(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "provenance", lambda root=None: dict(PROV))
    path = tmp_path / "registry.json"
    args = ["--only", "placement", "--seeds", "6", "--first-seed", "7200"]
    assert registry.main([*args, "--registry", str(path)]) == 0
    (e,) = registry.load(path)["experiments"]["placement"]
    assert (e["scale"], e["seeds"]) == ("full", list(range(7200, 7206)))
    with pytest.raises(SystemExit):  # options are checked as reproduce does
        registry.main(["--only", "nope", "--registry", str(path)])


@pytest.mark.filterwarnings("ignore:registering a design with uncommitted")
def test_the_cli_registers_and_runs_nothing(tmp_path, capsys):
    from bnlab.cli import main

    path = tmp_path / "registry.json"
    code = main(
        [
            "reproduce",
            "--register",
            "--registry",
            str(path),
            "--only",
            "feature_scale",
            "--quick",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    entries = json.loads(path.read_text())["experiments"]["feature_scale"]
    # fresh seeds, outside the pilot range, sized by the quick pilots
    assert entries[-1]["seeds"] == [3000, 3001, 3002, 3003, 3004]
    assert entries[-1]["power_plan"]["pilot"].startswith("quick-")
    assert not (tmp_path / "out").exists()  # nothing was run


# --------------------------------------------------- seeds and power plans


def test_pilot_seeds_cannot_be_registered():
    with pytest.raises(ValueError, match="pilot seeds"):
        reproduce.options(only="placement", first_seed=100, register=True)
    # a run on them is allowed (a pilot), and judging runs default past them
    assert (
        reproduce.options(only="placement", first_seed=100).seeds["placement"][0] == 100
    )
    assert registry.is_pilot([2999]) and not registry.is_pilot([3000, 4000])


def test_a_run_uses_its_registered_seeds_by_default(tmp_path, monkeypatch):
    path = tmp_path / "registry.json"
    registry.register(
        ["placement"], list(range(4000, 4008)), None, path, provenance=PROV
    )
    # a replication registered later on other seeds does not replace them
    registry.register(["placement"], [4100, 4101], None, path, provenance=PROV)
    opts = reproduce.options(only="placement,hessian", registry=path)
    assert opts.seeds == {
        "placement": list(range(4000, 4008)),  # registered: 8 seeds
        "hessian": list(range(4000, 4005)),  # not registered: the default 5
    }
    assert opts.command("placement") == (
        "bnlab reproduce --seeds 8 --first-seed 4000 --only placement"
    )


def test_only_a_committed_registration_counts(tmp_path):
    import subprocess

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    path = tmp_path / "registry.json"
    registry.register(["placement"], [4000, 4001], None, path, provenance=PROV)
    data, where = registry.load_committed(path)
    assert data["experiments"] == {} and where.startswith("HEAD")  # not committed
    git("add", "registry.json")
    git("commit", "-qm", "register")
    registry.register(["hessian"], [4000, 4001], None, path, provenance=PROV)
    data, where = registry.load_committed(path)
    assert where == "HEAD" and list(data["experiments"]) == ["placement"]
    # a file outside any checkout is read as it is
    other = tmp_path.parent / f"{tmp_path.name}-plain.json"
    registry.register(["hessian"], [4000, 4001], None, other, provenance=PROV)
    assert list(registry.load_committed(other)[0]["experiments"]) == ["hessian"]


def _pilot(tmp_path, name, checks):
    d = tmp_path / "pilot-1" / name
    d.mkdir(parents=True)
    (d / "verdict.json").write_text(
        json.dumps(
            {
                "experiment": name,
                "verdict": "PASS",
                "scale": "full",
                "seeds": [1000, 1001, 1002, 1003, 1004],
                "checks": checks,
                "provenance": {"commit": "abc"},
            }
        )
    )
    return d.parent


def _check(cid, lo, hi, n=5):
    return {
        "id": cid,
        "measured": {"value": (lo + hi) / 2, "ci": [lo, hi], "per_seed": [0.0] * n},
        "pass": True,
    }


def test_power_plan_sizes_seeds_from_the_pilot_spread(tmp_path):
    # placement's criteria: >= 0.01 (null 0), > 0, within 0.01 (or its current
    # ones): a pilot whose intervals decide at 5 seeds asks for 5
    ids = [c.id for c in __import__("experiments.placement").placement.CRITERIA]
    far = _pilot(tmp_path, "placement", [_check(i, 0.05, 0.07) for i in ids])
    plan = registry.power_plan("placement", [far], "full")
    assert plan["pilot"] == "pilot-1" and plan["pilot_seeds"][0] == 1000
    assert all(r["seeds"] is not None for r in plan["checks"])
    # a centre 0.03 from its bound with half-width 0.07 at 5 seeds: at 10
    # seeds 0.07 sqrt(5/10) t(9)/t(4) = 0.040 > 0.03: over the cap
    c = registry._check_plan(
        protocol.Criterion("d", "difference", ">", 0.0, "s", null=0.0),
        _check("d", -0.04, 0.10),
        "full",
        10,
    )
    assert c["seeds"] is None and c["centre"] == pytest.approx(0.03)
    # an experiment with such a check gets the cap
    under = _pilot(tmp_path / "u", "placement", [_check(i, -0.04, 0.10) for i in ids])
    plan = registry.power_plan("placement", [under], "full")
    assert plan["seeds"] == registry.MAX_SEEDS["full"] and plan["underpowered"]
    c = registry._check_plan(
        protocol.Criterion("d", "difference", ">", 0.0, "s", null=0.0),
        _check("d", 0.01, 0.09),
        "full",
        10,
    )
    # half 0.04 at n0 = 5, distance 0.05: n = 5 decides (0.04 < 0.05)
    assert c["seeds"] == 5
    # ratios are planned on the log scale
    c = registry._check_plan(
        protocol.Criterion("r", "ratio", ">=", 2.0, "s", null=1.0),
        _check("r", 2.5, 40.0),
        "full",
        10,
    )
    assert c["scale"] == "log" and c["centre"] == pytest.approx(10.0)
    # no pilot: the minimum
    plan = registry.power_plan("hessian", [tmp_path / "nowhere"], "full")
    assert plan["seeds"] == registry.MIN_SEEDS and "no pilot" in plan["basis"]


# ----------------------------------------------------------- three outcomes


@pytest.mark.parametrize(
    "outcomes, claim",
    [
        (["SUPPORTED", "SUPPORTED"], "SUPPORTED"),
        (["SUPPORTED", "CONTRADICTED", "INCONCLUSIVE"], "CONTRADICTED"),
        (["SUPPORTED", "INCONCLUSIVE", "NOT_TESTABLE"], "INCONCLUSIVE"),
        (["SUPPORTED", "NOT_TESTABLE"], "NOT_TESTABLE"),
        ([], "REPORT"),
    ],
)
def test_claim_outcome(outcomes, claim):
    assert reproduce.claim_outcome(outcomes) == claim


def _verdict(word, check_outcome, premise=None, seeds_needed=None):
    return {
        "experiment": "x",
        "verdict": word,
        "checks": [
            {
                "quantity": "q",
                "op": ">",
                "threshold": 0.0,
                "pass": check_outcome == "SUPPORTED",
                "measured": {"value": 0.1, "ci": [-0.1, 0.3]},
                "outcome": {"outcome": check_outcome, "seeds_needed": seeds_needed},
                "premise": premise,
            }
        ],
    }


def test_summary_line_names_the_outcome_and_what_would_decide():
    line = reproduce.summary_line(
        _verdict("INCONCLUSIVE", "INCONCLUSIVE", None, 12), 3, "1 s"
    )
    assert line.startswith("INCONCLUSIVE x") and "12 seeds would decide" in line
    absent = {"holds": False, "text": "gap -0.001 [-0.004, 0.002]"}
    line = reproduce.summary_line(
        _verdict("NOT_TESTABLE", "NOT_TESTABLE", absent), 3, ""
    )
    assert "premise absent: gap -0.001" in line
    assert reproduce.summary_line(_verdict("SUPPORTED", "SUPPORTED"), 3, "s").endswith(
        "(s)"
    )
    assert report.tally([_verdict("CONTRADICTED", "CONTRADICTED")]).startswith(
        "1 claim: 0 SUPPORTED, 1 CONTRADICTED"
    )


def test_history_rows_are_generated_from_their_pilot(tmp_path):
    _pilot(tmp_path, "placement", [_check("a", 0.01, 0.03)])
    text = report.pilot_result("pilot-1", {"experiment": "placement"}, root=tmp_path)
    assert text.startswith("PASS (pilot pilot-1: full, seeds [1000, 1001")
    assert "a: 0.02 [0.01, 0.03]" in text
    missing = report.pilot_result("pilot-2", {"experiment": "placement"}, root=tmp_path)
    assert "no verdict" in missing


def test_history_rows_name_a_superseded_run_with_its_status(tmp_path):
    # a row of an earlier design names the judging run it had ("run"), and
    # the text says whether that run was confirmatory
    d = _pilot(tmp_path, "placement", [_check("a", 0.01, 0.03)]) / "placement"
    v = json.loads((d / "verdict.json").read_text())
    v["registration"] = {"status": "confirmatory"}
    (d / "verdict.json").write_text(json.dumps(v))
    text = report.run_result("pilot-1", {"experiment": "placement"}, root=tmp_path)
    assert text.startswith("PASS (confirmatory run pilot-1: full, seeds [1000")
    rows = report._history(
        {"experiment": "placement", "history": [{"run": "elsewhere", "why": "w"}]}
    )
    assert "no verdict" in rows[0]["its result"]


def test_the_cli_exits_7_when_a_claim_is_contradicted(tmp_path, monkeypatch):
    from bnlab.cli import main

    module = __import__("experiments.bn_properties", fromlist=["x"])

    def run(ctx):  # every check's interval wholly past its null
        m = protocol.mean_ci([1e9, 1.1e9])
        return protocol.Outcome({c.id: m for c in module.CRITERIA})

    monkeypatch.setattr(module, "run", run)
    args = ["reproduce", "--quick", "--only", "bn_properties", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(tmp_path / "a")]) == 7
        # a smoke run judges nothing: it exits 0 whatever its outcomes
        smoke = ["reproduce", "--smoke", "--only", "bn_properties", "--quiet"]
        assert main([*smoke, "--out", str(tmp_path / "s")]) == 0
        _quick_run(monkeypatch)  # supported or inconclusive: exit 0
        assert main([*args, "--out", str(tmp_path / "b")]) == 0


def test_power_plan_prefers_a_pilot_of_the_current_design(tmp_path):
    ids = [c.id for c in __import__("experiments.hessian").hessian.CRITERIA]
    old = _pilot(tmp_path / "a", "hessian", [_check(i, 3.0, 4.0) for i in ids])
    new = _pilot(tmp_path / "b", "hessian", [_check(i, 3.0, 4.0) for i in ids])
    f = new / "hessian" / "verdict.json"
    v = json.loads(f.read_text())
    v["registration"] = {"digest": registry.design_digest("hessian")}
    v["scale"] = "quick"  # another scale, but this design: it wins
    f.write_text(json.dumps(v))
    plan = registry.power_plan("hessian", [old, new], "full")
    assert plan["pilot_design"] == "this design" and plan["pilot_scale"] == "quick"
    plan = registry.power_plan("hessian", [old], "full")
    assert plan["pilot_design"] == "an earlier design"


def test_history_rows_do_not_change_the_design(tmp_path):
    a = _fake_module(tmp_path, "X = 1\nHISTORY = [\n    {'why': 'a'},\n]\n")
    d = registry.design_digest(a)
    b = _fake_module(
        tmp_path, "X = 1\nHISTORY = [\n    {'why': 'a'},\n    {'why': 'b'},\n]\n"
    )
    assert registry.design_digest(b) == d  # a row added after a pilot
    c = _fake_module(tmp_path, "X = 2\nHISTORY = [\n    {'why': 'a'},\n]\n")
    assert registry.design_digest(c) != d  # the design itself


def test_a_module_can_ask_for_more_seeds_than_the_minimum(tmp_path):
    # conv_claims' share of seeds cannot leave INCONCLUSIVE below 8 seeds
    nowhere = [tmp_path / "none"]
    assert registry.power_plan("conv_claims", nowhere, "full")["seeds"] == 8
    assert registry.power_plan("conv_claims", nowhere, "quick")["seeds"] == 5  # cap
    assert registry.power_plan("hessian", nowhere, "full")["seeds"] == 5


def test_power_plan_of_a_share_of_seeds_is_exact():
    crit = protocol.Criterion("s", "share of seeds that train", "<", 0.5, "src")

    def pilot(per_seed):
        m = {"value": 0.0, "ci": [0.0, 0.5], "per_seed": per_seed}
        return {"id": "s", "measured": m, "pass": False}

    # 0 of 5 in the pilot: 0 of 6 is the first count whose upper end
    # (1 - 0.025 ** (1 / 6) = 0.46) clears 0.5
    c = registry._check_plan(crit, pilot([0.0] * 5), "full", 10)
    assert (c["seeds"], c["scale"], c["centre"]) == (6, "count", 0.0)
    # a cap of 5 cannot decide it: underpowered
    assert registry._check_plan(crit, pilot([0.0] * 5), "quick", 5)["seeds"] is None
    # 1 of 5 train (a share of 0.2): 2 of 10 gives [0.025, 0.556], undecided
    assert (
        registry._check_plan(crit, pilot([0, 0, 1.0, 0, 0]), "full", 10)["seeds"]
        is None
    )
    # every seed trains: 6 of 6 has its lower end 0.54 > 0.5, contradicted
    assert registry._check_plan(crit, pilot([1.0] * 5), "full", 10)["seeds"] == 6


def test_power_plan_a_centre_between_null_and_threshold_is_undecidable():
    # centre 0.005 between the null 0 and the threshold 0.01: the interval
    # shrinks onto the gap, so no seed count decides (decide agrees)
    crit = protocol.Criterion("d", "difference", ">=", 0.01, "s", null=0.0)
    c = registry._check_plan(crit, _check("d", 0.004, 0.006), "full", 10)
    assert c["seeds"] is None
    assert protocol.decide(-0.0001, 0.0101, ">=", 0.01, 0.0, n=10).seeds_needed is None
