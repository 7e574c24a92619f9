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


def ulp_of_max(expected) -> float:
    """The float32 spacing at ``max |expected|``: the rounding unit of a
    float32 computation whose results have that magnitude."""
    magnitude = np.max(np.abs(np.asarray(expected, np.float64)), initial=0.0)
    return float(np.spacing(np.float32(magnitude)))


def assert_close_ulps(actual, expected, ulps, *, where=None, err_msg=""):
    """``max |actual - expected| <= ulps * spacing(float32(max |expected|))``.

    A float32 result is rounded relative to its magnitude, and a different
    summation order (vector width, GPU reduction trees) moves it by a few
    units of the last place: tolerances scaled to the output stay valid on
    any CPU or GPU, where an absolute tolerance is either loose for small
    outputs or tighter than float32 can represent for large ones. Compare
    with a float64 reference; NaN in either array fails.
    """
    actual = np.asarray(
        actual, np.complex128 if np.iscomplexobj(actual) else np.float64
    )
    expected = np.asarray(
        expected, np.complex128 if np.iscomplexobj(expected) else np.float64
    )
    if where is not None:
        actual = actual[np.broadcast_to(where, actual.shape)]
        expected = expected[np.broadcast_to(where, expected.shape)]
    unit = ulp_of_max(expected)
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert np.isfinite(err) and err <= ulps * unit, (
        f"max error {err:.3g} = {err / unit:.1f} ulps of max|expected| "
        f"(unit {unit:.3g}) > {ulps} ulps. {err_msg}"
    )
