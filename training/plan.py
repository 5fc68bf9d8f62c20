"""The memory planner behind ``python demo.py --plan True``: before any training, what each memory
mode needs for this model and batch, and what fits the device or a memory budget.

Everything is predicted by models/memory.py from the architecture (nothing is built or run), so a
plan takes milliseconds even for DenseNet-BC-1000 or DenseNet-264 at 224x224.
"""

import json
import math
import numbers
import os
import re

from models import ARCHITECTURES, depth_to_config, imagenet_config, imagenet_depth, memory

from .architecture import architecture as architecture_kwargs
from .architecture import describe, resolve_architecture
from .errors import UsageError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "fake": 10, "folder": None}
FOLDER_CLASSES = 1000  # folder data whose classes cannot be counted: plan for ImageNet's
LABELS = {
    "naive": "naive",
    "efficient": "efficient",
    "recompute_bottleneck": "efficient + recompute_bottleneck",
    "torchvision_memory_efficient": "torchvision memory_efficient",
}
# Decimal and binary units; a bare K, M, G or T is binary (as in 8G).
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_LAYERS = 2**20  # per block, in the search for the deepest network (never reached)
MAX_BATCH = 2**40
# Deeper networks need terabytes even at growth rate 1 and batch 1, and planning them takes
# seconds (the planner's work grows with the depth).
MAX_DEPTH = 10**6


def parse_budget(value, flag="memory_budget"):
    """Bytes from a budget such as 8GiB, 1.5GB, 512MiB, 8G (binary) or a number of bytes;
    UsageError naming --flag otherwise."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-zA-Z]*)", text)
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)) or not match \
            or match.group(3).lower() not in UNITS:
        raise UsageError(f"--{flag} must be a size such as 8GiB, 1.5GB or 512MiB, "
                         f"got {value!r}")
    number = float(match.group(1)) * 10 ** int(match.group(2) or 0)
    size = int(number * UNITS[match.group(3).lower()])
    if size < 1 or not math.isfinite(number):
        raise UsageError(f"--{flag} must be a positive size, got {value!r}")
    return size


def format_bytes(size):
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.{1 if size < 100 * scale else 0}f} {unit}"
    return f"{size} B"


def _read_int(path):
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def machine_memory():
    """(total, available) bytes of this machine, within its cgroup's limit if it has one."""
    info = {}
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                name, _, rest = line.partition(":")
                info[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            return None, None
    for limit_path, usage_path in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and total is not None and limit < total:
            total = limit
            if usage is not None:
                available = min(available or limit, max(limit - usage, 0))
            break
    return total, available


def training_device():
    """(device type, description, total bytes, free bytes) where demo.py would train: the
    first CUDA device if there is one (free memory as the driver reports it), else the CPU
    (available memory)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return "cuda", f"cuda ({torch.cuda.get_device_name(0)})", total, free
    from measure import cpu_name

    total, available = machine_memory()
    return "cpu", f"cpu ({cpu_name()}, {os.cpu_count()} cores)", total, available


def largest_batch(net, mode, budget, **options):
    """The largest batch whose predicted peak fits ``budget`` (0 if not even one image)."""
    fits = lambda n: memory.peak_bytes(net, n, mode, **options) <= budget  # noqa: E731
    return _largest(fits, MAX_BATCH)


def deepest(architecture, bc, batch_size, mode, budget, **options):
    """The deepest network of the paper's depth convention (three equal blocks, as
    depth_to_config) with ``architecture``'s growth rate, compression, dropout and classes
    whose predicted peak at ``batch_size`` fits ``budget``; None if not even the shallowest."""
    per_layer = 6 if bc else 3
    layers = _largest(lambda n: memory.peak_bytes(
        _deepened(architecture, bc, per_layer * n + 4), batch_size, mode, **options) <= budget,
        MAX_LAYERS)
    return per_layer * layers + 4 if layers else None


def deepest_named(architecture, arch, batch_size, mode, budget, **options):
    """The depth (121, 169, ...) of the deepest of torchvision's DenseNets with ``arch``'s growth
    rate (the family 121, 169, 201; 161 alone) that fits ``budget`` at ``batch_size``, on
    ``architecture``'s images and classes; None if none does."""
    growth_rate = ARCHITECTURES[arch]["growth_rate"]
    fitting = [imagenet_depth(name) for name, kwargs in ARCHITECTURES.items()
               if kwargs["growth_rate"] == growth_rate and memory.peak_bytes(
                   memory.network(**dict(architecture, **imagenet_config(name))), batch_size,
                   mode, **options) <= budget]
    return max(fitting, default=None)


