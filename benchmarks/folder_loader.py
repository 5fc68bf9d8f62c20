"""Throughput of the folder loader (data/folder.py) at 224 px (and small images at their own size)
against decoding alone and against
what a user would write with torchvision, on JPEG folders written here, in one run, interleaved.

Contenders, each with the same number of worker processes and batch 64, over the same files:
  decode only     read and decode every file (torchvision.io), nothing else: the floor
  decode only PIL the same with PIL, the other decoder a loader could use
  folder loader   FolderLoader as CPU training uses it: shuffle, random-resized crop and flip
                  to the output size, normalised float32 batches from the workers
  torchvision     ImageFolder + transforms.v2 (RandomResizedCrop, RandomHorizontalFlip,
                  ToImage, ToDtype, Normalize) + DataLoader(shuffle=True)
Each round times one epoch of every contender (worker start-up included, as in training), in
turn; the figure is the median over rounds. Besides images per second, the CPU time the epoch
took in all processes (this one and its workers, which end with the epoch) per image: on a
machine shared with other jobs it depends less on what they do.
"""

import io
import math
import os
import platform
import random
import resource
import statistics
import tempfile
import time

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

from measure import cpu_name
from training.devices import keep_freed_memory

BATCH = 64
SETS = {  # name -> (height, width, output size, images, images in a quick run)
    "500x375 at 224 px": (375, 500, 224, 4096, 64),
    "80x80 at 224 px": (80, 80, 224, 4096, 128),
    "80x80 at 80 px": (80, 80, 80, 4096, 128),
}


