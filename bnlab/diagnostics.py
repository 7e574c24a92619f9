"""Diagnostics of what BN does to training: pure functions over a loss or a
model's apply function and its variables.

- :func:`percentiles`: activation percentiles (Ioffe & Szegedy 2015, Fig. 1).
- :func:`layer_grad_norms`: per-layer gradient norms (vanishing gradients).
- :func:`landscape_probe`: loss range, gradient change and effective
  beta-smoothness along the gradient (Santurkar et al. 2018, arXiv:1805.11604).
- :func:`hvp`, :func:`top_hessian_eigenvalue`, :func:`lanczos_eigenvalues`,
  :func:`hessian_eigenvalues`:
  curvature (Ghorbani et al. 2019, arXiv:1901.10159).
- :func:`population_stats`: PreciseBN population statistics
  (:func:`bnlab.precise_stats`).
- :func:`geometric_rate`: the per-layer growth of gradient norms with depth
  (gradient explosion at initialization, Yang et al. 2019, arXiv:1902.08129).
- :func:`radial_cosine`, :func:`equilibrium_ratio`, :func:`exp_lr_factor`:
  scale invariance of weights followed by BN, the equilibrium norm under
  weight decay and the equivalent exponential learning rate (van Laarhoven
  2017, arXiv:1706.05350; Li & Arora 2020, arXiv:1910.07454).

Every function takes ``loss_fn(params) -> scalar`` (close over the batch and
anything else) or an apply function, and returns arrays; nothing is
mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from bnlab.precise import precise_stats

__all__ = [
    "equilibrium_ratio",
    "exp_lr_factor",
    "geometric_rate",
    "hessian_eigenvalues",
    "hvp",
    "lanczos_eigenvalues",
    "landscape_probe",
    "layer_grad_norms",
    "percentiles",
    "population_stats",
    "radial_cosine",
    "top_hessian_eigenvalue",
]

population_stats = precise_stats

LossFn = Callable[[Any], jax.Array]


def percentiles(
    x: jax.Array, q: Sequence[float] = (15.0, 50.0, 85.0), axis: int = 0
) -> jax.Array:
    """Percentiles of ``x`` along ``axis`` (first axis of the result = ``q``).

    Example:
      >>> import jax.numpy as jnp
      >>> percentiles(jnp.arange(101.0), (15, 50, 85)).tolist()
      [15.0, 50.0, 85.0]
    """
    return jnp.percentile(x, jnp.asarray(q, jnp.float32), axis=axis)


def layer_grad_norms(grads: Any) -> dict[str, jax.Array]:
    """L2 norm of each layer's gradient: ``{layer path: norm}``, a layer being
    the dict that holds the leaves (e.g. ``Dense_0`` for kernel and bias).

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"Dense_0": {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.zeros(2)}}
      >>> float(layer_grad_norms(g)["Dense_0"])
      2.0
    """
    out: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        layer = _layer(path)
        out[layer] = out.get(layer, 0.0) + jnp.sum(jnp.square(jnp.abs(leaf)))
    return {k: jnp.sqrt(v) for k, v in out.items()}


def _layer(path) -> str:
    """A leaf's layer: the path of the dict that holds it."""
    return "/".join(str(getattr(k, "key", k)) for k in path[:-1]) or "<root>"


def _tree_dot(a: Any, b: Any) -> jax.Array:
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _tree_norm(a: Any) -> jax.Array:
    return jnp.sqrt(_tree_dot(a, a).real)


def landscape_probe(
    loss_fn: LossFn, params: Any, step_sizes: Sequence[float]
) -> dict[str, jax.Array]:
    """How the loss and gradient change along the gradient direction.

    For each step size ``eta``: ``w' = w - eta * g``; records ``loss(w')``,
    the gradient change ``||g(w') - g(w)||`` and the effective
    beta-smoothness ``||g(w') - g(w)|| / ||w' - w||`` (Santurkar et al. 2018,
    Fig. 4: with BN the loss varies less along the gradient, the gradient is
    more predictive and the landscape smoother).

    Returns:
      ``{"losses": (k,), "loss_range": (), "grad_change": (k,),
      "max_grad_change": (), "beta": ()}`` with ``beta`` the largest ratio.

    Example:
      >>> import jax.numpy as jnp
      >>> quad = lambda w: 0.5 * 3.0 * jnp.sum(w**2)  # Hessian 3 I
      >>> r = landscape_probe(quad, jnp.ones(4), [0.1, 0.2])
      >>> round(float(r["beta"]), 4)
      3.0
    """
    loss_and_grad = jax.value_and_grad(loss_fn)
    _, g = loss_and_grad(params)
    g_norm = _tree_norm(g)

    def at(eta):
        w = jax.tree.map(lambda p, gi: p - eta * gi, params, g)
        loss, g2 = loss_and_grad(w)
        change = _tree_norm(jax.tree.map(jnp.subtract, g2, g))
        return loss, change

    losses, changes = jax.lax.map(at, jnp.asarray(step_sizes, jnp.float32))
    moved = jnp.asarray(step_sizes, jnp.float32) * g_norm
    beta = jnp.max(changes / jnp.maximum(moved, jnp.finfo(jnp.float32).tiny))
    return {
        "losses": losses,
        "loss_range": jnp.max(losses) - jnp.min(losses),
        "grad_change": changes,
        "max_grad_change": jnp.max(changes),
        "beta": beta,
    }


