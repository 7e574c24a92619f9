"""Datasets (digits, Fashion-MNIST/MNIST IDX, synthetic) and resumable batches."""

from bnlab.data.pipeline import BatchStream
from bnlab.data.sources import (
    IDX_SOURCES,
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    find_idx_files,
    load,
    load_digits,
    load_idx_dataset,
    read_idx,
    synthetic_regression,
)

__all__ = [
    "IDX_SOURCES",
    "BatchStream",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "find_idx_files",
    "load",
    "load_digits",
    "load_idx_dataset",
    "read_idx",
    "synthetic_regression",
]
