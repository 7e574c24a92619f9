"""Hand-computed cases for the statistics added in issue 21 to lr_robustness
(largest usable rate by bisection, many bisections per round; the ratio with
its censoring) and conv_claims (the >= 10x claim as an exact count from grid
brackets)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from bnlab.train.arms import make_arms
from experiments import conv_claims, ioffe_fig1, ioffe_table, lr_robustness
from experiments import protocol as P

L = lr_robustness


def test_docstring_examples_run():
    # experiments/ is outside pytest's doctest paths
    for module in (lr_robustness, conv_claims):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted


# ------------------------------------------------------- lr_robustness


def test_grid_bracket_is_the_largest_usable_value_and_the_next():
    values = [0.03, 0.1, 0.3, 1.0, 3.0]
    score = np.array([0.80, 0.85, 0.845, 0.83, 0.1])
    no = np.zeros(5, bool)
    # best 0.85: within 0.01 are 0.1 and 0.3 (0.845), not 1.0 (0.83)
    assert L.grid_bracket(values, score, no, 0.01) == (0.3, 1.0, "")
    # within 0.02 reaches 1.0 (0.83 = 0.85 - 0.02)
    assert L.grid_bracket(values, score, no, 0.02) == (1.0, 3.0, "")
    # a diverged value is never usable, whatever its score
    div = np.array([False, False, True, False, False])
    assert L.grid_bracket(values, score, div, 0.01) == (0.1, 0.3, "")
    # usable at the top: censored
    flat = np.full(5, 0.8)
    assert L.grid_bracket(values, flat, no, 0.01) == (3.0, None, "high")
    lo, hi, c = L.grid_bracket(values, flat, np.ones(5, bool), 0.01)
    assert math.isnan(lo) and hi is None and c == "none"


def _runs(limits: dict):
    """A fake evaluate: (seed, arm, lr) is usable (score 0.9) iff lr <= the
    seed and arm's limit, else diverged; records each round's needs."""
    calls = []

    def evaluate(round_, needs):
        calls.append((round_, {s: set(n) for s, n in needs.items()}))
        return {
            (s, arm, lr): (0.9, False) if lr <= limits[(s, arm)] else (0.1, True)
            for s, need in needs.items()
            for arm, lr in need
        }

    return evaluate, calls


def test_bisect_rates_matches_one_bisection_at_a_time():
    limits = {(0, 0.0): 0.2, (0, 1.0): 5.0, (1, 0.0): 0.5, (1, 1.0): 2.5}
    brackets = {
        ("base", 0): (0, 0.0, 0.1, 0.3, 0.9, 0.01),
        ("bn", 0): (0, 1.0, 3.0, 10.0, 0.9, 0.01),
        ("base", 1): (1, 0.0, 0.3, 1.0, 0.9, 0.01),
        ("bn", 1): (1, 1.0, 1.0, 3.0, 0.9, 0.01),
    }
    scores = {}
    for s, arm, lo, hi, *_ in brackets.values():
        scores[(s, arm, lo)] = (0.9, False)
        scores[(s, arm, hi)] = (0.1, True)
    evaluate, calls = _runs(limits)
    found, rounds = L.bisect_rates(brackets, scores, evaluate, 0.2)
    # brackets of a factor 3 or 3.33: 3 halvings leave 3**(1/8) = 1.147 and
    # 3.33**(1/8) = 1.162, both <= 1.2, and 2 would leave 1.32 and 1.35
    assert rounds == 3 and [r for r, _ in calls] == [1, 2, 3]
    for key, (s, arm, lo, hi, *_) in brackets.items():
        t = limits[(s, arm)]
        u = found[key]
        alone = P.largest_usable_rate(lambda lr, t=t: lr <= t, lo, hi, 0.2)
        assert u.rate == pytest.approx(alone.rate) and u.upper == pytest.approx(
            alone.upper
        )
        assert u.rate <= t < u.upper and u.upper / u.rate <= 1.2 and u.censored == ""
    # round 1 asks each seed for both arms' geometric midpoints
    assert calls[0][1] == {
        0: {(0.0, math.sqrt(0.03)), (1.0, math.sqrt(30.0))},
        1: {(0.0, math.sqrt(0.3)), (1.0, math.sqrt(3.0))},
    }


def test_bisect_rates_shares_runs_between_bisections():
    # two usability rules on one seed and arm with the same bracket: round 1
    # needs one run for both
    brackets = {
        "a": (0, 0.0, 0.1, 0.3, 0.9, 0.01),
        "b": (0, 0.0, 0.1, 0.3, 0.9, 0.02),
    }
    scores = {(0, 0.0, 0.1): (0.9, False), (0, 0.0, 0.3): (0.85, False)}
    evaluate, calls = _runs({(0, 0.0): 0.2})
    L.bisect_rates(brackets, scores, evaluate, 0.2)
    assert calls[0][1] == {0: {(0.0, math.sqrt(0.03))}}


def test_usable_ratio_and_its_censoring():
    def u(lo, hi, c=""):
        return P.UsableRate(lo, hi, c, 3)

    # per seed: BN 4.2 / 0.42 = 10 and 9 / 0.3 = 30 (geometric midpoints)
    bn = [u(4.0, 4.41), u(8.1, 10.0)]
    base = [u(0.4, 0.441), u(0.3, 0.3)]
    m, p = L.usable_ratio(bn, base)
    logs = np.log([10.0, 30.0])
    half = 12.706 * abs(logs[1] - logs[0]) / 2  # t(0.975, 1) * sd / sqrt(2)
    assert m.value == pytest.approx(math.sqrt(300))
    assert m.low == pytest.approx(math.exp(logs.mean() - half), rel=1e-4)
    assert m.high == pytest.approx(math.exp(logs.mean() + half), rel=1e-4)
    assert p.holds
    # a BN seed usable at the top: counted there, upper end infinite
    m, p = L.usable_ratio([u(4.0, 4.41), u(10.0, None, "high")], base)
    assert m.per_seed[1] == pytest.approx(10.0 / 0.3) and m.high == math.inf
    assert math.isfinite(m.low) and p.holds
    # a baseline seed with no limit in its grid: no ratio (premise absent)
    _, p = L.usable_ratio(bn, [u(0.4, 0.441), u(10.0, None, "high")])
    assert not p.holds and "1 seed" in p.text
    assert math.isnan(L.rate_estimate(u(math.nan, None, "none")))


def test_fit_arms_are_settings_outermost_then_seeds():
    # lr_robustness reads a bisection fit's curves at k * len(seeds) + j
    arms = make_arms([5, 7], [{"lr": 1.0}, {"lr": 2.0}])
    assert [(a.hparams["lr"], a.seed) for a in arms] == [
        (1.0, 5),
        (1.0, 7),
        (2.0, 5),
        (2.0, 7),
    ]


# -------------------------------------------------------- conv_claims

C = conv_claims


def test_bracket_and_meets_range():
    values = [0.03, 0.1, 0.3, 1.0, 3.0]
    no = np.zeros(5, bool)
    score = np.array([0.7, 0.8, 0.2, 0.1, 0.1])
    assert C.bracket(values, score, no, 0.01) == (0.1, 0.3)
    assert C.bracket(values, np.full(5, 0.8), no, 0.01) == (3.0, math.inf)
    # sure: BN's lo 3 >= 10 x SkipInit's hi 0.3
    assert C.meets_range((3.0, 10.0), (0.1, 0.3), 10) == 1.0
    # surely not: BN's hi 1 <= 10 x SkipInit's lo 0.1
    assert C.meets_range((0.3, 1.0), (0.1, 0.3), 10) == 0.0
    # straddles: BN in [1, 3), SkipInit in [0.1, 0.3): ratio in (3.3, 30)
    assert C.meets_range((1.0, 3.0), (0.1, 0.3), 10) == 0.5
    # SkipInit usable at its top: never surely met; BN usable at its top:
    # never surely missed
    assert C.meets_range((3.0, 10.0), (0.1, math.inf), 10) == 0.5
    assert C.meets_range((3.0, math.inf), (1.0, 3.0), 10) == 0.5
    assert C.meets_range((0.3, 1.0), (0.1, math.inf), 10) == 0.0


def test_share_meeting_is_conservative_on_each_side():
    # 0 of 6 surely met: Clopper-Pearson upper end 1 - 0.025 ** (1 / 6)
    m = C.share_meeting([0.0] * 6)
    assert m.value == 0.0 and m.low == 0.0
    assert m.high == pytest.approx(1 - 0.025 ** (1 / 6), abs=1e-6)
    assert P.decide(m.low, m.high, ">", 0.5).outcome == P.CONTRADICTED
    # 5 of 5 cannot support "> 0.5": its lower end 0.025 ** (1 / 5) = 0.478
    m = C.share_meeting([1.0] * 5)
    assert m.low == pytest.approx(0.025**0.2, abs=1e-6)
    assert P.decide(m.low, m.high, ">", 0.5).outcome == P.INCONCLUSIVE
    # an undetermined seed counts as missed at the lower end, met at the upper
    m = C.share_meeting([1.0] * 6 + [0.5])
    assert m.low == pytest.approx(P.exact_sign_test(6, 7).low)
    assert m.high == 1.0 and m.value == pytest.approx(6.5 / 7)


# ----------------------------------------------- registered constants


def test_registered_constants_are_unchanged():
    # issue 21: free constants stay as registered before the pilots; their
    # neighbours are reported as sensitivity rows
    assert ioffe_table.THRESHOLD_FRACTION == 0.95
    assert ioffe_table.FRACTION_NEIGHBOURS == (0.9, 0.99)
    assert L.WITHIN == 0.01 and L.WITHIN_NEIGHBOURS == (0.005, 0.02)
    faster = ioffe_fig1.CRITERIA[0]
    assert (faster.op, faster.threshold, faster.null) == ("<=", 0.5, 1.0)
