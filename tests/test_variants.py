"""Research variants: ghost BN, batch renormalization, folding, frozen BN,
against float64 references and plain BN, also under sync.

Outputs are compared in float32 ulps of the largest expected value
(``ref.assert_close_ulps``; see tests/test_batch_norm.py for the budget of
16 ulps: the variance's relative error c * 2**-24 plus a few roundings), so
the tolerances hold for any summation order (CPU vector width, GPU).
"""

import functools

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

# ------------------------------------------------------------------ ghost BN


def _ghost_ref(x, g, mask=None):
    """Float64 BN of each contiguous group of g examples with that group's own
    moments (valid positions only); a feature with fewer than 2 valid values
    in a group uses the (fresh) running statistics, 0 and 1."""
    x = np.asarray(x, np.float64)
    red = tuple(range(x.ndim - 1))
    outs = []
    for i in range(0, x.shape[0], g):
        m = None if mask is None else np.asarray(mask)[i : i + g]
        mean, var, n = ref.moments(x[i : i + g], red, m)
        mean, var = np.where(n >= 2, mean, 0.0), np.where(n >= 2, var, 1.0)
        outs.append(ref.batch_norm(x[i : i + g], mean, var, red))
    return np.concatenate(outs)


@pytest.mark.parametrize("shape,g", [((24, 5), 4), ((12, 3, 3, 4), 3), ((8, 6), 8)])
def test_ghost_equals_bn_on_each_sub_batch_and_stats_are_the_whole_batch(shape, g):
    x = jax.random.normal(jax.random.key(0), shape) * 3 + 50
    x = x + jnp.arange(shape[0], dtype=jnp.float32).reshape(
        (-1,) + (1,) * (len(shape) - 1)
    )  # the groups differ
    stats = bnlab.init_batch_stats(shape[-1])
    y, new = jax.jit(
        lambda x: bnlab.batch_norm(x, stats, train=True, ghost_size=g, momentum=0.0)
    )(x)
    ref.assert_close_ulps(y, _ghost_ref(x, g), 16)
    red = tuple(range(len(shape) - 1))
    mean, var, _ = ref.moments(x, red)  # the exact statistics of the whole batch
    np.testing.assert_allclose(np.asarray(new.mean, np.float64), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var, np.float64), var, rtol=1e-5)


def test_ghost_gradients_equal_per_sub_batch_gradients():
    x = jax.random.normal(jax.random.key(1), (12, 4)) + 3
    w = jax.random.normal(jax.random.key(2), (12, 4))
    g = jnp.linspace(0.5, 2, 4)
    stats = bnlab.init_batch_stats(4)

    def ghost(x, g):
        return jnp.sum(
            jnp.sin(bnlab.batch_norm(x, stats, g, train=True, ghost_size=4)[0]) * w
        )

    def split(x, g):
        parts = [
            bnlab.batch_norm(x[i : i + 4], stats, g, train=True)[0] for i in (0, 4, 8)
        ]
        return jnp.sum(jnp.sin(jnp.concatenate(parts)) * w)

    for a, b in zip(
        jax.grad(ghost, (0, 1))(x, g), jax.grad(split, (0, 1))(x, g), strict=True
    ):
        ref.assert_close_ulps(a, b, 16)  # the same sums, another order


def test_ghost_with_a_mask():
    x = jax.random.normal(jax.random.key(3), (16, 3)) * 2 + 7
    mask = jax.random.bernoulli(jax.random.key(4), 0.7, (16, 3)).at[::4].set(True)
    y, _ = bnlab.batch_norm(
        x, bnlab.init_batch_stats(3), train=True, ghost_size=4, mask=mask
    )
    m = np.asarray(mask)
    ref.assert_close_ulps(y, _ghost_ref(x, 4, mask), 16, where=m)


def test_ghost_under_pmap_stays_on_the_device_and_stats_are_global():
    x = jax.random.normal(jax.random.key(5), (32, 3)) * 2 + 5
    stats = bnlab.init_batch_stats(3)
    y, new = jax.pmap(
        lambda x: bnlab.batch_norm(
            x, stats, train=True, ghost_size=2, axis_name="d", momentum=0.0
        ),
        axis_name="d",
    )(parallel.split_for_pmap(x))
    ref.assert_close_ulps(y.reshape(32, 3), _ghost_ref(x, 2), 16)
    mean, var, _ = ref.moments(x, (0,))
    new = parallel.unreplicate(new)
    np.testing.assert_allclose(np.asarray(new.var, np.float64), var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.mean, np.float64), mean, rtol=1e-6)


