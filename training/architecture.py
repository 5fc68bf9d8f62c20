"""Which DenseNet a run trains: torchvision's named ImageNet DenseNets (--arch) or the paper's
depth/growth-rate family (--depth, --growth_rate, --bc, --compression), and its stem.

The stem follows the image size (models.small_inputs_for): the 3x3 CIFAR stem below 64 pixels,
the ImageNet stem (7x7 stride-2 convolution and max-pool) from 64 pixels on, for both families.
"""

import math
import numbers

from models import (
    ARCHITECTURES,
    depth_to_config,
    imagenet_config,
    imagenet_depth,
    memory,
    small_inputs_for,
)

from .errors import UsageError

DEPTH_FAMILY_DEFAULTS = {"depth": 100, "growth_rate": 12, "bc": True}  # the paper's CIFAR model
DEPTH_FAMILY_FLAGS = ("depth", "growth_rate", "bc", "compression")


def resolve_architecture(config):
    """A copy of config with --arch, --depth, --growth_rate, --bc and --compression checked and
    filled in: a named --arch stores its own depth (121...), growth rate, bc True and compression
    0.5; without one the depth family's defaults apply. UsageError for bad or conflicting flags,
    and for images too small for the network (config["image_size"], when it is set)."""
    config = dict(config)
    arch = config.get("arch")
    if arch is not None:
        if not isinstance(arch, str) or arch.lower() not in ARCHITECTURES:
            raise UsageError(f"--arch must be one of {', '.join(ARCHITECTURES)} (or left out "
                             f"for the --depth, --growth_rate and --bc family), got {arch!r}")
        arch = config["arch"] = arch.lower()
        kwargs = imagenet_config(arch)
        implied = dict(depth=imagenet_depth(arch), growth_rate=kwargs["growth_rate"], bc=True,
                       compression=kwargs["compression"])
        # What the architecture implies may be repeated (a resumed run's stored settings are).
        given = [f"--{name}" for name in DEPTH_FAMILY_FLAGS
                 if config.get(name) is not None and config[name] != implied[name]]
        if given:
            raise UsageError(f"--arch {arch} fixes the architecture: leave out "
                             f"{', '.join(given)} (flags of the depth family)")
        config.update(implied)
    else:
        for name, default in DEPTH_FAMILY_DEFAULTS.items():
            if config.get(name) is None:
                config[name] = default
        if not isinstance(config["bc"], bool):
            raise UsageError(f"--bc must be True or False, got {config['bc']!r}")
        for name in ("depth", "growth_rate"):
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name} must be an integer >= 1, got {value!r}")
        try:
            kwargs = depth_to_config(config["depth"], config["growth_rate"], config["bc"])
        except ValueError as error:
            raise UsageError(str(error)) from None
        compression = config.get("compression")
        if compression is None:
            compression = kwargs["compression"]
        if isinstance(compression, bool) or not isinstance(compression, numbers.Real) \
                or not math.isfinite(compression) or not 0 < compression <= 1:
            raise UsageError(f"--compression must be in (0, 1], got {compression!r}")
        config["compression"] = float(compression)
    if config.get("image_size") is not None:
        check_image_size(config)
    return config


def architecture(config):
    """DenseNet's keyword arguments (all but num_classes and the memory mode) for a resolved
    configuration; configurations written before --arch and --image_size existed are the depth
    family on 32x32 images."""
    if config.get("arch"):
        kwargs = imagenet_config(config["arch"])
    else:
        kwargs = depth_to_config(config["depth"], config["growth_rate"], config["bc"])
        kwargs["compression"] = config["compression"]
    kwargs.update(drop_rate=config.get("drop_rate") or 0.0,
                  small_inputs=small_inputs_for(image_size(config)))
    return kwargs


def image_size(config):
    return config.get("image_size") or 32


def check_image_size(config):
    """UsageError unless the network keeps at least one pixel in its last dense block."""
    try:
        memory.network(**architecture(config), image_size=image_size(config))
    except ValueError as error:
        raise UsageError(f"--image_size {image_size(config)}: {error}") from None


def describe(config):
    """The network in words, as the start-up block and the planner name it."""
    stem = "" if small_inputs_for(image_size(config)) else ", ImageNet stem"
    if config.get("arch"):
        kwargs = imagenet_config(config["arch"])
        blocks = "-".join(map(str, kwargs["block_config"]))
        return (f"DenseNet-{imagenet_depth(config['arch'])} (torchvision's {config['arch']}: "
                f"k={kwargs['growth_rate']}, blocks {blocks}){stem}")
    kind = "DenseNet-BC" if config["bc"] else "DenseNet"
    return f"{kind} (L={config['depth']}, k={config['growth_rate']}){stem}"
