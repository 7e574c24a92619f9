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

import numpy as np

__all__ = ["BatchStream"]


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
        if len(x) == 0:
            raise ValueError("the dataset has no examples.")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index()
            process_count = jax.process_count()
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} does not split over {process_count} "
                "processes; use a multiple of the process count."
            )
        self.process_index = process_index
        self.process_count = process_count
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed = seed
        self._x, self._y = x, y
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_examples(self) -> int:
        return len(self._x)

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

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of global batch ``index`` (0-based)."""
        idx = self.indices(index)
        return self._x[idx], self._y[idx]
