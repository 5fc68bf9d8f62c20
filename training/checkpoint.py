"""Complete checkpoints: everything needed to continue a run bitwise as if never stopped.

A checkpoint holds the model, optimizer, scheduler and gradient-scaler states, the number of
finished epochs, the best validation error so far, the random number generators (the data
generator's, and torch's and CUDA's of every process), the configuration, and the position
inside the current epoch: None at an epoch's end, else the step to continue at, with the data
generator's state at the epoch's start (the loader draws an epoch's order and augmentation from
it at once) and the epoch's running sums of every process. Written atomically (files.save_torch).

Under torchrun each process draws its own dropout masks: rank 0 gathers every process's
generator states and running sums ("ranks", in rank order) and writes them; on resume each
process takes its own. The top-level "torch" and "cuda" states and the position's sums are rank
0's, as in checkpoints written before "ranks" existed.

Recovery checkpoints (--checkpoint_every) are written by a CheckpointWriter in a background
thread, from a copy taken at once, so training goes on while the file is written. One write at
a time: every write waits for the one before, so an older state never replaces a newer one, and
the rename makes a kill during a write leave the previous checkpoint.pt whole.
"""

import copy
import threading

import torch

from .errors import UsageError, one_line
from .files import save_torch

# "position" is not required: checkpoints written before it existed end an epoch.
CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "scheduler", "scaler", "best_valid_error",
                   "best_epoch", "rng", "config"}


def process_rng(devices):
    """This process's torch generator and those of the GPUs it drives (DataParallel: every
    visible one; a torchrun rank: its own)."""
    cuda = []
    if devices.device.type == "cuda":
        cuda = (torch.cuda.get_rng_state_all() if not devices.distributed
                else [torch.cuda.get_rng_state(devices.device)])
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def checkpoint_state(run, position=None, ranks=None):
    """The checkpoint of run (a loop.Run) as a dict; ranks: every process's
    {"torch", "cuda"[, "loss_sum", "wrong", "count"]} in rank order (None: this process only).
    Its tensors are the live ones: copy_state() before writing it while training goes on."""
    ranks = ranks or [process_rng(run.devices)]
    rng = {"torch": ranks[0]["torch"], "cuda": ranks[0]["cuda"],
           "data": run.generator.get_state()}
    if len(ranks) > 1:
        rng["ranks"] = [{"torch": rank["torch"], "cuda": rank["cuda"]} for rank in ranks]
        if position is not None:
            position = {**position, "ranks": [{key: rank[key] for key in SUMS}
                                              for rank in ranks]}
    return {
        "epoch": run.epoch, "model": run.raw_model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "best_valid_error": run.best_error,
        "best_epoch": run.best_epoch, "rng": rng, "config": run.config, "position": position}


SUMS = ("loss_sum", "wrong", "count")  # an epoch's running sums in a position


def copy_state(value):
    """A copy of a checkpoint dict that training cannot change: tensors copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):  # Counter (a scheduler's milestones), OrderedDict, dict
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = copy_state(item)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(item) for item in value)
    return value  # numbers, strings, None: immutable


class CheckpointWriter:
    """Writes one path (checkpoint.pt), one write at a time, now or in a background thread."""

    def __init__(self, path):
        self.path = path
        self.thread = None
        self.error = None

    def write(self, state, background=False):
        """Write state (checkpoint_state()); background: from a copy taken now, in a thread."""
        self.wait()
        if not background:
            save_torch(self.path, state)
            return
        state = copy_state(state)
        self.thread = threading.Thread(target=self._write, args=(state,),
                                       name="checkpoint writer", daemon=True)
        self.thread.start()

    def _write(self, state):
        try:
            save_torch(self.path, state)
        except UsageError as error:
            self.error = error

    def wait(self):
        """Wait for the write in flight; raise its error, if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def save_checkpoint(path, run, position=None, ranks=None):
    """Write run's state to path now; position and ranks as in checkpoint_state()."""
    save_torch(path, checkpoint_state(run, position, ranks))


def cuda_states_to_restore(states, visible):
    """(index, state) pairs for the visible GPUs, and a line to print when the checkpoint holds
    the states of another number of GPUs (DataParallel on 2, resumed on 1): those that fit are
    restored, and the run goes on, no longer bitwise identical to an uninterrupted one."""
    pairs = list(enumerate(states[:visible]))
    note = None
    if states and len(states) != visible:
        note = (f"checkpoint.pt holds the CUDA random states of {len(states)} GPUs and "
                f"{visible} are visible: restored {len(pairs)}, so dropout will not draw what "
                f"an uninterrupted run draws")
    return pairs, note


def rank_record(checkpoint, rank, world_size):
    """This process's saved generator states and running sums, and a line to print when the
    checkpoint was written by another number of processes (None when it fits)."""
    rng, position = checkpoint["rng"], checkpoint.get("position")
    ranks = rng.get("ranks") or [{"torch": rng["torch"], "cuda": rng["cuda"]}]
    sums = (position or {}).get("ranks") or ([{key: position[key] for key in SUMS}]
                                             if position else [])
    note = None
    if len(ranks) != world_size:
        note = (f"checkpoint.pt was written by {len(ranks)} processes and {world_size} resume "
                f"it: the random draws differ from an uninterrupted run's")
    record = dict(ranks[rank]) if rank < len(ranks) else {}
    if sums:
        if len(sums) == world_size:
            record.update(sums[rank])
        else:  # rank 0 carries the epoch's sums so far; the totals stay right
            record.update({key: sum(s[key] for s in sums) if rank == 0 else 0 * sums[0][key]
                           for key in SUMS})
    return record, note


def restore(checkpoint, model, optimizer, scheduler, scaler, generator, devices):
    """Load every state of the checkpoint; refuse one that does not fit this model.

    Returns this process's running sums of a stopped epoch ({} at an epoch's end) and the lines
    to print about what could not be restored exactly."""
    notes = []
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        generator.set_state(checkpoint["rng"]["data"])
        record, note = rank_record(checkpoint, devices.rank, devices.world_size)
        notes.append(note)
        if "torch" in record:
            torch.set_rng_state(record["torch"])
        if devices.device.type == "cuda" and record.get("cuda"):
            if devices.distributed:
                torch.cuda.set_rng_state(record["cuda"][0], devices.device)
            else:
                pairs, note = cuda_states_to_restore(record["cuda"], torch.cuda.device_count())
                notes.append(note)
                for index, state in pairs:
                    torch.cuda.set_rng_state(state, index)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
        raise UsageError(f"checkpoint.pt does not fit the model and settings it claims "
                         f"({one_line(error)[:300]}); it was left as it is") from None
    sums = {key: record[key] for key in SUMS if key in record}
    return sums, [note for note in notes if note]
