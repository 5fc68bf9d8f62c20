"""Train a DenseNet on CIFAR-10, CIFAR-100, SVHN or an image folder, resume it, evaluate it.

    python demo.py --data DIR --save DIR [--depth 100 --growth_rate 12 --efficient True ...]
    CUDA_VISIBLE_DEVICES=0,1 python demo.py ...       # DataParallel over the visible GPUs
    torchrun --nproc_per_node=4 demo.py ...           # DistributedDataParallel, one process per GPU
    python demo.py --save DIR --resume True ...       # continue an interrupted run
    python demo.py --save DIR --evaluate True         # test error of a saved model
    python demo.py --save DIR --predict a.jpg,photos/ # classify images: DIR/predictions.csv
    python demo.py --dataset folder --data DIR --save DIR --image_size 224  # your own images
    python demo.py --plan True --depth 250 --growth_rate 24 --memory_budget 8GiB  # what fits

Bad input ends with one line "error: ..." on stderr and exit status 2.
"""

import inspect
import math
import os
import sys

import fire
import torch
import torch.distributed as dist

from data import DATASETS, DataError
from models import depth_to_config
from training.devices import default_workers, is_distributed, world_size_from_env
from training.errors import UsageError, one_line
from training.evaluation import evaluate_saved
from training.loop import train
from training.plan import run_plan
from training.predict import predict_saved
from training.stop import Stopped

BOOLEAN_ARGS = ("bc", "efficient", "recompute_bottleneck", "augment", "channels_last", "sync_bn",
                "svhn_extra", "download", "resume", "evaluate", "deterministic", "compile",
                "cuda_graph", "skip_bad_images")
FIXED_SIZE = ("cifar10", "cifar100", "svhn")  # their images are 32x32
AMP_MODES = ("off", "bf16", "fp16")