def family(arch):
    """torchvision's DenseNets that deepest_named chooses from for ``arch``, as words."""
    growth_rate = ARCHITECTURES[arch]["growth_rate"]
    return ", ".join(f"DenseNet-{imagenet_depth(name)}" for name, kwargs in
                     sorted(ARCHITECTURES.items(), key=lambda item: imagenet_depth(item[0]))
                     if kwargs["growth_rate"] == growth_rate)


def largest_growth_rate(architecture, bc, batch_size, mode, budget, **options):
    """The largest growth rate k whose network at ``architecture``'s depth (depth_to_config's
    convention, with its compression, dropout and classes) fits ``budget`` at ``batch_size``;
    0 if not even k=1."""
    depth = _depth(architecture, bc)
    return _largest(lambda k: memory.peak_bytes(
        _deepened(dict(architecture, growth_rate=k), bc, depth), batch_size, mode, **options)
        <= budget, MAX_LAYERS)


def _depth(architecture, bc):
    return (6 if bc else 3) * architecture["block_config"][0] + 4


def _deepened(architecture, bc, depth):
    kwargs = dict(architecture, **depth_to_config(depth, architecture["growth_rate"], bc))
    kwargs["compression"] = architecture["compression"]
    return memory.network(**kwargs)


def _largest(fits, limit):
    """The largest n in [1, limit] with fits(n) (fits must hold below a threshold), else 0."""
    if not fits(1):
        return 0
    low = 1
    while low < limit and fits(min(2 * low, limit)):
        low = min(2 * low, limit)
    if low == limit:
        return low
    high = min(2 * low, limit)  # does not fit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan(architecture, batch_size=64, amp="off", channels_last=False, mode="efficient",
         device="cpu", budget=None, bc=None, arch=None):
    """Predicted figures of every mode for DenseNet(**architecture) (plus its image_size).

    ``architecture`` holds DenseNet's keyword arguments and image_size. With a ``budget`` in
    bytes, each mode also says whether it fits, the largest batch that fits and, when ``bc`` is
    True or False (the architecture follows depth_to_config), the deepest network of this growth
    rate that fits at this batch; when ``arch`` names torchvision's DenseNet that
    ``architecture`` is, the depth of the deepest of torchvision's DenseNets of its growth rate
    that fits (deepest_named). Returns a dict (see run_plan for its JSON form).
    """
    try:
        net = memory.network(**architecture)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    options = dict(amp=amp, channels_last=channels_last, device=device)
    report = {"parameters": memory.parameters(net), "macs_per_image": memory.macs_per_image(net),
              "state_bytes": memory.state_bytes(net), "modes": {}, "budget_bytes": budget,
              "mode": mode, "network": net}
    for name in memory.modes(net):
        peak = memory.peak_bytes(net, batch_size, name, **options)
        figures = {"saved_bytes": memory.saved_bytes(net, batch_size, name, amp, device),
                   "state_bytes": report["state_bytes"], "peak_bytes": peak,
                   "fits": None if budget is None else peak <= budget,
                   "largest_batch": None, "deepest": None}
        if budget is not None:
            figures["largest_batch"] = largest_batch(net, name, budget, **options)
            if bc is not None:
                figures["deepest"] = deepest(architecture, bc, batch_size, name, budget,
                                             **options)
            elif arch is not None:
                figures["deepest"] = deepest_named(architecture, arch, batch_size, name, budget,
                                                   **options)
        report["modes"][name] = figures
    return report


def json_report(report, device):
    """The planner's JSON object: per mode saved, state and peak bytes and whether it fits."""
    keys = ("saved_bytes", "state_bytes", "peak_bytes", "fits")
    return {"parameters": report["parameters"], "macs_per_image": report["macs_per_image"],
            "modes": {name: {key: figures[key] for key in keys}
                      for name, figures in report["modes"].items()},
            "budget_bytes": report["budget_bytes"], "device": device}


