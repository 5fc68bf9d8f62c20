"""DenseNet models: pure torch, no data or training code."""

from .densenet import DenseNet, depth_to_config

__all__ = ["DenseNet", "depth_to_config"]
