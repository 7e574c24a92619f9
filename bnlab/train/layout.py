"""Where :func:`bnlab.train.fit`'s arms and their batches live: one mesh of
``arms x data``, one class per parallel style.

Arms (models of one program, stacked on a leading axis) are spread over the
mesh axis ``"arms"``; each arm's batch is split over ``"data"`` (data
parallel within an arm). :func:`arms_layout` chooses the mesh; the layout
places arrays and compiles the arm functions for its style:

- :class:`JitLayout` (``"jit"``): one ``jax.jit`` program on the mesh; XLA
  inserts the reductions, so BN layers (bnlab's or Flax's, no
  ``axis_name``) see the statistics of the arm's whole batch.
- :class:`ShardMapLayout` (``"shard_map"``): the step runs per device; BN
  layers synchronise over ``axis_name="data"`` (:data:`DATA`), gradients
  follow the shard_map rule. With BN groups the mesh is ``arms x replica x
  data`` and BN syncs within ``data`` (the group).
- :class:`PmapLayout` (``"pmap"``): this process's devices with a leading
  device axis; every device holds every arm and a slice of each batch; BN
  syncs over ``"data"`` (optionally in ``axis_index_groups``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnlab.parallel import canonical_style, unreplicate

__all__ = [
    "ARMS",
    "DATA",
    "REPLICA",
    "ArmsLayout",
    "JitLayout",
    "PmapLayout",
    "ShardMapLayout",
    "arms_layout",
]

ARMS, REPLICA, DATA = "arms", "replica", "data"


class ArmsLayout:
    """What every style shares: the mesh, the shards, placement by
    ``NamedSharding`` (also across processes) and host copies.

    Attributes:
      style: ``"jit"``, ``"shard_map"`` or ``"pmap"``.
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

    style = ""
    grad_axis: Any = None
    bn_axis: Any = None
    bn_groups: list[list[int]] | None = None
    average_axis: Any = None

    def __init__(self, mesh: Mesh, arm_shards: int, data_shards: int):
        self.mesh = mesh
        self.arm_shards = arm_shards
        self.data_shards = data_shards
        self.data_axes: Any = DATA  # the mesh axes each arm's batch splits over

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(arms={self.arm_shards}, data={self.data_shards}, "
            f"devices={self.devices})"
        )

    @property
    def devices(self) -> int:
        return self.arm_shards * self.data_shards

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _put(self, tree: Any, spec: P) -> Any:
        sharding = self.sharding(spec)
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)

        def one(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

        return jax.tree.map(one, tree)

    def put_arms(self, tree: Any) -> Any:
        """An arm-stacked tree (leading axis = arms), split over ``arms``."""
        return self._put(tree, P(ARMS))

    def put_replicated(self, tree: Any) -> Any:
        """A tree every device holds whole (e.g. the training set)."""
        return self._put(tree, P())

    def put_eval(self, tree: Any) -> Any:
        """Evaluation data, whole where the evaluation runs."""
        return self._put(tree, P())

    def put_chunk(self, tree: Any) -> Any:
        """Per-step, per-arm batch leaves ``(steps, arms, batch, ...)``."""
        return self._put(tree, P(None, ARMS, self.data_axes))

    def _specs(self, n_total: int, n_arms: int, n_replicated: int) -> tuple:
        return tuple(
            P(ARMS)
            if i < n_arms
            else P()
            if i < n_arms + n_replicated
            else P(None, ARMS, self.data_axes)
            for i in range(n_total)
        )

    def compile(
        self, fn: Callable[..., Any], n_arms: int, n_replicated: int, donate=True
    ) -> Callable:
        """``fn(*arm_args, *replicated_args, *chunk_args) -> arm outputs``
        compiled for the style: the first ``n_arms`` arguments are arm-stacked
        (placed with :meth:`put_arms`), the next ``n_replicated`` whole on
        every device, the rest per-step batch leaves (:meth:`put_chunk`);
        every output is arm-stacked. The first argument is donated."""
        raise NotImplementedError

    def compile_eval(self, fn: Callable[..., Any], n_arms: int) -> Callable:
        """``fn(*arm_args, *replicated_args) -> outputs`` (arm-stacked in,
        outputs replicated on every device, so every process can read them)."""
        return _PerArity(
            lambda n: jax.jit(
                fn,
                in_shardings=tuple(
                    self.sharding(P(ARMS) if i < n_arms else P()) for i in range(n)
                ),
                out_shardings=self.sharding(P()),
            )
        )

    def eval_view(self, tree: Any) -> Any:
        """The arm-stacked state as the evaluation functions take it."""
        return tree

    def host(self, tree: Any) -> Any:
        """Whole numpy copies of arm-stacked (or replicated) device arrays."""
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


class JitLayout(ArmsLayout):
    """``"jit"``: one program on the mesh, XLA places the reductions."""

    style = "jit"

    def compile(self, fn, n_arms, n_replicated, donate=True):
        donate_argnums = (0,) if donate else ()
        return _PerArity(
            lambda n: jax.jit(
                fn,
                in_shardings=tuple(
                    self.sharding(s) for s in self._specs(n, n_arms, n_replicated)
                ),
                out_shardings=self.sharding(P(ARMS)),
                donate_argnums=donate_argnums,
            )
        )


class ShardMapLayout(ArmsLayout):
    """``"shard_map"``: per-device steps with explicit collectives over
    ``data`` (and, with BN groups, gradients over ``replica`` too)."""

    style = "shard_map"

    def __init__(self, mesh, arm_shards, data_shards, group=0):
        super().__init__(mesh, arm_shards, data_shards)
        grouped = bool(group) and group < data_shards
        self.bn_axis = DATA
        self.grad_axis = (REPLICA, DATA) if grouped else DATA
        self.average_axis = REPLICA if grouped else None
        self.data_axes = (REPLICA, DATA) if grouped else DATA

    def compile(self, fn, n_arms, n_replicated, donate=True):
        def sharded(*args):
            specs = self._specs(len(args), n_arms, n_replicated)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P(ARMS))(
                *args
            )

        return jax.jit(sharded, donate_argnums=(0,) if donate else ())