def test_ghost_errors():
    s = bnlab.init_batch_stats(3)
    with pytest.raises(ValueError, match=r"ghost_size=5 does not divide the 12"):
        bnlab.batch_norm(jnp.ones((12, 3)), s, train=True, ghost_size=5)
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        bnlab.batch_norm(jnp.ones((3, 12)), s, train=True, ghost_size=2, axis=0)
    with pytest.raises(ValueError, match="1 value per feature per ghost batch"):
        bnlab.batch_norm(jnp.ones((12, 3)), s, train=True, ghost_size=1)


# ------------------------------------------------------------- batch renorm


def _renorm_ref(x, mean_r, var_r, g, b, r_max, d_max, eps=1e-5):
    x = np.asarray(x, np.float64)
    mu, var, _ = ref.moments(x, (0,))
    sb, s = np.sqrt(var + eps), np.sqrt(np.asarray(var_r, np.float64) + eps)
    r = np.clip(sb / s, 1 / r_max, r_max)
    d = np.clip((mu - np.asarray(mean_r, np.float64)) / s, -d_max, d_max)
    return ((x - mu) / sb * r + d) * np.asarray(g) + np.asarray(b)


@pytest.mark.parametrize("r_max,d_max", [(3.0, 5.0), (1.5, 0.5), (1.0, 0.0)])
def test_renorm_matches_the_papers_formula(r_max, d_max):
    x = jax.random.normal(jax.random.key(6), (32, 4)) * 2 + 1
    stats = bnlab.BatchStats(
        jnp.array([0.0, 3.0, 1.0, -2.0]), jnp.array([1.0, 0.3, 4.0, 9.0])
    )
    g, b = jnp.linspace(0.5, 1.5, 4), jnp.linspace(-1, 1, 4)
    y, new = jax.jit(
        lambda x: bnlab.batch_renorm(
            x, stats, g, b, train=True, r_max=r_max, d_max=d_max
        )
    )(x)
    ref.assert_close_ulps(
        y, _renorm_ref(x, stats.mean, stats.var, g, b, r_max, d_max), 16
    )
    _, bn_stats = bnlab.batch_norm(x, stats, g, b, train=True)
    np.testing.assert_allclose(new.mean, bn_stats.mean)  # updated as batch_norm
    np.testing.assert_allclose(new.var, bn_stats.var)


@pytest.mark.parametrize(
    "r_max,d_max", [(0.5, 5.0), (np.nan, 5.0), (3.0, -1.0), (3.0, np.nan)]
)
def test_traced_invalid_renorm_bounds_act_as_the_tightest_valid_ones(r_max, d_max):
    # r_max < 1 would invert jnp.clip's bounds and NaN would poison r / d;
    # documented: such a traced bound acts as r_max = 1 (resp. d_max = 0).
    x = jax.random.normal(jax.random.key(6), (32, 4)) * 2 + 1
    stats = bnlab.BatchStats(
        jnp.array([0.0, 3.0, 1.0, -2.0]), jnp.array([1.0, 0.3, 4.0, 9.0])
    )
    y, _ = jax.jit(
        lambda x, r, d: bnlab.batch_renorm(x, stats, train=True, r_max=r, d_max=d)
    )(x, r_max, d_max)
    r_ok = r_max if r_max >= 1 else 1.0
    d_ok = d_max if d_max >= 0 else 0.0
    expected = _renorm_ref(x, stats.mean, stats.var, 1.0, 0.0, r_ok, d_ok)
    ref.assert_close_ulps(y, expected, 16)


def test_renorm_with_r_max_1_d_max_0_is_batch_norm_gradients_included():
    x = jax.random.normal(jax.random.key(7), (16, 3)) + 4
    stats = bnlab.BatchStats(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 3.0, 0.5]))
    g = jnp.array([1.0, 2.0, 0.5])

    def loss(f, x, g):
        return jnp.sum(jnp.sin(f(x, stats, g, train=True)[0]) * jnp.arange(3.0)[None])

    renorm = functools.partial(bnlab.batch_renorm, r_max=1.0, d_max=0.0)
    for a, b in zip(
        jax.grad(functools.partial(loss, renorm), (0, 1))(x, g),
        jax.grad(functools.partial(loss, bnlab.batch_norm), (0, 1))(x, g),
        strict=True,
    ):
        ref.assert_close_ulps(a, b, 16)  # the same sums, another order


