"""PreciseBN: population statistics of every BN layer, with weights frozen.

Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm" (arXiv:2105.07576):
running averages are a biased, lagging estimate of the statistics a trained
network sees; recomputing them over many batches with the weights frozen
fixes inference. Here the aggregate is exact: each batch contributes its
exact moments (count, mean, sum of squared deviations) and batches merge
with Chan's formula, so the result is the count-weighted mean and the
variance *including the spread of the batch means*, i.e. the statistics of
all the values each BN layer saw, as if concatenated.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from bnlab.linen import MOMENTS_COLLECTION
from bnlab.parallel import unreplicate
from bnlab.stats import Moments, merge_moments

__all__ = ["precise_stats"]


def precise_stats(
    apply_fn: Callable[..., tuple[Any, dict]],
    variables: dict[str, Any],
    batches: Iterable[Any],
    *,
    device_axis: bool = False,
) -> dict[str, Any]:
    """Population ``batch_stats`` of a Flax Linen model built with bnlab BN.

    Runs the model in training mode (each BN layer normalizes with its batch
    statistics, as during training) over ``batches`` with the weights frozen,
    and merges every BN layer's exact batch moments across the batches. Under
    ``axis_name`` each batch's moments are already global (all devices and
    hosts), so the result is the population statistics of the global data.

    Args:
      apply_fn: ``apply_fn(variables, batch, mutable) -> (outputs, updates)``
        running the model in training mode, e.g. ``lambda v, x, mutable:
        model.apply(v, x, train=True, mutable=mutable)``; may be jitted,
        pmapped or shard_mapped (then it must return replicated moments).
      variables: the model's variables (``params``, ``batch_stats``, ...).
      batches: an iterable of inputs, each as ``apply_fn`` takes it.
      device_axis: the moments come back with a leading device axis (a
        pmapped ``apply_fn``); copy 0 is used after checking all agree.

    Returns:
      A ``batch_stats`` tree like ``variables["batch_stats"]`` holding the
      population mean and (biased) variance, in the stored dtypes.

    Raises:
      ValueError: no batches, or a BN layer of ``batch_stats`` reported no
        moments (it is not a bnlab layer, or was not run in training mode).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, bnlab
      >>> model = bnlab.linen.BatchNorm(use_running_average=False)
      >>> xs = [jnp.arange(6.0).reshape(3, 2) + 10 * i for i in range(4)]
      >>> v = model.init(jax.random.key(0), xs[0])
      >>> run = lambda v, x, mutable: model.apply(v, x, mutable=mutable)
      >>> stats = bnlab.precise_stats(run, v, xs)
      >>> all_x = jnp.concatenate(xs)
      >>> bool(jnp.allclose(stats["mean"], all_x.mean(0)))
      True
      >>> bool(jnp.allclose(stats["var"], all_x.var(0)))
      True
    """
    collect = _collector(apply_fn)
    frozen = {k: v for k, v in variables.items() if k != MOMENTS_COLLECTION}
    total = None
    for batch in batches:
        moments = collect(frozen, batch)
        if device_axis:
            moments = _device_zero(moments)
        total = moments if total is None else _merge(total, moments)
    if total is None:
        raise ValueError("precise_stats: `batches` yielded no batch.")
    return _to_batch_stats(variables["batch_stats"], total, ())


# owner -> {function: jitted moment collector}, the owner held weakly: a
# collector lives exactly as long as the caller's ``apply_fn`` (repeated calls,
# e.g. one per checkpoint, reuse its compilation) and keeps nothing alive.
# Neither an LRU of jitted closures nor ``jax.jit`` with ``apply_fn`` static:
# both hold the function (and all it closes over: model, arrays) strongly.
_COLLECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _collector(apply_fn: Callable) -> Callable:
    """The jitted moment collector of ``apply_fn`` (see ``_COLLECTORS``)."""
    # A bound method (e.g. ``model.apply``) is a new object at each access:
    # key it by its owner and its function, not by itself.
    if inspect.ismethod(apply_fn):
        owner, func = apply_fn.__self__, apply_fn.__func__
    else:
        owner, func = apply_fn, None
    try:
        owner_ref = weakref.ref(owner)
        per_owner = _COLLECTORS.setdefault(owner, {})
    except TypeError:  # not weakly referenceable: compiled for this call only
        return jax.jit(functools.partial(_moments, apply_fn))
    if func not in per_owner:

        def collect(variables: dict[str, Any], batch: Any) -> Any:
            target = owner_ref()
            return _moments(
                target if func is None else func.__get__(target), variables, batch
            )

        per_owner[func] = jax.jit(collect)
    return per_owner[func]


def _moments(apply_fn: Callable, variables: dict[str, Any], batch: Any) -> Any:
    updates = apply_fn(variables, batch, mutable=[MOMENTS_COLLECTION, "batch_stats"])[1]
    return updates.get(MOMENTS_COLLECTION, {})


def _is_moments(x: Any) -> bool:
    return isinstance(x, Moments)


def _merge(a: Any, b: Any) -> Any:
    def two(x: Moments, y: Moments) -> Moments:
        stacked = Moments(*(jnp.stack([p, q]) for p, q in zip(x, y, strict=True)))
        return Moments(*(part[0] for part in merge_moments(stacked, axis=0)))

    return jax.tree.map(two, a, b, is_leaf=_is_moments)


def _device_zero(tree: Any) -> Any:
    """Device 0's moments of a pmapped collector, after checking that every
    device's copy agrees (``unreplicate``)."""
    try:
        first = unreplicate(jax.device_get(tree))
    except ValueError:
        raise ValueError(
            "precise_stats: the devices' moments differ; give the model's "
            "BN an axis_name so that statistics are synchronised."
        ) from None
    return jax.tree.map(jnp.asarray, first)


def _to_batch_stats(stats: Any, moments: Any, path: tuple) -> Any:
    if isinstance(stats, dict) and set(stats) == {"mean", "var"}:
        found = moments.get("moments") if isinstance(moments, dict) else None
        if not _is_moments(found):
            raise ValueError(
                f"precise_stats: BN layer {'/'.join(path) or '<root>'} reported no "
                "batch moments: use bnlab.linen.BatchNorm and run apply_fn in "
                "training mode."
            )
        return {
            "mean": found.mean.astype(jnp.asarray(stats["mean"]).dtype),
            "var": found.var.astype(jnp.asarray(stats["var"]).dtype),
        }
    return {
        k: _to_batch_stats(
            v, moments.get(k, {}) if isinstance(moments, dict) else {}, (*path, k)
        )
        for k, v in stats.items()
    }
