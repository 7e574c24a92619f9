"""A user's model as two pure functions: ``init(key, x)`` and ``apply``.

:func:`bnlab.train.fit` trains any Flax model through this one interface:

- a ``flax.linen.Module`` called as ``model.apply(variables, x, train=bool)``
  (BN anywhere: bnlab's or Flax's; every collection but ``params``, e.g.
  ``batch_stats``, is updated in training);
- a Flax NNX model, given as a function ``rngs -> nnx.Module`` so that every
  seed gets its own initialization (``lambda rngs: Net(..., rngs=rngs)``);
  training and evaluation switch it with ``model.train()`` / ``model.eval()``,
  and its ``nnx.BatchStat`` / RNG states are the mutable collections.

Variables are plain nested dicts of arrays with string keys, so that they
vmap over arms and save with orbax under their own names (``params``,
``batch_stats``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ModelFns", "model_fns", "nnx_update"]

# Collections that are never state: Flax's ``sow`` output.
_NOT_STATE = ("intermediates",)


class ModelFns(NamedTuple):
    """A model as pure functions.

    Attributes:
      init: ``init(key, x) -> variables`` (``x``: a small example batch).
      apply: ``apply(variables, x, train, rngs, kwargs) -> (outputs,
        variables)``; in training the returned variables hold the updated
        mutable collections (e.g. ``batch_stats``), in evaluation they are the
        input variables.
      kind: ``"linen"`` or ``"nnx"``.
      name: the model's class name (for messages and ``config.json``).
      description: the model's fields as text (a Linen module's repr, an NNX
        model's abstract repr, without memory addresses): a resumed run
        checks it, so a changed field (a BN momentum, an activation) is not
        resumed from another model's checkpoints.
    """

    init: Callable[[jax.Array, jax.Array], dict]
    apply: Callable[..., tuple[Any, dict]]
    kind: str
    name: str
    description: str


def _describe(obj: Any) -> str:
    """``repr(obj)`` without memory addresses (which change every run)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def model_fns(model: Any) -> ModelFns:
    """The pure functions of a Linen module or an NNX model factory.

    Raises:
      TypeError: ``model`` is neither, e.g. an NNX module *instance* (pass a
        function ``rngs -> module`` so each seed gets its own weights).
    """
    import flax.linen as nn

    if isinstance(model, nn.Module):
        return _linen(model)
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always has nnx here
        nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        raise TypeError(
            f"fit got an NNX module instance ({type(model).__name__}); pass a "
            "function that builds it from its rngs, e.g. `lambda rngs: "
            f"{type(model).__name__}(..., rngs=rngs)`, so that every seed gets its "
            "own initialization."
        )
    if callable(model):
        return _nnx(model)
    raise TypeError(
        f"model must be a flax.linen.Module or a function rngs -> flax.nnx.Module, "
        f"got {type(model).__name__}."
    )


# ------------------------------------------------------------------ Linen


def _linen(model) -> ModelFns:
    def init(key: jax.Array, x: jax.Array) -> dict:
        params_key, other = jax.random.split(key)
        variables = model.init({"params": params_key, "dropout": other}, x, train=False)
        return {k: v for k, v in variables.items() if k not in _NOT_STATE}

    def apply(variables, x, train: bool, rngs=None, kwargs=None):
        kwargs = kwargs or {}
        if not train:
            return model.apply(variables, x, train=False), variables
        mutable = [k for k in variables if k != "params"]
        if not mutable:
            out = model.apply(variables, x, train=True, rngs=rngs, **kwargs)
            return out, variables
        out, updates = model.apply(
            variables, x, train=True, mutable=mutable, rngs=rngs, **kwargs
        )
        return out, {**variables, **updates}

    return ModelFns(init, apply, "linen", type(model).__name__, _describe(model))


# -------------------------------------------------------------------- NNX


