"""Train a DenseNet on CIFAR-10, CIFAR-100 or SVHN, resume it, or evaluate a saved one.

    python demo.py --data DIR --save DIR [--depth 100 --growth_rate 12 --efficient True ...]
    CUDA_VISIBLE_DEVICES=0,1 python demo.py ...       # DataParallel over the visible GPUs
    torchrun --nproc_per_node=4 demo.py ...           # DistributedDataParallel, one process per GPU
    python demo.py --save DIR --resume True ...       # continue an interrupted run
    python demo.py --save DIR --evaluate True         # test error of a saved model
    python demo.py --plan True --depth 250 --growth_rate 24 --memory_budget 8GiB  # what fits

Bad input ends with one line "error: ..." on stderr and exit status 2.
"""

import csv
import inspect
import io
import json
import math
import os
import platform
import secrets
import sys
import time

import fire
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DATASETS, DataError, TensorLoader, load_dataset, split_validation
from measure import cpu_name
from models import DenseNet, depth_to_config
from training.plan import PlanError, run_plan

CSV_COLUMNS = ["epoch", "train_loss", "train_error", "valid_loss", "valid_error", "test_error",
               "test_loss", "lr", "epoch_seconds", "images_per_second", "peak_memory_mb"]
RUN_FILES = ("config.json", "results.csv", "checkpoint.pt")
CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "scheduler", "scaler", "best_valid_error",
                   "best_epoch", "rng", "config"}
# Arguments that may change on --resume: they do not change what the run computes.
FREE_ON_RESUME = {"data", "save", "resume", "evaluate", "download", "n_epochs"}
BOOLEAN_ARGS = ("bc", "efficient", "recompute_bottleneck", "augment", "channels_last", "sync_bn",
                "svhn_extra", "download", "resume", "evaluate")
AMP_MODES = ("off", "bf16", "fp16")


class UsageError(Exception):
    """Bad input or an unusable run: reported as one line on stderr, exit status 2."""


