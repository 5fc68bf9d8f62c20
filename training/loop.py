"""A whole training run: set-up, epochs of steps, per-epoch evaluation, checkpoints, summary.

A run can stop at any step (stop.py) and continue there: the checkpoint records the position
inside the epoch, and the loader replays the epoch's draws from the generator state the epoch
started with, so a stopped and resumed run ends bitwise identical to an uninterrupted one on a
CPU (and on a GPU with --deterministic True). Every --checkpoint_every minutes of training a
recovery checkpoint of the same kind is written in the background, so that a SIGKILL loses at
most that much work; under torchrun the decision to write it travels in the one collective that
each step already makes for stop requests, so that every process takes it at the same step.
"""

import math
import platform
import secrets
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from data import DataError

from .build import (
    build_model,
    data_notes,
    load_data,
    make_loaders,
    make_optimizer,
    make_scheduler,
    model_name,
)
from .checkpoint import SUMS, CheckpointWriter, checkpoint_state, process_rng, restore
from .devices import (
    Devices,
    any_rank,
    any_rank_each,
    broadcast,
    gather,
    lost_peer,
    on_all_ranks,
    rank_seed,
    wrap,
)
from .errors import UsageError, one_line
from .evaluation import evaluate, summarize
from .log import Log, Progress, plural
from .pretrained import apply_pretrained
from .run_folder import RunFolder
from .step import graphable_lr, make_step
from .stop import Stopped, StopRequest


