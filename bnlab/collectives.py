"""The one place where BatchNorm moments cross devices.

Forward: each device sends its exact local moments ``(count, center, offset,
m2)`` (count only with a mask) in ONE ``all_gather`` and every device merges
the gathered parts with Chan's formula (:func:`bnlab.stats.merge_moments`) in
the same order, so all devices hold bit-identical statistics. Never the
per-device variances or ``1/sqrt(var + eps)``: counts weigh every part, so
uneven masks merge exactly, a device holding no valid value included, and no
common shift has to be agreed on first (each device centres on its own data).
Backward: the two per-feature tangent sums travel in ONE ``psum``.

``axis_name`` may be one mesh/pmap/vmap axis name or a tuple of them;
``axis_index_groups`` (pmap / vmap only) restricts the reduction to groups of
devices. Under ``jax.shard_map`` use a 2-D mesh instead, e.g. axes
``('replica', 'bn_group')`` and ``axis_name='bn_group'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | tuple[str, ...]

__all__ = [
    "AxisName",
    "gather_across",
    "match_varying",
    "sum_across",
    "sync_size",
]


def _names(axis_name: AxisName) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def sync_size(
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
    fn: str | None = None,
) -> int:
    """How many devices share one set of statistics (static, at trace time).

    Args:
      axis_name: the statistics axis (or axes), or None.
      axis_index_groups: device groups of ``axis_name``, or None.
      fn: the function the user called (e.g. ``"batch_moments"``), to open
        the error messages with; None: the messages name no caller.

    Returns:
      The number of devices in one group (1 without ``axis_name``).

    Raises:
      ValueError: when ``axis_name`` is not bound by an enclosing ``pmap``,
        ``shard_map`` or ``vmap``, or the groups are malformed.
    """
    prefix = f"{fn}: " if fn else ""
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError(
                f"{prefix}axis_index_groups was given without axis_name; "
                "pass the axis_name the groups index into."
            )
        return 1
    size = 1
    for name in _names(axis_name):
        try:
            size *= int(lax.axis_size(name))
        except NameError:
            raise ValueError(
                f"{prefix}axis_name={name!r} is not bound here. Call it inside "
                f"jax.pmap(..., axis_name={name!r}), jax.vmap(..., axis_name={name!r}) "
                f"or jax.shard_map over a mesh with an axis {name!r}; under jax.jit "
                "on sharded arrays pass axis_name=None (XLA inserts the reduction)."
            ) from None
    if axis_index_groups is None:
        return size
    groups = [list(map(int, g)) for g in axis_index_groups]
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(size)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"{prefix}axis_index_groups={groups} must split the {size} indices "
            f"of axis {axis_name!r} into groups of equal size, each index once, "
            "e.g. [[0, 1], [2, 3]] for 4 devices."
        )
    return len(groups[0])


def _on_one_buffer(tree: Any, fn: Callable[[jax.Array], jax.Array]) -> Any:
    """Applies ``fn`` to all leaves concatenated into one flat array (one
    collective instead of one per leaf), then splits the result back."""
    leaves, treedef = jax.tree.flatten(tree)
    flat = fn(jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]))
    out, start = [], 0
    for leaf in leaves:
        out.append(flat[start : start + leaf.size].reshape(leaf.shape))
        start += leaf.size
    return jax.tree.unflatten(treedef, out)


def sum_across(
    tree: Any,
    axis_name: AxisName | None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Any:
    """Sums a pytree of same-dtype arrays over devices in ONE collective.

    The leaves are flattened into one buffer, reduced by a single ``psum`` and
    split again, so the number of all-reduces does not grow with the number
    of statistics sent. Identity when ``axis_name`` is None.
    """
    if axis_name is None:
        return tree
    return _on_one_buffer(
        tree,
        lambda flat: lax.psum(flat, axis_name, axis_index_groups=axis_index_groups),
    )


def gather_across(
    tree: Any,
    axis_name: AxisName,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Any:
    """Stacks every device's copy of a pytree along a new leading axis.

    The leaves (same shape and dtype) travel in ONE ``all_gather``. Under
    ``shard_map`` the result is typed as identical on every device of the
    group (``to="invarying"``), so statistics computed from it may leave
    through a replicated ``out_specs``.
    """
    leaves, treedef = jax.tree.flatten(tree)
    stacked = jnp.stack(leaves)
    names = _names(axis_name)
    kw = {"axis_index_groups": axis_index_groups}
    if set(names) <= _varying_axes(stacked):
        kw["to"] = "invarying"
    gathered = lax.all_gather(stacked, axis_name, **kw)
    return jax.tree.unflatten(treedef, [gathered[:, i] for i in range(len(leaves))])


def _varying_axes(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def match_varying(tree: Any, like: jax.Array, axis_name: AxisName | None) -> Any:
    """Casts replicated per-feature values to per-device where ``like`` is.

    Under ``shard_map`` (with its replication checks) replicated statistics
    meeting per-device data are cast implicitly at every use, and each cast
    transposes to one psum in the backward pass. Casting them together here
    makes that one psum for the whole layer. Identity under pmap, vmap and
    jit, which have no such types.
    """
    if axis_name is None:
        return tree
    names = _names(axis_name)
    if not set(names) <= _varying_axes(like):
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    todo = [i for i, leaf in enumerate(leaves) if not set(names) <= _varying_axes(leaf)]
    # One cast per dtype (complex statistics travel apart from real ones).
    for dtype in {leaves[i].dtype for i in todo}:
        idx = [i for i in todo if leaves[i].dtype == dtype]
        cast = _on_one_buffer(
            [leaves[i] for i in idx],
            lambda flat: lax.pcast(flat, names, to="varying"),
        )
        for i, leaf in zip(idx, cast, strict=True):
            leaves[i] = leaf
    return jax.tree.unflatten(treedef, leaves)