class PmapLayout(ArmsLayout):
    """``"pmap"``: a leading device axis; every device holds every arm and
    a slice of each batch; evaluation runs on the first device."""

    style = "pmap"
    grad_axis = bn_axis = DATA

    def __init__(self, mesh, arm_shards, data_shards, group=0):
        super().__init__(mesh, arm_shards, data_shards)
        if group and group < data_shards:
            self.bn_groups = [
                list(range(i, i + group)) for i in range(0, data_shards, group)
            ]
            self.average_axis = DATA

    def _copies(self, tree: Any) -> Any:
        """A leading device axis of identical copies, one per device."""
        d = self.data_shards
        return self._put(
            jax.tree.map(
                lambda a: np.broadcast_to(np.asarray(a), (d, *np.shape(a))), tree
            ),
            P(DATA),
        )

    def put_arms(self, tree):
        return self._copies(tree)

    def put_replicated(self, tree):
        return self._copies(tree)

    def put_eval(self, tree):
        return jax.device_put(tree, self.mesh.devices.reshape(-1)[0])

    def put_chunk(self, tree):
        d = self.data_shards

        def split(a):
            a = np.asarray(a)
            k, arms, b = a.shape[:3]
            a = a.reshape(k, arms, d, b // d, *a.shape[3:])
            return np.moveaxis(a, 2, 0)

        return self._put(jax.tree.map(split, tree), P(DATA))

    def compile(self, fn, n_arms, n_replicated, donate=True):
        return jax.pmap(fn, axis_name=DATA, donate_argnums=(0,) if donate else ())

    def compile_eval(self, fn, n_arms):
        return jax.jit(fn)

    def eval_view(self, tree):
        """Device 0's copy (checked equal to the others when saved)."""
        return jax.tree.map(lambda a: a.addressable_shards[0].data[0], tree)

    def host(self, tree):
        return jax.tree.map(np.asarray, unreplicate(jax.device_get(tree)))


class _PerArity:
    """One jitted function per number of arguments (shardings are per
    argument), built on first use and reused, so nothing recompiles."""

    def __init__(self, build: Callable[[int], Callable]):
        self._build = build
        self._fns: dict[int, Callable] = {}

    def _fn(self, n: int) -> Callable:
        if n not in self._fns:
            self._fns[n] = self._build(n)
        return self._fns[n]

    def __call__(self, *args):
        return self._fn(len(args))(*args)

    def lower(self, *args):
        return self._fn(len(args)).lower(*args)


def arms_layout(
    n_arms: int,
    batch_size: int,
    *,
    style: str = "jit",
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
      style: ``"jit"``, ``"shard_map"`` or ``"pmap"``
        (:data:`bnlab.parallel.STYLES`).
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
      >>> layout.style, layout.arm_shards, layout.data_shards
      ('jit', 1, 1)
    """
    style = canonical_style(style)
    group = int(bn_group_size or 0)
    if group and style == "jit":
        raise ValueError(
            f"bn_group_size={group} needs style 'shard_map' or 'pmap' (BN groups "
            "are explicit device groups); 'jit' normalizes over each arm's batch."
        )
    if style == "pmap":
        return _pmap_layout(batch_size, mesh, devices, group)
    if mesh is None:
        mesh = _mesh(n_arms, batch_size, devices, group if style == "shard_map" else 0)
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
    if style == "jit":
        return JitLayout(mesh, a, d)
    _check_group(group, d)
    return ShardMapLayout(mesh, a, d, mesh.shape[DATA] if REPLICA in names else group)


def _pmap_layout(batch_size, mesh, devices, group) -> PmapLayout:
    if mesh is not None:
        raise ValueError("pmap runs on a list of devices, not a mesh.")
    if jax.process_count() > 1:
        raise ValueError(
            "pmap checkpoints process-local copies; for several processes use "
            "the 'jit' or 'shard_map' style."
        )
    devs = list(devices) if devices is not None else jax.local_devices()
    d = len(devs)
    if batch_size % d:
        raise ValueError(
            f"batch_size={batch_size} does not divide over the {d} devices of "
            f"pmap; use a multiple of {d}."
        )
    _check_group(group, d)
    return PmapLayout(Mesh(np.asarray(devs), (DATA,)), 1, d, group)


def _mesh(n_arms, batch_size, devices, group) -> Mesh:
    """The rule's mesh: arms first, then each arm's batch."""
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
    _check_group(group, d)
    if group and group < d:
        shape, names = (a, d // group, group), (ARMS, REPLICA, DATA)
    else:
        shape, names = (a, d), (ARMS, DATA)
    return jax.make_mesh(
        shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devs[: a * d]
    )


def _check_group(group: int, d: int) -> None:
    if group and (group > d or d % group):
        raise ValueError(
            f"bn_group_size={group} does not divide the {d} devices each arm's batch "
            f"is split over; use a divisor of {d}."
        )
