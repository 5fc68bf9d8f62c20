"""Datasets held in memory as uint8 tensors, and a loader that augments them with tensor ops."""

from data.datasets import DATASETS, DataError, Dataset, load_dataset
from data.loader import TensorLoader, split_validation

__all__ = ["DATASETS", "DataError", "Dataset", "TensorLoader", "load_dataset", "split_validation"]
