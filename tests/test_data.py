"""Unit tests for data/: readers of the official file formats, validation split, TensorLoader."""

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.transforms.v2.functional as TF

import data.datasets
from data import DATASETS, DataError, TensorLoader, load_dataset, split_validation
from data.loader import crop_flip
from data.throughput import measure_throughput

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "cifar10-subset"
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def random_images(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def normalise(images, mean=MEAN, std=STD):
    """The loader's normalisation, written out: (x / 255 - mean) / std per channel, as
    x * (1 / (255 std)) + (-mean / std) with both factors in float32, the product and the sum
    each rounded to float32 (both exact in float64 before that: x has 8 bits, the rest 24)."""
    mean = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    scale, shift = (1 / (255 * std)).float().double(), (-mean / std).float().double()
    return ((images.double() * scale).float().double() + shift).float()


def reference_augment(image, top, left, flip):
    """torchvision's RandomCrop(32, padding=4) + horizontal flip, at the given offsets."""
    out = TF.crop(TF.pad(image, [4], fill=0), top, left, 32, 32)
    return TF.horizontal_flip(out) if flip else out


def epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def write_pickle(path, entry, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=protocol)


def write_cifar10(folder, count=6, seed=0, labels=None):
    """A small CIFAR-10 folder in the official layout; returns {file name: (data, labels)}."""
    folder = Path(folder) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        file_labels = list(rng.integers(0, 10, count)) if labels is None else labels
        file_labels = [int(v) for v in file_labels]
        write_pickle(folder / name, {"batch_label": name, "labels": file_labels, "data": rows,
                                     "filenames": [f"{name}_{i}.png" for i in range(count)]})
        written[name] = (rows, file_labels)
    return written


def write_svhn(folder, sizes, seed=0):
    """Small SVHN .mat files in the official format: X (32, 32, 3, N) uint8, y (N, 1) in 1..10."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in sizes.items():
        x = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        y = rng.integers(1, 11, (count, 1), dtype=np.uint8)
        y[0, 0] = 10  # the digit 0
        scipy.io.savemat(Path(folder) / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


# ---------------------------------------------------------------- augmentation and normalisation

def test_crop_flip_matches_torchvision_pad_crop_flip():
    images = random_images(12)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [4, 4], [1, 7],
                            [3, 2], [0, 0], [8, 8], [2, 5], [7, 1], [4, 0]])
    flips = torch.tensor([False, False, True, True, False, True,
                          True, True, True, False, False, True])
    crops = crop_flip(images, offsets, flips)
    assert crops.dtype == torch.uint8 and crops.shape == images.shape
    cases = zip(images, crops, offsets.tolist(), flips.tolist(), strict=True)
    for image, crop, (top, left), flip in cases:
        assert torch.equal(crop, reference_augment(image, top, left, flip))


def test_normalisation_matches_torchvision():
    images = random_images(5)
    loader = TensorLoader(images, torch.zeros(5, dtype=torch.int64), 5, MEAN, STD, "cpu")
    (inputs, _), = list(loader)
    reference = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), list(MEAN), list(STD))
    torch.testing.assert_close(inputs, reference, rtol=0, atol=1e-5)


def test_plain_loader_returns_the_normalised_images_in_order():
    images, labels = random_images(10), torch.arange(10) % 3
    loader = TensorLoader(images, labels, 4, MEAN, STD, "cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert inputs.dtype == torch.float32 and inputs.shape == (10, 3, 32, 32)
    assert targets.dtype == torch.int64
    assert torch.equal(inputs, normalise(images))
    assert torch.equal(targets, labels)
    assert torch.equal(torch.cat([x for x, _ in loader]), inputs)  # and again the next epoch


def test_drop_last():
    images, labels = random_images(10), torch.arange(10)
    loader = TensorLoader(images, labels, 4, MEAN, STD, "cpu", drop_last=True)
    assert len(loader) == 2
    assert [len(y) for _, y in loader] == [4, 4]


def matching_augmentations(images, output, image_id, flips=(False, True)):
    """All (top, left, flip) whose reference augmentation of image image_id equals output."""
    return [(top, left, flip) for top in range(9) for left in range(9) for flip in flips
            if torch.equal(normalise(reference_augment(images[image_id], top, left, flip)),
                           output)]


@pytest.mark.parametrize("flip", [True, False])
def test_augmented_loader_yields_padded_crops_and_flips(flip):
    count = 32
    images, ids = random_images(count), torch.arange(count)
    loader = TensorLoader(images, ids, 8, MEAN, STD, "cpu", shuffle=True, augment=True,
                          flip=flip, generator=torch.Generator().manual_seed(3))
    seen, used = [], set()
    for inputs, targets in loader:
        for output, image_id in zip(inputs, targets.tolist(), strict=True):
            matches = matching_augmentations(images, output, image_id,
                                             (False, True) if flip else (False,))
            assert len(matches) == 1, f"image {image_id}: not a padded crop (or flip) of its input"
            seen.append(image_id)
            used.add(matches[0])
    assert sorted(seen) == list(range(count))
    assert seen != list(range(count))  # shuffled
    assert len({(top, left) for top, left, _ in used}) > 5  # offsets vary
    assert {f for _, _, f in used} == ({False, True} if flip else {False})


# ---------------------------------------------------------------- determinism and sharding

def make_loader(images, labels, seed, **kwargs):
    return TensorLoader(images, labels, 8, MEAN, STD, "cpu", shuffle=True, augment=True,
                        generator=torch.Generator().manual_seed(seed), **kwargs)


def test_same_generator_state_gives_identical_batches():
    images, labels = random_images(40), torch.arange(40)
    first, second = make_loader(images, labels, 7), make_loader(images, labels, 7)
    for _ in range(2):
        a, b = epoch(first), epoch(second)
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
                   for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    other = epoch(make_loader(images, labels, 8))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, other, strict=True))


def test_restoring_the_generator_state_reproduces_the_next_epoch():
    images, labels = random_images(40), torch.arange(40)
    generator = torch.Generator().manual_seed(5)
    loader = TensorLoader(images, labels, 8, MEAN, STD, "cpu", shuffle=True, augment=True,
                          generator=generator)
    first = epoch(loader)
    state = generator.get_state()
    second = epoch(loader)
    assert not torch.equal(first[0][0], second[0][0])  # epochs differ
    resumed = torch.Generator()
    resumed.set_state(state)
    again = epoch(TensorLoader(images, labels, 8, MEAN, STD, "cpu", shuffle=True, augment=True,
                               generator=resumed))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for (x1, y1), (x2, y2) in zip(second, again, strict=True))


def test_shards_are_disjoint_equal_and_independent_of_world_size():
    count, world_size = 50, 3
    images, ids = random_images(count), torch.arange(count)
    single = {}
    for inputs, targets in make_loader(images, ids, 11):
        single.update(zip(targets.tolist(), inputs, strict=True))
    shards = []
    for rank in range(world_size):
        loader = make_loader(images, ids, 11, rank=rank, world_size=world_size)
        batches = epoch(loader)
        assert len(loader) == len(batches) == 2  # 16 images per rank: batches of 8
        shard = [i for _, y in batches for i in y.tolist()]
        assert len(shard) == count // world_size
        shards.append(shard)
        for inputs, targets in batches:  # same image, same crop and flip as in one process
            for output, image_id in zip(inputs, targets.tolist(), strict=True):
                assert torch.equal(output, single[image_id])
    everything = [i for shard in shards for i in shard]
    assert len(set(everything)) == len(everything) == count - count % world_size


def test_every_rank_gets_the_same_number_of_batches():
    images, labels = random_images(23), torch.arange(23)
    lengths = {len(epoch(make_loader(images, labels, 0, rank=r, world_size=4))) for r in range(4)}
    assert lengths == {1}  # 5 images per rank, the remainder of 3 is dropped


def test_throughput_measurement_runs():
    rate = measure_throughput("cpu", batch_size=16, images=64, epochs=1)
    assert 0 < rate < float("inf")


# ---------------------------------------------------------------- argument validation

@pytest.mark.parametrize("change", [
    {"batch_size": 0}, {"batch_size": -1}, {"batch_size": 2.5}, {"batch_size": True},
    {"mean": (0.5, 0.5)}, {"std": (0.2, 0.0, 0.2)}, {"shuffle": "yes"},
    {"shuffle": True, "generator": None}, {"augment": True, "generator": None},
    {"rank": 2, "world_size": 2}, {"rank": -1}, {"world_size": 0},
    {"labels": torch.zeros(3, dtype=torch.int64)}, {"labels": torch.zeros(4)},
    {"images": torch.zeros(4, 3, 32, 32)},
])
def test_loader_rejects_invalid_arguments(change):
    kwargs = {"images": random_images(4), "labels": torch.zeros(4, dtype=torch.int64),
              "batch_size": 2, "mean": MEAN, "std": STD, "device": "cpu",
              "generator": torch.Generator(), **change}
    with pytest.raises(ValueError):
        TensorLoader(**kwargs)


# ---------------------------------------------------------------- validation split

def test_split_validation_sizes_disjoint_and_seeded():
    images, ids = random_images(30), torch.arange(30)
    train_x, train_y, valid_x, valid_y = split_validation(images, ids, 7, seed=1)
    assert len(train_x) == len(train_y) == 23 and len(valid_x) == len(valid_y) == 7
    assert set(train_y.tolist()).isdisjoint(valid_y.tolist())
    assert sorted(train_y.tolist() + valid_y.tolist()) == list(range(30))
    assert torch.equal(train_x, images[train_y]) and torch.equal(valid_x, images[valid_y])
    assert torch.equal(split_validation(images, ids, 7, seed=1)[3], valid_y)
    assert not torch.equal(split_validation(images, ids, 7, seed=2)[3], valid_y)


def test_split_validation_of_zero_gives_empty_validation_tensors():
    images, labels = random_images(5), torch.arange(5)
    train_x, train_y, valid_x, valid_y = split_validation(images, labels, 0, seed=0)
    assert torch.equal(train_x, images) and torch.equal(train_y, labels)
    assert valid_x.shape == (0, 3, 32, 32) and valid_x.dtype == torch.uint8
    assert valid_y.shape == (0,) and valid_y.dtype == torch.int64


@pytest.mark.parametrize("valid_size", [-1, 5, 6, 1.5, True, "2"])
def test_split_validation_rejects_invalid_sizes(valid_size):
    with pytest.raises(ValueError):
        split_validation(random_images(5), torch.arange(5), valid_size, seed=0)


# ---------------------------------------------------------------- datasets

def test_fake_dataset_is_deterministic():
    first = load_dataset("fake", None, fake_size=(20, 6))
    second = load_dataset("fake", None, fake_size=(20, 6))
    assert first.train_images.shape == (20, 3, 32, 32) and first.test_images.shape == (6, 3, 32, 32)
    assert first.train_images.dtype == torch.uint8 and first.train_labels.dtype == torch.int64
    assert first.num_classes == 10 and first.flip
    assert 0 <= first.train_labels.min() and first.train_labels.max() < 10
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert not torch.equal(first.train_images[:6], first.test_images)


@pytest.mark.parametrize("fake_size", [(0, 5), (5,), (5, -1), (5.0, 5), "5,5"])
def test_fake_dataset_rejects_invalid_sizes(fake_size):
    with pytest.raises(ValueError):
        load_dataset("fake", None, fake_size=fake_size)


def test_unknown_dataset_and_misplaced_svhn_extra_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="svhn_extra"):
        load_dataset("cifar10", tmp_path, svhn_extra=True, download=False)
    assert DATASETS == ("cifar10", "cifar100", "svhn", "folder", "fake")


def numpy_stats(images):
    pixels = images.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255
    return pixels.mean(axis=1), pixels.std(axis=1)


def test_cifar100_reader_on_files_in_the_official_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    written = {}
    for name, count in (("train", 20), ("test", 10)):
        rows = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, count)]
        fine[0] = 99
        write_pickle(folder / name, {"filenames": [f"{i}.png" for i in range(count)],
                                     "batch_label": name, "fine_labels": fine,
                                     "coarse_labels": [v // 5 for v in fine], "data": rows})
        written[name] = (rows, fine)
    dataset = load_dataset("cifar100", tmp_path, download=False)
    assert dataset.name == "cifar100" and dataset.num_classes == 100 and dataset.flip
    rows, fine = written["train"]
    assert torch.equal(dataset.train_images, torch.from_numpy(rows).view(20, 3, 32, 32))
    assert dataset.train_labels.tolist() == fine
    rows, fine = written["test"]
    assert torch.equal(dataset.test_images, torch.from_numpy(rows).view(10, 3, 32, 32))
    assert dataset.test_labels.tolist() == fine
    mean, std = numpy_stats(dataset.train_images)
    np.testing.assert_allclose(dataset.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(dataset.std, std, rtol=1e-12)


def test_cifar10_reader_accepts_bytes_keys(tmp_path):
    written = write_cifar10(tmp_path, count=3)
    folder = tmp_path / "cifar-10-batches-py"
    for name, (rows, labels) in written.items():  # as pickled by Python 3 with bytes keys
        write_pickle(folder / name, {b"labels": labels, b"data": rows}, protocol=4)
    dataset = load_dataset("cifar10", tmp_path, download=False)
    assert dataset.train_images.shape == (15, 3, 32, 32) and dataset.test_images.shape[0] == 3
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(dataset.train_images.view(15, -1), torch.from_numpy(expected))
    assert dataset.test_labels.tolist() == written["test_batch"][1]


def test_svhn_reader_on_files_in_the_official_format(tmp_path):
    written = write_svhn(tmp_path, {"train": 7, "test": 5, "extra": 4})
    dataset = load_dataset("svhn", tmp_path, download=False)
    assert dataset.num_classes == 10 and not dataset.flip
    assert dataset.train_images.shape == (7, 3, 32, 32) and dataset.test_images.shape[0] == 5
    assert dataset.train_images.is_contiguous()
    x, y = written["train"]
    n, c, h, w = 6, 2, 5, 17
    assert dataset.train_images[n, c, h, w] == x[h, w, c, n]
    assert torch.equal(dataset.train_images, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert dataset.train_labels.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]
    assert dataset.train_labels[0] == 0  # label 10 means the digit 0

    extra = load_dataset("svhn", tmp_path, svhn_extra=True, download=False)
    assert extra.train_images.shape[0] == 11
    assert torch.equal(extra.train_images[:7], dataset.train_images)
    extra_images = torch.from_numpy(written["extra"][0]).permute(3, 2, 0, 1)
    assert torch.equal(extra.train_images[7:], extra_images)
    mean, _ = numpy_stats(extra.train_images)
    np.testing.assert_allclose(extra.mean, mean, rtol=1e-12)


def test_svhn_without_extra_file_names_it(tmp_path):
    write_svhn(tmp_path, {"train": 3, "test": 3})
    with pytest.raises(DataError, match="extra_32x32.mat"):
        load_dataset("svhn", tmp_path, svhn_extra=True, download=False)


@pytest.mark.skipif(not SUBSET.is_dir(), reason=f"{SUBSET} is absent")
def test_real_cifar10_subset():
    dataset = load_dataset("cifar10", SUBSET, download=False)
    assert dataset.train_images.shape == (5085, 3, 32, 32)
    assert dataset.test_images.shape == (1017, 3, 32, 32)
    assert dataset.train_images.dtype == dataset.test_images.dtype == torch.uint8
    assert dataset.train_images.is_contiguous()
    assert dataset.train_labels.shape == (5085,) and dataset.test_labels.shape == (1017,)
    for labels in (dataset.train_labels, dataset.test_labels):
        assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    with open(SUBSET / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    first = torch.from_numpy(batch["data"][0]).view(3, 32, 32)
    assert torch.equal(dataset.train_images[1017], first)
    assert dataset.train_labels[1017] == batch["labels"][0]
    mean, std = numpy_stats(dataset.train_images)
    np.testing.assert_allclose(dataset.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(dataset.std, std, rtol=1e-9)


# ---------------------------------------------------------------- clear errors

def assert_one_line(error, *parts):
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    assert_one_line(error, tmp_path / "nowhere", "cifar-10-batches-py", "data_batch_1..5",
                    "test_batch", "cifar-10-python.tar.gz")
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path, download=False)
    assert_one_line(error, tmp_path, "train_32x32.mat")


def test_failed_download_says_which_files_to_put_where(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # never touch the network in tests: the download helpers fail as they would offline
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    timeout = data.datasets.socket.getdefaulttimeout()
    with pytest.raises(DataError) as error:
        load_dataset("cifar100", tmp_path, download=True)
    assert_one_line(error, "could not be downloaded", "no network", tmp_path, "cifar-100-python",
                    "cifar-100-python.tar.gz")
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path, download=True)
    assert_one_line(error, "could not be downloaded", tmp_path, "train_32x32.mat")
    assert data.datasets.socket.getdefaulttimeout() == timeout  # the download timeout is undone


@pytest.mark.parametrize("damage", ["truncated", "not a pickle", "wrong shape", "label range",
                                    "label count", "not a dict", "code"])
def test_damaged_cifar_file_is_named(tmp_path, damage):
    written = write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    rows, labels = written["data_batch_3"]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "not a pickle":
        path.write_text("<html>404 Not Found</html>")
    elif damage == "wrong shape":
        write_pickle(path, {"data": rows[:, :3000], "labels": labels})
    elif damage == "label range":
        write_pickle(path, {"data": rows, "labels": labels[:-1] + [10]})
    elif damage == "label count":
        write_pickle(path, {"data": rows, "labels": labels[:-1]})
    elif damage == "not a dict":
        write_pickle(path, [rows, labels])
    else:  # a pickle that would run code when loaded by pickle.load
        write_pickle(path, {"data": rows, "labels": labels, "x": Path("evil")})
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", tmp_path, download=False)
    assert_one_line(error, path)


@pytest.mark.parametrize("damage", ["length mismatch", "wrong shape", "label range",
                                    "truncated", "missing y"])
def test_damaged_svhn_file_is_named(tmp_path, damage):
    written = write_svhn(tmp_path, {"train": 6, "test": 4})
    path = tmp_path / "test_32x32.mat"
    x, y = written["test"]
    if damage == "length mismatch":
        scipy.io.savemat(path, {"X": x, "y": y[:3]})
    elif damage == "wrong shape":
        scipy.io.savemat(path, {"X": x[:, :, :2], "y": y})
    elif damage == "label range":
        scipy.io.savemat(path, {"X": x, "y": y + 10})
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        scipy.io.savemat(path, {"X": x})
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path, download=False)
    assert_one_line(error, path)