def test_renorm_train_output_equals_inference_when_batch_equals_running_stats():
    x = jax.random.normal(jax.random.key(8), (64, 5)) * 3 + 2
    mean, var, _ = ref.moments(x, (0,))
    stats = bnlab.BatchStats(
        jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
    )
    g, b = jnp.full(5, 1.3), jnp.full(5, 0.2)
    y_train, _ = bnlab.batch_renorm(x, stats, g, b, train=True)
    y_eval, _ = bnlab.batch_renorm(x, stats, g, b, train=False)
    # the float32-rounded statistics make r = 1 and d = 0 up to an ulp
    ref.assert_close_ulps(y_train, y_eval, 16)


def test_renorm_r_and_d_carry_no_gradient():
    # d y / d x of renorm = r * (BN's d y / d x) with r, d constants.
    x = jax.random.normal(jax.random.key(9), (16, 2)) * 2
    stats = bnlab.BatchStats(jnp.array([5.0, -5.0]), jnp.array([16.0, 0.01]))
    w = jax.random.normal(jax.random.key(10), (16, 2))
    dx = jax.grad(lambda x: jnp.sum(bnlab.batch_renorm(x, stats, train=True)[0] * w))(x)
    dx_bn = jax.grad(lambda x: jnp.sum(bnlab.batch_norm(x, stats, train=True)[0] * w))(
        x
    )
    var = np.asarray(x, np.float64).var(0)
    r = np.clip(np.sqrt(var + 1e-5) / np.sqrt(np.array([16.0, 0.01]) + 1e-5), 1 / 3, 3)
    ref.assert_close_ulps(dx, np.asarray(dx_bn, np.float64) * r, 16)


def test_renorm_synced_equals_single_device_full_batch():
    x = jax.random.normal(jax.random.key(11), (32, 3)) + 2
    stats = bnlab.BatchStats(jnp.ones(3), jnp.full(3, 2.0))
    y1, s1 = bnlab.batch_renorm(x, stats, train=True)
    y8, s8 = jax.pmap(
        lambda x: bnlab.batch_renorm(x, stats, train=True, axis_name="d"), axis_name="d"
    )(parallel.split_for_pmap(x))
    ref.assert_close_ulps(y8.reshape(32, 3), y1, 16)  # Chan merge vs one pass
    np.testing.assert_allclose(parallel.unreplicate(s8).var, s1.var, rtol=1e-5)