def table(report, title, device_line, batch_size, depth_kind, note=None):
    """The plan as text: a header, one row per mode, a footnote (and ``note`` after it)."""
    net = report["network"]
    lines = [title,
             f"{report['parameters']:,} parameters ({format_bytes(4 * report['parameters'])}), "
             f"{report['macs_per_image'] / 1e9:.3g} G multiply-accumulates per image",
             device_line, ""]
    header = ["mode", "saved", "params+grads+momentum", "peak", "fits", "largest batch",
              f"deepest at batch {batch_size}"]
    rows, missing = [header], []
    for name in memory.MODES:
        label = LABELS[name] + (" (chosen)" if name == report["mode"] else "") + \
            (" (reference)" if name == "torchvision_memory_efficient" else "")
        figures = report["modes"].get(name)
        if figures is None:
            missing.append(label)
            continue
        deep = figures["deepest"]
        rows.append([label, format_bytes(figures["saved_bytes"]),
                     format_bytes(figures["state_bytes"]), format_bytes(figures["peak_bytes"]),
                     {None: "?", True: "yes", False: "no"}[figures["fits"]],
                     "" if figures["largest_batch"] is None else f"{figures['largest_batch']:,}",
                     "" if report["budget_bytes"] is None or depth_kind is None else
                     "none" if deep is None else f"{depth_kind}-{deep}"])
    widths = [max(len(row[i]) for row in rows + [[label] for label in missing] if i < len(row))
              for i in range(len(header))]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width
                                                             in zip(row[1:], widths[1:],
                                                                    strict=True)]).rstrip())
    lines += [f"{label.ljust(widths[0])}  n/a: needs bottleneck layers" for label in missing]
    lines += ["", "saved: what autograd keeps for backward (parameters and the input excluded); "
              "peak: predicted peak of one", "training step (forward, backward, SGD step), the "
              f"input batch included; models/memory.py, {net.image[0]}x{net.image[1]} images."]
    lines += [note] if note else []
    return "\n".join(lines)


def check_depth(depth):
    """UsageError for a depth beyond MAX_DEPTH, before the planner is asked."""
    if depth > MAX_DEPTH:
        raise UsageError(f"--depth {depth:,} is beyond what any device can train: at most "
                         f"{MAX_DEPTH:,} (a million layers need terabytes even at growth rate 1 "
                         f"and batch 1)")


def device_memory():
    """(device type, its description, total bytes or None) where this demo.py process trains:
    its GPU (the first, or torchrun's LOCAL_RANK), else the CPU: the machine's memory, within
    its cgroup's limit."""
    import torch

    from .devices import is_distributed

    if torch.cuda.is_available():
        index = int(os.environ["LOCAL_RANK"]) if is_distributed() else 0
        properties = torch.cuda.get_device_properties(index)
        return "cuda", f"GPU {index} ({properties.name})", properties.total_memory
    return "cpu", "this machine's CPU", machine_memory()[0]


def check_fits(config):
    """Refuse, before anything is built or read, a training run (demo.py's resolved config)
    that cannot fit its device: UsageError with the planner's figures.

    The rule: the predicted peak of one training step (parameters, gradients, momentum and what
    the step keeps, at this process's share of the batch; models/memory.py) must not exceed
    the device's total memory: a GPU's, or on a CPU the machine's (or its cgroup's limit).
    Total, not free or available: a run is refused only when it could not fit even on an idle
    machine, never because of what else runs at the moment (--plan True compares with that)."""
    import torch

    from .devices import is_distributed, world_size_from_env

    check_depth(config["depth"])
    # A dataset of unknown classes counts as one class: the refusal must be certain.
    architecture = dict(architecture_kwargs(config),
                        num_classes=NUM_CLASSES.get(config["dataset"]) or 1,
                        image_size=config["image_size"])
    mode = "naive" if not config["efficient"] else \
        "recompute_bottleneck" if config["recompute_bottleneck"] else "efficient"
    device, description, total = device_memory()
    batch = config["batch_size"] // world_size_from_env()
    if device == "cuda" and not is_distributed():  # DataParallel splits it over the GPUs
        batch = math.ceil(batch / torch.cuda.device_count())
    net = memory.network(**architecture)
    peak = memory.peak_bytes(net, batch, mode, amp=config["amp"],
                             channels_last=config["channels_last"], device=device)
    if total is None or peak <= total:
        return
    parameters = 4 * memory.parameters(net)
    raise UsageError(
        f"{describe(config)} cannot train on "
        f"{description}: its parameters alone take {format_bytes(parameters)} "
        f"({format_bytes(memory.state_bytes(net))} with gradients and momentum), and the "
        f"planner predicts {format_bytes(peak)} for one training step at batch {batch:,} "
        f"({LABELS[mode]}, amp {config['amp']}), more than its {format_bytes(total)} of "
        f"memory; the same flags with --plan True show what fits")


