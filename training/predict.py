"""--predict: classify image files with a saved run's model and write predictions.csv."""

import csv
import io
import os
import sys

import torch

from data.datasets import CIFAR10_CLASSES, DataError

from .build import read_dataset
from .devices import Devices, autocast
from .errors import UsageError, one_line
from .evaluation import read_saved, saved_model
from .files import write_atomically
from .plan import NUM_CLASSES

TOP = 5


def predict_saved(config):
    """Classify config["predict"]'s files and folders with --save's model_best.pt (else
    checkpoint.pt) and its evaluation transform; write <save>/predictions.csv.

    Returns the exit status: 0, or 2 when a path or a file could not be read (each said in a
    line on stderr; the others are classified all the same)."""
    # imported here: torchvision's transforms take seconds to import, only images need them
    from data.folder import FolderLoader

    path, saved = read_saved(config["save"], "predict with")
    run = saved["config"]
    files, problems = collect_images(config["predict"])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr, flush=True)
    if not files:
        raise UsageError("no image files to classify")
    classes = run_classes(run)
    mean, std = run_stats(run)
    image_size = run["image_size"]
    device = Devices().device
    model = saved_model(path, saved, run, len(classes), device)
    loader = FolderLoader(files, torch.arange(len(files)), run["batch_size"], mean, std, device,
                          image_size, run.get("resize_size") or image_size,
                          workers=config["workers"], skip_bad=True, report=lambda line: None)
    top = min(TOP, len(classes))
    rows = []
    with torch.no_grad():
        for inputs, indices in loader:
            if run["channels_last"]:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(run["amp"], device):
                logits = model(inputs)
            probabilities, labels = logits.float().softmax(1).topk(top, dim=1)
            for index, row_p, row_l in zip(indices.tolist(), probabilities.tolist(),
                                           labels.tolist(), strict=True):
                row = [files[index]]
                for label, probability in zip(row_l, row_p, strict=True):
                    row += [classes[label], f"{probability:.6f}"]
                rows.append(row)
    for file, reason in loader.skipped.items():
        print(f"error: cannot read the image {file}: {reason}", file=sys.stderr, flush=True)
    header = ["file", "class", "probability"]
    for rank in range(2, top + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    output = os.path.join(config["save"], "predictions.csv")
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    write_atomically(output, lambda file: file.write(text.getvalue().encode()))
    failed = len(problems) + len(loader.skipped)
    print(f"{len(rows):,} image{'' if len(rows) == 1 else 's'} classified: {output} "
          f"({os.path.basename(path)} of epoch {saved['epoch']}, {image_size}x{image_size} inputs)"
          + (f"; {failed:,} paths or files could not be read" if failed else ""), flush=True)
    return 2 if failed else 0


def collect_images(paths):
    """(image files, problems): files as given, folders' image files (sorted, recursively);
    a line per path that is missing, holds no images or cannot be listed."""
    from data.folder import find_images

    files, problems = [], []
    for given in paths:
        if os.path.isdir(given):
            try:
                found, _, _ = find_images(given)
            except DataError as error:
                problems.append(one_line(error))
                continue
            if not found:
                problems.append(f"{given}: no image files in this folder")
            files.extend(found)
        elif os.path.isfile(given):
            files.append(given)  # named on purpose: decoded whatever its extension
        elif os.path.lexists(given):
            problems.append(f"{given}: a broken or looping symbolic link")
        else:
            problems.append(f"{given}: no such file or folder")
    return files, problems


def run_classes(run):
    """The class names a saved run recorded; for runs older than that, CIFAR-10's or numbers."""
    if run.get("classes"):
        return list(run["classes"])
    if run["dataset"] == "cifar10":
        return list(CIFAR10_CLASSES)
    return [str(label) for label in range(NUM_CLASSES[run["dataset"]])]


def run_stats(run):
    """(mean, std) a saved run recorded; for runs older than that, its training data's."""
    if "mean" in run:
        return tuple(run["mean"]), tuple(run["std"])
    try:
        dataset = read_dataset(run, download=False)
    except (DataError, ValueError, OSError) as error:
        raise UsageError(f"the run predates recorded mean and std, and its data "
                         f"{run.get('data')} cannot be read to compute them "
                         f"({one_line(error)})") from None
    return dataset.mean, dataset.std
