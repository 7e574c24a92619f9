"""Sync BN across 8 simulated CPU devices == single-device full batch.

Every style (pmap, shard_map, vmap, sharded jit) is compared with bnlab on one
device over the whole batch: outputs, new running statistics and gradients
w.r.t. x, scale and bias, at mean 1e3 (std 1) from a fresh state.

Results are compared in float32 ulps of the largest expected value
(``ref.assert_close_ulps``; budget in tests/test_batch_norm.py): the devices'
Chan merge and the single pass sum in different orders, which moves each
result by a few ulps on any CPU or GPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnlab
import bnlab.linen
from benchmarks.jaxpr_tools import count_collectives, primitive_names
from bnlab import parallel
from tests import reference as ref

D = 8
B, C = 64, 6


def _data(c=1e3, s=1.0):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = (c + s * jax.random.normal(k1, (B, C))).astype(jnp.float32)
    w = jax.random.normal(k2, (B, C))  # weights of a non-trivial loss
    g = 1.0 + 0.1 * jax.random.normal(k3, (C,))
    b = jnp.linspace(-0.5, 0.5, C)
    return x, w, g, b


def _local_loss(x, w, g, b, stats, axis_name):
    y, new = bnlab.batch_norm(x, stats, g, b, train=True, axis_name=axis_name)
    # Sum over the local shard / B: local losses add up to the full-batch mean.
    return jnp.sum(jnp.sin(y) * w) / B, (y, new)


def _single(x, w, g, b, stats):
    grad = jax.grad(_local_loss, argnums=(0, 2, 3), has_aux=True)
    (dx, dg, db), (y, new) = jax.jit(grad, static_argnums=5)(x, w, g, b, stats, None)
    return y, new, dx, dg, db


def _mesh(shape=(D,), names=("batch",)):
    return jax.make_mesh(shape, names)


def run_pmap(x, w, g, b, stats):
    grad = jax.grad(_local_loss, argnums=(0, 2, 3), has_aux=True)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(0, 0, None, None, None))
    def step(x, w, g, b, stats):
        (dx, dg, db), (y, new) = grad(x, w, g, b, stats, "batch")
        return y, new, dx, jax.lax.psum(dg, "batch"), jax.lax.psum(db, "batch")

    xs, ws = parallel.split_for_pmap((x, w))
    y, new, dx, dg, db = step(xs, ws, g, b, stats)
    return (
        y.reshape(B, C),
        parallel.unreplicate(new),
        dx.reshape(B, C),
        parallel.unreplicate(dg),
        parallel.unreplicate(db),
    )


def run_shard_map(x, w, g, b, stats):
    mesh = _mesh()

    def global_loss(x, w, g, b, stats):
        loss, aux = _local_loss(x, w, g, b, stats, "batch")
        return jax.lax.psum(loss, "batch"), aux

    def step(x, w, g, b, stats):
        (dx, dg, db), (y, new) = jax.grad(global_loss, (0, 2, 3), has_aux=True)(
            x, w, g, b, stats
        )
        return y, new, dx, dg, db

    f = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P("batch"), P("batch"), P(), P(), P()),
            out_specs=(P("batch"), P(), P("batch"), P(), P()),
        )
    )
    xs, ws = parallel.shard_batch((x, w), mesh)
    return f(xs, ws, *parallel.replicate((g, b, stats), mesh))


def run_vmap(x, w, g, b, stats):
    def total(x, w, g, b):
        losses, aux = jax.vmap(
            lambda x, w: _local_loss(x, w, g, b, stats, "batch"), axis_name="batch"
        )(x, w)
        return jnp.sum(losses), aux

    xs, ws = parallel.split_for_pmap((x, w), D)
    (dx, dg, db), (y, new) = jax.jit(jax.grad(total, (0, 2, 3), has_aux=True))(
        xs, ws, g, b
    )
    return y.reshape(B, C), parallel.unreplicate(new), dx.reshape(B, C), dg, db


def run_sharded_jit(x, w, g, b, stats):
    mesh = _mesh()
    xs, ws = parallel.shard_batch((x, w), mesh)
    grad = jax.grad(_local_loss, argnums=(0, 2, 3), has_aux=True)
    (dx, dg, db), (y, new) = jax.jit(grad, static_argnums=5)(
        xs, ws, *parallel.replicate((g, b, stats), mesh), None
    )
    assert xs.sharding.spec == P("batch")
    return y, new, dx, dg, db


STYLES = {
    "pmap": run_pmap,
    "shard_map": run_shard_map,
    "vmap": run_vmap,
    "jit": run_sharded_jit,
}


@pytest.mark.parametrize("style", list(STYLES))
def test_sync_equals_single_device_full_batch(style):
    x, w, g, b = _data()
    stats = bnlab.init_batch_stats(C)
    expected = _single(x, w, g, b, stats)
    got = STYLES[style](x, w, g, b, stats)
    names = ["y", "stats", "dx", "dscale", "dbias"]
    for name, e, o in zip(names, expected, got, strict=True):
        for ee, oo in zip(jax.tree.leaves(e), jax.tree.leaves(o), strict=True):
            ref.assert_close_ulps(oo, ee, 16, err_msg=f"{style} {name}")
    # and the single-device result itself is exact (float64 reference)
    mean, var, _ = ref.moments(x, (0,))
    ref.assert_close_ulps(expected[0], ref.batch_norm(x, mean, var, (0,), g, b), 16)


def test_uneven_masks_merge_by_count_not_by_device():
    # Device d holds the value d; valid counts 1,1,2,3 (and 0 on the others).
    counts = [1, 1, 2, 3, 0, 0, 2, 1]
    x = jnp.broadcast_to(jnp.arange(D, dtype=jnp.float32)[:, None, None], (D, 4, 2))
    mask = jnp.arange(4)[None, :, None] < jnp.asarray(counts)[:, None, None]
    stats = bnlab.init_batch_stats(2)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(0, 0, None))
    def ours(x, m, stats):
        return bnlab.batch_norm(
            x, stats, train=True, axis_name="batch", mask=m, momentum=0.0
        )

    y, new = ours(x, mask, stats)
    flat_x, flat_m = np.asarray(x).reshape(-1, 2), np.asarray(mask).reshape(-1, 1)
    mean, var, _ = ref.moments(flat_x, (0,), flat_m)
    np.testing.assert_allclose(parallel.unreplicate(new).mean, mean, rtol=1e-6)
    np.testing.assert_allclose(parallel.unreplicate(new).var, var, rtol=1e-5)
    y_single, _ = bnlab.batch_norm(flat_x, stats, train=True, mask=flat_m, momentum=0.0)
    valid = np.broadcast_to(flat_m, flat_x.shape)
    ref.assert_close_ulps(np.asarray(y).reshape(-1, 2), y_single, 16, where=valid)
    # The known Flax failure: it averages per-device means (google/flax#2417).
    bn = nn.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.0)
    v = bn.init(jax.random.key(0), x[0])
    first4 = functools.partial(jax.pmap, axis_name="batch", devices=jax.devices()[:4])
    flax_stats = first4(
        lambda x, m: bn.apply(v, x, mask=m, mutable=["batch_stats"])[1]
    )(x[:4], mask[:4])
    ours4 = first4(
        lambda x, m: bnlab.batch_norm(
            x, stats, train=True, axis_name="batch", mask=m, momentum=0.0
        )[1]
    )(x[:4], mask[:4])
    assert float(flax_stats["batch_stats"]["mean"][0, 0]) == pytest.approx(1.5)
    assert float(ours4.mean[0, 0]) == pytest.approx(2.0)


def _bn_jaxprs(style, stats, fast=None):
    """jaxprs of a train-mode BN forward and its gradient w.r.t. x, per style.

    The gradient is of a local loss, so only BN's own collectives are counted
    (not the reduction of parameter gradients, which any step needs).
    """
    x = jnp.ones((D, 8, C))
    g, b = jnp.ones(C), jnp.zeros(C)
    if fast is None:

        def fwd(x):
            return bnlab.batch_norm(x, stats, g, b, train=True, axis_name="batch")[0]
    else:
        mod = nn.BatchNorm(
            use_running_average=False, axis_name="batch", use_fast_variance=fast
        )
        v = {"params": {"scale": g, "bias": b}, "batch_stats": stats._asdict()}

        def fwd(x):
            return mod.apply(v, x, mutable=["batch_stats"])[0]

    def fwd_bwd(x):
        return jax.grad(lambda x: jnp.sum(jnp.sin(fwd(x))))(x)

    if style == "pmap":
        wrap = functools.partial(jax.pmap, axis_name="batch")
        return [jax.make_jaxpr(wrap(f))(x) for f in (fwd, fwd_bwd)]
    mesh = _mesh()
    xs = jax.device_put(x.reshape(D * 8, C), NamedSharding(mesh, P("batch")))
    return [
        jax.make_jaxpr(
            jax.shard_map(f, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
        )(xs)
        for f in (fwd, fwd_bwd)
    ]


@pytest.mark.parametrize("style", ["pmap", "shard_map"])
def test_collective_counts(style):
    stats = bnlab.init_batch_stats(C)
    fwd, fwd_bwd = _bn_jaxprs(style, stats)
    # One all_gather of the per-device moments forward, one psum backward, no
    # branch: the same whatever the running statistics are.
    assert count_collectives(fwd) == {"always": 1, "conditional": 0}
    assert count_collectives(fwd_bwd) == {"always": 2, "conditional": 0}
    hostile = bnlab.BatchStats(jnp.full((C,), jnp.nan), jnp.full((C,), jnp.inf))
    assert count_collectives(_bn_jaxprs(style, hostile)[1]) == {
        "always": 2,
        "conditional": 0,
    }
    fast, _ = _bn_jaxprs(style, stats, fast=True)
    two_pass, _ = _bn_jaxprs(style, stats, fast=False)
    assert count_collectives(fast) == {"always": 1, "conditional": 0}
    assert count_collectives(two_pass) == {"always": 2, "conditional": 0}


@pytest.mark.parametrize("style", ["single", "pmap", "shard_map", "jit", "vmap"])
def test_no_branch_or_loop_in_a_train_step(style):
    # A conditional costs a device-to-host round trip per BN layer on GPU and
    # materialises its operands: a whole train step (model + BN + grads +
    # optimizer) must contain none, whatever the style.
    from bnlab.train import Config

    if style == "vmap":
        x = jax.random.normal(jax.random.key(0), (D, 8, C)) + 1e3
        f = jax.vmap(
            jax.grad(
                lambda x: jnp.sum(
                    _local_loss(
                        x,
                        x,
                        jnp.ones(C),
                        jnp.zeros(C),
                        bnlab.init_batch_stats(C),
                        "batch",
                    )[0]
                )
            ),
            axis_name="batch",
        )
        names = primitive_names(jax.make_jaxpr(f)(x))
    else:
        config = Config(parallel=style, batch_size=16, depth=2, width=8)
        xb = np.ones((16, 8, 8, 1), np.float32)
        yb = np.zeros((16,), np.int32)
        with jax.numpy_dtype_promotion("standard"):  # optax schedules mix ints
            step, args, _ = ref.one_train_step(config, xb, yb)
            names = primitive_names(jax.make_jaxpr(step)(*args))
    assert "rsqrt" in names  # sanity: the walk reached BN inside the step
    assert not names & {"cond", "while", "switch"}, sorted(names & {"cond", "while"})


@pytest.mark.parametrize("style", ["single", "pmap", "shard_map"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e9, 1e12, 1e20, 1e30])
def test_train_outputs_do_not_depend_on_running_stats(style, bad):
    # Hostile running statistics (NaN/Inf, or a running mean 1e9..1e30 std
    # away) change nothing in train mode beyond rounding: the shift comes from
    # the data. Compared with a fresh state on one device.
    x, w, g, b = _data(c=1e3)
    fresh = bnlab.init_batch_stats(C)
    y0, _, dx0, dg0, db0 = _single(x, w, g, b, fresh)
    hostile = bnlab.BatchStats(jnp.full((C,), bad), jnp.full((C,), bad))
    run = {"single": _single, "pmap": run_pmap, "shard_map": run_shard_map}[style]
    y, new, dx, dg, db = run(x, w, g, b, hostile)
    for name, a, e in (("y", y, y0), ("dx", dx, dx0), ("dg", dg, dg0), ("db", db, db0)):
        ref.assert_close_ulps(a, e, 16, err_msg=name)


def test_device_groups_pmap():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    x, *_ = _data(c=1e3)
    x = x.at[B // 2 :].add(50.0)  # the two groups see different data
    stats = bnlab.init_batch_stats(C)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(0, None))
    def step(x, stats):
        return bnlab.batch_norm(
            x,
            stats,
            train=True,
            axis_name="batch",
            axis_index_groups=groups,
            momentum=0.0,
        )

    y, new = step(x.reshape(D, B // D, C), stats)
    y = np.asarray(y).reshape(B, C)
    for gi, half in enumerate((slice(0, B // 2), slice(B // 2, B))):
        mean, var, _ = ref.moments(x[half], (0,))
        np.testing.assert_allclose(new.mean[gi * 4], mean, rtol=1e-6)  # ~17 eps
        np.testing.assert_allclose(new.var[gi * 4], var, rtol=1e-5)
        ref.assert_close_ulps(y[half], ref.batch_norm(x[half], mean, var, (0,)), 16)


def test_device_groups_shard_map_2d_mesh():
    mesh = _mesh((2, 4), ("replica", "bn_group"))
    x, *_ = _data(c=1e3)
    x = x.at[B // 2 :].add(50.0)
    stats = bnlab.init_batch_stats(C)

    def step(x, stats):
        y, new = bnlab.batch_norm(
            x, stats, train=True, axis_name="bn_group", momentum=0.0
        )
        return y, jax.tree.map(lambda a: a[None], new)  # one row per replica

    f = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(("replica", "bn_group")), P()),
            out_specs=(P(("replica", "bn_group")), P("replica")),
        )
    )
    y, new = f(
        parallel.shard_batch(x, mesh, ("replica", "bn_group")),
        parallel.replicate(stats, mesh),
    )
    for gi, half in enumerate((slice(0, B // 2), slice(B // 2, B))):
        mean, var, _ = ref.moments(x[half], (0,))
        np.testing.assert_allclose(np.asarray(new.mean)[gi], mean, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(new.var)[gi], var, rtol=1e-5)
        ref.assert_close_ulps(
            np.asarray(y)[half], ref.batch_norm(x[half], mean, var, (0,)), 16
        )


class _Net(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(16)(x)
        x = bnlab.linen.BatchNorm(
            use_running_average=not train, axis_name=self.axis_name
        )(x)
        return nn.Dense(3)(nn.relu(x))


def _sgd_step(style, params, stats, x, y):
    axis = "batch" if style in ("pmap", "shard_map") else None
    model = _Net(axis_name=axis)
    tx = optax.sgd(0.1)

    def loss_fn(params, stats, x, y):
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, upd["batch_stats"]

    vg = parallel.value_and_grad(loss_fn, style=style, axis_name=axis, has_aux=True)

    def step(params, stats, x, y):
        (loss, stats), grads = vg(params, stats, x, y)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), stats, loss

    if style == "pmap":
        f = jax.pmap(step, axis_name="batch", in_axes=(None, None, 0, 0), out_axes=0)
        p, s, loss = f(params, stats, *parallel.split_for_pmap((x, y)))
        return parallel.unreplicate((p, s, loss))
    if style == "shard_map":
        mesh = _mesh()
        f = jax.jit(
            jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(P(), P(), P("batch"), P("batch")),
                out_specs=(P(), P(), P()),
            )
        )
        return f(
            *parallel.replicate((params, stats), mesh),
            *parallel.shard_batch((x, y), mesh),
        )
    if style == "jit":
        mesh = _mesh()
        return jax.jit(step)(
            *parallel.replicate((params, stats), mesh),
            *parallel.shard_batch((x, y), mesh),
        )
    return jax.jit(step)(params, stats, x, y)


@pytest.mark.parametrize("style", ["pmap", "shard_map", "jit"])
def test_one_sgd_step_equals_full_batch(style):
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (B, 5)) * 2 + 3
    y = jax.random.randint(k2, (B,), 0, 3)
    variables = _Net().init(jax.random.key(2), x)
    params, stats = variables["params"], variables["batch_stats"]
    p_ref, s_ref, l_ref = _sgd_step("single", params, stats, x, y)
    p, s, loss = _sgd_step(style, params, stats, x, y)
    ref.assert_close_ulps(loss, l_ref, 16)
    # The bias of the Dense before BN has an exactly-zero gradient (BN removes
    # the mean): its new value is rounding noise of the size of the other
    # updates, which set the scale of every leaf's rounding.
    updates = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), p_ref, params)
    largest = max(jax.tree.leaves(updates))
    for a, e in zip(
        jax.tree.leaves((p, s)), jax.tree.leaves((p_ref, s_ref)), strict=True
    ):
        ref.assert_close_ulps(a, e, 16, scale=largest)
    # The traps the helper avoids are real: under shard_map, pmean(grad) would
    # be 8x too large (checked on the gradient of the output bias).


def test_wrong_gradient_rules_are_really_wrong():
    """The helper exists because the other combination is silently wrong."""
    mesh = _mesh()
    x = jax.random.normal(jax.random.key(3), (B, C)) + 2
    w = jnp.ones(C)

    def local(w, x):
        y, _ = bnlab.batch_norm(
            x, bnlab.init_batch_stats(C), w, train=True, axis_name="batch"
        )
        return jnp.mean(jnp.sin(y))

    right = parallel.value_and_grad(local, style="shard_map", axis_name="batch")

    def wrong(w, x):
        return (None, jax.lax.pmean(jax.grad(local)(w, x), "batch"))

    def run(fn):
        f = jax.shard_map(
            lambda w, x: fn(w, x)[1],
            mesh=mesh,
            in_specs=(P(), P("batch")),
            out_specs=P(),
        )
        return np.asarray(
            jax.jit(f)(parallel.replicate(w, mesh), parallel.shard_batch(x, mesh))
        )

    full = np.asarray(
        jax.grad(
            lambda w: jnp.mean(
                jnp.sin(
                    bnlab.batch_norm(x, bnlab.init_batch_stats(C), w, train=True)[0]
                )
            )
        )(w)
    )
    ref.assert_close_ulps(run(right), full, 16)
    ref.assert_close_ulps(run(wrong), D * full, 16)


def test_value_and_grad_rejects_bad_style():
    with pytest.raises(ValueError, match="not one of"):
        parallel.value_and_grad(lambda w: w, style="dp")
    with pytest.raises(ValueError, match="pass the axis_name"):
        parallel.value_and_grad(lambda w: w, style="pmap")
    with pytest.raises(ValueError, match="split over 8 devices"):
        parallel.split_for_pmap(jnp.ones((12, 2)), 8)


def test_running_stats_identical_on_every_device_after_20_steps():
    stats = bnlab.init_batch_stats(C)
    keys = jax.random.split(jax.random.key(4), 20)

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(0, 0))
    def step(x, stats):
        return bnlab.batch_norm(x, stats, train=True, axis_name="batch", momentum=0.9)[
            1
        ]

    per_device = jax.tree.map(lambda a: jnp.broadcast_to(a, (D, *a.shape)), stats)
    single = stats
    for k in keys:
        x = (1e3 + 3 * jax.random.normal(k, (B, C))).astype(jnp.float32)
        per_device = step(x.reshape(D, B // D, C), per_device)
        single = bnlab.batch_norm(x, single, train=True, momentum=0.9)[1]
    for leaf in jax.tree.leaves(per_device):
        arr = np.asarray(leaf)
        assert np.array_equal(arr, np.broadcast_to(arr[:1], arr.shape)), "diverged"
    merged = parallel.unreplicate(per_device)  # also checks equality
    # 20 updates, each a few roundings, in two summation orders
    ref.assert_close_ulps(merged.mean, single.mean, 32)
    ref.assert_close_ulps(merged.var, single.var, 32)