def test_renorm_schedules_and_traced_bounds():
    r, d = bnlab.renorm_schedules(warmup_steps=10, r_max_step=20, d_max_step=30)
    assert [float(r(s)) for s in (0, 10, 15, 20, 99)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [float(d(s)) for s in (0, 10, 20, 30)] == [0.0, 0.0, 2.5, 5.0]
    x = jax.random.normal(jax.random.key(12), (8, 2))
    f = jax.jit(
        lambda x, step: bnlab.batch_renorm(
            x, bnlab.init_batch_stats(2), train=True, r_max=r(step), d_max=d(step)
        )[0]
    )
    ref.assert_close_ulps(
        f(x, 0), bnlab.batch_norm(x, bnlab.init_batch_stats(2), train=True)[0], 16
    )
    with pytest.raises(ValueError, match=r"r_max=0.5 must be >= 1"):
        bnlab.batch_renorm(x, bnlab.init_batch_stats(2), train=True, r_max=0.5)


def test_renorm_as_a_module_option():
    x = jax.random.normal(jax.random.key(13), (8, 3)) + 1
    bn = bnlab.linen.BatchNorm(
        use_running_average=False, renorm=True, r_max=1.0, d_max=0.0
    )
    v = bn.init(jax.random.key(0), x)
    y, _ = bn.apply(v, x, mutable=["batch_stats"])
    y_bn, _ = bnlab.linen.BatchNorm(use_running_average=False).apply(
        v, x, mutable=["batch_stats"]
    )
    ref.assert_close_ulps(y, y_bn, 16)
    y2, _ = bn.apply(v, x, mutable=["batch_stats"], r_max=3.0, d_max=5.0)
    ref_y = _renorm_ref(
        x, v["batch_stats"]["mean"], v["batch_stats"]["var"], 1.0, 0.0, 3.0, 5.0
    )
    ref.assert_close_ulps(y2, ref_y, 16)
    m = bnlab.nnx.BatchNorm(3, renorm=True, rngs=nnx.Rngs(0))
    ref.assert_close_ulps(m(x), ref_y, 16)


# ------------------------------------------------------- folding and frozen


def test_fold_into_dense_and_conv():
    key = jax.random.split(jax.random.key(14), 6)
    stats = bnlab.BatchStats(
        jax.random.normal(key[0], (8,)), jax.random.uniform(key[1], (8,)) + 0.5
    )
    g, b = jax.random.normal(key[2], (8,)), jax.random.normal(key[3], (8,))
    x = jax.random.normal(key[4], (4, 6, 6, 3))
    for layer, inp in ((nn.Dense(8), x.reshape(4, -1)), (nn.Conv(8, (3, 3)), x)):
        v = layer.init(key[5], inp)
        p = v["params"]
        y, _ = bnlab.batch_norm(layer.apply(v, inp), stats, g, b, train=False)
        k2, b2 = bnlab.fold_batch_norm(p["kernel"], p["bias"], stats, g, b)
        y2 = layer.apply({"params": {"kernel": k2, "bias": b2}}, inp)
        # folding reorders the arithmetic: (x @ k - mean) * s vs x @ (k * s)
        # + (b - mean) * s, and the matmul rounds relative to sum |x k|, a
        # few times max |y| here (a forgotten epsilon would cost ~40 ulps)
        ref.assert_close_ulps(y2, y, 32)
    with pytest.raises(ValueError, match=r"stats\.mean has shape"):
        bnlab.fold_batch_norm(jnp.ones((3, 4)), None, bnlab.init_batch_stats(5))


def test_frozen_bn_is_inference_bn_without_gradients_to_stats():
    x = jax.random.normal(jax.random.key(15), (6, 3))
    stats = bnlab.BatchStats(jnp.array([0.5, 1.0, -1.0]), jnp.array([2.0, 0.5, 1.0]))
    g, b = jnp.ones(3) * 2, jnp.ones(3)
    y, out = bnlab.frozen_batch_norm(x, stats, g, b)
    np.testing.assert_array_equal(y, bnlab.batch_norm(x, stats, g, b, train=False)[0])
    ref.assert_close_ulps(y, ref.batch_norm(x, stats.mean, stats.var, (0,), g, b), 8)
    jax.tree.map(np.testing.assert_array_equal, out, stats)  # returned unchanged
    # in a jitted "training" step too: the statistics never move
    _, out = jax.jit(bnlab.frozen_batch_norm)(x * 5 + 3, stats, g, b)
    jax.tree.map(np.testing.assert_array_equal, out, stats)
    grads = jax.grad(
        lambda s, g, b: jnp.sum(
            bnlab.frozen_batch_norm(x, s, g, b, freeze_affine=True)[0]
        ),
        (0, 1, 2),
    )(stats, g, b)
    for leaf in jax.tree.leaves(grads):
        np.testing.assert_array_equal(leaf, 0.0)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
        return bnlab.linen.BatchNorm(use_running_average=not train)(nn.relu(x) * 3)


def _net_and_data():
    net = _Net()
    x = jax.random.normal(jax.random.key(40), (8, 3)) * 2 + 5
    v = net.init(jax.random.key(0), x, train=False)
    return net, x, v


def _is_frozen(net, v, x, out) -> bool:
    """Whether ``out = (y, updates)`` is the frozen result (eval outputs,
    statistics unchanged), else asserts that it is the training result."""
    y, upd = out
    same = jax.tree.map(np.array_equal, upd["batch_stats"], v["batch_stats"])
    if all(jax.tree.leaves(same)):  # a training step moves them (mean 5)
        ref.assert_close_ulps(y, net.apply(v, x, train=False), 8)
        return True
    y_train, upd_train = net.apply(v, x, train=True, mutable=["batch_stats"])
    ref.assert_close_ulps(y, y_train, 8)  # jit and eager: rounding apart
    jax.tree.map(lambda a, b: ref.assert_close_ulps(a, b, 8), upd, upd_train)
    return False


def test_frozen_bn_context_applies_to_a_function_jitted_before_it():
    net, x, v = _net_and_data()
    f = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))
    assert not _is_frozen(net, v, x, f(v, x))
    with bnlab.linen.frozen_bn():
        assert _is_frozen(net, v, x, f(v, x))  # not the cached unfrozen trace
    assert not _is_frozen(net, v, x, f(v, x))