class Run:
    """Everything one training process holds: settings, devices, files, model and states."""

    def __init__(self, config):
        self.devices = Devices(config["deterministic"])
        self.log = Log(enabled=self.devices.is_main)
        self.folder = RunFolder(config["save"])
        self.stop = StopRequest().install()
        self.started = False
        self.finished = False  # the run in --save had nothing left to do
        self.estimate = self.devices.device.type == "cpu"  # the first epoch's time, early
        self.config = config
        self.writer = CheckpointWriter(self.folder.path("checkpoint.pt"))
        self.last_checkpoint = time.monotonic()  # for --checkpoint_every

    def prepare(self):
        """Lock and check the run folder, then build data, model and states (or restore them)."""
        # Rank 0 locks the folder; the others only read it (checkpoint.pt to resume from).
        checkpoint, config = on_all_ranks(
            lambda: self.folder.open(self.config) if self.devices.is_main
            else self.folder.check(self.config))
        devices, log = self.devices, self.log
        if self.folder.finished(checkpoint, config):  # resumed: no file is touched
            self.finished = True
            log.print(f"the run in {config['save']} already trained its "
                      f"{plural(config['n_epochs'], 'epoch')}; nothing was changed (a larger "
                      f"--n_epochs extends it)")
            return
        if config["seed"] is None:
            config["seed"] = broadcast(secrets.randbelow(2**31))
        self.config = config
        log.open(self.folder.path("log.txt")) if devices.is_main else None
        position = checkpoint.get("position") if checkpoint else None
        if checkpoint is None:
            resumed = "new run"
        else:
            resumed = f"resuming after epoch {checkpoint['epoch']}"
            if position:
                resumed += f", at step {position['step']} of epoch {checkpoint['epoch'] + 1}"
        log.print(f"run      {config['save']} ({resumed})")
        log.print(f"device   {devices.describe()}")
        log.print(f"torch    {torch.__version__}, Python {platform.python_version()}")

        torch.manual_seed(rank_seed(config["seed"], devices.rank))  # dropout
        self.generator = torch.Generator().manual_seed(config["seed"] + 1)  # order, augmentation
        dataset = load_data(config, devices, log)
        self.train_loader, self.valid_loader, self.test_loader = on_all_ranks(
            lambda: make_loaders(config, dataset, devices, self.generator, log))
        self.raw_model = build_model(config, dataset.num_classes)
        weights = None  # a resumed run's weights come from its checkpoint
        if config.get("pretrained") and checkpoint is None:
            weights = apply_pretrained(self.raw_model, config, devices.rank, model_name(config))
        if config["sync_bn"]:
            self.raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.raw_model)
        memory_format = torch.channels_last if config["channels_last"] else torch.preserve_format
        self.raw_model.to(devices.device, memory_format=memory_format)
        self.optimizer = make_optimizer(config, self.raw_model, devices.device)
        self.scheduler = make_scheduler(config, self.optimizer)
        self.scaler = torch.amp.GradScaler(devices.device.type, enabled=config["amp"] == "fp16")
        self.epoch, self.best_error, self.best_epoch, self.position = 0, math.inf, 0, None
        if checkpoint is not None:
            sums, notes = on_all_ranks(lambda: restore(
                checkpoint, self.raw_model, self.optimizer, self.scheduler, self.scaler,
                self.generator, devices))
            for note in notes:
                log.print(f"note     {note}")
            self.epoch = checkpoint["epoch"]
            self.best_error = checkpoint["best_valid_error"]
            self.best_epoch = checkpoint["best_epoch"]
            if position:  # this process's own running sums of the stopped epoch
                position = {key: value for key, value in position.items() if key != "ranks"}
                self.position = {**position, **sums}
        self.rows = on_all_ranks(lambda: self.folder.kept_rows(self.epoch)
                                 if devices.is_main else None)

        parameters = sum(p.numel() for p in self.raw_model.parameters())
        log.print(f"model    {model_name(config)}: {parameters:,} parameters, amp "
                  f"{config['amp']}, channels_last {config['channels_last']}")
        if weights:
            log.print(f"weights  {weights}")
        valid = len(self.valid_loader.images) if self.valid_loader else 0
        log.print(f"data     {dataset.name}: {len(self.train_loader.images):,} training, "
                  f"{valid:,} validation, {len(self.test_loader.images):,} test images; batch "
                  f"{config['batch_size']}, {len(self.train_loader)} steps per epoch")
        for line in data_notes(config, dataset):
            log.print(line)
        milestones = config["milestones"]
        drops = (f"x{config['gamma']:g} after epoch{'s' if len(milestones) > 1 else ''} "
                 f"{', '.join(map(str, milestones))}" if milestones else "constant")
        log.print(f"schedule {plural(config['n_epochs'], 'epoch')}, SGD lr {config['lr']:g} "
                  f"({drops}), seed {config['seed']}")
        late = [m for m in milestones if m >= config["n_epochs"]]
        if late:
            log.print(f"warning  milestone{'s' if len(late) > 1 else ''} "
                      f"{', '.join(map(str, late))} not before the last epoch "
                      f"({config['n_epochs']}): no drop there within this run")

        if config["cuda_graph"]:  # a restored learning rate comes back as a CPU number
            for group in self.optimizer.param_groups:
                group["lr"] = graphable_lr({**config, "lr": float(group["lr"])}, devices.device)
        self.model = wrap(self.raw_model, devices, config["amp"])
        if config["compile"]:
            self.model = torch.compile(self.model)
        self.eval_model = self.raw_model if devices.distributed else self.model
        self.step = make_step(self.model, self.optimizer, self.scaler, config, devices.device)

    def write_start_files(self):
        """config.json and results.csv (rank 0), and model_best.pt if a kill beat it."""
        def start():
            environment = {"python": platform.python_version(), "torch": torch.__version__,
                           "device": self.devices.describe(),
                           "world_size": self.devices.world_size,
                           "data_parallel": self.devices.data_parallel,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            self.folder.start({**self.config, "environment": environment}, self.rows)
            # Only at an epoch's end is the model the best one; a checkpoint inside the next
            # epoch was written after model_best.pt.
            if self.best_epoch and self.best_epoch == self.epoch and self.position is None:
                self.folder.save_best(self.raw_model, self.best_epoch, self.best_error,
                                      self.config)

        on_all_ranks(lambda: start() if self.devices.is_main else None)
        self.started = True

    def close(self):
        try:
            self.writer.wait()  # a recovery checkpoint still being written
        except UsageError as error:
            self.log.print(f"error: {one_line(error)}")
        self.log.close()
        if self.devices.is_main:
            self.folder.close(started=self.started)


def train(config):
    """Train (or continue) the run config describes; raise Stopped when a signal stops it, and
    devices.LostPeer when another process of a torchrun run died."""
    try:
        run = Run(config)
    except RuntimeError as error:  # setting up the process group failed
        lost = lost_peer(error)
        if lost is None:
            raise
        raise lost from None
    try:
        run.prepare()
        if run.finished:
            return
        run.write_start_files()
        fit(run)
    except (UsageError, DataError) as error:
        run.log.print(f"error: {one_line(error)}", echo=False)
        raise
    except RuntimeError as error:
        lost = lost_peer(error)
        if lost is None:
            raise
        run.log.print(f"error: {lost}", echo=False)
        raise lost from None
    finally:
        run.close()


def fit(run):
    config, devices, log = run.config, run.devices, run.log
    if run.epoch == config["n_epochs"] and run.position is None:
        log.print(f"the run already trained its {plural(run.epoch, 'epoch')}")
    for epoch in range(run.epoch + 1, config["n_epochs"] + 1):
        lr = float(run.optimizer.param_groups[0]["lr"])
        devices.reset_peak_memory()
        title = f"epoch {epoch}/{config['n_epochs']}"
        position = run.position
        run.position = None
        result = train_epoch(run, title, position, config["n_epochs"] - epoch)
        if "step" in result:  # stopped inside the epoch
            stop_here(run, epoch, result)
        started_epoch = time.perf_counter()
        images, seconds = result["count"] * devices.world_size, result["seconds"]
        train_loss, train_error = result["loss"], result["error"]
        if not math.isfinite(train_loss):
            kept = (f"{config['save']}/checkpoint.pt keeps epoch {epoch - 1}" if epoch > 1
                    else "no checkpoint was written")
            raise UsageError(f"the training loss became {train_loss} in epoch {epoch}; training "
                             f"stopped ({kept}); try a smaller --lr")
        run.scheduler.step()
        run.epoch = epoch
        ranks = gather(process_rng(devices))
        if devices.is_main:
            finish_epoch(run, epoch, title, lr, train_loss, train_error, images, seconds,
                         started_epoch, ranks)
        run.last_checkpoint = time.monotonic()
        if epoch < config["n_epochs"] and any_rank(run.stop.requested, devices.device):
            stop_here(run, epoch + 1, None)  # the epoch's checkpoint is the stop's
    if devices.is_main:
        summarize(run)
    if dist.is_initialized():
        dist.barrier()


def finish_epoch(run, epoch, title, lr, train_loss, train_error, images, seconds, started,
                 ranks):
    """Validation and test error, the CSV row, the checkpoint and the epoch's line (rank 0);
    ranks: every process's random generator states."""
    config, device = run.config, run.devices.device
    valid_loss = valid_error = None
    if run.valid_loader is not None:
        valid_loss, valid_error = evaluate(run.eval_model, run.valid_loader, config, device)
    test_loss, test_error = evaluate(run.eval_model, run.test_loader, config, device)
    improved = valid_error is not None and valid_error < run.best_error
    if improved:
        run.best_error, run.best_epoch = valid_error, epoch
    epoch_seconds = seconds + time.perf_counter() - started
    run.folder.append_row([
        epoch, fmt(train_loss), fmt(train_error), fmt(valid_loss), fmt(valid_error),
        fmt(test_error), fmt(test_loss), fmt(lr), f"{epoch_seconds:.3f}",
        f"{images / seconds:.1f}", run.devices.peak_memory_mb()])
    run.writer.write(checkpoint_state(run, None, ranks))
    if improved:
        run.folder.save_best(run.raw_model, epoch, valid_error, config)
    valid = "" if valid_error is None else \
        f"  valid loss {valid_loss:.4f} error {valid_error:.4f} |"
    run.log.print(f"{title}  lr {lr:.3g} | train loss {train_loss:.4f} error {train_error:.4f} |"
                  f"{valid}  test loss {test_loss:.4f} error {test_error:.4f} | "
                  f"{epoch_seconds:.1f} s, {images / seconds:.0f} images/s")


def stop_here(run, epoch, position):
    """Write the checkpoint of a stop inside `epoch` (rank 0), say so, raise Stopped."""
    if run.stop.requested:
        name, status = run.stop.name, run.stop.exit_status
    else:  # under torchrun, another process received it
        name, status = "a signal to another process", Stopped.DEFAULT_STATUS
    where = f"in epoch {epoch} at step {position['step']}" if position else f"before epoch {epoch}"
    ranks = gather(rank_state(run, position)) if position is not None else None
    if run.devices.is_main:
        if position is not None:
            run.writer.write(checkpoint_state(run, position, ranks))
        again = ("the same command line (--resume auto)" if run.config["resume"] == "auto"
                 else "--resume True")
        run.log.print(f"stopped by {name} {where}: checkpoint.pt saved; continue with "
                      f"{again} (exit status {status})")
    raise Stopped(f"stopped by {name}", status)


def rank_state(run, position):
    """This process's random generators and, inside an epoch, its running sums (for rank 0)."""
    return {**process_rng(run.devices), **{key: position[key] for key in SUMS}}


def recovery_checkpoint(run, position, title, total):
    """Write a recovery checkpoint at position (every rank calls this; rank 0 writes it)."""
    ranks = gather(rank_state(run, position))
    if run.devices.is_main:
        run.writer.write(checkpoint_state(run, position, ranks), background=True)
        minutes = run.config["checkpoint_every"]
        run.log.print(f"{title} step {position['step']}/{total}: writing a recovery checkpoint "
                      f"(every {minutes:g} min)", echo=not sys.stderr.isatty())
    run.last_checkpoint = time.monotonic()


def train_epoch(run, title, position, epochs_after):
    """One pass over this process's shard, from position (None: the epoch's start).

    Returns {"loss", "error", "count", "seconds"} for a finished epoch, or, when a stop was
    requested, the position to continue at: {"step", "data", "loss_sum", "wrong", "count",
    "seconds"}, where "data" is the data generator's state at the epoch's start.
    """
    config, devices = run.config, run.devices
    device = devices.device
    run.model.train()
    if position is None:
        position = {"step": 0, "data": run.generator.get_state(), "count": 0, "seconds": 0.0,
                    "loss_sum": torch.zeros((), dtype=torch.float64),
                    "wrong": torch.zeros((), dtype=torch.int64)}
    run.generator.set_state(position["data"])
    step, count = position["step"], position["count"]
    loss_sum, wrong = position["loss_sum"].to(device), position["wrong"].to(device)
    batches = run.train_loader.epoch(skip=step)
    progress = Progress(run.log, title, len(run.train_loader), step, config["log_every"],
                        epochs_after, estimate=run.estimate)
    run.estimate = False
    start = time.perf_counter()
    every = config["checkpoint_every"] * 60
    try:
        for inputs, targets in batches:
            due = every > 0 and step > position["step"] \
                and time.monotonic() - run.last_checkpoint >= every
            stop, due = any_rank_each([run.stop.requested, due], device)
            if stop or due:
                devices.synchronize()
                here = {**position, "step": step, "count": count, "loss_sum": loss_sum.cpu(),
                        "wrong": wrong.cpu(),
                        "seconds": position["seconds"] + time.perf_counter() - start}
                if stop:
                    return here
                recovery_checkpoint(run, here, title, len(run.train_loader))
            if config["channels_last"]:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            loss, logits = run.step(inputs, targets)
            loss_sum += loss.double() * len(targets)
            wrong += (logits.argmax(1) != targets).sum()
            count += len(targets)
            step += 1
            if progress.due():
                progress.update(step, (count - position["count"]) * devices.world_size,
                                loss_sum.item() / count, wrong.item() / count)
    finally:
        progress.close()
    totals = torch.stack([loss_sum, wrong.double(),
                          torch.tensor(count, dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    devices.synchronize()
    seconds = position["seconds"] + time.perf_counter() - start
    loss_total, wrong_total, images = totals.tolist()
    return {"loss": loss_total / images, "error": wrong_total / images,
            "count": count, "seconds": seconds}


def fmt(value, digits=6):
    return "" if value is None else f"{value:.{digits}g}"
