"""Train a DenseNet on CIFAR-10, CIFAR-100, SVHN or an image folder, resume it, evaluate it.

    python demo.py --data DIR --save DIR [--depth 100 --growth_rate 12 --efficient True ...]
    CUDA_VISIBLE_DEVICES=0,1 python demo.py ...       # DataParallel over the visible GPUs
    torchrun --nproc_per_node=4 demo.py ...           # DistributedDataParallel, one process per GPU
    python demo.py --save DIR --resume True           # continue a run, with its own settings
    python demo.py --save DIR --resume auto ...       # continue it if there is one, else start
    python demo.py --save DIR --evaluate True         # test error of a saved model
    python demo.py --save DIR --predict a.jpg,photos/ # classify images: DIR/predictions.csv
    python demo.py --dataset folder --data DIR --save DIR --image_size 224  # your own images
    python demo.py --plan True --depth 250 --growth_rate 24 --memory_budget 8GiB  # what fits
    python demo.py --arch densenet121 --pretrained True --image_size 64 ...  # torchvision's

Bad input ends with one line "error: ..." on stderr and exit status 2.
"""

import math
import os
import sys

from cli import check_flags, parse_boolean, quiet_interrupt
from training.errors import UsageError, one_line

# Written True or False, or true/false, yes/no, 1/0 in any case (cli.py).
BOOLEAN_ARGS = ("bc", "efficient", "recompute_bottleneck", "augment", "channels_last", "sync_bn",
                "svhn_extra", "download", "evaluate", "deterministic", "compile", "cuda_graph",
                "skip_bad_images")
AMP_MODES = ("off", "bf16", "fp16")
GIVEN = None  # the flags on the command line (set below); None: every argument counts as given


