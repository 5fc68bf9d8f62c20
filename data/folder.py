"""Image folders (torchvision's ImageFolder layout) streamed from disk by parallel workers.

    DIR/train/<class>/**/<image>   required; the classes are train's sub-folders, sorted
    DIR/val/<class>/**/<image>     optional validation set (else --valid_size splits train)
    DIR/test/<class>/**/<image>    optional test set

Files without an image extension, and hidden files and folders (.DS_Store, macOS' ._ files,
.ipynb_checkpoints), are ignored and counted; a symbolic link back to a folder already walked is
not followed and reported. An image file that cannot be read or decoded stops the run with one
line naming it, or, with skip_bad, is left out of its batch and reported once.

FolderLoader has TensorLoader's interface (len, epoch(skip), batches of normalised float inputs
and int64 targets on the training device) and its replay guarantee: at an epoch's start it draws,
from the CPU generator and for all N images, the order and one seed per image, from which the
image's crop and flip are drawn wherever it is decoded. So the batches after a resume, and the
results for any number of workers, are bitwise those of an uninterrupted epoch on a CPU.
Workers (DataLoader processes) decode whole batches into shared memory, with prefetching. For a
GPU the batches travel as uint8 through the DataLoader's pinned memory and are normalised there;
for a CPU the workers normalise them, in parallel, into shared batches that are reused batch
after batch (SharedBatches).
"""

import atexit
import math
import os
import random
import signal
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, get_worker_info

from data.datasets import DataError, channel_histograms, stats_from_histograms
from data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    eval_transform,
    is_image_name,
    read_image,
    train_transform,
)
from data.loader import ShardedEpochs, _is_int, channel_tensors, check_batching, normalise

SPLITS = ("train", "val", "test")
STATS_IMAGES = 1000  # training images sampled (evenly spaced) for the mean and std
SHOWN = 3  # example names shown per note
PREFETCH = 2  # batches each worker decodes ahead
SHARED_MEMORY_HINT = ("workers hand their batches over in shared memory (/dev/shm: in a "
                      "container, raise it with --shm-size): try fewer --workers or a smaller "
                      "--batch_size")


@dataclass
class FolderDataset:
    """An image folder's file lists (paths) and integer labels per split, and its classes.

    valid_images / test_images are None without val/ / test/. notes: lines for the start-up
    block (ignored files, link loops); stats: where mean and std come from."""

    name: str
    root: str
    classes: list
    train_images: list
    train_labels: torch.Tensor
    valid_images: list | None
    valid_labels: torch.Tensor | None
    test_images: list | None
    test_labels: torch.Tensor | None
    image_size: int
    resize_size: int
    mean: tuple
    std: tuple
    flip: bool = True
    notes: list = field(default_factory=list)
    stats: str = "given"
    skipped: dict = field(default_factory=dict)  # unreadable images skipped: path -> reason

    @property
    def num_classes(self):
        return len(self.classes)


# ---------------------------------------------------------------------------- scanning

class _Scan:
    """What walking the splits found besides the images."""

    def __init__(self):
        self.ignored = []  # files that are not images, hidden entries (paths relative to root)
        self.loops = []  # folder links not followed (they lead to a folder already walked)


def _entries(folder):
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        raise DataError(f"cannot read the folder {folder}: {error.strerror or error}") from None


def _is_dir(entry):
    try:
        return entry.is_dir()  # follows links; False for a broken or looping link
    except OSError:
        return False


def _identity(folder):
    try:
        status = os.stat(folder)
    except OSError as error:
        raise DataError(f"cannot read the folder {folder}: {error.strerror or error}") from None
    return status.st_dev, status.st_ino


def _walk_class(folder, root, scan, visited):
    """Image paths below folder, sorted as ImageFolder sorts them (folder path, then name)."""
    found = []
    key = _identity(folder)
    if key in visited:
        scan.loops.append(os.path.relpath(folder, root))
        return found
    visited = visited | {key}  # the folders above this one: a link back to one of them loops
    files, folders = [], []
    for entry in _entries(folder):
        if entry.name.startswith("."):
            scan.ignored.append(os.path.relpath(entry.path, root))
        elif _is_dir(entry):
            folders.append(entry.path)
        elif is_image_name(entry.name):
            files.append(entry.path)  # unreadable or broken ones fail when decoded
        else:
            scan.ignored.append(os.path.relpath(entry.path, root))
    found.extend(files)
    for sub in folders:
        found.extend(_walk_class(sub, root, scan, visited))
    return found


