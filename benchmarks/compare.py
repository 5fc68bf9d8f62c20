"""The comparison: saved bytes, peak memory, step time, largest batch and deepest network of
this project's naive, efficient and efficient + recompute_bottleneck models against torchvision's
DenseNet (memory_efficient False and True), each next to the memory model's prediction."""

import csv
import gc
import math
import os
import sys
import time

import torch

from measure import peak_training_memory, saved_tensor_bytes, time_training_steps
from models import ARCHITECTURES, depth_to_config, memory

from .common import (
    IMPLEMENTATIONS,
    LABELS,
    PLAN_MODES,
    batch,
    bc_config,
    build,
    cpu_allocator,
    device_description,
    device_slug,
    fmt,
    named_config,
    predicted_mb,
    run_in_fresh_process,
    search_near,
)

CSV_COLUMNS = ["device", "config", "depth", "growth_rate", "image_size", "batch_size", "impl",
               "amp", "params", "saved_mb", "saved_predicted_mb", "peak_mb", "peak_predicted_mb",
               "forward_ms", "backward_ms", "step_ms"]
# torchvision's ImageNet DenseNets: batches of equal pixels at both sizes, so that a naive
# DenseNet-161 (the largest) saves about 3.6 GiB (CPUs here have 24 GB, shared).
IMAGENET_BATCHES = {224: 16, 448: 4}
GPU_MEMORY = (16 * 2**30, 80 * 2**30)  # cards the largest-batch predictions are for
MEMORY_TABLE_IMPLS = ("naive", "torchvision_me", "efficient", "recompute")


def imagenet_configs():
    return [named_config(arch, size, batch) for size, batch in IMAGENET_BATCHES.items()
            for arch in ARCHITECTURES]


def default_configs():
    depths = [bc_config(d, 12) for d in (40, 100, 190, 250)]
    return depths + [bc_config(250, 24), bc_config(190, 40)] + imagenet_configs()


def quick_configs():
    return [bc_config(40, 12, batch_size=32), bc_config(100, 12, batch_size=32)]


def acceptance_configs():
    """The GPU acceptance run's part: the targets' configuration, within minutes on a GPU."""
    return [bc_config(100, 12)]


PROFILES = {"full": default_configs, "quick": quick_configs, "acceptance": acceptance_configs,
            "imagenet": imagenet_configs}
ACCEPTANCE_SEARCH_BUDGET = 8 * 2**30  # the CPU search's budget too: comparable answers


# Saved memory relative to the naive model, rounded up from BC-190's figures: for skipping on CPU.
MEMORY_FACTOR = {"naive": 1.0, "torchvision": 1.0, "torchvision_me": 0.4, "efficient": 0.2,
                 "recompute": 0.1}