def hvp(loss_fn: LossFn, params: Any, v: Any) -> Any:
    """Hessian-vector product ``H(params) v`` (forward-over-reverse).

    Example:
      >>> import jax.numpy as jnp
      >>> f = lambda w: w[0] ** 2 + 3 * w[0] * w[1]  # H = [[2, 3], [3, 0]]
      >>> hvp(f, jnp.zeros(2), jnp.array([1.0, 0.0])).tolist()
      [2.0, 3.0]
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def top_hessian_eigenvalue(
    loss_fn: LossFn, params: Any, key: jax.Array, iters: int = 100
) -> jax.Array:
    """Largest-magnitude Hessian eigenvalue by power iteration on HVPs.

    ``iters`` Hessian-vector products from a random start; the Rayleigh
    quotient of the last iterate is returned (the sign is kept, so a
    dominant negative eigenvalue shows as negative). Converges at rate
    ``|lambda_2 / lambda_1|``: use :func:`hessian_eigenvalues` when two
    eigenvalues are close.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> h = jnp.diag(jnp.array([5.0, 2.0, -1.0]))
      >>> f = lambda w: 0.5 * w @ h @ w
      >>> round(float(top_hessian_eigenvalue(f, jnp.ones(3), jax.random.key(0))), 4)
      5.0
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(p), jnp.result_type(p))
            for k, p in zip(keys, leaves, strict=True)
        ],
    )

    def normalize(v):
        n = _tree_norm(v)
        return jax.tree.map(lambda x: x / n, v)

    def body(_, v):
        return normalize(hvp(loss_fn, params, v))

    v = jax.lax.fori_loop(0, iters, body, normalize(v))
    return _tree_dot(v, hvp(loss_fn, params, v)).real


