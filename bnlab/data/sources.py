"""Datasets as in-memory arrays: digits (embedded), IDX files, synthetic.

Each loader returns a :class:`Dataset` of float32 images in ``[0, 1]`` with a
channel axis (``(N, H, W, 1)``) and int32 labels, or float32 regression
targets for the synthetic data.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "IDX_SOURCES",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "load",
    "load_digits",
    "load_fashion_mnist_small",
    "load_idx_dataset",
    "read_idx",
    "synthetic_regression",
    "validation_size",
]


class DatasetError(ValueError):
    """A dataset file is corrupt, truncated or not what it should be; the
    message names the file and what to do."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset's files are not where they were looked for (and could not
    be downloaded); the message names the places and the fix."""


class Dataset(NamedTuple):
    """In-memory train / test (and optional validation) arrays.

    ``num_classes`` is 0 for regression. Validation arrays are optional:
    :meth:`with_validation` carves them out of the training set, and
    :func:`bnlab.train.fit` does so when given ``validation=fraction``.

    Example:
      >>> import numpy as np
      >>> from bnlab.data import Dataset
      >>> x, y = np.zeros((100, 4), np.float32), np.arange(100) % 3
      >>> ds = Dataset(x, y, x[:10], y[:10], num_classes=3).with_validation(0.2)
      >>> len(ds.x_train), len(ds.x_val)
      (80, 20)
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def with_validation(self, fraction: float, seed: int = 0) -> Dataset:
        """A copy whose validation split is ``fraction`` of the training set.

        The split is a fixed, seeded permutation (independent of any training
        seed), so every arm of an experiment selects on the same examples.

        Raises:
          ValueError: ``fraction`` is not in (0, 1), the dataset already has
            validation arrays, or the split would leave a side empty.
        """
        if self.x_val is not None:
            raise ValueError(
                "this Dataset already has validation arrays; pass validation=None "
                "to use them."
            )
        train, val = validation_indices(len(self.x_train), fraction, seed)
        return self._replace(
            x_train=self.x_train[train],
            y_train=self.y_train[train],
            x_val=self.x_train[val],
            y_val=self.y_train[val],
        )