def find_images(folder):
    """(image paths below folder, sorted; names of other files and hidden entries ignored;
    folder links not followed because they loop back), as the splits are read."""
    scan = _Scan()
    images = _walk_class(folder, folder, scan, frozenset())
    return images, scan.ignored, scan.loops


def _read_split(root, split, scan, classes=None):
    """(paths, labels, class names) of root/split; classes: train's, to check val/test against."""
    folder = os.path.join(root, split)
    above = frozenset(_identity(path) for path in (root, folder))  # links back here loop
    names, paths, labels = [], [], []
    for entry in _entries(folder):
        if entry.name.startswith(".") or not _is_dir(entry):
            scan.ignored.append(os.path.relpath(entry.path, root))
            continue
        if classes is not None and entry.name not in classes:
            raise DataError(f"the class {entry.name!r} in {folder} has no folder in "
                            f"{os.path.join(root, 'train')}: the classes are train's sub-folders "
                            f"(add it there, or move its images)")
        images = _walk_class(entry.path, root, scan, above)
        if classes is None and not images:
            raise DataError(f"the class folder {entry.path} holds no image files: add images "
                            f"or remove the folder")
        label = len(names) if classes is None else classes.index(entry.name)
        names.append(entry.name)
        paths.extend(images)
        labels.extend([label] * len(images))
    if classes is None and not names:
        raise DataError(f"{folder} has no class folders: put the images of each class in "
                        f"{folder}/<class name>/")
    if not paths:
        raise DataError(f"{folder} holds no image files")
    return paths, torch.tensor(labels, dtype=torch.int64), names


def scan_folder(root):
    """Read root's splits: (classes, {split: (paths, labels) or None}, notes); DataError with
    one line for a layout this cannot train on."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root} is not a folder")
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"{root} has no train/ folder: --dataset folder reads "
                        f"{root}/train/<class>/<images>, and optionally val/ and test/ alike")
    scan = _Scan()
    train_paths, train_labels, classes = _read_split(root, "train", scan)
    splits = {"train": (train_paths, train_labels)}
    for split in SPLITS[1:]:
        present = os.path.isdir(os.path.join(root, split))
        splits[split] = _read_split(root, split, scan, classes)[:2] if present else None
    others = [entry.name for entry in _entries(root) if entry.name not in SPLITS]
    notes = []
    if scan.ignored:
        what = "not an image" if len(scan.ignored) == 1 else "not images"
        notes.append(f"ignored  {_count(scan.ignored, 'file')} ({what}, or hidden): "
                     f"{_examples(scan.ignored)}")
    if scan.loops:
        notes.append(f"ignored  {_count(scan.loops, 'folder link')} looping back (not followed): "
                     f"{_examples(scan.loops)}")
    if others:
        notes.append(f"ignored  in {root}: {_examples(others)} (only train/, val/ and test/ "
                     f"are read)")
    return classes, splits, notes


def _count(items, noun):
    return f"{len(items):,} {noun}{'' if len(items) == 1 else 's'}"


def _examples(names):
    shown = ", ".join(names[:SHOWN])
    return shown + (", ..." if len(names) > SHOWN else "")


# ---------------------------------------------------------------------------- the dataset

def load_folder(root, image_size, resize_size, stats=None, workers=0, skip_bad=False,
                report=print):
    """Scan root (see the module docstring) into a FolderDataset.

    stats: (mean, std) to use; None computes them from up to STATS_IMAGES evenly spaced training
    images after the evaluation transform (in `workers` processes). DataError for a bad layout,
    or for an unreadable image in that sample unless skip_bad.
    """
    root = os.path.abspath(root)
    classes, splits, notes = scan_folder(root)
    skipped = {}
    (train_paths, train_labels) = splits["train"]
    valid = splits["val"] or (None, None)
    test = splits["test"] or (None, None)
    if stats is None:
        mean, std = sample_stats(train_paths, image_size, resize_size, workers, skip_bad, report,
                                 skipped)
        source = f"computed from {min(len(train_paths), STATS_IMAGES):,} training images"
    else:
        mean, std = (tuple(float(v) for v in values) for values in stats)
        source = "ImageNet's" if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) else "given"
    return FolderDataset(root, root, classes, train_paths, train_labels, *valid, *test,
                         image_size, resize_size, mean, std, notes=notes, stats=source,
                         skipped=skipped)


def sample_stats(paths, image_size, resize_size, workers=0, skip_bad=False, report=print,
                 skipped=None):
    """Per-channel mean and std, in [0, 1] units, of up to STATS_IMAGES evenly spaced images of
    paths after the evaluation transform, computed exactly as for CIFAR (any worker count)."""
    count = min(len(paths), STATS_IMAGES)
    sample = [paths[i * len(paths) // count] for i in range(count)]
    loader = FolderLoader(sample, torch.zeros(count, dtype=torch.int64), 50, (0.0,) * 3,
                          (1.0,) * 3, "cpu", image_size, resize_size, workers=workers,
                          skip_bad=skip_bad, report=report, skipped=skipped,
                          hint="; remove or replace the file, or pass --skip_bad_images True")
    counts = torch.zeros(3, 256, dtype=torch.int64)
    for inputs, _ in loader:
        # With mean 0 and std 1 the inputs are x * float32(1 / 255): * 255 rounds back to x.
        counts += channel_histograms(inputs.mul(255).round_().to(torch.uint8))
    return stats_from_histograms(counts)


# ---------------------------------------------------------------------------- the loader

def _ignore_stop_signals(worker_id):
    """Workers leave SIGTERM/SIGINT/SIGUSR1 to the main process, which stops after its step
    (a scheduler signals every process of a job; a dead worker would end the run instead).
    So they are always shut down through their queue, never terminated: see _running."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


