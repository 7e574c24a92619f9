"""Builds bnlab/data/fashion_mnist_small.npz, the quick runs' data.

A class-balanced subset of Fashion-MNIST (Xiao, Rasul & Vollgraf 2017,
arXiv:1708.07747; MIT license, Copyright (c) 2017 Zalando SE): 1000 training
and 200 test images per class, drawn with a fixed seed from the official
training and test files, average-pooled 2x2 to 14x14 and rounded to uint8.

    python tools/make_fashion_mnist_small.py    # needs the IDX files (see README)

The output is deterministic: the SHA-256 in bnlab/data/sources.py checks it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from bnlab.data import load_idx_dataset

OUT = Path(__file__).resolve().parents[1] / "bnlab" / "data" / "fashion_mnist_small.npz"


def main() -> None:
    ds = load_idx_dataset("fashion_mnist")
    rng = np.random.default_rng(20261201)

    def balanced(y, per):
        picks = [rng.permutation(np.flatnonzero(y == c))[:per] for c in range(10)]
        return np.sort(np.concatenate(picks))

    def pool(x):
        x = np.round(x[..., 0] * 255.0).reshape(len(x), 14, 2, 14, 2).mean((2, 4))
        return np.round(x).astype(np.uint8)

    train, test = balanced(ds.y_train, 1000), balanced(ds.y_test, 200)
    arrays = {
        "x_train": pool(ds.x_train[train]),
        "y_train": ds.y_train[train].astype(np.uint8),
        "x_test": pool(ds.x_test[test]),
        "y_test": ds.y_test[test].astype(np.uint8),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    OUT.write_bytes(buf.getvalue())
    digest = hashlib.sha256(
        b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in sorted(arrays))
    ).hexdigest()
    print(f"{OUT}: {OUT.stat().st_size} bytes; arrays SHA-256 {digest}")


if __name__ == "__main__":
    main()
