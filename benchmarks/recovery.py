"""What recovery checkpoints (--checkpoint_every) cost a realistic CPU run.

    python -m benchmarks.recovery [--pairs 2] [--every 0.5] [--images 1280] [--depth 100]

Each run trains one epoch of --images CIFAR-sized images (fake ones: the checkpoints' cost does
not depend on what the pixels show) with the default model (DenseNet-BC-100, k=12, batch 64) in
a fresh process through demo.py's own loop, alternately with --checkpoint_every 0 and
--checkpoint_every EVERY (interleaved pairs, so that other load on the machine hits both
alike). In the runs with checkpoints, the time the training thread spends on each one
(deciding, gathering, copying the state) and the CPU time the writer thread spends writing it
(torch.save, fsync) are recorded. Their sum, counted in full as lost training time (the writer
thread shares the cores), divided by the interval, is the cost at that interval, and at the
default one (10 minutes). The pairs' training throughput is compared as well, though on a
shared machine its noise is larger than the cost. Writes results/recovery-checkpoints-cpu.md
(or --out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from measure import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MINUTES = 10
# One run in this process: demo.main with the recovery checkpoint's two halves timed.
CHILD = r"""
import json, sys, threading, time
import demo
import training.loop as loop
from training.checkpoint import CheckpointWriter

args, out = json.loads(sys.argv[1]), sys.argv[2]
main_seconds, writer_seconds, writer_wall = [], [], []
recovery = loop.recovery_checkpoint

def timed_recovery(*a, **k):
    start = time.perf_counter()
    recovery(*a, **k)
    main_seconds.append(time.perf_counter() - start)

write = CheckpointWriter._write

def timed_write(self, state):
    cpu, wall = time.thread_time(), time.perf_counter()
    write(self, state)
    writer_seconds.append(time.thread_time() - cpu)
    writer_wall.append(time.perf_counter() - wall)

loop.recovery_checkpoint = timed_recovery
CheckpointWriter._write = timed_write
demo.main(**args)
with open(out, "w") as file:
    json.dump({"main": main_seconds, "writer_cpu": writer_seconds, "writer_wall": writer_wall},
              file)
