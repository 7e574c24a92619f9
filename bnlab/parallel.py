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

Style = Literal["pmap", "shard_map", "jit", "single"]
STYLES: tuple[str, ...] = ("pmap", "shard_map", "jit", "single")

__all__ = [
    "STYLES",
    "Style",
    "check_style",
    "replicate",
    "shard_batch",
    "split_for_pmap",
    "unreplicate",
    "value_and_grad",
]


def check_style(style: str, axis_name: Any = None) -> None:
    """Raises ValueError for an unknown style or a missing/extra axis_name."""
    if style not in STYLES:
        raise ValueError(f"parallel style {style!r} is not one of {STYLES}.")
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
      style: ``"pmap"``, ``"shard_map"``, ``"jit"`` or ``"single"``.
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
    vg = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=has_aux)
    if style in ("jit", "single"):
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


class DataParallel:
    """Places state and batches for one style and compiles the step for it.

    ``single``: one device, plain ``jit``. ``jit``: a 1-D mesh over all devices
    (all processes), batch sharded, state replicated, XLA inserts reductions.
    ``shard_map``: the same mesh, the step runs per shard with BN and gradient
    collectives over ``axis_name``. ``pmap``: this process's devices with a
    leading device axis; the pmap axis spans all processes' devices.

    BN groups (``bn_group_size=G``, statistics over groups of G devices):
    under shard_map a 2-D mesh ``(devices / G, G)`` with axes
    ``("replica", axis_name)``: BN synchronises over ``axis_name``
    (:attr:`bn_axis_name`), gradients over both (:attr:`axis_name` is the
    pair); under pmap ``axis_index_groups`` (:attr:`bn_groups`).

    Args:
      style: one of :data:`STYLES`.
      axis_name: mesh / pmap axis name.
      bn_group_size: devices per BN statistics group; 0 or None = all.
    """

    def __init__(
        self, style: Style, axis_name: str = "batch", bn_group_size: int | None = None
    ):
        check_style(style, None if style in ("single", "jit") else axis_name)
        self.style = style
        n = jax.device_count()
        group = bn_group_size or 0
        if group and style not in ("pmap", "shard_map"):
            raise ValueError(
                f"bn_group_size={group} needs parallel='pmap' or 'shard_map' (BN "
                f"groups are explicit device groups), not {style!r}."
            )
        if group and (n % group or group > n):
            raise ValueError(
                f"bn_group_size={group} does not divide the {n} devices; use a "
                f"divisor of {n}."
            )
        self.grouped = bool(group) and group < n
        # Gradient and metric collectives: every device. BN: its group.
        self.axis_name = axis_name if style in ("pmap", "shard_map") else None
        self.bn_axis_name = self.axis_name
        self.bn_groups = None
        self.mesh_axis: Any = axis_name
        self.mesh = None
        if style in ("jit", "shard_map"):
            if self.grouped and style == "shard_map":
                self.mesh = jax.make_mesh((n // group, group), ("replica", axis_name))
                self.mesh_axis = ("replica", axis_name)
                self.axis_name = self.mesh_axis
            else:
                self.mesh = jax.make_mesh((n,), (axis_name,))
        if self.grouped and style == "pmap":
            self.bn_groups = [list(range(i, i + group)) for i in range(0, n, group)]
        # the axis along which BN groups (and their running statistics) differ
        self.group_axis = None
        if self.grouped:
            self.group_axis = "replica" if style == "shard_map" else axis_name
        self.n_local = jax.local_device_count() if style == "pmap" else None

    def put_state(self, state: Any) -> Any:
        """State on devices: replicated (mesh or pmap copies) or on device 0."""
        if self.style == "single":
            return jax.device_put(state)
        if self.style == "pmap":
            copies = jax.pmap(lambda _, t: t, in_axes=(0, None))
            return copies(jnp.arange(self.n_local), state)
        sharding = NamedSharding(self.mesh, P())
        if jax.process_count() == 1:
            return jax.device_put(state, sharding)
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
            state,
        )

    def put_batch(self, batch: Any) -> Any:
        """This process's rows of the global batch, placed for the style."""
        if self.style == "single":
            return batch
        if self.style == "pmap":
            return split_for_pmap(batch, self.n_local)
        sharding = NamedSharding(self.mesh, P(self.mesh_axis))
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(sharding, a), batch
        )

    def compile(
        self,
        step: Callable[..., Any],
        donate_state: bool = True,
        replicated: int = 1,
        sharded_from: int | None = None,
    ) -> Callable:
        """``step(*state, *batch) -> outputs`` compiled for the style.

        The first ``replicated`` arguments are state (replicated, placed with
        :meth:`put_state`; the first is donated); arguments from
        ``sharded_from`` on (default: right after the state) are batch leaves
        split over devices; any in between (e.g. a whole dataset kept on the
        device) are replicated too. Every output is replicated state.
        """
        donate = (0,) if donate_state else ()
        if sharded_from is None:
            sharded_from = replicated
        if self.style in ("single", "jit"):
            return jax.jit(step, donate_argnums=donate)
        if self.style == "pmap":
            return jax.pmap(step, axis_name=self.axis_name, donate_argnums=donate)

        def sharded(*args):
            specs = tuple(
                P() if i < sharded_from else P(self.mesh_axis) for i in range(len(args))
            )
            return jax.shard_map(step, mesh=self.mesh, in_specs=specs, out_specs=P())(
                *args
            )

        return jax.jit(sharded, donate_argnums=donate)

    def local_copy(self, tree: Any) -> Any:
        """One host copy (numpy) of replicated device state; checks pmap copies."""
        if self.style == "pmap":
            return jax.tree.map(np.asarray, unreplicate(jax.device_get(tree)))
        if self.style == "single" or jax.process_count() == 1:
            return jax.device_get(tree)
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
