"""The model, data loaders and optimizer that a run's configuration describes."""

import torch

from data import TensorLoader, load_dataset, split_validation
from models import DenseNet

from .architecture import architecture, describe
from .devices import on_all_ranks
from .errors import UsageError
from .step import graphable_lr

MAX_VALID_FRACTION = 0.2  # a larger validation split leaves too little to train on


def build_model(config, num_classes):
    """The DenseNet the configuration describes (training.architecture)."""
    return DenseNet(**architecture(config), num_classes=num_classes,
                    efficient=config["efficient"],
                    recompute_bottleneck=config["recompute_bottleneck"])


def model_name(config):
    mode = ("efficient + recompute_bottleneck" if config["recompute_bottleneck"]
            else "efficient" if config["efficient"] else "naive")
    return f"{describe(config)}, {mode}"


def read_dataset(config, download):
    return load_dataset(config["dataset"], config["data"], svhn_extra=config["svhn_extra"],
                        download=download, fake_size=tuple(config["fake_size"]),
                        image_size=config.get("image_size") or 32)


def load_data(config, devices):
    """The dataset on every process; rank 0 reads it first because it may download it."""
    first = on_all_ranks(lambda: read_dataset(config, config["download"])
                         if devices.rank == 0 else None)
    return on_all_ranks(lambda: first or read_dataset(config, False))


def check_split(config, dataset, world_size):
    """Refuse a validation split that leaves too few training images (one line, exit 2)."""
    total = len(dataset.train_images)
    valid_size = config["valid_size"]
    suggested = int(total * MAX_VALID_FRACTION) // 100 * 100 or int(total * MAX_VALID_FRACTION)
    if valid_size > total * MAX_VALID_FRACTION:
        raise UsageError(f"--valid_size {valid_size} would hold out {valid_size / total:.0%} of "
                         f"the {total} {dataset.name} training images for validation (at most "
                         f"{MAX_VALID_FRACTION:.0%} allowed); use e.g. --valid_size {suggested}, "
                         f"or --valid_size 0 to train on all of them")
    if total - valid_size < 2 * world_size:
        raise UsageError(f"--valid_size {valid_size} leaves too few training images: "
                         f"{dataset.name} has {total}")


def make_loaders(config, dataset, devices, generator):
    """Train (this process's shard), validation (None when valid_size is 0) and test loaders."""
    check_split(config, dataset, devices.world_size)
    remaining = len(dataset.train_images) - config["valid_size"]
    train_images, train_labels, valid_images, valid_labels = split_validation(
        dataset.train_images, dataset.train_labels, config["valid_size"], config["seed"])
    batch = config["batch_size"] // devices.world_size
    common = dict(mean=dataset.mean, std=dataset.std, device=devices.device)
    train_loader = TensorLoader(
        train_images, train_labels, batch, shuffle=True, augment=config["augment"],
        flip=dataset.flip, generator=generator, rank=devices.rank,
        world_size=devices.world_size,
        # BatchNorm cannot train on a last batch of a single image.
        drop_last=(remaining // devices.world_size) % batch == 1, **common)
    valid_loader = None
    if config["valid_size"]:
        valid_loader = TensorLoader(valid_images, valid_labels, config["batch_size"], **common)
    test_loader = TensorLoader(dataset.test_images, dataset.test_labels, config["batch_size"],
                               **common)
    return train_loader, valid_loader, test_loader


def make_optimizer(config, model, device):
    """SGD with Nesterov momentum: fused kernels on CUDA, foreach (few launches) elsewhere."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=graphable_lr(config, device),
                           momentum=config["momentum"],
                           nesterov=config["momentum"] > 0, weight_decay=config["wd"], **fast)


def make_scheduler(config, optimizer):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, config["milestones"], config["gamma"])
