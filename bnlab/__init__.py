"""bnlab: exact, pure-function Batch Normalization for JAX and Flax.

Core API: :class:`BatchStats`, :func:`init_batch_stats`, :func:`batch_norm`.
Flax drop-ins: ``bnlab.linen.BatchNorm`` and ``bnlab.nnx.BatchNorm`` (imported
on first use, so ``import bnlab`` alone does not import Flax).
"""

import importlib

from bnlab.batch_norm import batch_moments, batch_norm, batch_renorm
from bnlab.stats import BatchStats, Moments, init_batch_stats, merge_moments
from bnlab.variants import fold_batch_norm, frozen_batch_norm, renorm_schedules

__all__ = [
    "BatchStats",
    "Moments",
    "batch_moments",
    "batch_norm",
    "batch_renorm",
    "fold_batch_norm",
    "frozen_batch_norm",
    "init_batch_stats",
    "linen",
    "merge_moments",
    "nnx",
    "precise_stats",
    "renorm_schedules",
]
__version__ = "0.2.0"

_LAZY_SUBMODULES = (
    "linen",
    "nnx",
    "parallel",
    "data",
    "models",
    "train",
    "diagnostics",
)


def __dir__() -> list[str]:
    # the public names, not the modules this file imports (importlib)
    return sorted({*__all__, *_LAZY_SUBMODULES, "__version__"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"bnlab.{name}")
    if name == "precise_stats":  # needs Flax: imported on first use
        from bnlab.precise import precise_stats

        return precise_stats
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
