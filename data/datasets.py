"""Reading CIFAR-10, CIFAR-100 and SVHN from their official files into uint8 tensors."""

import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch

DATASETS = ("cifar10", "cifar100", "svhn", "folder", "fake")  # folder: data/folder.py
IN_MEMORY_SIZE = 32  # the image size of CIFAR and SVHN
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

# Seconds a download may wait on the network before giving up (connect or stalled read).
DOWNLOAD_TIMEOUT = 30

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
# name -> (folder, train files, test files, label key, number of classes, printed name)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10, "CIFAR-10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100, "CIFAR-100"),
}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


class DataError(Exception):
    """Missing, unreadable, truncated or malformed dataset files.

    str(e) is one line telling the user what is wrong and what to do."""


@dataclass
class Dataset:
    """A dataset held in memory: uint8 images (N, 3, H, W) and int64 labels, train and test.

    classes: the class names (label order)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple
    flip: bool
    classes: tuple = ()


def load_dataset(name, root, svhn_extra=False, download=True, fake_size=(50000, 10000),
                 image_size=IN_MEMORY_SIZE):
    """Load dataset `name` (one of DATASETS) from folder `root` and return a Dataset.

    Files already in `root` are read without network access and checked for structure, not
    checksums. Missing files are downloaded through torchvision (which verifies checksums) when
    `download` is true. `svhn_extra` appends SVHN's 531,131 extra images to its training set.
    `fake_size` = (train, test) sizes of the random `fake` dataset, which needs no files, and
    `image_size` the size of its square images (CIFAR and SVHN have 32 only). Folder data is
    read by data.folder.load_folder.
    Raises DataError for missing or malformed files, ValueError for invalid arguments.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "folder":
        raise ValueError("folder data is read by data.folder.load_folder")
    if name != "fake" and image_size != IN_MEMORY_SIZE:
        raise ValueError(f"{name} has {IN_MEMORY_SIZE}x{IN_MEMORY_SIZE} images only, not "
                         f"{image_size!r}")
    if not isinstance(svhn_extra, bool) or not isinstance(download, bool):
        raise ValueError("svhn_extra and download must be True or False")
    if svhn_extra and name != "svhn":
        raise ValueError(f"svhn_extra applies only to svhn, not to {name}")
    if name != "fake" and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"root must be a folder path for {name}, got {root!r}")
    if name == "fake":
        train_images, train_labels, test_images, test_labels = _make_fake(fake_size, image_size)
        num_classes, flip = 10, True
        classes = tuple(str(digit) for digit in range(10))
    elif name == "svhn":
        splits = ["train", "test"] + (["extra"] if svhn_extra else [])
        parts = _read_svhn(Path(root), splits, download)
        train_images = torch.cat([parts[s][0] for s in splits if s != "test"])
        train_labels = torch.cat([parts[s][1] for s in splits if s != "test"])
        test_images, test_labels = parts["test"]
        num_classes, flip = 10, False
        classes = tuple(str(digit) for digit in range(10))
    else:
        train_images, train_labels, test_images, test_labels = _read_cifar(name, Path(root),
                                                                           download)
        num_classes, flip = CIFAR_LAYOUT[name][4], True
        classes = CIFAR10_CLASSES if name == "cifar10" else _cifar100_classes(Path(root))
    mean, std = channel_stats(train_images)
    return Dataset(name, train_images, train_labels, test_images, test_labels, num_classes,
                   mean, std, flip, classes)


def _cifar100_classes(root):
    """CIFAR-100's fine label names from its meta file, or the label numbers without one."""
    try:
        with open(root / CIFAR_LAYOUT["cifar100"][0] / "meta", "rb") as f:
            names = _ArrayUnpickler(f, encoding="latin1").load()["fine_label_names"]
        if len(names) == 100 and all(isinstance(n, (str, bytes)) for n in names):
            return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)
    except Exception:  # a missing or odd meta file costs only the names
        pass
    return tuple(str(label) for label in range(100))


def channel_stats(images):
    """Per-channel mean and (population) std of uint8 images (N, C, H, W), in [0, 1] units."""
    return stats_from_histograms(channel_histograms(images))


def channel_histograms(images):
    """(C, 256) counts of each value per channel of uint8 images (N, C, H, W): exact
    statistics in little memory, summed over batches."""
    return torch.stack([torch.bincount(images[:, channel].reshape(-1), minlength=256)
                        for channel in range(images.shape[1])])


