"""Complete checkpoints: everything needed to continue a run bitwise as if never stopped.

A checkpoint holds the model, optimizer, scheduler and gradient-scaler states, the number of
finished epochs, the best validation error so far, the random number generators (torch's, the
data generator's, CUDA's), the configuration, and the position inside the current epoch:
None at an epoch's end, else the step to continue at, with the data generator's state at the
epoch's start (the loader draws an epoch's order and augmentation from it at once) and the
epoch's running sums. Written atomically (files.save_torch).
"""

import torch

from .errors import UsageError, one_line
from .files import save_torch

# "position" is not required: checkpoints written before it existed end an epoch.
CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "scheduler", "scaler", "best_valid_error",
                   "best_epoch", "rng", "config"}


def rng_states(generator):
    states = {"torch": torch.get_rng_state(), "data": generator.get_state(), "cuda": []}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(path, run, position=None):
    """Write run's state (a loop.Run) to path; position as described in the module docstring."""
    save_torch(path, {
        "epoch": run.epoch, "model": run.raw_model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "best_valid_error": run.best_error,
        "best_epoch": run.best_epoch, "rng": rng_states(run.generator), "config": run.config,
        "position": position})


def restore(checkpoint, model, optimizer, scheduler, scaler, generator):
    """Load every state of the checkpoint; refuse one that does not fit this model."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        generator.set_state(checkpoint["rng"]["data"])
        if torch.cuda.is_available() and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise UsageError(f"checkpoint.pt does not fit the model and settings it claims "
                         f"({one_line(error)[:300]}); it was left as it is") from None
