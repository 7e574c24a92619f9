"""bnlab.diagnostics and population statistics, on problems with known answers.

Tolerances are relative to the quantity compared (or to the largest
eigenvalue, 9): the diagnostics are float32 linear algebra (power iteration,
eigendecomposition, finite gradient differences), whose error scales with
the magnitudes involved, not float32 ulps of a BN output. Statistics use
rtol 1e-5 (~170 eps; a variance from E[x^2] - E[x]^2 at these means is off
by far more).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnlab
import bnlab.linen
from bnlab import diagnostics as dg
from tests import reference as ref


def _quadratic(seed=0, n=6):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.array([9.0, 4.0, 2.0, 1.0, 0.5, -0.3])[:n]
    h = (q * eig) @ q.T
    return jnp.asarray(h, jnp.float32), eig


def test_hvp_and_top_eigenvalue_of_a_known_hessian():
    h, eig = _quadratic()
    f = lambda w: 0.5 * w @ h @ w  # noqa: E731
    v = jnp.arange(6.0)
    np.testing.assert_allclose(dg.hvp(f, jnp.ones(6), v), h @ v, rtol=1e-5)
    top = jax.jit(lambda w, k: dg.top_hessian_eigenvalue(f, w, k, iters=200))(
        jnp.ones(6), jax.random.key(0)
    )
    assert abs(float(top) - eig.max()) < 1e-4 * eig.max()  # power iteration
    np.testing.assert_allclose(
        dg.hessian_eigenvalues(f, jnp.zeros(6)), np.sort(eig), atol=1e-4
    )


def test_top_eigenvalue_on_a_pytree_of_params():
    f = lambda p: 3.0 * jnp.sum(p["a"] ** 2) + 0.5 * jnp.sum(p["b"] ** 2)  # noqa: E731
    p = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
    top = dg.top_hessian_eigenvalue(f, p, jax.random.key(1), iters=50)
    assert abs(float(top) - 6.0) < 1e-4


def test_landscape_probe_on_a_quadratic():
    # Along -eta g of L = w^T H w / 2: g(w - eta g) - g(w) = -eta H g, so the
    # gradient change is eta ||H g|| and beta = ||H g|| / ||g||.
    h, _ = _quadratic(1)
    f = lambda w: 0.5 * w @ h @ w  # noqa: E731
    w = jnp.linspace(-1, 1, 6)
    g = h @ w
    r = dg.landscape_probe(f, w, [0.01, 0.1])
    hg = float(jnp.linalg.norm(h @ g))
    np.testing.assert_allclose(r["grad_change"], [0.01 * hg, 0.1 * hg], rtol=1e-4)
    np.testing.assert_allclose(r["beta"], hg / float(jnp.linalg.norm(g)), rtol=1e-4)
    losses = [float(f(w - eta * g)) for eta in (0.01, 0.1)]
    np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(r["loss_range"], abs(losses[1] - losses[0]), rtol=1e-4)


def test_layer_grad_norms_of_a_linear_layer():
    # loss = sum(x @ W + b): dW = sum_i x_i (outer ones), db = n * ones.
    x = jax.random.normal(jax.random.key(2), (5, 3))
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), x)["params"]
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)))(params)
    norms = dg.layer_grad_norms({"Dense_0": grads})
    dw = np.outer(np.asarray(x).sum(0), np.ones(4))
    expect = np.sqrt((dw**2).sum() + (5.0**2) * 4)
    np.testing.assert_allclose(norms["Dense_0"], expect, rtol=1e-5)


def test_percentiles_match_numpy():
    x = jax.random.normal(jax.random.key(3), (1001, 4))
    np.testing.assert_allclose(
        dg.percentiles(x, (15, 50, 85)),
        np.percentile(np.asarray(x), (15, 50, 85), axis=0),
        rtol=1e-5,
        atol=1e-6,
    )


class _LinearBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(3, use_bias=False, kernel_init=nn.initializers.normal(1.0))(x)
        x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(nn.relu(x))


def test_population_stats_equal_the_whole_datasets_statistics():
    # The BN input is x @ W: its statistics over all batches are those of the
    # concatenated data (mean and variance including the batch means' spread),
    # whatever the batch sizes, also with batches far apart in mean.
    model = _LinearBN()
    xs = [
        jax.random.normal(jax.random.key(i), (n, 5)) * (1 + i) + 100 * i
        for i, n in enumerate((7, 20, 3, 16))
    ]
    v = model.init(jax.random.key(9), xs[0], train=False)
    run = lambda v, x, mutable: model.apply(v, x, train=True, mutable=mutable)  # noqa: E731
    stats = dg.population_stats(run, v, xs)
    w = np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
    z = np.concatenate([np.asarray(x, np.float64) for x in xs]) @ w
    mean, var, _ = ref.moments(z, (0,))
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], var, rtol=1e-5)
    assert stats["BatchNorm_0"]["mean"].dtype == jnp.float32


def test_population_stats_under_pmap_are_global():
    model = _LinearBN()
    sync = functools.partial(bnlab.linen.BatchNorm, axis_name="d")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(3, use_bias=False)(x)
            return sync(use_running_average=not train)(x)

    net = Net()
    x = jax.random.normal(jax.random.key(4), (4, 8, 5)) * 3 + 7
    v = net.init(jax.random.key(0), x[0], train=False)
    run = jax.pmap(
        lambda v, x: net.apply(v, x, train=True, mutable=["bn_moments", "batch_stats"]),
        axis_name="d",
        in_axes=(None, 0),
    )
    stats = bnlab.precise_stats(
        lambda v, x, mutable: run(v, x), v, [x, x + 1], device_axis=True
    )
    z = np.concatenate(
        [np.asarray(x, np.float64), np.asarray(x + 1, np.float64)]
    ).reshape(-1, 5)
    z = z @ np.asarray(v["params"]["Dense_0"]["kernel"], np.float64)
    mean, var, _ = ref.moments(z, (0,))
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], var, rtol=1e-5)
    del model


def test_population_stats_need_bnlab_layers():
    class FlaxBN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.BatchNorm(use_running_average=not train)(x)

    m = FlaxBN()
    x = jnp.ones((4, 3))
    v = m.init(jax.random.key(0), x, train=False)
    run = lambda v, x, mutable: m.apply(v, x, train=True, mutable=mutable)  # noqa: E731
    with pytest.raises(ValueError, match=r"reported no batch\s*moments"):
        bnlab.precise_stats(run, v, [x])


def test_batch_moments_match_float64_and_merge_exactly():
    x = (1e4 + jax.random.normal(jax.random.key(5), (300, 4))).astype(jnp.float32)
    m = bnlab.batch_moments(x)
    mean, var, n = ref.moments(x, (0,))
    np.testing.assert_allclose(np.asarray(m.mean, np.float64), mean, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(m.var, np.float64), var, rtol=1e-5)
    parts = [bnlab.batch_moments(x[:100]), bnlab.batch_moments(x[100:] + 5.0)]
    merged = bnlab.merge_moments(
        bnlab.Moments(*(jnp.stack(p) for p in zip(*parts, strict=True))), 0
    )
    whole = np.concatenate(
        [np.asarray(x[:100], np.float64), np.asarray(x[100:], np.float64) + 5.0]
    )
    np.testing.assert_allclose(
        np.asarray(merged.var[0], np.float64), whole.var(0), rtol=1e-5
    )


def test_batch_moments_checks_x_mask_and_axis_in_its_own_name():
    # Its checks are those of x / mask / axis alone (no statistics to check):
    # every message names batch_moments.
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="batch_moments: mask has dtype float32"):
        bnlab.batch_moments(x, mask=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="batch_moments: mask of shape"):
        bnlab.batch_moments(x, mask=jnp.ones((4, 2), bool))
    with pytest.raises(ValueError, match="batch_moments: axis=2 is out of range"):
        bnlab.batch_moments(x, axis=2)
    with pytest.raises(TypeError, match="batch_moments: complex inputs"):
        bnlab.batch_moments(x.astype(jnp.complex64))
    with pytest.raises(ValueError, match="batch_moments got x of shape \\(1, 3\\)"):
        bnlab.batch_moments(x[:1])


def test_lanczos_finds_the_outliers_and_bulk_edge_of_a_known_spectrum():
    from bnlab.diagnostics import lanczos_eigenvalues

    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 60))
    h = a @ a.T / 60  # Marchenko-Pastur bulk in [0, 4]
    h[0, 0] += 30.0
    h[1, 1] += 15.0  # two outliers
    h32 = jnp.asarray(h, jnp.float32)
    exact = np.linalg.eigvalsh(h)
    ritz = np.asarray(
        jax.jit(
            lambda k: lanczos_eigenvalues(
                lambda w: 0.5 * w @ h32 @ w, jnp.ones(60), k, 24
            )
        )(jax.random.key(1))
    )
    # the extreme Ritz values converge first: outliers to float32 precision
    np.testing.assert_allclose(ritz[-2:], exact[-2:], rtol=1e-4)
    assert ritz[-3] <= exact[-3] + 1e-3  # the bulk edge, approached from below


def test_geometric_rate_recovers_the_ratio_of_a_geometric_sequence():
    # values = c * r**i: log-linear, so the least-squares slope is log(r)
    # exactly; the ends left out by `skip` may be anything.
    seq = 3.0 * 1.467 ** np.arange(20.0)
    assert abs(float(dg.geometric_rate(jnp.asarray(seq, jnp.float32))) - 1.467) < 1e-5
    ends = seq.copy()
    ends[:2], ends[-2:] = 1e-3, 1e9  # boundary layers off the trend
    assert abs(float(dg.geometric_rate(jnp.asarray(ends), skip=2)) - 1.467) < 1e-5
    assert abs(float(dg.geometric_rate(jnp.asarray(seq[::-1]))) - 1 / 1.467) < 1e-6
    with pytest.raises(ValueError, match="at least 2 values after leaving out skip=2"):
        dg.geometric_rate(jnp.ones(5), skip=2)


def test_radial_cosine_is_zero_for_weights_followed_by_bn():
    # A Dense kernel followed by BN (training mode) is scale invariant, so its
    # gradient is orthogonal to it up to BN's epsilon (eps / var ~ 1e-5 here);
    # the readout, not followed by BN, is not: cosine of order 1 / sqrt(n).
    model = _LinearBN()
    x = jax.random.normal(jax.random.key(6), (64, 5))
    y = (x[:, 0] > 0).astype(jnp.int32)
    v = model.init(jax.random.key(7), x, train=False)

    def loss(p):
        out, _ = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out[:, 0] - y.astype(jnp.float32)))

    g = jax.grad(loss)(v["params"])
    cos = dg.radial_cosine(g, v["params"])
    assert abs(float(cos["Dense_0"])) < 1e-4
    assert abs(float(cos["Dense_1"])) > 1e-2
    # analytic cases: a radial loss (cosine 1) and a direction-only loss (0)
    w = {"a": jnp.array([3.0, -4.0, 12.0])}
    radial = dg.radial_cosine(jax.grad(lambda p: jnp.sum(p["a"] ** 2))(w), w)
    assert abs(float(radial["<root>"]) - 1.0) < 1e-6
    u = jnp.array([1.0, 2.0, -1.0])
    angular = jax.grad(lambda p: jnp.vdot(u, p["a"] / jnp.linalg.norm(p["a"])))(w)
    assert abs(float(dg.radial_cosine(angular, w)["<root>"])) < 1e-6
    with pytest.raises(ValueError, match="grads and params differ"):
        dg.radial_cosine({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": jnp.ones(2)})


def test_equilibrium_ratio_is_one_at_the_fixed_point_of_the_norm_dynamics():
    # For a scale-invariant weight, ||g||^2 = G / ||w||^2 (G the squared
    # gradient norm at unit norm) and SGD with weight decay gives exactly
    # u' = (1 - lr wd)^2 u + lr^2 G / u for u = ||w||^2. Iterated from far
    # below and far above, u converges to the equilibrium, where the ratio is 1;
    # before that the ratio says which way the norm moves (> 1: it grows).
    lr, wd, big_g = 0.5, 5e-3, 3.0
    for u in (1e-2, 1e2):
        first = float(dg.equilibrium_ratio(lr, wd, big_g / u, u))
        assert (first > 1) == (u < 1)
        for _ in range(20000):  # 4 lr wd T = 200 relaxation times
            u = (1 - lr * wd) ** 2 * u + lr**2 * big_g / u
        assert abs(float(dg.equilibrium_ratio(lr, wd, big_g / u, u)) - 1.0) < 1e-5
    # and the equilibrium norm follows ||w||^4 = lr G / (wd (2 - lr wd))
    assert abs(u**2 - lr * big_g / (wd * (2 - lr * wd))) < 1e-6 * u**2


def test_exp_lr_factor_makes_sgd_without_wd_equal_sgd_with_wd():
    # Li & Arora 2020, Thm. 1.1 without momentum, on a scale-invariant loss
    # L(w) = |A w / ||w|| - b|^2 (float64 numpy): plain SGD with wd and plain
    # SGD without wd at lr * exp_lr_factor(t) keep the same direction at every
    # step, and the second's norm is the first's times (1 - lr wd)^(-t).
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=5)

    def grad(w):
        n = np.linalg.norm(w)
        u = w / n
        gu = a.T @ (a @ u - b)
        return (gu - u * (u @ gu)) / n

    lr, wd, steps = 0.2, 0.02, 150
    factors = np.asarray(
        dg.exp_lr_factor(jnp.arange(steps), jnp.float32(lr), jnp.float32(wd)),
        np.float64,
    )
    w = rng.normal(size=8)
    w_exp = w.copy()
    for t in range(steps):
        w = w - lr * (grad(w) + wd * w)
        w_exp = w_exp - lr * factors[t] * grad(w_exp)
    direction = w / np.linalg.norm(w) - w_exp / np.linalg.norm(w_exp)
    assert np.linalg.norm(direction) < 1e-5  # float32 factors
    ratio = np.linalg.norm(w_exp) / np.linalg.norm(w)
    assert abs(ratio / (1 - lr * wd) ** -steps - 1) < 1e-5
