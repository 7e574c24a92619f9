"""The data :func:`bnlab.train.fit` trains on, checked before any work.

A run's data is a :class:`Splits`: the training split and optional
validation and test splits, each ``(x, y)`` arrays in memory or a
:class:`bnlab.data.Source` read by index. :func:`make_splits` builds it from a
:class:`bnlab.data.Dataset` or :class:`bnlab.data.StreamingDataset` and checks
what can be checked without training: every split has examples, ``x`` and
``y`` pair up, features have the training split's shape, and class labels are
integers in ``[0, num_classes)``. Each error names the field of ``data`` to
fix.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import numpy as np

from bnlab.data import pipeline
from bnlab.data.sources import Dataset, validation_indices

__all__ = ["Splits", "fingerprint", "length", "make_splits", "read"]

# The validation split that fit carves out is a fixed permutation of this
# seed (independent of every arm's seed).
VALIDATION_SEED = 0


class Splits(NamedTuple):
    """Training data as arrays (in memory) or sources (streamed).

    Attributes:
      train: ``(x, y)`` arrays or a source.
      val: the validation split, or None.
      test: the test split, or None.
      num_classes: classes of the labels (0: regression targets).
      in_memory: whether the splits are arrays.
    """

    train: Any
    val: Any | None
    test: Any | None
    num_classes: int
    in_memory: bool

    def named(self) -> dict[str, Any]:
        """The splits present, by name (``train``, ``val``, ``test``)."""
        out = {"train": self.train, "val": self.val, "test": self.test}
        return {k: v for k, v in out.items() if v is not None}


def length(split: Any) -> int:
    """Examples in a split."""
    return len(split[0]) if isinstance(split, tuple) else len(split)


def read(split: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The examples ``indices`` (any shape) of a split as ``(xs, ys)``."""
    if isinstance(split, tuple):
        return split[0][indices], split[1][indices]
    try:
        return pipeline.read(split, indices)
    except ValueError as e:
        if "same shape" not in str(e):
            raise
        raise ValueError(
            f"data: a source returned examples of different shapes ({e}); every "
            "x (and every y) of a source must have one shape: pad or resize them "
            "in the source."
        ) from None


def fingerprint(splits: Splits) -> dict[str, str]:
    """Per split, a SHA-256 (16 hex digits) of its labels and examples.

    In-memory splits are hashed whole. Streamed ones are hashed on their
    length, their first and last example and up to 256 evenly spaced ones
    (reading a whole source could take longer than the run): a change
    elsewhere in a streamed source is not seen when a run resumes.
    """
    out = {}
    for name, split in splits.named().items():
        n = length(split)
        h = hashlib.sha256(str(n).encode())
        if isinstance(split, tuple):
            arrays = split
        else:
            rows = np.unique(np.linspace(0, n - 1, min(n, 256)).astype(np.int64))
            arrays = read(split, rows)
            h.update(b"sampled")
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.view(np.uint8).reshape(-1))
        out[name] = h.hexdigest()[:16]
    return out


def make_splits(data: Any, validation: float | None) -> Splits:
    """The checked :class:`Splits` of ``data`` (validation carved out of the
    training split when ``validation`` is a fraction).

    Raises:
      TypeError / ValueError: naming the field of ``data`` to fix.
    """
    if isinstance(data, Dataset):
        splits = _in_memory(data, validation)
    elif isinstance(data, pipeline.StreamingDataset):
        splits = _streamed(data, validation)
    else:
        raise TypeError(
            f"data must be a bnlab.data.Dataset (arrays in memory) or a "
            f"bnlab.data.StreamingDataset (sources read by index), got "
            f"{type(data).__name__}."
        )
    _check(splits)
    return splits


def _num_classes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(
            f"data.num_classes={value!r} must be an integer >= 0 (0 for regression)."
        )
    return int(value)


def _array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "__array__") or isinstance(value, (list, tuple)):
        try:
            return np.asarray(value)
        except ValueError as e:
            raise ValueError(
                f"data.{name} cannot be made an array ({e}); pass a numpy array "
                "whose examples all have one shape."
            ) from None
    raise TypeError(
        f"data.{name} is a {type(value).__name__}; pass a numpy array (or None "
        "for a split you do not have)."
    )


