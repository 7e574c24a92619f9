"""Float64 numpy references for BatchNorm (no JAX)."""

from __future__ import annotations

import math

import ml_dtypes
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


def ulp_of_max(expected, dtype=np.float32) -> float:
    """The spacing of ``dtype`` at ``max |expected|``: the rounding unit of a
    computation in ``dtype`` whose results have that magnitude."""
    magnitude = float(np.max(np.abs(np.asarray(expected)), initial=0.0))
    info = ml_dtypes.finfo(dtype)
    if magnitude < float(info.smallest_normal):
        return float(info.smallest_subnormal)
    return 2.0 ** (math.floor(math.log2(magnitude)) - info.nmant)


def assert_close_ulps(
    actual, expected, ulps, *, where=None, scale=None, dtype=np.float32, err_msg=""
):
    """``max |actual - expected| <= ulps * spacing(float32(max |expected|))``.

    A float32 result is rounded relative to its magnitude, and a different
    summation order (vector width, GPU reduction trees) moves it by a few
    units of the last place: tolerances scaled to the output stay valid on
    any CPU or GPU, where an absolute tolerance is either loose for small
    outputs or tighter than float32 can represent for large ones. Compare
    with a float64 reference; NaN in either array fails.

    ``scale``: the magnitude the rounding is relative to when it is not the
    result's own, i.e. when the expected values are a cancellation (a
    gradient that is zero analytically is rounding noise of the size of the
    terms it cancels): the unit is then the spacing at ``max(max|expected|,
    scale)``. ``dtype``: count ulps of another dtype (``jnp.bfloat16`` for
    bf16 results).
    """
    as_dtype = (
        np.complex128
        if np.iscomplexobj(actual) or np.iscomplexobj(expected)
        else np.float64
    )
    actual, expected = np.asarray(actual, as_dtype), np.asarray(expected, as_dtype)
    if where is not None:
        actual = actual[np.broadcast_to(where, actual.shape)]
        expected = expected[np.broadcast_to(where, expected.shape)]
    magnitude = expected if scale is None else [np.abs(expected).max(), scale]
    unit = ulp_of_max(magnitude, dtype)
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert np.isfinite(err) and err <= ulps * unit, (
        f"max error {err:.3g} = {err / unit:.1f} ulps of max|expected| "
        f"(unit {unit:.3g}) > {ulps} ulps. {err_msg}"
    )


def one_train_step(config, x, y, style=None):
    """One step of ``bnlab train``'s model for ``config`` on the batch
    ``(x, y)``, in the config's parallel style, as ``fit`` runs it; returns
    ``(compiled step, its arguments, host state after the step)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bnlab.parallel import canonical_style
    from bnlab.train import DATA_AXIS, build_model, build_optimizer
    from bnlab.train.batches import make_chunk
    from bnlab.train.model import model_fns
    from bnlab.train.presets import layout_of
    from bnlab.train.step import default_loss, make_arm_init, make_arm_step

    style = canonical_style(style or config.parallel)
    layout = layout_of(config)
    model = build_model(
        config, 10, None if style == "jit" else DATA_AXIS, layout.bn_groups
    )
    fns = model_fns(model)
    tx = build_optimizer(config)
    loss = default_loss(10)
    init = jax.vmap(make_arm_init(fns, lambda hp: tx, ["accuracy"], jnp.asarray(x[:2])))
    state = layout.put_arms(jax.device_get(init(np.zeros(1, np.uint32), {})))
    step = make_arm_step(
        fns,
        lambda hp: tx,
        loss,
        style=style,
        axis_name=layout.grad_axis,
        average_axis=layout.average_axis,
    )
    compiled = layout.compile(make_chunk(step, gather=False), n_arms=2, n_replicated=0)
    args = (
        state,
        layout.put_arms({}),
        *layout.put_chunk((x[None, None], y[None, None])),
    )
    new = compiled(*args)
    return compiled, args, layout.host(new)
