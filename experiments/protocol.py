"""The method every experiment follows, as code: where it trains (through
:func:`bnlab.train.fit`), how it selects, how it judges.

- **Data.** Full runs use Fashion-MNIST (28x28, 60k/10k); quick runs a
  shipped subset (14x14, 10k/2k, :func:`bnlab.data.load` of
  ``"fashion_mnist_small"``). A fixed 10 % of the training set (split seed
  0) is the validation split: every choice (learning rate, best step,
  thresholds) is made on it; the test set only reports.
- **Seeds.** Seeds 0-2999 are pilot seeds: designs were explored on them
  (committed under ``experiments/results/pilots/``) and they never judge.
  Judging runs use fresh seeds: quick runs 3000 on, the confirmatory full
  run 4000 on, as registered.
- **Arms.** Compared arms get the same tuning budget: each its own grid of
  learning rates, the best chosen on validation; where an arm's choice is
  an end of its grid the grid extends past it (for every arm alike) until
  the choice is interior or two values were added (tables mark a remaining
  edge). Arms with the same seed share initialization and data order, so
  comparisons are paired by seed.
- **Intervals.** Every measured quantity is a mean over seeds (or over
  per-seed paired differences / log ratios) with a 95 % Student-t interval
  (``ddof=1``), on a continuous quantity (never on a grid's values: a
  largest usable rate is bisected, counts get an exact test). Accuracy
  intervals are over seeds on the fixed test set: the claims compare
  training methods on this benchmark's test set, and replications vary the
  seeds, not the test images.
- **Outcomes.** Each check is SUPPORTED (the whole interval clears the
  criterion), CONTRADICTED (it lies wholly past the null, the value of no
  effect, or outside an equivalence margin: two one-sided tests),
  INCONCLUSIVE (with the seeds that would decide) or NOT TESTABLE (the
  claim's premise, e.g. a gap to close, is absent in the run; its numbers
  are shown). A claim is CONTRADICTED if any check is, SUPPORTED if all
  are, else INCONCLUSIVE (or NOT TESTABLE). A free constant's row shows the
  outcome at its neighbouring values.
- **Regimes.** Final-accuracy claims check a plateau (validation accuracy
  rose less than 0.5 points over the last third of training) per arm, or
  state the shorter regime they test.
- **Registration.** Criteria are data (:class:`Criterion`: quantity,
  operator, threshold per scale, null, source). Before a judging run each
  experiment's design digest (module, protocol, criteria), seeds and power
  plan (seeds from the pilots' spread, 5 to 10) are registered and
  committed (:mod:`experiments.registry`); a verdict is confirmatory only
  if a registration in the run's commit matches its design and seeds. A
  changed design keeps the old one and its result (generated from its
  pilot) in the experiment's ``HISTORY``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnlab.linen
from bnlab import data as bn_data
from bnlab.models import kernel_init
from bnlab.train import fit

__all__ = [
    "CONTRADICTED",
    "INCONCLUSIVE",
    "NOT_TESTABLE",
    "SUPPORTED",
    "Context",
    "Criterion",
    "Decision",
    "Grid",
    "Measured",
    "NormMLP",
    "Outcome",
    "Premise",
    "Sensitivity",
    "SignTest",
    "Tuned",
    "UsableRate",
    "best_by",
    "bn",
    "bootstrap_mean_ci",
    "dataset_sha256",
    "decide",
    "decide_check",
    "exact_sign_test",
    "extension",
    "grid_by_hparams",
    "judge",
    "largest_usable_rate",
    "make_accuracy",
    "mean_ci",
    "paired_ci",
    "plateau",
    "plateau_scores",
    "ratio_ci",
    "select_arms",
    "sensitivity",
    "steps_ratio",
    "steps_to",
    "t975",
    "tune",
    "usable_rate",
]

VALIDATION = 0.1
# The validation split's permutation seed (Dataset.with_validation), fixed
# and independent of the training seeds; recorded in every verdict.
VALIDATION_SEED = 0
# t(0.975, n - 1) for n = 2..30 (the 95 % two-sided Student-t quantiles)
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
    8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145,
    15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080,
    22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045,
}  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        return math.inf
    return _T975.get(df, 1.96 + 2.4 / df)  # within 0.2 % beyond the table


# ------------------------------------------------------------ statistics


@dataclasses.dataclass(frozen=True)
class Measured:
    """A quantity measured over seeds: its mean and 95 % interval.

    Attributes:
      value: the mean (or the exact value of a deterministic quantity).
      low: the interval's lower end (``value`` when there is no spread).
      high: the interval's upper end.
      per_seed: the per-seed values behind it (None for a single number).
      note: how it was computed, when the criterion's text does not say.
    """

    value: float
    low: float
    high: float
    per_seed: tuple | None = None
    note: str = ""

    def to_json(self) -> dict:
        return {
            "value": _finite(self.value),
            "ci": [_finite(self.low), _finite(self.high)],
            "per_seed": None
            if self.per_seed is None
            else [_finite(v) for v in self.per_seed],
            "note": self.note,
        }


def _finite(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def mean_ci(values: Sequence[float], note: str = "") -> Measured:
    """Mean and 95 % t interval of per-seed values (NaN: that seed failed, it
    makes the interval infinite rather than being dropped)."""
    v = np.asarray(values, np.float64)
    n = len(v)
    if n == 0:
        return Measured(math.nan, -math.inf, math.inf, (), note)
    mean = float(np.mean(v))
    if n == 1 or not np.all(np.isfinite(v)):
        lo, hi = (mean, mean) if n == 1 and np.isfinite(mean) else (-math.inf, math.inf)
        return Measured(mean, lo, hi, tuple(v.tolist()), note)
    half = t975(n - 1) * float(np.std(v, ddof=1)) / math.sqrt(n)
    return Measured(mean, mean - half, mean + half, tuple(v.tolist()), note)


def paired_ci(a: Sequence[float], b: Sequence[float], note: str = "") -> Measured:
    """Mean and interval of the per-seed differences ``a - b`` (the arms share
    their seeds: same initialization and data order)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds: {a.shape} vs {b.shape}")
    return mean_ci(a - b, note)


