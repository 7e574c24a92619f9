"""Float64 numpy references for BatchNorm (no JAX)."""

from __future__ import annotations

import numpy as np


def moments(x, reduction_axes, mask=None):
    """Per-feature (mean, biased var, count) in float64 over valid positions."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    n = m.sum(reduction_axes)
    xs = np.where(m, x, 0.0)
    mean = xs.sum(reduction_axes) / np.maximum(n, 1)
    keep = np.expand_dims(mean, reduction_axes)
    var = np.where(m, (x - keep) ** 2, 0.0).sum(reduction_axes) / np.maximum(n, 1)
    return mean, var, n


def batch_norm(x, mean, var, reduction_axes, scale=None, bias=None, eps=1e-5):
    """Normalize x (float64) with the given per-feature moments."""
    x = np.asarray(x, np.float64)
    y = (x - np.expand_dims(mean, reduction_axes)) / np.sqrt(
        np.expand_dims(var, reduction_axes) + eps
    )
    if scale is not None:
        y = y * np.expand_dims(np.asarray(scale, np.float64), reduction_axes)
    if bias is not None:
        y = y + np.expand_dims(np.asarray(bias, np.float64), reduction_axes)
    return y
