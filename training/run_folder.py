"""The run folder (--save): its lock and the files a run writes there, except checkpoints.

    .lock           held by the one process writing the run (see lock.py)
    config.json     the run's settings, written before the first step
    results.csv     one row per epoch, appended and flushed
    log.txt         everything the run printed (see log.py)
    checkpoint.pt   see checkpoint.py
    model_best.pt   the model with the lowest validation error
    summary.json    the final test error
"""

import csv
import io
import json
import os
import shutil

from .checkpoint import CHECKPOINT_KEYS
from .errors import UsageError, one_line
from .files import read_torch, save_torch, write_atomically, write_json
from .lock import LOCK_NAME, RunLock
from .log import plural

CSV_COLUMNS = ["epoch", "train_loss", "train_error", "valid_loss", "valid_error", "test_error",
               "test_loss", "lr", "epoch_seconds", "images_per_second", "peak_memory_mb"]
RUN_FILES = ("config.json", "results.csv", "checkpoint.pt")
# Arguments that may change on --resume: they change how fast, not what, the run computes.
FREE_ON_RESUME = {"data", "save", "resume", "evaluate", "download", "n_epochs", "log_every",
                  "deterministic", "compile", "cuda_graph", "checkpoint_every", "workers",
                  "skip_bad_images"}
# Arguments a resumed run never takes from the run's stored configuration (--workers: the
# default is this machine's cores, and any number gives the same batches).
NOT_REMEMBERED = {"save", "resume", "evaluate", "predict", "workers"}
# What a run found in its data (training.build.load_data); a resumed run keeps these.
DATA_FACTS = ("classes", "train_images", "resize_size", "mean", "std")


def check_save_folder(save):
    """Refuse a --save that is a file or lies where nothing can be written, before any work."""
    existing = save
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--save {save}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--save {save}: {existing} is not writable")


def stored_settings(save):
    """The settings of the run in save: config.json's (rewritten at every start, so it holds
    the latest --n_epochs), else checkpoint.pt's; None when save holds neither."""
    path = os.path.join(save, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as file:
                return json.load(file)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {path} ({one_line(error)}); it was left as it "
                             f"is") from None
    path = os.path.join(save, "checkpoint.pt")
    if os.path.exists(path):
        return read_torch(path, CHECKPOINT_KEYS)["config"]
    return None


def resume_settings(config, given):
    """config resuming the run in config["save"]: every setting not among `given` (the names of
    the flags on the command line; None: all) is the stored one, so that --resume True alone
    continues a run as it was started. Without a stored run: UsageError for --resume True,
    config unchanged otherwise (--resume auto starts a new run)."""
    stored = stored_settings(config["save"])
    if stored is None:
        if config["resume"] is True:
            raise UsageError(f"nothing to resume in {config['save']}: it holds no run (no "
                             f"config.json or checkpoint.pt)")
        return config
    if given is None:
        return config
    return {**config, **{key: value for key, value in stored.items()
                         if key in config and key not in given and key not in NOT_REMEMBERED}}


