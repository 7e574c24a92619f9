"""bnlab: exact, pure-function Batch Normalization for JAX and Flax.

Core API: :class:`BatchStats`, :func:`init_batch_stats`, :func:`batch_norm`.
Flax drop-ins: ``bnlab.linen.BatchNorm`` and ``bnlab.nnx.BatchNorm`` (imported
on first use, so ``import bnlab`` alone does not import Flax).
"""

import importlib

from bnlab.batch_norm import batch_norm
from bnlab.stats import BatchStats, init_batch_stats

__all__ = ["BatchStats", "batch_norm", "init_batch_stats", "linen", "nnx"]
__version__ = "0.2.0"

_LAZY_SUBMODULES = ("linen", "nnx", "parallel", "data", "models", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"bnlab.{name}")
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