def photo_like(height, width, rng, detail=0.8):
    """Smooth shapes at three scales plus fine texture: at quality 90, a 500x375 one takes
    about 110 KB, like ImageNet's JPEGs (so decoding costs what it costs on photographs)."""
    image = np.zeros((height, width, 3))
    for scale, weight in ((64, 1.0), (16, 0.5), (4, 0.25)):
        small = rng.normal(size=(max(2, height // scale), max(2, width // scale), 3))
        small = ((small - small.min()) / np.ptp(small) * 255).astype(np.uint8)
        image += weight * np.asarray(Image.fromarray(small).resize((width, height),
                                                                    Image.BICUBIC), dtype=float)
    image = image / 1.75 + rng.normal(scale=255 * detail / 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def mean_file_size(root):
    sizes = [entry.stat().st_size for folder in os.scandir(root) for entry in os.scandir(folder)]
    return statistics.mean(sizes)


def write_jpeg_folder(root, height, width, count, classes=10, seed=0):
    """count JPEGs (quality 90) in root/<class>/. A few distinct pictures are reused under
    different names, as writing them is slow."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(min(count, 64)):
        buffer = io.BytesIO()
        Image.fromarray(photo_like(height, width, rng)).save(buffer, "JPEG", quality=90)
        pictures.append(buffer.getvalue())
    for i in range(count):
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as file:
            file.write(pictures[i % len(pictures)])


class _DecodeOnly:
    """A batch of files read and decoded, the result thrown away: only the count returns."""

    def __init__(self, paths, use_pil):
        self.paths, self.use_pil = paths, use_pil

    def __getitem__(self, indices):
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        for index in indices:
            if self.use_pil:
                with Image.open(self.paths[index]) as image:
                    image.convert("RGB").load()
            else:
                decode_jpeg(read_file(self.paths[index]), mode=ImageReadMode.RGB)
        return torch.tensor(len(indices))


def _batches_of(count):
    order = torch.randperm(count).tolist()
    return [order[i:i + BATCH] for i in range(0, count, BATCH)]


def decode_only(paths, workers, use_pil=False):
    loader = torch.utils.data.DataLoader(_DecodeOnly(paths, use_pil), batch_size=None,
                                         sampler=_batches_of(len(paths)), num_workers=workers)
    return sum(int(count) for count in loader)


def folder_loader(paths, labels, workers, size):
    from data.folder import FolderLoader
    from data.images import IMAGENET_MEAN, IMAGENET_STD

    loader = FolderLoader(paths, labels, BATCH, IMAGENET_MEAN, IMAGENET_STD, "cpu", size, size,
                          shuffle=True, augment=True, generator=torch.Generator().manual_seed(0),
                          workers=workers)
    return sum(len(targets) for _, targets in loader)


def torchvision_baseline(root, workers, size):
    from torchvision import datasets
    from torchvision.transforms import v2

    from data.images import IMAGENET_MEAN, IMAGENET_STD

    transform = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(root, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                         num_workers=workers)
    return sum(len(targets) for _, targets in loader)


CONTENDERS = ("decode only", "decode only PIL", "folder loader", "torchvision")
STAGES = ("read and decode", "crop, mirror and resize", "normalise into the batch",
          "fill a fresh shared batch", "fill a reused one")


def stage_times(paths, size, images=256, repeats=3):
    """{stage: ms per image} of the folder loader's work, in this process, on up to `images`
    of paths (best of `repeats`): what each image costs a worker, and what reusing the shared
    batches saves (filling a float32 batch in fresh shared memory against refilling one)."""
    from data.folder import shared_tensor
    from data.images import read_image, train_transform
    from data.loader import channel_tensors, normalise

    paths = paths[:images]
    count = len(paths)
    scale, shift = channel_tensors((0.5,) * 3, (0.25,) * 3)
    decoded = [read_image(path) for path in paths]
    resized = [train_transform(image, size, random.Random(i)) for i, image in enumerate(decoded)]
    shape = (BATCH, 3, size, size)
    reused = shared_tensor(shape, torch.float32).fill_(0)
    work = {
        STAGES[0]: lambda: [read_image(path) for path in paths],
        STAGES[1]: lambda: [train_transform(image, size, random.Random(i))
                            for i, image in enumerate(decoded)],
        STAGES[2]: lambda: [normalise(image, scale, shift, out=reused[i % BATCH])
                            for i, image in enumerate(resized)],
        STAGES[3]: lambda: [shared_tensor(shape, torch.float32).fill_(1)
                            for _ in range(count // BATCH)],
        STAGES[4]: lambda: [reused.fill_(1) for _ in range(count // BATCH)],
    }
    times = {}
    for stage, run in work.items():
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        per = count if stage in STAGES[:3] else count // BATCH * BATCH
        times[stage] = best * 1000 / per
    return times


def _cpu_seconds():
    """CPU time of this process and of its children that have ended (the epoch's workers)."""
    return sum(usage.ru_utime + usage.ru_stime for usage in
               (resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(root, workers, rounds, size):
    """{contender: [(images/s, CPU ms per image) of each round]} over the JPEG folder root."""
    from data.folder import scan_folder

    _, splits, _ = scan_folder(os.path.dirname(root))
    paths, labels = splits["train"]
    run = {"decode only": lambda: decode_only(paths, workers),
           "decode only PIL": lambda: decode_only(paths, workers, use_pil=True),
           "folder loader": lambda: folder_loader(paths, labels, workers, size),
           "torchvision": lambda: torchvision_baseline(root, workers, size)}
    rates = {name: [] for name in CONTENDERS}
    for name in CONTENDERS:  # warm the page cache and the imports
        run[name]()
    for _ in range(rounds):
        for name in CONTENDERS:
            start, cpu = time.perf_counter(), _cpu_seconds()
            count = run[name]()
            rates[name].append((count / (time.perf_counter() - start),
                                (_cpu_seconds() - cpu) * 1000 / count))
            assert count == len(paths), (name, count)
    return rates


def run(out="results", quick=False, workers=None, rounds=None):
    """Measure every set of SETS; write <out>/folder-loader-cpu.md (-quick with quick)."""
    from data.folder import find_images

    workers = workers if workers is not None else len(os.sched_getaffinity(0))
    rounds = rounds or (1 if quick else 5)
    torch.set_num_threads(1)  # as in DataLoader workers: each process decodes on one core
    keep_freed_memory()  # as demo.py does on a CPU
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="folder-loader-") as temporary:
        for name, (height, width, size, count, quick_count) in SETS.items():
            count = quick_count if quick else count
            root = os.path.join(temporary, f"{height}x{width}", "train")
            if not os.path.isdir(root):
                write_jpeg_folder(root, height, width, count)
            rates = measure(root, workers, rounds, size)
            medians = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
                       for k, v in rates.items()}
            stages = stage_times(find_images(root)[0], size, repeats=1 if quick else 3)
            results[name] = (count, mean_file_size(root), medians, stages)
            line = ", ".join(f"{k} {r:,.0f} images/s ({c:.2f} CPU ms each)"
                             for k, (r, c) in medians.items())
            print(f"{name}: {line}", flush=True)
            print(f"{name}, ms per image in one process: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()), flush=True)
    path = os.path.join(out, f"folder-loader-cpu{'-quick' if quick else ''}.md")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as file:
        file.write(report(results, workers, rounds, load_before, os.getloadavg(), quick))
    print(f"wrote {path}")


def report(results, workers, rounds, load_before, load_after, quick):
    lines = [
        "# Folder loader throughput (CPU)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, shared with other jobs (load average "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end). "
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}.",
        "",
        f"Command: `python benchmark.py --loader True{' --quick True' if quick else ''}` "
        f"({workers} worker processes for every contender, batch {BATCH}, "
        f"median of {rounds} rounds, contenders interleaved in each round; module docstring "
        f"of benchmarks/folder_loader.py).",
        "",
        "JPEGs written by the benchmark (quality 90, photo-like content; 500x375 ones about the "
        "size of ImageNet's). Images per second of one epoch (worker start-up included), and in "
        "brackets the CPU milliseconds per image, all processes together; the ratios are "
        "throughput ratios, images/s (and CPU time: the other's over the loader's):",
        "",
        "| images | count | mean file | decode only (torchvision.io) | decode only (PIL) | "
        "folder loader | torchvision ImageFolder + v2 | folder loader ÷ decode only | "
        "folder loader ÷ torchvision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (count, size, rates, _) in results.items():
        cells = [f"{rates[key][0]:,.0f} ({rates[key][1]:.2f} ms)" for key in CONTENDERS]
        loader = rates["folder loader"]
        ratios = [f"{loader[0] / rates[key][0]:.2f} ({rates[key][1] / loader[1]:.2f})"
                  for key in ("decode only", "torchvision")]
        lines.append(f"| {name} | {count:,} | {size / 1024:.0f} KiB | {' | '.join(cells)} | "
                     f"{' | '.join(ratios)} |")
    lines += [
        "",
        "Targets: folder loader at least 0.8x decoding alone and at least 1.0x the torchvision "
        "baseline. \"Decode only\" reads and decodes each file and nothing else; the folder "
        "loader also crops, resizes (antialiased bilinear), flips, and writes the float32 "
        "batch (600 KiB per image at 224 px, into shared memory reused batch after batch), so "
        "on small images, which must be upscaled to 224, the output rather than the decoding "
        "sets its pace.",
        "",
        "Where a worker's time goes: milliseconds per image of each stage of the loader's "
        f"work, in one process (best of {1 if quick else 3} over up to 256 of the images; the "
        "same torch threads as a worker: one). Filling a float32 batch in fresh shared memory "
        "is what each batch cost before the workers reused their batches; refilling a reused "
        "one is what it costs now:",
        "",
        f"| images | {' | '.join(STAGES)} |",
        "|---|" + "---|" * len(STAGES),
    ]
    for name, (_, _, _, stages) in results.items():
        lines.append(f"| {name} | {' | '.join(f'{stages[key]:.3f}' for key in STAGES)} |")
    lines.append("")
    return "\n".join(lines)
