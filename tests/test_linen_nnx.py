"""Flax conformance: checks ported from Flax's own BatchNorm tests, written
fresh against bnlab's modules (same shapes, seeds and tolerances), plus
NNX-vs-Linen equivalence and variable-tree compatibility."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab
import bnlab.linen
import bnlab.nnx


@pytest.mark.parametrize("test_mask", [False, True])
def test_batch_norm(test_mask):  # flax linen_test NormalizationTest.test_batch_norm
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key1, (4, 3, 2))
    if test_mask:
        m = jax.random.randint(key2, (4, 3, 1), minval=0, maxval=2).astype(bool)
        x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
    else:
        m = None
    model = bnlab.linen.BatchNorm(momentum=0.9, use_running_average=False)
    y, initial_params = model.init_with_output(key3, x, mask=m)
    np.testing.assert_allclose(y.mean((0, 1), where=m), [0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1), where=m), [1.0, 1.0], rtol=1e-4)
    _, vars_out = model.apply(initial_params, x, mutable=["batch_stats"], mask=m)
    ema = vars_out["batch_stats"]
    np.testing.assert_allclose(
        ema["mean"], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4
    )
    np.testing.assert_allclose(
        ema["var"], 0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m), rtol=1e-4
    )


def test_batch_norm_multi_init():  # flax NormalizationTest.test_batch_norm_multi_init
    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = bnlab.linen.BatchNorm(
                name="norm", use_running_average=False, axis_name="batch"
            )
            x = norm(x)
            return x, norm(x)

    x = jax.random.normal(jax.random.key(1), (2, 4))
    (y1, y2), _ = Foo().init_with_output(jax.random.key(0), x)
    np.testing.assert_allclose(y1, y2, rtol=0.005)


def test_vmap_with_axis_name():  # flax transforms test: vmapped BN == full batch
    x = jax.random.normal(jax.random.key(2), (4, 3, 5)) * 2 + 1
    vmapped = nn.vmap(
        bnlab.linen.BatchNorm,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
        in_axes=0,
        out_axes=0,
    )(use_running_average=False, axis_name="batch")
    variables = vmapped.init(jax.random.key(3), x)
    y, upd = vmapped.apply(variables, x, mutable=["batch_stats"])
    full = bnlab.linen.BatchNorm(use_running_average=False)
    y_full, upd_full = full.apply(variables, x.reshape(12, 5), mutable=["batch_stats"])
    np.testing.assert_allclose(y.reshape(12, 5), y_full, atol=1e-5)
    np.testing.assert_allclose(
        upd["batch_stats"]["var"], upd_full["batch_stats"]["var"], rtol=1e-5
    )


def test_bind_vs_apply():
    # Flax's version trains on one example of shape (4,); that has no batch
    # statistics (see the last lines), so the same check runs on a batch.
    x = jax.random.normal(jax.random.key(4), (3, 4))
    bn = bnlab.linen.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(5), x)
    y_apply, upd = bn.apply(variables, x, mutable=["batch_stats"])
    bound = bn.bind(variables, mutable=["batch_stats"])
    y_bind = bound(x)
    np.testing.assert_allclose(y_apply, y_bind)
    np.testing.assert_allclose(
        upd["batch_stats"]["mean"], bound.variables["batch_stats"]["mean"]
    )
    # One value per feature: Flax's output (the bias) and unchanged running
    # statistics, with a warning (the pure function raises instead).
    with pytest.warns(UserWarning, match="one value per feature"):
        y1, upd1 = bn.apply(variables, jnp.ones((1, 4)), mutable=["batch_stats"])
    np.testing.assert_array_equal(y1, np.zeros((1, 4)))
    for k in ("mean", "var"):
        np.testing.assert_array_equal(
            upd1["batch_stats"][k], variables["batch_stats"][k]
        )


def test_init_does_not_update_stats_and_accepts_single_example():
    bn = bnlab.linen.BatchNorm(use_running_average=False, axis_name="unbound")
    variables = bn.init(jax.random.key(0), jnp.ones((1, 6)) * 5)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))


def test_same_variable_tree_and_flax_checkpoint_loads():
    x = jax.random.normal(jax.random.key(6), (8, 5, 5, 3))
    for kw in [{}, {"use_scale": False}, {"use_bias": False}, {"axis": (1, 3)}]:
        f = nn.BatchNorm(use_running_average=False, **kw)
        b = bnlab.linen.BatchNorm(use_running_average=False, **kw)
        vf, vb = f.init(jax.random.key(0), x), b.init(jax.random.key(0), x)
        assert jax.tree.structure(vf) == jax.tree.structure(vb)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), vf) == jax.tree.map(
            lambda a: (a.shape, a.dtype), vb
        )
    # Flax-trained variables give the same eval outputs through bnlab.
    f = nn.BatchNorm(use_fast_variance=False)
    v = f.init(jax.random.key(0), x, use_running_average=False)
    _, upd = f.apply(v, x * 3 + 1, use_running_average=False, mutable=["batch_stats"])
    v = {**v, **upd}
    y_f = f.apply(v, x, use_running_average=True)
    y_b = bnlab.linen.BatchNorm().apply(v, x, use_running_average=True)
    np.testing.assert_allclose(y_b, y_f, atol=1e-6)


def test_all_flax_fields_are_accepted():
    bn = bnlab.linen.BatchNorm(
        use_running_average=False,
        use_fast_variance=True,
        force_float32_reductions=False,
        param_dtype=jnp.bfloat16,
        dtype=jnp.float32,
    )
    v = bn.init(jax.random.key(0), jnp.ones((4, 3)))
    assert v["batch_stats"]["mean"].dtype == jnp.bfloat16  # as Flax
    y, _ = bn.apply(v, jnp.arange(12.0).reshape(4, 3), mutable=["batch_stats"])
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("train", [True, False])
def test_nnx_equals_linen(train):  # flax nnx normalization test: NNX vs Linen
    x = jax.random.normal(jax.random.key(7), (10, 6)) * 4 + 2
    lin = bnlab.linen.BatchNorm(use_running_average=not train, momentum=0.9)
    variables = lin.init(jax.random.key(0), x)
    y_l, upd = lin.apply(variables, x, mutable=["batch_stats"])
    mod = bnlab.nnx.BatchNorm(
        6, use_running_average=not train, momentum=0.9, rngs=nnx.Rngs(0)
    )
    y_n = nnx.jit(lambda m, x: m(x))(mod, x)
    np.testing.assert_allclose(y_n, y_l, atol=1e-6)
    np.testing.assert_allclose(mod.mean[...], upd["batch_stats"]["mean"], atol=1e-6)
    np.testing.assert_allclose(mod.var[...], upd["batch_stats"]["var"], atol=1e-6)


def test_nnx_matches_flax_nnx_and_train_eval_view():
    x = jax.random.normal(jax.random.key(8), (16, 4)) * 3 - 1
    ours = bnlab.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(4, use_fast_variance=False, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], atol=1e-6)
    ours.eval()
    assert ours.use_running_average is True
    before = ours.mean[...]
    ours(x)
    np.testing.assert_array_equal(ours.mean[...], before)
    ours.train()
    assert ours.use_running_average is False
    view = nnx.view(ours, use_running_average=True)
    assert view.use_running_average is True


def test_nnx_bf16_dtype_uses_unrounded_input():
    x = 300.0 + jax.random.normal(jax.random.key(9), (512, 2))
    ours = bnlab.nnx.BatchNorm(2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ours(x)
    true_var = np.asarray(x, np.float64).var(0)
    np.testing.assert_allclose((ours.var[...] - 0.99) / 0.01, true_var, rtol=1e-3)
