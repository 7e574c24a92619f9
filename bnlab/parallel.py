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
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Style = Literal["pmap", "shard_map", "jit", "single"]
STYLES: tuple[str, ...] = ("pmap", "shard_map", "jit", "single")

__all__ = [
    "ARMS",
    "DATA",
    "LAYOUT_STYLES",
    "REPLICA",
    "STYLES",
    "ArmsLayout",
    "Style",
    "arms_layout",
    "check_style",
    "replicate",
    "shard_batch",
    "split_for_pmap",
    "unreplicate",
    "value_and_grad",
]


def __dir__() -> list[str]:
    return sorted(__all__)  # not jax, np, ... (imported for this module's use)


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


# ---------------------------------------------------------- arms x devices

ARMS, REPLICA, DATA = "arms", "replica", "data"
LAYOUT_STYLES = ("auto", "shard_map", "pmap")


class ArmsLayout:
    """Where arms and their batches live: one mesh of ``arms x data``.

    Arms (models of one program, stacked on a leading axis) are spread over
    the mesh axis ``"arms"``; each arm's batch is split over ``"data"``
    (data parallel within an arm). Build one with :func:`arms_layout`.

    Styles:
      ``auto``: one ``jax.jit`` program on the mesh; XLA inserts the
        reductions, so BN layers (bnlab's or Flax's, no ``axis_name``) see
        the statistics of the arm's whole batch.
      ``shard_map``: the step runs per device; BN layers must synchronise
        over ``axis_name="data"`` (:data:`DATA`), gradients follow the
        shard_map rule. With BN groups the mesh is ``arms x replica x data``
        and BN syncs within ``data`` (the group).
      ``pmap``: this process's devices with a leading device axis; every
        device holds every arm and a slice of each batch; BN syncs over
        ``"data"`` (optionally in ``axis_index_groups``).

    Attributes:
      style: one of :data:`LAYOUT_STYLES`.
      mesh: the device mesh (for pmap: a 1-D ``data`` mesh of its devices).
      arm_shards: devices along ``arms``.
      data_shards: devices each arm's batch is split over.
      grad_axis: the axis (or axes) gradients and metrics reduce over
        (shard_map / pmap), else None.
      bn_axis: the axis BN layers synchronise over (shard_map / pmap), else
        None.
      bn_groups: pmap ``axis_index_groups`` of BN, or None.
      average_axis: the axis along which BN groups' running statistics
        differ (averaged after every step), or None.
    """

    def __init__(self, style, mesh, arm_shards, data_shards, group=0):
        self.style = style
        self.mesh = mesh
        self.arm_shards = arm_shards
        self.data_shards = data_shards
        grouped = bool(group) and group < data_shards
        self.bn_groups = None
        self.average_axis = None
        if style == "auto":
            self.grad_axis = self.bn_axis = None
        elif style == "shard_map":
            self.grad_axis = (REPLICA, DATA) if grouped else DATA
            self.bn_axis = DATA
            self.average_axis = REPLICA if grouped else None
        else:  # pmap
            self.grad_axis = self.bn_axis = DATA
            if grouped:
                self.bn_groups = [
                    list(range(i, i + group)) for i in range(0, data_shards, group)
                ]
                self.average_axis = DATA
        self._data_axes = (REPLICA, DATA) if style == "shard_map" and grouped else DATA

    def __repr__(self) -> str:
        return (
            f"ArmsLayout(style={self.style!r}, arms={self.arm_shards}, "
            f"data={self.data_shards}, devices={self.devices})"
        )

    @property
    def devices(self) -> int:
        return self.arm_shards * self.data_shards

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _put(self, tree: Any, spec: P) -> Any:
        sharding = self._sharding(spec)
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)

        def one(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

        return jax.tree.map(one, tree)

    def put_arms(self, tree: Any) -> Any:
        """An arm-stacked tree (leading axis = arms), split over ``arms``."""
        if self.style == "pmap":
            return self._pmap_copies(tree)
        return self._put(tree, P(ARMS))

    def put_replicated(self, tree: Any) -> Any:
        """A tree every device holds whole (e.g. the training set)."""
        if self.style == "pmap":
            return self._pmap_copies(tree)
        return self._put(tree, P())

    def put_eval(self, tree: Any) -> Any:
        """Evaluation data: whole on every device (pmap: on the first, where
        :meth:`eval_view` leaves the state)."""
        if self.style == "pmap":
            return jax.device_put(tree, self.mesh.devices.reshape(-1)[0])
        return self._put(tree, P())

    def put_chunk(self, tree: Any) -> Any:
        """Per-step, per-arm batch leaves ``(steps, arms, batch, ...)``."""
        if self.style == "pmap":
            d = self.data_shards

            def split(a):
                a = np.asarray(a)
                k, arms, b = a.shape[:3]
                a = a.reshape(k, arms, d, b // d, *a.shape[3:])
                return np.moveaxis(a, 2, 0)

            return self._put(jax.tree.map(split, tree), P(DATA))
        return self._put(tree, P(None, ARMS, self._data_axes))

    def _pmap_copies(self, tree: Any) -> Any:
        """A leading device axis of identical copies, one per device."""
        d = self.data_shards
        return self._put(
            jax.tree.map(
                lambda a: np.broadcast_to(np.asarray(a), (d, *np.shape(a))), tree
            ),
            P(DATA),
        )

    def compile(
        self,
        fn: Callable[..., Any],
        n_arms: int,
        n_replicated: int,
        donate: bool = True,
    ) -> Callable:
        """``fn(*arm_args, *replicated_args, *chunk_args) -> arm outputs``
        compiled for the style: the first ``n_arms`` arguments are arm-stacked
        (placed with :meth:`put_arms`), the next ``n_replicated`` whole on
        every device, the rest per-step batch leaves (:meth:`put_chunk`);
        every output is arm-stacked. The first argument is donated."""
        donate_argnums = (0,) if donate else ()
        if self.style == "pmap":
            return jax.pmap(fn, axis_name=DATA, donate_argnums=donate_argnums)

        def specs(n_total):
            return tuple(
                P(ARMS)
                if i < n_arms
                else P()
                if i < n_arms + n_replicated
                else P(None, ARMS, self._data_axes)
                for i in range(n_total)
            )

        if self.style == "auto":
            return _PerArity(
                lambda n: jax.jit(
                    fn,
                    in_shardings=tuple(self._sharding(s) for s in specs(n)),
                    out_shardings=self._sharding(P(ARMS)),
                    donate_argnums=donate_argnums,
                )
            )

        def sharded(*args):
            return jax.shard_map(
                fn, mesh=self.mesh, in_specs=specs(len(args)), out_specs=P(ARMS)
            )(*args)

        return jax.jit(sharded, donate_argnums=donate_argnums)

    def compile_eval(self, fn: Callable[..., Any], n_arms: int) -> Callable:
        """``fn(*arm_args, *replicated_args) -> outputs`` (arm-stacked in,
        outputs replicated on every device, so every process can read them)."""
        if self.style == "pmap":
            return jax.jit(fn)
        return _PerArity(
            lambda n: jax.jit(
                fn,
                in_shardings=tuple(
                    self._sharding(P(ARMS) if i < n_arms else P()) for i in range(n)
                ),
                out_shardings=self._sharding(P()),
            )
        )

    def eval_view(self, tree: Any) -> Any:
        """The arm-stacked state as the evaluation functions take it (pmap:
        device 0's copy, checked equal to the others only when saved)."""
        if self.style == "pmap":
            return jax.tree.map(lambda a: a.addressable_shards[0].data[0], tree)
        return tree

    def host(self, tree: Any) -> Any:
        """Whole numpy copies of arm-stacked (or replicated) device arrays."""
        if self.style == "pmap":
            return jax.tree.map(np.asarray, unreplicate(jax.device_get(tree)))
        if jax.process_count() == 1:
            return jax.tree.map(np.asarray, jax.device_get(tree))
        from jax.experimental import multihost_utils

        return jax.tree.map(
            lambda a: np.asarray(
                a.addressable_data(0)
                if a.is_fully_replicated
                else multihost_utils.process_allgather(a, tiled=True)
            ),
            tree,
        )


class _PerArity:
    """One jitted function per number of arguments (shardings are per
    argument), built on first use and reused, so nothing recompiles."""

    def __init__(self, build: Callable[[int], Callable]):
        self._build = build
        self._fns: dict[int, Callable] = {}

    def __call__(self, *args):
        n = len(args)
        if n not in self._fns:
            self._fns[n] = self._build(n)
        return self._fns[n](*args)

    def lower(self, *args):
        n = len(args)
        if n not in self._fns:
            self._fns[n] = self._build(n)
        return self._fns[n].lower(*args)


def arms_layout(
    n_arms: int,
    batch_size: int,
    *,
    style: str = "auto",
    mesh: Mesh | None = None,
    devices: Sequence[Any] | None = None,
    bn_group_size: int = 0,
) -> ArmsLayout:
    """The device layout :func:`bnlab.train.fit` uses for ``n_arms`` arms.

    The rule (without an explicit ``mesh``): arms are spread first, over
    ``gcd(n_arms, devices)`` devices; each arm's batch is then split over
    ``gcd(batch_size, devices // arm_shards)`` devices (data parallel with
    the statistics of the arm's whole batch). So 1 arm on 8 devices is pure
    data parallelism, 16 arms on 8 devices put 2 arms on each device, and 6
    arms on 8 devices use 2 x 4. Devices left over (e.g. 3 arms of batch 100
    on 8 devices: gcd gives 1 x 4) stay idle; pass ``mesh`` to choose.

    Args:
      n_arms: number of arms.
      batch_size: examples per step and arm.
      style: ``"auto"``, ``"shard_map"`` or ``"pmap"`` (see
        :class:`ArmsLayout`).
      mesh: an explicit mesh with axes ``("arms", "data")`` (shard_map with BN
        groups: ``("arms", "replica", "data")``).
      devices: the devices to use (default: all devices of all processes;
        pmap: this process's).
      bn_group_size: shard_map / pmap only: devices per BN statistics group.

    Raises:
      ValueError: the arms or the batch do not divide over the mesh, the
        style is unknown, or the BN groups do not divide the data devices.

    Example:
      >>> import jax
      >>> layout = arms_layout(4, 128, devices=jax.devices()[:1])
      >>> layout.arm_shards, layout.data_shards
      (1, 1)
    """
    import math

    if style not in LAYOUT_STYLES:
        raise ValueError(f"parallel style {style!r} is not one of {LAYOUT_STYLES}.")
    group = int(bn_group_size or 0)
    if group and style == "auto":
        raise ValueError(
            f"bn_group_size={group} needs style 'shard_map' or 'pmap' (BN groups "
            "are explicit device groups); 'auto' normalizes over each arm's batch."
        )
    if style == "pmap":
        if mesh is not None:
            raise ValueError("pmap runs on a list of devices, not a mesh.")
        if jax.process_count() > 1:
            raise ValueError(
                "pmap checkpoints process-local copies; for several processes use "
                "the 'auto' or 'shard_map' style."
            )
        devs = list(devices) if devices is not None else jax.local_devices()
        d = len(devs)
        if batch_size % d:
            raise ValueError(
                f"batch_size={batch_size} does not divide over the {d} devices of "
                f"pmap; use a multiple of {d}."
            )
        _check_group(group, d)
        return ArmsLayout("pmap", Mesh(np.asarray(devs), (DATA,)), 1, d, group)
    if mesh is None:
        devs = list(devices) if devices is not None else jax.devices()
        a = math.gcd(n_arms, len(devs))
        d = math.gcd(batch_size, len(devs) // a)
        if jax.process_count() > 1 and a * d != len(jax.devices()):
            raise ValueError(
                f"{n_arms} arms of batch {batch_size} use {a * d} of the "
                f"{len(jax.devices())} devices of {jax.process_count()} processes; "
                "with several processes every device must take part: choose arms "
                "and a batch size that divide over them, or pass a mesh."
            )
        if style == "shard_map" and group and group < d:
            _check_group(group, d)
            mesh = jax.make_mesh(
                (a, d // group, group),
                (ARMS, REPLICA, DATA),
                axis_types=(AxisType.Auto,) * 3,
                devices=devs[: a * d],
            )
        else:
            _check_group(group, d)
            mesh = jax.make_mesh(
                (a, d),
                (ARMS, DATA),
                axis_types=(AxisType.Auto,) * 2,
                devices=devs[: a * d],
            )
    names = tuple(mesh.axis_names)
    if names not in ((ARMS, DATA), (ARMS, REPLICA, DATA)):
        raise ValueError(
            f"the mesh has axes {names}; use ('arms', 'data') (or, for BN groups "
            "under shard_map, ('arms', 'replica', 'data'))."
        )
    if REPLICA in names and style != "shard_map":
        raise ValueError(
            "a mesh with a 'replica' axis (BN groups) needs style 'shard_map'."
        )
    a = mesh.shape[ARMS]
    d = mesh.devices.size // a
    if n_arms % a:
        raise ValueError(
            f"{n_arms} arms do not divide over the mesh's {a} 'arms' devices; use a "
            f"number of arms that is a multiple of {a}, or another mesh."
        )
    if batch_size % d:
        raise ValueError(
            f"batch_size={batch_size} does not divide over the mesh's {d} data "
            f"devices per arm; use a multiple of {d}."
        )
    g = mesh.shape[DATA] if REPLICA in names else group
    return ArmsLayout(style, mesh, a, d, g)


def _check_group(group: int, d: int) -> None:
    if group and (group > d or d % group):
        raise ValueError(
            f"bn_group_size={group} does not divide the {d} devices each arm's batch "
            f"is split over; use a divisor of {d}."
        )