def test_a_function_first_traced_inside_frozen_bn_is_unfrozen_after_it():
    net, x, v = _net_and_data()
    f = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))
    with bnlab.linen.frozen_bn():
        assert _is_frozen(net, v, x, f(v, x))
    assert not _is_frozen(net, v, x, f(v, x))  # not the cached frozen trace


def test_frozen_bn_freeze_affine_is_part_of_what_jit_sees():
    net, x, v = _net_and_data()
    grad = jax.jit(
        jax.grad(
            lambda p: jnp.sum(
                net.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0]
                * jnp.arange(3.0)[None]
            )
        )
    )
    scale = lambda g: float(jnp.abs(g["BatchNorm_1"]["scale"]).sum())  # noqa: E731
    with bnlab.linen.frozen_bn(freeze_affine=True):
        assert scale(grad(v["params"])) == 0.0
    with bnlab.linen.frozen_bn():
        assert scale(grad(v["params"])) > 0.0


def test_nnx_freeze_after_a_jitted_call_retraces():
    m = bnlab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(41), (8, 3)) + 4
    f = nnx.jit(lambda m, x: m(x))
    f(m, x)
    before = m.mean[...]
    assert float(jnp.abs(before).sum()) > 0
    bnlab.nnx.freeze(m)
    y = f(m, x)
    np.testing.assert_array_equal(m.mean[...], before)
    np.testing.assert_array_equal(
        y,
        bnlab.batch_norm(x, bnlab.BatchStats(m.mean[...], m.var[...]), train=False)[0],
    )


def test_freezing_every_bn_of_a_linen_and_an_nnx_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4)(x)
            x = bnlab.linen.BatchNorm(use_running_average=not train)(x)
            return bnlab.linen.BatchNorm(use_running_average=not train)(nn.relu(x))

    net, x = Net(), jax.random.normal(jax.random.key(16), (8, 3)) + 2
    v = net.init(jax.random.key(0), x, train=False)
    with bnlab.linen.frozen_bn(freeze_affine=True):
        y, upd = jax.jit(
            lambda v: net.apply(v, x, train=True, mutable=["batch_stats"])
        )(v)
        grads = jax.grad(
            lambda p: jnp.sum(
                net.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0]
            )
        )(v["params"])
    np.testing.assert_array_equal(y, net.apply(v, x, train=False))
    assert jax.tree.all(
        jax.tree.map(
            lambda a, b: bool(jnp.all(a == b)), upd["batch_stats"], v["batch_stats"]
        )
    )
    assert float(jnp.abs(grads["BatchNorm_0"]["scale"]).sum()) == 0.0
    assert float(jnp.abs(grads["Dense_0"]["kernel"]).sum()) > 0.0

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.a = bnlab.nnx.BatchNorm(3, rngs=rngs)
            self.b = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.b(self.a(x))

    m = bnlab.nnx.freeze(NNXNet(nnx.Rngs(0)))
    m(x)
    assert float(jnp.abs(m.a.mean[...]).sum()) == 0.0
    assert float(jnp.abs(m.b.mean[...]).sum()) == 0.0


# ------------------------------------------------------------ in training


def _one_step(style, group, norm="before"):
    from bnlab.train import Config

    config = Config(
        parallel=style, batch_size=32, depth=2, width=8, bn_group_size=group, norm=norm
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8, 8, 1)) + np.arange(32)[:, None, None, None] / 8
    x, y = x.astype(np.float32), rng.integers(0, 10, 32).astype(np.int32)
    with jax.numpy_dtype_promotion("standard"):
        _, _, new = ref.one_train_step(config, x, y)
    return jax.tree.map(lambda a: a[0], new)  # the one arm


def test_bn_groups_shard_map_2d_mesh_equals_pmap_groups():
    sm = _one_step("shard_map", 2)
    pm = _one_step("pmap", 2)
    full = _one_step("shard_map", 0)
    for a, b in zip(jax.tree.leaves(sm), jax.tree.leaves(pm), strict=True):
        ref.assert_close_ulps(a, b, 16)  # one SGD step: rounding apart
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(sm.variables["params"]),
            jax.tree.leaves(full.variables["params"]),
            strict=True,
        )
    )
    assert diff > 1e-4  # groups of 2 devices really normalize differently