def lanczos_eigenvalues(
    loss_fn: LossFn, params: Any, key: jax.Array, iters: int = 40
) -> jax.Array:
    """Ritz values of the Hessian from ``iters`` Lanczos steps (ascending).

    Lanczos on Hessian-vector products with full reorthogonalization (the
    Krylov basis is kept, ``iters`` vectors of the parameters' size): the
    extreme Ritz values converge first, so the top few values estimate the
    outlier eigenvalues and the rest trace the bulk (Ghorbani et al. 2019,
    arXiv:1901.10159, use the same iteration). Jit-compatible.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> h = jnp.diag(jnp.array([9.0, 4.0, 1.0, 0.5]))
      >>> f = lambda w: 0.5 * w @ h @ w
      >>> ev = lanczos_eigenvalues(f, jnp.ones(4), jax.random.key(0), iters=4)
      >>> [round(float(e), 4) for e in ev]
      [0.5, 1.0, 4.0, 9.0]
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    n = flat.shape[0]
    dtype = flat.dtype

    def matvec(v):
        return jax.flatten_util.ravel_pytree(hvp(loss_fn, params, unravel(v)))[0]

    v0 = jax.random.normal(key, (n,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((iters, n), dtype).at[0].set(v0)
    alphas = jnp.zeros((iters,), dtype)
    betas = jnp.zeros((iters,), dtype)

    def body(i, carry):
        basis, alphas, betas = carry
        v = basis[i]
        w = matvec(v)
        alpha = jnp.vdot(w, v)
        # full reorthogonalization against every vector so far (twice)
        mask = (jnp.arange(iters) <= i).astype(dtype)[:, None]
        for _ in range(2):
            w = w - (basis * mask).T @ ((basis * mask) @ w)
        beta = jnp.linalg.norm(w)
        nxt = w / jnp.where(beta > 0, beta, jnp.ones((), dtype))
        basis = jnp.where(
            i + 1 < iters, basis.at[jnp.minimum(i + 1, iters - 1)].set(nxt), basis
        )
        return basis, alphas.at[i].set(alpha), betas.at[i].set(beta)

    _, alphas, betas = jax.lax.fori_loop(0, iters, body, (basis, alphas, betas))
    t = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return jnp.linalg.eigvalsh(t)


def hessian_eigenvalues(loss_fn: LossFn, params: Any) -> np.ndarray:
    """All Hessian eigenvalues (ascending) from the dense Hessian: small
    problems only (e.g. the lecture's 2-weight regression).

    Example:
      >>> import jax.numpy as jnp
      >>> f = lambda w: 0.5 * (w[0] ** 2 + 1e4 * w[1] ** 2)
      >>> hessian_eigenvalues(f, jnp.zeros(2)).tolist()
      [1.0, 10000.0]
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    h = jax.hessian(lambda f: loss_fn(unravel(f)))(flat)
    return np.linalg.eigvalsh(np.asarray(h, np.float64))


def geometric_rate(values: Any, skip: int = 0) -> jax.Array:
    """Per-step growth factor of a positive sequence: ``exp`` of the
    least-squares slope of ``log(values)`` against the index.

    For per-layer gradient norms at initialization this is the rate of
    gradient explosion with depth (Yang et al. 2019, arXiv:1902.08129,
    predict ``pi / (pi - 1)`` per layer for the squared weight-gradient norms
    of a BN-ReLU MLP). ``skip`` values at each end are left out of the fit
    (boundary layers: the input layer, the readout).

    Args:
      values: positive numbers ``(n,)``, in the order of growth (e.g. from
        the last layer to the first for gradients).
      skip: entries left out at each end; at least two must remain.

    Returns:
      The fitted factor per step, a scalar (1: no trend).

    Raises:
      ValueError: fewer than two values remain after ``skip``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(geometric_rate(3.0 * 1.5 ** jnp.arange(8.0))), 5)
      1.5
    """
    v = jnp.asarray(values)
    if v.ndim != 1 or v.shape[0] - 2 * skip < 2:
        raise ValueError(
            f"geometric_rate needs a 1-D sequence with at least 2 values after "
            f"leaving out skip={skip} at each end; got shape {v.shape}."
        )
    v = v[skip : v.shape[0] - skip]
    y = jnp.log(v.astype(jnp.promote_types(v.dtype, jnp.float32)))
    t = jnp.arange(y.shape[0], dtype=y.dtype)
    t = t - jnp.mean(t)
    slope = jnp.sum(t * (y - jnp.mean(y))) / jnp.sum(t * t)
    return jnp.exp(slope)


def radial_cosine(grads: Any, params: Any) -> dict[str, jax.Array]:
    """Cosine between each layer's gradient and its weights.

    A weight followed by BN is scale invariant (``L(c w) = L(w)`` for
    ``c > 0``), so its gradient is orthogonal to it, ``<dL/dw, w> = 0``, and
    the cosine is 0 up to BN's epsilon and rounding (van Laarhoven 2017,
    arXiv:1706.05350, eq. 8; Hoffer et al. 2018, arXiv:1803.01814). Layers as
    in :func:`layer_grad_norms` (the dict holding the leaves; all its leaves
    together).

    Args:
      grads: gradients, the same tree as ``params``.
      params: the parameters.

    Returns:
      ``{layer path: cosine}``, each in [-1, 1] (0 where either is zero).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = {"Dense_0": {"kernel": jnp.array([3.0, 4.0])}}
      >>> f = lambda p: jnp.sum(p["Dense_0"]["kernel"] / jnp.linalg.norm(
      ...     p["Dense_0"]["kernel"]) * jnp.array([1.0, 2.0]))  # scale invariant
      >>> round(float(radial_cosine(jax.grad(f)(w), w)["Dense_0"]), 6)
      0.0
      >>> g = jax.grad(lambda p: jnp.sum(p["Dense_0"]["kernel"] ** 2))(w)
      >>> round(float(radial_cosine(g, w)["Dense_0"]), 6)  # radial gradient
      1.0
    """
    dots: dict[str, jax.Array] = {}
    gg: dict[str, jax.Array] = {}
    ww: dict[str, jax.Array] = {}
    flat_g = jax.tree_util.tree_leaves_with_path(grads)
    flat_w = jax.tree.leaves(params)
    if len(flat_g) != len(flat_w):
        raise ValueError(
            f"grads and params differ: {len(flat_g)} vs {len(flat_w)} leaves; pass "
            "the gradient of the same parameter tree."
        )
    for (path, g), w in zip(flat_g, flat_w, strict=True):
        layer = _layer(path)
        dots[layer] = dots.get(layer, 0.0) + jnp.vdot(g, w).real
        gg[layer] = gg.get(layer, 0.0) + jnp.vdot(g, g).real
        ww[layer] = ww.get(layer, 0.0) + jnp.vdot(w, w).real
    out = {}
    for k, d in dots.items():
        denom = jnp.sqrt(gg[k] * ww[k])
        out[k] = jnp.where(denom > 0, d / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out


def equilibrium_ratio(
    lr: Any, weight_decay: Any, grad_sq: Any, weight_sq: Any
) -> jax.Array:
    """How far a scale-invariant weight under SGD with weight decay is from
    its equilibrium norm: 1 at the equilibrium, > 1 while the norm grows.

    With ``L(c w) = L(w)`` the gradient is orthogonal to ``w``, so one step
    ``w' = (1 - lr wd) w - lr g`` gives ``||w'||^2 = (1 - lr wd)^2 ||w||^2 +
    lr^2 ||g||^2``: weight decay shrinks the norm, the gradient grows it.
    In expectation over batches the norm is stationary when ``lr E||g||^2 =
    wd (2 - lr wd) ||w||^2``; since ``||g|| ~ 1/||w||`` this is the
    equilibrium ``||w||^4 ~ lr / wd`` (van Laarhoven 2017, arXiv:1706.05350;
    Hoffer et al. 2018, arXiv:1803.01814; Li & Arora 2020,
    arXiv:1910.07454; the approach takes about ``1 / (4 lr wd)`` steps).

    Args:
      lr: learning rate (plain SGD, no momentum).
      weight_decay: the L2 coefficient ``wd`` (the update adds ``wd * w``).
      grad_sq: ``E||g||^2``, the mean squared norm of the mini-batch
        gradient of the weight.
      weight_sq: ``||w||^2``.

    Returns:
      ``lr * grad_sq / (wd * (2 - lr * wd) * weight_sq)``.

    Example:
      >>> import jax.numpy as jnp
      >>> lr, wd, g1 = 0.1, 0.01, 4.0  # g1: ||g||^2 at ||w|| = 1
      >>> w2 = jnp.sqrt(lr * g1 / (wd * (2 - lr * wd)))  # the equilibrium
      >>> round(float(equilibrium_ratio(lr, wd, g1 / w2, w2)), 6)
      1.0
    """
    lr, wd = jnp.asarray(lr), jnp.asarray(weight_decay)
    return lr * jnp.asarray(grad_sq) / (wd * (2.0 - lr * wd) * jnp.asarray(weight_sq))


def exp_lr_factor(step: Any, lr: Any, weight_decay: Any) -> jax.Array:
    """Li & Arora's exponential learning-rate factor ``(1 - lr wd)^(-2 step - 1)``.

    For weights whose loss is scale invariant (every weight followed by BN),
    plain SGD with learning rate ``lr`` and weight decay ``wd`` and plain SGD
    *without* weight decay and learning rate ``lr * exp_lr_factor(t, lr, wd)``
    at step ``t`` (counted from 0) give the same network at every step: the
    second run's weights are the first's times ``(1 - lr wd)^(-t)`` (Li &
    Arora 2020, arXiv:1910.07454, Thm. 1.1 without momentum). Exact in exact
    arithmetic; with momentum the equivalence needs their modified schedule.

    Args:
      step: the step, from 0 (traced or not).
      lr: the fixed learning rate of the run with weight decay.
      weight_decay: its L2 coefficient.

    Returns:
      The factor, float32 (or float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(exp_lr_factor(0, 0.1, 0.5)), 6)  # 1 / 0.95
      1.052632
      >>> round(float(exp_lr_factor(1, 0.1, 0.5) / exp_lr_factor(0, 0.1, 0.5)), 6)
      1.108033
    """
    step = jnp.asarray(step)
    lr, wd = jnp.asarray(lr), jnp.asarray(weight_decay)
    dtype = jnp.promote_types(jnp.result_type(lr, wd), jnp.float32)
    t = step.astype(dtype)
    return jnp.exp(-(2.0 * t + 1.0) * jnp.log1p(-(lr * wd).astype(dtype)))