def estimated_naive_bytes(config):
    """Rough bytes the naive model saves for backward: a guard against exhausting CPU memory."""
    n, size = config["batch_size"], config["image_size"]
    if not config["small_inputs"]:
        size //= 4
    k, width = config["growth_rate"], (config["bn_size"] or 0) * config["growth_rate"]
    channels, total = config["num_init_features"], 0
    for layers in config["block_config"]:
        for j in range(layers):
            c = channels + j * k
            total += (2 * c + 2 * width) * n * size * size * 4
        channels = int(math.floor((channels + layers * k) * config["compression"]))
        size = max(size // 2, 1)
    return total


def _peak_worker(impl, config, device_name, amp, batch_size=None):
    """Peak MiB of one training step; None when it does not fit in the device's memory."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    try:
        model = build(impl, config).to(device)
        inputs, targets = batch(config, device, batch_size)
        peak = peak_training_memory(model, inputs, targets,
                                    autocast_dtype=torch.bfloat16 if amp else None)
        return peak / 2**20
    except RuntimeError as error:  # cuDNN may report a failed allocation in its own words
        if isinstance(error, torch.cuda.OutOfMemoryError) or "ALLOC_FAILED" in str(error):
            return None
        raise
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _peaks_worker(impl, config, device_name, amp_modes):
    """_peak_worker for each AMP mode, one after the other in this (fresh) process: the peak
    counts allocated bytes only, so what the allocator caches in between does not count."""
    return [_peak_worker(impl, config, device_name, amp) for amp in amp_modes]


def _saved_worker(impl, config, device_name, amp):
    """MiB saved for backward by one forward of a fresh model."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build(impl, config).to(device)
    inputs, _ = batch(config, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return saved_tensor_bytes(model, inputs, activations_only=True) / 2**20


SEARCH_IMPLS = ("naive", "torchvision_me", "efficient", "recompute")


def _cuda_search_worker(impl, device_name, budget):
    """The largest batch of BC-100 k=12 and the deepest BC k=12 at batch 64 whose training step
    fits ``budget`` bytes of the GPU (None: all of it), each with the planner's prediction.

    The caching allocator is capped at the budget (set_per_process_memory_fraction), so this
    answers "what fits a card of that size"; the search starts at the prediction.
    """
    from training.plan import deepest, largest_batch

    device = torch.device(device_name)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(budget or total, total)
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    config = bc_config(100, 12)
    reference = dict(depth_to_config(100, 12), num_classes=10, small_inputs=True,
                     image_size=32, drop_rate=0.0)
    mode = PLAN_MODES[impl]
    net = memory.network(**reference)
    predicted_batch = largest_batch(net, mode, budget, device="cuda")
    predicted_depth = deepest(reference, True, 64, mode, budget, device="cuda") or 10

    def fits(config, batch_size):
        return _peak_worker(impl, config, device_name, False, batch_size) is not None

    largest, _ = search_near(lambda n: fits(config, n), predicted_batch, 2**17)
    layers, _ = search_near(lambda n: fits(bc_config(6 * n + 4, 12), 64),
                            (predicted_depth - 4) // 6, 8192)
    return dict(largest_batch=largest, predicted_batch=predicted_batch,
                deepest=6 * layers + 4 if layers else None, predicted_depth=predicted_depth,
                budget=budget)


def measure_config(config, device, impls, repeats, time_it, amp_modes, fresh):
    """Rows of figures for one configuration: saved bytes, peak memory, step times.

    With ``fresh``, each saved-bytes measurement runs in a new process: on a CPU the memory
    a large forward leaves to the allocator would otherwise add up across implementations.
    """
    models = {impl: build(impl, config) for impl in impls}
    counts = {impl: sum(p.numel() for p in m.parameters()) for impl, m in models.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"{config['name']}: parameter counts differ: {counts}")
    rows = []
    peaks = {}
    if device.type == "cuda":  # each implementation in a fresh process, before any other work
        peaks = {impl: run_in_fresh_process(_peaks_worker, impl, config, str(device), amp_modes)
                 or [None] * len(amp_modes) for impl in impls}
    for amp in amp_modes:
        autocast_dtype = torch.bfloat16 if amp else None
        inputs, targets = batch(config, device)
        for model in models.values():
            model.to(device).train()
        figures = {impl: {} for impl in impls}
        for impl, model in models.items():
            if fresh:
                figures[impl]["saved_mb"] = run_in_fresh_process(
                    _saved_worker, impl, config, str(device), amp)
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                figures[impl]["saved_mb"] = saved_tensor_bytes(
                    model, inputs, activations_only=True) / 2**20
        if time_it:
            times = time_training_steps(models, inputs, targets, repeats=repeats,
                                        warmup=2 if device.type == "cuda" else 1,
                                        autocast_dtype=autocast_dtype)
            for impl, t in times.items():
                figures[impl].update(forward_ms=1e3 * t["forward"],
                                     backward_ms=1e3 * t["backward"], step_ms=1e3 * t["step"])
        for impl in impls:
            saved, peak = predicted_mb(impl, config, device.type, amp)
            figures[impl]["saved_predicted_mb"] = saved
            if device.type == "cuda":
                figures[impl]["peak_mb"] = peaks[impl][amp_modes.index(amp)]
                figures[impl]["peak_predicted_mb"] = peak
        for impl in impls:
            rows.append(dict(device=device_description(device), config=config["name"],
                             depth=config["depth"], growth_rate=config["growth_rate"],
                             image_size=config["image_size"], batch_size=config["batch_size"],
                             impl=impl, amp="bf16" if amp else "off", params=counts[impl],
                             **figures[impl]))
        print_rows(rows[-len(impls):])
    return rows


def print_rows(rows):
    for row in rows:
        parts = [f"{row['config']:>16} {row['impl']:>15} amp={row['amp']:<4}",
                 f"saved {fmt(row['saved_mb']):>9} MiB (predicted "
                 f"{fmt(row['saved_predicted_mb']):>9})"]
        if row.get("peak_mb") is not None:
            parts.append(f"peak {row['peak_mb']:9.1f} MiB (predicted "
                         f"{fmt(row.get('peak_predicted_mb')):>9})")
        if row.get("step_ms") is not None:
            parts.append(f"step {row['step_ms']:9.1f} ms")
        print("  ".join(parts), flush=True)


def markdown_table(rows, device_text, extra_lines):
    """One table: each configuration and AMP mode, the figures of every implementation."""
    lines = [f"Device: {device_text}. Saved = bytes autograd keeps for backward, parameters and "
             "the input excluded (MiB); peak = peak CUDA memory of a full training step; "
             "predicted = models/memory.py's figure; step = median forward + backward time; "
             "an empty cell was not measured (or did not fit).", ""]
    with_peak = any(r.get("peak_mb") is not None for r in rows)
    peak_column = " peak MiB | predicted peak |" if with_peak else ""
    lines.append(f"| config | batch | amp | implementation | saved MiB | predicted saved |"
                 f"{peak_column} step ms | saved vs torchvision m.e. | step vs naive |")
    lines.append("|---" * (11 if with_peak else 9) + "|")
    keyed = {(r["config"], r["amp"], r["impl"]): r for r in rows}
    for row in rows:
        reference = keyed.get((row["config"], row["amp"], "torchvision_me"))
        naive = keyed.get((row["config"], row["amp"], "naive"))
        saved_ratio = (row["saved_mb"] / reference["saved_mb"]
                       if reference and row["saved_mb"] and reference["saved_mb"] else None)
        step_ratio = (row["step_ms"] / naive["step_ms"]
                      if naive and row.get("step_ms") and naive.get("step_ms") else None)
        peak = f" {fmt(row.get('peak_mb'))} | {fmt(row.get('peak_predicted_mb'))} |" \
            if with_peak else ""
        lines.append(f"| {row['config']} | {row['batch_size']} | {row['amp']} | "
                     f"{LABELS[row['impl']]} | {fmt(row['saved_mb'])} | "
                     f"{fmt(row.get('saved_predicted_mb'))} |{peak} "
                     f"{fmt(row.get('step_ms'))} | {fmt(saved_ratio, 2)} | {fmt(step_ratio, 2)} |")
    return "\n".join(lines + [""] + extra_lines) + "\n"


def plot(rows, path, device_text):
    """Memory and step time against depth for the k=12 DenseNet-BC series; False (and no file)
    when the rows have none."""
    series = [r for r in rows if r["growth_rate"] == 12 and r["config"].startswith("BC-")
              and r["amp"] == "off"]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory_key = "peak_mb" if any(r.get("peak_mb") for r in series) else "saved_mb"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in IMPLEMENTATIONS:
        points = sorted((r["depth"], r.get(memory_key), r.get("step_ms")) for r in series
                        if r["impl"] == impl)
        memory = [(d, m) for d, m, _ in points if m]
        steps = [(d, s) for d, _, s in points if s]
        style = dict(marker="o", label=LABELS[impl],
                     linestyle=":" if impl == "naive" else "-",  # naive lies on torchvision
                     zorder=3 if impl == "naive" else 2)
        if memory:
            axes[0].plot(*zip(*memory, strict=True), **style)
        if steps:
            axes[1].plot(*zip(*steps, strict=True), **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("peak training memory (MiB)" if memory_key == "peak_mb"
                       else "saved for backward (MiB)")
    axes[1].set_ylabel("forward + backward (ms)")
    for ax in axes:
        ax.set_xlabel("depth (DenseNet-BC, k=12, batch 64, 32x32)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"DenseNet memory and speed on {device_text}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def memory_table(rows, configs):
    """Markdown lines: for torchvision's ImageNet DenseNets, the saved bytes each mode measured
    (and per image), and the largest batch the planner predicts in 16 and 80 GiB of a GPU."""
    from training.plan import largest_batch

    named = [c for c in configs if not c["small_inputs"]]
    if not named:
        return []
    measured = {(r["config"], r["impl"]): r for r in rows if r["amp"] == "off"}
    budgets = " | ".join(f"{b // 2**30} GiB, {amp}" for b in GPU_MEMORY
                         for amp in ("float32", "bf16"))
    lines = ["", "torchvision's ImageNet DenseNets: saved for backward, measured on this CPU "
             "(float32), and the largest batch whose training step fits a GPU of 16 or 80 GiB "
             "(the last four columns), "
             "predicted by the planner (models/memory.py, CUDA terms; cuDNN's workspaces and "
             "the allocator's rounding are not included, and no GPU has checked these yet):",
             "", f"| network | batch | mode | saved MiB | per image MiB | predicted saved | "
             f"{budgets} |", "|---" * (6 + 2 * len(GPU_MEMORY)) + "|"]
    keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression",
            "num_classes", "small_inputs", "image_size")
    for config in named:
        net = memory.network(**{k: config[k] for k in keys})
        for impl in MEMORY_TABLE_IMPLS:
            row = measured.get((config["name"], impl))
            saved = row["saved_mb"] if row else None
            predicted = memory.saved_bytes(net, config["batch_size"], PLAN_MODES[impl]) / 2**20
            fits = [f"{largest_batch(net, PLAN_MODES[impl], budget, amp=amp, device='cuda'):,}"
                    for budget in GPU_MEMORY for amp in ("off", "bf16")]
            lines.append(f"| {config['name']} | {config['batch_size']} | {LABELS[impl]} | "
                         f"{fmt(saved) or 'not run'} | "
                         f"{fmt(saved and saved / config['batch_size'], 2)} | "
                         f"{fmt(predicted)} | {' | '.join(fits)} |")
    return lines + [""]


def search_table(device, budget):
    """Markdown lines: per implementation the largest batch and the deepest network that
    trained within ``budget`` bytes of the GPU (None: all of it), with the predictions."""
    found = {}
    for impl in SEARCH_IMPLS:
        found[impl] = run_in_fresh_process(_cuda_search_worker, impl, str(device), budget)
        print(f"{LABELS[impl]}: {found[impl]}", flush=True)
    some = next((f for f in found.values() if f), None)
    within = f"{some['budget'] / 2**30:.1f} GiB" if some else "the GPU"
    lines = ["", f"Largest batch and deepest network whose training step fits {within} "
             "(measured by real steps, the search starting at the planner's prediction):", "",
             "| implementation | largest batch, BC-100 k=12 | predicted | deepest BC k=12, "
             "batch 64 | predicted |", "|---|---|---|---|---|"]
    for impl, f in found.items():
        if f is None:
            lines.append(f"| {LABELS[impl]} | (the search's process died) | | | |")
            continue
        lines.append(f"| {LABELS[impl]} | {f['largest_batch']} | {f['predicted_batch']} | "
                     f"BC-{f['deepest']} | BC-{f['predicted_depth']} |")
    efficient, reference = found.get("efficient"), found.get("torchvision_me")
    if efficient and reference and efficient["deepest"] and reference["deepest"]:
        ratio = efficient["deepest"] / reference["deepest"]
        recompute = found.get("recompute")
        also = ""
        if recompute and recompute["deepest"]:
            also = (f", efficient + recompute_bottleneck "
                    f"{recompute['deepest'] / reference['deepest']:.2f}x")
        lines += ["", f"Deepest network, efficient / torchvision memory_efficient: {ratio:.2f}x"
                  f"{also} (target: at least 2x)."]
    return lines


def run(profile, device, out, repeats=None, amp=None, time_max_depth=None, cpu_max_gb=8.0,
        search=None, search_budget=None):
    """The comparison over a profile's configurations on ``device``; writes
    <out>/benchmark-<device>[-<profile>].csv, .md and .png."""
    on_cuda = device.type == "cuda"
    quick = profile == "quick"
    repeats = repeats or (2 if quick else 10 if on_cuda else 5)
    amp_modes = [False, True] if (on_cuda if amp is None else amp) else [False]
    time_max_depth = time_max_depth or (40 if quick else 10**6 if on_cuda else 100)
    search = (on_cuda and not quick) if search is None else search
    if profile == "acceptance" and search_budget is None:
        search_budget = ACCEPTANCE_SEARCH_BUDGET
    torch.backends.cudnn.benchmark = True

    started = time.time()
    description = device_description(device)
    allocator = f" ({cpu_allocator()})" if device.type == "cpu" else ""
    print(f"Benchmark on {description}{allocator}; torch {torch.__version__}", flush=True)
    rows = []
    for config in PROFILES[profile]():
        impls = [impl for impl in IMPLEMENTATIONS if on_cuda or
                 MEMORY_FACTOR[impl] * estimated_naive_bytes(config) <= cpu_max_gb * 2**30]
        if impls != list(IMPLEMENTATIONS):
            skipped = ", ".join(sorted(set(IMPLEMENTATIONS) - set(impls)))
            print(f"{config['name']}: {skipped} skipped on CPU (they would save more than "
                  f"{cpu_max_gb} GB; see --cpu_max_gb)", flush=True)
        if not impls:
            continue
        rows += measure_config(config, device, impls, repeats,
                               config["depth"] <= time_max_depth, amp_modes,
                               fresh=not on_cuda and not quick)

    extra = memory_table(rows, PROFILES[profile]())
    extra += search_table(device, search_budget) if search else []
    command = "python benchmark.py " + " ".join(sys.argv[1:])
    extra.append(f"Command: `{command.strip()}`; torch {torch.__version__}; "
                 f"{time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s.")

    os.makedirs(out, exist_ok=True)
    suffix = "" if profile == "full" else f"-{profile}"
    stem = os.path.join(out, f"benchmark-{device_slug(device)}{suffix}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v)
                             for k, v in row.items() if k in CSV_COLUMNS})
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(rows, description + allocator, extra))
    plotted = plot(rows, stem + ".png", description)
    print(f"wrote {stem}.csv, .md" + (", .png" if plotted else ""))
    return stem
