"""Datasets (digits, Fashion-MNIST/MNIST IDX, synthetic) and resumable batches."""

from bnlab.data.pipeline import (
    ArraySource,
    BatchStream,
    EpochOrder,
    Source,
    StreamingDataset,
    Subset,
    read,
)
from bnlab.data.sources import (
    IDX_SOURCES,
    Dataset,
    DatasetError,
    DatasetNotFoundError,
    find_idx_files,
    load,
    load_digits,
    load_fashion_mnist_small,
    load_idx_dataset,
    read_idx,
    synthetic_regression,
    validation_indices,
    validation_size,
)

__all__ = [
    "IDX_SOURCES",
    "ArraySource",
    "BatchStream",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "EpochOrder",
    "Source",
    "StreamingDataset",
    "Subset",
    "find_idx_files",
    "load",
    "load_digits",
    "load_fashion_mnist_small",
    "load_idx_dataset",
    "read",
    "read_idx",
    "synthetic_regression",
    "validation_indices",
    "validation_size",
]
