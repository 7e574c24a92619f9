"""Data loading (IDX, digits, synthetic, batches) and the models."""

import functools
import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab.linen
from bnlab import data
from bnlab.models import CNN, MLP, ResNet20
from bnlab.models.nnx_mlp import NNXMLP


def _write_idx(path, array):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + body)


def test_read_idx_roundtrip_and_truncation(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "b").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "c")


def test_offline_missing_dataset_names_package_url_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        data.find_idx_files("mnist", download=False)
    msg = str(e.value)
    assert "ossci-datasets" in msg and str(tmp_path / "cache") in msg


def test_a_user_data_dir_is_used_or_fails_never_replaced(tmp_path, monkeypatch):
    # Even with a good copy elsewhere (env var), a named data_dir is the only
    # place looked at: missing, incomplete or wrong files fail clearly.
    good = tmp_path / "good"
    good.mkdir()
    for f in data.IDX_SOURCES["mnist"][1]:
        (good / f).write_bytes(b"x")
    monkeypatch.setenv("BNLAB_DATA_DIR", str(good))
    with pytest.raises(data.DatasetNotFoundError, match="not a directory"):
        data.find_idx_files("mnist", data_dir=tmp_path / "nope", download=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(data.DatasetNotFoundError, match="lacks"):
        data.find_idx_files("mnist", data_dir=partial, download=False)
    with pytest.raises(data.DatasetError, match="wrong SHA-256"):
        data.find_idx_files("mnist", data_dir=good, download=False)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"\x00\x00\x08\x03\x00\x00", "header is truncated"),
        (b"\x00\x00\x08\xff" + b"\x00" * 64, "claims 255 dimensions"),
        (b"\x00\x00\x08\x03" + b"\xff" * 12, "truncated or corrupt"),
        ("gzip", "cannot be read"),
    ],
)
def test_read_idx_names_the_file_and_the_problem(tmp_path, content, match):
    if content == "gzip":
        path = tmp_path / "t.gz"
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:-10])
    else:
        path = tmp_path / "t.idx"
        path.write_bytes(content)
    with pytest.raises(data.DatasetError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_checksum_mismatch_is_refused(tmp_path):
    for f in data.IDX_SOURCES["mnist"][1]:
        (tmp_path / f).write_bytes(b"not mnist")
    with pytest.raises(ValueError, match="wrong SHA-256"):
        data.find_idx_files("mnist", data_dir=tmp_path, download=False)


@pytest.mark.skipif(
    not data.IDX_SOURCES["fashion_mnist"][2][1].is_dir(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_from_debian_package():
    ds = data.load("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (
        10000,
        28,
        28,
        1,
    )
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))


def test_digits_and_synthetic():
    d = data.load_digits()
    assert d.x_train.shape == (1437, 8, 8, 1) and d.num_classes == 10
    s = data.synthetic_regression()
    ratio = s.x_train.std(0)[1] / s.x_train.std(0)[0]
    assert 80 < ratio < 120  # the lecture's x2 ~ 100 x1


def test_batch_stream_deterministic_epochs_and_process_slices():
    x = np.arange(20.0)
    s = data.BatchStream(x, np.arange(20), batch_size=8, seed=3)
    again = data.BatchStream(x, np.arange(20), batch_size=8, seed=3)
    for i in range(6):
        np.testing.assert_array_equal(s.batch(i)[0], again.batch(i)[0])
    seen = np.concatenate([s.batch(i)[0] for i in range(5)])  # 40 = two epochs
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    assert not np.array_equal(seen[:20], seen[20:])  # reshuffled each epoch
    halves = [
        data.BatchStream(x, np.arange(20), 8, 3, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    np.testing.assert_array_equal(
        np.concatenate([h.batch(4)[0] for h in halves]), s.batch(4)[0]
    )
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        data.BatchStream(x, x, 8, 0, process_index=0, process_count=3)


NORM = functools.partial(bnlab.linen.BatchNorm, momentum=0.9)


@pytest.mark.parametrize("placement", ["none", "before", "after"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_placements_normalize_where_named(placement, activation):
    # Every layer's output is captured: BN must take the Dense output
    # ("before") or the activation's output ("after"), and the next Dense
    # must take the activation of the BN output ("before") or the BN output
    # ("after"). Checked against a float64 numpy recomputation.
    m = MLP(
        widths=(16, 16),
        activation=activation,
        placement=placement,
        norm=NORM,
        init_scheme="normal",
        init_std=0.1,
    )
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
    v = m.init(jax.random.key(1), x, train=False)
    y, state = m.apply(
        v, x, train=True, mutable=["batch_stats"], capture_intermediates=True
    )
    assert y.shape == (8, 10)
    assert len(v.get("batch_stats", {})) == (0 if placement == "none" else 2)
    act = {"relu": lambda a: np.maximum(a, 0), "tanh": np.tanh}.get(
        activation, lambda a: 1 / (1 + np.exp(-a))
    )

    def normalized(a):  # scale 1, offset 0 at init: BN with batch statistics
        return (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)

    out = {
        k: np.asarray(w["__call__"][0], np.float64)
        for k, w in state["intermediates"].items()
        if k.startswith(("Dense", "BatchNorm"))  # not the sown act_input_<i>
    }
    params = v["params"]
    h = np.asarray(x, np.float64).reshape(8, -1)
    for i in range(3):
        dense = params[f"Dense_{i}"]
        h = h @ np.asarray(dense["kernel"], np.float64)
        if "bias" in dense:
            h = h + np.asarray(dense["bias"], np.float64)
        np.testing.assert_allclose(out[f"Dense_{i}"], h, rtol=1e-4, atol=1e-5)
        if i == 2:
            break
        if placement == "before":
            h = normalized(h)
            np.testing.assert_allclose(out[f"BatchNorm_{i}"], h, atol=1e-4)
        h = act(h)
        if placement == "after":
            h = normalized(h)
            np.testing.assert_allclose(out[f"BatchNorm_{i}"], h, atol=1e-4)
    np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-5)


def test_resnet20_zero_init_last_gamma_and_cnn():
    r = ResNet20(norm=NORM, zero_init_last_gamma=True)
    x = jnp.ones((2, 32, 32, 3))
    # the count needs shapes only: no eager init of 20 layers
    shapes = jax.eval_shape(
        functools.partial(r.init, train=False), jax.random.key(0), x
    )
    n = sum(a.size for a in jax.tree.leaves(shapes["params"]))
    assert 260_000 < n < 280_000  # ResNet-20 has ~0.27M parameters
    assert len(shapes["params"]) == 1 + 1 + 9 + 1  # conv, BN, 9 blocks, head
    # the last BN of a block starts at 0 (a small input: the values only)
    v = r.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)), train=False)
    for b in range(9):
        block = v["params"][f"BasicBlock_{b}"]
        assert np.all(np.asarray(block["BatchNorm_1"]["scale"]) == 0), b
        assert np.all(np.asarray(block["BatchNorm_0"]["scale"]) == 1), b
    c = CNN(norm=NORM)
    v = c.init(jax.random.key(0), jnp.ones((2, 28, 28, 1)), train=False)
    assert c.apply(v, jnp.ones((2, 28, 28, 1)), train=False).shape == (2, 10)


def test_nnx_mlp_trains_its_bn_statistics():
    m = NNXMLP(64, (32, 32), 10, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (16, 64)) * 3 + 2
    m(x)
    assert not np.allclose(m.norms[0].mean[...], 0.0)
    m.eval()
    before = m.norms[0].mean[...]
    m(x)
    np.testing.assert_array_equal(m.norms[0].mean[...], before)


def test_an_unusable_home_is_never_created_for_downloads(tmp_path, monkeypatch):
    home = tmp_path / "no-such-home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("BNLAB_DATA_DIR", raising=False)
    with pytest.raises(
        data.DatasetNotFoundError, match="does not exist or is not writable"
    ):
        data.find_idx_files("mnist", download=True, timeout=0.01)
    assert not home.exists()


def test_the_shipped_small_fashion_mnist_is_balanced_and_verified():
    ds = data.load("fashion_mnist_small")
    assert ds.x_train.shape == (10000, 14, 14, 1) and ds.x_test.shape == (
        2000,
        14,
        14,
        1,
    )
    assert np.bincount(ds.y_train).tolist() == [1000] * 10
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0


def test_variant_mlp_gates_select_exactly_the_plain_variant():
    # A gated VariantMLP with BN before every activation computes the bits of
    # the same network built without gates (same weights copied over).
    from bnlab.models import VariantMLP, set_gates

    x = jax.random.normal(jax.random.key(1), (16, 12))
    norm = functools.partial(bnlab.linen.BatchNorm, momentum=0.9)
    gated = VariantMLP((8, 8), 3, norm=norm)
    v = gated.init(jax.random.key(0), x, train=False)
    v = set_gates(v, bn_before=1.0)
    plain = MLP(
        widths=(8, 8), num_outputs=3, placement="before", norm=norm, init_scheme="he"
    )
    pv = plain.init(jax.random.key(0), x, train=False)
    # map the gated model's weights onto the plain one (its Dense before BN has no bias)
    p = v["params"]
    pv = {
        "params": {
            "Dense_0": {"kernel": p["Dense_0"]["kernel"]},
            "BatchNorm_0": p["BatchNorm_0"],
            "Dense_1": {"kernel": p["Dense_1"]["kernel"]},
            "BatchNorm_1": p["BatchNorm_1"],
            "Dense_2": p["Dense_2"],
        },
        "batch_stats": {
            "BatchNorm_0": v["batch_stats"]["BatchNorm_0"],
            "BatchNorm_1": v["batch_stats"]["BatchNorm_1"],
        },
    }
    zero_bias = jax.tree.map(
        jnp.zeros_like, {k: p[k]["bias"] for k in ("Dense_0", "Dense_1")}
    )
    v = {**v, "params": {**p, **{k: {**p[k], "bias": zero_bias[k]} for k in zero_bias}}}
    y_gated, _ = gated.apply(v, x, train=True, mutable=["batch_stats"])
    y_plain, _ = plain.apply(pv, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y_gated), np.asarray(y_plain))
    off = set_gates(v, bn_before=0.0)
    y_none = gated.apply(off, x, train=False)
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"])
    h = jax.nn.relu(h @ p["Dense_1"]["kernel"])
    np.testing.assert_allclose(
        y_none,
        h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"][None],
        rtol=1e-6,
        atol=1e-6,
    )