_running = weakref.WeakSet()  # DataLoader iterators whose workers may be alive


@atexit.register  # after multiprocessing's exit handler, so it runs first
def _shut_down_workers():
    """At exit, stop the workers of any iterator still alive (say, one that an exception's
    traceback holds): multiprocessing would join them after a SIGTERM they ignore."""
    for iterator in list(_running):
        iterator._shutdown_workers()


class PathList:
    """Paths as one bytes object and offsets rather than a list of str: workers reading a list
    touch its items' reference counts, which copies its memory into every worker (ImageNet's
    1.3 million paths: about 150 MB each)."""

    def __init__(self, paths):
        encoded = [os.fsencode(path) for path in paths]
        self.data = b"".join(encoded)
        self.ends = torch.tensor([len(path) for path in encoded], dtype=torch.int64).cumsum(0)

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, index):
        start = int(self.ends[index - 1]) if index else 0
        return os.fsdecode(self.data[start:int(self.ends[index])])


def shared_tensor(shape, dtype):
    """An uninitialised tensor in shared memory, which other processes map rather than copy."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _batch_tensor(shape, dtype):
    """In a worker, a tensor in shared memory, so that the main process gets it uncopied."""
    return torch.empty(shape, dtype=dtype) if get_worker_info() is None else shared_tensor(
        shape, dtype)


def _storage_users(tensor):
    """How many tensors (views included) use tensor's storage: torch's own count, which
    torch._inductor reads the same way for its CUDA-graph buffers."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class SharedBatches:
    """Batch tensors in shared memory, taken in turn, for the workers to decode into.

    Why: a fresh shared-memory batch costs the worker more than resizing its images (the
    kernel maps and zero-fills every page on first touch: 0.66 ms per 224 px float32 image,
    against 0.06 ms to refill a reused one; results/folder-loader-cpu.md). take(position)
    hands out batch position % count; one that a tensor still uses when its turn comes round
    (a batch the caller kept, or any view of it; torch does not count a bare untyped_storage())
    is left to its user and replaced by a new one. count should exceed the batches in flight,
    and the caller should keep at most one: each batch kept longer costs a replacement."""

    def __init__(self, count, shape, dtype):
        self.shape, self.dtype = shape, dtype
        # All made now, before any worker starts, so that too little shared memory stops the
        # run here, with one line.
        self.tensors = [self._new() for _ in range(count)]
        self.unused = _storage_users(self.tensors[0])  # a batch that only this ring holds

    def _new(self):
        try:
            return shared_tensor(self.shape, self.dtype)
        except RuntimeError as error:
            size = math.prod(self.shape) * self.dtype.itemsize / 2**20
            raise DataError(f"cannot allocate a batch of {size:,.0f} MiB in shared memory "
                            f"({' '.join(str(error).split())}); {SHARED_MEMORY_HINT}") from None

    def take(self, position):
        """(slot, batch tensor) for the batch at position in the epoch."""
        slot = position % len(self.tensors)
        if _storage_users(self.tensors[slot]) > self.unused:
            self.tensors[slot] = self._new()
        return slot, self.tensors[slot]