def main(data=None, save=None, dataset="cifar10", depth=100, growth_rate=12, bc=True,
         compression=None, drop_rate=0.0, efficient=True, recompute_bottleneck=False,
         valid_size=5000, n_epochs=300, batch_size=64, lr=0.1, momentum=0.9, wd=1e-4,
         milestones=None, gamma=0.1, seed=None, augment=True, amp="off", channels_last=False,
         sync_bn=False, svhn_extra=False, fake_size=(50000, 10000), download=True,
         resume=False, evaluate=False, plan=False, memory_budget=None, json=False):
    """Train a DenseNet (defaults: the paper's DenseNet-BC, L=100, k=12 on CIFAR-10).

    Uses CUDA when available (every visible GPU through DataParallel), else the CPU; under
    torchrun, DistributedDataParallel with one process per GPU. Writes to --save: config.json,
    results.csv (one row per epoch), checkpoint.pt (every epoch), model_best.pt (lowest
    validation error) and summary.json (final test error).

    Args:
        data: folder holding the dataset files (downloaded there if missing); not needed for fake.
        save: folder for the run's logs and checkpoints (created if missing).
        dataset: cifar10, cifar100, svhn, or fake (random images, no files).
        depth: network depth L; DenseNet-BC needs L - 4 divisible by 6, plain DenseNet by 3.
        growth_rate: k, the channels each layer adds.
        bc: DenseNet-BC (bottleneck layers and compression) rather than plain DenseNet.
        compression: channel reduction at transitions, in (0, 1]; default 0.5 for BC, else 1.
        drop_rate: dropout after each layer, in [0, 1) (the paper: 0.2 without augmentation).
        efficient: memory-efficient dense blocks (same model and results, far less memory).
        recompute_bottleneck: with efficient, also recompute the bottleneck convolutions in
            backward (least memory, more time).
        valid_size: training images held out for validation; 0 for none (the last model counts).
        n_epochs: number of epochs.
        batch_size: images per step, summed over all GPUs and processes.
        lr: initial learning rate.
        momentum: Nesterov momentum.
        wd: weight decay.
        milestones: epochs after which the learning rate is multiplied by gamma, such as
            150,225; by default 50% and 75% of n_epochs.
        gamma: learning rate factor at each milestone.
        seed: random seed (default: drawn at random and recorded in config.json).
        augment: zero-pad 4, random 32x32 crop, horizontal flip (not for SVHN).
        amp: mixed precision: off, bf16, or fp16 (with a gradient scaler).
        channels_last: channels-last memory format (faster convolutions with amp on GPUs).
        sync_bn: under torchrun on GPUs, synchronise BatchNorm statistics across processes.
        svhn_extra: add SVHN's 531,131 extra images to its training set.
        fake_size: train,test numbers of images of the fake dataset.
        download: download missing dataset files.
        resume: continue the run in --save from its checkpoint.pt (same arguments needed).
        evaluate: no training: evaluate --save's model_best.pt (else checkpoint.pt) on the test
            set, with the configuration it was trained with.
        plan: no training: print, for this model, batch, --amp and --channels_last, what each
            memory mode needs (saved for backward, parameters + gradients + momentum, peak of a
            training step) and what fits the GPU's free memory (on a CPU: the available memory)
            or --memory_budget: largest batch, deepest network of this growth rate. Predicted
            by models/memory.py in milliseconds; needs no --data or --save.
        memory_budget: with --plan, the memory to plan for, such as 8GiB, 1.5GB or 512MiB.
        json: with --plan, print one JSON object instead of the table.
    """
    args = dict(locals())
    planning = {name: args.pop(name) for name in ("plan", "memory_budget", "json")}
    try:
        if planning["plan"] is not False:
            sys.exit(run_plan({**args, **planning}))
        if planning["memory_budget"] is not None or planning["json"] is not False:
            raise UsageError("--memory_budget and --json go with --plan True")
        config = resolve_args(args)
        if config["evaluate"]:
            evaluate_saved(config)
        else:
            train(config)
    except (UsageError, DataError, PlanError) as error:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- arguments

def one_line(error):
    return " ".join(str(error).split())


