"""Unit tests of folder data: decoding (data/images.py), scanning and FolderLoader (data/folder.py).

The image files are written here, by PIL, in the formats and modes users have."""

import io
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch.multiprocessing.reductions import StorageWeakRef

import data.folder
from data import DataError
from data.folder import FolderLoader, find_images, load_folder, sample_stats, scan_folder
from data.images import (
    MAX_PIXELS,
    ImageError,
    decode,
    eval_resize_size,
    eval_transform,
    random_crop_box,
    read_image,
    train_transform,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def photo(height, width, seed=0, tint=None):
    """A smooth random RGB image (H, W, 3) uint8, optionally tinted towards a colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(max(2, height // 6), max(2, width // 6), 3)).cumsum(0).cumsum(1)
    coarse = (coarse - coarse.min()) / max(np.ptp(coarse), 1e-9) * 255
    image = np.array(Image.fromarray(coarse.astype(np.uint8)).resize((width, height),
                                                                     Image.BICUBIC))
    if tint is not None:
        image = (0.5 * image + 0.5 * np.array(tint)).astype(np.uint8)
    return image


def encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pil_rgb(data, exif=False):
    """What PIL makes of a file: the reference for every lossless case and for JPEG."""
    image = Image.open(io.BytesIO(data))
    if exif:
        image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))


def decoded(data):
    return decode(bytearray(data)).permute(1, 2, 0).numpy()


BASE = Image.fromarray(photo(45, 60))
ROTATED = BASE.getexif()
ROTATED[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
CASES = {
    "jpeg": lambda: encode(BASE, "JPEG", quality=90),
    "png": lambda: encode(BASE, "PNG"),
    "webp": lambda: encode(BASE, "WEBP", lossless=True),
    "webp lossy": lambda: encode(BASE, "WEBP", quality=80),
    "bmp": lambda: encode(BASE, "BMP"),
    "tiff": lambda: encode(BASE, "TIFF"),
    "ppm": lambda: encode(BASE, "PPM"),
    "gif": lambda: encode(BASE.convert("P"), "GIF"),
    "grayscale jpeg": lambda: encode(BASE.convert("L"), "JPEG"),
    "grayscale png": lambda: encode(BASE.convert("L"), "PNG"),
    "grayscale + alpha png": lambda: encode(BASE.convert("LA"), "PNG"),
    "palette png": lambda: encode(BASE.convert("P"), "PNG"),
    "palette png with transparency": lambda: encode(BASE.convert("P"), "PNG", transparency=0),
    "1-bit png": lambda: encode(BASE.convert("1"), "PNG"),
    "rgba png": lambda: encode(BASE.convert("RGBA"), "PNG"),
    "cmyk jpeg": lambda: encode(BASE.convert("CMYK"), "JPEG", quality=90),
    "cmyk tiff": lambda: encode(BASE.convert("CMYK"), "TIFF"),
}


@pytest.mark.parametrize("case", CASES)
def test_every_common_format_and_mode_decodes_to_rgb_as_pil_does(case):
    data = CASES[case]()
    image = decoded(data)
    assert image.dtype == np.uint8 and image.shape == (45, 60, 3)
    np.testing.assert_array_equal(image, pil_rgb(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(fmt):
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(BASE, fmt, exif=ROTATED.tobytes(), **options)
    image = decoded(data)
    assert image.shape == (60, 45, 3)  # stored 60 wide and 45 high, shown rotated
    np.testing.assert_array_equal(image, pil_rgb(data, exif=True))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(fmt):
    values = (np.arange(45 * 60).reshape(45, 60) * 24).astype(np.uint16)  # up to 64,776
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    image = decoded(data)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], values >> 8)


def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.fromarray(photo(30, 40, seed)).convert("P") for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 3
    np.testing.assert_array_equal(decoded(buffer.getvalue()), pil_rgb(buffer.getvalue()))


def huge_png_header():
    """The first bytes of a PNG claiming 100,000 x 100,000 pixels."""
    return encode(Image.new("RGB", (8, 8)), "PNG")[:16] + (100000).to_bytes(4, "big") * 2 + \
        bytes(40)


BAD = {
    "truncated jpeg": (lambda: CASES["jpeg"]()[:600], "incomplete or truncated"),
    "truncated png": (lambda: CASES["png"]()[:300], "cannot decode this PNG file"),
    "text file named .jpg": (lambda: b"just some notes, not an image\n", "not an image file"),
    "zero bytes": (lambda: b"", "empty file"),
    "a header claiming 10^10 pixels": (huge_png_header, "100000x100000 pixels, more than"),
}


@pytest.mark.parametrize("case", BAD)
def test_unreadable_images_raise_a_one_line_image_error(case, tmp_path):
    make, expected = BAD[case]
    path = tmp_path / "image.jpg"
    path.write_bytes(make())
    with pytest.raises(ImageError) as caught:
        read_image(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and ".cpp" not in message


def test_missing_and_unreadable_paths_raise_image_errors(tmp_path):
    with pytest.raises(ImageError, match="No such file"):
        read_image(tmp_path / "absent.jpg")
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    with pytest.raises(ImageError, match="symbolic links"):
        read_image(loop)


def test_a_10000_x_10000_image_is_decoded_and_transformed(tmp_path):
    # A grayscale JPEG, as a scanner writes: 300 MB once decoded to RGB.
    path = tmp_path / "large.jpg"
    image = np.zeros((10000, 10000), dtype=np.uint8)
    image[:, 5000:] = 200
    Image.fromarray(image).save(path, quality=90)
    del image
    decoded_image = read_image(path)
    assert decoded_image.shape == (3, 10000, 10000) and MAX_PIXELS > 10000 * 10000
    small = eval_transform(decoded_image, 32, eval_resize_size(32))
    assert small.shape == (3, 32, 32)
    assert small[:, :, 0].max() <= 2 and small[:, :, -1].min() >= 198  # black left, grey right
    assert train_transform(decoded_image, 32, random.Random(0)).shape == (3, 32, 32)


# ---------------------------------------------------------------------------- transforms

def test_crop_boxes_follow_torchvision_random_resized_crop():
    rng = random.Random(0)
    for height, width in [(375, 500), (500, 375), (32, 32), (33, 1000), (1000, 20), (1, 1)]:
        fallbacks = 0
        for _ in range(300):
            top, left, crop_height, crop_width = random_crop_box(height, width, rng)
            assert 0 <= top <= height - crop_height and 0 <= left <= width - crop_width
            assert crop_height >= 1 and crop_width >= 1
            scale = crop_height * crop_width / (height * width)
            ratio = crop_width / crop_height
            within = 0.08 - 0.02 <= scale <= 1 + 1e-9 and 3 / 4 - 0.1 <= ratio <= 4 / 3 + 0.1
            fallbacks += not within
        if (height, width) in [(375, 500), (500, 375)]:
            assert fallbacks == 0
    # Beyond the aspect ratios, torchvision's fallback: the largest centre crop within them.
    assert random_crop_box(33, 1000, _NoFit()) == (0, 478, 33, 44)
    assert random_crop_box(1000, 20, _NoFit()) == (486, 0, 27, 20)


class _NoFit(random.Random):
    """Draws areas far above the image's, so that no try fits: always the fallback."""

    def uniform(self, low, high):
        return high * 1000


def test_the_same_seed_draws_the_same_crop_and_flip():
    image = torch.from_numpy(photo(45, 60)).permute(2, 0, 1)
    first = train_transform(image, 24, random.Random(12345))
    assert torch.equal(first, train_transform(image, 24, random.Random(12345)))
    crops = {train_transform(image, 24, random.Random(seed)).sum().item() for seed in range(20)}
    assert len(crops) > 15


@pytest.mark.parametrize("height, width, size", [(45, 60, 24), (375, 500, 224), (20, 30, 64)])
def test_training_transform_is_torchvisions_resized_crop_and_flip(height, width, size):
    image = torch.from_numpy(photo(height, width)).permute(2, 0, 1)
    flips = set()
    for seed in range(10):
        rng = random.Random(seed)
        box = random_crop_box(height, width, rng)
        flip = rng.random() < 0.5
        flips.add(flip)
        expected = TF.resized_crop(image, *box, [size, size], antialias=True)
        expected = TF.horizontal_flip(expected) if flip else expected
        assert torch.equal(train_transform(image, size, random.Random(seed)), expected)
        unflipped = train_transform(image, size, random.Random(seed), flip=False)
        assert torch.equal(unflipped, TF.resized_crop(image, *box, [size, size], antialias=True))
    assert flips == {False, True}


@pytest.mark.parametrize("height, width", [(45, 60), (60, 45), (32, 32), (300, 20)])
def test_evaluation_transform_is_torchvisions_resize_and_centre_crop(height, width):
    image = torch.from_numpy(photo(height, width)).permute(2, 0, 1)
    reference = T.Compose([T.Resize(eval_resize_size(28, True)), T.CenterCrop(28)])
    assert eval_resize_size(224, pretrained=True) == 256 and eval_resize_size(224) == 224
    assert torch.equal(eval_transform(image, 28, eval_resize_size(28, True)), reference(image))


def test_evaluation_at_the_images_own_size_is_the_image():
    image = torch.from_numpy(photo(32, 32)).permute(2, 0, 1)
    assert torch.equal(eval_transform(image, 32, 32), image)


# ---------------------------------------------------------------------------- scanning

def write_image(path, size=(40, 48), seed=0, fmt=None, tint=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo(*size, seed=seed, tint=tint)).save(path, fmt)
    return path


def write_folder(root, splits=None):
    """{split: {class: number of images}} as JPEGs of tinted photos; returns root."""
    splits = splits or {"train": {"cat": 3, "dog": 4}}
    tints = {"cat": (255, 0, 0), "dog": (0, 0, 255), "fox": (0, 255, 0)}
    for split, classes in splits.items():
        for name, count in classes.items():
            for i in range(count):
                write_image(Path(root, split, name, f"{i:03d}.jpg"), seed=i,
                            tint=tints.get(name))
    return Path(root)


def test_scan_reads_classes_and_splits_and_counts_what_it_ignores(tmp_path):
    root = write_folder(tmp_path, {"train": {"cat": 3, "dog": 4}, "test": {"dog": 2}})
    write_image(root / "train" / "cat" / "nested" / "deeper.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / "._000.jpg").write_bytes(b"macOS metadata")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "stray.jpg").write_bytes(b"outside any class")
    (root / "README.md").write_text("about")
    classes, splits, notes = scan_folder(str(root))
    assert classes == ["cat", "dog"]
    paths, labels = splits["train"]
    assert [os.path.relpath(p, root) for p in paths] == [
        "train/cat/000.jpg", "train/cat/001.jpg", "train/cat/002.jpg",
        "train/cat/nested/deeper.png", *[f"train/dog/{i:03d}.jpg" for i in range(4)]]
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert splits["val"] is None and splits["test"][1].tolist() == [1, 1]
    assert "ignored  4 files (not images, or hidden): train/.ipynb_checkpoints, " \
        "train/cat/._000.jpg, train/cat/notes.txt, ..." in notes
    assert any("README.md" in line for line in notes), notes


@pytest.mark.parametrize("layout, expected", [
    (lambda root: None, "is not a folder"),
    (lambda root: write_folder(root, {"val": {"cat": 1}}), "has no train/ folder"),
    (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    (lambda root: (write_folder(root), (root / "train" / "fox").mkdir(),
                   (root / "train" / "fox" / "notes.txt").write_text("x")),
     "train/fox holds no image files"),
    (lambda root: write_folder(root, {"train": {"cat": 2}, "val": {"cat": 1, "fox": 1}}),
     "the class 'fox' in"),
    (lambda root: write_folder(root, {"train": {"cat": 2}, "test": {"fox": 1}}),
     "the class 'fox' in"),
])
def test_layouts_that_cannot_train_are_refused_in_one_line(tmp_path, layout, expected):
    root = tmp_path / "data"
    layout(root)
    with pytest.raises(DataError) as caught:
        scan_folder(str(root))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_link_that_loops_is_reported_not_followed(tmp_path):
    root = write_folder(tmp_path)
    (root / "train" / "cat" / "again").symlink_to(root / "train" / "cat")
    (root / "train" / "cat" / "up").symlink_to(root / "train")
    (root / "train" / "dog" / "elsewhere").symlink_to(tmp_path / "absent")
    classes, splits, notes = scan_folder(str(root))
    assert len(splits["train"][0]) == 7
    assert "ignored  2 folder links looping back (not followed): train/cat/again, train/cat/up" \
        in notes
    assert any("train/dog/elsewhere" in line for line in notes)  # a broken link: not an image


def test_find_images_lists_a_folder_for_predictions(tmp_path):
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "sub" / "a.jpg")
    (tmp_path / "list.txt").write_text("x")
    images, ignored, loops = find_images(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in images] == ["b.png", "sub/a.jpg"]
    assert ignored == ["list.txt"] and loops == []


# Root reads any file, so the check drops to the user nobody after Python has started (the
# interpreter may live where nobody cannot go) and has run the code once on a readable folder.
AS_NOBODY = """
import os, sys
from data import DataError
from data.folder import load_folder
load_folder(sys.argv[1], 32, 37, workers=0)
os.setgid(65534)
os.setuid(65534)
for root in sys.argv[2:]:
    try:
        load_folder(root, 32, 37, workers=0)
    except DataError as error:
        print(error)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become the user nobody")
def test_unreadable_permissions_give_one_line(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))  # a folder nobody may enter
    try:
        top.chmod(0o755)
        readable = write_folder(top / "readable")
        root = write_folder(top / "data", {"train": {"cat": 2, "dog": 2}})
        root_2 = write_folder(top / "data_2", {"train": {"cat": 2, "dog": 2}})
        for path in top.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)

        (root / "train" / "cat" / "000.jpg").chmod(0)
        (root_2 / "train" / "dog").chmod(0)
        run = subprocess.run([sys.executable, "-c", AS_NOBODY, str(readable), str(root),
                              str(root_2)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.stdout.splitlines() == [
            f"cannot read the image {root}/train/cat/000.jpg: Permission denied; remove or "
            f"replace the file, or pass --skip_bad_images True",
            f"cannot read the folder {root_2}/train/dog: Permission denied"], run.stderr
    finally:
        for path in top.rglob("*"):
            path.chmod(0o755)
        subprocess.run(["rm", "-rf", str(top)], check=True)


# ---------------------------------------------------------------------------- the loader

@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """38 training images of various sizes and formats, 2 classes; 6 test images."""
    root = tmp_path_factory.mktemp("small")
    sizes = [(40, 48), (48, 40), (33, 90), (64, 64), (20, 30)]
    for i in range(38):
        name = ("cat", "dog")[i % 2]
        fmt = ("jpg", "png", "webp")[i % 3]
        write_image(root / "train" / name / f"{i:03d}.{fmt}", sizes[i % 5], seed=i)
    write_folder(root, {"test": {"cat": 3, "dog": 3}})
    return root


def paths_and_labels(root, split="train"):
    _, splits, _ = scan_folder(str(root))
    return splits[split]


def folder_loader(root, workers=0, seed=5, batch_size=8, **kwargs):
    paths, labels = paths_and_labels(root)
    options = dict(shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed))
    options.update(kwargs)
    return FolderLoader(paths, labels, batch_size, MEAN, STD, "cpu", 24, 27, workers=workers,
                        **options)


def epoch(loader, skip=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(skip)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_yields_normalised_float_batches_and_int64_targets(small_folder):
    loader = folder_loader(small_folder, shuffle=False, augment=False)
    batches = epoch(loader)
    assert len(loader) == len(batches) == 5  # 38 images, batch 8
    inputs, targets = batches[0]
    assert inputs.dtype == torch.float32 and inputs.shape == (8, 3, 24, 24)
    assert targets.dtype == torch.int64 and targets.tolist() == [0, 0, 0, 0, 0, 0, 0, 0]
    paths, labels = paths_and_labels(small_folder)
    first = eval_transform(read_image(paths[0]), 24, 27).float() / 255
    expected = (first - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(inputs[0], expected, rtol=0, atol=1e-6)
    assert torch.cat([y for _, y in batches]).tolist() == labels.tolist()


def test_batches_are_the_same_for_any_number_of_workers_and_after_a_skip(small_folder):
    reference = epoch(folder_loader(small_folder, workers=0))
    assert_same_batches(epoch(folder_loader(small_folder, workers=2)), reference)
    assert_same_batches(epoch(folder_loader(small_folder, workers=3), skip=2), reference[2:])
    assert epoch(folder_loader(small_folder, workers=2), skip=len(reference)) == []
    other = epoch(folder_loader(small_folder, workers=0, seed=6))
    assert not torch.equal(other[0][0], reference[0][0])


def test_workers_reuse_shared_batches_but_never_one_still_in_use(small_folder):
    reference = epoch(folder_loader(small_folder, batch_size=2))  # 19 batches
    ring = 2 * data.folder.PREFETCH + 2
    # Weak references keep each storage's identity (its address is not recycled meanwhile).
    storages = set()
    for (x, y), (x_ref, y_ref) in zip(folder_loader(small_folder, workers=2, batch_size=2),
                                      reference, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        storages.add(StorageWeakRef(x.untyped_storage()))
    assert len(storages) == ring < len(reference)  # dropped batches come round again
    kept = list(folder_loader(small_folder, workers=2, batch_size=2))  # none dropped
    assert_same_batches(kept, reference)
    assert len({StorageWeakRef(x.untyped_storage()) for x, _ in kept}) == len(reference)
    views = [x[:1] for x, _ in folder_loader(small_folder, workers=2, batch_size=2)]
    assert all(torch.equal(view, x[:1]) for view, (x, _) in zip(views, reference, strict=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_batches_travel_as_uint8_and_equal_the_cpus(small_folder):
    # The GPU path: workers send uint8 through pinned memory, normalised on the GPU.
    paths, labels = paths_and_labels(small_folder)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = FolderLoader(paths, labels, 8, MEAN, STD, device, 24, 27, shuffle=True,
                              augment=True, generator=torch.Generator().manual_seed(5), workers=2)
        assert (loader.reader.normalise is None) == (device == "cuda")
        batches[device] = epoch(loader)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert x_gpu.device.type == y_gpu.device.type == "cuda" and x_gpu.dtype == torch.float32
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=0, atol=1e-6)
        assert torch.equal(y_gpu.cpu(), y_cpu)


def test_loading_leaves_torchs_global_random_state_alone(small_folder):
    state = torch.get_rng_state()
    epoch(folder_loader(small_folder, workers=2))
    assert torch.equal(torch.get_rng_state(), state)


def test_restoring_the_generator_state_replays_the_epoch(small_folder):
    loader = folder_loader(small_folder, workers=2)
    epoch(loader)
    state = loader.generator.get_state()
    second = epoch(loader)
    loader.generator.set_state(state)
    assert_same_batches(epoch(loader, skip=1), second[1:])


def test_shards_are_disjoint_and_each_image_gets_the_same_augmentation(small_folder):
    whole = epoch(folder_loader(small_folder, drop_last=False))
    images = torch.cat([x for x, _ in whole])
    shards = [epoch(folder_loader(small_folder, rank=rank, world_size=3)) for rank in range(3)]
    assert len({len(shard) for shard in shards}) == 1
    for rank, shard in enumerate(shards):
        got = torch.cat([x for x, _ in shard])
        assert len(got) == 38 // 3
        # Rank r takes every 3rd position of the epoch's order, with the same draws.
        assert torch.equal(got, images[rank:3 * (38 // 3):3])


def bad_folder(root):
    write_folder(root, {"train": {"cat": 6, "dog": 6}})
    (root / "train" / "cat" / "002.jpg").write_bytes(b"")
    data = (root / "train" / "dog" / "003.jpg").read_bytes()
    (root / "train" / "dog" / "003.jpg").write_bytes(data[:len(data) // 3])
    return root


def test_an_unreadable_image_stops_with_one_line_naming_it(tmp_path):
    root = bad_folder(tmp_path)
    loader = folder_loader(root, workers=2, shuffle=False, augment=False, hint="; a hint")
    with pytest.raises(DataError) as caught:
        epoch(loader)
    message = str(caught.value)
    assert message == (f"cannot read the image {root}/train/cat/002.jpg: empty file (0 bytes)"
                       f"; a hint")


def test_unreadable_images_are_skipped_and_reported_once_when_asked(tmp_path):
    root = bad_folder(tmp_path)
    reported = []
    loader = folder_loader(root, workers=2, skip_bad=True, report=reported.append)
    first, second = epoch(loader), epoch(loader)
    assert sum(len(y) for _, y in first) == sum(len(y) for _, y in second) == 10
    assert len(reported) == 2 and set(loader.skipped) == {
        str(root / "train" / "cat" / "002.jpg"), str(root / "train" / "dog" / "003.jpg")}
    assert "truncated" in loader.skipped[str(root / "train" / "dog" / "003.jpg")]
    assert reported[1].endswith("(2 unreadable images skipped so far)")


def test_a_batch_of_nothing_but_unreadable_images_stops(tmp_path):
    root = write_folder(tmp_path, {"train": {"cat": 2}})
    for path in (root / "train" / "cat").iterdir():
        path.write_bytes(b"x")
    loader = folder_loader(root, skip_bad=True, report=lambda line: None)
    with pytest.raises(DataError, match="none of the 2 images of a batch could be read"):
        epoch(loader)


def test_a_worker_killed_while_decoding_is_one_line_not_a_hang(small_folder, monkeypatch):
    real = data.folder.read_image

    def killing(path):
        if path.endswith("014.webp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    monkeypatch.setattr(data.folder, "read_image", killing)  # the forked workers inherit it
    loader = folder_loader(small_folder, workers=2, shuffle=False)
    with pytest.raises(DataError) as caught:
        epoch(loader)
    message = str(caught.value)
    assert message.startswith("a process decoding images died (DataLoader worker (pid")
    # 014.webp is the 8th cat, so in the first batch of 8 (no shuffling).
    assert f"while loading {small_folder}/train/cat/000.jpg or one of the 7 images" in message


def test_sample_stats_are_the_mean_and_std_of_the_evaluation_crops(small_folder):
    paths, _ = paths_and_labels(small_folder)
    mean, std = sample_stats(paths, 24, 27, workers=2)
    pixels = torch.stack([eval_transform(read_image(p), 24, 27) for p in paths]).double() / 255
    # The loader's float32 x / 255, summed in float64.
    assert mean == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=1e-7)
    assert std == pytest.approx(pixels.std((0, 2, 3), unbiased=False).tolist(), abs=1e-7)


def test_load_folder_computes_or_takes_the_statistics(small_folder):
    dataset = load_folder(str(small_folder), 24, 27, workers=0)
    assert dataset.classes == ["cat", "dog"] and dataset.num_classes == 2
    assert len(dataset.train_images) == 38 and len(dataset.test_images) == 6
    assert dataset.valid_images is None and all(0 < s < 1 for s in dataset.std)
    assert dataset.stats == "computed from 38 training images"
    given = load_folder(str(small_folder), 24, 27, stats=((0.485, 0.456, 0.406),
                                                          (0.229, 0.224, 0.225)))
    assert given.mean == (0.485, 0.456, 0.406)
    assert given.stats == "ImageNet's"
    assert math.isclose(given.std[0], 0.229)
