"""The statistics that decide verdicts (experiments/protocol.py and ghost_gap's
share_ci), on small cases computed by hand: the expected values are literals,
their arithmetic in the comments. Pure numpy, no training."""

import math

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
