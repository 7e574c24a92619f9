"""Data parallelism around a BN train step: placing batches, reducing gradients.

Three styles, one rule each for the gradient of the *global* mean loss:

============  ==========================  ===================================
style         BN statistics               gradient of the global mean loss
============  ==========================  ===================================
``pmap``      ``axis_name`` inside BN     ``pmean(grad(local_loss))``
``shard_map`` ``axis_name`` inside BN     ``grad(pmean(local_loss))``
``jit``       ``axis_name=None``          ``grad(loss)`` (XLA reduces)
============  ==========================  ===================================

The traps: under pmap ``grad(pmean(loss))`` returns device 0's local
gradient; under shard_map ``pmean(grad(loss))`` is 8x too large on 8 devices
(gradients of replicated parameters are already summed). :func:`value_and_grad`
applies the right rule, so a step function is written once for every style.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Style = Literal["jit", "shard_map", "pmap"]
# The one vocabulary of parallel styles (bnlab.parallel, bnlab.train.fit's
# parallel=, bnlab train's --set parallel=). "single" (one device) and "auto"
# (fit's former name) are older names of "jit".
STYLES: tuple[str, ...] = ("jit", "shard_map", "pmap")
_ALIASES = {"single": "jit", "auto": "jit"}

__all__ = [
    "STYLES",
    "Style",
    "canonical_style",
    "check_style",
    "replicate",
    "shard_batch",
    "split_for_pmap",
    "unreplicate",
    "value_and_grad",
]


def __dir__() -> list[str]:
    return sorted(__all__)  # not jax, np, ... (imported for this module's use)


def canonical_style(style: str) -> str:
    """The style's name in :data:`STYLES` (``"single"`` and ``"auto"`` are
    ``"jit"``).

    Raises:
      ValueError: not a parallel style.

    Example:
      >>> canonical_style("auto"), canonical_style("pmap")
      ('jit', 'pmap')
    """
    name = _ALIASES.get(style, style)
    if name not in STYLES:
        raise ValueError(
            f"parallel style {style!r} is not one of {STYLES} (or 'single' / 'auto', "
            "older names of 'jit')."
        )
    return name


def check_style(style: str, axis_name: Any = None) -> None:
    """Raises ValueError for an unknown style or a missing/extra axis_name."""
    style = canonical_style(style)
    needs_axis = style in ("pmap", "shard_map")
    if needs_axis and axis_name is None:
        raise ValueError(
            f"style={style!r} synchronises BN statistics over an axis: pass the "
            "axis_name used by jax.pmap / the shard_map mesh (e.g. 'batch')."
        )
    if not needs_axis and axis_name is not None:
        raise ValueError(
            f"style={style!r} has no named axis (XLA inserts the reductions under "
            f"jit); pass axis_name=None, not {axis_name!r}."
        )


def value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    style: Style,
    axis_name: Any = None,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``jax.value_and_grad`` of the global mean loss, for a parallel style.

    ``loss_fn`` returns the mean loss over the batch it sees (the local shard
    under pmap / shard_map, the whole global batch under jit). The returned
    function gives ``(global mean loss[, aux]), grads`` with the gradient of
    the global mean loss, replicated, whatever the style; shards must hold
    equal numbers of examples.

    Args:
      loss_fn: ``(*args) -> loss`` or ``(loss, aux)`` with ``has_aux``.
      style: ``"jit"``, ``"shard_map"`` or ``"pmap"`` (:data:`STYLES`).
      axis_name: the pmap / mesh axis for pmap and shard_map; None otherwise.
      argnums: as ``jax.value_and_grad``.
      has_aux: as ``jax.value_and_grad``.

    Returns:
      A function with ``loss_fn``'s signature.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab.parallel
      >>> f = bnlab.parallel.value_and_grad(lambda w: jnp.sum(w**2), style="jit")
      >>> f(jnp.ones(2))[1]
      Array([2., 2.], dtype=float32)
    """
    check_style(style, axis_name)
    style = canonical_style(style)
    vg = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=has_aux)
    if style == "jit":
        return vg

    def mean_out(out):
        if has_aux:
            return lax.pmean(out[0], axis_name), out[1]
        return lax.pmean(out, axis_name)

    if style == "pmap":

        def pmap_vg(*args):
            out, grads = vg(*args)
            return mean_out(out), lax.pmean(grads, axis_name)

        return pmap_vg

    def global_loss(*args):
        return mean_out(loss_fn(*args))

    return jax.value_and_grad(global_loss, argnums=argnums, has_aux=has_aux)


def _leading(tree: Any) -> int:
    sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}.")
    return sizes.pop()


def split_for_pmap(batch: Any, n_devices: int | None = None) -> Any:
    """Reshapes each leaf ``(B, ...)`` to ``(n_devices, B // n_devices, ...)``."""
    n = n_devices or jax.local_device_count()
    b = _leading(batch)
    if b % n:
        raise ValueError(
            f"batch size {b} does not split over {n} devices; use a multiple of {n}."
        )
    return jax.tree.map(lambda a: jnp.reshape(a, (n, b // n, *np.shape(a)[1:])), batch)


def unreplicate(tree: Any, check: bool = True) -> Any:
    """Device 0's copy of a pmap output with a leading device axis.

    With ``check`` it first verifies that all copies are identical, so a
    divergence (which ``out_axes=None`` would hide) is an error, not silence.
    """
    if check:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            arr = np.asarray(leaf)
            # bitwise, so that identical NaN copies count as identical
            if not all(np.array_equal(a, arr[0], equal_nan=True) for a in arr[1:]):
                raise ValueError(
                    f"replicated value {jax.tree_util.keystr(path)} differs across "
                    "devices: statistics or parameters have diverged."
                )
    return jax.tree.map(lambda a: a[0], tree)


def shard_batch(batch: Any, mesh: Mesh, axis: Any = "batch") -> Any:
    """Places each leaf's leading axis across ``axis`` of ``mesh``."""
    b = _leading(batch)
    names = axis if isinstance(axis, tuple) else (axis,)
    n = int(np.prod([mesh.shape[a] for a in names]))
    if b % n:
        raise ValueError(
            f"batch size {b} does not split over the {n} devices of mesh axis "
            f"{axis!r}; use a multiple of {n}."
        )
    return jax.device_put(batch, NamedSharding(mesh, P(axis)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