class RunFolder:
    """--save, locked for this process; the paths of the run's files."""

    def __init__(self, save):
        self.save = save
        self.lock = RunLock(save)
        self.created = False

    def path(self, name):
        return os.path.join(self.save, name)

    def open(self, config):
        """Lock the folder (creating it if needed) and check it against config.

        Returns what check() returns.
        """
        check_save_folder(self.save)
        self.created = not os.path.exists(self.save)
        try:
            os.makedirs(self.save, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create --save {self.save}: "
                             f"{error.strerror or error}") from None
        try:
            self.lock.acquire()
            return self.check(config)
        except UsageError:
            self.close(started=False)
            raise

    def close(self, started):
        """Release the lock; a folder this process created for a run that never started (bad
        data, say) is removed again, so that a failed start leaves nothing behind."""
        if self.created and not started and self.lock.fd is not None:
            leftovers = set(os.listdir(self.save)) - {LOCK_NAME, "log.txt"}
            if not leftovers:
                self.lock.release(remove=True)
                shutil.rmtree(self.save, ignore_errors=True)
                return
        self.lock.release()

    def check(self, config):
        """(checkpoint to resume from or None, config with the stored seed if none was given);
        UsageError if the folder's run does not fit config."""
        save = self.save
        present = [name for name in RUN_FILES if os.path.exists(self.path(name))]
        if config["resume"] == "auto" and not present:  # nothing to continue: a new run
            return None, config
        if not config["resume"]:
            if present:
                raise UsageError(f"{save} already holds a run ({', '.join(present)}); continue "
                                 f"it with --resume True or choose another --save")
            return None, config
        if os.path.exists(self.path("checkpoint.pt")):
            checkpoint = read_torch(self.path("checkpoint.pt"), CHECKPOINT_KEYS)
            stored = checkpoint["config"]
        elif os.path.exists(self.path("config.json")):  # killed before its first checkpoint
            checkpoint = None
            try:
                with open(self.path("config.json")) as file:
                    stored = json.load(file)
            except (OSError, ValueError) as error:
                raise UsageError(f"cannot read {self.path('config.json')} "
                                 f"({one_line(error)})") from None
        else:
            raise UsageError(f"nothing to resume in {save}: it holds no checkpoint.pt")
        if checkpoint is not None and checkpoint["epoch"] > config["n_epochs"]:
            raise UsageError(f"the run in {save} already trained "
                             f"{plural(checkpoint['epoch'], 'epoch')}, "
                             f"more than --n_epochs {config['n_epochs']}")
        if config["seed"] is None:
            config = {**config, "seed": stored.get("seed")}
        # A setting the run did not store (a flag added since) is not compared.
        different = [f"{key} {stored[key]!r} there, {config[key]!r} now" for key in config
                     if key not in FREE_ON_RESUME and key in stored and stored[key] != config[key]]
        if different:
            raise UsageError(f"cannot resume the run in {save} with other settings: "
                             f"{'; '.join(different)}")
        return checkpoint, {**config, **{key: stored[key] for key in DATA_FACTS if key in stored}}

    def finished(self, checkpoint, config):
        """Whether the run trained all its epochs and wrote its summary: nothing left to do."""
        return (checkpoint is not None and checkpoint["epoch"] == config["n_epochs"]
                and not checkpoint.get("position")
                and os.path.exists(self.path("summary.json")))

    def kept_rows(self, epochs_done):
        """results.csv's rows for the epochs the checkpoint holds.

        The row of an epoch is appended before its checkpoint is written, so a kill between the
        two leaves one row too many: that epoch is trained again and its row rewritten."""
        if epochs_done == 0:
            return []
        path = self.path("results.csv")
        try:
            with open(path, newline="") as file:
                rows = list(csv.reader(file))
        except OSError as error:
            raise UsageError(f"cannot read {path}: {error.strerror}") from None
        kept = rows[1:epochs_done + 1]
        if rows[:1] != [CSV_COLUMNS] or len(kept) != epochs_done or any(
                len(row) != len(CSV_COLUMNS) or row[0] != str(i + 1)
                for i, row in enumerate(kept)):
            raise UsageError(f"{path} does not match checkpoint.pt (epoch {epochs_done}); both "
                             f"were left as they are")
        return kept

    def start(self, config, rows):
        """config.json and results.csv (header and kept rows), before the first step."""
        write_json(self.path("config.json"), config)
        write_atomically(self.path("results.csv"), lambda f: f.write(
            "".join(csv_line(row) for row in [CSV_COLUMNS, *rows]).encode()))

    def append_row(self, values):
        """Append one line to results.csv and make sure it is on disk."""
        path = self.path("results.csv")
        try:
            with open(path, "a") as file:
                file.write(csv_line(values))
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise UsageError(f"cannot write {path}: {error.strerror or error}") from None

    def save_best(self, model, epoch, valid_error, config):
        save_torch(self.path("model_best.pt"), {
            "model": model.state_dict(), "epoch": epoch, "valid_error": valid_error,
            "config": config})

    def write_summary(self, summary):
        write_json(self.path("summary.json"), summary)


def csv_line(values):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()