"""


def run(args, every, save, timings):
    """One epoch in a fresh process; its training seconds, images/s and checkpoint timings."""
    arguments = {**args, "save": save, "checkpoint_every": every}
    subprocess.run([sys.executable, "-c", CHILD, json.dumps(arguments), timings], cwd=ROOT,
                   check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(save, "results.csv")) as file:
        header, row = file.read().splitlines()[:2]
    row = dict(zip(header.split(","), row.split(","), strict=True))
    with open(timings) as file:
        timed = json.load(file)
    rate = float(row["images_per_second"])
    return {"every": every, "images_per_second": rate, **timed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--every", type=float, default=0.5, help="minutes, in the runs with")
    parser.add_argument("--images", type=int, default=1280, help="training images per epoch")
    parser.add_argument("--depth", type=int, default=100, help="of the DenseNet-BC (k=12)")
    parser.add_argument("--work", default="/tmp/densenet-recovery-benchmark")
    parser.add_argument("--out", default=os.path.join(ROOT, "results",
                                                      "recovery-checkpoints-cpu.md"))
    options = parser.parse_args()
    args = dict(dataset="fake", fake_size=[options.images, 64], valid_size=0,
                depth=options.depth, growth_rate=12, batch_size=64, n_epochs=1, seed=0)
    source = f"{options.images:,} fake CIFAR-sized images"
    started = time.strftime("%Y-%m-%d %H:%M")
    results = []
    for pair in range(options.pairs):
        for every in (0, options.every):
            save = os.path.join(options.work, f"run{pair}-{every:g}")
            subprocess.run(["rm", "-rf", save], check=True)
            os.makedirs(options.work, exist_ok=True)
            result = run(args, every, save, os.path.join(options.work, "timings.json"))
            results.append(result)
            print(json.dumps({k: v for k, v in result.items()}), flush=True)
    write_report(options, results, source, started)


def write_report(options, results, source, started):
    with_checkpoints = [r for r in results if r["every"]]
    per_checkpoint = [m + w for r in with_checkpoints
                      for m, w in zip(r["main"], r["writer_cpu"], strict=True)]
    cost = statistics.mean(per_checkpoint) if per_checkpoint else float("nan")
    main_ms = [1000 * m for r in with_checkpoints for m in r["main"]]
    writer_ms = [1000 * w for r in with_checkpoints for w in r["writer_cpu"]]
    wall_ms = [1000 * w for r in with_checkpoints for w in r["writer_wall"]]
    off = [r["images_per_second"] for r in results if not r["every"]]
    on = [r["images_per_second"] for r in with_checkpoints]
    lines = [
        "# Recovery checkpoints: their cost (CPU)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, shared with other engineers' jobs "
        f"(load average {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}; "
        f"{started}.",
        f"Command: `python -m benchmarks.recovery --pairs {options.pairs} --every "
        f"{options.every:g} --images {options.images} --depth {options.depth}`.",
        "",
        f"One epoch of DenseNet-BC-{options.depth} (k=12, batch 64; 100 is demo.py's default) "
        f"on {source}, each run in a fresh process through demo.py's loop, interleaved: "
        f"--checkpoint_every 0, then --checkpoint_every {options.every:g}, {options.pairs} times.",
        "",
        "| run | --checkpoint_every | training images/s | recovery checkpoints | training "
        "thread, ms each | writer thread CPU, ms each | writer wall, ms each |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, r in enumerate(results):
        lines.append(f"| {index + 1} | {r['every']:g} | {r['images_per_second']:.2f} | "
                     f"{len(r['main'])} | {ms_each(r['main'])} | {ms_each(r['writer_cpu'])} | "
                     f"{ms_each(r['writer_wall'])} |")
    lines += [
        "",
        f"Per recovery checkpoint ({len(per_checkpoint)} of them): training thread "
        f"{statistics.mean(main_ms):.1f} ms (max {max(main_ms):.1f}), writer thread "
        f"{statistics.mean(writer_ms):.1f} ms of CPU (max {max(writer_ms):.1f}; "
        f"{statistics.mean(wall_ms):.1f} ms wall, in the background). Counting both in full "
        f"as lost training time:",
        "",
        f"- at --checkpoint_every {options.every:g}: {cost:.3f} s per {60 * options.every:g} s "
        f"= {100 * cost / (60 * options.every):.3f}% of the training time;",
        f"- at the default, --checkpoint_every {DEFAULT_MINUTES}: {cost:.3f} s per "
        f"{60 * DEFAULT_MINUTES} s = **{100 * cost / (60 * DEFAULT_MINUTES):.4f}%** "
        f"(target: at most 2%).",
        "",
        f"Training throughput, mean of the runs: {statistics.mean(off):.2f} images/s without, "
        f"{statistics.mean(on):.2f} with recovery checkpoints every {options.every:g} min "
        f"(ratio {statistics.mean(on) / statistics.mean(off):.3f}); the runs of one mode "
        f"differ by up to {100 * spread(off, on):.1f}% among themselves on this shared "
        f"machine, far more than the cost above, which is why the checkpoints' own time is "
        f"what is counted.",
        "",
    ]
    with open(options.out, "w") as file:
        file.write("\n".join(lines))
    print("\n".join(lines))


def ms_each(seconds):
    return f"{1000 * statistics.mean(seconds):.1f}" if seconds else ""


def spread(*groups):
    """The largest relative difference between runs of the same mode."""
    return max((max(g) - min(g)) / min(g) for g in groups if len(g) > 1) if any(
        len(g) > 1 for g in groups) else 0.0


if __name__ == "__main__":
    main()