def validation_indices(
    n: int, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` example indices (sorted) of ``n`` examples:
    ``fraction`` of them, drawn by a fixed permutation of ``seed``
    (independent of any training seed)."""
    k = validation_size(n, fraction)
    perm = np.random.default_rng([seed, 1729]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def validation_size(n: int, fraction: float) -> int:
    """Examples carved out for validation from ``n`` (checked)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"validation={fraction!r} must be a fraction, e.g. 0.1.")
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"validation={fraction!r} must be a fraction in (0, 1) of the training "
            "set, e.g. 0.1."
        )
    k = round(n * fraction)
    if k < 1 or k >= n:
        raise ValueError(
            f"validation={fraction} of {n} training examples leaves an empty "
            "split; use a fraction between 1/n and 1 - 1/n."
        )
    return k


def load_digits(test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's built-in 8x8 digits (1797 images, shipped in the package).

    A fixed, seeded split: ``test_size`` test images, the rest for training.
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.data.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:test_size], perm[test_size:]
    return Dataset(x[train], y[train], x[test], y[test], 10)


# name -> (official base URL, {file: sha256 of the .gz}, Debian package or None)
IDX_SOURCES = {
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        ("dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist")),
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        None,
    ),
}

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into a numpy array.

    Raises:
      DatasetError: the file is unreadable, not IDX (bad magic number or type
        code), its header is truncated or absurd, or its data is truncated;
        the message names the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"{path}: cannot be read ({type(e).__name__}: {e}); the file is "
            "truncated or corrupt: delete it and fetch it again."
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number).")
    ndim = data[3]
    if not 1 <= ndim <= 4:
        raise DatasetError(
            f"{path}: IDX header claims {ndim} dimensions (1 to 4 expected); the "
            "file is corrupt."
        )
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: IDX header is truncated ({len(data)} bytes).")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    expected = math.prod(dims) * dtype.itemsize
    if len(body) != expected:
        raise DatasetError(
            f"{path}: IDX header says {dims} ({expected} bytes) but the file has "
            f"{len(body)}; the file is truncated or corrupt, delete it and re-fetch."
        )
    return np.frombuffer(body, dtype).reshape(dims)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("BNLAB_DATA_DIR"):
        dirs.append(Path(os.environ["BNLAB_DATA_DIR"]) / name)
        dirs.append(Path(os.environ["BNLAB_DATA_DIR"]))
    debian = IDX_SOURCES[name][2]
    if debian is not None:
        dirs.append(debian[1])
    dirs.append(_cache_dir(name))
    return dirs


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab" / name


def _cache_problem() -> str | None:
    """Why the download cache cannot be used (nothing is created then), or
    None. ``$XDG_CACHE_HOME`` is used as given; otherwise the home directory
    must exist and be writable: bnlab never creates a home directory."""
    if os.environ.get("XDG_CACHE_HOME"):
        return None
    try:
        home = Path.home()
    except RuntimeError:
        return "the home directory is unknown (HOME is not set)"
    if not home.is_dir() or not os.access(home, os.W_OK | os.X_OK):
        return f"the home directory {home} does not exist or is not writable"
    return None


def _download(url: str, dest: Path, sha256: str, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    got = _sha256(tmp)
    if got != sha256:
        tmp.unlink()
        raise DatasetError(
            f"{url}: downloaded file has SHA-256 {got}, not the expected {sha256}; "
            "nothing was kept. Try again later or fetch it by hand."
        )
    tmp.replace(dest)


def find_idx_files(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    timeout: float = 30.0,
) -> Path:
    """The directory holding the 4 verified IDX files of ``name``.

    A ``data_dir`` given by the user is the only place looked at: it is used
    or the call fails, never silently replaced by another copy. Otherwise
    looks in ``$BNLAB_DATA_DIR[/name]``, the Debian package's directory, then
    the user cache; downloads into the cache from the official source only if
    allowed and online. Every file is SHA-256 verified.

    Raises:
      DatasetNotFoundError: not found (offline, or ``download=False``); the
        message names the places looked at, the apt package, the URL and the
        directory to use.
      DatasetError: a file is present but its checksum is wrong.
    """
    if name not in IDX_SOURCES:
        raise ValueError(f"unknown IDX dataset {name!r}; one of {sorted(IDX_SOURCES)}.")
    base_url, files, debian = IDX_SOURCES[name]
    if data_dir is not None:
        d = Path(data_dir)
        missing = sorted(f for f in files if not (d / f).is_file())
        if missing:
            raise DatasetNotFoundError(
                f"{name}: data_dir {d} lacks {missing}"
                + ("" if d.is_dir() else " (it is not a directory)")
                + f". Put the 4 files {sorted(files)} there, or leave data_dir "
                "unset to use the system copy / download."
            )
        _verify_files(d, files)
        return d
    for d in _candidate_dirs(name, None):
        if all((d / f).is_file() for f in files):
            _verify_files(d, files)
            return d
    cache = _cache_dir(name)
    errors = []
    problem = _cache_problem() if download else None
    if problem:
        errors.append(f"no download: {problem} (set BNLAB_DATA_DIR or XDG_CACHE_HOME)")
        download = False
    if download:
        try:
            for f, digest in files.items():
                if not (cache / f).is_file():
                    _download(base_url + f, cache / f, digest, timeout)
            return cache
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(f"download failed: {e}")
    hint = (
        f"install the Debian package ({'apt-get install ' + debian[0]}) or "
        if debian
        else ""
    )
    raise DatasetNotFoundError(
        f"{name}: the IDX files {sorted(files)} were not found in "
        f"{[str(d) for d in _candidate_dirs(name, None)]}"
        + (f" and {errors[0]}" if errors else " and downloading is off")
        + f". To fix: {hint}download them from {base_url} into {cache} (or any "
        "directory passed as data_dir / BNLAB_DATA_DIR)."
    )


def _verify_files(d: Path, files: dict[str, str]) -> None:
    for f, digest in files.items():
        if _sha256(d / f) != digest:
            raise DatasetError(
                f"{d / f} has the wrong SHA-256 (expected {digest}); it is corrupt "
                "or a different file: delete it and fetch it again."
            )


def load_idx_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """Fashion-MNIST or MNIST as ``(N, 28, 28, 1)`` float32 in [0, 1]."""
    d = find_idx_files(name, data_dir, download)

    def images(f):
        return (read_idx(d / f)[..., None] / 255.0).astype(np.float32)

    return Dataset(
        images("train-images-idx3-ubyte.gz"),
        read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int32),
        images("t10k-images-idx3-ubyte.gz"),
        read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int32),
        10,
    )


def synthetic_regression(
    n: int = 1024,
    scales: tuple[float, float] = (1.0, 100.0),
    weights: tuple[float, float] = (1.0, -0.02),
    noise: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """The lecture's example: y = w1*x1 + w2*x2 + noise with x2 ~100x x1.

    Features ``x_i = scale_i * (1 + N(0, 1))`` (non-zero mean, very different
    scales), so the squared-error surface in ``(w1, w2)`` is elongated.
    """
    rng = np.random.default_rng(seed)
    x = (np.asarray(scales) * (1.0 + rng.standard_normal((n, 2)))).astype(np.float32)
    w = np.asarray(weights, np.float32)
    y = (x @ w + noise * rng.standard_normal(n)).astype(np.float32)
    k = n // 5
    return Dataset(x[k:], y[k:], x[:k], y[:k], 0)


# The quick runs' data, shipped in the package (tools/make_fashion_mnist_small.py)
SMALL_FASHION_MNIST = Path(__file__).with_name("fashion_mnist_small.npz")
SMALL_FASHION_MNIST_SHA256 = (
    "4f51d08100021ca97c1fbaea8a8a16eb035a0d340a8d59a8321d20fd2de02872"
)


def load_fashion_mnist_small() -> Dataset:
    """A class-balanced 14x14 subset of Fashion-MNIST shipped with bnlab.

    1000 training and 200 test images per class from the official files,
    average-pooled 2x2 (Xiao et al. 2017, arXiv:1708.07747, MIT license):
    ``(10000, 14, 14, 1)`` / ``(2000, 14, 14, 1)`` float32 in [0, 1]. Hard
    enough that training curves, learning rates and BN's effects show,
    small enough for a quick run on a laptop CPU.

    Raises:
      DatasetError: the file is missing or does not match its SHA-256.
    """
    try:
        with np.load(SMALL_FASHION_MNIST) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(
            f"{SMALL_FASHION_MNIST} cannot be read ({e}); reinstall bnlab."
        ) from None
    digest = hashlib.sha256(
        b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))
    ).hexdigest()
    if digest != SMALL_FASHION_MNIST_SHA256:
        raise DatasetError(
            f"{SMALL_FASHION_MNIST} does not match its SHA-256; reinstall bnlab."
        )

    def images(a):
        return (a[..., None] / 255.0).astype(np.float32)

    return Dataset(
        images(arrays["x_train"]),
        arrays["y_train"].astype(np.int32),
        images(arrays["x_test"]),
        arrays["y_test"].astype(np.int32),
        10,
    )


def load(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """Loads a dataset by name: digits, fashion_mnist, fashion_mnist_small,
    mnist, synthetic."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "fashion_mnist_small":
        return load_fashion_mnist_small()
    if name in IDX_SOURCES:
        return load_idx_dataset(name, data_dir)
    if name == "synthetic":
        return synthetic_regression(seed=seed)
    raise ValueError(
        f"unknown dataset {name!r}; one of ['digits', 'fashion_mnist', "
        "'fashion_mnist_small', 'mnist', 'synthetic']."
    )
