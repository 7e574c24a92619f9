"""Deterministic, resumable batches of an in-memory dataset.

The training stream is every epoch's permutation of the examples, one after
another, cut into global batches: example ``j`` of the stream is
``perm(j // n)[j % n]`` with ``perm(e) = default_rng([seed, e]).permutation(n)``.
So global batch ``i`` is a pure function of ``(seed, i)``: the data position
*is* the number of batches consumed, a resumed run reads exactly the batches
it would have read, and every process slices its rows out of the same global
batch. Batches are gathered with one numpy indexing call (no per-example
Python work); a batch may straddle two epochs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ArraySource",
    "BatchStream",
    "EpochOrder",
    "Source",
    "StreamingDataset",
    "Subset",
    "read",
]


class EpochOrder:
    """Example indices of global batch ``i`` of shuffled epochs: a pure
    function of ``(seed, i)`` (see the module docstring).

    Example:
      >>> o = EpochOrder(10, batch_size=4, seed=0)
      >>> o.indices(0).shape, bool((o.indices(2) == o.indices(2)).all())
      ((4,), True)
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if num_examples <= 0:
            raise ValueError("the dataset has no examples.")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} does not split over {process_count} "
                "processes; use a multiple of the process count."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:  # access is sequential: keep a few epochs
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.num_examples)
        return self._perms[epoch]

    def indices(self, index: int) -> np.ndarray:
        """Example indices of this process's rows of global batch ``index``."""
        n = self.num_examples
        lo = index * self.batch_size + self.process_index * self.local_batch_size
        first, last = lo // n, (lo + self.local_batch_size - 1) // n
        if first == last:  # the common case: one slice of one permutation
            return self._perm(first)[lo % n : lo % n + self.local_batch_size]
        j = np.arange(lo, lo + self.local_batch_size)
        epochs = j // n
        out = np.empty(len(j), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[j[sel] % n]
        return out


class BatchStream:
    """Global batch ``i`` (or this process's rows of it) of a shuffled stream.

    Args:
      x: inputs, leading axis = examples.
      y: targets.
      batch_size: global batch size (all processes together).
      seed: shuffle seed.
      process_index: which slice of each global batch this process feeds
        (default ``jax.process_index()``).
      process_count: number of processes sharing each global batch.

    Example:
      >>> import numpy as np
      >>> s = BatchStream(np.arange(10.0), np.arange(10), batch_size=4, seed=0)
      >>> xb, yb = s.batch(0); xb.shape
      (4,)
      >>> bool(np.array_equal(s.batch(3)[1], s.batch(3)[1]))  # pure in (seed, i)
      True
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index()
            process_count = jax.process_count()
        self.order = EpochOrder(len(x), batch_size, seed, process_index, process_count)
        self.batch_size = batch_size
        self.local_batch_size = self.order.local_batch_size
        self.seed = seed
        self._x, self._y = x, y

    @property
    def num_examples(self) -> int:
        return len(self._x)

    def indices(self, index: int) -> np.ndarray:
        """Example indices of this process's rows of global batch ``index``."""
        return self.order.indices(index)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of global batch ``index`` (0-based)."""
        idx = self.indices(index)
        return self._x[idx], self._y[idx]


# ------------------------------------------------------------ random access


@runtime_checkable
class Source(Protocol):
    """Random access to examples: ``len(source)`` and ``source[i] -> (x, y)``.

    A ``grain.MapDataset`` whose elements are ``(x, y)`` pairs, an
    :class:`ArraySource` over memory-mapped files, or any object with these two
    methods. :func:`bnlab.train.fit` reads the examples of each step by index,
    so a resumed run reads exactly the batches it would have read. Sources that
    also have ``read(indices) -> (xs, ys)`` are read in one call per batch.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, Any]: ...


class ArraySource:
    """A :class:`Source` over ``(x, y)`` arrays, e.g. ``np.load(path,
    mmap_mode="r")`` for data that does not fit in memory (the OS pages in
    only the rows a batch reads).

    Example:
      >>> import numpy as np
      >>> s = ArraySource(np.arange(10.0)[:, None], np.arange(10) % 2)
      >>> len(s), s[3][1], s.read(np.array([1, 4]))[0].ravel().tolist()
      (10, np.int64(1), [1.0, 4.0])
    """

    def __init__(self, x: Any, y: Any):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.x[index], self.y[index]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The examples at ``indices`` (any shape), stacked."""
        flat = np.asarray(indices).reshape(-1)
        # memmaps read fastest in increasing order: sort, read, unsort
        order = np.argsort(flat, kind="stable")
        x = np.asarray(self.x[flat[order]])
        y = np.asarray(self.y[flat[order]])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        shape = np.shape(indices)
        return (
            x[inverse].reshape(shape + x.shape[1:]),
            y[inverse].reshape(shape + y.shape[1:]),
        )

    @classmethod
    def from_npy(cls, x_path: Any, y_path: Any) -> ArraySource:
        """Memory-mapped ``.npy`` files (``np.save`` output): nothing is read
        until a batch needs it."""
        return cls(np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r"))


class Subset:
    """The examples ``indices`` of ``source``, as a :class:`Source`."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.source[int(self.indices[index])]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return read(self.source, self.indices[np.asarray(indices)])


def read(source: Source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples ``indices`` (any shape) of ``source`` as ``(xs, ys)`` arrays
    with ``indices``' shape in front."""
    if hasattr(source, "read"):
        return source.read(indices)
    idx = np.asarray(indices)
    pairs = [source[int(i)] for i in idx.reshape(-1)]
    if pairs and not (isinstance(pairs[0], (tuple, list)) and len(pairs[0]) == 2):
        raise TypeError(
            f"source[i] returned {type(pairs[0]).__name__}; a training source must "
            "return (x, y) pairs (e.g. grain's .map(lambda r: (r['image'], "
            "r['label'])))."
        )
    xs = np.stack([np.asarray(p[0]) for p in pairs])
    ys = np.stack([np.asarray(p[1]) for p in pairs])
    return xs.reshape(idx.shape + xs.shape[1:]), ys.reshape(idx.shape + ys.shape[1:])


class StreamingDataset(NamedTuple):
    """Train / test (/ validation) :class:`Source` s, for data that does not
    fit in memory; :func:`bnlab.train.fit` reads each step's examples by index.

    Attributes:
      train: the training source.
      test: the test source (or None).
      num_classes: number of classes (0 for regression).
      val: the validation source (or None; ``fit(validation=fraction)``
        carves one out of ``train``).
    """

    train: Source
    test: Source | None
    num_classes: int
    val: Source | None = None