def _integer(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(name, value, is_valid, wanted):
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not is_valid(value):
        raise UsageError(f"--{name} must be {wanted}, got {value!r}")
    return float(value)


def _folder(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise UsageError(f"--{name} must be a folder path, got {value!r}")
    return os.path.abspath(str(value))


def default_milestones(n_epochs):
    """50% and 75% of n_epochs, as whole epochs (as in the paper)."""
    return sorted({m for m in (n_epochs // 2, n_epochs * 3 // 4) if m > 0})


def _milestones(value, n_epochs):
    if value is None:
        return default_milestones(n_epochs)
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) \
            or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in values) \
            or list(values) != sorted(set(values)):
        raise UsageError(f"--milestones must be increasing positive epochs such as 150,225, "
                         f"got {value!r}")
    return list(values)


def world_size_from_env():
    """Processes in this run: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ["WORLD_SIZE"]) if is_distributed() else 1


def is_distributed():
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_args(args):
    """Check every argument before any work; return the run's configuration (JSON types)."""
    config = dict(args)
    for name in BOOLEAN_ARGS:
        if not isinstance(config[name], bool):
            raise UsageError(f"--{name} must be True or False, got {config[name]!r}")
    if config["dataset"] not in DATASETS:
        raise UsageError(f"unknown --dataset {config['dataset']!r}; choose one of "
                         f"{', '.join(DATASETS)}")
    config["data"] = _folder("data", config["data"])
    config["save"] = _folder("save", config["save"])
    if config["save"] is None:
        raise UsageError("--save is required: the folder for the run's logs and checkpoints")
    if config["data"] is None and config["dataset"] != "fake" and not config["evaluate"]:
        raise UsageError(f"--data is required for {config['dataset']}: the folder holding "
                         f"(or receiving) its files")
    _integer("depth", config["depth"], 1)
    _integer("growth_rate", config["growth_rate"], 1)
    try:
        architecture = depth_to_config(config["depth"], config["growth_rate"], config["bc"])
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config["compression"] is None:
        config["compression"] = architecture["compression"]
    config["compression"] = _number("compression", config["compression"],
                                    lambda v: 0 < v <= 1, "in (0, 1]")
    config["drop_rate"] = _number("drop_rate", config["drop_rate"], lambda v: 0 <= v < 1,
                                  "in [0, 1)")
    _integer("valid_size", config["valid_size"], 0)
    _integer("n_epochs", config["n_epochs"], 1)
    _integer("batch_size", config["batch_size"], 1)
    config["lr"] = _number("lr", config["lr"], lambda v: v > 0, "a positive number")
    config["momentum"] = _number("momentum", config["momentum"], lambda v: 0 <= v < 1,
                                 "in [0, 1)")
    config["wd"] = _number("wd", config["wd"], lambda v: v >= 0, "a non-negative number")
    config["gamma"] = _number("gamma", config["gamma"], lambda v: v > 0, "a positive number")
    config["milestones"] = _milestones(config["milestones"], config["n_epochs"])
    if config["seed"] is not None:
        _integer("seed", config["seed"], 0)
        if config["seed"] >= 2**32:
            raise UsageError(f"--seed must be below 2**32, got {config['seed']}")
    if config["amp"] not in AMP_MODES:
        raise UsageError(f"--amp must be one of {', '.join(AMP_MODES)}, got {config['amp']!r}")
    fake_size = config["fake_size"]
    if not isinstance(fake_size, (list, tuple)) or len(fake_size) != 2:
        raise UsageError(f"--fake_size must be two numbers train,test, got {fake_size!r}")
    config["fake_size"] = [_integer("fake_size", n, 1) for n in fake_size]

    if config["recompute_bottleneck"] and not (config["efficient"] and config["bc"]):
        raise UsageError("--recompute_bottleneck True needs --efficient True and --bc True")
    if config["svhn_extra"] and config["dataset"] != "svhn":
        raise UsageError("--svhn_extra True applies only to --dataset svhn")
    if config["resume"] and config["evaluate"]:
        raise UsageError("choose one of --resume True and --evaluate True")
    world_size = world_size_from_env()
    if config["evaluate"] and is_distributed():
        raise UsageError("run --evaluate True without torchrun")
    if config["sync_bn"] and not is_distributed():
        raise UsageError("--sync_bn True needs several processes started by torchrun")
    if config["sync_bn"] and not torch.cuda.is_available():  # DDP refuses SyncBatchNorm on CPU
        raise UsageError("--sync_bn True needs CUDA")
    if config["batch_size"] % world_size:
        raise UsageError(f"--batch_size {config['batch_size']} must be divisible by the "
                         f"{world_size} processes")
    return config


# ---------------------------------------------------------------------------- devices

class Devices:
    """Where this process runs: device, rank and number of processes."""

    def __init__(self):
        self.distributed = is_distributed()
        self.rank = int(os.environ["RANK"]) if self.distributed else 0
        self.world_size = world_size_from_env()
        if torch.cuda.is_available():
            index = int(os.environ["LOCAL_RANK"]) if self.distributed else 0
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
        else:
            self.device = torch.device("cpu")
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.data_parallel = not self.distributed and torch.cuda.device_count() > 1

    def describe(self):
        if self.device.type == "cuda":
            count = torch.cuda.device_count() if self.data_parallel else 1
            return f"{count} x {torch.cuda.get_device_name(self.device)}"
        return f"CPU ({cpu_name()}, {os.cpu_count()} cores)"


def on_all_ranks(step):
    """Run step() here; if it failed with bad input on any process, raise that on every one."""
    try:
        result, error = step(), None
    except (UsageError, DataError) as failure:
        result, error = None, one_line(failure)
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UsageError(error)
    return result


def broadcast(value):
    """Rank 0's value, on every process."""
    if not dist.is_initialized():
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def autocast(config, device):
    dtype = torch.float16 if config["amp"] == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=config["amp"] != "off")


# ---------------------------------------------------------------------------- files

def write_atomically(path, write):
    """write(file) into a temporary file in the same folder, fsync it, then rename over path."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def write_json(path, value):
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


def save_torch(path, value):
    write_atomically(path, lambda f: torch.save(value, f))


def read_torch(path, keys):
    """A dict saved by this tool, checked for `keys`; bad files are refused and left alone."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file can raise almost anything while unpickling
        raise UsageError(f"cannot read {path} ({type(error).__name__}: {one_line(error)}); "
                         f"it was left as it is") from None
    if not isinstance(value, dict) or not keys <= value.keys():
        raise UsageError(f"{path} is not a file this tool wrote; it was left as it is")
    return value


def csv_line(values):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def append_row(path, values):
    """Append one line to results.csv and make sure it is on disk."""
    try:
        with open(path, "a") as file:
            file.write(csv_line(values))
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def check_save_folder(save):
    """Refuse a --save that is a file or lies where nothing can be written, before any work."""
    existing = save
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--save {save}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--save {save}: {existing} is not writable")


def open_run(config):
    """Check --save; with --resume, check the stored run matches and return its checkpoint.

    Returns (checkpoint or None, config with the stored seed when --seed was not given)."""
    save = config["save"]
    check_save_folder(save)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(save, name))]
    if not config["resume"]:
        if present:
            raise UsageError(f"{save} already holds a run ({', '.join(present)}); continue it "
                             f"with --resume True or choose another --save")
        return None, config
    checkpoint_path = os.path.join(save, "checkpoint.pt")
    config_path = os.path.join(save, "config.json")
    if os.path.exists(checkpoint_path):
        checkpoint = read_torch(checkpoint_path, CHECKPOINT_KEYS)
        stored = checkpoint["config"]
    elif os.path.exists(config_path):  # killed before its first checkpoint: start again
        checkpoint = None
        try:
            with open(config_path) as file:
                stored = json.load(file)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {config_path} ({one_line(error)})") from None
    else:
        raise UsageError(f"nothing to resume in {save}: it holds no checkpoint.pt")
    if checkpoint is not None and checkpoint["epoch"] > config["n_epochs"]:
        raise UsageError(f"the run in {save} already trained {checkpoint['epoch']} epochs, "
                         f"more than --n_epochs {config['n_epochs']}")
    if config["seed"] is None:
        config = {**config, "seed": stored.get("seed")}
    different = [f"{key} {stored.get(key)!r} there, {config[key]!r} now" for key in config
                 if key not in FREE_ON_RESUME and stored.get(key) != config[key]]
    if different:
        raise UsageError(f"cannot resume the run in {save} with other settings: "
                         f"{'; '.join(different)}")
    return checkpoint, config