def _folder_classes(data):
    """The class folders in data/train, or FOLDER_CLASSES when there are none to count."""
    try:
        classes = sum(entry.is_dir() for entry in os.scandir(os.path.join(str(data), "train")))
    except (OSError, TypeError):
        classes = 0
    return classes or FOLDER_CLASSES


def _boolean(config, name):
    if not isinstance(config[name], bool):
        raise UsageError(f"--{name} must be True or False, got {config[name]!r}")
    return config[name]


def run_plan(config):
    """``demo.py --plan True``: check the arguments the plan needs, print the plan (a table, or
    JSON with --json True). Returns the exit status; raises UsageError on bad input."""
    for name in ("plan", "json", "efficient", "recompute_bottleneck", "channels_last"):
        _boolean(config, name)
    if config["dataset"] not in NUM_CLASSES:
        raise UsageError(f"unknown --dataset {config['dataset']!r}; choose one of "
                        f"{', '.join(NUM_CLASSES)}")
    for name in ("batch_size", "image_size"):
        value = config.get(name)
        if name == "image_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name} must be an integer >= 1, got {value!r}")
    if config["amp"] not in memory.COMPUTE_BYTES:
        raise UsageError(f"--amp must be one of {', '.join(memory.COMPUTE_BYTES)}, "
                        f"got {config['amp']!r}")
    if config["drop_rate"] is None:
        config = {**config, "drop_rate": 0.0}
    if isinstance(config["drop_rate"], bool) or not isinstance(config["drop_rate"], (int, float)):
        raise UsageError(f"--drop_rate must be a number, got {config['drop_rate']!r}")
    # Any size may be planned; the default is what training would use.
    size = config.get("image_size") or (224 if config["dataset"] == "folder" else 32)
    config = resolve_architecture({**config, "image_size": size})
    check_depth(config["depth"])
    arch, bc = config["arch"], None if config["arch"] else config["bc"]
    classes = NUM_CLASSES[config["dataset"]] or _folder_classes(config.get("data"))
    architecture = dict(architecture_kwargs(config), num_classes=classes, image_size=size)
    if config["recompute_bottleneck"] and not (config["efficient"] and config["bc"]):
        raise UsageError("--recompute_bottleneck True needs --efficient True and --bc True")
    mode = "naive" if not config["efficient"] else \
        "recompute_bottleneck" if config["recompute_bottleneck"] else "efficient"

    budget = None
    if config["memory_budget"] is not None:
        budget = parse_budget(config["memory_budget"])
    device, description, total, free = training_device()
    source = "--memory_budget"
    if budget is None and free is not None:
        budget, source = free, "free memory" if device == "cuda" else "available memory"
    options = dict(batch_size=config["batch_size"], amp=config["amp"],
                   channels_last=config["channels_last"], mode=mode, device=device, bc=bc,
                   arch=arch)
    report = plan(architecture, budget=budget, **options)
    if config["memory_budget"] is not None and budget < 4 * report["parameters"]:
        raise UsageError(f"--memory_budget {config['memory_budget']} ({format_bytes(budget)}) is "
                        f"smaller than the parameters alone "
                        f"({format_bytes(4 * report['parameters'])})")
    if config["json"]:
        print(json.dumps(json_report(report, description)))
        return 0
    kind = "DenseNet" if arch or not bc else "DenseNet-BC"
    if arch:
        network = describe(config)
        note = f"deepest: of torchvision's DenseNets with this growth rate ({family(arch)})."
    else:
        stem = "" if architecture["small_inputs"] else ", ImageNet stem"
        network = (f"{kind} depth {config['depth']}, growth rate {config['growth_rate']}, "
                   f"compression {architecture['compression']:g}{stem}")
        note = None
    title = (f"{network}, dropout {architecture['drop_rate']:g}, "
             f"{architecture['num_classes']} classes; batch {config['batch_size']} of "
             f"{size}x{size} images, amp {config['amp']}, channels_last "
             f"{config['channels_last']}")
    memory_line = "memory unknown" if total is None else \
        f"{format_bytes(total)} total, {format_bytes(free)} " + \
        ("free" if device == "cuda" else "available")
    budget_line = "no budget" if budget is None else f"budget {format_bytes(budget)} ({source})"
    print(table(report, title, f"{description}: {memory_line}; {budget_line}",
                config["batch_size"], kind, note))
    return 0
