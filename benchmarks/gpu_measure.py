"""The measuring processes of the GPU acceptance run (benchmarks/acceptance.py starts them).

    python -m benchmarks.gpu_measure versions --out FILE
    python -m benchmarks.gpu_measure peak --impl efficient --out FILE [--cpu]
    python -m benchmarks.gpu_measure steps --amp off --out FILE [--cpu]
    python -m benchmarks.gpu_measure search --impl efficient --out FILE [--budget_gib 8]

Each appends one JSON object per line to FILE as soon as it has measured it, so that a process
ended at its time limit leaves every figure it had. Each runs in a fresh process: the peak and
the search count what the caching allocator hands out in that process only, so several of them
may share the GPU. With --cpu they measure a tiny network on the CPU: a dry run of the
acceptance's plumbing, not a figure.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from measure import cpu_peak_training_memory, peak_training_memory, time_training_steps
from models import depth_to_config, memory

from .common import PLAN_MODES, batch, bc_config, build, predicted_mb, search_near

CONFIG = bc_config(100, 12)  # the targets' configuration: DenseNet-BC-100, k=12, batch 64
TINY = bc_config(40, 12, batch_size=8)  # --cpu
AMP = {"off": None, "bf16": torch.bfloat16}


def write(path, **entry):
    with open(path, "a") as file:
        file.write(json.dumps(entry) + "\n")


def versions(out):
    """The GPU's name and the versions of torch, CUDA, cuDNN, the driver and Python."""
    if not torch.cuda.is_available():
        write(out, kind="versions", name="cpu", lines=[
            f"CPU dry run: torch {torch.__version__}, Python {sys.version.split()[0]}"])
        return
    name = torch.cuda.get_device_name(0)
    properties = torch.cuda.get_device_properties(0)
    driver = "unknown"
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    write(out, kind="versions", name=name, lines=[
        f"GPU: {name}, {properties.total_memory / 2**30:.1f} GiB, "
        f"{properties.multi_processor_count} multiprocessors, "
        f"{torch.cuda.device_count()} visible",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}, driver {driver}, Python {sys.version.split()[0]}"])


def peak(impl, out, cpu):
    """Peak memory of one training step (forward, backward, SGD with momentum) per AMP mode."""
    config, device = (TINY, torch.device("cpu")) if cpu else (CONFIG, torch.device("cuda"))
    for amp, dtype in AMP.items():
        torch.manual_seed(0)
        model = build(impl, config).to(device)
        inputs, targets = batch(config, device)
        measure = cpu_peak_training_memory if cpu else peak_training_memory
        try:
            value = measure(model, inputs, targets, autocast_dtype=dtype) / 2**20
        except torch.cuda.OutOfMemoryError:
            value = None
        _, predicted = predicted_mb(impl, config, device.type, dtype is not None)
        write(out, kind="peak", impl=impl, amp=amp, config=config["name"],
              batch=config["batch_size"], device=device.type, peak_mib=value,
              predicted_mib=predicted)
        del model, inputs, targets
        if not cpu:
            torch.cuda.empty_cache()


IMPLS = ("naive", "efficient", "recompute", "torchvision", "torchvision_me")


def steps(amp, out, cpu):
    """Median forward, backward and step times of every implementation, interleaved."""
    config, device = (TINY, torch.device("cpu")) if cpu else (CONFIG, torch.device("cuda"))
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    models = {impl: build(impl, config).to(device) for impl in IMPLS}
    inputs, targets = batch(config, device)
    repeats, warmup = (2, 1) if cpu else (10, 3)
    times = time_training_steps(models, inputs, targets, repeats=repeats, warmup=warmup,
                                autocast_dtype=AMP[amp])
    for impl, t in times.items():
        write(out, kind="step", impl=impl, amp=amp, config=config["name"],
              batch=config["batch_size"], device=device.type, repeats=repeats,
              forward_ms=1e3 * t["forward"], backward_ms=1e3 * t["backward"],
              step_ms=1e3 * t["step"])


def search(impl, out, budget_gib):
    """Largest batch of BC-100 k=12, then the deepest BC k=12 at batch 64, whose training step
    fits ``budget_gib`` of the GPU (the caching allocator is capped there), by real steps from
    the planner's prediction; every probe is written as it ends."""
    from training.plan import deepest, largest_batch

    from .compare import _peak_worker

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(int(budget_gib * 2**30), total)
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    reference = dict(depth_to_config(100, 12), num_classes=10, small_inputs=True,
                     image_size=32, drop_rate=0.0)
    mode = PLAN_MODES[impl]
    predicted_batch = largest_batch(memory.network(**reference), mode, budget, device="cuda")
    predicted_depth = deepest(reference, True, 64, mode, budget, device="cuda") or 10
    write(out, kind="prediction", impl=impl, budget_gib=budget / 2**30,
          predicted_batch=predicted_batch, predicted_depth=predicted_depth)

    def probe(what, value, config, batch_size):
        started = time.monotonic()
        fits = _peak_worker(impl, config, str(device), False, batch_size) is not None
        write(out, kind="probe", impl=impl, what=what, value=value, fits=fits,
              seconds=round(time.monotonic() - started, 1))
        return fits

    largest, _ = search_near(lambda n: probe("batch", n, CONFIG, n), predicted_batch, 2**17)
    write(out, kind="found", impl=impl, what="batch", value=largest)
    layers, _ = search_near(lambda n: probe("depth", 6 * n + 4, bc_config(6 * n + 4, 12), 64),
                            (predicted_depth - 4) // 6, 8192)
    write(out, kind="found", impl=impl, what="depth", value=6 * layers + 4 if layers else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["versions", "peak", "steps", "search"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--impl", choices=IMPLS)
    parser.add_argument("--amp", choices=list(AMP), default="off")
    parser.add_argument("--budget_gib", type=float, default=8.0)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "versions":
        versions(args.out)
    elif args.what == "peak":
        peak(args.impl, args.out, args.cpu)
    elif args.what == "steps":
        steps(args.amp, args.out, args.cpu)
    else:
        search(args.impl, args.out, args.budget_gib)


if __name__ == "__main__":
    main()