def kept_rows(path, epochs_done):
    """results.csv's rows for the epochs the checkpoint holds.

    The row of an epoch is appended before its checkpoint is written, so a kill between the
    two leaves one row too many: that epoch is trained again and its row rewritten."""
    if epochs_done == 0:
        return []
    try:
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    kept = rows[1:epochs_done + 1]
    if rows[:1] != [CSV_COLUMNS] or len(kept) != epochs_done or any(
            len(row) != len(CSV_COLUMNS) or row[0] != str(i + 1) for i, row in enumerate(kept)):
        raise UsageError(f"{path} does not match checkpoint.pt (epoch {epochs_done}); both "
                         f"were left as they are")
    return kept


def environment(devices):
    return {"python": platform.python_version(), "torch": torch.__version__,
            "device": devices.describe(), "world_size": devices.world_size,
            "data_parallel": devices.data_parallel,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


# ---------------------------------------------------------------------------- model and data

def build_model(config, num_classes):
    """The DenseNet the configuration describes (depth -> layers per block as in the paper)."""
    kwargs = depth_to_config(config["depth"], config["growth_rate"], config["bc"])
    kwargs["compression"] = config["compression"]
    return DenseNet(**kwargs, drop_rate=config["drop_rate"], num_classes=num_classes,
                    small_inputs=True, efficient=config["efficient"],
                    recompute_bottleneck=config["recompute_bottleneck"])


def read_dataset(config, download):
    return load_dataset(config["dataset"], config["data"], svhn_extra=config["svhn_extra"],
                        download=download, fake_size=tuple(config["fake_size"]))


def load_data(config, devices):
    """The dataset on every process; rank 0 reads it first because it may download it."""
    first = on_all_ranks(lambda: read_dataset(config, config["download"])
                         if devices.rank == 0 else None)
    return on_all_ranks(lambda: first or read_dataset(config, False))


def make_loaders(config, dataset, devices, generator):
    """Train (this process's shard), validation (None when valid_size is 0) and test loaders."""
    total = len(dataset.train_images)
    remaining = total - config["valid_size"]
    if remaining < 2 * devices.world_size:
        raise UsageError(f"--valid_size {config['valid_size']} leaves too few training images: "
                         f"{dataset.name} has {total}")
    train_images, train_labels, valid_images, valid_labels = split_validation(
        dataset.train_images, dataset.train_labels, config["valid_size"], config["seed"])
    batch = config["batch_size"] // devices.world_size
    common = dict(mean=dataset.mean, std=dataset.std, device=devices.device)
    train_loader = TensorLoader(
        train_images, train_labels, batch, shuffle=True, augment=config["augment"],
        flip=dataset.flip, generator=generator, rank=devices.rank,
        world_size=devices.world_size,
        # BatchNorm cannot train on a last batch of a single image.
        drop_last=(remaining // devices.world_size) % batch == 1, **common)
    valid_loader = None
    if config["valid_size"]:
        valid_loader = TensorLoader(valid_images, valid_labels, config["batch_size"], **common)
    test_loader = TensorLoader(dataset.test_images, dataset.test_labels, config["batch_size"],
                               **common)
    return train_loader, valid_loader, test_loader


# ---------------------------------------------------------------------------- training

def train_epoch(model, loader, optimizer, scaler, config, devices, title):
    """One pass over this process's shard; returns loss, error, images and seconds (all ranks)."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=devices.device)
    wrong = torch.zeros((), dtype=torch.int64, device=devices.device)
    count = 0
    show_bar = devices.rank == 0 and sys.stderr.isatty()
    batches = tqdm(loader, desc=title, leave=False, disable=not show_bar, dynamic_ncols=True)
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(batches):
        if config["channels_last"]:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(config, devices.device):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(targets)
        wrong += (logits.argmax(1) != targets).sum()
        count += len(targets)
        if show_bar and step % 10 == 0:
            rate = count * devices.world_size / (time.perf_counter() - start)
            batches.set_postfix(loss=f"{loss_sum.item() / count:.3f}",
                                error=f"{wrong.item() / count:.3f}", images_s=f"{rate:.0f}")
    totals = torch.stack([loss_sum, wrong.double(), torch.tensor(count, dtype=torch.float64,
                                                                 device=devices.device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    if devices.device.type == "cuda":
        torch.cuda.synchronize(devices.device)
    seconds = time.perf_counter() - start
    loss_total, wrong_total, images = totals.tolist()
    return loss_total / images, wrong_total / images, int(images), seconds


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
        with autocast(config, device):
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        wrong += (logits.argmax(1) != targets).sum()
        count += len(targets)
    return loss_sum.item() / count, wrong.item() / count


def rng_states(generator):
    states = {"torch": torch.get_rng_state(), "data": generator.get_state(), "cuda": []}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


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


def wrap(model, config, devices):
    """DistributedDataParallel under torchrun, DataParallel over several GPUs, else as is."""
    if devices.distributed:
        ids = [devices.device.index] if devices.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if devices.data_parallel:
        return nn.DataParallel(model)
    return model


def peak_memory_mb(devices):
    if devices.device.type != "cuda":
        return ""
    indices = range(torch.cuda.device_count()) if devices.data_parallel else [devices.device]
    return f"{max(torch.cuda.max_memory_allocated(i) for i in indices) / 2**20:.1f}"


def fmt(value, digits=6):
    return "" if value is None else f"{value:.{digits}g}"


def train(config):
    devices = Devices()
    save = config["save"]
    checkpoint, config = on_all_ranks(lambda: open_run(config))
    if config["seed"] is None:
        config["seed"] = broadcast(secrets.randbelow(2**31))
    torch.manual_seed(config["seed"])
    generator = torch.Generator().manual_seed(config["seed"] + 1)  # shuffling and augmentation
    dataset = load_data(config, devices)
    train_loader, valid_loader, test_loader = on_all_ranks(
        lambda: make_loaders(config, dataset, devices, generator))

    raw_model = build_model(config, dataset.num_classes)
    if config["sync_bn"]:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    memory_format = torch.channels_last if config["channels_last"] else torch.preserve_format
    raw_model.to(devices.device, memory_format=memory_format)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=config["lr"],
                                momentum=config["momentum"], nesterov=config["momentum"] > 0,
                                weight_decay=config["wd"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, config["milestones"],
                                                     config["gamma"])
    scaler = torch.amp.GradScaler(devices.device.type, enabled=config["amp"] == "fp16")
    start_epoch, best_error, best_epoch = 0, math.inf, 0
    if checkpoint is not None:
        on_all_ranks(lambda: restore(checkpoint, raw_model, optimizer, scheduler, scaler,
                                     generator))
        start_epoch = checkpoint["epoch"]
        best_error, best_epoch = checkpoint["best_valid_error"], checkpoint["best_epoch"]
    csv_path = os.path.join(save, "results.csv")
    rows = on_all_ranks(lambda: kept_rows(csv_path, start_epoch))

    def start_files():
        try:
            os.makedirs(save, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create --save {save}: {error.strerror or error}") from None
        write_json(os.path.join(save, "config.json"), {**config, "environment":
                                                        environment(devices)})
        write_atomically(csv_path, lambda f: f.write(
            "".join(csv_line(row) for row in [CSV_COLUMNS, *rows]).encode()))
        if best_epoch and best_epoch == start_epoch:  # a kill may have beaten model_best.pt
            save_best(save, raw_model, best_epoch, best_error, config)

    on_all_ranks(lambda: start_files() if devices.rank == 0 else None)

    model = wrap(raw_model, config, devices)
    eval_model = raw_model if devices.distributed else model
    if devices.rank == 0 and start_epoch:
        print(f"resuming {save} after epoch {start_epoch}", flush=True)
    for epoch in range(start_epoch + 1, config["n_epochs"] + 1):
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        if devices.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(devices.device)
        title = f"epoch {epoch}/{config['n_epochs']}"
        train_loss, train_error, images, seconds = train_epoch(
            model, train_loader, optimizer, scaler, config, devices, title)
        if not math.isfinite(train_loss):
            kept = (f"{save}/checkpoint.pt keeps epoch {epoch - 1}" if epoch > 1
                    else "no checkpoint was written")
            raise UsageError(f"the training loss became {train_loss} in epoch {epoch}; training "
                             f"stopped ({kept}); try a smaller --lr")
        scheduler.step()
        if devices.rank != 0:
            continue
        valid_loss = valid_error = None
        if valid_loader is not None:
            valid_loss, valid_error = evaluate(eval_model, valid_loader, config, devices.device)
        test_loss, test_error = evaluate(eval_model, test_loader, config, devices.device)
        improved = valid_error is not None and valid_error < best_error
        if improved:
            best_error, best_epoch = valid_error, epoch
        epoch_seconds = time.perf_counter() - started
        append_row(csv_path, [
            epoch, fmt(train_loss), fmt(train_error), fmt(valid_loss), fmt(valid_error),
            fmt(test_error), fmt(test_loss), fmt(lr), f"{epoch_seconds:.3f}",
            f"{images / seconds:.1f}", peak_memory_mb(devices)])
        save_torch(os.path.join(save, "checkpoint.pt"), {
            "epoch": epoch, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "best_valid_error": best_error, "best_epoch": best_epoch,
            "rng": rng_states(generator), "config": config})
        if improved:
            save_best(save, raw_model, epoch, valid_error, config)
        valid = "" if valid_error is None else \
            f"  valid loss {valid_loss:.4f} error {valid_error:.4f} |"
        print(f"{title}  lr {lr:.3g} | train loss {train_loss:.4f} error {train_error:.4f} |"
              f"{valid}  test loss {test_loss:.4f} error {test_error:.4f} | "
              f"{epoch_seconds:.1f} s, {images / seconds:.0f} images/s", flush=True)
    if devices.rank == 0:
        summarize(config, eval_model, raw_model, test_loader, devices, best_epoch, best_error)
    if dist.is_initialized():
        dist.barrier()


def save_best(save, model, epoch, valid_error, config):
    save_torch(os.path.join(save, "model_best.pt"), {
        "model": model.state_dict(), "epoch": epoch, "valid_error": valid_error,
        "config": config})


def summarize(config, eval_model, raw_model, test_loader, devices, best_epoch, best_error):
    """Test error of the best-validation model (the last one without validation): print, save."""
    save = config["save"]
    if best_epoch:
        best = read_torch(os.path.join(save, "model_best.pt"), {"model", "epoch"})
        raw_model.load_state_dict(best["model"])
        which = f"best-validation model (epoch {best_epoch}, validation error {best_error:.4f})"
    else:
        which = f"last model (epoch {config['n_epochs']})"
    test_loss, test_error = evaluate(eval_model, test_loader, config, devices.device)
    write_json(os.path.join(save, "summary.json"), {
        "model": "best" if best_epoch else "last", "epoch": best_epoch or config["n_epochs"],
        "valid_error": best_error if best_epoch else None, "test_error": test_error,
        "test_loss": test_loss, "dataset": config["dataset"]})
    print(f"final test error {test_error:.4f} (loss {test_loss:.4f}) of the {which}",
          flush=True)


def evaluate_saved(config):
    """--evaluate: the saved model's test error, with the configuration it was trained with."""
    save = config["save"]
    path = os.path.join(save, "model_best.pt")
    if not os.path.exists(path):
        path = os.path.join(save, "checkpoint.pt")
    if not os.path.exists(path):
        raise UsageError(f"nothing to evaluate in {save}: no model_best.pt or checkpoint.pt")
    saved = read_torch(path, {"model", "epoch", "config"})
    run = {**saved["config"], "data": config["data"] or saved["config"]["data"]}
    devices = Devices()
    dataset = read_dataset(run, config["download"])
    model = build_model(run, dataset.num_classes)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as error:
        raise UsageError(f"{path} does not fit the model its configuration describes "
                         f"({one_line(error)[:300]})") from None
    memory_format = torch.channels_last if run["channels_last"] else torch.preserve_format
    model.to(devices.device, memory_format=memory_format)
    loader = TensorLoader(dataset.test_images, dataset.test_labels, run["batch_size"],
                          dataset.mean, dataset.std, devices.device)
    test_loss, test_error = evaluate(model, loader, run, devices.device)
    print(f"test error {test_error:.4f} (loss {test_loss:.4f}) of {path} (epoch "
          f"{saved['epoch']}) on the {len(dataset.test_labels)} {run['dataset']} test images",
          flush=True)


def check_flags(argv):
    """Refuse unknown --flags: fire would run main() first and complain only afterwards."""
    names = set(inspect.signature(main).parameters) | {"help"}
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name not in names and not (name.startswith("no") and name[2:] in names):
                print(f"error: unknown flag --{name}; see python demo.py --help", file=sys.stderr)
                sys.exit(2)


if __name__ == "__main__":
    check_flags(sys.argv[1:])
    fire.Fire(main)
