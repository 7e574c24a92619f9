"""Drop-in parity with Flax: complex inputs, isinstance, one-example calls,
integer inputs, variable dtypes, and where bnlab is deliberately stricter.

Outputs are compared in float32 ulps of the largest expected value
(``ref.assert_close_ulps``; budget in tests/test_batch_norm.py), so the
tolerances hold for any summation order (CPU vector width, GPU).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab
import bnlab.linen
import bnlab.nnx
from bnlab import parallel
from tests import reference as ref


def _complex(shape, key=0, shift=3 - 5j):
    k1, k2 = jax.random.split(jax.random.key(key))
    re = jax.random.normal(k1, shape)
    im = jax.random.normal(k2, shape) * 2
    return (jax.lax.complex(re, im) + shift).astype(jnp.complex64)


def _loss(module, v, x, mask):
    # Weights per position: with weights per feature only, sum |y|^2 of a
    # normalized feature is constant and the gradient is rounding noise.
    y, _ = module.apply(v, x, mask=mask, mutable=["batch_stats"])
    w = jax.random.uniform(jax.random.key(10), y.shape)
    return jnp.sum(jnp.abs(y) ** 2 * w)


@pytest.mark.parametrize("use_mask", [False, True])
def test_complex_inputs_match_flax(use_mask):
    x = _complex((32, 4))
    mask = jax.random.bernoulli(jax.random.key(9), 0.7, (32, 4)) if use_mask else None
    flax_train = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    flax_eval = nn.BatchNorm(use_running_average=True)
    ours_train = bnlab.linen.BatchNorm(use_running_average=False)
    ours_eval = bnlab.linen.BatchNorm(use_running_average=True)
    with jax.numpy_dtype_promotion("standard"):  # Flax is not strict-clean
        v = flax_train.init(jax.random.key(0), x)
        yf, uf = flax_train.apply(v, x, mask=mask, mutable=["batch_stats"])
        yfe = flax_eval.apply({**v, **uf}, x)
        gf = jax.grad(lambda x: _loss(flax_train, v, x, mask))(x)
    yb, ub = jax.jit(
        lambda v, x: ours_train.apply(v, x, mask=mask, mutable=["batch_stats"])
    )(v, x)
    assert yb.dtype == yf.dtype == jnp.complex64
    ref.assert_close_ulps(yb, yf, 16)
    xd = np.asarray(x, np.complex128)
    m = np.ones(x.shape, bool) if mask is None else np.asarray(mask)
    n = m.sum(0)
    mean = np.where(m, xd, 0).sum(0) / n
    var = np.where(m, np.abs(xd - mean) ** 2, 0).sum(0) / n
    expected = {"mean": 0.01 * mean, "var": 0.99 + 0.01 * var}
    for k in ("mean", "var"):
        assert ub["batch_stats"][k].dtype == uf["batch_stats"][k].dtype, k
        ref.assert_close_ulps(ub["batch_stats"][k], expected[k], 16)
        # Flax's float32 mean (a sum / n) carries a few ulps of its own
        ref.assert_close_ulps(uf["batch_stats"][k], expected[k], 32)
    # eval with each side's own updated statistics: their few-ulp difference
    # is amplified by |x - mean| / std (~4 here)
    ref.assert_close_ulps(ours_eval.apply({**v, **ub}, x), yfe, 32)
    gb = jax.grad(lambda x: _loss(ours_train, v, x, mask))(x)
    # two float32 gradients, each a difference of terms ~ |dL/dy| / std
    ref.assert_close_ulps(gb, gf, 32)


def test_complex_statistics_are_exact_far_from_zero_and_synced():
    x = _complex((64, 3), shift=1e4 + 1e4j)
    y, new = bnlab.batch_norm(x, bnlab.init_batch_stats(3), train=True, momentum=0.0)
    xd = np.asarray(x, np.complex128)
    mean = xd.mean(0)
    var = (np.abs(xd - mean) ** 2).mean(0)
    # the stored mean is one float32 rounding of center + offset per part
    # (rtol 1e-7 of |mean| = 1.4e4 is ~1.4 ulps); the variance as elsewhere
    np.testing.assert_allclose(np.asarray(new.mean, np.complex128), mean, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(new.var, np.float64), var, rtol=1e-5)
    ref.assert_close_ulps(y, (xd - mean) / np.sqrt(var + 1e-5), 16)
    ys, news = jax.pmap(
        lambda x: bnlab.batch_norm(
            x, bnlab.init_batch_stats(3), train=True, axis_name="d", momentum=0.0
        ),
        axis_name="d",
    )(parallel.split_for_pmap(x))
    ref.assert_close_ulps(ys.reshape(64, 3), y, 16)  # Chan merge vs one pass
    np.testing.assert_allclose(parallel.unreplicate(news).var, new.var, rtol=1e-5)


def test_modules_are_instances_of_flaxs_batchnorm_with_the_same_variables():
    assert isinstance(bnlab.linen.BatchNorm(), nn.BatchNorm)
    m = bnlab.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
    f = nnx.BatchNorm(5, rngs=nnx.Rngs(0))
    assert isinstance(m, nnx.BatchNorm)
    sm, sf = nnx.state(m), nnx.state(f)
    assert jax.tree.structure(sm) == jax.tree.structure(sf)
    for a, b in zip(jax.tree.leaves(sm), jax.tree.leaves(sf), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_one_example_in_training_is_flaxs_output_with_a_warning():
    x = jnp.array([[1.0, -2.0, 3.0]])
    bias = jnp.array([0.5, 0.0, -1.0])
    v = {
        "params": {"scale": jnp.ones(3) * 2, "bias": bias},
        "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)},
    }
    with pytest.warns(UserWarning, match="one value per feature"):
        y, upd = bnlab.linen.BatchNorm(use_running_average=False).apply(
            v, x, mutable=["batch_stats"]
        )
    yf, _ = nn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, yf)
    np.testing.assert_array_equal(y[0], bias)
    np.testing.assert_array_equal(upd["batch_stats"]["mean"], 0.0)  # unchanged
    np.testing.assert_array_equal(upd["batch_stats"]["var"], 1.0)
    # NNX: eval_shape and a one-example forward in train mode (the default)
    model = nnx.Sequential(
        nnx.Linear(4, 3, rngs=nnx.Rngs(0)), bnlab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    )
    with pytest.warns(UserWarning, match="one value per feature"):
        shape = nnx.eval_shape(lambda: model(jnp.ones((1, 4))))
        out = model(jnp.ones((1, 4)))
    assert shape.shape == (1, 3) and out.shape == (1, 3)
    np.testing.assert_array_equal(model.layers[1].mean[...], 0.0)
    # the pure function still raises: a silent single-example batch is a bug there
    with pytest.raises(ValueError, match="1 value per feature"):
        bnlab.batch_norm(x, bnlab.init_batch_stats(3), train=True)


def test_integer_inputs_are_normalized_as_float32_like_flax():
    x = jnp.arange(24, dtype=jnp.int32).reshape(8, 3) % 5
    for train in (True, False):
        ours = bnlab.linen.BatchNorm(use_running_average=not train)
        theirs = nn.BatchNorm(use_running_average=not train, use_fast_variance=False)
        with jax.numpy_dtype_promotion("standard"):  # Flax is not strict-clean
            v = theirs.init(jax.random.key(0), x)
            yf = theirs.apply(v, x, mutable=["batch_stats"])[0]
        yb = ours.apply(v, x, mutable=["batch_stats"])[0]
        assert yb.dtype == yf.dtype == jnp.float32
        ref.assert_close_ulps(yb, yf, 16)
    m = bnlab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert m(x).dtype == jnp.float32


def test_variable_dtypes_after_apply_match_flax_without_float32_reductions():
    # force_float32_reductions=False, param_dtype=bf16: Flax stores bf16
    # statistics at init and float32 after the first update (promotion).
    kw = {"param_dtype": jnp.bfloat16, "force_float32_reductions": False}
    x = jax.random.normal(jax.random.key(1), (16, 4)) * 3 + 1
    ours = bnlab.linen.BatchNorm(use_running_average=False, **kw)
    with jax.numpy_dtype_promotion("standard"):  # Flax is not strict-clean
        theirs = nn.BatchNorm(use_running_average=False, **kw)
        v = theirs.init(jax.random.key(0), x)
        _, uf = theirs.apply(v, x, mutable=["batch_stats"])
        yfe = nn.BatchNorm(use_running_average=True, **kw).apply({**v, **uf}, x)

    def dtypes(tree):
        return jax.tree.map(lambda a: a.dtype, tree)

    assert dtypes(ours.init(jax.random.key(0), x)) == dtypes(v)
    _, ub = ours.apply(v, x, mutable=["batch_stats"])
    assert dtypes(ub) == dtypes(uf)
    ye = bnlab.linen.BatchNorm(use_running_average=True, **kw).apply({**v, **ub}, x)
    # Flax normalizes in param_dtype (bf16) here, bnlab in float32: equal to
    # bf16 resolution (2**-8 relative, and 1e-3 absolute for outputs near 0,
    # where bf16's rounding of the product x * inv is ~2**-8 of x * inv).
    np.testing.assert_allclose(
        np.asarray(ye, np.float32), np.asarray(yfe, np.float32), rtol=2**-8, atol=1e-3
    )


def test_where_bnlab_is_stricter_the_error_says_why():
    bn = bnlab.linen.BatchNorm(use_running_average=False, epsilon=0.0)
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="Flax accepts epsilon <= 0"):
        bn.init(jax.random.key(0), x)
    bn = bnlab.linen.BatchNorm(use_running_average=False, momentum=1.5)
    with pytest.raises(ValueError, match="Flax accepts any value"):
        bn.init(jax.random.key(0), x)


def test_no_warning_for_normal_batches():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn = bnlab.linen.BatchNorm(use_running_average=False)
        v = bn.init(jax.random.key(0), jnp.ones((1, 3)))  # one dummy example at init
        bn.apply(v, jnp.ones((4, 3)), mutable=["batch_stats"])