def _nnx(factory: Callable[[Any], Any]) -> ModelFns:
    from flax import nnx

    def build(rngs):
        m = factory(rngs)
        if not isinstance(m, nnx.Module):
            raise TypeError(
                f"the model function returned {type(m).__name__}, not an "
                "nnx.Module; pass `lambda rngs: Net(..., rngs=rngs)`."
            )
        return m

    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    graphdef, *abstract_groups = nnx.split(abstract, *_group_filters())
    names = _GROUP_NAMES
    # The key types of each group's pure dict (NNX uses int keys for lists);
    # variables are stored with string keys and mapped back here.
    templates = [nnx.to_pure_dict(g) for g in abstract_groups]

    def init(key: jax.Array, x: jax.Array) -> dict:
        del x  # NNX modules know their input shapes
        m = build(nnx.Rngs(key))
        _, *groups = nnx.split(m, *_group_filters())
        out = {}
        for name, group in zip(names, groups, strict=True):
            pure = nnx.to_pure_dict(group)
            if jax.tree.leaves(pure):
                out[name] = _keys_to_raw(_str_keys(pure))
        return out

    def merged(variables):
        groups = []
        for name, abstract_group, template in zip(
            names, abstract_groups, templates, strict=True
        ):
            group = jax.tree.map(lambda a: a, abstract_group)
            if name in variables:
                pure = _raw_to_keys(_restore_keys(variables[name], template), template)
                nnx.replace_by_pure_dict(group, pure)
            groups.append(group)
        return nnx.merge(graphdef, *groups)

    def apply(variables, x, train: bool, rngs=None, kwargs=None):
        del rngs  # NNX modules carry their own RNG streams (saved as state)
        m = merged(variables)
        if train:
            m.train()
        else:
            m.eval()
        out = m(x, **(kwargs or {}))
        if not train:
            return out, variables
        _, *groups = nnx.split(m, *_group_filters())
        new = dict(variables)
        for name, group in zip(names, groups, strict=True):
            if name != "params" and name in variables:
                new[name] = _keys_to_raw(_str_keys(nnx.to_pure_dict(group)))
        return out, new

    return ModelFns(init, apply, "nnx", type(abstract).__name__, _describe(abstract))


_GROUP_NAMES = ("params", "batch_stats", "rngs", "state")


def _group_filters():
    from flax import nnx

    return (nnx.Param, nnx.BatchStat, nnx.RngState, ...)


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _restore_keys(tree: Any, template: Any) -> Any:
    if isinstance(template, dict):
        by_str = {str(k): k for k in template}
        return {
            by_str[k]: _restore_keys(v, template[by_str[k]]) for k, v in tree.items()
        }
    return tree


def _is_key(a: Any) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def _keys_to_raw(tree: Any) -> Any:
    """Typed PRNG keys as their raw uint32 data (saved like any array)."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _raw_to_keys(tree: Any, template: Any) -> Any:
    """Raw key data back to typed keys (of the template's implementation),
    other leaves as arrays of the template's dtype."""

    def leaf(a, t):
        if _is_key(t):
            # a concrete key names its implementation; an abstract one
            # (eval_shape of the model) has the default one
            impl = jax.random.key_impl(t) if isinstance(t, jax.Array) else None
            return jax.random.wrap_key_data(jnp.asarray(a, jnp.uint32), impl=impl)
        return jnp.asarray(a, t.dtype)

    # the template's leaves decide (a value may be a list, e.g. [1.0, 2.0])
    return jax.tree.map(lambda t, a: leaf(a, t), template, tree)


def nnx_update(module: Any, variables: dict) -> Any:
    """Loads one arm's variables (``FitResult.arm(i)``, ``load(...).arm(i)``)
    into an NNX module in place, and returns it.

    Example:
      >>> from flax import nnx
      >>> import bnlab.nnx
      >>> bn = bnlab.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
      >>> _ = nnx_update(bn, {"batch_stats": {"mean": [1.0, 2.0], "var": [1.0, 1.0]}})
      >>> bn.mean[...].tolist()
      [1.0, 2.0]
    """
    from flax import nnx

    for name, group_filter in zip(_GROUP_NAMES, _group_filters(), strict=True):
        if name not in variables:
            continue
        state = nnx.state(module, group_filter)
        template = nnx.to_pure_dict(state)
        pure = _restore_keys(variables[name], template)
        nnx.replace_by_pure_dict(state, _raw_to_keys(pure, template))
        nnx.update(module, state)
    return module
