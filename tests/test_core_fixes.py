"""Issue 22's core fixes: errors name the function the user called, the Linen
module refuses renorm with ghost_size as NNX does, precise_stats keeps no
function alive."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab
import bnlab.linen
import bnlab.nnx

X = jnp.arange(16.0).reshape(8, 2)


# ------------------------------------------- errors name the called function


def _groups_without_axis(fn):
    return fn(X, axis_index_groups=[[0]])


def _unbound_axis(fn):
    return fn(X, axis_name="batch")


def _bad_groups(fn):
    xs = jnp.stack([X, X + 1])
    return jax.vmap(
        lambda x: fn(x, axis_name="d", axis_index_groups=[[0], [0, 1]]), axis_name="d"
    )(xs)


_BAD_CALLS = {
    "groups without axis_name": (_groups_without_axis, "axis_index_groups was given"),
    "unbound axis_name": (_unbound_axis, "axis_name='batch' is not bound"),
    "malformed groups": (_bad_groups, "must split the 2 indices"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_batch_moments_errors_name_batch_moments(case):
    call, match = _BAD_CALLS[case]
    with pytest.raises(ValueError, match=match) as info:
        call(bnlab.batch_moments)
    assert str(info.value).startswith("batch_moments: "), info.value
    assert "batch_norm" not in str(info.value), info.value


@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_batch_renorm_errors_name_batch_renorm(case):
    call, match = _BAD_CALLS[case]
    stats = bnlab.init_batch_stats(2)

    def renorm(x, **kw):
        return bnlab.batch_renorm(x, stats, train=True, **kw)

    with pytest.raises(ValueError, match=match) as info:
        call(renorm)
    assert str(info.value).startswith("batch_renorm: "), info.value


@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_batch_norm_errors_still_name_batch_norm(case):
    call, match = _BAD_CALLS[case]
    stats = bnlab.init_batch_stats(2)

    def bn(x, **kw):
        return bnlab.batch_norm(x, stats, train=True, **kw)

    with pytest.raises(ValueError, match=match) as info:
        call(bn)
    assert str(info.value).startswith("batch_norm: "), info.value


def test_ghost_batch_norm_checks_its_statistics_axis():
    # Ghost batches never crossed sync_size's check: an unbound axis_name
    # surfaced as JAX's NameError from the collective.
    with pytest.raises(ValueError, match="batch_norm: axis_name='batch' is not"):
        bnlab.batch_norm(
            X, bnlab.init_batch_stats(2), train=True, ghost_size=4, axis_name="batch"
        )


def test_ghost_size_errors_name_the_called_function():
    # check_ghost opened every message with "batch_norm:" whoever called it.
    from bnlab.checks import check_ghost, feature_layout

    layout = feature_layout(X.shape, -1)
    with pytest.raises(ValueError, match="does not divide the 8") as info:
        check_ghost(3, X.shape, layout, fn="my_norm")
    assert str(info.value).startswith("my_norm: "), info.value
    with pytest.raises(TypeError, match="must be an int") as info:
        check_ghost(2.0, X.shape, layout, fn="my_norm")
    assert str(info.value).startswith("my_norm: "), info.value
    with pytest.raises(ValueError, match="does not divide the 8") as info:
        bnlab.batch_norm(X, bnlab.init_batch_stats(2), train=True, ghost_size=3)
    assert str(info.value).startswith("batch_norm: "), info.value


def test_count_check_names_the_called_function_for_its_axis():
    # check_count's own statistics-axis check (sync_size) named no caller.
    from bnlab.checks import check_count, feature_layout

    layout = feature_layout(X.shape, -1)
    with pytest.raises(ValueError, match="axis_name='batch' is not bound") as info:
        check_count(
            shape=X.shape,
            layout=layout,
            view_shape=X.shape,
            reduction=layout.reduction_axes,
            axis_name="batch",
            axis_index_groups=None,
            fn="batch_renorm",
        )
    assert str(info.value).startswith("batch_renorm: "), info.value
    # the single-value messages are unchanged
    one = X[:1]
    with pytest.raises(ValueError, match=r"^batch_renorm\(train=True\) got x"):
        bnlab.batch_renorm(one, bnlab.init_batch_stats(2), train=True)
    with pytest.raises(ValueError, match=r"^batch_moments got x .* no spread"):
        bnlab.batch_moments(one)


# ----------------------------------------------------- renorm with ghost_size


def test_linen_refuses_renorm_with_ghost_size_at_construction():
    with pytest.raises(ValueError, match="renorm=True and ghost_size=4") as info:
        bnlab.linen.BatchNorm(use_running_average=False, renorm=True, ghost_size=4)
    message = str(info.value)
    assert message.startswith("bnlab.linen.BatchNorm: ")
    assert "Set renorm=False or ghost_size=None" in message
    # each alone is fine
    bnlab.linen.BatchNorm(renorm=True)
    bnlab.linen.BatchNorm(ghost_size=4)


def test_linen_and_nnx_refuse_renorm_with_ghost_size_with_one_message():
    with pytest.raises(ValueError) as linen_error:
        bnlab.linen.BatchNorm(renorm=True, ghost_size=4)
    with pytest.raises(ValueError) as nnx_error:
        bnlab.nnx.BatchNorm(2, renorm=True, ghost_size=4, rngs=nnx.Rngs(0))
    linen_message = str(linen_error.value).replace("bnlab.linen.", "bnlab.nnx.")
    assert linen_message == str(nnx_error.value)


def test_linen_refuses_renorm_with_ghost_size_inside_a_model_at_init():
    # A field set in a parent's compact body: refused at init, not first at
    # apply.
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return bnlab.linen.BatchNorm(
                use_running_average=False, renorm=True, ghost_size=4
            )(x)

    with pytest.raises(ValueError, match="renorm=True and ghost_size=4"):
        Net().init(jax.random.key(0), X)


# --------------------------------------------------- precise_stats' collector


class _Runner:
    """A model run that counts its traces."""

    def __init__(self):
        self.model = bnlab.linen.BatchNorm(use_running_average=False)
        self.traces = 0

    def run(self, v, x, mutable):
        self.traces += 1
        return self.model.apply(v, x, mutable=mutable)


def _batches():
    return [X, X * 3.0 + 1.0]


def test_precise_stats_compiles_once_per_function_and_method():
    runner = _Runner()
    v = runner.model.init(jax.random.key(0), X)
    first = bnlab.precise_stats(runner.run, v, _batches())  # a new bound method
    again = bnlab.precise_stats(runner.run, v, _batches())  # each access
    assert runner.traces == 1
    all_x = np.concatenate([np.asarray(b, np.float64) for b in _batches()])
    np.testing.assert_allclose(first["mean"], all_x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(again["var"], all_x.var(0), rtol=1e-6)

    count = []

    def run(v, x, mutable):
        count.append(1)
        return runner.model.apply(v, x, mutable=mutable)

    bnlab.precise_stats(run, v, _batches())
    bnlab.precise_stats(run, v, _batches())
    assert len(count) == 1


def test_precise_stats_keeps_no_function_alive():
    # The old lru_cache(64) of jitted closures held each apply_fn (and all it
    # closes over) after the caller dropped it.
    model = bnlab.linen.BatchNorm(use_running_average=False)
    v = model.init(jax.random.key(0), X)
    runner = _Runner()

    def run(v, x, mutable):
        return model.apply(v, x, mutable=mutable)

    bnlab.precise_stats(run, v, _batches())
    bnlab.precise_stats(runner.run, v, _batches())
    refs = [weakref.ref(run), weakref.ref(runner)]
    del run, runner
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_precise_stats_refuses_moments_that_differ_across_devices():
    # Device 0's copy is used only when every device's copy agrees (the
    # check is parallel.unreplicate's; the message stays precise_stats').
    model = bnlab.linen.BatchNorm(use_running_average=False)  # no axis_name
    v = model.init(jax.random.key(0), X)
    run = jax.pmap(
        lambda v, x: model.apply(v, x, mutable=["bn_moments", "batch_stats"]),
        in_axes=(None, 0),
    )
    same = jnp.stack([X, X])
    stats = bnlab.precise_stats(
        lambda v, x, mutable: run(v, x), v, [same], device_axis=True
    )
    np.testing.assert_allclose(stats["mean"], np.asarray(X).mean(0), rtol=1e-6)
    with pytest.raises(
        ValueError, match=r"^precise_stats: the devices' moments differ"
    ):
        bnlab.precise_stats(
            lambda v, x, mutable: run(v, x),
            v,
            [jnp.stack([X, X + 1])],
            device_axis=True,
        )
