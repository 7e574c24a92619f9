"""``bnlab train``'s presets: the optimizer's decoupled weight decay against a
float64 hand computation, and a data split that does not follow the seed."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab.train import build_optimizer, load_config, presets

LR, WD, MOMENTUM = 0.3, 0.1, 0.9
B1, B2, EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax.scale_by_adam's bias correction raises a Python float to the
    # int32 step count, which the suite's strict promotion (conftest) rejects.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _lr(t: int) -> float:
    """The cosine schedule of a 2-step run: lr, then lr / 2."""
    return LR * 0.5 * (1 + math.cos(math.pi * t / 2))


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "kernel": rng.normal(size=(3, 2)),  # ndim 2: decays
        "bias": rng.normal(size=2),  # ndim 1: never decays
        "BatchNorm_0": {"scale": 1.0 + rng.normal(size=2)},  # ndim 1: never
    }


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10 + step)
    return jax.tree.map(lambda p: rng.normal(size=p.shape), _params())


def _reference(optimizer: str, steps: int) -> dict[str, np.ndarray]:
    """AdamW-style decoupled decay in float64: ``w -= lr_t * (direction +
    wd * w)`` with ``direction`` the plain optimizer's (decay-free) step, and
    no decay for 1-D parameters."""
    params = _params()
    flat, treedef = jax.tree.flatten(params)
    flat = [np.asarray(w, np.float64) for w in flat]
    trace = [np.zeros_like(w) for w in flat]
    mu = [np.zeros_like(w) for w in flat]
    nu = [np.zeros_like(w) for w in flat]
    for t in range(steps):
        grads = jax.tree.leaves(_grads(t))
        for i, (w, g) in enumerate(zip(flat, grads, strict=True)):
            if optimizer == "sgd":
                direction = g
            elif optimizer == "momentum":
                trace[i] = g + MOMENTUM * trace[i]
                direction = trace[i]
            else:
                mu[i] = B1 * mu[i] + (1 - B1) * g
                nu[i] = B2 * nu[i] + (1 - B2) * g**2
                m_hat = mu[i] / (1 - B1 ** (t + 1))
                v_hat = nu[i] / (1 - B2 ** (t + 1))
                direction = m_hat / (np.sqrt(v_hat) + EPS)
            decay = WD * w if w.ndim > 1 else 0.0
            flat[i] = w - _lr(t) * (direction + decay)
    return jax.tree.unflatten(treedef, flat)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_weight_decay_is_decoupled_and_spares_1d_parameters(optimizer, steps):
    # Coupled L2 (decay added to the gradient before momentum / Adam) differs
    # from the first step for Adam and from the second for momentum (the
    # decay would enter the trace), and decayed the bias and BN scale.
    config = load_config(
        None,
        [
            f"optimizer={optimizer}",
            f"lr={LR}",
            f"momentum={MOMENTUM}",
            f"weight_decay={WD}",
            "schedule=cosine",
            "steps=2",
        ],
    )
    tx = build_optimizer(config)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), _params())

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    opt_state = tx.init(params)
    for t in range(steps):
        grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), _grads(t))
        params, opt_state = step(params, opt_state, grads)
    want = _reference(optimizer, steps)
    # float32 tolerance: optax's Adam bias correction rounds 1 - 0.999 in
    # float32 (1e-5 relative); a wrong decay is off by ~lr * wd * |w| = 3e-2.
    jax.tree.map(
        lambda got, ref: np.testing.assert_allclose(
            np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-5
        ),
        params,
        want,
    )


def test_1d_parameters_move_as_without_weight_decay():
    # The same run with weight_decay=0: bias and BN scale are bit-identical.
    def run(wd):
        config = load_config(None, ["optimizer=adam", f"weight_decay={wd}"])
        tx = build_optimizer(config)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), _params())
        grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), _grads(0))
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        return updates

    with_wd, without = run(WD), run(0.0)
    np.testing.assert_array_equal(with_wd["bias"], without["bias"])
    np.testing.assert_array_equal(
        with_wd["BatchNorm_0"]["scale"], without["BatchNorm_0"]["scale"]
    )
    assert not np.array_equal(with_wd["kernel"], without["kernel"])


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_the_data_split_does_not_depend_on_the_seed(dataset, monkeypatch, tmp_path):
    # Two seeds of one config must be evaluated on the same test set (and
    # train on the same training set, in their own order).
    seen = {}

    def fake_fit(model, ds, workdir, **kwargs):
        seen[kwargs["seeds"]] = ds

    monkeypatch.setattr(presets, "fit", fake_fit)
    for seed in (0, 1):
        config = load_config(None, [f"dataset={dataset}", f"seed={seed}"])
        presets.fit_config(config, tmp_path / str(seed))
    a, b = seen[(0,)], seen[(1,)]
    for name in ("x_test", "y_test", "x_train", "y_train"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)