def _variant_reference(norm, x, stats, scale, bias, momentum, epsilon):
    """Float64 ``(y, new_stats)`` of one BN layer in training, per variant:
    frozen = eval with the running statistics and no update; ghost:2 = each
    pair of examples normalized with its own moments, the update with the
    whole batch's; renorm = the paper's r / d formula (r_max 3, d_max 5)."""
    mean_r, var_r = np.asarray(stats["mean"]), np.asarray(stats["var"])
    if norm == "frozen":
        y = ref.batch_norm(x, mean_r, var_r, (0,), scale, bias, epsilon)
        return y, (mean_r, var_r)
    mean, var, _ = ref.moments(x, (0,))
    new = (
        momentum * mean_r + (1 - momentum) * mean,
        momentum * var_r + (1 - momentum) * var,
    )
    if norm == "renorm":
        return _renorm_ref(x, mean_r, var_r, scale, bias, 3.0, 5.0, epsilon), new
    parts = []
    for i in range(0, x.shape[0], 2):
        m, v, _ = ref.moments(x[i : i + 2], (0,))
        parts.append(ref.batch_norm(x[i : i + 2], m, v, (0,), scale, bias, epsilon))
    return np.concatenate(parts), new


@pytest.mark.parametrize("norm", ["ghost:2@after", "renorm", "frozen"])
def test_variants_as_config_values(norm):
    # Each BN layer of the model the config builds computes its variant:
    # its input, variables and output are recorded in one training forward
    # and checked against that variant's own float64 reference.
    from bnlab.train import Config, build_model

    config = Config(batch_size=32, depth=2, width=8, norm=norm)
    model = build_model(config, 10, None)
    x = np.random.default_rng(0).standard_normal((32, 8, 8, 1)).astype(np.float32)
    v = model.init(jax.random.key(0), x[:2], train=False)
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.5, v["batch_stats"])}
    calls = []

    def record(next_fun, args, kwargs, context):
        if not (
            isinstance(context.module, bnlab.linen.BatchNorm)
            and context.method_name == "__call__"
        ):
            return next_fun(*args, **kwargs)
        before = jax.tree.map(np.asarray, dict(context.module.variables))
        y = next_fun(*args, **kwargs)
        after = jax.tree.map(np.asarray, dict(context.module.variables["batch_stats"]))
        calls.append((np.asarray(args[0], np.float64), before, np.asarray(y), after))
        return y

    with nn.intercept_methods(record):
        model.apply(v, x, train=True, mutable=["batch_stats"])
    assert len(calls) == config.depth
    variant = norm.split("@")[0]
    for x_in, before, y, after in calls:
        p = before["params"]
        y_ref, (mean_ref, var_ref) = _variant_reference(
            variant,
            x_in,
            before["batch_stats"],
            p["scale"],
            p["bias"],
            config.bn_momentum,
            config.bn_epsilon,
        )
        ref.assert_close_ulps(y, y_ref, 16, err_msg=norm)
        if variant == "frozen":
            jax.tree.map(np.testing.assert_array_equal, after, before["batch_stats"])
        else:
            np.testing.assert_allclose(after["mean"], mean_ref, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(after["var"], var_ref, rtol=1e-5)
    # and through a sharded train step: frozen statistics stay at their
    # initial 0 / 1, the others move; everything finite
    state = _one_step("shard_map", 0, norm)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(state))
    means = [np.asarray(a) for a in jax.tree.leaves(state.variables["batch_stats"])]
    moved = any(not np.array_equal(a, np.round(a)) for a in means)
    assert moved == (variant != "frozen")


def test_bad_variant_spellings_and_group_sizes():
    from bnlab.train import Config, ConfigError

    for norm, match in (("ghost:0", "positive integer"), ("batchnorm", "not one of")):
        with pytest.raises(ConfigError, match=match):
            Config(norm=norm)
    with pytest.raises(ConfigError, match="needs parallel='pmap' or 'shard_map'"):
        Config(bn_group_size=2)
    with pytest.raises(ConfigError, match="bn_group_size=3 does not divide the 8"):
        from bnlab.train.presets import layout_of

        layout_of(Config(parallel="shard_map", bn_group_size=3))