def _pair(ds: Dataset, split: str, required: bool) -> tuple | None:
    x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    if x is None and y is None:
        if required:
            raise ValueError(f"data.x_{split} and data.y_{split} are None.")
        return None
    if (x is None) != (y is None):
        given, missing = (f"x_{split}", f"y_{split}")[:: 1 if y is None else -1]
        raise ValueError(
            f"data.{given} is given but data.{missing} is None; give both (or neither)."
        )
    x, y = _array(f"x_{split}", x), _array(f"y_{split}", y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(
            f"data.x_{split} / y_{split} must have a leading axis of examples, got "
            f"shapes {x.shape} and {y.shape}."
        )
    if len(x) != len(y):
        raise ValueError(
            f"data.x_{split} has {len(x)} examples but data.y_{split} has "
            f"{len(y)}; they must pair up one to one."
        )
    return x, y


def _in_memory(ds: Dataset, validation: float | None) -> Splits:
    num_classes = _num_classes(ds.num_classes)
    train = _pair(ds, "train", required=True)
    val = _pair(ds, "val", required=False)
    test = _pair(ds, "test", required=False)
    if validation is not None:
        if val is not None:
            raise ValueError(
                "this Dataset already has validation arrays; pass validation=None "
                "to use them."
            )
        t, v = validation_indices(len(train[0]), validation, VALIDATION_SEED)
        train, val = (train[0][t], train[1][t]), (train[0][v], train[1][v])
    return Splits(train, val, test, num_classes, True)


def _streamed(data: pipeline.StreamingDataset, validation: float | None) -> Splits:
    num_classes = _num_classes(data.num_classes)
    for name in ("train", "val", "test"):
        source = getattr(data, name)
        if name == "train" and source is None:
            raise ValueError("data.train is None; a StreamingDataset needs a source.")
        if source is not None and not (
            hasattr(source, "__len__") and hasattr(source, "__getitem__")
        ):
            raise TypeError(
                f"data.{name} is a {type(source).__name__}; a source needs len() "
                "and [index] -> (x, y) (see bnlab.data.Source)."
            )
    train, val = data.train, data.val
    if validation is not None:
        if val is not None:
            raise ValueError(
                "this StreamingDataset already has a validation source; pass "
                "validation=None to use it."
            )
        t, v = validation_indices(len(train), validation, VALIDATION_SEED)
        train, val = pipeline.Subset(train, t), pipeline.Subset(train, v)
    return Splits(train, val, data.test, num_classes, False)


def _field(splits: Splits, name: str, part: str) -> str:
    if splits.in_memory:
        return f"data.{part}_{name}"
    return f"data.{name} (its {part})"


def _check(splits: Splits) -> None:
    named = splits.named()
    for name, split in named.items():
        if length(split) == 0:
            raise ValueError(
                f"the {name} split has no examples; give it examples"
                + (" (or None for no such split)." if name != "train" else ".")
            )
    # one example of each split: its feature and label shapes
    first = {name: read(split, np.arange(1)) for name, split in named.items()}
    x_shape = first["train"][0].shape[1:]
    y_shape = first["train"][1].shape[1:]
    for name, (x, y) in first.items():
        if x.shape[1:] != x_shape:
            raise ValueError(
                f"{_field(splits, name, 'x')} has examples of shape {x.shape[1:]}, "
                f"but the training examples have shape {x_shape}."
            )
        if y.shape[1:] != y_shape:
            raise ValueError(
                f"{_field(splits, name, 'y')} has targets of shape {y.shape[1:]}, "
                f"but the training targets have shape {y_shape}."
            )
    if splits.num_classes:
        for name, split in named.items():
            labels = _labels(split)
            if labels is not None:
                check_labels(labels, splits.num_classes, _field(splits, name, "y"))


def _labels(split: Any) -> np.ndarray | None:
    """All labels of a split when they are at hand without reading the
    examples (arrays, :class:`bnlab.data.ArraySource`, a subset of one)."""
    if isinstance(split, tuple):
        return np.asarray(split[1])
    if isinstance(split, pipeline.ArraySource):
        return np.asarray(split.y)
    if isinstance(split, pipeline.Subset):
        inner = _labels(split.source)
        return None if inner is None else inner[split.indices]
    return None


def check_labels(labels: np.ndarray, num_classes: int, field: str) -> None:
    """Integer class labels in ``[0, num_classes)``; others are left to the
    loss (e.g. one-hot or soft targets of a custom loss)."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        return
    low, high = labels.min(), labels.max()
    if low < 0 or high >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"{field} holds label {bad.reshape(-1)[0]} ({bad.size} label(s) outside "
            f"[0, {num_classes})); labels must be class indices 0..{num_classes - 1} "
            "(or fix data.num_classes)."
        )
