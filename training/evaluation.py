"""Test and validation error of a model, of a finished run, and of a saved one (--evaluate)."""

import os

import torch
import torch.nn.functional as F

from data import DataError

from .build import build_model, make_test_loader, read_dataset
from .devices import Devices, autocast
from .errors import UsageError, one_line
from .files import read_torch


@torch.no_grad()
def evaluate(model, loader, config, device):
    """Mean cross-entropy and top-1 error over the loader's images."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for inputs, targets in loader:
        if config["channels_last"]:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(config["amp"], device):
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        wrong += (logits.argmax(1) != targets).sum()
        count += len(targets)
    if count == 0:  # every image skipped as unreadable (--skip_bad_images)
        raise DataError("none of the images to evaluate on could be read: check the data")
    return loss_sum.item() / count, wrong.item() / count


def summarize(run):
    """Test error of the best-validation model (the last one without validation): print, save."""
    config = run.config
    if run.best_epoch:
        best = read_torch(run.folder.path("model_best.pt"), {"model", "epoch"})
        run.raw_model.load_state_dict(best["model"])
        which = (f"best-validation model (epoch {run.best_epoch}, validation error "
                 f"{run.best_error:.4f})")
    else:
        which = f"last model (epoch {config['n_epochs']})"
    test_loss, test_error = evaluate(run.eval_model, run.test_loader, config, run.devices.device)
    run.folder.write_summary({
        "model": "best" if run.best_epoch else "last",
        "epoch": run.best_epoch or config["n_epochs"],
        "valid_error": run.best_error if run.best_epoch else None, "test_error": test_error,
        "test_loss": test_loss, "dataset": config["dataset"]})
    run.log.print(f"final test error {test_error:.4f} (loss {test_loss:.4f}) of the {which}")


def read_saved(save, what):
    """(path, contents) of --save's model_best.pt, else its checkpoint.pt."""
    path = os.path.join(save, "model_best.pt")
    if not os.path.exists(path):
        path = os.path.join(save, "checkpoint.pt")
    if not os.path.exists(path):
        raise UsageError(f"nothing to {what} in {save}: no model_best.pt or checkpoint.pt")
    saved = read_torch(path, {"model", "epoch", "config"})
    saved["config"].setdefault("image_size", 32)  # runs from before --image_size
    return path, saved


def saved_model(path, saved, run, num_classes, device):
    """The saved model on device, in evaluation mode; UsageError if it does not fit run."""
    model = build_model(run, num_classes)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as error:
        raise UsageError(f"{path} does not fit the model its configuration describes "
                         f"({one_line(error)[:300]})") from None
    memory_format = torch.channels_last if run["channels_last"] else torch.preserve_format
    return model.to(device, memory_format=memory_format).eval()


def evaluate_saved(config):
    """--evaluate: the saved model's test error, with the configuration it was trained with."""
    path, saved = read_saved(config["save"], "evaluate")
    run = {**saved["config"], "data": config["data"] or saved["config"]["data"],
           "workers": config["workers"], "skip_bad_images": config["skip_bad_images"]}
    devices = Devices()
    dataset = read_dataset(run, config["download"])
    model = saved_model(path, saved, run, dataset.num_classes, devices.device)
    loader = make_test_loader(run, dataset, devices.device,
                              hint="; remove or replace it, or pass --skip_bad_images True")
    test_loss, test_error = evaluate(model, loader, run, devices.device)
    print(f"test error {test_error:.4f} (loss {test_loss:.4f}) of {path} (epoch "
          f"{saved['epoch']}) on the {len(loader.images)} {run['dataset']} test images",
          flush=True)
