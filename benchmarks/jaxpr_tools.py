"""What a traced computation contains: collectives and primitives in a jaxpr.

Analysis for the benchmarks and tests (how many cross-device collectives one
BN layer costs, whether a train step has a branch); the collectives
themselves are :mod:`bnlab.collectives`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["COLLECTIVE_PRIMITIVES", "count_collectives", "primitive_names"]

COLLECTIVE_PRIMITIVES = frozenset(
    {
        "psum",
        "psum_invariant",
        "pmax",
        "pmin",
        "all_gather",
        "all_gather_invariant",
        "all_to_all",
        "ppermute",
        "psum_scatter",
        "reduce_scatter",
    }
)


def _sub_jaxprs(eqn: Any) -> Iterator[Any]:
    """The jaxprs nested in one equation's parameters (pjit, pmap, shard_map,
    custom_jvp, cond branches, scan bodies, ...)."""
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                yield sub
            elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                yield sub.jaxpr


def _walk(jaxpr: Any, visit: Callable[[Any, bool], None], in_cond: bool) -> None:
    for eqn in jaxpr.eqns:
        visit(eqn, in_cond)
        inner = in_cond or eqn.primitive.name == "cond"
        for sub in _sub_jaxprs(eqn):
            _walk(sub, visit, inner)


def count_collectives(jaxpr: Any) -> dict[str, int]:
    """Counts cross-device collectives in a (closed) jaxpr, by where they run.

    Returns ``{"always": a, "conditional": c}``: collectives executed on every
    call, and those inside a ``cond`` branch (executed only when it is taken;
    bnlab's own train step has none).
    ``pvary`` / ``pbroadcast`` move no data and are not counted; under
    ``vmap`` JAX turns collectives into local array ops before the jaxpr.

    Example:
      >>> import jax, jax.numpy as jnp, bnlab
      >>> f = jax.pmap(lambda x: bnlab.batch_norm(
      ...     x, bnlab.init_batch_stats(3), train=True, axis_name="d")[0],
      ...     axis_name="d")
      >>> count_collectives(jax.make_jaxpr(f)(jnp.ones((1, 4, 3))))
      {'always': 1, 'conditional': 0}
    """
    counts = {"always": 0, "conditional": 0}

    def visit(eqn: Any, in_cond: bool) -> None:
        if eqn.primitive.name in COLLECTIVE_PRIMITIVES:
            counts["conditional" if in_cond else "always"] += 1

    _walk(getattr(jaxpr, "jaxpr", jaxpr), visit, False)
    return counts


def primitive_names(jaxpr: Any) -> set[str]:
    """Names of every primitive in a (closed) jaxpr, nested jaxprs included.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> sorted(primitive_names(jax.make_jaxpr(jax.jit(jnp.sin))(1.0)))
      ['jit', 'sin']
    """
    names: set[str] = set()
    _walk(
        getattr(jaxpr, "jaxpr", jaxpr),
        lambda eqn, _: names.add(eqn.primitive.name),
        False,
    )
    return names