def ratio_ci(a: Sequence[float], b: Sequence[float], note: str = "") -> Measured:
    """Geometric mean and interval of the per-seed ratios ``a / b``
    (a t interval of the log ratios, exponentiated)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(a / b)
    m = mean_ci(logs)
    return Measured(
        float(np.exp(m.value)),
        float(np.exp(m.low)),
        float(np.exp(m.high)),
        tuple((a / b).tolist()),
        note,
    )


def steps_to(steps: Sequence[int], values: Sequence[float], threshold: float):
    """The step at which ``values`` first reaches ``threshold``, interpolated
    linearly between the evaluation before and the one that reaches it (so
    that a ratio of two such steps is not rounded to the evaluation grid);
    the first evaluation's step if it already does; None if never."""
    prev = None
    for s, v in zip(steps, values, strict=True):
        ok = v is not None and np.isfinite(v)
        if ok and v >= threshold:
            if prev is None:
                return float(s)
            s0, v0 = prev
            return float(s0 + (s - s0) * (threshold - v0) / (v - v0))
        prev = (s, v) if ok else None
    return None


def best_by(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Index of the best (largest, NaN as worst) entry along ``axis``."""
    v = np.where(np.isfinite(values), values, -np.inf)
    return np.argmax(v, axis=axis)


# ------------------------------------------------------------ criteria


OPS = (">=", "<=", ">", "<", "within")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One pre-registered check.

    Attributes:
      id: a short name, unique in the experiment.
      quantity: what is measured, in words (the report prints it).
      op: ``>=`` / ``>`` (the interval's lower end must clear the
        threshold), ``<=`` / ``<`` (its upper end), or ``within`` (the whole
        interval inside ``[-threshold, threshold]``: an equivalence test).
      threshold: a number, or ``{"quick": q, "full": f}`` when the scales
        differ (quick thresholds are frozen from quick-scale pilots).
      source: where the threshold comes from (paper, figure, pilot).
      null: the value of "no effect" for :func:`decide_check` (0 for a
        difference, 1 for a ratio); None: the threshold itself. PASS/FAIL
        (:func:`judge`) does not use it.
    """

    id: str
    quantity: str
    op: str
    threshold: float | dict
    source: str
    null: float | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"criterion {self.id}: op {self.op!r} not in {OPS}")

    def at(self, scale: str) -> float:
        t = self.threshold
        if isinstance(t, dict):
            return float(t["quick" if scale == "smoke" else scale])
        return float(t)

    def text(self, scale: str, exact: bool = False) -> str:
        """The criterion in words; ``exact`` for a quantity without an
        interval (a deterministic value, or a worst case over seeds)."""
        t = self.at(scale)
        if exact:
            return (
                f"|value| <= {t:g}" if self.op == "within" else f"value {self.op} {t:g}"
            )
        if self.op == "within":
            return f"95% interval within ±{t:g}"
        side = "lower" if self.op in (">=", ">") else "upper"
        return f"95% interval's {side} end {self.op} {t:g}"


def judge(c: Criterion, m: Measured, scale: str) -> bool:
    """Whether the measured interval clears the criterion."""
    t = c.at(scale)
    lo, hi = m.low, m.high
    if not (math.isfinite(lo) or math.isfinite(hi)) and math.isnan(m.value):
        return False
    return {
        ">=": lo >= t,
        ">": lo > t,
        "<=": hi <= t,
        "<": hi < t,
        "within": lo >= -t and hi <= t,
    }[c.op]


# ------------------------------------------------- three-way verdicts

