"""bnlab.batch_norm against float64 numpy references and Flax.

Tolerances. Outputs are compared in float32 ulps of the largest expected
output (``ref.assert_close_ulps``): float32 rounds relative to magnitude, and
another summation order (vector width, a GPU reduction tree) moves a result
by a few ulps, so an absolute tolerance is either loose for small outputs or
below float32's resolution for large ones. The budget is the docstring's
bound: a relative variance error of ``c * 2**-24 * (1 + 0.2)`` (``c`` the
summation factor, below ~10 here) costs ``c / 2`` ulps of the output, the
rsqrt, the product and the sum a few more: 16 ulps. A mean rounded to
float32 (what the (center, offset) pair avoids) costs thousands of ulps at
mean 1e4, and Flax's E[x^2] - E[x]^2 millions: both fail. Running
statistics are compared with ``momentum=0`` (the batch moments themselves)
and a relative tolerance: 1e-5 is ~170 float32 eps, room for any summation
order, while the textbook variance is off by O(1) at mean 1e4.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

import bnlab
from tests import reference as ref


def _bn(x, stats, scale=None, bias=None, **kw):
    return jax.jit(functools.partial(bnlab.batch_norm, **kw))(x, stats, scale, bias)


@pytest.mark.parametrize("c", [1e2, 1e3, 1e4])
def test_large_mean_fresh_state_is_exact(c):
    # x = c + z: the mean is c standard deviations away from 0.
    x = (c + jax.random.normal(jax.random.key(0), (512, 8))).astype(jnp.float32)
    y, new = _bn(x, bnlab.init_batch_stats(8), train=True, momentum=0.0)
    mean, var, _ = ref.moments(x, (0,))
    np.testing.assert_allclose(new.var, var, rtol=1e-5)  # see the module doc
    ref.assert_close_ulps(y, ref.batch_norm(x, mean, var, (0,)), 16)


@pytest.mark.parametrize("c,s", [(1e2, 1.0), (1e4, 1e2), (-3e3, 1e-1), (0.0, 1e4)])
def test_scale_and_offset_variants(c, s):
    x = (c + s * jax.random.normal(jax.random.key(1), (64, 7, 3))).astype(jnp.float32)
    gamma = jnp.linspace(0.5, 2.0, 3)
    beta = jnp.linspace(-1.0, 1.0, 3)
    y, new = _bn(x, bnlab.init_batch_stats(3), gamma, beta, train=True, momentum=0.0)
    mean, var, _ = ref.moments(x, (0, 1))
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    # Up to |mean| = 3e4 std: the bound's |mean - shift| / std term stays
    # small because the shift is a data value. At (-3e3, 0.1) the values
    # hold ~11 bits below their std, so x - shift are multiples of 2**-12 and
    # their squares odd multiples of 2**-24 half the time: a sequential
    # float32 sum then rounds them down systematically (c grows with n, 9
    # ulps measured on AVX-512), hence 32 here.
    ref.assert_close_ulps(y, ref.batch_norm(x, mean, var, (0, 1), gamma, beta), 32)


def test_steady_state_matches_reference_tightly():
    key = jax.random.key(2)
    x = (5.0 + 3.0 * jax.random.normal(key, (256, 16))).astype(jnp.float32)
    stats = bnlab.BatchStats(jnp.full((16,), 5.2), jnp.full((16,), 8.0))
    y, _ = _bn(x, stats, train=True)
    mean, var, _ = ref.moments(x, (0,))
    ref.assert_close_ulps(y, ref.batch_norm(x, mean, var, (0,)), 16)


def test_eval_uses_running_stats_and_returns_them_unchanged():
    x = jax.random.normal(jax.random.key(3), (10, 4))
    stats = bnlab.BatchStats(jnp.arange(4.0), jnp.arange(1.0, 5.0))
    y, out = _bn(x, stats, train=False)
    assert out is stats or all(
        jnp.array_equal(a, b) for a, b in zip(out, stats, strict=True)
    )
    # eval: one subtract, one rsqrt, one product per value: a few ulps
    ref.assert_close_ulps(
        y, ref.batch_norm(x, np.arange(4.0), np.arange(1.0, 5.0), (0,)), 8
    )


@pytest.mark.parametrize("convention", ["flax", "torch"])
def test_running_stats_closed_form_after_k_steps(convention):
    m, k = (0.9, 6) if convention == "flax" else (0.1, 6)
    xs = [
        (i + (1 + i) * jax.random.normal(jax.random.key(i), (32, 5))).astype(
            jnp.float32
        )
        for i in range(k)
    ]
    step = jax.jit(
        lambda x, s: bnlab.batch_norm(
            x, s, train=True, momentum=m, convention=convention
        )[1]
    )
    stats = bnlab.init_batch_stats(5)
    for x in xs:
        stats = step(x, stats)
    mom = m if convention == "flax" else 1 - m  # weight of the old value
    r_mean, r_var = np.zeros(5), np.ones(5)
    exp_mean = mom**k * r_mean
    exp_var = mom**k * r_var
    for i, x in enumerate(xs):
        mean, var, n = ref.moments(x, (0,))
        if convention == "torch":
            var = var * n / (n - 1)  # torch keeps the unbiased running variance
        w = (1 - mom) * mom ** (k - 1 - i)
        exp_mean = exp_mean + w * mean
        exp_var = exp_var + w * var
    # six EMA steps of a few roundings each on values of magnitude 1-30:
    # relative, ~170 eps of room; a wrong convention is off by O(1).
    np.testing.assert_allclose(stats.mean, exp_mean, rtol=1e-5)
    np.testing.assert_allclose(stats.var, exp_var, rtol=1e-5)


def test_bf16_stats_from_unrounded_input_and_flax_output_dtype():
    x = (300.0 + jax.random.normal(jax.random.key(4), (512, 4))).astype(jnp.bfloat16)
    ones, zeros = jnp.ones(4), jnp.zeros(4)
    y, new = _bn(x, bnlab.init_batch_stats(4), ones, zeros, train=True, momentum=0.0)
    assert new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
    assert y.dtype == jnp.float32  # Flax Linen rule: result_type(bf16, f32 params)
    y2, _ = _bn(x, bnlab.init_batch_stats(4), train=True)
    assert y2.dtype == jnp.bfloat16  # no float32 params: input dtype
    # The exact variance of the bf16 values (each exact in float32); one
    # computed from bf16-rounded intermediates is off by ~30 % at mean 300.
    mean, var, _ = ref.moments(np.asarray(x.astype(jnp.float32)), (0,))
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    # dtype=bf16 with float32 input: statistics still from the float32 values.
    xf = (300.0 + jax.random.normal(jax.random.key(5), (512, 4))).astype(jnp.float32)
    yb, newb = _bn(
        xf, bnlab.init_batch_stats(4), train=True, dtype=jnp.bfloat16, momentum=0.0
    )
    assert yb.dtype == jnp.bfloat16
    mean, var, _ = ref.moments(xf, (0,))
    np.testing.assert_allclose(newb.var, var, rtol=1e-5)


def test_gradients_float64_orders_1_and_2():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(6), (6, 3), jnp.float64) * 2 + 1
        g = jnp.array([0.5, 1.5, -1.0], jnp.float64)
        b = jnp.array([0.1, 0.0, -0.3], jnp.float64)
        stats = bnlab.init_batch_stats(3, jnp.float64)

        def f(x, g, b):
            y, _ = bnlab.batch_norm(x, stats, g, b, train=True)
            return jnp.sin(y)  # non-linear so second order is non-trivial

        jtu.check_grads(jax.jit(f), (x, g, b), order=2, modes=["fwd", "rev"])


def test_gradient_matches_analytic_formula():
    x = jax.random.normal(jax.random.key(7), (16, 4)) + 100.0
    dy = jax.random.normal(jax.random.key(8), (16, 4))
    g = jnp.array([1.0, 2.0, 0.5, -1.0])

    def loss(x):
        y, _ = bnlab.batch_norm(x, bnlab.init_batch_stats(4), g, train=True)
        return jnp.sum(y * dy)

    dx = jax.jit(jax.grad(loss))(x)
    xd, dyd = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    mean, var, n = ref.moments(xd, (0,))
    xhat = (xd - mean) / np.sqrt(var + 1e-5)
    expect = (
        np.asarray(g)
        / np.sqrt(var + 1e-5)
        * (dyd - dyd.mean(0) - xhat * (dyd * xhat).mean(0))
    )
    # dx is a difference of terms of the size of dy * g / std: ulps of it
    ref.assert_close_ulps(dx, expect, 64)


AXES = [(-1, (2, 3, 4, 5)), (1, (2, 3, 4, 5)), ((1, 2), (2, 3, 4, 5))]


@pytest.mark.parametrize("axis,shape", AXES)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_equals_flax_two_pass(axis, shape, use_mask, train):
    k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
    x = jax.random.normal(k1, shape) * 2 + 3
    mask = jax.random.bernoulli(k2, 0.7, shape) if use_mask else None
    flax_bn = nn.BatchNorm(
        use_running_average=not train, axis=axis, use_fast_variance=False
    )
    variables = flax_bn.init(k3, x)
    # Non-trivial params and stats so eval mode is tested with real values.
    variables = jax.tree.map(
        lambda v: v + 0.3 * jax.random.uniform(k3, v.shape), variables
    )
    y_f, upd_f = flax_bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    ours = bnlab.linen.BatchNorm(use_running_average=not train, axis=axis)
    y_b, upd_b = jax.jit(
        lambda v, x, m: ours.apply(v, x, mask=m, mutable=["batch_stats"])
    )(variables, x, mask)
    # Two float32 computations of the same formula (Flax's mean is rounded to
    # float32, at mean 3 std 2 that is < 1 ulp of the output): 16 ulps each.
    ref.assert_close_ulps(y_b, y_f, 16)
    jax.tree.map(lambda a, b: ref.assert_close_ulps(a, b, 16), upd_b, upd_f)


# ---------------------------------------------------------------- degenerate


def test_all_masked_features_keep_stats_and_no_nan():
    x = jax.random.normal(jax.random.key(10), (8, 4))
    mask = jnp.ones((8, 4), bool).at[:, 2].set(False)
    x = jnp.where(mask, x, jnp.nan)  # garbage where masked
    stats = bnlab.BatchStats(jnp.full((4,), 0.5), jnp.full((4,), 2.0))
    y, new = _bn(x, stats, jnp.ones(4), jnp.zeros(4), train=True, mask=mask)
    assert np.all(np.isfinite(new.mean)) and np.all(np.isfinite(new.var))
    assert new.mean[2] == 0.5 and new.var[2] == 2.0
    assert np.all(np.isfinite(np.asarray(y)[np.asarray(mask)]))
    # Flax poisons the running statistics of that feature for good.
    bn = nn.BatchNorm(use_running_average=False)
    v = bn.init(jax.random.key(0), jnp.ones((8, 4)))
    _, upd = bn.apply(v, x, mask=mask, mutable=["batch_stats"])
    assert np.isnan(upd["batch_stats"]["mean"][2])


def test_nan_in_masked_positions_changes_nothing():
    k1, k2 = jax.random.split(jax.random.key(11))
    x = jax.random.normal(k1, (12, 5)) * 3 + 7
    mask = jax.random.bernoulli(k2, 0.6, (12, 5)).at[:2].set(True)
    x_nan = jnp.where(mask, x, jnp.nan)
    x_big = jnp.where(mask, x, 1e30)
    stats = bnlab.init_batch_stats(5)
    g, b = jnp.full(5, 1.5), jnp.full(5, 0.2)

    def run(x):
        def loss(x, g, b):
            y, new = bnlab.batch_norm(x, stats, g, b, train=True, mask=mask)
            return jnp.sum(jnp.where(mask, jnp.sin(y), 0.0)), (y, new)

        (_, (y, new)), grads = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        )(x, g, b)
        return y, new, grads

    y1, s1, (dx1, dg1, db1) = run(x_nan)
    y2, s2, (dx2, dg2, db2) = run(x_big)
    m = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(y1)[m], np.asarray(y2)[m])
    np.testing.assert_array_equal(s1.mean, s2.mean)
    np.testing.assert_array_equal(s1.var, s2.var)
    assert np.all(np.isfinite(dg1)) and np.all(np.isfinite(db1))
    # The same sums over valid positions: equal up to summation order.
    ref.assert_close_ulps(dg1, dg2, 16)
    ref.assert_close_ulps(dx1, dx2, 16, where=m)
    mean, var, _ = ref.moments(x, (0,), m)
    # the running variance is 0.99 + 0.01 * var: one rounding of ~1 is
    # 1.2e-7, i.e. 1.2e-5 of var once divided by 0.01.
    np.testing.assert_allclose(
        (np.asarray(s1.var, np.float64) - 0.99) / 0.01, var, rtol=1e-5
    )


@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 1, 3)])
def test_single_value_per_feature_raises(shape):
    with pytest.raises(ValueError, match="1 value per feature"):
        _bn(jnp.ones(shape), bnlab.init_batch_stats(shape[-1]), train=True)
    # Not in eval mode, and not when the statistics are synced over devices.
    _bn(jnp.ones(shape), bnlab.init_batch_stats(shape[-1]), train=False)
    out = jax.vmap(
        lambda x: bnlab.batch_norm(
            x, bnlab.init_batch_stats(shape[-1]), train=True, axis_name="d"
        )[0],
        axis_name="d",
    )(jnp.arange(2.0 * np.prod(shape)).reshape((2, *shape)))
    assert np.all(np.isfinite(out))


def test_bad_axis_message():
    with pytest.raises(ValueError, match=r"axis=3 is out of range.*2 dimensions"):
        _bn(jnp.ones((4, 3)), bnlab.init_batch_stats(3), train=True, axis=3)


def test_wrong_stats_shape_message():
    with pytest.raises(ValueError, match=r"stats.mean has shape \(4,\).*\(3,\)"):
        _bn(jnp.ones((4, 3)), bnlab.init_batch_stats(4), train=True)
    with pytest.raises(ValueError, match=r"scale has shape"):
        _bn(jnp.ones((4, 3)), bnlab.init_batch_stats(3), jnp.ones(2), train=True)


def test_unbound_axis_name_message():
    with pytest.raises(ValueError, match=r"axis_name='batch' is not bound"):
        _bn(jnp.ones((4, 3)), bnlab.init_batch_stats(3), train=True, axis_name="batch")


def test_bad_mask_and_hyperparameters():
    s = bnlab.init_batch_stats(3)
    with pytest.raises(ValueError, match="mask of shape"):
        _bn(jnp.ones((4, 3)), s, train=True, mask=jnp.ones((4, 2), bool))
    with pytest.raises(ValueError, match="momentum"):
        _bn(jnp.ones((4, 3)), s, train=True, momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        _bn(jnp.ones((4, 3)), s, train=True, epsilon=0.0)
    with pytest.raises(ValueError, match="convention"):
        _bn(jnp.ones((4, 3)), s, train=True, convention="keras")
    with pytest.raises(TypeError, match="floating"):
        _bn(jnp.ones((4, 3), jnp.int32), s, train=True)


def test_pure_under_vmap_and_grad_compose():
    xs = jax.random.normal(jax.random.key(12), (3, 8, 4)) + 10
    f = jax.vmap(lambda x: bnlab.batch_norm(x, bnlab.init_batch_stats(4), train=True))
    ys, stats = jax.jit(f)(xs)
    for i in range(3):
        mean, var, _ = ref.moments(xs[i], (0,))
        ref.assert_close_ulps(ys[i], ref.batch_norm(xs[i], mean, var, (0,)), 16)
    assert stats.mean.shape == (3, 4)


# ------------------------------------------------- shift taken from the data


@pytest.mark.parametrize(
    "shape,axis", [((512, 8), -1), ((16, 9, 9, 4), -1), ((8, 4, 6, 6), 1)]
)
def test_output_error_at_mean_1e4_is_a_few_ulps(shape, axis):
    # Fresh state, x = 1e4 + N(0, 1): float32 rounding of the mean alone would
    # cost 5e-4 (~1000 ulps of the outputs); the (data value + offset) pair
    # keeps the error at a few ulps.
    x = (1e4 + jax.random.normal(jax.random.key(20), shape)).astype(jnp.float32)
    y, new = _bn(
        x, bnlab.init_batch_stats(shape[axis]), train=True, axis=axis, momentum=0.0
    )
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    mean, var, _ = ref.moments(x, red)
    ref.assert_close_ulps(y, ref.batch_norm(x, mean, var, red), 16)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)


def test_an_outlier_among_the_sampled_values_costs_little():
    # The shift is the median of 8 strided values; make one of them (row 0)
    # an outlier 1000 std away. The median ignores it, the variance includes
    # it, and the error bound c * eps * (1 + (mean - shift)^2 / var) stays
    # small. The outputs reach 22.6 there (float32 spacing 1.9e-6): the
    # error is measured in ulps of that, not against a fixed 2e-6.
    x = (1e4 + jax.random.normal(jax.random.key(21), (512, 4))).astype(jnp.float32)
    x = x.at[0].add(1e3)
    y, new = _bn(x, bnlab.init_batch_stats(4), train=True, momentum=0.0)
    mean, var, _ = ref.moments(x, (0,))
    np.testing.assert_allclose(np.asarray(new.var, np.float64), var, rtol=1e-5)
    # the stored mean is one float32 rounding of center + offset (<= 0.5 ulp;
    # rtol 1e-7 is ~1 ulp at 1e4)
    np.testing.assert_allclose(np.asarray(new.mean, np.float64), mean, rtol=1e-7)
    ref.assert_close_ulps(y, ref.batch_norm(x, mean, var, (0,)), 16)


@pytest.mark.parametrize("pattern", ["first_half", "last_rows", "sparse", "every_8th"])
def test_masks_are_exact_at_large_means(pattern):
    # Structured masks must not starve the shift sampling: masked rows hold
    # NaN, valid ones 1e4 + N(0, 1).
    n, c = 256, 5
    rows = np.arange(n)[:, None]
    mask = {
        "first_half": rows >= n // 2,
        "last_rows": rows >= n - 8,
        "sparse": (rows * 7919 + np.arange(c)) % 5 == 0,
        "every_8th": rows % 8 == 3,
    }[pattern]
    mask = np.broadcast_to(mask, (n, c))
    x = (1e4 + jax.random.normal(jax.random.key(22), (n, c))).astype(jnp.float32)
    x = jnp.where(mask, x, jnp.nan)
    y, new = _bn(x, bnlab.init_batch_stats(c), train=True, mask=mask, momentum=0.0)
    mean, var, _ = ref.moments(np.where(mask, x, 0), (0,), mask)
    np.testing.assert_allclose(np.asarray(new.var, np.float64), var, rtol=1e-5)
    y_ref = ref.batch_norm(np.where(mask, x, 0), mean, var, (0,))
    ref.assert_close_ulps(y, y_ref, 16, where=mask)


def test_features_with_fewer_than_two_valid_values_keep_running_stats():
    # One valid value has no spread: the old code divided by sqrt(eps) (outputs
    # +-1100) and decayed the running variance toward 0.
    x = jax.random.normal(jax.random.key(23), (8, 3)) * 4 + 2
    mask = np.ones((8, 3), bool)
    mask[:, 1] = False
    mask[5, 1] = True  # feature 1: one valid value
    mask[:, 2] = False  # feature 2: none
    stats = bnlab.BatchStats(jnp.array([0.0, 0.5, -1.0]), jnp.array([1.0, 4.0, 9.0]))
    y, new = _bn(x, stats, train=True, mask=mask)
    np.testing.assert_array_equal(new.mean[1:], stats.mean[1:])
    np.testing.assert_array_equal(new.var[1:], stats.var[1:])
    expect = (np.asarray(x)[:, 1:] - np.array([0.5, -1.0])) / np.sqrt(
        np.array([4.0, 9.0]) + 1e-5
    )
    ref.assert_close_ulps(np.asarray(y)[:, 1:], expect, 8)  # eval formula
    assert new.var[0] != stats.var[0]  # the full feature still trains


def test_overflowing_moments_keep_running_stats_finite():
    # Values ~1e30: squares overflow float32. The running statistics are kept
    # (as for a feature with no values) instead of becoming NaN/Inf.
    x = jnp.concatenate(
        [jax.random.normal(jax.random.key(24), (16, 1)) * 1e30, jnp.ones((16, 1))], 1
    )
    stats = bnlab.init_batch_stats(2)
    _, new = _bn(x, stats, train=True)
    assert np.all(np.isfinite(new.mean)) and np.all(np.isfinite(new.var))
    assert new.mean[0] == 0.0 and new.var[0] == 1.0
    # A constant feature at 1e20 is exact (shift = the value itself).
    y, new = _bn(jnp.full((16, 2), 1e20), stats, train=True, momentum=0.5)
    np.testing.assert_allclose(new.mean, 0.5e20, rtol=1e-6)
    np.testing.assert_array_equal(new.var, 0.5)
    np.testing.assert_array_equal(y, 0.0)


def test_bf16_input_trains_like_its_float32_values():
    x = (300.0 + 3 * jax.random.normal(jax.random.key(25), (64, 8, 8, 16))).astype(
        jnp.bfloat16
    )
    g, b = jnp.linspace(0.5, 2, 16), jnp.linspace(-1, 1, 16)
    yb, sb = _bn(x, bnlab.init_batch_stats(16), g, b, train=True)
    y32, s32 = _bn(x.astype(jnp.float32), bnlab.init_batch_stats(16), g, b, train=True)
    np.testing.assert_array_equal(yb, y32)  # float32 params: float32 output
    np.testing.assert_array_equal(sb.var, s32.var)
    np.testing.assert_array_equal(sb.mean, s32.mean)


def test_traced_momentum_and_epsilon_are_accepted():
    # e.g. a momentum schedule inside a jitted step
    x = jax.random.normal(jax.random.key(26), (16, 3))

    @jax.jit
    def f(x, momentum, epsilon):
        return bnlab.batch_norm(
            x, bnlab.init_batch_stats(3), train=True, momentum=momentum, epsilon=epsilon
        )

    y, new = f(x, 0.5, 1e-3)
    y_ref, new_ref = _bn(
        x, bnlab.init_batch_stats(3), train=True, momentum=0.5, epsilon=1e-3
    )
    # the same computation with the values as arguments or constants
    ref.assert_close_ulps(y, y_ref, 4)
    ref.assert_close_ulps(new.var, new_ref.var, 4)


# ---------------------------------------------------------------- bad input


def _raises(exc, match, *args, **kw):
    x = kw.pop("x", jnp.ones((4, 3)))
    stats = kw.pop("stats", bnlab.init_batch_stats(3))
    with pytest.raises(exc, match=match):
        bnlab.batch_norm(x, stats, *args, **{"train": True, **kw})


def test_bad_inputs_get_errors_that_name_the_problem():
    s = bnlab.init_batch_stats(3)
    _raises(
        TypeError,
        "stats.mean has dtype int32",
        stats=bnlab.BatchStats(jnp.zeros(3, jnp.int32), jnp.ones(3)),
    )
    _raises(
        TypeError,
        "stats.mean must be an array",
        stats=bnlab.BatchStats([0.0] * 3, s.var),
    )
    _raises(
        TypeError, "stats.var must be an array", stats=bnlab.BatchStats(s.mean, None)
    )
    _raises(
        TypeError,
        "scale has dtype complex64.*complex only with a complex x",
        jnp.ones(3, jnp.complex64),
    )
    _raises(TypeError, "mask has dtype float32", mask=jnp.full((4, 3), 0.3))
    _raises(ValueError, "epsilon=0.0 must be > 0", epsilon=0.0)
    _raises(ValueError, "epsilon=1e-50 must be > 0.*float32", epsilon=1e-50)
    _raises(ValueError, "epsilon=inf", epsilon=float("inf"))
    _raises(ValueError, "Flax accepts epsilon <= 0", epsilon=-1.0)
    _raises(ValueError, "momentum=nan must lie in", momentum=float("nan"))
    _raises(ValueError, "Flax accepts any value", momentum=-5.0)
    _raises(
        ValueError,
        "names the same axis twice",
        axis=(1, 1),
        x=jnp.ones((4, 3, 3)),
        stats=bnlab.init_batch_stats((3, 3)),
    )
    _raises(ValueError, "names the same axis twice", axis=(1, -1), x=jnp.ones((4, 3)))
    _raises(TypeError, "axis=True must be an int", axis=True)
    for bad in (1.0, None, "1"):
        _raises(TypeError, "must be an int or a tuple of ints", axis=bad)
    _raises(TypeError, "train=.* must be a Python bool", train=jnp.array(True))
    _raises(TypeError, "train=.* must be a Python bool", train=1)
    _raises(TypeError, "dtype=.*int32.* is not a floating", dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"stats must be bnlab\.BatchStats"):
        bnlab.batch_norm(jnp.ones((4, 3)), [jnp.zeros(3), jnp.ones(3)], train=True)


# ------------------------------------------- invalid values that are traced


def _train_jit(convention="flax"):
    return jax.jit(
        lambda x, s, m, e: bnlab.batch_norm(
            x, s, train=True, momentum=m, epsilon=e, convention=convention
        )
    )


@pytest.mark.parametrize("convention", ["flax", "torch"])
@pytest.mark.parametrize("momentum", [1.5, -0.5, np.nan, np.inf, -np.inf])
def test_traced_momentum_outside_0_1_keeps_the_running_stats(convention, momentum):
    # Flax's rule with momentum 1.5 gives var = 1.5 * 1 - 0.5 * batch_var:
    # negative for a batch variance above 3 (NaN for a NaN momentum).
    x = jax.random.normal(jax.random.key(30), (16, 3)) * 4 + 2
    stats = bnlab.BatchStats(jnp.array([0.5, -1.0, 2.0]), jnp.array([1.0, 2.0, 0.5]))
    f = _train_jit(convention)
    y, new = f(x, stats, momentum, 1e-5)
    np.testing.assert_array_equal(new.mean, stats.mean)
    np.testing.assert_array_equal(new.var, stats.var)
    y_ok, updated = f(x, stats, 0.5, 1e-5)  # the outputs do not use momentum
    np.testing.assert_array_equal(y, y_ok)
    assert not np.array_equal(updated.var, stats.var)


def test_an_update_that_would_leave_valid_values_keeps_that_feature():
    # Valid momentum, but running statistics the caller made invalid: the
    # update of those features is skipped, the others are updated.
    x = jax.random.normal(jax.random.key(31), (16, 4)) * 2
    stats = bnlab.BatchStats(
        jnp.zeros(4), jnp.array([1.0, -5.0, jnp.inf, jnp.nan], jnp.float32)
    )
    _, new = _train_jit()(x, stats, 0.9, 1e-5)
    _, var, _ = ref.moments(x, (0,))
    np.testing.assert_allclose(new.var[0], 0.9 + 0.1 * var[0], rtol=1e-6)
    np.testing.assert_array_equal(new.var[1:], stats.var[1:])
    np.testing.assert_array_equal(new.mean[1:], stats.mean[1:])


@pytest.mark.parametrize("epsilon", [0.0, -1.0, -1e-30, np.nan])
def test_traced_epsilon_not_above_0_gives_nan_outputs_and_valid_stats(epsilon):
    # Documented: every output NaN (the loss shows it); the running-statistics
    # update does not use epsilon, so it is the valid one.
    x = jax.random.normal(jax.random.key(32), (16, 3)) + 3
    stats = bnlab.init_batch_stats(3)
    f = _train_jit()
    y, new = f(x, stats, 0.9, epsilon)
    assert np.all(np.isnan(np.asarray(y)))
    _, new_ok = f(x, stats, 0.9, 1e-5)
    np.testing.assert_array_equal(new.mean, new_ok.mean)
    np.testing.assert_array_equal(new.var, new_ok.var)
    y_eval, _ = jax.jit(lambda x, s, e: bnlab.batch_norm(x, s, train=False, epsilon=e))(
        x, stats, epsilon
    )
    assert np.all(np.isnan(np.asarray(y_eval)))


def test_eval_with_an_invalid_running_variance_is_documented_not_silent():
    # var < 0 counts as 0 (divisor sqrt(eps)); var = inf outputs bias;
    # a NaN variance or mean gives NaN for that feature only, by design.
    x = jax.random.normal(jax.random.key(33), (6, 5)) + 1
    mean = jnp.array([0.5, 0.5, 0.5, 0.5, jnp.nan], jnp.float32)
    var = jnp.array([-3.0, jnp.nan, jnp.inf, 4.0, 1.0], jnp.float32)
    g, b = jnp.full(5, 2.0), jnp.full(5, 0.25)
    y = np.asarray(
        jax.jit(lambda x, s: bnlab.batch_norm(x, s, g, b, train=False)[0])(
            x, bnlab.BatchStats(mean, var)
        )
    )
    xd = np.asarray(x, np.float64)
    ref.assert_close_ulps(y[:, 0], (xd[:, 0] - 0.5) / np.sqrt(1e-5) * 2 + 0.25, 8)
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isnan(y[:, 4]))
    np.testing.assert_array_equal(y[:, 2], 0.25)
    ref.assert_close_ulps(y[:, 3], (xd[:, 3] - 0.5) / np.sqrt(4 + 1e-5) * 2 + 0.25, 8)
    # The same rule for a feature that falls back on its running statistics
    # in training (no valid value).
    mask = jnp.ones((6, 5), bool).at[:, 0].set(False)
    y_train, _ = jax.jit(
        lambda x, s: bnlab.batch_norm(x, s, g, b, train=True, mask=mask)
    )(x, bnlab.BatchStats(mean, var))
    np.testing.assert_array_equal(np.asarray(y_train)[:, 0], y[:, 0])


def test_fold_with_an_invalid_running_variance_matches_eval():
    k = jax.random.normal(jax.random.key(34), (4, 3))
    s = bnlab.BatchStats(jnp.array([0.5, 1.0, 0.0]), jnp.array([-2.0, 4.0, jnp.nan]))
    k2, b2 = jax.jit(bnlab.fold_batch_norm)(k, None, s)
    x = jax.random.normal(jax.random.key(35), (5, 4))
    y, _ = bnlab.batch_norm(x @ k, s, train=False)
    folded = np.asarray(x @ k2 + b2[None])
    ref.assert_close_ulps(folded[:, :2], np.asarray(y)[:, :2], 64)
    assert np.all(np.isnan(folded[:, 2])) and np.all(np.isnan(np.asarray(y)[:, 2]))
    _, b_bad = jax.jit(lambda e: bnlab.fold_batch_norm(k, None, s, epsilon=e))(-1.0)
    assert np.all(np.isnan(b_bad))
    with pytest.raises(ValueError, match="fold_batch_norm: epsilon=0"):
        bnlab.fold_batch_norm(k, None, s, epsilon=0)


@pytest.mark.parametrize(
    "name,value",
    [
        ("momentum", "0.9"),
        ("momentum", np.array([0.9, 0.9], np.float32)),
        ("momentum", np.array([0.9], np.float32)),
        ("momentum", True),
        ("momentum", 0.9 + 0j),
        ("epsilon", "1e-5"),
        ("epsilon", np.full(3, 1e-5)),
        ("epsilon", None),
    ],
)
def test_hyper_parameters_that_are_not_one_number_are_refused_by_name(name, value):
    with pytest.raises(TypeError, match=rf"batch_norm: {name}.*e\.g\. {name}="):
        bnlab.batch_norm(
            jnp.ones((4, 3)), bnlab.init_batch_stats(3), train=True, **{name: value}
        )


@pytest.mark.parametrize("name", ["r_max", "d_max"])
def test_renorm_bounds_that_are_not_one_number_are_refused_by_name(name):
    for value in ("3", np.ones(2)):
        with pytest.raises(TypeError, match=rf"batch_renorm: {name}.*e\.g\. {name}="):
            bnlab.batch_renorm(
                jnp.ones((4, 3)), bnlab.init_batch_stats(3), train=True, **{name: value}
            )


def test_a_traced_hyper_parameter_must_be_a_scalar():
    f = jax.jit(
        lambda m: bnlab.batch_norm(
            jnp.ones((4, 3)), bnlab.init_batch_stats(3), train=True, momentum=m
        )
    )
    with pytest.raises(TypeError, match=r"momentum is a traced array of shape \(3,\)"):
        f(jnp.full(3, 0.9))


@pytest.mark.parametrize("convention,momentum", [("flax", 0.99), ("torch", 0.1)])
def test_one_update_of_the_running_stats_is_a_few_ulps(convention, momentum):
    # new = keep * old + take * batch with both weights rounded once: the
    # complement taken in float32 (1 - float32(0.99) = 0.0099999905) put the
    # running mean 8 ulps off after one step.
    x = jax.random.normal(jax.random.key(36), (256, 4)) + jnp.array([[3.0, -5, 7, 0.5]])
    stats = bnlab.init_batch_stats(4)
    _, new = _bn(x, stats, train=True, momentum=momentum, convention=convention)
    mean, var, n = ref.moments(x, (0,))
    take = momentum if convention == "torch" else 1 - momentum
    if convention == "torch":
        var = var * n / (n - 1)
    ref.assert_close_ulps(new.mean, take * mean, 4)
    ref.assert_close_ulps(new.var, (1 - take) + take * var, 4)


@pytest.mark.parametrize("c", [3e2, 1e4])
def test_the_ulp_budget_still_rejects_the_failures_bnlab_avoids(c):
    # 16 ulps of the output must not let through Flax's fast variance far
    # from zero, nor a mean rounded to float32 (no offset) at mean 1e4.
    x = (c + jax.random.normal(jax.random.key(37), (512, 4))).astype(jnp.float32)
    mean, var, _ = ref.moments(x, (0,))
    expected = ref.batch_norm(x, mean, var, (0,))
    bn = nn.BatchNorm(use_running_average=False, use_fast_variance=True)
    v = bn.init(jax.random.key(0), x)
    y_fast, _ = bn.apply(v, x, mutable=["batch_stats"])
    with pytest.raises(AssertionError, match="ulps"):
        ref.assert_close_ulps(y_fast, expected, 16)
    mean32 = np.float32(mean)
    y_rounded = (np.asarray(x) - mean32) / np.sqrt(np.float32(var) + np.float32(1e-5))
    if c == 1e4:
        with pytest.raises(AssertionError, match="ulps"):
            ref.assert_close_ulps(y_rounded, expected, 16)
    y, _ = _bn(x, bnlab.init_batch_stats(4), train=True)
    ref.assert_close_ulps(y, expected, 16)
