"""What every benchmark shares: the implementations, configurations, fresh processes, names."""

import concurrent.futures
import multiprocessing
import os
import signal

import torch
import torchvision

from measure import cpu_name
from models import DenseNet, depth_to_config, imagenet_config, imagenet_depth, memory
from training.devices import keep_freed_memory

IMPLEMENTATIONS = ("naive", "efficient", "recompute", "torchvision", "torchvision_me")
LABELS = {
    "naive": "naive (this project)",
    "efficient": "efficient (this project)",
    "recompute": "efficient + recompute_bottleneck",
    "torchvision": "torchvision",
    "torchvision_me": "torchvision memory_efficient",
}
# The memory model's mode of each implementation (torchvision without checkpoints is naive).
PLAN_MODES = {"naive": "naive", "torchvision": "naive", "efficient": "efficient",
              "recompute": "recompute_bottleneck",
              "torchvision_me": "torchvision_memory_efficient"}


def bc_config(depth, growth_rate, batch_size=64):
    """A CIFAR-sized DenseNet-BC configuration."""
    return dict(name=f"BC-{depth} k={growth_rate}", depth=depth, image_size=32,
                batch_size=batch_size, num_classes=10, small_inputs=True,
                **depth_to_config(depth, growth_rate))


def named_config(arch, image_size, batch_size):
    """torchvision's ImageNet DenseNet ``arch`` (densenet121...) on image_size x image_size."""
    depth = imagenet_depth(arch)
    return dict(name=f"DenseNet-{depth} {image_size}px", depth=depth, image_size=image_size,
                batch_size=batch_size, num_classes=1000, small_inputs=False,
                **imagenet_config(arch))


def build(impl, config):
    """The named implementation of a configuration; all have the same architecture."""
    if impl.startswith("torchvision"):
        model = torchvision.models.DenseNet(
            growth_rate=config["growth_rate"], block_config=config["block_config"],
            num_init_features=config["num_init_features"], bn_size=config["bn_size"],
            num_classes=config["num_classes"], drop_rate=config.get("drop_rate", 0.0),
            memory_efficient=impl == "torchvision_me")
        if config["small_inputs"]:
            model.features.conv0 = torch.nn.Conv2d(3, config["num_init_features"], 3, padding=1,
                                                   bias=False)
            del model.features.norm0, model.features.relu0, model.features.pool0
        return model
    keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression",
            "num_classes", "small_inputs")
    return DenseNet(efficient=impl != "naive", recompute_bottleneck=impl == "recompute",
                    drop_rate=config.get("drop_rate", 0.0), **{k: config[k] for k in keys})


def predicted_mb(impl, config, device_type, amp, batch_size=None):
    """models/memory.py's saved-for-backward and peak MiB of a training step (peak: on CUDA)."""
    keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression",
            "num_classes", "small_inputs", "image_size")
    net = memory.network(**{k: config[k] for k in keys})
    n, mode, amp = batch_size or config["batch_size"], PLAN_MODES[impl], "bf16" if amp else "off"
    return (memory.saved_bytes(net, n, mode, amp, device_type) / 2**20,
            memory.peak_bytes(net, n, mode, amp, device=device_type) / 2**20)


def batch(config, device, batch_size=None):
    n = batch_size or config["batch_size"]
    size = config["image_size"]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, config["num_classes"], (n,), generator=generator).to(device)
    return inputs, targets


def run_in_fresh_process(function, *args):
    """function(*args) in a new interpreter, so allocator caches cannot leak between runs.

    None when that process dies (on a CPU: killed for lack of memory). Ctrl-C is this process's
    alone: the new one starts with SIGINT ignored and is ended here, so that an interrupted
    benchmark prints no traceback of another process.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the new process
        try:
            future = pool.submit(function, *args)
        finally:
            signal.signal(signal.SIGINT, interrupt)
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            return None
        except KeyboardInterrupt:
            for process in multiprocessing.active_children():
                process.terminate()
            raise


def cpu_allocator():
    """Keep freed memory as demo.py does on a CPU, so that CPU steps are timed as it runs
    them; returns the words that say which allocator the figures had."""
    if keep_freed_memory():
        return ("glibc keeping freed memory for reuse, as demo.py sets it on a CPU "
                "(training.devices.keep_freed_memory; results/cpu-allocator.md)")
    return "the C library's default allocator (training.devices.keep_freed_memory declined)"


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores"


def device_slug(device):
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return "cuda-" + "-".join("".join(c if c.isalnum() else " " for c in name).split())


def fmt(value, digits=1):
    return "" if value is None or value == "" else f"{value:.{digits}f}"


def search_near(fits, predicted, limit):
    """(largest value that fits, smallest that does not) near a predicted threshold, to within
    max(1, value // 50): the prediction first, then steps away from it that double, then
    bisection. fits() must hold below some threshold and fail above it; high is None when even
    ``limit`` fits, low is 0 when not even 1 does."""
    predicted = min(max(predicted, 1), limit)
    step = max(1, predicted // 50)
    if fits(predicted):
        low, high = predicted, None
        while high is None:
            if low >= limit:
                return low, None
            candidate = min(low + step, limit)
            if fits(candidate):
                low, step = candidate, 2 * step
            else:
                high = candidate
    else:
        low, high = None, predicted
        while low is None:
            if high <= 1:
                return 0, 1
            candidate = max(high - step, 1)
            if fits(candidate):
                low = candidate
            else:
                high, step = candidate, 2 * step
    while high - low > max(1, low // 50):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, high
