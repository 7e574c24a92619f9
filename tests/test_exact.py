"""experiments.exact: counts of seeds and every-seed claims, on hand-computed
cases, and the outcomes protocol.decide gives them."""

import math

import numpy as np
import pytest

from experiments import exact
from experiments import protocol as P


def test_share_above_counts_seeds_that_train_with_clopper_pearson():
    # 0 of 6 above chance + 0.05: upper end 1 - 0.025 ** (1 / 6) = 0.4593
    m = exact.share_above([0.1] * 6, 0.15, "train")
    assert m.value == 0.0 and m.low == 0.0
    assert m.high == pytest.approx(1 - 0.025 ** (1 / 6), abs=1e-9)
    assert m.per_seed == (0.0,) * 6
    assert m.note.startswith("0 of 6 seeds train (> 0.15)")
    # 0 of 5 cannot leave 0.5: upper end 1 - 0.025 ** (1 / 5) = 0.5218
    five = exact.share_above([0.1] * 5, 0.15, "train")
    assert five.high == pytest.approx(0.5218, abs=1e-4)
    assert P.decide(five.low, five.high, "<", 0.5, None, 5).outcome == "INCONCLUSIVE"
    assert P.decide(m.low, m.high, "<", 0.5, None, 6).outcome == "SUPPORTED"
    # 10 of 10 train: lower end 0.025 ** (1 / 10) = 0.6915, most seeds train
    most = exact.share_above(np.linspace(0.5, 0.7, 10), 0.15, "train")
    assert most.low == pytest.approx(0.025**0.1, abs=1e-9) and most.high == 1.0
    assert P.decide(most.low, most.high, "<", 0.5).outcome == "CONTRADICTED"


def test_share_above_is_strict_and_counts_a_diverged_seed_as_not_above():
    m = exact.share_above([0.15, math.nan, 0.16], 0.15, "train")
    assert m.per_seed == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="one value per seed"):
        exact.share_above([], 0.15, "train")


def test_share_meeting_checks_its_values():
    assert exact.share_meeting([1.0, 0.0, 0.5]).value == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"0, 0\.5 or 1"):
        exact.share_meeting([0.3])


def test_every_seed_judges_the_worst_seed():
    m = exact.every_seed([0.0, 0.004, 0.0], "|a - b|")
    assert (m.value, m.low, m.high) == (0.004, 0.004, 0.004)
    assert m.per_seed == (0.0, 0.004, 0.0)
    assert "worst of 3 seeds" in m.note and m.note.startswith("|a - b|")
    assert P.decide(m.low, m.high, "<=", 0.005).outcome == "SUPPORTED"
    # one seed past the margin contradicts a claim about every seed, even
    # when the others tie at 0
    one = exact.every_seed([0.0, 0.0, 0.0, 0.02])
    assert P.decide(one.low, one.high, "<=", 0.01, None, 4).outcome == "CONTRADICTED"
    # a failed seed (NaN) contradicts too
    nan = exact.every_seed([0.0, math.nan])
    assert math.isinf(nan.value)
    assert P.decide(nan.low, nan.high, "<=", 0.01).outcome == "CONTRADICTED"


def test_share_within_counts_seeds_inside_the_margin():
    # 6 of 6 within: lower end 0.025 ** (1 / 6) = 0.5407 > 0.5
    m = exact.share_within([0.0, 0.0, -0.009, 0.0, 0.01, 0.0], 0.01, "agree")
    assert m.per_seed == (1.0,) * 6
    assert m.low == pytest.approx(0.025 ** (1 / 6), abs=1e-9)
    assert P.decide(m.low, m.high, ">", 0.5).outcome == "SUPPORTED"
    # 5 of 5 cannot decide a majority
    five = exact.share_within([0.0] * 5, 0.01, "agree")
    assert P.decide(five.low, five.high, ">", 0.5, None, 5).outcome == "INCONCLUSIVE"
    # most seeds outside (a NaN is outside): contradicted
    out = exact.share_within([0.02, -0.03, math.nan, 0.05, 0.02, 0.04], 0.01, "x")
    assert out.per_seed == (0.0,) * 6
    assert P.decide(out.low, out.high, ">", 0.5).outcome == "CONTRADICTED"


def test_ioffe_fig1_plateau_compares_the_means_of_the_last_two_thirds():
    from experiments.ioffe_fig1 import plateau_by_thirds

    flat = np.r_[np.linspace(0.1, 0.8, 4), 0.85 + 0.004 * (-1.0) ** np.arange(8)]
    assert plateau_by_thirds(flat).holds  # noise around a level is no rise
    p = plateau_by_thirds(np.linspace(0.1, 0.8, 12))
    assert not p.holds and "still rising" in p.text and "last 4 of 12" in p.text
    # rises of 0.0049 and 0.005 straddle the rule (PLATEAU_RISE = 0.005)
    assert plateau_by_thirds(np.r_[[0.0] * 3, [0.8] * 3, [0.8049] * 3]).holds
    assert not plateau_by_thirds(np.r_[[0.0] * 3, [0.8] * 3, [0.8051] * 3]).holds
    assert not plateau_by_thirds([0.5, np.nan]).holds  # too short to judge