SUPPORTED = "SUPPORTED"
CONTRADICTED = "CONTRADICTED"
INCONCLUSIVE = "INCONCLUSIVE"
NOT_TESTABLE = "NOT_TESTABLE"
# the side of the criterion's boundary that contradicts each op
_CONTRARY = {">=": "<", ">": "<=", "<=": ">", "<": ">="}
_CLEARS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """What an interval says about one criterion (:func:`decide`).

    Attributes:
      outcome: :data:`SUPPORTED`, :data:`CONTRADICTED`, :data:`INCONCLUSIVE`
        or :data:`NOT_TESTABLE`.
      seeds_needed: for INCONCLUSIVE, the seeds at which an interval of the
        same centre, its half-width shrinking as 1/sqrt(n), would decide
        (support or contradict, whichever its centre is on); None when no
        number would (the centre sits between the null and the threshold,
        or on the margin), when the seed count is unknown, or when decided.
      reason: the comparison that decided, in words.
    """

    outcome: str
    seeds_needed: int | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def decide(
    low: float,
    high: float,
    op: str,
    threshold: float,
    null: float | None = None,
    n: int | None = None,
    premise: bool = True,
) -> Decision:
    """SUPPORTED, CONTRADICTED or INCONCLUSIVE from a 95 % interval.

    - ``op`` ``>=`` / ``>`` / ``<=`` / ``<`` (a directional claim): SUPPORTED
      when the whole interval clears ``threshold`` (as :func:`judge`);
      CONTRADICTED when the whole interval lies on the other side of
      ``null`` (``high < null`` for ``>=``, ``high <= null`` for ``>``, and
      mirrored); else INCONCLUSIVE. ``null`` defaults to the threshold.
    - ``op`` ``within`` (a claim of little difference, margin
      ``threshold``): two one-sided tests, each at 2.5 % (the 95 % interval):
      SUPPORTED when the interval lies inside ``[-margin, margin]``,
      CONTRADICTED when it lies wholly outside (beyond one end), else
      INCONCLUSIVE. ``null`` is not used.
    - ``premise=False`` (the premise the claim needs is absent in the run):
      NOT_TESTABLE, whatever the interval.

    For INCONCLUSIVE with ``n`` seeds, ``seeds_needed`` is the smallest
    ``m > n`` with ``h * sqrt(n / m) < d``: ``h`` the interval's half-width,
    ``d`` its centre's distance to the bound it would cross (a simple plan:
    the centre stays, the t quantile is not re-taken).

    Example:
      >>> decide(0.2, 0.8, ">", 0.0).outcome, decide(-0.3, -0.1, ">", 0.0).outcome
      ('SUPPORTED', 'CONTRADICTED')
      >>> d = decide(-0.1, 0.5, ">", 0.0, n=5)  # centre 0.2, half-width 0.3
      >>> d.outcome, d.seeds_needed  # 5 * (0.3 / 0.2) ** 2 = 11.25
      ('INCONCLUSIVE', 12)
    """
    if op not in OPS:
        raise ValueError(f"op {op!r} not in {OPS}")
    if not premise:
        return Decision(NOT_TESTABLE, None, "the claim's premise is absent in this run")
    if any(map(math.isnan, (low, high))) or low > high:
        return Decision(INCONCLUSIVE, None, f"no interval ({low}, {high})")
    centre, half = (low + high) / 2, (high - low) / 2
    if op == "within":
        m = float(threshold)
        if m <= 0:
            raise ValueError(f"an equivalence margin must be positive, not {m}")
        if low >= -m and high <= m:
            return Decision(SUPPORTED, None, f"interval inside ±{m:g}")
        if low > m or high < -m:
            return Decision(CONTRADICTED, None, f"interval wholly outside ±{m:g}")
        distance = abs(m - abs(centre))  # to the margin, from either side
        return Decision(
            INCONCLUSIVE,
            _seeds_needed(n, half, distance),
            f"interval crosses ±{m:g}",
        )
    t = float(threshold)
    null = t if null is None else float(null)
    if _CLEARS[op](null, t) and null != t:
        raise ValueError(f"null {null:g} is on the supporting side of {op} {t:g}")
    bound = low if op in (">=", ">") else high
    other = high if op in (">=", ">") else low
    contrary = _CONTRARY[op]
    if _CLEARS[op](bound, t):
        return Decision(SUPPORTED, None, f"whole interval {op} {t:g}")
    if _CLEARS[contrary](other, null):
        return Decision(CONTRADICTED, None, f"whole interval {contrary} {null:g}")
    if _CLEARS[op](centre, t) and centre != t:
        distance = abs(centre - t)  # towards support
    elif _CLEARS[contrary](centre, null) and centre != null:
        distance = abs(centre - null)  # towards contradiction
    else:
        distance = 0.0  # between null and threshold: no sample size decides
    return Decision(
        INCONCLUSIVE,
        _seeds_needed(n, half, distance),
        f"interval crosses {t:g}" + ("" if null == t else f" or {null:g}"),
    )


def _seeds_needed(n: int | None, half: float, distance: float) -> int | None:
    if n is None or n < 1 or distance <= 0 or not math.isfinite(half):
        return None
    return max(n + 1, math.floor(n * (half / distance) ** 2) + 1)


def decide_check(
    c: Criterion, m: Measured, scale: str, premise: bool = True
) -> Decision:
    """:func:`decide` of a criterion at a scale on a measured interval (its
    seeds: the length of ``m.per_seed``)."""
    n = None if m.per_seed is None else len(m.per_seed)
    return decide(m.low, m.high, c.op, c.at(scale), c.null, n, premise)


# ------------------------------------------ statistics fit for the quantity


class UsableRate(NamedTuple):
    """:func:`largest_usable_rate`'s answer.

    Attributes:
      rate: the largest rate found usable (NaN if ``low`` was not).
      upper: the smallest rate found unusable (None if ``high`` was usable).
      censored: ``"high"`` (``high`` usable: the rate is at least that),
        ``"low"`` (``low`` not usable) or ``""`` (bracketed).
      calls: how many times ``train_fn`` ran.
    """

    rate: float
    upper: float | None
    censored: str
    calls: int


def largest_usable_rate(
    train_fn: Callable[[float], bool],
    low: float,
    high: float,
    rel_precision: float = 0.05,
) -> UsableRate:
    """The largest learning rate at which ``train_fn(lr)`` is usable, by
    bisection on a continuous rate (geometric midpoints) until the bracket
    ``[rate, upper]`` is within ``rel_precision`` of ``rate``; a
    continuous quantity, unlike the largest usable value of a grid.

    Assumes usability is monotone in the rate between ``low`` and ``high``
    (usable below some rate, not above). ``high`` is tried first, then
    ``low``: if ``high`` is usable the answer is censored there.

    Example:
      >>> r = largest_usable_rate(lambda lr: lr <= 0.3, 0.01, 10.0, 0.01)
      >>> round(r.rate, 3), r.upper / r.rate <= 1.01, r.censored
      (0.3, True, '')
    """
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    if not rel_precision > 0:
        raise ValueError(f"rel_precision must be positive, got {rel_precision}")
    if train_fn(high):
        return UsableRate(float(high), None, "high", 1)
    if not train_fn(low):
        return UsableRate(math.nan, float(low), "low", 2)
    lo, hi, calls = float(low), float(high), 2
    while hi > lo * (1 + rel_precision):
        mid = math.sqrt(lo * hi)
        calls += 1
        if train_fn(mid):
            lo = mid
        else:
            hi = mid
    return UsableRate(lo, hi, "", calls)