class BatchReader:
    """Decodes and transforms one batch: reader[(indices, seeds, out)] -> (batch (B, 3, S, S),
    [(slot, reason) of the images that could not be read]). seeds None: evaluation transform.
    The batch is uint8, or with `normalise_with` = (mean, std) float32 (data.loader.normalise),
    computed image by image while it is in the cache. out None: a new batch is returned; else
    out = (ring slot, batch tensor) from SharedBatches, written into, and None returned."""

    def __init__(self, paths, image_size, resize_size, flip, normalise_with=None):
        self.paths, self.image_size, self.resize_size = PathList(paths), image_size, resize_size
        self.flip = flip
        self.normalise = None if normalise_with is None else channel_tensors(*normalise_with)
        self.kept = {}  # in a worker: ring slot -> the batch tensor it was last handed there

    def __getitem__(self, task):
        indices, seeds, out = task
        size = self.image_size
        shape = (len(indices), 3, size, size)
        if out is None:
            batch = _batch_tensor(shape, torch.uint8 if self.normalise is None else torch.float32)
        else:
            ring_slot, tensor = out
            batch = tensor[:len(indices)]
            # Kept mapped here: torch then finds it when it comes round again, rather than
            # mapping it afresh (a page fault per 4 KiB page on the first write). One per slot,
            # so that a batch the ring replaced is let go.
            self.kept[ring_slot] = tensor
        failures = []
        for slot, index in enumerate(indices):
            try:
                image = read_image(self.paths[index])
                if seeds is None:
                    image = eval_transform(image, size, self.resize_size)
                else:
                    image = train_transform(image, size, random.Random(seeds[slot]), self.flip)
                if self.normalise is None:
                    batch[slot].copy_(image)
                else:
                    normalise(image, *self.normalise, out=batch[slot])
            except ImageError as error:
                failures.append((slot, str(error)))
            except MemoryError:
                failures.append((slot, "out of memory while decoding it"))
            except Exception as error:  # an image the transforms cannot take; never a dead worker
                failures.append((slot, f"{type(error).__name__}: {' '.join(str(error).split())}"))
        return (batch if out is None else None), failures  # out: the caller has it


