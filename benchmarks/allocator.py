"""CPU training steps with glibc's default allocator and with freed memory kept
(training.devices.keep_freed_memory, as demo.py does on a CPU): step time, page faults and
peak resident memory, each model alone in a fresh process."""

import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from .common import device_description

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One process: build the model, maybe keep freed memory, time demo.py's kind of step (forward,
# backward, foreach SGD with Nesterov momentum and weight decay). Prints "applied <bool>", then
# "<seconds> <page faults>" per step after the first two, then "maxrss <KiB>".
CHILD = r"""
import resource, sys, time, torch, torch.nn.functional as F
from models import DenseNet, depth_to_config
from training.devices import keep_freed_memory
impl, allocator, depth, batch_size, steps = sys.argv[1:]
torch.set_num_threads(1)
print("applied", allocator == "kept" and keep_freed_memory())
torch.manual_seed(0)
model = DenseNet(efficient=impl == "efficient", **depth_to_config(int(depth), 12))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                            weight_decay=1e-4, foreach=True)
n = int(batch_size)
inputs, targets = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
for step in range(int(steps)):
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    if step >= 2:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(time.perf_counter() - start, faults)
print("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
ALLOCATORS = ("default", "kept")


def measure(impl, allocator, depth, batch_size, steps):
    """One fresh process: {"applied": bool, "steps": [(seconds, faults), ...], "maxrss": KiB}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    lines = subprocess.run([sys.executable, "-c", CHILD, impl, allocator, str(depth),
                            str(batch_size), str(steps)], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    result = {"applied": lines[0] == "applied True", "steps": [],
              "maxrss": int(lines[-1].split()[1])}
    for line in lines[1:-1]:
        seconds, faults = line.split()
        result["steps"].append((float(seconds), int(faults)))
    return result


def run(out="results", quick=False):
    """Both models with both allocators, processes alternating over two rounds (one with
    ``quick``, on a small model) so the machine's noise hits all alike; writes
    <out>/cpu-allocator.md (benchmark.py --allocator True)."""
    started, load = time.time(), os.getloadavg()[0]
    depth, batch_size, steps = (16, 16, 4) if quick else (100, 64, 8)
    cases = [(impl, allocator) for impl in ("efficient", "naive") for allocator in ALLOCATORS]
    results = {case: {"applied": True, "steps": [], "maxrss": []} for case in cases}
    for _ in range(1 if quick else 2):
        for case in cases:
            result = measure(*case, depth, batch_size, steps)
            if case[1] == "kept":
                results[case]["applied"] &= result["applied"]
            results[case]["steps"] += result["steps"]
            results[case]["maxrss"].append(result["maxrss"])
            print(*case, [round(s, 2) for s, _ in result["steps"]],
                  f"max RSS {result['maxrss'] / 2**20:.2f} GiB", flush=True)
    text = allocator_markdown(results, depth, batch_size, steps, 1 if quick else 2,
                              time.time() - started, load)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "cpu-allocator-quick.md" if quick else "cpu-allocator.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def allocator_markdown(results, depth, batch_size, steps, rounds, seconds, load):
    """The table of run(), with the machine, the method and the command."""
    page = resource.getpagesize()
    lines = [
        "# CPU training steps with glibc's default allocator and with freed memory kept", "",
        f"Machine: {device_description(torch.device('cpu'))}, 1 torch thread, load average "
        f"{load:.1f} when the run started; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; `python benchmark.py {' '.join(sys.argv[1:])}` "
        f"({seconds:.0f} s). DenseNet-BC L={depth}, k=12, batch {batch_size}, 32x32: demo.py's "
        "step (forward, backward, foreach SGD with Nesterov momentum and weight decay), each "
        f"model alone in a fresh process, {steps} steps of which the first 2 are left out; "
        f"the processes alternate over {rounds} round(s) (efficient default, efficient kept, "
        "naive default, naive kept), so the machine's noise hits all four alike.", "",
        "| model | allocator | median step s | median page faults per step | peak resident "
        "memory GiB |", "|---|---|---|---|---|"]
    for (impl, allocator), result in results.items():
        label = "glibc default" if allocator == "default" else "freed memory kept"
        if not result["applied"]:
            label += " (not applied: no glibc, or glibc's malloc set by the environment)"
        step = statistics.median(s for s, _ in result["steps"])
        faults = statistics.median(f for _, f in result["steps"]) * page / 2**30
        lines.append(f"| {impl} | {label} | {step:.2f} | {faults:.2f} GiB | "
                     f"{max(result['maxrss']) / 2**20:.2f} |")
    lines += [
        "", "\"Freed memory kept\" is `training.devices.keep_freed_memory()`, which demo.py "
        "calls when it trains or evaluates on a CPU: `mallopt` raises glibc's mmap and trim "
        "thresholds to 1 GiB, so freed tensors stay in the heap for the next ones. With the "
        "defaults each large block (over a threshold that grows up to 32 MiB) gets its own "
        "mapping, is unmapped when freed, and the next one is page-faulted in again. Page "
        "faults: `ru_minflt` differences around each step; peak resident memory: `ru_maxrss`, "
        "the largest over the rounds' processes."]
    return "\n".join(lines) + "\n"