def stats_from_histograms(counts):
    """(mean, std) per channel, in [0, 1] units, from channel_histograms' counts."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel_counts in counts.double():
        mean = (channel_counts * values).sum() / channel_counts.sum()
        var = (channel_counts * (values - mean) ** 2).sum() / channel_counts.sum()
        means.append(mean.item())
        stds.append(var.sqrt().item())
    return tuple(means), tuple(stds)


def _make_fake(fake_size, image_size=IN_MEMORY_SIZE):
    if (not isinstance(fake_size, (tuple, list)) or len(fake_size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                       for n in fake_size)):
        raise ValueError(f"fake_size must be two positive integers (train, test), "
                         f"got {fake_size!r}")
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for size in fake_size:
        tensors.append(torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8,
                                     generator=generator))
        tensors.append(torch.randint(0, 10, (size,), generator=generator))
    return tensors


def _one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


def _download(fetch, what, files, folder, url):
    """Run fetch() with a network timeout; on any failure raise a DataError saying what to do.

    A folder that did not exist before (fetch creates `folder`) is removed again on failure, so
    that a failed download leaves no empty --data folder behind."""
    created = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        created = path
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        fetch()
    except Exception as error:  # network, checksum, disk or archive errors: all mean "not there"
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise DataError(f"{what} not found in {folder} and could not be downloaded "
                        f"({_one_line(error)}): put {files} there, from {url}") from error
    finally:
        socket.setdefaulttimeout(previous)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain Python objects only (no arbitrary code)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar(name, root, download):
    folder_name, train_files, test_files, label_key, num_classes, what = CIFAR_LAYOUT[name]
    folder = root / folder_name
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    listed = ", ".join(train_files + test_files)
    if name == "cifar10":
        listed = "data_batch_1..5, test_batch"
    files = f"the official {folder_name}/ folder ({listed})"
    present = [f for f in train_files + test_files if (folder / f).is_file()]
    inside = [f for f in train_files + test_files if (root / f).is_file()]
    if not present and inside:  # --data names the dataset's own folder, not the one above it
        where = f"give its parent, --data {root.parent}" if root.name == folder_name else \
            f"put them in a folder named {folder_name}/ inside --data"
        raise DataError(f"{what}: {root} holds the files of {folder_name}/ itself ("
                        f"{', '.join(inside)}); {where}")
    if missing and present:
        raise DataError(f"{what} in {folder} is incomplete: {', '.join(missing)} missing "
                        f"(found {', '.join(present)}); put the missing files there, from "
                        f"{CIFAR_URLS[name]}, or remove the folder to download it again")
    if missing and not download:
        raise DataError(f"{what} not found in {root} (missing {folder_name}/{missing[0]}, "
                        f"download disabled): put {files} there, from {CIFAR_URLS[name]}")
    if missing:
        # imported here: torchvision.datasets takes a second to import and is needed only now
        from torchvision.datasets import CIFAR10, CIFAR100
        from torchvision.datasets.utils import download_and_extract_archive

        source = CIFAR10 if name == "cifar10" else CIFAR100
        _download(lambda: download_and_extract_archive(source.url, root, filename=source.filename,
                                                       md5=source.tgz_md5),
                  what, files, root, CIFAR_URLS[name])
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{what}: the downloaded archive lacks {folder_name}/{missing[0]}; "
                            f"put {files} in {root}, from {CIFAR_URLS[name]}")
    parts = [_read_cifar_file(folder / f, label_key, num_classes) for f in train_files + test_files]
    train, test = parts[:len(train_files)], parts[len(train_files):]
    return (torch.cat([p[0] for p in train]), torch.cat([p[1] for p in train]),
            torch.cat([p[0] for p in test]), torch.cat([p[1] for p in test]))


def _read_cifar_file(path, label_key, num_classes):
    """One official CIFAR pickle -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as error:
        raise DataError(f"{path} is not a readable CIFAR pickle ({_one_line(error)}): "
                        "replace it with the official file") from error
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, not the dict of a CIFAR pickle")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise DataError(f"{path} lacks the 'data' or '{label_key}' entry of a CIFAR pickle")
    images = _as_uint8(entry["data"], path)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data has shape {images.shape}, expected (N, 3072)")
    labels = _labels(entry[label_key], len(images), num_classes, path)
    return torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), labels


def _as_uint8(array, path):
    array = np.asarray(array)
    if array.dtype != np.uint8:
        if (array.dtype.kind not in "iu" or array.size == 0
                or array.min() < 0 or array.max() > 255):
            raise DataError(f"{path}: image data of type {array.dtype} is not 8-bit pixels")
        array = array.astype(np.uint8)
    return array


def _labels(raw, count, num_classes, path):
    labels = np.asarray(raw).reshape(-1)
    if len(labels) != count:
        raise DataError(f"{path}: {len(labels)} labels for {count} images")
    if count and labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels of type {labels.dtype} are not integers")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels range from {labels.min()} to {labels.max()}, "
                        f"outside 0..{num_classes - 1}")
    return torch.from_numpy(labels.astype(np.int64))


def _read_svhn(root, splits, download):
    """Read root/<split>_32x32.mat for each split, downloading missing files when allowed."""
    names = [f"{split}_32x32.mat" for split in splits]
    missing = [name for name in names if not (root / name).is_file()]
    files = "the official " + ", ".join(missing)
    if missing and not download:
        raise DataError(f"SVHN not found in {root} (missing {', '.join(missing)}, download "
                        f"disabled): put {files} there, from {SVHN_URL}")
    if missing:
        # imported here: torchvision.datasets takes a second to import and is needed only now
        from torchvision.datasets import SVHN
        from torchvision.datasets.utils import download_url

        def fetch():
            for split in splits:
                url, filename, md5 = SVHN.split_list[split]
                if not (root / filename).is_file():
                    partial = filename + ".download"  # no truncated file under the real name
                    download_url(url, root, filename=partial, md5=md5)
                    os.replace(root / partial, root / filename)

        _download(fetch, "SVHN", files, root, SVHN_URL)
    return {split: _read_svhn_file(root / f"{split}_32x32.mat") for split in splits}


def _read_svhn_file(path):
    """An SVHN .mat file -> (uint8 images (N, 3, 32, 32), int64 labels with 10 mapped to 0)."""
    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:
        raise DataError(f"{path} is not a readable .mat file ({_one_line(error)}): "
                        "replace it with the official file") from error
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} lacks the 'X' or 'y' entry of an SVHN .mat file")
    images = _as_uint8(mat["X"], path)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X has shape {images.shape}, expected (32, 32, 3, N)")
    digits = np.asarray(mat["y"]).reshape(-1)
    if digits.dtype.kind == "f" and (np.mod(digits, 1) == 0).all():
        digits = digits.astype(np.int64)  # MATLAB files may store integer labels as doubles
    digits = np.where(digits == 10, 0, digits)  # SVHN's label 10 is the digit 0
    labels = _labels(digits, images.shape[3], 10, path)
    # (H, W, C, N) -> (N, C, H, W)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))), labels
