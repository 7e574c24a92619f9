"""Helper tests (issue 21, pilot seeds 200-299): norm_batch_size's PreciseBN
probe, the quantity that chooses its learning rates, agrees with the
PreciseBN evaluation that reports, and with a hand computation."""

import jax
import jax.numpy as jnp
import numpy as np

from bnlab.models import set_gates
from experiments import norm_batch_size as nbs


def test_population_probe_is_precise_bn_accuracy():
    model, twin = nbs.models(8, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32) * 3 + 1
    y = rng.integers(0, 10, 64).astype(np.int32)
    stats = rng.normal(size=(32, 5)).astype(np.float32) * 3 + 1
    v = model.init(jax.random.key(0), x[:2], train=False)
    v = set_gates(v, norm=jnp.float32(1.0))  # BN
    probe = nbs.population_probe(model, twin, stats, x, y)
    got = float(probe(v, {}))
    ref = nbs.population_accuracy(model, twin)([v], jnp.asarray(stats), [(x, y)])
    assert got == ref[0, 0]
    # by hand: the running statistics replaced by the statistics of `stats`
    _, upd = twin.apply(v, stats, train=True, mutable=["batch_stats"])
    logits = model.apply({**v, "batch_stats": upd["batch_stats"]}, x, train=False)
    assert got == np.mean(np.argmax(np.asarray(logits), -1) == y)
    # and not the accuracy with the initial running statistics (mean 0, var 1),
    # which are far from these inputs' (mean 1, std 3)
    stale = model.apply(v, x, train=False)
    assert not np.array_equal(
        np.argmax(np.asarray(logits), -1), np.argmax(np.asarray(stale), -1)
    )
