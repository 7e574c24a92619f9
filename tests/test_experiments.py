"""bnlab reproduce: every experiment runs (smoke scale), verdicts are judged
from pre-registered criteria, trusted only if intact, one run per --out,
resumable after kill -9, and runnable from an installed package."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from bnlab import data as bnlab_data
from experiments import protocol, reproduce
from tests.test_multihost import ROOT


@pytest.fixture(autouse=True)
def _user_code_promotion():
    # Experiments are user code (optax mixes ints and floats, models rely on
    # rank broadcasting); the library itself is tested strict elsewhere.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "bnlab", "reproduce", *args],
        env=kw.pop("env", None) or _env(),
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 900),
        **kw,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    opts = reproduce.options(out, smoke=True)
    lines = []
    with (
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # tiny runs: batch > data etc.
        verdicts = reproduce.run(opts, show=lines.append)
    return out, verdicts, lines


@pytest.mark.slow  # the experiments' smoke run
def test_every_experiment_runs_and_writes_its_outputs(smoke):
    out, verdicts, lines = smoke
    assert [v["experiment"] for v in verdicts] == list(reproduce.EXPERIMENTS)
    for v in verdicts:
        d = out / v["experiment"]
        module = __import__(f"experiments.{v['experiment']}", fromlist=["x"])
        assert [c["id"] for c in v["checks"]] == [c.id for c in module.CRITERIA]
        _assert_verdict_follows_its_checks(v)
        assert json.loads((d / "verdict.json").read_text())["claim"] == v["claim"]
        assert v["provenance"]["bnlab"] and v["seeds"] == [3000, 3001]
        data = v["provenance"]["data"]  # None: no dataset (generated inputs)
        assert data is None or len(data["sha256"]) == 64
        for line in (d / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
        for fig in v["figures"]:
            assert (d / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    report = (out / "REPORT.md").read_text()
    page = (out / "REPORT.html").read_text()
    assert "## Method" in report and "commit" in report
    for v in verdicts:
        assert f"## {v['experiment']}: {v['verdict']}" in report
        assert f"id='{v['experiment']}'" in page
        for c in v["checks"]:
            assert c["quantity"] in report.replace("\\|", "|")
    n_figs = sum(len(v["figures"]) for v in verdicts)
    assert page.count("data:image/png;base64,") == n_figs  # self-contained
    from experiments.report import tally

    assert lines[-1].startswith(tally(verdicts))
    for v, line in zip(verdicts, lines, strict=False):
        assert line.startswith(v["verdict"])
        if v["verdict"] not in ("SUPPORTED", "REPORT"):
            assert "criterion" in line  # it names the check and its numbers


def _assert_verdict_follows_its_checks(v):
    """REPORT without criteria, else the claim's outcome from its checks'
    (reproduce.claim_outcome); each check's outcome is what its recorded
    interval, threshold, null and premise give, and it passes iff SUPPORTED."""
    outcomes = [c["outcome"]["outcome"] for c in v["checks"]]
    expected = reproduce.claim_outcome(outcomes)
    assert v["verdict"] == expected, (v["experiment"], v["verdict"], outcomes)
    for c in v["checks"]:
        assert c["pass"] == (c["outcome"]["outcome"] == protocol.SUPPORTED), c
        m = c["measured"]
        lo, hi = m["ci"]
        if m["value"] is None or lo is None or hi is None:
            continue  # a non-finite number is recorded as null
        premise = c.get("premise") is None or c["premise"]["holds"]
        d = protocol.decide(
            lo, hi, c["op"], c["threshold"], c.get("null"), None, premise
        )
        assert c["outcome"]["outcome"] == d.outcome, c


def test_the_verdict_check_can_fail():
    check = {
        "id": "a",
        "quantity": "q",
        "op": ">=",
        "threshold": 1.0,
        "null": 0.0,
        "source": "s",
        "measured": {"value": 1.5, "ci": [1.2, 1.8]},
        "pass": True,
        "outcome": {"outcome": "SUPPORTED"},
    }
    ok = {"experiment": "x", "verdict": "SUPPORTED", "checks": [check]}
    _assert_verdict_follows_its_checks(ok)
    _assert_verdict_follows_its_checks({**ok, "verdict": "REPORT", "checks": []})
    undecided = {
        **check,
        "measured": {"value": 1.0, "ci": [0.5, 1.5]},
        "pass": False,
        "outcome": {"outcome": "INCONCLUSIVE"},
    }
    _assert_verdict_follows_its_checks(
        {**ok, "verdict": "INCONCLUSIVE", "checks": [undecided]}
    )
    for bad in (
        {**ok, "verdict": "CONTRADICTED"},  # every check is supported
        {**ok, "verdict": "REPORT"},  # it has checks
        {**ok, "checks": [{**check, "measured": {"value": 1.0, "ci": [0.5, 1.5]}}]},
        {**ok, "checks": [{**check, "pass": False}]},  # supported but not passed
        # without its null, an interval wholly below the threshold contradicts
        {
            **ok,
            "verdict": "INCONCLUSIVE",
            "checks": [
                {
                    **undecided,
                    "measured": {"value": 0.0, "ci": [-0.5, 0.5]},
                    "null": None,
                }
            ],
        },
    ):
        with pytest.raises(AssertionError):
            _assert_verdict_follows_its_checks(bad)


@pytest.mark.slow  # the experiments' smoke run
def test_a_second_run_recomputes_nothing(smoke, monkeypatch):
    out, verdicts, _ = smoke

    def no_training(*a, **k):
        raise AssertionError("a finished experiment was recomputed")

    monkeypatch.setattr(protocol.Context, "fit", no_training)
    again = reproduce.run(reproduce.options(out, smoke=True), show=lambda s: None)
    assert again == verdicts
    with pytest.raises(Exception, match=r"holds a smoke run with seeds \[3000, 3001\]"):
        reproduce.run(reproduce.options(out, quick=True), show=lambda s: None)


@pytest.mark.slow  # the experiments' smoke run
@pytest.mark.parametrize("damage", ["edited", "truncated"])
def test_a_damaged_verdict_is_recomputed_not_trusted(smoke, tmp_path, damage):
    import shutil

    src, verdicts, _ = smoke
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".lock"))
    f = out / "bn_properties" / "verdict.json"
    original = json.loads(f.read_text())
    if damage == "edited":  # valid JSON, a better-looking number
        edited = json.loads(f.read_text())
        edited["verdict"] = (
            "SUPPORTED" if edited["verdict"] != "SUPPORTED" else "CONTRADICTED"
        )
        f.write_text(json.dumps(edited))
    else:
        f.write_text(f.read_text()[:50])
    opts = reproduce.options(out, smoke=True, only="bn_properties")
    with pytest.warns(RuntimeWarning, match="fails its SHA-256"):
        (again,) = reproduce.run(opts, show=lambda s: None)
    keep = ("verdict", "checks", "claim", "seeds")
    assert {k: again[k] for k in keep} == {k: original[k] for k in keep}


@pytest.mark.slow  # a subprocess
def test_two_runs_on_one_out_the_second_is_refused(tmp_path):
    from bnlab.train.rundir import lock_run_dir

    out = tmp_path / "out"
    out.mkdir()
    with lock_run_dir(out):  # a reproduce run holding --out
        run = _cli("--smoke", "--only", "feature_scale", "--out", str(out), "--quiet")
    assert run.returncode == 4, run.stderr
    assert "in use by another bnlab run" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow  # a subprocess
def test_options_are_checked_before_any_work(tmp_path):
    run = _cli("--smoke", "--only", "nope", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "unknown experiment(s) ['nope']" in run.stderr
    run = _cli("--quick", "--seeds", "1", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "at least 2 seeds" in run.stderr
    assert not (tmp_path / "o").exists()
    seeds = reproduce.options(first_seed=100, only="placement").seeds
    assert seeds == {"placement": [100, 101, 102, 103, 104]}  # a pilot's


@pytest.mark.slow  # a subprocess
def test_missing_matplotlib_is_named_before_any_work(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['matplotlib'] = None  # as if not installed\n"
    )
    env = _env(PYTHONPATH=f"{hide}{os.pathsep}{ROOT}")
    run = _cli("--smoke", "--only", "placement", "--out", str(tmp_path / "o"), env=env)
    assert run.returncode == 2, run.stderr
    assert (
        "matplotlib not installed; install it with: pip install matplotlib"
        in run.stderr
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a subprocess
def test_results_on_stdout_progress_on_stderr(tmp_path):
    run = _cli("--smoke", "--only", "feature_scale", "--out", str(tmp_path / "o"))
    assert run.returncode == 0, run.stderr
    words = ("SUPPORTED", "CONTRADICTED", "INCONCLUSIVE", "NOT_TESTABLE")
    assert run.stdout.splitlines()[0].split()[0] in words
    assert "1 claim: " in run.stdout.splitlines()[-1]
    assert "1 claim: " not in run.stderr


def test_transcript_line_of_an_undecided_claim_explains_it():
    check = {
        "quantity": "q",
        "op": ">=",
        "threshold": 2.0,
        "measured": {"value": 1.5, "ci": [1.0, 2.5]},
        "pass": False,
    }
    v = {
        "experiment": "x",
        "verdict": "INCONCLUSIVE",
        "checks": [
            {"pass": True, "outcome": {"outcome": "SUPPORTED"}},
            {**check, "outcome": {"outcome": "INCONCLUSIVE", "seeds_needed": 9}},
        ],
    }
    assert reproduce.summary_line(v, 3, "1 s") == (
        "INCONCLUSIVE x    (1 s): q = 1.5 [1, 2.5], criterion >= 2; 9 seeds would "
        "decide"
    )
    # a verdict written before outcomes (a pilot's) names its failing check
    old = {"experiment": "x", "verdict": "FAIL", "checks": [check]}
    assert reproduce.summary_line(old, 3, "1 s").endswith("criterion >= 2")


def test_criteria_judge_the_whole_interval():
    c = protocol.Criterion("a", "q", ">=", 1.0, "s")
    assert protocol.judge(c, protocol.mean_ci([1.2, 1.3, 1.25]), "full")
    assert not protocol.judge(c, protocol.mean_ci([0.5, 2.0, 1.4]), "full")
    eq = protocol.Criterion("b", "q", "within", 0.01, "s")
    assert protocol.judge(eq, protocol.mean_ci([0.001, -0.002, 0.0]), "full")
    assert not protocol.judge(eq, protocol.mean_ci([0.02, 0.015, 0.03]), "full")
    m = protocol.paired_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.0])
    assert m.value == pytest.approx(2 / 3)
    # t(0.975, 2) = 4.303; s = std([0.5, 0.5, 1.0], ddof=1)
    half = 4.303 * np.std([0.5, 0.5, 1.0], ddof=1) / np.sqrt(3)
    assert (m.low, m.high) == pytest.approx((2 / 3 - half, 2 / 3 + half))
    r = protocol.ratio_ci([2.0, 4.0], [1.0, 2.0])
    assert r.value == pytest.approx(2.0) and r.low == r.high == pytest.approx(2.0)


@pytest.mark.slow  # a subprocess
def test_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path):
    def cli(out):
        return [
            sys.executable,
            "-m",
            "bnlab",
            "reproduce",
            "--smoke",
            "--only",
            "placement",
            "--out",
            str(out),
            "--quiet",
        ]

    subprocess.run(cli(tmp_path / "ref"), env=_env(), check=True, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        cli(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = run / "placement" / "arms" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "finished before it was killed"
    assert not (run / "placement" / "verdict.json").exists()
    subprocess.run(cli(run), env=_env(), check=True, capture_output=True)

    def results(out):
        v = json.loads((out / "placement" / "verdict.json").read_text())
        return (
            v["checks"],
            v["table"],
            (out / "placement" / "metrics.jsonl").read_text(),
        )

    assert results(run) == results(tmp_path / "ref")


@pytest.mark.slow
def test_an_installed_wheel_ships_no_experiments_package(tmp_path):
    # A wheel puts bnlab into site-packages, not a generic top-level package
    # named `experiments`; `bnlab reproduce` then says it needs a checkout.
    import sysconfig
    import zipfile

    wheel = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if wheel.returncode:
        pytest.skip(f"cannot build a wheel here: {wheel.stderr[-300:]}")
    (whl,) = tmp_path.glob("bnlab-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert any(n.startswith("bnlab/") for n in names)
    assert not [n for n in names if n.startswith("experiments/")], names
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(whl),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # -S: no .pth files, so the editable install's path to this checkout is
    # not on sys.path; the dependencies come from this environment
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    run = subprocess.run(
        [
            sys.executable,
            "-S",
            "-m",
            "bnlab",
            "reproduce",
            "--smoke",
            "--only",
            "feature_scale",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "checkout" in run.stderr


@pytest.mark.slow  # a subprocess
def test_reproduce_on_eight_devices_gives_the_numbers_of_one(tmp_path):
    # This process has 8 simulated devices (conftest): fit spreads the arms
    # over them. A subprocess with one device runs the same experiment. The
    # numbers agree to float32 rounding of a short run; an accuracy can move
    # by one test example (1/2000 at quick scale) when a logit is that close.
    name = "placement"
    assert jax.device_count() == 8
    one = _cli("--smoke", "--only", name, "--out", str(tmp_path / "one"), "--quiet")
    assert one.returncode == 0, one.stderr
    opts = reproduce.options(tmp_path / "eight", smoke=True, only=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (eight,) = reproduce.run(opts, show=lambda s: None)
    ref = json.loads((tmp_path / "one" / name / "verdict.json").read_text())
    assert (
        "x8" in eight["environment"]["device"] and "x1" in ref["environment"]["device"]
    )
    for a, b in zip(ref["checks"], eight["checks"], strict=True):
        np.testing.assert_allclose(
            a["measured"]["per_seed"], b["measured"]["per_seed"], atol=1e-3
        )


def _git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_provenance_dirty_counts_untracked_code(tmp_path):
    repo = tmp_path / "repo"
    for f in ("bnlab/a.py", "experiments/b.py", "README.md", ".gitignore"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("__pycache__/\n" if f == ".gitignore" else "x\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    head = _git(repo, "rev-parse", "HEAD")

    def dirty():
        prov = reproduce.provenance(repo)
        assert prov["commit"] == head
        return prov["dirty"]

    assert dirty() is False
    untracked = {
        "experiments/new.py": True,  # a new module changes what runs
        "bnlab/sub/deep/c.py": True,  # in a new directory too
        "notes.txt": False,  # outside the code
        "experiments/results/quick/verdict.json": False,  # a run's output
        "experiments/registry.json": False,  # registrations, data not code
        "bnlab/__pycache__/a.pyc": False,  # ignored
    }
    for f, expected in untracked.items():
        path = repo / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("y\n")
        assert dirty() is expected, f
        path.unlink()
    assert dirty() is False
    (repo / "README.md").write_text("changed\n")  # any tracked change counts
    assert dirty() is True


def test_provenance_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "plain").mkdir()
    prov = reproduce.provenance(tmp_path / "plain")
    assert prov["commit"] is None and prov["dirty"] is None and prov["bnlab"]


def _probe(uses_data):
    """A stand-in experiment module: one criterion, no training."""
    import types

    module = types.ModuleType("probe")
    module.NAME = "probe"
    module.CLAIM = "a probe"
    module.CRITERIA = [protocol.Criterion("c", "q", ">=", 0.0, "s")]

    def run(ctx):
        n = len(ctx.data.x_train) if uses_data else 1
        return protocol.Outcome({"c": protocol.Measured(n, n, n)})

    module.run = run
    return module


def test_each_verdict_records_the_data_it_used(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "experiments._probe_data", _probe(True))
    monkeypatch.setitem(sys.modules, "experiments._probe_none", _probe(False))
    opts = reproduce.Options(
        ["_probe_data", "_probe_none"],
        tmp_path / "out",
        "quick",
        {"_probe_data": [3000, 3001], "_probe_none": [3000, 3001]},
    )
    with_data, without = reproduce.run(opts, show=lambda s: None)
    assert with_data["provenance"]["data"] == {
        "name": "fashion_mnist_small",
        # dataset_sha256 of the shipped subset split with VALIDATION 0.1 and
        # seed 0 (9000 train, 1000 validation, 2000 test images)
        "sha256": "e2fcf08e6576c83aebe0bde613052fc55e52698a4be91eac3ed4082eeff1e833",
        "validation": 0.1,
        "validation_seed": 0,
    }
    assert without["provenance"]["data"] is None  # it loaded no dataset
    stored = json.loads((tmp_path / "out/_probe_data/verdict.json").read_text())
    assert stored["provenance"] == with_data["provenance"]
    assert {"commit", "dirty", "bnlab"} <= set(stored["provenance"])

    # the seed recorded is the one the split used: another seed, another hash
    monkeypatch.setattr(protocol, "VALIDATION_SEED", 1)
    ctx = protocol.Context("x", tmp_path / "ctx", "quick", [0])
    assert ctx.data_provenance() is None
    assert len(ctx.data.x_val) == 1000
    data = ctx.data_provenance()
    assert data["validation_seed"] == 1
    assert data["sha256"] != with_data["provenance"]["data"]["sha256"]
    assert data["sha256"] == protocol.dataset_sha256(
        bnlab_data.load("fashion_mnist_small").with_validation(0.1, seed=1)
    )


def test_dataset_sha256_sees_every_array_and_the_split():
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    y = np.arange(6, dtype=np.int32)
    ds = bnlab_data.Dataset(x, y, x[:2], y[:2], num_classes=6)
    digest = protocol.dataset_sha256(ds)
    assert digest == protocol.dataset_sha256(ds._replace(x_train=x.copy()))
    changed = [
        ds._replace(x_train=x + np.float32(1)),
        ds._replace(y_test=y[:2][::-1].copy()),
        ds._replace(x_train=x.astype(np.float64)),  # same values, other dtype
        ds._replace(num_classes=7),
        ds.with_validation(0.5, seed=0),
        ds.with_validation(0.5, seed=1),
    ]
    digests = [digest] + [protocol.dataset_sha256(d) for d in changed]
    assert len(set(digests)) == len(digests)


def test_verdict_records_each_checks_three_way_outcome():
    from types import SimpleNamespace

    module = SimpleNamespace(
        NAME="x",
        CLAIM="c",
        CRITERIA=[
            protocol.Criterion("up", "q", ">", 0.0, "s"),
            protocol.Criterion("ratio", "r", ">=", 10.0, "s", null=1.0),
            protocol.Criterion("same", "d", "within", 0.01, "s"),
        ],
    )
    ctx = SimpleNamespace(scale="full", seeds=[0, 1, 2], training=[])
    outcome = protocol.Outcome(
        {
            "up": protocol.mean_ci([0.2, 0.3, 0.25]),
            "ratio": protocol.Measured(5.0, 3.0, 8.0, (3.0, 5.0, 8.0)),
            "same": protocol.mean_ci([0.03, 0.04, 0.035]),
        }
    )
    v = reproduce.verdict_of(module, ctx, outcome, 1.0)
    got = {c["id"]: c["outcome"] for c in v["checks"]}
    assert got["up"]["outcome"] == protocol.SUPPORTED
    # between the null 1 and the threshold 10: no seed count decides it
    assert got["ratio"] == {
        "outcome": protocol.INCONCLUSIVE,
        "seeds_needed": None,
        "reason": "interval crosses 10 or 1",
    }
    assert got["same"]["outcome"] == protocol.CONTRADICTED
    # a check passes when it is SUPPORTED; one CONTRADICTED check decides
    assert [c["pass"] for c in v["checks"]] == [True, False, False]
    assert v["verdict"] == "CONTRADICTED"
    _assert_verdict_follows_its_checks(v)


def test_options_register_and_registry(tmp_path):
    from experiments import registry

    opts = reproduce.options(tmp_path, quick=True)
    assert not opts.register and opts.registry == registry.DEFAULT_PATH
    opts = reproduce.options(tmp_path, register=True, registry=tmp_path / "r.json")
    assert opts.register and opts.registry == tmp_path / "r.json"
    # registering is no run; each experiment's seeds start at the full default
    assert opts.command("placement").startswith("bnlab reproduce --seeds ")
    assert " --first-seed 4000 --only placement" in opts.command("placement")
