"""Argument checks of the BN core.

Every check runs at trace time and raises with the offending value, what was
expected and how to fix it (house rule 4); the math in
:mod:`bnlab.batch_norm` starts from validated arguments. Values that are
traced (e.g. a momentum schedule inside ``jit``) cannot be checked here: the
algorithm keeps the running statistics valid for any such value instead (see
:func:`bnlab.stats.ema_update`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnlab.collectives import AxisName, sync_size
from bnlab.stats import BatchStats

__all__ = [
    "CONVENTIONS",
    "Layout",
    "canonical_axes",
    "check_count",
    "check_epsilon",
    "check_ghost",
    "check_input",
    "check_momentum",
    "check_options",
    "check_params",
    "check_renorm_bounds",
    "feature_layout",
    "hyper_parameter",
    "output_dtype",
]

CONVENTIONS = ("flax", "torch")


class Layout(NamedTuple):
    """Where the features of an input are.

    Attributes:
      feature_axes: sorted non-negative feature axes.
      reduction_axes: the other axes (the statistics reduce over these).
      feature_shape: ``x.shape`` on the feature axes (shape of the statistics).
      keep_shape: ``x.shape`` with 1 on the reduction axes (broadcasts the
        statistics against ``x``).
    """

    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    keep_shape: tuple[int, ...]


def canonical_axes(
    ndim: int, axis: Any, what: str = "axis", fn: str = "batch_norm"
) -> tuple[int, ...]:
    """Sorted non-negative axes; TypeError/ValueError naming the bad value.

    Example:
      >>> from bnlab.checks import canonical_axes
      >>> canonical_axes(4, (-1, 1))
      (1, 3)
    """
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    for a in items:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise TypeError(
                f"{fn}: {what}={axis!r} must be an int or a tuple of ints "
                f"(feature axes), got {type(a).__name__} {a!r}; e.g. axis=-1 for "
                "NHWC / (batch, features), axis=1 for NCHW."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: {what}={axis!r} is out of range for an input with "
                f"{ndim} dimensions; pass feature axes in [-{ndim}, {ndim - 1}] "
                "(e.g. axis=-1 for NHWC / (batch, features), axis=1 for NCHW)."
            )
    out = [int(a) % ndim for a in items]
    if len(set(out)) != len(out):
        raise ValueError(
            f"{fn}: {what}={axis!r} names the same axis twice; list each "
            "feature axis once."
        )
    return tuple(sorted(out))


def feature_layout(shape: Sequence[int], axis: Any, fn: str = "batch_norm") -> Layout:
    """The :class:`Layout` of an input of ``shape`` with feature ``axis``.

    Example:
      >>> from bnlab.checks import feature_layout
      >>> feature_layout((8, 5, 5, 3), -1).keep_shape
      (1, 1, 1, 3)
    """
    shape = tuple(shape)
    feature_axes = canonical_axes(len(shape), axis, fn=fn)
    reduction = tuple(i for i in range(len(shape)) if i not in feature_axes)
    return Layout(
        feature_axes,
        reduction,
        tuple(shape[a] for a in feature_axes),
        tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape))),
    )


def check_input(
    x: Any, *, axis: Any, mask: Any, fn: str = "batch_norm", complex_ok: bool = True
) -> tuple[jax.Array, Any, Layout]:
    """Validates ``x`` (floating, or complex if ``complex_ok``), ``axis`` and
    ``mask`` (boolean, broadcastable to ``x``): what every BN entry point
    takes, statistics or not.

    Returns:
      ``(x as an array, mask or None, layout)``.
    """
    x = jnp.asarray(x)
    complex_x = jnp.issubdtype(x.dtype, jnp.complexfloating)
    if complex_x and not complex_ok:
        raise TypeError(
            f"{fn}: complex inputs are not supported (x has dtype {x.dtype}); "
            "use bnlab.batch_norm, or pass the real and imaginary parts apart."
        )
    if not (jnp.issubdtype(x.dtype, jnp.floating) or complex_x):
        raise TypeError(
            f"{fn}: x must be a floating (or complex) array, got dtype "
            f"{x.dtype}; cast it first, e.g. x.astype(jnp.float32) (the Flax "
            "drop-in modules do this for integer inputs)."
        )
    layout = feature_layout(x.shape, axis, fn)
    if mask is not None:
        if not hasattr(mask, "dtype"):
            mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(
                f"{fn}: mask has dtype {mask.dtype}; it must be boolean (a "
                "float mask would count 0.3 or NaN as True). Pass e.g. mask > 0.5 "
                "or mask.astype(bool) once its values are 0/1."
            )
        try:
            ok = np.broadcast_shapes(mask.shape, x.shape) == x.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{fn}: mask of shape {mask.shape} does not broadcast to x of "
                f"shape {x.shape}; give it x's shape or size-1 axes where it is "
                "constant, e.g. mask[..., None] for a per-example mask."
            )
    return x, mask, layout


def _array(name: str, a: Any, shape: tuple[int, ...], *, complex_ok: bool, fn: str):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(
            f"{fn}: {name} must be an array of shape {shape}, got "
            f"{type(a).__name__}; build statistics with bnlab.init_batch_stats"
            f"({shape}) and pass scale/bias as arrays or None."
        )
    if tuple(a.shape) != shape:
        raise ValueError(
            f"{fn}: {name} has shape {tuple(a.shape)} but the feature axes "
            f"of x have shape {shape}. Create it with that shape (e.g. "
            f"bnlab.init_batch_stats({shape})) or fix `axis`."
        )
    kinds = (jnp.floating, jnp.complexfloating) if complex_ok else (jnp.floating,)
    if not any(jnp.issubdtype(a.dtype, k) for k in kinds):
        what = "floating" + (" or complex" if complex_ok else "")
        raise TypeError(
            f"{fn}: {name} has dtype {a.dtype}; it must be {what}"
            + (
                " (complex only with a complex x)"
                if not complex_ok and jnp.issubdtype(a.dtype, jnp.complexfloating)
                else ""
            )
            + f", e.g. {name}.astype(jnp.float32)."
        )
    return a


def check_params(
    stats: Any,
    scale: Any,
    bias: Any,
    layout: Layout,
    *,
    complex_x: bool,
    fn: str = "batch_norm",
) -> tuple[BatchStats, Any, Any]:
    """Validates the running statistics (a :class:`bnlab.BatchStats` or a
    Flax-style ``{'mean', 'var'}`` dict) and ``scale`` / ``bias`` (arrays or
    None) against the feature shape.

    Returns:
      ``(stats as BatchStats, scale, bias)``.
    """
    if isinstance(stats, dict) and set(stats) == {"mean", "var"}:
        stats = BatchStats(stats["mean"], stats["var"])
    if not isinstance(stats, BatchStats):
        raise TypeError(
            f"{fn}: stats must be bnlab.BatchStats(mean, var), got "
            f"{type(stats).__name__}; create it with bnlab.init_batch_stats."
        )
    fs = layout.feature_shape
    stats = BatchStats(
        _array("stats.mean", stats.mean, fs, complex_ok=complex_x, fn=fn),
        _array("stats.var", stats.var, fs, complex_ok=False, fn=fn),
    )
    if scale is not None:
        scale = _array("scale", scale, fs, complex_ok=complex_x, fn=fn)
    if bias is not None:
        bias = _array("bias", bias, fs, complex_ok=complex_x, fn=fn)
    return stats, scale, bias


def check_options(
    *, train: Any, convention: Any = "flax", dtype: Any = None, fn: str = "batch_norm"
) -> None:
    """``train`` a Python bool, ``convention`` known, ``dtype`` inexact."""
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(
            f"{fn}: train={train!r} must be a Python bool: it selects the "
            "computation at trace time (mark it static under jit)."
        )
    if convention not in CONVENTIONS:
        raise ValueError(f"{fn}: convention={convention!r}; use one of {CONVENTIONS}.")
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{fn}: dtype={dtype!r} is not a floating or complex dtype; the "
            "output of a normalization is fractional (e.g. dtype=jnp.bfloat16)."
        )


def hyper_parameter(
    name: str, value: Any, *, example: str, fn: str = "batch_norm"
) -> float | None:
    """A scalar hyper-parameter as a float, or None when it is traced.

    Accepts a Python int/float, a numpy/JAX scalar or 0-d array, or a traced
    0-d array (a schedule inside ``jit``; its value is checked by the
    computation, not here). Strings, bools, complex values and arrays with
    more than one element raise a TypeError naming ``name`` and the fix.

    Example:
      >>> from bnlab.checks import hyper_parameter
      >>> hyper_parameter("momentum", 0.9, example="momentum=0.99")
      0.9
    """
    fix = (
        f"pass one real number for all features, e.g. {example} (a Python "
        "float, or a 0-d array, possibly traced under jit)"
    )
    if isinstance(value, jax.core.Tracer):
        aval = jax.typeof(value)
        if aval.shape != () or not _real_number_dtype(aval.dtype):
            raise TypeError(
                f"{fn}: {name} is a traced array of shape {aval.shape} and dtype "
                f"{aval.dtype}; {fix}."
            )
        return None
    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
        raise TypeError(f"{fn}: {name}={value!r} is a {type(value).__name__}; {fix}.")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{fn}: {name}={value!r} is a {type(value).__name__}; {fix}.")
    if tuple(value.shape) != () or not _real_number_dtype(value.dtype):
        raise TypeError(
            f"{fn}: {name} is an array of shape {tuple(value.shape)} and dtype "
            f"{value.dtype}; {fix}."
        )
    return float(np.asarray(value))


def _real_number_dtype(dtype: Any) -> bool:
    # (bool is not an integer dtype for numpy / JAX)
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def check_momentum(momentum: Any, fn: str = "batch_norm") -> bool:
    """Checks a concrete ``momentum`` in [0, 1].

    Returns:
      Whether it is traced (then :func:`bnlab.stats.ema_update` guards it).
    """
    m = hyper_parameter("momentum", momentum, example="momentum=0.99", fn=fn)
    if m is not None and not 0.0 <= m <= 1.0:
        raise ValueError(
            f"{fn}: momentum={momentum} must lie in [0, 1]. Flax accepts any "
            "value, but outside [0, 1] the running statistics are extrapolated "
            "rather than averaged and can diverge, so bnlab refuses it."
        )
    return m is None


def check_epsilon(epsilon: Any, compute_dtype: Any, fn: str = "batch_norm") -> bool:
    """Checks a concrete ``epsilon``: finite and > 0 in ``compute_dtype``.

    Returns:
      Whether it is traced (then the normalization guards it).
    """
    e = hyper_parameter("epsilon", epsilon, example="epsilon=1e-5", fn=fn)
    if e is not None and not (
        math.isfinite(e) and e > 0 and np.asarray(e, compute_dtype) > 0
    ):
        raise ValueError(
            f"{fn}: epsilon={epsilon} must be > 0, finite, and > 0 in "
            f"{np.dtype(compute_dtype).name} (Flax uses 1e-5). Flax accepts "
            "epsilon <= 0, but then a constant feature divides by zero (NaN/Inf "
            "outputs), so bnlab refuses it."
        )
    return e is None


def check_renorm_bounds(r_max: Any, d_max: Any, fn: str = "batch_renorm") -> None:
    """Concrete ``r_max >= 1`` and ``d_max >= 0`` (traced ones are guarded in
    the computation)."""
    for name, value, low, example in (
        ("r_max", r_max, 1.0, "r_max=3.0"),
        ("d_max", d_max, 0.0, "d_max=5.0"),
    ):
        v = hyper_parameter(name, value, example=example, fn=fn)
        if v is not None and not v >= low:
            raise ValueError(
                f"{fn}: {name}={value} must be >= {low:g}, e.g. {example} "
                "(1 and 0 give plain batch_norm)."
            )


def check_ghost(
    ghost_size: Any, shape: tuple[int, ...], layout: Layout, fn: str = "batch_norm"
) -> None:
    """``ghost_size`` an int dividing the examples on axis 0 (not a feature
    axis); ``fn``, the function the user called, opens the messages."""
    if isinstance(ghost_size, (bool, np.bool_)) or not isinstance(
        ghost_size, (int, np.integer)
    ):
        raise TypeError(
            f"{fn}: ghost_size={ghost_size!r} must be an int (examples per "
            "ghost batch) or None."
        )
    if 0 in layout.feature_axes:
        raise ValueError(
            f"{fn}: ghost_size splits axis 0 (the example axis) into ghost "
            f"batches, but axis 0 is a feature axis here (axis={layout.feature_axes})."
        )
    if ghost_size < 1 or shape[0] % ghost_size:
        raise ValueError(
            f"{fn}: ghost_size={ghost_size} does not divide the {shape[0]} "
            "examples on axis 0 of x (per device under sync); use a divisor, e.g. "
            f"{_largest_divisor(shape[0], max(int(ghost_size), 1))}."
        )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def check_count(
    *,
    shape: tuple[int, ...],
    layout: Layout,
    view_shape: tuple[int, ...],
    reduction: tuple[int, ...],
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
    ghost_size: int | None = None,
    fn: str = "batch_norm",
) -> None:
    """A batch needs >= 2 values per feature (per ghost batch) to train on.

    Args:
      shape: shape of ``x``.
      layout: its :class:`Layout`.
      view_shape: shape the statistics reduce (``x``'s, or the ghost view's).
      reduction: the reduced axes of that view.
      axis_name: statistics axis (the count is over all its devices).
      axis_index_groups: device groups of ``axis_name``.
      ghost_size: examples per ghost batch (counted per device), or None.
      fn: the function the user called (``batch_norm``, ``batch_renorm``,
        ``batch_moments``), to open the messages with.
    """
    measures_only = fn == "batch_moments"  # it normalizes nothing
    local = math.prod(view_shape[a] for a in reduction)
    count = (
        local
        if ghost_size is not None
        else local * sync_size(axis_name, axis_index_groups, fn=fn)
    )
    if count >= 2:
        return
    raise ValueError(
        f"{fn if measures_only else fn + '(train=True)'} got x of shape {shape} "
        f"with feature axes {layout.feature_axes}: {count} value per feature"
        + (f" per ghost batch of {ghost_size}" if ghost_size is not None else "")
        + (f" across axis {axis_name!r}" if axis_name is not None else "")
        + (
            ". One value has no spread: pass at least 2 values per feature, or "
            "merge over devices with axis_name."
            if measures_only
            else ". Its batch variance is 0, so every output would equal `bias` and "
            "the running variance would decay to 0. Train on batches of at least "
            "2 examples, synchronise statistics across devices with axis_name, or "
            "use train=False (running statistics)."
        )
    )


def output_dtype(x: Any, scale: Any, bias: Any, dtype: Any) -> jnp.dtype:
    """The output dtype: ``dtype``, else Flax Linen's ``result_type(x, scale,
    bias)`` (computed with standard promotion so that it also holds under
    ``jax_numpy_dtype_promotion='strict'``).

    Example:
      >>> import jax.numpy as jnp
      >>> from bnlab.checks import output_dtype
      >>> output_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2), None, None)
      dtype('float32')
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    args = [a for a in (x, scale, bias) if a is not None]
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*args)
