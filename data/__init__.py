"""Datasets held in memory as uint8 tensors, and a loader that augments them with tensor ops.

Image folders (data/folder.py, decoding and transforms in data/images.py) are imported where
they are used: torchvision's transforms take seconds to import."""

from data.datasets import DATASETS, DataError, Dataset, load_dataset
from data.loader import TensorLoader, split_validation

__all__ = ["DATASETS", "DataError", "Dataset", "TensorLoader", "load_dataset", "split_validation"]