def main(data=None, save=None, dataset="cifar10", image_size=None, arch=None, depth=None,
         growth_rate=None, bc=None, compression=None, drop_rate=0.0, efficient=True,
         recompute_bottleneck=False, pretrained=None,
         valid_size=5000, n_epochs=300, batch_size=64, lr=0.1, momentum=0.9, wd=1e-4,
         milestones=None, gamma=0.1, seed=None, augment=True, amp="off", channels_last=False,
         sync_bn=False, svhn_extra=False, fake_size=(50000, 10000), download=True,
         resume=False, evaluate=False, deterministic=False, compile=False, cuda_graph=False,
         workers=None, skip_bad_images=False, predict=None, log_every=30,
         checkpoint_every=10, plan=False, memory_budget=None, json=False):
    """Train a DenseNet (defaults: the paper's DenseNet-BC, L=100, k=12 on CIFAR-10).

    Own images: --dataset folder --data DIR, with DIR/train/<class>/<images> (JPEG, PNG, WebP,
    BMP, GIF, TIFF, ...; any size, converted to RGB), optionally DIR/val/ and DIR/test/ alike.
    Files that are not images are ignored and counted in the start-up block. An image file
    that cannot be read stops the run with one line naming it (the last checkpoint kept: replace
    the file, then --resume True), unless --skip_bad_images True, which leaves such images out
    and reports each. A resumed run refuses training data whose classes or count changed.

    Uses CUDA when available (every visible GPU through DataParallel), else the CPU; under
    torchrun, DistributedDataParallel with one process per GPU. Writes to --save: config.json,
    results.csv (one row per epoch), checkpoint.pt (every epoch), model_best.pt (lowest
    validation error), summary.json (final test error) and log.txt (what was printed). One
    process at a time may write a run folder.

    SIGTERM, SIGINT or SIGUSR1 (a job scheduler's warning) stops the run after the current
    step: it writes checkpoint.pt with the position in the epoch and exits with 128 + the
    signal's number (143 for SIGTERM); --resume True continues at the next step. Every
    --checkpoint_every minutes of training checkpoint.pt is written the same way (in the
    background), so that a kill without a signal (SIGKILL, the OOM killer, a node failure) loses
    at most that much work. For job scripts that start the same command line again (torchrun
    --max-restarts, SLURM's requeue), --resume auto starts the run or continues it.

    Args:
        data: folder holding the dataset files (downloaded there if missing); not needed for fake.
            For folder: DIR with train/<class>/ (required), val/<class>/ and test/<class>/.
            A leading ~ is your home folder, also in --data=~/x.
        save: folder for the run's logs and checkpoints (created if missing).
        dataset: cifar10, cifar100, svhn, folder (images in class folders: see above), or fake
            (random images, no files).
        image_size: side of the square network input: 32 for cifar10, cifar100 and svhn (the
            only size they have); for folder any size (default 224), whatever the images'
            sizes; fake makes random images of any size (default 32). Below 64 the network
            starts with the 3x3 CIFAR stem, from 64 on with the ImageNet stem (7x7 stride-2
            convolution and max-pool: a quarter of the resolution), whatever --arch.
        arch: densenet121, densenet161, densenet169 or densenet201: torchvision's ImageNet
            DenseNets (their growth rate, blocks, initial features, bottleneck 4k, compression
            0.5), instead of the --depth/--growth_rate/--bc/--compression family (the default;
            those flags are refused beside a named --arch).
        depth: network depth L (default 100); DenseNet-BC needs L - 4 divisible by 6, plain
            DenseNet by 3.
        growth_rate: k, the channels each layer adds (default 12).
        bc: DenseNet-BC (bottleneck layers and compression) rather than plain DenseNet (default
            True).
        compression: channel reduction at transitions, in (0, 1]; default 0.5 for BC, else 1.
        drop_rate: dropout after each layer, in [0, 1) (the paper: 0.2 without augmentation).
        efficient: memory-efficient dense blocks (same model and results, far less memory).
        recompute_bottleneck: with efficient, also recompute the bottleneck convolutions in
            backward (least memory, more time).
        pretrained: start from pretrained weights: True for torchvision's ImageNet weights of
            --arch (read from torch hub's cache, $TORCH_HOME/hub/checkpoints, downloaded there
            when missing; needs --image_size 64 or more), or the path of a state_dict or
            checkpoint (torchvision's, this tool's checkpoint.pt or model_best.pt). Loaded
            strictly but for the classifier, which is replaced when the number of classes
            differs; the start-up block says what was loaded. Not reloaded on --resume.
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
        resume: True: continue the run in --save from its checkpoint.pt, with the settings it
            stored: a flag given must equal its stored value, except --n_epochs (to extend the
            run; the milestones stay as stored unless given) and those that change how, not
            what, it computes (--data, --log_every, --compile, ...); a finished run is left
            untouched. False: start a new run (refused if --save holds one). auto: continue the
            run in --save if it holds one (config.json, results.csv or checkpoint.pt), else
            start it: one command line for every start of a job that restarts.
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
        checkpoint_every: minutes of training between recovery checkpoints written inside an
            epoch (only epochs longer than that get one; 0: only at epochs' ends and on stop
            signals).
        plan: no training: print, for this model, batch, --amp and --channels_last, what each
            memory mode needs (saved for backward, parameters + gradients + momentum, peak of a
            training step) and what fits the GPU's free memory (on a CPU: the available memory)
            or --memory_budget: largest batch, deepest network of this growth rate (for a
            named --arch: the deepest of torchvision's DenseNets of its growth rate), for
            --image_size (default 32, or 224 for folder data). Predicted by models/memory.py
            in milliseconds; needs no --data or --save.
        memory_budget: with --plan, the memory to plan for, such as 8GiB, 1.5GB or 512MiB.
        json: with --plan, print one JSON object instead of the table.
    """
    args = dict(locals())
    planning = {name: args.pop(name) for name in ("plan", "memory_budget", "json")}
    # Imported only now, once the command line is checked: torch takes a second or more to load.
    import torch.distributed as dist

    from data import DataError
    from training.devices import LostPeer
    from training.evaluation import evaluate_saved
    from training.loop import train
    from training.plan import check_fits, run_plan
    from training.predict import predict_saved
    from training.stop import Stopped

    try:
        if planning["plan"] is not False:
            sys.exit(run_plan({**args, **planning}))
        if planning["memory_budget"] is not None or planning["json"] is not False:
            raise UsageError("--memory_budget and --json go with --plan True")
        config = resolve_args(args, GIVEN)
        if config["predict"] is not None:
            sys.exit(predict_saved(config))
        if config["evaluate"]:
            evaluate_saved(config)
        else:
            check_fits(config)
            train(config)
    except UsageError as error:  # the same on every process (training.devices.on_all_ranks)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except DataError as error:  # this process's own, such as an image of its shard
        rank = f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_rank() else ""
        print(f"error: {rank}{one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as stopped:
        sys.exit(stopped.exit_status)
    except LostPeer as error:  # every process says it, not only rank 0
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(LostPeer.EXIT_STATUS)
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
    path = os.path.expanduser(str(value))  # also after "=", where the shell leaves ~ alone
    if path.startswith("~"):
        raise UsageError(f"--{name} {value}: {path.split(os.sep)[0]} is no user's home folder; "
                         f"write the path in full")
    return os.path.abspath(path)


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


def resolve_args(args, given=None):
    """Check every argument before any work; return the run's configuration (JSON types).

    Resuming, every setting not among `given` (the names of the flags on the command line;
    None: all of them) is the one the run in --save stored."""
    import torch

    from data import DATASETS
    from training.architecture import resolve_architecture
    from training.devices import default_workers, is_distributed, world_size_from_env
    from training.pretrained import resolve_pretrained
    from training.run_folder import resume_settings

    config = dict(args)
    for name in BOOLEAN_ARGS:
        if name == "bc" and config[name] is None:  # left to the architecture (--arch)
            continue
        config[name] = parse_boolean(config[name])
        if config[name] is None:
            raise UsageError(f"--{name} must be True or False (or true/false, yes/no, 1/0), "
                             f"got {args[name]!r}")
    resume = config["resume"]
    config["resume"] = "auto" if resume == "auto" else parse_boolean(resume)
    if config["resume"] is None:
        raise UsageError(f"--resume must be True, False or auto, got {resume!r}")
    config["save"] = _folder("save", config["save"])
    if config["resume"] and config["save"] is not None:
        config = resume_settings(config, given)
    if config["dataset"] not in DATASETS:
        raise UsageError(f"unknown --dataset {config['dataset']!r}; choose one of "
                         f"{', '.join(DATASETS)}")
    config["data"] = _folder("data", config["data"])
    if config["save"] is None:
        raise UsageError("--save is required: the folder for the run's logs and checkpoints")
    if config["data"] is None and config["dataset"] != "fake" and not config["evaluate"] \
            and config["predict"] is None:
        raise UsageError(f"--data is required for {config['dataset']}: the folder holding "
                         f"(or receiving) its files")
    if config["image_size"] is None:
        config["image_size"] = 224 if config["dataset"] == "folder" else 32
    _integer("image_size", config["image_size"], 1)
    if config["dataset"] in ("cifar10", "cifar100", "svhn") and config["image_size"] != 32:
        raise UsageError(f"--image_size {config['image_size']} does not apply to "
                         f"{config['dataset']}: its images are 32x32")
    if config["workers"] is None:
        config["workers"] = default_workers()
    _integer("workers", config["workers"], 0)
    config["predict"] = _paths(config["predict"])
    config = resolve_architecture(config)
    config["pretrained"] = resolve_pretrained(config["pretrained"], config["arch"],
                                              config["image_size"])
    config["drop_rate"] = _number("drop_rate", config["drop_rate"], lambda v: 0 <= v < 1,
                                  "in [0, 1)")
    _integer("valid_size", config["valid_size"], 0)
    config["log_every"] = _number("log_every", config["log_every"], lambda v: v >= 0,
                                  "a number of seconds >= 0")
    config["checkpoint_every"] = _number("checkpoint_every", config["checkpoint_every"],
                                         lambda v: v >= 0, "a number of minutes >= 0")
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
        raise UsageError(f"choose one of --resume {config['resume']} and --evaluate True")
    if config["predict"] is not None and (config["resume"] or config["evaluate"]):
        raise UsageError(f"--predict goes without --resume {config['resume']} and --evaluate")
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


if __name__ == "__main__":
    with quiet_interrupt():
        import fire

        # --resume also takes auto; a word other than a boolean is left for resolve_args.
        argv, GIVEN = check_flags(main, sys.argv[1:], BOOLEAN_ARGS + ("resume",))
        fire.Fire(main, argv)
