"""DenseNet models: pure torch, no data or training code."""

from .densenet import (
    ARCHITECTURES,
    IMAGENET_STEM_MIN_SIZE,
    DenseNet,
    depth_to_config,
    imagenet_config,
    imagenet_depth,
    small_inputs_for,
)

__all__ = ["ARCHITECTURES", "IMAGENET_STEM_MIN_SIZE", "DenseNet", "depth_to_config",
           "imagenet_config", "imagenet_depth", "small_inputs_for"]
