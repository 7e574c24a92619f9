"""Deterministic, resumable batches with grain.

The training stream is ``grain.MapDataset.source(...).shuffle(seed)
.repeat().batch(global_batch)``: a random-access dataset whose element ``i``
is the i-th global batch (each epoch reshuffled). So the data position *is*
the number of batches consumed, a resumed run reads exactly the batches it
would have read, and every host slices its rows out of the same global batch.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

__all__ = ["BatchStream"]


class BatchStream:
    """Global batch ``i`` (or this process's rows of it) of a shuffled stream.

    Args:
      x: inputs, leading axis = examples.
      y: targets.
      batch_size: global batch size (all processes together).
      seed: shuffle seed.
      process_index: which slice of each global batch this process feeds.
      process_count: number of processes sharing each global batch.

    Example:
      >>> import numpy as np
      >>> s = BatchStream(np.arange(10.0), np.arange(10), batch_size=4, seed=0)
      >>> xb, yb = s.batch(0); xb.shape
      (4,)
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
        self.process_index = (
            jax.process_index() if process_index is None else process_index
        )
        self.process_count = (
            jax.process_count() if process_count is None else process_count
        )
        if batch_size % self.process_count:
            raise ValueError(
                f"batch_size {batch_size} does not split over {self.process_count} "
                "processes; use a multiple of the process count."
            )
        self.batch_size = batch_size
        self.local_batch_size = batch_size // self.process_count
        self._ds = (
            grain.MapDataset.range(len(x))
            .shuffle(seed=seed)
            .repeat(None)
            .batch(batch_size)
        )
        self._x, self._y = x, y

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of global batch ``index`` (0-based)."""
        idx = np.asarray(self._ds[index])
        lo = self.process_index * self.local_batch_size
        idx = idx[lo : lo + self.local_batch_size]
        return self._x[idx], self._y[idx]