class FolderLoader(ShardedEpochs):
    """Batches (inputs, targets) of image files, decoded by `workers` processes (0: here).

    Same arguments and guarantees as TensorLoader, plus: paths instead of a uint8 tensor,
    image_size and resize_size (data.images' transforms; augment picks the training one),
    skip_bad (leave unreadable images out of their batch, record them in the dict `skipped`,
    path -> reason, which loaders may share, and report each once through `report`, rather
    than raise DataError), and hint (appended to that DataError's message).
    """

    def __init__(self, paths, labels, batch_size, mean, std, device, image_size, resize_size,
                 shuffle=False, augment=False, flip=True, generator=None, rank=0, world_size=1,
                 drop_last=False, workers=0, skip_bad=False, report=print, hint="",
                 skipped=None):
        check_batching(labels, len(paths), 3, batch_size, mean, std, shuffle, augment, flip,
                       drop_last, generator, rank, world_size)
        for name, value, minimum in (("image_size", image_size, 1),
                                     ("resize_size", resize_size, 1), ("workers", workers, 0)):
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        self.device = torch.device(device)
        self.images = list(paths)
        self.labels = labels.to(self.device, torch.int64)
        self.scale, self.shift = channel_tensors(mean, std, self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.drop_last, self.workers, self.skip_bad = drop_last, workers, skip_bad
        self.report, self.hint = report, hint
        self.per_rank = len(paths) // world_size
        # On a CPU the workers normalise (in parallel); a GPU gets uint8 (4x fewer bytes to copy).
        self.reader = BatchReader(self.images, image_size, resize_size, flip,
                                  (mean, std) if self.device.type == "cpu" else None)
        self.skipped = {} if skipped is None else skipped

    def epoch(self, skip=0):
        """An epoch's batches after the first `skip` (see TensorLoader.epoch)."""
        positions, index = self._order(skip)
        index = index.tolist()
        seeds = None
        if self.augment:
            seeds = torch.randint(0, 2**63 - 1, (len(self.images),), generator=self.generator)
            seeds = seeds[positions].tolist()
        tasks = []
        for start in range(skip * self.batch_size, len(self) * self.batch_size, self.batch_size):
            stop = start + self.batch_size
            tasks.append((index[start:stop], None if seeds is None else seeds[start:stop], None))
        return self._batches(tasks)

    def _loaded(self, tasks):
        """(task, (batch, failures)) in order, from the workers or from this process."""
        if self.workers == 0 or not tasks:
            for task in tasks:
                yield task, self.reader[task]
            return
        workers = min(self.workers, len(tasks))
        ring = None
        if self.device.type == "cpu":  # a GPU's uint8 batches go through pinned memory instead
            size = self.reader.image_size
            ring = SharedBatches(min(workers * PREFETCH + 2, len(tasks)),
                                 (self.batch_size, 3, size, size), torch.float32)
        outs = {}  # position -> (slot, batch) of the ring that its worker writes into

        def handed_out():  # the DataLoader draws each task as it hands it to a worker
            for position, (indices, seeds, _) in enumerate(tasks):
                outs[position] = None if ring is None else ring.take(position)
                yield indices, seeds, outs[position]

        # Its own generator: a DataLoader draws its workers' seeds (unused here) from torch's
        # global one otherwise, which would change dropout and initialisation with --workers.
        loader = DataLoader(self.reader, batch_size=None, sampler=handed_out(),
                            num_workers=workers, prefetch_factor=PREFETCH,
                            pin_memory=self.device.type == "cuda",
                            worker_init_fn=_ignore_stop_signals,
                            generator=torch.Generator().manual_seed(0))
        iterator = iter(loader)
        _running.add(iterator)
        try:
            for position, task in enumerate(tasks):
                try:
                    batch, failures = next(iterator)
                except RuntimeError as error:
                    if "DataLoader worker" not in str(error):
                        raise
                    first = self.images[task[0][0]]
                    raise DataError(f"a process decoding images died "
                                    f"({' '.join(str(error).split())}) while loading {first} or "
                                    f"one of the {len(task[0]) - 1} images after it; out of "
                                    f"memory? {SHARED_MEMORY_HINT}") from None
                out = outs.pop(position)
                yield task, (batch if out is None else out[1][:len(task[0])], failures)
        finally:  # also when the epoch is left early (a stop, an error)
            iterator._shutdown_workers()
            _running.discard(iterator)

    def _batches(self, tasks):
        loaded = self._loaded(tasks)
        try:
            for task, (images, failures) in loaded:
                indices = task[0]
                batch_index = torch.tensor(indices, device=self.device)
                if failures:
                    kept = self._without(failures, indices, images, batch_index)
                    if kept is None:
                        continue
                    images, batch_index = kept
                if images.dtype == torch.uint8:
                    images = normalise(images.to(self.device, non_blocking=True), self.scale,
                                       self.shift)
                yield images, self.labels.index_select(0, batch_index)
        finally:
            loaded.close()  # its workers end now, not when a traceback lets go of it

    def _without(self, failures, indices, images, batch_index):
        """The batch without the images in failures (None: no image left), or DataError for the
        first of them."""
        slot, reason = failures[0]
        if not self.skip_bad:
            raise DataError(f"cannot read the image {self.images[indices[slot]]}: {reason}"
                            f"{self.hint}")
        for slot, reason in failures:
            path = self.images[indices[slot]]
            if path not in self.skipped:
                self.skipped[path] = reason
                self.report(f"skipped  {path}: {reason} ({len(self.skipped):,} unreadable "
                            f"images skipped so far)")
        if len(failures) == len(indices) and not self.shuffle:
            return None  # evaluation and prediction go on with the next batch
        if len(failures) == len(indices):  # a training step needs a batch
            raise DataError(f"none of the {len(indices)} images of a batch could be read (such "
                            f"as {self.images[indices[0]]}: {failures[0][1]}): check the data")
        failed = {slot for slot, _ in failures}
        keep = torch.tensor([slot for slot in range(len(indices)) if slot not in failed])
        return images[keep], batch_index[keep.to(batch_index.device)]
