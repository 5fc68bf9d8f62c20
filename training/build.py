"""The model, data loaders and optimizer that a run's configuration describes."""

import sys

import torch

from data import TensorLoader, load_dataset, split_validation
from data.loader import validation_indices
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


def is_pretrained(config):
    """Whether the run starts from pretrained weights (--pretrained True or a file)."""
    return config.get("pretrained") not in (False, None)


def read_dataset(config, download, report=print):
    """The dataset of config; folder data uses config's mean and std when it holds them
    (a saved run's), ImageNet's with pretrained weights, else computes them."""
    if config["dataset"] == "folder":
        # imported here: torchvision's transforms take seconds to import, only folders need them
        from data.folder import load_folder
        from data.images import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size

        stats = (config["mean"], config["std"]) if "mean" in config else None
        if is_pretrained(config):
            stats = (IMAGENET_MEAN, IMAGENET_STD)
        resize_size = config.get("resize_size") or eval_resize_size(config["image_size"],
                                                                     is_pretrained(config))
        return load_folder(config["data"], config["image_size"], resize_size, stats,
                           workers=config["workers"], skip_bad=config["skip_bad_images"],
                           report=report)
    return load_dataset(config["dataset"], config["data"], svhn_extra=config["svhn_extra"],
                        download=download, fake_size=tuple(config["fake_size"]),
                        image_size=config.get("image_size") or 32)


def load_data(config, devices, log=None):
    """The dataset on every process; rank 0 reads it first because it may download it.

    Records in config what predictions need without the data: class names, image and resize
    size, mean and std (so config.json and the checkpoints make the run folder self-sufficient).
    """
    report = _reporter(devices, log)
    first = on_all_ranks(lambda: read_dataset(config, config["download"], report)
                         if devices.rank == 0 else None)
    dataset = on_all_ranks(lambda: first or read_dataset(config, False, report))
    found = {"classes": [str(name) for name in dataset.classes] or
             [str(label) for label in range(dataset.num_classes)],
             "train_images": len(dataset.train_images)}
    for key, value in found.items():  # a resumed run's data must be the data it started on
        if key in config and config[key] != value:
            raise UsageError(f"the data changed since the run in {config['save']} started: "
                             f"{_change(key, config[key], value)}; restore it, or start a new "
                             f"run (another --save)")
    config.update(found)
    config["resize_size"] = getattr(dataset, "resize_size", config["image_size"])
    config["mean"], config["std"] = list(dataset.mean), list(dataset.std)
    return dataset


def _change(key, before, now):
    if key == "train_images":
        return f"{before:,} training images then, {now:,} now"
    gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
    return (f"classes {before} then, {now} now" if not gone and not new else
            f"classes {', '.join(new) or 'none'} new, {', '.join(gone) or 'none'} gone")


def _reporter(devices, log):
    """Where loaders report skipped images: the run's log on rank 0, stderr on the others."""
    if log is not None and devices.is_main:
        return log.print
    return lambda line: print(f"rank {devices.rank}: {line}", file=sys.stderr, flush=True)


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


def make_loaders(config, dataset, devices, generator, log=None):
    """Train (this process's shard), validation (None when valid_size is 0) and test loaders."""
    if config["dataset"] == "folder":
        return _folder_loaders(config, dataset, devices, generator, _reporter(devices, log))
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


TRAINING_HINT = ("; the run stopped with its last checkpoint kept: replace the file with a "
                 "readable one, then continue with --resume True, or continue with --resume "
                 "True --skip_bad_images True (removing the file would change the run's data)")


def folder_parts(config, dataset):
    """{"train", "valid", "test"}: (paths, labels) of folder data, "valid" None without a
    validation set. Validation: val/, else --valid_size images of train/ (seeded), none with
    --valid_size 0. Test: test/, else val/, else the validation split, else the training set."""
    train = (dataset.train_images, dataset.train_labels)
    val = None if dataset.valid_images is None else (dataset.valid_images, dataset.valid_labels)
    valid = val if config["valid_size"] else None
    if val is None and config["valid_size"]:
        train_index, valid_index = validation_indices(len(train[0]), config["valid_size"],
                                                      config["seed"])
        valid = ([train[0][i] for i in valid_index.tolist()], train[1][valid_index])
        train = ([train[0][i] for i in train_index.tolist()], train[1][train_index])
    test = (dataset.test_images, dataset.test_labels)
    if dataset.test_images is None:
        test = val or valid or train
    return {"train": train, "valid": valid, "test": test}


