"""Hand-computed cases for the statistics added to ghost_gap and sync_bn in
issue 21: ghost_gap's grid extension over several evaluation windows and
sync_bn's equivalence margin (the resolution of one test accuracy)."""

from __future__ import annotations

import pytest

from bnlab.train.arms import Arm
from bnlab.train.result import FitResult
from experiments import ghost_gap, sync_bn


class _Ctx:
    """A stand-in for protocol.Context: ``fit`` records its calls and returns
    arms whose validation accuracy at step 1 falls with the lr and at step 2
    rises with it (so the two windows choose opposite edges), or, with
    ``same``, falls at both."""

    smoke = False

    def __init__(self, same: bool = False):
        self.same = same
        self.calls: list[tuple[str, list[float]]] = []

    def fit(self, group, model, hparams, **kw):
        self.calls.append((group, [h["lr"] for h in hparams]))
        arms = [Arm(i, 0, dict(h)) for i, h in enumerate(hparams)]
        records = []
        for a in arms:
            lr = a.hparams["lr"]
            late = -lr if self.same else lr
            records.append({"step": 1, "arm": a.index, "val_accuracy": -lr})
            records.append({"step": 2, "arm": a.index, "val_accuracy": late})
        return FitResult({}, arms, records, [None] * len(arms), 2)


def test_windows_extend_each_edge_their_choice_sits_on_within_limits():
    ctx = _Ctx()
    grid = ghost_gap.fit_grid_windows(
        ctx,
        "g",
        None,
        arms=[{"norm": 1.0}],
        grid=[1.0, 2.0, 4.0],
        windows=[[1], [2]],
        limits=(0.3, 10.0),
    )
    # round 1: bottom 1 / 2 = 0.5 (window [1]) and top 4 * 2 = 8 (window [2]);
    # round 2: 0.25 < 0.3 and 16 > 10 leave the limits: no third fit
    assert ctx.calls == [("g", [1.0, 2.0, 4.0]), ("g+1", [0.5, 8.0])]
    assert [(e["edge"], e["lr"]) for e in grid.extensions] == [
        ("bottom", 0.5),
        ("top", 8.0),
    ]
    assert grid.values({"norm": 1.0}) == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_two_windows_on_one_edge_add_one_value_and_stop_at_the_cap():
    ctx = _Ctx(same=True)
    grid = ghost_gap.fit_grid_windows(
        ctx,
        "g",
        None,
        arms=[{"norm": 1.0}],
        grid=[1.0, 2.0, 4.0],
        windows=[[1], [2]],
        limits=(0.01, 10.0),
    )
    # one value per round, not two; MAX_EXTENSIONS (2) values past the end
    assert ctx.calls == [("g", [1.0, 2.0, 4.0]), ("g+1", [0.5]), ("g+2", [0.25])]
    assert len(grid.extensions) == 2


def test_smoke_never_extends():
    ctx = _Ctx()
    ctx.smoke = True
    ghost_gap.fit_grid_windows(
        ctx, "g", None, arms=[{}], grid=[1.0, 2.0], windows=[[1]], limits=(0, 9)
    )
    assert len(ctx.calls) == 1


@pytest.mark.parametrize(
    ("n", "margin"),
    # 1.96 * sqrt(0.25 / n): 0.0098 -> 0.010, 0.02191 -> 0.022, 0.0031 -> 0.003
    [(10000, 0.010), (2000, 0.022), (100000, 0.003)],
)
def test_sync_margin_is_one_accuracy_resolution(n, margin):
    assert sync_bn.resolution(n) == margin


def test_sync_margins_by_scale():
    assert sync_bn.MARGIN == {"quick": 0.022, "full": 0.010}
