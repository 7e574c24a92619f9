"""The statistics that decide verdicts (experiments/protocol.py and ghost_gap's
share_ci), on small cases computed by hand: the expected values are literals,
their arithmetic in the comments. Pure numpy, no training."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from bnlab.train.arms import Arm
from bnlab.train.result import FitResult
from experiments import ghost_gap
from experiments import protocol as P


def _result(arms, curves):
    """A FitResult of ``arms`` ``(seed, hparams)`` whose record key ``k`` at
    step ``s`` is ``curves[k][arm][i]`` for the i-th step of ``curves["step"]``
    (None: not recorded)."""
    steps = curves["step"]
    records = [
        {"step": s, "arm": i, **{k: c[i][j] for k, c in curves.items() if k != "step"}}
        for i in range(len(arms))
        for j, s in enumerate(steps)
    ]
    return FitResult(
        {},
        [Arm(i, seed, hp) for i, (seed, hp) in enumerate(arms)],
        records,
        [None] * len(arms),
        steps[-1],
    )


# ------------------------------------------------------------------- t975


@pytest.mark.parametrize(
    ("df", "quantile"),
    [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (29, 2.045)],
)
def test_t975_table_values(df, quantile):
    # Student-t 0.975 quantiles to 3 decimals (any t table)
    assert P.t975(df) == pytest.approx(quantile, abs=5e-4)


def test_t975_table_agrees_with_scipy():
    for df in range(1, 30):
        assert abs(P.t975(df) - stats.t.ppf(0.975, df)) <= 5e-4, df


@pytest.mark.parametrize(
    ("df", "quantile"),
    # beyond the table t975 is 1.96 + 2.4 / df: df=30 -> 2.040 (t: 2.042),
    # 60 -> 2.000 (2.000), 120 -> 1.980 (1.980), 10**6 -> 1.960 (z = 1.960)
    [(30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (10**6, 1.960)],
)
def test_t975_beyond_the_table(df, quantile):
    assert P.t975(df) == pytest.approx(quantile, rel=2e-3)


def test_t975_beyond_the_table_within_its_stated_precision():
    dfs = np.arange(30, 5001)
    ours = np.array([P.t975(int(d)) for d in dfs])
    rel = np.abs(ours / stats.t.ppf(0.975, dfs) - 1)
    assert rel.max() <= 2e-3  # "within 0.2 % beyond the table"
    # its limit is 1.96, z(0.975) = 1.95996 to 3 decimals
    assert P.t975(10**9) == pytest.approx(stats.norm.ppf(0.975), abs=5e-5)


def test_t975_without_degrees_of_freedom_is_infinite():
    assert P.t975(0) == math.inf  # one seed: no interval


# ---------------------------------------------------------------- steps_to


def test_steps_to_interpolates_between_evaluations():
    # reached between step 10 (0.5) and 20 (1.0): 10 + 10 * (0.75 - 0.5) / 0.5
    assert P.steps_to([0, 10, 20], [0.25, 0.5, 1.0], 0.75) == 15.0
    # reached exactly at an evaluation: 10 + 10 * (0.5 - 0.25) / (0.5 - 0.25)
    assert P.steps_to([0, 10, 20], [0.25, 0.5, 1.0], 0.5) == 10.0


def test_steps_to_first_evaluation_never_and_gaps():
    # already there at the first evaluation: its step, no interpolation
    assert P.steps_to([5, 10], [0.9, 0.95], 0.8) == 5.0
    assert P.steps_to([0, 10, 20], [0.1, 0.2, 0.3], 0.8) is None
    # no interpolation across a missing or non-finite evaluation: step 20
    assert P.steps_to([0, 10, 20], [0.25, math.nan, 1.0], 0.75) == 20.0
    assert P.steps_to([0, 10, 20], [0.25, None, 1.0], 0.75) == 20.0
    # a non-finite value never counts as reaching it
    assert P.steps_to([0, 10], [math.inf, 0.5], 0.75) is None


# ------------------------------------------------------------- usable_rate


def test_usable_rate_is_the_largest_rate_near_each_seeds_best():
    grid = (0.01, 0.1, 1.0)
    score = np.array(  # (lr, seed)
        [
            [0.80, 0.80, 0.90],
            [0.85, 0.85, 0.50],
            [0.84, 0.10, 0.50],
        ]
    )
    # seed 0: best 0.85, rates with score >= 0.83: 0.1, 1.0 -> 1.0
    # seed 1: best 0.85, only 0.1 (1.0 diverged to 0.10) -> 0.1
    # seed 2: best 0.90 at the smallest rate -> 0.01
    rates = P.usable_rate(score, grid, within=0.02)
    np.testing.assert_array_equal(rates, [1.0, 0.1, 0.01])
    assert rates.dtype == np.float64


def test_usable_rate_includes_a_score_exactly_at_the_margin():
    # best 0.75, margin 0.25: 0.5 >= 0.75 - 0.25 counts -> the top rate 1.0
    score = np.array([[0.75], [0.5]])
    np.testing.assert_array_equal(P.usable_rate(score, (0.1, 1.0), 0.25), [1.0])
    np.testing.assert_array_equal(P.usable_rate(score, (0.1, 1.0), 0.125), [0.1])


# ------------------------------------------------------------- steps_ratio


def test_steps_ratio_censors_never_reached():
    # seed 0: 10 / 5 = 2; seed 1: num never -> inf; seed 2: den never ->
    # the run length 100 (a lower bound): 30 / 100 = 0.3
    ratios, never_num, never_den = P.steps_ratio(
        [10.0, None, 30.0], [5.0, 10.0, None], run_length=100
    )
    assert ratios == [2.0, math.inf, 0.3]
    assert (never_num, never_den) == (1, 1)
    with pytest.raises(ValueError):  # paired by seed: same length
        P.steps_ratio([1.0], [1.0, 2.0], 10)


# ---------------------------------------------------------- grid_by_hparams


ARMS = [  # (seed, hparams), deliberately not in grid order
    (1, {"lr": 0.1, "norm": 1.0}),  # arm 0
    (0, {"lr": 0.01, "norm": 1.0}),  # arm 1
    (0, {"lr": 0.1, "norm": 1.0}),  # arm 2
    (1, {"lr": 0.01, "norm": 1.0}),  # arm 3
    (0, {"lr": 0.1, "norm": 2.0}),  # arm 4
    (1, {"lr": 0.3, "norm": 1.0}),  # arm 5 (no seed 0 at lr 0.3)
]


def test_grid_by_hparams_lays_out_values_by_seeds():
    # value of arm a at step s: a + s (step 20 of arm 3 not recorded)
    res = _result(
        ARMS,
        {
            "step": [10, 20],
            "v": [[a + 10, a + 20] if a != 3 else [13, None] for a in range(6)],
        },
    )
    values, grid = P.grid_by_hparams(res, "v", "lr", {"norm": 1.0})
    assert values == [0.01, 0.1, 0.3]
    nan = math.nan
    expected = [
        # rows lr 0.01 (arms 1, 3), 0.1 (arms 2, 0), 0.3 (none, arm 5)
        [[11, 13], [12, 10], [nan, 15]],
        [[21, nan], [22, 20], [nan, 25]],
    ]
    np.testing.assert_array_equal(grid, expected)
    values, grid = P.grid_by_hparams(res, "v", "lr", {"norm": 2.0})
    assert values == [0.1]
    np.testing.assert_array_equal(grid, [[[14]], [[24]]])  # arm 4, seed 0 only


# ---------------------------------------------------- plateau_scores, tune


def _lr_sweep():
    """lr 0.1 and 1.0 x seeds 0, 1; four evaluations."""
    arms = [
        (0, {"lr": 0.1}),
        (1, {"lr": 0.1}),
        (0, {"lr": 1.0}),
        (1, {"lr": 1.0}),
    ]
    return _result(
        arms,
        {
            "step": [1, 2, 3, 4],
            "val_accuracy": [
                [0.5, 0.6, 0.7, 0.8],
                [0.5, 0.6, 0.6, 0.7],
                [0.5, None, 0.9, 0.9],
                [0.5, 0.6, 0.7, None],  # stopped after step 3
            ],
            "test_accuracy": [
                [0.4, 0.5, 0.68, 0.72],
                [0.4, 0.5, 0.60, 0.64],
                [0.4, None, 0.85, 0.87],
                [0.4, 0.5, 0.66, None],
            ],
        },
    )


def test_plateau_scores_mean_of_the_window_and_divergence():
    score, diverged = P.plateau_scores(_lr_sweep(), {}, diverged_score=0.1, last=2)
    # (lr, seed): lr 0.1: (0.7 + 0.8) / 2, (0.6 + 0.7) / 2; lr 1.0: (0.9 +
    # 0.9) / 2 (its missing step 2 is outside the window), seed 1 diverged
    np.testing.assert_allclose(score, [[0.75, 0.65], [0.9, 0.1]], rtol=1e-12)
    np.testing.assert_array_equal(diverged, [[False, False], [False, True]])
    # a window of 3 reaches lr 1.0 seed 0's missing step 2: diverged too
    score, diverged = P.plateau_scores(_lr_sweep(), {}, diverged_score=0.0, last=3)
    np.testing.assert_array_equal(diverged, [[False, False], [True, True]])
    # lr 0.1: (0.6 + 0.7 + 0.8) / 3, (0.6 + 0.6 + 0.7) / 3
    np.testing.assert_allclose(score, [[0.7, 1.9 / 3], [0.0, 0.0]], rtol=1e-12)


def test_tune_a_diverged_seed_sinks_its_rate():
    t = P.tune(_lr_sweep(), last=2)
    # scores (lr, seed) over steps 3-4: lr 0.1: 0.75, 0.65 -> mean 0.70;
    # lr 1.0: 0.9 and -inf (seed 1 stopped) -> -inf: lr 0.1 is chosen
    assert (t.value, t.index, t.grid) == (0.1, 0, [0.1, 1.0])
    assert t.val == pytest.approx([0.70, -math.inf])
    # test accuracy at lr 0.1 over steps 3-4: (0.68 + 0.72) / 2, (0.60 + 0.64) / 2
    np.testing.assert_allclose(t.report, [0.70, 0.62], rtol=1e-12)
    assert t.text() == "0.1 (grid edge)"


def test_tune_at_given_steps_with_several_reports():
    t = P.tune(
        _lr_sweep(),
        steps=[3],
        report={"test": "test_accuracy", "val": "val_accuracy"},
    )
    # at step 3 only: lr 0.1: (0.7 + 0.6) / 2 = 0.65; lr 1.0: (0.9 + 0.7) / 2
    # = 0.8 -> lr 1.0; it reports step 3 at lr 1.0 per seed
    assert (t.value, t.index) == (1.0, 1)
    assert t.val == pytest.approx([0.65, 0.8])
    np.testing.assert_allclose(t.report["test"], [0.85, 0.66], rtol=1e-12)
    np.testing.assert_allclose(t.report["val"], [0.9, 0.7], rtol=1e-12)
    # steps 2-3: lr 1.0 seed 0 is missing step 2 -> -inf; lr 0.1: (0.6 + 0.7)
    # / 2 = 0.65, (0.6 + 0.6) / 2 = 0.6 -> mean 0.625
    t = P.tune(_lr_sweep(), steps=[2, 3])
    assert t.value == 0.1 and t.val == pytest.approx([0.625, -math.inf])
    # test at lr 0.1 over steps 2-3: (0.5 + 0.68) / 2, (0.5 + 0.60) / 2
    np.testing.assert_allclose(t.report, [0.59, 0.55], rtol=1e-12)


def test_tune_ties_go_to_the_first_value_and_where_filters_arms():
    arms = [(0, {"lr": 0.1, "m": 0.0}), (0, {"lr": 1.0, "m": 0.0})]
    arms += [(0, {"lr": 0.1, "m": 0.9}), (0, {"lr": 1.0, "m": 0.9})]
    res = _result(
        arms,
        {
            "step": [1],
            "val_accuracy": [[0.5], [0.5], [0.2], [0.6]],
            "test_accuracy": [[0.1], [0.2], [0.3], [0.4]],
        },
    )
    t = P.tune(res, last=1, where={"m": 0.0})  # 0.5 = 0.5: the first, lr 0.1
    assert (t.value, t.report.tolist()) == (0.1, [0.1])
    t = P.tune(res, last=1, where={"m": 0.9})  # 0.6 > 0.2: lr 1.0
    assert (t.value, t.report.tolist()) == (1.0, [0.4])


# ------------------------------------------------------- ghost_gap.share_ci


def test_share_ci_ratio_of_mean_differences_and_bootstrap_ends():
    # gap = small - large = [0.25, 0.75]; gain = ghost - large = [0.25, 0.0]
    # value = mean(gain) / mean(gap) = 0.125 / 0.5 = 0.25 (not the mean of
    # the per-seed ratios [1, 0], 0.5). Resamples of 2 seeds: both seed 0
    # -> 1.0, both seed 1 -> 0.0 (1/4 of resamples each, far above 2.5 %),
    # so the 2.5 / 97.5 percentiles are exactly 0 and 1.
    m = ghost_gap.share_ci([1.0, 1.0], [0.75, 0.25], [1.0, 0.25])
    assert m.value == 0.25
    assert (m.low, m.high) == (0.0, 1.0)
    assert m.per_seed == (1.0, 0.0)


def test_share_ci_proportional_gains_give_a_point_interval():
    # gain = 0.5 x gap for every seed: every resample's ratio is 0.5
    small = np.array([0.9, 0.8, 0.85, 0.95])
    large = np.array([0.7, 0.7, 0.75, 0.65])
    ghost = large + 0.5 * (small - large)
    m = ghost_gap.share_ci(small, large, ghost)
    assert m.value == pytest.approx(0.5)
    assert (m.low, m.high) == pytest.approx((0.5, 0.5))
    np.testing.assert_allclose(m.per_seed, [0.5] * 4)


# ------------------------------------------------------ three-way verdicts


@pytest.mark.parametrize(
    ("interval", "op", "threshold", "null", "expected"),
    [
        # a difference claimed positive (null 0 = threshold 0)
        ((0.2, 0.8), ">", 0.0, None, P.SUPPORTED),
        ((-0.3, -0.1), ">", 0.0, None, P.CONTRADICTED),
        ((-0.4, 0.0), ">", 0.0, None, P.CONTRADICTED),  # high <= 0 refutes "> 0"
        ((-0.4, 0.0), ">=", 0.0, None, P.INCONCLUSIVE),  # ... but not ">= 0"
        ((0.0, 0.4), ">=", 0.0, None, P.SUPPORTED),
        ((0.0, 0.4), ">", 0.0, None, P.INCONCLUSIVE),
        # a ratio claimed >= 10 (null 1: no effect)
        ((12.0, 20.0), ">=", 10.0, 1.0, P.SUPPORTED),
        ((0.5, 0.9), ">=", 10.0, 1.0, P.CONTRADICTED),
        ((3.0, 8.0), ">=", 10.0, 1.0, P.INCONCLUSIVE),  # an effect, smaller
        ((3.0, 8.0), ">=", 10.0, None, P.CONTRADICTED),  # null = the threshold
        # an upper bound
        ((0.2, 0.9), "<", 1.0, None, P.SUPPORTED),
        ((1.0, 1.5), "<", 1.0, None, P.CONTRADICTED),  # low >= 1 refutes "< 1"
        ((1.0, 1.5), "<=", 1.0, None, P.INCONCLUSIVE),
        ((0.8, 1.2), "<=", 1.0, None, P.INCONCLUSIVE),
        # little difference: two one-sided tests against a margin of 0.01
        ((-0.005, 0.008), "within", 0.01, None, P.SUPPORTED),
        ((0.012, 0.03), "within", 0.01, None, P.CONTRADICTED),
        ((-0.03, -0.02), "within", 0.01, None, P.CONTRADICTED),
        ((-0.02, 0.02), "within", 0.01, None, P.INCONCLUSIVE),
        ((0.005, 0.02), "within", 0.01, None, P.INCONCLUSIVE),
    ],
)
def test_decide_three_outcomes(interval, op, threshold, null, expected):
    assert P.decide(*interval, op, threshold, null).outcome == expected


@pytest.mark.parametrize(
    ("interval", "op", "threshold", "null", "n", "needed"),
    [
        # centre 0.2, half-width 0.3, 0.2 from 0: 5 * (0.3 / 0.2)^2 = 11.25
        ((-0.1, 0.5), ">", 0.0, None, 5, 12),
        # centre -0.2 below 0, half 0.2 = distance: 5 * 1 = 5, so one more
        ((-0.4, 0.0), ">=", 0.0, None, 5, 6),
        # centre 11, half 3, 1 above 10: 5 * 9 = 45
        ((8.0, 14.0), ">=", 10.0, 1.0, 5, 46),
        # centre 5.5 between the null 1 and the threshold 10: never decided
        ((3.0, 8.0), ">=", 10.0, 1.0, 5, None),
        # centre on the threshold: never decided
        ((0.8, 1.2), "<=", 1.0, None, 4, None),
        # equivalence: centre 0.5, half 0.75, 0.5 inside the margin 1
        ((-0.25, 1.25), "within", 1.0, None, 5, 12),
        # centre 1.5 outside the margin 1, half 0.75: 5 * (0.75 / 0.5)^2
        ((0.75, 2.25), "within", 1.0, None, 5, 12),
        ((0.0, 2.0), "within", 1.0, None, 5, None),  # centre on the margin
        ((-0.1, 0.5), ">", 0.0, None, None, None),  # seeds unknown
    ],
)
def test_decide_names_the_seeds_that_would_decide(
    interval, op, threshold, null, n, needed
):
    d = P.decide(*interval, op, threshold, null, n=n)
    assert (d.outcome, d.seeds_needed) == (P.INCONCLUSIVE, needed)


def test_decide_a_decided_interval_asks_for_no_seeds():
    assert P.decide(0.2, 0.8, ">", 0.0, n=5).seeds_needed is None
    assert P.decide(-0.3, -0.1, ">", 0.0, n=5).seeds_needed is None


def test_decide_premise_absent_is_not_testable():
    d = P.decide(0.2, 0.8, ">", 0.0, n=5, premise=False)
    assert (d.outcome, d.seeds_needed) == (P.NOT_TESTABLE, None)
    assert "premise" in d.reason


def test_decide_without_an_interval_is_inconclusive():
    assert P.decide(math.nan, math.nan, ">", 0.0, n=5).outcome == P.INCONCLUSIVE
    d = P.decide(-math.inf, math.inf, ">", 0.0, n=5)
    assert (d.outcome, d.seeds_needed) == (P.INCONCLUSIVE, None)


def test_decide_refuses_a_null_on_the_supporting_side_and_bad_margins():
    with pytest.raises(ValueError, match="supporting side"):
        P.decide(0.0, 1.0, ">=", 10.0, null=20.0)
    with pytest.raises(ValueError, match="supporting side"):
        P.decide(0.0, 1.0, "<", 1.0, null=0.5)
    with pytest.raises(ValueError, match="margin"):
        P.decide(0.0, 1.0, "within", 0.0)
    with pytest.raises(ValueError, match="op"):
        P.decide(0.0, 1.0, "==", 0.0)


def test_decide_check_takes_the_scale_the_null_and_the_seed_count():
    c = P.Criterion("r", "ratio", ">=", {"quick": 2.0, "full": 10.0}, "s", null=1.0)
    m = P.Measured(11.0, 8.0, 14.0, (1.0,) * 5)
    assert P.decide_check(c, m, "quick").outcome == P.SUPPORTED
    assert P.decide_check(c, m, "full") == P.decide(8.0, 14.0, ">=", 10.0, 1.0, n=5)
    assert P.decide_check(c, m, "full").seeds_needed == 46


def test_supported_is_pass_on_every_committed_check():
    # decide's SUPPORTED is judge's PASS (the same whole-interval rule), so the
    # three outcomes can replace PASS/FAIL without moving a committed pass.
    import json

    root = Path(__file__).resolve().parents[1] / "experiments" / "results"
    checks = [
        c
        for f in sorted(root.glob("**/verdict.json"))
        for c in json.loads(f.read_text())["checks"]
    ]
    assert checks
    for c in checks:
        lo, hi = c["measured"]["ci"]
        if lo is None or hi is None:
            continue
        premise = (c.get("premise") or {"holds": True})["holds"]
        d = P.decide(lo, hi, c["op"], c["threshold"], c.get("null"), None, premise)
        assert (d.outcome == P.SUPPORTED) == c["pass"], c


# --------------------------------------- statistics fit for the quantity


def test_largest_usable_rate_bisects_to_the_stated_precision():
    tried = []

    def usable(lr):
        tried.append(lr)
        return lr <= 0.3

    r = P.largest_usable_rate(usable, 0.01, 10.0, rel_precision=0.01)
    assert tried[:2] == [10.0, 0.01]  # the ends first
    assert r.rate <= 0.3 < r.upper <= r.rate * 1.01 and r.censored == ""
    # the bracket 1000x halves in log per call: 1000 ** (1 / 2^k) <= 1.01
    # needs 2^k >= log(1000) / log(1.01) = 694.2, so k = 10 (and the 2 ends)
    assert r.calls == len(tried) == 12
    assert all(math.isclose(a, math.sqrt(10.0 * 0.01)) for a in tried[2:3])


def test_largest_usable_rate_censored_at_either_end():
    r = P.largest_usable_rate(lambda lr: True, 0.01, 10.0)
    assert (r.rate, r.upper, r.censored, r.calls) == (10.0, None, "high", 1)
    r = P.largest_usable_rate(lambda lr: False, 0.01, 10.0)
    assert math.isnan(r.rate) and (r.upper, r.censored, r.calls) == (0.01, "low", 2)
    with pytest.raises(ValueError, match="low < high"):
        P.largest_usable_rate(lambda lr: True, 1.0, 1.0)
    with pytest.raises(ValueError, match="rel_precision"):
        P.largest_usable_rate(lambda lr: True, 0.1, 1.0, rel_precision=0)


@pytest.mark.parametrize(
    ("k", "n", "p_value"),
    [
        (5, 5, 0.0625),  # 2 * 0.5^5
        (0, 5, 0.0625),
        (3, 5, 1.0),  # every outcome is at most as likely as 3 of 5
        (8, 10, 0.109375),  # (1 + 10 + 45) * 2 / 1024
        (10, 10, 0.001953125),  # 2 / 1024
    ],
)
def test_exact_sign_test_p_values(k, n, p_value):
    assert P.exact_sign_test(k, n).p_value == pytest.approx(p_value, rel=1e-12)


def test_exact_sign_test_clopper_pearson_ends():
    r = P.exact_sign_test(5, 5)  # P(X >= 5 | p) = p^5 = 0.025
    assert (r.low, r.high) == pytest.approx((0.025**0.2, 1.0), abs=1e-12)
    r = P.exact_sign_test(0, 5)
    assert (r.low, r.high) == pytest.approx((0.0, 1 - 0.025**0.2), abs=1e-12)
    for k, n in [(3, 5), (8, 10), (1, 7), (17, 30)]:
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        r = P.exact_sign_test(k, n)
        assert (r.low, r.high) == pytest.approx((ref.low, ref.high), abs=1e-9)
        assert r.p_value == pytest.approx(stats.binomtest(k, n).pvalue, rel=1e-9)
    with pytest.raises(ValueError):
        P.exact_sign_test(6, 5)


def test_bootstrap_mean_ci_over_examples():
    m = P.bootstrap_mean_ci(np.ones(50), n_boot=200, seed=0)
    assert (m.value, m.low, m.high) == (1.0, 1.0, 1.0)
    x = np.r_[np.ones(80), np.zeros(20)]
    m = P.bootstrap_mean_ci(x, n_boot=4000, seed=0)
    # 0.8 +- 1.96 * sqrt(0.8 * 0.2 / 100) = 0.8 +- 0.078
    assert m.value == 0.8
    assert m.low == pytest.approx(0.722, abs=0.015)
    assert m.high == pytest.approx(0.878, abs=0.015)
    assert m == P.bootstrap_mean_ci(x, n_boot=4000, seed=0)  # seeded
    assert "100 test examples" in m.note


def test_bootstrap_mean_ci_resamples_the_same_examples_for_every_seed():
    # seed 2 is right exactly where seed 1 is wrong: every resample of shared
    # examples averages to 0.5; independent resampling would spread it
    a = (np.arange(40) % 3 == 0).astype(float)
    m = P.bootstrap_mean_ci(np.stack([a, 1 - a]), n_boot=500, seed=1)
    assert (m.value, m.low, m.high) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="examples"):
        P.bootstrap_mean_ci(np.ones((2, 2, 2)))


def test_sensitivity_judges_every_neighbour():
    seen = []

    def judge(t):
        seen.append(t)
        return "PASS" if t <= 0.97 else "FAIL"

    assert P.sensitivity(judge, 0.99, [1.0, 0.95, 0.99]) == {
        0.95: "PASS",
        0.99: "FAIL",
        1.0: "FAIL",
    }
    assert seen == [0.95, 0.99, 1.0]  # once each, in order


# ----------------------------------------------- equal tuning and plateaus


def test_extension_steps_past_the_chosen_edge_within_limits():
    assert P.extension([0.1, 0.01, 1.0], 2, 10.0, (1e-4, 100.0)) == ("top", 10.0)
    assert P.extension([0.01, 0.1, 1.0], 0, 3.0, (1e-4, 100.0)) == (
        "bottom",
        pytest.approx(0.01 / 3),
    )
    assert P.extension([0.01, 0.1, 1.0], 1, 10.0, (1e-4, 100.0)) is None
    assert P.extension([0.01, 0.1, 1.0], 2, 10.0, (1e-4, 5.0)) is None  # limit
    assert P.extension([0.5], 0, 10.0, (0, 100)) is None  # one value: no edge
    with pytest.raises(ValueError, match="exceed 1"):
        P.extension([0.01, 0.1], 1, 1.0, (0, 1))


def _fake_fit(best: dict, calls: list):
    """A Context.fit whose validation accuracy peaks at ``best[arm]`` (in
    log10 lr) for each arm code, and diverges (NaN) above lr 30."""
    from bnlab.train.arms import Arm
    from bnlab.train.result import FitResult

    def fit(self, group, model, *, hparams, seeds=(0, 1), **kw):
        calls.append((group, [dict(h) for h in hparams]))
        arms, records = [], []
        for i, (h, s) in enumerate((h, s) for h in hparams for s in seeds):
            arms.append(Arm(i, s, h))
            peak = best[h["arm"]]
            acc = 0.9 - 0.05 * (np.log10(h["lr"]) - peak) ** 2
            for step in (1, 2, 3):
                v = float("nan") if h["lr"] > 30 else acc * step / 3
                records.append(
                    {"step": step, "arm": i, "val_accuracy": v, "test_accuracy": v}
                )
        return FitResult({}, arms, records, [None] * len(arms), 3)

    return fit


def test_fit_grid_extends_every_arm_whose_choice_is_an_edge(tmp_path, monkeypatch):
    calls = []
    # arm 0 peaks at lr 10 (past the top), arm 1 at 0.1 (interior)
    monkeypatch.setattr(P.Context, "fit", _fake_fit({0.0: 1.0, 1.0: -1.0}, calls))
    ctx = P.Context("x", tmp_path, "quick", [0, 1])
    grid = ctx.fit_grid(
        "arms",
        None,
        arms=[{"arm": 0.0}, {"arm": 1.0}],
        grid=[0.01, 0.1, 1.0],
        tune_kw={"last": 1},
        steps=3,
    )
    assert [g for g, _ in calls] == ["arms", "arms+1", "arms+2"]
    assert calls[1][1] == [{"arm": 0.0, "lr": pytest.approx(10.0)}]  # only arm 0
    assert calls[2][1] == [{"arm": 0.0, "lr": pytest.approx(100.0)}]
    t0, t1 = (
        grid.tune(where={"arm": 0.0}, last=1),
        grid.tune(where={"arm": 1.0}, last=1),
    )
    assert t0.value == pytest.approx(10.0) and "edge" not in t0.text()  # 100 diverged
    assert t1.value == pytest.approx(0.1) and grid.values({"arm": 1.0}) == [
        0.01,
        0.1,
        1.0,
    ]
    assert [e["edge"] for e in grid.extensions] == ["top", "top"]


def test_fit_grid_stops_at_the_stated_limit_and_marks_the_edge(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(P.Context, "fit", _fake_fit({0.0: -5.0}, calls))
    ctx = P.Context("x", tmp_path, "quick", [0, 1])
    grid = ctx.fit_grid(
        "g", None, arms=[{"arm": 0.0}], grid=[0.01, 0.1], tune_kw={"last": 1}, steps=3
    )
    # at most MAX_EXTENSIONS values past the bottom, then the edge is marked
    assert len(calls) == 1 + P.MAX_EXTENSIONS
    t = grid.tune(where={"arm": 0.0}, last=1)
    assert t.value == pytest.approx(1e-4) and t.text().endswith("(grid edge)")


def test_fit_grid_does_not_extend_at_smoke_scale(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(P.Context, "fit", _fake_fit({0.0: 1.0}, calls))
    ctx = P.Context("x", tmp_path, "smoke", [0, 1])
    ctx.fit_grid("g", None, arms=[{"arm": 0.0}], grid=[0.01, 0.1], steps=3)
    assert len(calls) == 1


def _curve_result(values):
    from bnlab.train.arms import Arm
    from bnlab.train.result import FitResult

    records = [
        {"step": i + 1, "arm": 0, "val_accuracy": v} for i, v in enumerate(values)
    ]
    return FitResult({}, [Arm(0, 0, {"lr": 0.1})], records, [None], len(values))


def test_plateau_compares_the_last_third_with_the_evaluation_before_it():
    # 6 evaluations: the last 2 against the 4th
    flat = _curve_result([0.5, 0.7, 0.8, 0.850, 0.853, 0.854])
    rising = _curve_result([0.5, 0.7, 0.8, 0.850, 0.853, 0.856])
    p = P.plateau(flat, {}, "lr", 0.1)
    assert p.holds and "+0.0040" in p.text
    p = P.plateau(rising, {}, "lr", 0.1)
    assert not p.holds and "still rising" in p.text
    assert not P.plateau(_curve_result([0.5, 0.6]), {}, "lr", 0.1).holds