def data_notes(config, dataset):
    """Start-up lines about the data beyond the split sizes: what was ignored, what the
    validation and test figures are measured on, the transforms."""
    if config["dataset"] != "folder":
        return []
    held_out = f"{config['valid_size']:,} images held out of train/"
    if not config["valid_size"]:
        valid = "none (--valid_size 0)"
    else:
        valid = "val/" if dataset.valid_images is not None else held_out
    if dataset.test_images is not None:
        test = "test/"
    elif dataset.valid_images is not None:
        test = "no test/ folder, so the test figures are measured on val/"
    elif config["valid_size"]:
        test = f"no test/ or val/ folder, so the test figures are measured on the {held_out}"
    else:
        test = ("no test/ or val/ folder and no validation, so the test figures are measured "
                "on the training images (evaluation transform)")
    size, resize = dataset.image_size, dataset.resize_size
    training = "random-resized crops and flips" if config["augment"] else \
        "the evaluation transform (--augment False)"
    numbers = ["(" + ", ".join(f"{v:.3f}" for v in values) + ")"
               for values in (dataset.mean, dataset.std)]
    return [*dataset.notes,
            f"splits   {len(dataset.classes)} classes from train/; validation: {valid}; test: "
            f"{test}",
            f"images   {size}x{size}: training takes {training}; evaluation resizes to {resize} "
            f"and takes the centre; mean {numbers[0]}, std {numbers[1]} ({dataset.stats})"]


def make_test_loader(config, dataset, device, report=print, hint=""):
    """The test set's loader of a saved run's configuration (--evaluate)."""
    if config["dataset"] != "folder":
        return TensorLoader(dataset.test_images, dataset.test_labels, config["batch_size"],
                            dataset.mean, dataset.std, device)
    return _folder_loader(config, dataset, folder_parts(config, dataset)["test"],
                          config["batch_size"], device, report, hint)


def _folder_loader(config, dataset, part, batch_size, device, report, hint, **kwargs):
    from data.folder import FolderLoader  # see read_dataset

    return FolderLoader(part[0], part[1], batch_size, dataset.mean, dataset.std, device,
                        dataset.image_size, dataset.resize_size, workers=config["workers"],
                        skip_bad=config["skip_bad_images"], report=report, hint=hint,
                        skipped=dataset.skipped, **kwargs)


def _folder_loaders(config, dataset, devices, generator, report):
    if dataset.valid_images is None:
        check_split(config, dataset, devices.world_size)
    else:
        check_split({**config, "valid_size": 0}, dataset, devices.world_size)
    parts = folder_parts(config, dataset)
    batch = config["batch_size"] // devices.world_size
    remaining = len(parts["train"][0])
    train_loader = _folder_loader(
        config, dataset, parts["train"], batch, devices.device, report, TRAINING_HINT,
        shuffle=True, augment=config["augment"], flip=dataset.flip, generator=generator,
        rank=devices.rank, world_size=devices.world_size,
        drop_last=(remaining // devices.world_size) % batch == 1)
    valid_loader = None
    if parts["valid"] is not None:
        valid_loader = _folder_loader(config, dataset, parts["valid"], config["batch_size"],
                                      devices.device, report, TRAINING_HINT)
    test_loader = _folder_loader(config, dataset, parts["test"], config["batch_size"],
                                 devices.device, report, TRAINING_HINT)
    return train_loader, valid_loader, test_loader


def make_optimizer(config, model, device):
    """SGD with Nesterov momentum: fused kernels on CUDA, foreach (few launches) elsewhere."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=graphable_lr(config, device),
                           momentum=config["momentum"],
                           nesterov=config["momentum"] > 0, weight_decay=config["wd"], **fast)


def make_scheduler(config, optimizer):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, config["milestones"], config["gamma"])