def main(data=None, save=None, dataset="cifar10", image_size=None, depth=100, growth_rate=12,
         bc=True,
         compression=None, drop_rate=0.0, efficient=True, recompute_bottleneck=False,
         valid_size=5000, n_epochs=300, batch_size=64, lr=0.1, momentum=0.9, wd=1e-4,
         milestones=None, gamma=0.1, seed=None, augment=True, amp="off", channels_last=False,
         sync_bn=False, svhn_extra=False, fake_size=(50000, 10000), download=True,
         workers=None, skip_bad_images=False, resume=False, evaluate=False, predict=None,
         deterministic=False, compile=False, cuda_graph=False, log_every=30, plan=False,
         memory_budget=None, json=False):
    """Train a DenseNet (defaults: the paper's DenseNet-BC, L=100, k=12 on CIFAR-10).

    Own images: --dataset folder --data DIR, with DIR/train/<class>/<images> (JPEG, PNG, WebP,
    BMP, GIF, TIFF, ...; any size, converted to RGB), optionally DIR/val/ and DIR/test/ alike.
    Files that are not images are ignored and counted in the start-up block. An image file
    that cannot be read stops the run with one line naming it (the last checkpoint kept: fix
    or remove the file, then --resume True), unless --skip_bad_images True, which leaves such
    images out and reports each.

    Uses CUDA when available (every visible GPU through DataParallel), else the CPU; under
    torchrun, DistributedDataParallel with one process per GPU. Writes to --save: config.json,
    results.csv (one row per epoch), checkpoint.pt (every epoch), model_best.pt (lowest
    validation error), summary.json (final test error) and log.txt (what was printed). One
    process at a time may write a run folder.

    SIGTERM, SIGINT or SIGUSR1 (a job scheduler's warning) stops the run after the current
    step: it writes checkpoint.pt with the position in the epoch and exits with 128 + the
    signal's number (143 for SIGTERM); --resume True continues at the next step.

    Args:
        data: folder holding the dataset files (downloaded there if missing); not needed for fake.
            For folder: DIR with train/<class>/ (required), val/<class>/ and test/<class>/.
        save: folder for the run's logs and checkpoints (created if missing).
        dataset: cifar10, cifar100, svhn, folder (images in class folders: see above), or fake
            (random images, no files).
        image_size: side of the square network input: default 224 for folder (whatever the
            images' sizes), 32 otherwise; CIFAR and SVHN have only 32.
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
        augment: zero-pad 4, random 32x32 crop, horizontal flip (not for SVHN). For folder:
            torchvision's reference recipe, a random-resized crop (8-100% of the area, aspect
            3/4-4/3) and a flip; evaluation (and training with False) resizes the shorter side
            to image_size (with pretrained weights image_size * 8/7, as torchvision's), then
            takes the centre. Mean and std: ImageNet's with pretrained weights, else measured
            on 1,000 training images (recorded in config.json).
        amp: mixed precision: off, bf16, or fp16 (with a gradient scaler).
        channels_last: channels-last memory format (faster convolutions with amp on GPUs).
        sync_bn: under torchrun on GPUs, synchronise BatchNorm statistics across processes.
        svhn_extra: add SVHN's 531,131 extra images to its training set.
        fake_size: train,test numbers of images of the fake dataset.
        download: download missing dataset files.
        workers: processes decoding folder images (and --predict's); default: the CPU cores,
            at most 8, shared among torchrun's processes; 0 decodes in the training process.
        skip_bad_images: leave images that cannot be read or decoded out of their batch,
            reporting each once, instead of stopping the run at the first.
        resume: continue the run in --save from its checkpoint.pt (same arguments needed).
        evaluate: no training: evaluate --save's model_best.pt (else checkpoint.pt) on the test
            set, with the configuration it was trained with.
        predict: no training: image files and folders (comma-separated) to classify with
            --save's model_best.pt (else checkpoint.pt) and its evaluation transform; writes
            --save/predictions.csv (file, class, probability, the top 5). Paths and files that
            cannot be read get a line each on stderr (then exit status 2).
        deterministic: deterministic GPU kernels, so that a resumed run ends bitwise equal to
            an uninterrupted one on a GPU too (somewhat slower; CPU runs always are).
        compile: torch.compile the model (forward and backward; SGD is already fused).
        cuda_graph: capture the whole training step in a CUDA graph and replay it for every
            batch (one GPU; --amp off or bf16): removes the cost of launching kernels.
        log_every: seconds between progress lines when the output is not a terminal (a job's
            log file); 0 for a line after every step.
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
        if config["predict"] is not None:
            sys.exit(predict_saved(config))
        if config["evaluate"]:
            evaluate_saved(config)
        else:
            train(config)
    except (UsageError, DataError) as error:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stopped:
        sys.exit(stopped.exit_status)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- arguments

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


def _paths(value):
    """--predict's paths as a list of str (fire passes "a,b" as a tuple, "7" as an int)."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, str) and not os.path.exists(value):  # fire keeps "a.jpg,b/" a str
        values = value.split(",")
    if not values or any(isinstance(v, bool) or not isinstance(v, (str, int, float)) or v == ""
                         for v in values):
        raise UsageError(f"--predict takes image files and folders, such as a.jpg,photos/; "
                         f"got {value!r}")
    return [str(v) for v in values]


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
    if config["data"] is None and config["dataset"] != "fake" and not config["evaluate"] \
            and config["predict"] is None:
        raise UsageError(f"--data is required for {config['dataset']}: the folder holding "
                         f"(or receiving) its files")
    if config["image_size"] is None:
        config["image_size"] = 224 if config["dataset"] == "folder" else 32
    _integer("image_size", config["image_size"], 8)
    if config["dataset"] in FIXED_SIZE and config["image_size"] != 32:
        raise UsageError(f"--image_size {config['image_size']}: {config['dataset']} has 32x32 "
                         f"images only (leave --image_size out)")
    if config["workers"] is None:
        config["workers"] = default_workers()
    _integer("workers", config["workers"], 0)
    config["predict"] = _paths(config["predict"])
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
    config["log_every"] = _number("log_every", config["log_every"], lambda v: v >= 0,
                                  "a number of seconds >= 0")
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
    if config["predict"] is not None and (config["resume"] or config["evaluate"]):
        raise UsageError("--predict goes without --resume True and --evaluate True")
    world_size = world_size_from_env()
    if (config["evaluate"] or config["predict"] is not None) and is_distributed():
        raise UsageError("run --evaluate and --predict without torchrun")
    if config["sync_bn"] and not is_distributed():
        raise UsageError("--sync_bn True needs several processes started by torchrun")
    if config["sync_bn"] and not torch.cuda.is_available():  # DDP refuses SyncBatchNorm on CPU
        raise UsageError("--sync_bn True needs CUDA")
    several_gpus = not is_distributed() and torch.cuda.device_count() > 1
    if config["cuda_graph"]:
        if not torch.cuda.is_available():
            raise UsageError("--cuda_graph True needs a CUDA GPU")
        if is_distributed() or several_gpus:
            raise UsageError("--cuda_graph True runs on one GPU: without torchrun, and with "
                             "CUDA_VISIBLE_DEVICES naming one GPU")
        if config["amp"] == "fp16":
            raise UsageError("--cuda_graph True takes --amp off or bf16 (fp16's gradient scaler "
                             "synchronises with the host in every step)")
    if config["compile"] and several_gpus:
        raise UsageError("--compile True does not work through DataParallel: use torchrun, or "
                         "CUDA_VISIBLE_DEVICES naming one GPU")
    if config["batch_size"] % world_size:
        raise UsageError(f"--batch_size {config['batch_size']} must be divisible by the "
                         f"{world_size} processes")
    return config


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