class SignTest(NamedTuple):
    """:func:`exact_sign_test`'s answer: the two-sided binomial p-value and
    the Clopper-Pearson interval of the proportion."""

    p_value: float
    low: float
    high: float


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _solve_decreasing(f: Callable[[float], float], target: float) -> float:
    """The p in [0, 1] with f(p) = target for f decreasing in p (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def exact_sign_test(
    successes: int, n: int, p: float = 0.5, confidence: float = 0.95
) -> SignTest:
    """Exact binomial test of ``successes`` out of ``n`` against proportion
    ``p`` (two-sided: the total probability of outcomes no more likely than
    the observed one), and the Clopper-Pearson interval of the proportion:
    for counts and ties (e.g. "seeds where BN's rate is at least 10x"), where
    a t interval is wrong.

    Example:
      >>> r = exact_sign_test(5, 5)  # p: 2 * 0.5 ** 5; low: 0.025 ** (1 / 5)
      >>> round(r.p_value, 4), round(r.low, 4), r.high
      (0.0625, 0.4782, 1.0)
    """
    if not 0 <= successes <= n or n < 1:
        raise ValueError(f"need 0 <= successes <= n and n >= 1: {successes}, {n}")
    pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    observed = pmf[successes] * (1 + 1e-7)  # ties up to rounding count as equal
    p_value = min(1.0, math.fsum(q for q in pmf if q <= observed))
    alpha = 1 - confidence
    # lower end: P(X >= k | p) = alpha / 2; upper: P(X <= k | p) = alpha / 2
    low = (
        0.0
        if successes == 0
        else _solve_decreasing(
            lambda q: -(1 - _binom_cdf(successes - 1, n, q)), -alpha / 2
        )
    )
    high = (
        1.0
        if successes == n
        else _solve_decreasing(lambda q: _binom_cdf(successes, n, q), alpha / 2)
    )
    return SignTest(p_value, low, high)


def bootstrap_mean_ci(
    per_example_correct: Any, n_boot: int = 2000, seed: int = 0, note: str = ""
) -> Measured:
    """Mean accuracy and its 95 % percentile-bootstrap interval over test
    examples: the test set's sampling noise, which a t interval over seeds
    on one fixed test set leaves out.

    ``per_example_correct`` is ``(examples,)`` (one model) or ``(seeds,
    examples)`` (the mean over seeds; each resample draws the same examples
    for every seed, since they share the test set).

    Example:
      >>> m = bootstrap_mean_ci(np.r_[np.ones(80), np.zeros(20)], 1000, seed=0)
      >>> m.value, 0.70 < m.low < 0.75, 0.85 < m.high < 0.90
      (0.8, True, True)
    """
    x = np.asarray(per_example_correct, np.float64)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"need (examples,) or (seeds, examples), got {x.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    x2 = x.reshape(-1, x.shape[-1])
    n = x2.shape[1]
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // (n * x2.shape[0]))
    means = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, (min(chunk, n_boot - start), n))
        means.append(x2[:, idx].mean(axis=(0, 2)))
    boot = np.concatenate(means)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Measured(
        float(x2.mean()),
        float(low),
        float(high),
        None,
        note or f"bootstrap over {n} test examples, {n_boot} resamples",
    )


def sensitivity(
    judge: Callable[[float], Any], constant: float, neighbours: Sequence[float]
) -> dict[float, Any]:
    """The verdict at a free constant and at its neighbouring values
    (``judge(value) -> verdict``), by value in increasing order: a verdict
    that changes between neighbours hangs on the constant's choice.

    Example:
      >>> sensitivity(lambda t: "PASS" if t <= 0.97 else "FAIL", 0.99, [0.95, 1.0])
      {0.95: 'PASS', 0.99: 'FAIL', 1.0: 'FAIL'}
    """
    values = sorted({float(constant), *map(float, neighbours)})
    return {v: judge(v) for v in values}


class Premise(NamedTuple):
    """Whether a claim's premise holds in the run (a generalization gap to
    close, a divergence to move), with its numbers in words; a check whose
    premise is absent is NOT_TESTABLE whatever its interval."""

    holds: bool
    text: str


class Sensitivity(NamedTuple):
    """A free constant of a check and its verdict at neighbouring values.

    Attributes:
      constant: the constant's name in words (e.g. "threshold fraction").
      outcomes: ``{value: outcome}`` (:func:`sensitivity` of a function
        returning :func:`decide`'s outcome), the registered value included.
      value: the registered value.
    """

    constant: str
    value: float
    outcomes: dict

    def to_json(self) -> dict:
        return {
            "constant": self.constant,
            "value": self.value,
            "outcomes": {f"{k:g}": v for k, v in self.outcomes.items()},
        }


@dataclasses.dataclass
class Outcome:
    """What an experiment's ``run`` returns: measurements for its criteria
    (by criterion id) and what the report shows.

    ``premises`` maps a criterion id to its :class:`Premise` (absent: the
    check needs none); ``sensitivity`` maps a criterion id to the
    :class:`Sensitivity` of its free constant (absent: it has none).
    """

    measured: dict[str, Measured]
    table: list[dict] = dataclasses.field(default_factory=list)
    figures: list[str] = dataclasses.field(default_factory=list)
    records: list[dict] = dataclasses.field(default_factory=list)
    notes: str = ""
    reported: dict[str, Measured] = dataclasses.field(default_factory=dict)
    premises: dict[str, Premise] = dataclasses.field(default_factory=dict)
    sensitivity: dict[str, Sensitivity] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------- context


@dataclasses.dataclass
class Context:
    """Where an experiment writes, at which scale, with which seeds.

    Attributes:
      name: the experiment (its module name).
      out: its run directory.
      scale: ``"smoke"`` (a few steps, checks that it runs), ``"quick"``
        or ``"full"``.
      seeds: the seeds of every arm (paired across arms).
      progress: the command's progress display (``progress(dict)`` with
        fit's progress fields and a ``label``), or None.
    """

    name: str
    out: Path
    scale: str
    seeds: list[int]
    progress: Any = None
    training: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def quick(self) -> bool:
        return self.scale != "full"

    @property
    def smoke(self) -> bool:
        return self.scale == "smoke"

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def steps(self, quick: int, full: int, smoke: int = 8) -> int:
        """Training steps at this scale."""
        return smoke if self.smoke else self.pick(quick, full)

    def every(self, quick: int, full: int, smoke: int = 4) -> int:
        """Steps between evaluations at this scale."""
        return smoke if self.smoke else self.pick(quick, full)

    @property
    def dataset(self) -> str:
        """The :func:`bnlab.data.load` name of this scale's dataset."""
        return "fashion_mnist_small" if self.quick else "fashion_mnist"

    @functools.cached_property
    def images(self) -> bn_data.Dataset:
        """Images ``(N, H, W, 1)``: the shipped 14x14 subset (quick) or
        Fashion-MNIST 28x28 (full), with the validation split carved out."""
        return bn_data.load(self.dataset).with_validation(
            VALIDATION, seed=VALIDATION_SEED
        )

    def data_provenance(self) -> dict[str, Any] | None:
        """The data this experiment used, for its verdict: the dataset's name,
        the SHA-256 of its arrays after the split (:func:`dataset_sha256`)
        and the split's fraction and seed; None if it loaded no dataset (its
        inputs are generated from its seeds)."""
        if "images" not in self.__dict__:  # the cached property never ran
            return None
        return {
            "name": self.dataset,
            "sha256": dataset_sha256(self.images),
            "validation": VALIDATION,
            "validation_seed": VALIDATION_SEED,
        }

    @functools.cached_property
    def data(self) -> bn_data.Dataset:
        """:attr:`images` flattened to vectors (for MLPs)."""
        ds = self.images

        def flat(a):
            return a.reshape(len(a), -1)

        return ds._replace(
            x_train=flat(ds.x_train), x_test=flat(ds.x_test), x_val=flat(ds.x_val)
        )

    @property
    def data_name(self) -> str:
        return "Fashion-MNIST 14x14 subset" if self.quick else "Fashion-MNIST"

    def fit(self, group: str, model: Any, **kw: Any):
        """:func:`bnlab.train.fit` of one group of arms in ``out/group``
        (resumes if interrupted; a finished group returns at once)."""
        kw.setdefault("seeds", self.seeds)
        kw.setdefault("keep_checkpoints", 1)
        # quick runs are seconds long: one checkpoint at the end; full runs
        # checkpoint every few evaluations so that an interruption costs little
        every = kw.get("eval_every") or max(int(kw["steps"]) // 10, 1)
        kw.setdefault("checkpoint_every", kw["steps"] if self.quick else 4 * every)
        data = kw.pop("data", None) or self.data
        label = f"{self.name}/{group}"

        def progress(p):
            if self.progress is not None:
                self.progress({**p, "label": label})

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # Arms that diverge are part of an lr sweep's result: fit stops
            # them alone, the verdicts count them (result.stopped_at); one
            # warning each would drown the transcript.
            warnings.filterwarnings("ignore", message=r".*this arm stopped there")
            # a finished group read back from its checkpoint (a resumed run)
            warnings.filterwarnings("ignore", message=r".*nothing to train")
            result = fit(model, data, self.out / group, on_progress=progress, **kw)
        n_arms = len(result.arms)
        self.training.append(
            {
                "group": group,
                "arms": n_arms,
                "steps": int(kw["steps"]),
                "seconds": time.perf_counter() - t0,
            }
        )
        return result

    def fit_grid(
        self,
        group: str,
        model: Any,
        *,
        arms: Sequence[dict],
        grid: Sequence[float] | Callable[[dict], Sequence[float]],
        hp: str = "lr",
        factor: float | None = None,
        limits: tuple[float, float] = (0.0, math.inf),
        tune_kw: dict | None = None,
        **kw: Any,
    ) -> Grid:
        """Fits every arm over its grid of ``hp`` and extends the grid where
        an arm's choice (:func:`tune` with ``tune_kw``) is an edge: the
        equal-tuning rule, the same for every arm whichever the claim
        expects to lose.

        Each round adds, for each arm whose choice is an end of its grid,
        the next value past that end (:func:`extension`: times ``factor``,
        default the ratio of the grid's two values at that end) in one more
        fit (``group+1``, ``group+2``, ...), until every choice is interior,
        :data:`MAX_EXTENSIONS` values were added past an end, or the next
        value would leave ``limits``; a choice still on an edge is marked by
        :meth:`Tuned.text`. Smoke runs do not extend.

        Args:
          group: the fit's directory name under the experiment's.
          model: as :meth:`fit`.
          arms: each arm's hyper-parameters without ``hp`` (floats).
          grid: the values of ``hp`` for every arm, or a function of the arm.
          hp: the tuned hyper-parameter.
          factor: the step past an edge (> 1).
          limits: the lowest and highest value any extension may add.
          tune_kw: :func:`tune`'s keywords for choosing (``select``,
            ``last``, ``steps``), as the experiment tunes later.
          **kw: :meth:`fit`'s keywords (not ``hparams``).
        """
        tune_kw = dict(tune_kw or {})
        grids = {
            i: sorted(grid(a) if callable(grid) else grid) for i, a in enumerate(arms)
        }
        settings = [{**a, hp: float(v)} for i, a in enumerate(arms) for v in grids[i]]
        out = Grid([self.fit(group, model, hparams=settings, **kw)], hp)
        added: dict[tuple[int, str], int] = {}
        for k in range(1, 0 if self.smoke else 2 * MAX_EXTENSIONS + 1):
            new = []
            for i, a in enumerate(arms):
                t = tune(out, hp=hp, where=a, **tune_kw)
                values = sorted(t.grid)
                if t.index == len(values) - 1:
                    step = factor or values[-1] / values[-2]
                else:
                    step = factor or values[1] / values[0]
                ext = extension(values, t.index, step, limits)
                if ext is None or added.get((i, ext[0]), 0) >= MAX_EXTENSIONS:
                    continue
                added[(i, ext[0])] = added.get((i, ext[0]), 0) + 1
                new.append({**a, hp: ext[1]})
                out.extensions.append({"arm": dict(a), "edge": ext[0], hp: ext[1]})
            if not new:
                break
            out.results.append(self.fit(f"{group}+{k}", model, hparams=new, **kw))
        return out

    def save_figure(self, fig: Any, stem: str) -> str:
        """Writes ``stem.png`` (and closes the figure); returns its name."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(self.out / f"{stem}.png", dpi=110)
        plt.close(fig)
        return f"{stem}.png"


def dataset_sha256(ds: bn_data.Dataset) -> str:
    """SHA-256 of a dataset's arrays as training sees them: train, validation
    and test images and labels in that order, each with its dtype and shape
    (so a changed split, dtype or scaling changes it); ``num_classes`` too.

    Example:
      >>> x = np.zeros((4, 2), np.float32)
      >>> y = np.arange(4, dtype=np.int32)
      >>> ds = bn_data.Dataset(x, y, x, y, num_classes=4)
      >>> dataset_sha256(ds) == dataset_sha256(ds._replace(y_test=y[::-1]))
      False
    """
    h = hashlib.sha256(f"num_classes={ds.num_classes};".encode())
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        a = getattr(ds, name)
        if a is None:
            h.update(f"{name}=None;".encode())
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{name}={a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def per_arm(result, key: str, reduce: Callable | None = None) -> np.ndarray:
    """A record key over evaluations ``(evals, arms)`` (NaN where null)."""
    _, values = result.curve(key)
    return values if reduce is None else reduce(values)


def select_arms(variables: dict, indices: Sequence[int]) -> dict:
    """The variables of some arms (leading axis), in the given order."""
    i = np.asarray(indices)
    return jax.tree.map(lambda v: v[i], variables)


def make_accuracy(model, batch: int = 2000) -> Callable:
    """``accuracy(variables, x, y)``: the accuracy of every arm (leading axis
    of ``variables``) with its running statistics, over all of ``x`` in
    batches of ``batch``, compiled once per batch shape."""

    @jax.jit
    def correct(v, xb, yb):
        def one(vi):
            return jnp.sum(jnp.argmax(model.apply(vi, xb, train=False), -1) == yb)

        return jax.vmap(one)(v)

    def accuracy(variables: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        total = sum(
            np.asarray(correct(variables, x[i : i + batch], y[i : i + batch]))
            for i in range(0, len(x), batch)
        )
        return total / len(x)

    return accuracy


def plateau_scores(
    result, where: dict, diverged_score: float, last: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Validation score (mean of the last ``last`` evaluations) per (lr,
    seed) of the arms matching ``where``, and whether each arm diverged (a
    non-finite evaluation in that window: it scores ``diverged_score``)."""
    _, val = grid_by_hparams(result, "val_accuracy", "lr", where)
    window = val[-last:]
    diverged = ~np.all(np.isfinite(window), 0)
    return np.where(diverged, diverged_score, window.mean(0)), diverged


def usable_rate(score: np.ndarray, grid: Sequence[float], within: float) -> np.ndarray:
    """Per seed (``score``: (lr, seed)): the largest grid rate whose score is
    within ``within`` of that seed's best. No interpolation: towards a rate
    that diverged there is no measured score to interpolate, so the top of
    the grid censors it."""
    return np.asarray(
        [grid[int(np.flatnonzero(s >= s.max() - within).max())] for s in score.T],
        np.float64,
    )


def steps_ratio(num, den, run_length: int) -> tuple[list[float], int, int]:
    """Per-seed ``num / den`` of steps-to-threshold (None: never reached):
    a ``den`` that never gets there counts as the run length (a lower bound,
    so the ratio is an upper bound); a ``num`` that never gets there makes
    the ratio infinite. Returns the ratios and the two counts of 'never'."""
    ratios = []
    for a, b in zip(num, den, strict=True):
        b_ = run_length if b is None else b
        ratios.append(np.inf if a is None else a / b_)
    return ratios, sum(a is None for a in num), sum(b is None for b in den)


def fmt(m: Measured | float | None, digits: int | None = 3) -> str:
    """``mean [low, high]`` (or a plain number; ``n/a`` when it is missing or
    not finite) to ``digits`` significant digits: the one number format of
    the experiments, the report and the transcript.

    ``digits=None`` is the report's: integers (and bools) as they are, other
    numbers to 4 significant digits, 3 below 1e-3 or from 1e5 on.

    Example:
      >>> fmt(Measured(0.123456, 0.1, 0.15)), fmt(None), fmt(0.123456, None)
      ('0.123 [0.1, 0.15]', 'n/a', '0.1235')
    """
    if isinstance(m, Measured):
        value, low, high = (_significant(v, digits) for v in (m.value, m.low, m.high))
        return value if m.low == m.high else f"{value} [{low}, {high}]"
    if m is None:
        return "n/a"
    if digits is None and isinstance(m, int):
        return str(m)
    return _significant(m, digits) if np.isfinite(m) else "n/a"


def _significant(v: float, digits: int | None) -> str:
    if digits is None:
        a = abs(v)
        digits = 3 if a != 0 and (a < 1e-3 or a >= 1e5) else 4
    return f"{v:.{digits}g}"


def _results(result) -> list:
    """The fits behind ``result``: a FitResult, a :class:`Grid` or a list of
    fits."""
    if isinstance(result, Grid):
        return list(result.results)
    if isinstance(result, list):  # (a FitResult is a tuple)
        return list(result)
    return [result]


def grid_by_hparams(
    result, key: str, hp: str, where: dict | None = None
) -> tuple[list[float], np.ndarray]:
    """``(values of hp, array (evals, len(values), seeds))`` of a record key
    for the arms whose other hyper-parameters match ``where`` (all arms by
    default), laid out as ``hp`` values x seeds. ``result`` is one fit, a
    :class:`Grid` or a list of fits with one evaluation schedule (a grid
    extended by later fits)."""
    results = _results(result)
    found = [
        (r, a)
        for r in results
        for a in r.arms
        if all(a.hparams.get(k) == v for k, v in (where or {}).items())
    ]
    values = sorted({a.hparams[hp] for _, a in found})
    seeds = sorted({a.seed for _, a in found})
    curves = {id(r): r.curve(key)[1] for r in results}
    n_evals = max(c.shape[0] for c in curves.values())
    out = np.full((n_evals, len(values), len(seeds)), np.nan)
    for r, a in found:
        c = curves[id(r)][:, a.index]
        out[: len(c), values.index(a.hparams[hp]), seeds.index(a.seed)] = c
    return values, out


def jax_device_note() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}: {dev.device_kind} x{jax.device_count()}"


@dataclasses.dataclass(frozen=True)
class Tuned:
    """An arm tuned on validation: the chosen hyper-parameter value and, per
    seed, the reported metric there (test set, never used to choose).

    Attributes:
      value: the chosen value of the hyper-parameter (e.g. the lr).
      grid: every value tried.
      val: per value, the validation score it was chosen on (mean over seeds).
      report: per seed, the reported metric at the chosen value (or a dict
        of them by label: :func:`tune`'s ``report``).
      index: position of ``value`` in ``grid``.
    """

    value: float
    grid: list[float]
    val: list[float]
    report: np.ndarray | dict[str, np.ndarray]
    index: int

    def text(self) -> str:
        """The chosen value, flagged when it is an end of its grid."""
        edge = self.index in (0, len(self.grid) - 1)
        return f"{self.value:g}" + (" (grid edge)" if edge else "")


def tune(
    result,
    hp: str = "lr",
    select: str = "val_accuracy",
    report: str | dict[str, str] = "test_accuracy",
    last: int = 3,
    where: dict | None = None,
    steps: Sequence[int] | None = None,
) -> Tuned:
    """Chooses ``hp`` on validation and reports the test metric there.

    Scores are the mean of the last ``last`` evaluations (a plateau, not one
    noisy snapshot), or of the evaluations at ``steps`` when given, averaged
    over seeds; an arm that stopped (non-finite there) scores -inf. Arms are
    ``hp`` values x seeds (those matching ``where``). ``report`` is a record
    key (``Tuned.report``: per seed, its mean over the same evaluations) or
    ``{label: key}`` (``Tuned.report``: ``{label: per seed}``).

    Example:
      >>> from bnlab.train.arms import Arm
      >>> from bnlab.train.result import FitResult
      >>> arms = [Arm(0, 0, {"lr": 0.1}), Arm(1, 0, {"lr": 1.0})]
      >>> records = [
      ...     {"step": 1, "arm": 0, "val_accuracy": 0.5, "test_accuracy": 0.4},
      ...     {"step": 1, "arm": 1, "val_accuracy": 0.7, "test_accuracy": 0.6},
      ... ]
      >>> t = tune(FitResult({}, arms, records, [None, None], 1), last=1)
      >>> t.value, t.report.tolist()
      (1.0, [0.6])
    """
    grid, val = grid_by_hparams(result, select, hp, where)
    if steps is None:
        rows: Any = slice(-last, None)
    else:
        at, _ = _results(result)[0].curve(select)
        rows = [list(at).index(s) for s in steps]
    window = val[rows]
    score = np.where(np.all(np.isfinite(window), axis=0), window.mean(axis=0), -np.inf)
    by_value = score.mean(axis=1)
    i = int(best_by(by_value))

    def at_best(key: str) -> np.ndarray:
        _, rep = grid_by_hparams(result, key, hp, where)
        return np.mean(rep[rows][:, i, :], axis=0)

    reported = (
        {label: at_best(key) for label, key in report.items()}
        if isinstance(report, dict)
        else at_best(report)
    )
    return Tuned(grid[i], grid, by_value.tolist(), reported, i)


# ------------------------------------------------------------ plateau

# A final-accuracy claim needs each arm trained to a plateau: its mean
# validation accuracy (over seeds, at its chosen value) rose by less than
# this over the last third of training.
PLATEAU_RISE = 0.005


def plateau(result, where: dict, hp: str, value: float, key: str = "val_accuracy"):
    """Whether one arm (``where``, at ``hp = value``) reached a plateau:
    :data:`PLATEAU_RISE`'s rule on the mean over seeds of ``key``, the
    last third of the evaluations compared with the evaluation before them.

    Returns a :class:`Premise` whose text gives the rise.
    """
    values, curves = grid_by_hparams(result, key, hp, where)
    c = np.nanmean(curves[:, values.index(value), :], axis=1)
    c = c[np.isfinite(c)]
    if len(c) < 3:
        return Premise(False, f"{len(c)} finite evaluations: no plateau to check")
    k = max(1, len(c) // 3)
    rise = float(np.max(c[-k:]) - c[-k - 1])
    ok = rise < PLATEAU_RISE
    return Premise(
        ok,
        f"{key} rose {rise:+.4f} over the last {k} of {len(c)} evaluations "
        f"({'<' if ok else '>='} {PLATEAU_RISE:g}: "
        f"{'a plateau' if ok else 'still rising'})",
    )


# ------------------------------------------------------- equal tuning

# How far a grid extends past an edge its arm chose: at most this many
# values beyond each end (the stated limit of the equal-tuning rule).
MAX_EXTENSIONS = 2


@dataclasses.dataclass
class Grid:
    """A hyper-parameter grid fitted for several arms, extended by
    :meth:`Context.fit_grid` where an arm chose an edge.

    Attributes:
      results: the fits (the first grid, then one per extension), each a
        :class:`bnlab.train.FitResult` with the same evaluation schedule.
      hp: the tuned hyper-parameter (``"lr"``).
      extensions: one entry per extension: the arm (its hyper-parameters
        without ``hp``), the edge (``"top"`` / ``"bottom"``) and the value
        added.
    """

    results: list
    hp: str = "lr"
    extensions: list[dict] = dataclasses.field(default_factory=list)

    @property
    def arms(self) -> list:
        return [a for r in self.results for a in r.arms]

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The first fit's evaluation steps and its curve (for the steps)."""
        return self.results[0].curve(key)

    def values(self, where: dict | None = None) -> list[float]:
        """Every value of ``hp`` tried for the arms matching ``where``."""
        return grid_by_hparams(self, "val_accuracy", self.hp, where)[0]

    def tune(self, **kw: Any) -> Tuned:
        """:func:`tune` over every fit of the grid."""
        return tune(self, hp=self.hp, **kw)


def extension(
    grid: Sequence[float], index: int, factor: float, limits: tuple[float, float]
) -> tuple[str, float] | None:
    """The value an arm's grid adds when its choice ``grid[index]`` is an
    edge: ``("top", grid[-1] * factor)`` or ``("bottom", grid[0] /
    factor)``; None when the choice is interior or the new value would
    pass ``limits`` (``(lowest, highest)`` allowed).

    Example:
      >>> extension([0.01, 0.1, 1.0], 2, 10.0, (1e-4, 100.0))
      ('top', 10.0)
      >>> extension([0.01, 0.1, 1.0], 1, 10.0, (1e-4, 100.0)) is None
      True
      >>> extension([0.01, 0.1, 1.0], 0, 10.0, (0.01, 100.0)) is None
      True
    """
    grid = sorted(grid)
    if not factor > 1:
        raise ValueError(f"an extension factor must exceed 1, got {factor}")
    if len(grid) > 1 and index == len(grid) - 1:
        edge, value = "top", grid[-1] * factor
    elif len(grid) > 1 and index == 0:
        edge, value = "bottom", grid[0] / factor
    else:
        return None
    lo, hi = limits
    if value > hi * (1 + 1e-9) or value < lo * (1 - 1e-9):
        return None
    return edge, float(value)


# ------------------------------------------------------- shared model


def bn(momentum: float = 0.9) -> Callable:
    """A :class:`bnlab.linen.BatchNorm` factory with this momentum (a norm of
    :class:`NormMLP`)."""
    return functools.partial(bnlab.linen.BatchNorm, momentum=momentum)


class NormMLP(nn.Module):
    """Dense -> norm -> ReLU layers whose norm is a per-arm gate.

    The gate ``gates/norm`` (set per arm with ``set_gates(v, norm=code)`` in
    ``post_init``) is 0 for no normalization or ``k`` for ``norms[k - 1]``;
    every candidate is computed and the gate selects one exactly (no mix),
    so arms of one seed start from the same weights. Leaner than
    :class:`bnlab.models.VariantMLP` (no BN-after, dropout or layer gates),
    which matters on CPU. The input of each activation is sown as
    ``intermediates/act_input_<i>``.

    Attributes:
      widths: hidden widths.
      num_outputs: classes.
      norms: factories called with ``use_running_average``.
      init_scheme: ``"he"`` (ReLU) or ``"lecun"``.
    """

    widths: tuple[int, ...]
    num_outputs: int = 10
    norms: tuple = ()
    init_scheme: str = "he"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        code = self.variable("gates", "norm", lambda: jnp.zeros((), jnp.float32)).value
        k_init = kernel_init(self.init_scheme)
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.widths):
            h = nn.Dense(width, kernel_init=k_init)(x)
            out = h
            for j, make in enumerate(self.norms):
                normed = make(use_running_average=not train)(h)
                out = jnp.where(code == j + 1, normed, out)
            self.sow("intermediates", f"act_input_{i}", out)
            x = nn.relu(out)
        return nn.Dense(self.num_outputs, kernel_init=k_init)(x)
