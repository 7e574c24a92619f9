"""The method every experiment follows, as code: where it trains (through
:func:`bnlab.train.fit`), how it selects, how it judges.

- **Data.** Full runs use Fashion-MNIST (28x28, 60k/10k); quick runs a
  shipped subset (14x14, 10k/2k, :func:`bnlab.data.load` of
  ``"fashion_mnist_small"``). A fixed 10 % of the training set is the
  validation split: every choice (learning rate, best step, thresholds) is
  made on it; the test set only reports.
- **Arms.** Compared arms get the same tuning budget: each its own grid of
  learning rates, the best chosen on validation. Arms with the same seed
  share initialization and data order, so comparisons are paired by seed.
- **Intervals.** Every measured quantity is a mean over seeds (or over
  per-seed paired differences / ratios) with a 95 % Student-t interval
  (``ddof=1``); a criterion passes only if the whole interval clears it.
- **Pre-registration.** Criteria are data (:class:`Criterion`: quantity,
  operator, threshold per scale, source), committed before the run that
  judges them; the report prints them from this data, and a changed design
  keeps the old criterion and its result in the experiment's ``HISTORY``.
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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bnlab.linen
from bnlab import data as bn_data
from bnlab.models import kernel_init
from bnlab.train import fit

__all__ = [
    "Context",
    "Criterion",
    "Measured",
    "NormMLP",
    "Outcome",
    "Tuned",
    "best_by",
    "bn",
    "dataset_sha256",
    "grid_by_hparams",
    "judge",
    "make_accuracy",
    "mean_ci",
    "paired_ci",
    "plateau_scores",
    "ratio_ci",
    "select_arms",
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
    """

    id: str
    quantity: str
    op: str
    threshold: float | dict
    source: str

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


@dataclasses.dataclass
class Outcome:
    """What an experiment's ``run`` returns: measurements for its criteria
    (by criterion id) and what the report shows."""

    measured: dict[str, Measured]
    table: list[dict] = dataclasses.field(default_factory=list)
    figures: list[str] = dataclasses.field(default_factory=list)
    records: list[dict] = dataclasses.field(default_factory=list)
    notes: str = ""
    reported: dict[str, Measured] = dataclasses.field(default_factory=dict)


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


def grid_by_hparams(
    result, key: str, hp: str, where: dict | None = None
) -> tuple[list[float], np.ndarray]:
    """``(values of hp, array (evals, len(values), seeds))`` of a record key
    for the arms whose other hyper-parameters match ``where`` (all arms by
    default), laid out as ``hp`` values x seeds."""
    arms = [
        a
        for a in result.arms
        if all(a.hparams.get(k) == v for k, v in (where or {}).items())
    ]
    values = sorted({a.hparams[hp] for a in arms})
    seeds = sorted({a.seed for a in arms})
    _, curve = result.curve(key)
    out = np.full((curve.shape[0], len(values), len(seeds)), np.nan)
    for a in arms:
        out[:, values.index(a.hparams[hp]), seeds.index(a.seed)] = curve[:, a.index]
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
        at, _ = result.curve(select)
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
