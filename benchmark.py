"""Memory and speed of this project's DenseNets against torchvision's, on CPU or CUDA.

    python benchmark.py                 # every default configuration on the available device
    python benchmark.py --quick True    # a small run (under a minute on a CPU), as CI does

Writes results/benchmark-<device>.csv, .md and .png plots (see --out).
"""

import concurrent.futures
import csv
import gc
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import fire
import torch
import torch.nn.functional as F
import torchvision

from measure import (
    count_operators,
    cpu_name,
    peak_training_memory,
    profiled_operator_count,
    saved_tensor_bytes,
    time_training_steps,
)
from models import DenseNet, depth_to_config, memory

IMPLEMENTATIONS = ("naive", "efficient", "recompute", "torchvision", "torchvision_me")
LABELS = {
    "naive": "naive (this project)",
    "efficient": "efficient (this project)",
    "recompute": "efficient + recompute_bottleneck",
    "torchvision": "torchvision",
    "torchvision_me": "torchvision memory_efficient",
}
CSV_COLUMNS = ["device", "config", "depth", "growth_rate", "image_size", "batch_size", "impl",
               "amp", "params", "saved_mb", "saved_predicted_mb", "peak_mb", "peak_predicted_mb",
               "forward_ms", "backward_ms", "step_ms"]
# The memory model's mode of each implementation (torchvision without checkpoints is naive).
PLAN_MODES = {"naive": "naive", "torchvision": "naive", "efficient": "efficient",
              "recompute": "recompute_bottleneck",
              "torchvision_me": "torchvision_memory_efficient"}


def bc_config(depth, growth_rate, batch_size=64):
    """A CIFAR-sized DenseNet-BC configuration."""
    return dict(name=f"BC-{depth} k={growth_rate}", depth=depth, image_size=32,
                batch_size=batch_size, num_classes=10, small_inputs=True,
                **depth_to_config(depth, growth_rate))


DENSENET121 = dict(name="DenseNet-121", depth=121, image_size=224, batch_size=32,
                   num_classes=1000, small_inputs=False, growth_rate=32,
                   block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                   compression=0.5)


def default_configs():
    depths = [bc_config(d, 12) for d in (40, 100, 190, 250)]
    return depths + [bc_config(250, 24), bc_config(190, 40), DENSENET121]


def quick_configs():
    return [bc_config(40, 12, batch_size=32), bc_config(100, 12, batch_size=32)]


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


def _run_in_fresh_process(function, *args):
    """function(*args) in a new interpreter, so allocator caches cannot leak between runs.

    None when that process dies (on a CPU: killed for lack of memory).
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            return None


def _peak_worker(impl, config, device_name, amp, batch_size=None):
    """Peak MB of one training step; None when it does not fit in the device's memory."""
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


def _saved_worker(impl, config, device_name, amp):
    """MiB saved for backward by one forward of a fresh model."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build(impl, config).to(device)
    inputs, _ = batch(config, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return saved_tensor_bytes(model, inputs, activations_only=True) / 2**20


def _fits(impl, config, device_name, batch_size):
    """Whether one training step fits in the device's memory (run in the calling process)."""
    try:
        return _peak_worker(impl, config, device_name, False, batch_size) is not None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _largest(fits, low, limit):
    """The largest value in [low, limit] for which fits() holds (within 1/64), assuming fits()
    holds below some threshold and fails above it: doubling, then bisection. None if not low."""
    if not fits(low):
        return None
    while low < limit:
        high = min(low * 2, limit)
        if not fits(high):
            break
        low = high
    else:
        return low
    while high - low > max(1, low // 64):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _search_worker(impl, device_name):
    """(largest batch of BC-100 k=12, deepest BC k=12 at batch 64) that train on the device."""
    config = bc_config(100, 12)
    largest = _largest(lambda b: _fits(impl, config, device_name, b), 64, 2**16)
    layers = _largest(lambda n: _fits(impl, bc_config(6 * n + 4, 12), device_name, 64), 16, 4096)
    return largest, None if layers is None else 6 * layers + 4


# ------------------------------------------------- CPU search under an address-space limit

SEARCH_IMPLS = ("naive", "torchvision_me", "efficient", "recompute")
# In the search's child processes: glibc gives every allocation above 128 KiB its own mapping and
# returns it when freed (its heap would otherwise keep freed tensors' memory, and their address
# space), and oneDNN keeps no compiled kernels between operations (its cache reserves about
# 1 MiB of address space, mostly untouched, per kernel: over 0.5 GiB for the deepest networks).
SEARCH_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


def _address_space():
    """This process's mapped address space (VmSize), in bytes."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _steady_training_step(model, inputs, targets):
    """One of demo.py's training steps (forward, zero_grad, backward, SGD with Nesterov momentum
    and weight decay) as from the second step on: gradients and momentum buffers exist."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4, foreach=True)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
        optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _limited_step_worker(impl, config, budget):
    """Build the model and train one steady-state step under an address-space limit of
    ``budget`` bytes above this process's baseline. Returns (fits, baseline, seconds, error).

    The baseline is the address space once torch is imported and a tiny model of the same
    implementation has trained a step (libraries, thread pools, kernels loaded), so the budget
    covers what the planner predicts: parameters, gradients, momentum, the batch, activations.
    """
    import resource

    torch.manual_seed(0)
    tiny = bc_config(10, 4, batch_size=2)
    _steady_training_step(build(impl, tiny), *batch(tiny, torch.device("cpu")))
    gc.collect()
    baseline = _address_space()
    resource.setrlimit(resource.RLIMIT_AS,
                       (baseline + budget, resource.getrlimit(resource.RLIMIT_AS)[1]))
    start = time.perf_counter()
    try:
        _steady_training_step(build(impl, config), *batch(config, torch.device("cpu")))
        return True, baseline, time.perf_counter() - start, ""
    except (MemoryError, RuntimeError) as error:
        return False, baseline, time.perf_counter() - start, " ".join(str(error).split())[:160]


def _search_near(fits, predicted, limit):
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


def _probe(impl, config, budget, record):
    """Whether a real training step of ``config`` fits ``budget`` (a fresh process); prints.

    ``record`` maps earlier probes of this search (also of an interrupted run) to outcomes."""
    key = f"{impl} {config['name']} batch {config['batch_size']} budget {budget}"
    if key in record:
        fits, seconds, note = record[key]
        note = "from an earlier run" + (f"; {note}" if note else "")
    else:
        result = _run_in_fresh_process(_limited_step_worker, impl, config, budget)
        if result is None:
            fits, seconds, note = False, None, "the process died"
        else:
            fits, _, seconds, note = result
        record[key] = [fits, seconds, note]
        record.save()
    took = "" if seconds is None else f" after {seconds:.0f} s"
    print(f"  {LABELS[impl]}, {config['name']}: {'fits' if fits else 'does not fit'}{took}"
          f"{'; ' + note if note else ''}", flush=True)
    return fits


class _Record(dict):
    """Probe outcomes kept in a JSON file, so that an interrupted search can go on."""

    def __init__(self, path, version):
        super().__init__()
        self.path, self.version = path, version
        if os.path.exists(path):
            with open(path) as file:
                stored = json.load(file)
            if stored.get("version") == version:
                self.update(stored["probes"])
        self.reused = len(self)

    def save(self):
        with open(self.path + ".tmp", "w") as file:
            json.dump({"version": self.version, "probes": dict(self)}, file, indent=1)
        os.replace(self.path + ".tmp", self.path)


def cpu_search(budget, budget_text, out):
    """Deepest DenseNet-BC (k=12, batch 64) and largest growth rate at depth 100 (batch 64)
    that really train within ``budget`` bytes on this CPU, per implementation, next to the
    planner's predictions; writes <out>/memory-search-cpu.md after every answer, and the
    probes' outcomes to <out>/memory-search-cpu.json (a rerun reuses them)."""
    from training.plan import deepest, format_bytes, largest_growth_rate

    started = time.time()
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"Search on {machine}; budget {format_bytes(budget)}; torch {torch.__version__}",
          flush=True)
    os.makedirs(out, exist_ok=True)
    record = _Record(os.path.join(out, "memory-search-cpu.json"),
                     f"torch {torch.__version__}; {machine}; {SEARCH_ENV}")
    reference = dict(depth_to_config(100, 12), num_classes=10, small_inputs=True,
                     image_size=32, drop_rate=0.0)
    predicted = {impl: (deepest(reference, True, 64, PLAN_MODES[impl], budget, device="cpu"),
                        largest_growth_rate(reference, True, 64, PLAN_MODES[impl], budget,
                                            device="cpu"))
                 for impl in SEARCH_IMPLS}
    found = {}
    questions = [("depth", impl) for impl in SEARCH_IMPLS] + \
        [("growth", impl) for impl in SEARCH_IMPLS]
    saved_env = {key: os.environ.get(key) for key in SEARCH_ENV}
    os.environ.update(SEARCH_ENV)  # read by the child processes as they start
    try:
        for question, impl in questions:
            depth, width = predicted[impl]
            if question == "depth":
                print(f"{LABELS[impl]}: predicted deepest BC-{depth}", flush=True)
                found[question, impl] = _search_near(
                    lambda n, impl=impl: _probe(impl, bc_config(6 * n + 4, 12), budget, record),
                    (depth - 4) // 6, 4096)
            else:
                print(f"{LABELS[impl]}: predicted largest k {width} at depth 100", flush=True)
                found[question, impl] = _search_near(
                    lambda k, impl=impl: _probe(impl, bc_config(100, k), budget, record),
                    width, 4096)
            _write_search(out, budget_text, machine, started, predicted, found, record)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _write_search(out, budget_text, machine, started, predicted, found, record):
    """memory-search-cpu.md from the answers found so far."""

    def measured(question, impl, show):
        if (question, impl) not in found:
            return "(not yet searched)"
        low, high = found[question, impl]
        fits = show(low) if low else "nothing"
        return fits + ("" if high is None else f" (not {show(high)})")

    reused = f"; {record.reused} probes reused from an interrupted run" if record.reused else ""
    env = ", ".join(f"`{key}={value}`" for key, value in SEARCH_ENV.items())
    lines = [f"# What trains in {budget_text} on a CPU: planner against real training steps", "",
             f"Machine: {machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
             f"`python benchmark.py {' '.join(sys.argv[1:])}` "
             f"({(time.time() - started) / 60:.0f} min{reused}).", "",
             "Predicted: models/memory.py via training/plan.py (`demo.py --plan True`). "
             "Measured: a real training step (demo.py's on a CPU: forward, backward, foreach "
             "SGD with Nesterov momentum and weight decay, with the gradients and momentum "
             "buffers of a previous step; batch 64 of 32x32 images, float32, random data), each "
             "probe in a fresh process whose address space is limited (RLIMIT_AS) to its "
             "baseline plus the budget; the baseline is the address space after importing torch "
             f"and training a tiny model of the same implementation. Children run with {env} "
             "(see SEARCH_ENV in benchmark.py). The search starts at the prediction and stops "
             "within 2%: \"BC-1300 (not BC-1306)\" means BC-1300 trained and BC-1306 did not. "
             "Every probe is in memory-search-cpu.json.", "",
             "| implementation | deepest DenseNet-BC k=12, batch 64: predicted | measured | "
             "largest k at depth 100, batch 64: predicted | measured |", "|---|---|---|---|---|"]
    for impl, (depth, width) in predicted.items():
        lines.append(f"| {LABELS[impl]} | BC-{depth} | "
                     f"{measured('depth', impl, lambda n: f'BC-{6 * n + 4}')} | k={width} | "
                     f"{measured('growth', impl, lambda k: f'k={k}')} |")
    if found.get(("depth", "efficient"), (0,))[0] and \
            found.get(("depth", "torchvision_me"), (0,))[0]:
        ratio = (6 * found["depth", "efficient"][0] + 4) / \
            (6 * found["depth", "torchvision_me"][0] + 4)
        lines += ["", "Deepest network, efficient / torchvision memory_efficient: predicted "
                  f"{predicted['efficient'][0] / predicted['torchvision_me'][0]:.2f}x, "
                  f"measured {ratio:.2f}x."]
    if found.get(("growth", "efficient"), (0,))[0] and \
            found.get(("growth", "torchvision_me"), (0,))[0]:
        lines += ["", "Largest growth rate, efficient / torchvision memory_efficient: predicted "
                  f"{predicted['efficient'][1] / predicted['torchvision_me'][1]:.2f}x, measured "
                  f"{found['growth', 'efficient'][0] / found['growth', 'torchvision_me'][0]:.2f}x."]
    path = os.path.join(out, "memory-search-cpu.md")
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


# ------------------------------------------------- the memory model against CPU measurements

def _case(impl, depth, k, batch_size, image_size=32, amp=False, channels_last=False,
          drop_rate=0.0, bc=True, imagenet=None):
    """A configuration for check_memory_model: DenseNet(-BC) at a depth, or an ImageNet-stem net."""
    if imagenet:
        config = dict(name=f"ImageNet-stem {imagenet}", depth=None, num_classes=1000,
                      small_inputs=False, growth_rate=k, block_config=imagenet,
                      num_init_features=2 * k, bn_size=4, compression=0.5)
    else:
        config = dict(name=f"{'BC-' if bc else 'DenseNet-'}{depth} k={k}", depth=depth,
                      num_classes=10, small_inputs=True, **depth_to_config(depth, k, bc))
    return dict(config, impl=impl, batch_size=batch_size, image_size=image_size, amp=amp,
                channels_last=channels_last, drop_rate=drop_rate)


MODEL_CHECK_CASES = [
    _case("efficient", 40, 12, 16), _case("efficient", 100, 12, 8),
    _case("efficient", 40, 24, 16, amp=True), _case("efficient", 40, 12, 16, bc=False),
    _case("efficient", 40, 12, 16, channels_last=True), _case("efficient", 40, 12, 16,
                                                                drop_rate=0.2),
    _case("efficient", 64, 32, 4), _case("efficient", 40, 12, 1),
    _case("efficient", None, 32, 4, 64, imagenet=(6, 12, 24, 16)),
    _case("recompute", 40, 12, 16), _case("recompute", 148, 12, 4),
    _case("recompute", 40, 24, 4, amp=True, channels_last=True),
    _case("naive", 40, 12, 16), _case("naive", 100, 12, 8), _case("naive", 40, 12, 16, bc=False),
    _case("naive", 52, 16, 8, channels_last=True), _case("naive", 40, 12, 32, 16, drop_rate=0.2),
    _case("naive", None, 32, 4, 64, imagenet=(6, 12, 24, 16)),
    _case("torchvision_me", 40, 12, 16), _case("torchvision_me", 100, 12, 8),
    _case("torchvision_me", 40, 24, 16, amp=True), _case("torchvision_me", 88, 20, 4,
                                                         drop_rate=0.2),
    _case("torchvision_me", None, 32, 4, 64, imagenet=(6, 12, 24, 16)),
]


def _model_check_worker(case):
    """(saved bytes, CPU allocator peak of a training step) of one case, in this process."""
    from measure import cpu_peak_training_memory

    torch.manual_seed(0)
    layout = torch.channels_last if case["channels_last"] else torch.contiguous_format
    model = build(case["impl"], case).train().to(memory_format=layout)
    inputs, targets = batch(case, torch.device("cpu"))
    inputs = inputs.contiguous(memory_format=layout)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["amp"]):
        saved = saved_tensor_bytes(model, inputs, activations_only=True)
    dtype = torch.bfloat16 if case["amp"] else None
    return saved, cpu_peak_training_memory(model, inputs, targets, autocast_dtype=dtype)


def check_memory_model(out):
    """Predicted against measured saved bytes and CPU peak for MODEL_CHECK_CASES, each measured
    in a fresh process; writes <out>/memory-model-cpu.md."""
    started = time.time()
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"Memory model check on {machine}; torch {torch.__version__}", flush=True)
    errors, rows = {"saved": [], "peak": []}, []
    for case in MODEL_CHECK_CASES:
        saved, peak = _run_in_fresh_process(_model_check_worker, case)
        keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression",
                "num_classes", "small_inputs", "image_size", "drop_rate")
        net = memory.network(**{k: case[k] for k in keys})
        mode, amp = PLAN_MODES[case["impl"]], "bf16" if case["amp"] else "off"
        predicted_saved = memory.saved_bytes(net, case["batch_size"], mode, amp)
        predicted_peak = memory.peak_bytes(net, case["batch_size"], mode, amp,
                                           case["channels_last"])
        errors["saved"].append(predicted_saved / saved - 1)
        errors["peak"].append(predicted_peak / peak - 1)
        row = (f"| {case['name']} | {case['batch_size']} | {amp} | "
               f"{'channels_last' if case['channels_last'] else 'NCHW'} | {case['drop_rate']:g} "
               f"| {LABELS[case['impl']]} | {saved / 2**20:.2f} | {predicted_saved / 2**20:.2f} "
               f"| {100 * errors['saved'][-1]:+.1f}% | {peak / 2**20:.2f} | "
               f"{predicted_peak / 2**20:.2f} | {100 * errors['peak'][-1]:+.1f}% |")
        print(row, flush=True)
        rows.append(row)
    lines = ["# models/memory.py against measurements on a CPU", "",
             f"Machine: {machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
             f"`python benchmark.py {' '.join(sys.argv[1:])}` "
             f"({(time.time() - started) / 60:.0f} min).", "",
             "Saved: bytes autograd keeps for backward after a training forward, parameters and "
             "the input excluded (measure.saved_tensor_bytes with activations_only). Peak: the CPU"
             " allocator's peak during one training step of demo.py's kind (forward, zero_grad, "
             "backward, foreach SGD with Nesterov momentum and weight decay, gradients and "
             "momentum of a previous step present), tensors alive before the step included "
             "(measure.cpu_peak_training_memory). Each case in a fresh process, 32x32 images "
             "(64x64 for the ImageNet stem), float32 unless bf16 autocast.", "",
             "| configuration | batch | amp | layout | dropout | implementation | saved MiB | "
             "predicted | error | peak MiB | predicted | error |", "|---" * 12 + "|", *rows, "",
             f"Largest error: saved {100 * max(map(abs, errors['saved'])):.1f}%, peak "
             f"{100 * max(map(abs, errors['peak'])):.1f}% ({len(MODEL_CHECK_CASES)} cases)."]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "memory-model-cpu.md")
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    print(lines[-1])
    print(f"wrote {path}")


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} cores"


def device_slug(device):
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return "cuda-" + "-".join("".join(c if c.isalnum() else " " for c in name).split())


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
    for amp in amp_modes:
        autocast_dtype = torch.bfloat16 if amp else None
        inputs, targets = batch(config, device)
        for model in models.values():
            model.to(device).train()
        figures = {impl: {} for impl in impls}
        for impl, model in models.items():
            if fresh:
                figures[impl]["saved_mb"] = _run_in_fresh_process(
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
                figures[impl]["peak_mb"] = _run_in_fresh_process(
                    _peak_worker, impl, config, str(device), amp)
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


def fmt(value, digits=1):
    return "" if value is None or value == "" else f"{value:.{digits}f}"


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
    """Memory and step time against depth for the k=12 DenseNet-BC series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [r for r in rows if r["growth_rate"] == 12 and r["config"].startswith("BC-")
              and r["amp"] == "off"]
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


def main(quick=False, device="auto", out=None, repeats=None, amp=None,
         time_max_depth=None, cpu_max_gb=8.0, search=None, memory_budget=None,
         check_model=False, tools=False):
    """Benchmark naive, efficient and torchvision DenseNets; write CSV, markdown and plots.

    Args:
        quick: a small run (saved bytes at BC-40 and BC-100, times at BC-40, batch 32) that
            finishes within a minute on a CPU.
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        out: folder for benchmark-<device>.csv/.md/.png; default results/, or with quick a
            new temporary folder (quick figures are a check, not results).
        repeats: timed repetitions per implementation (median reported); default 5 on CPU,
            10 on CUDA, 2 with quick.
        amp: also measure under bf16 autocast; default True on CUDA, False on CPU.
        time_max_depth: time only configurations up to this depth; default 100 on CPU (deeper
            steps take minutes there), 40 with quick, unlimited on CUDA.
        cpu_max_gb: on CPU, skip configurations whose naive model would save more than this
            (a forward takes about twice that).
        search: on CUDA, find the largest batch (BC-100) and deepest network (batch 64) per
            implementation by bisection; default True on CUDA without quick. On a CPU, with
            --memory_budget and nothing else: the deepest DenseNet-BC (k=12, batch 64) and the
            largest growth rate at depth 100 that train within the budget, by real training
            steps under an address-space limit, against the planner's predictions (writes
            memory-search-cpu.md; an hour or more).
        memory_budget: the CPU search's budget, such as 8GiB.
        check_model: only compare models/memory.py's predicted saved bytes and CPU peak with
            measurements (a fresh process per case); writes memory-model-cpu.md.
        tools: instead, the figures of PyTorch's tools on the CPU (see tools_main): compiled
            against eager training steps, saved bytes under torch.compile, operators dispatched
            per step and per optimizer step, float32 gradient accuracy; writes
            <out>/tools-cpu.md (with quick: a tiny model, into tools-cpu-quick.md).
    """
    for name, value in [("quick", quick), ("tools", tools)]:
        if not isinstance(value, bool):
            raise SystemExit(f"error: --{name} must be True or False, got {value!r}")
    if out is None:  # quick figures are a check, not results
        out = tempfile.mkdtemp(prefix="benchmark-quick-") if quick else "results"
    if tools:
        return tools_main(out=out, repeats=repeats, quick=quick)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    on_cuda = device.type == "cuda"
    repeats = repeats or (2 if quick else 10 if on_cuda else 5)
    amp_modes = [False, True] if (on_cuda if amp is None else amp) else [False]
    time_max_depth = time_max_depth or (40 if quick else 10**6 if on_cuda else 100)
    search = (on_cuda and not quick) if search is None else search
    if check_model is True:
        check_memory_model(out)
        return None
    if memory_budget is not None:
        from training.errors import UsageError
        from training.plan import parse_budget

        if not search or on_cuda:
            raise SystemExit("error: --memory_budget goes with --search True on a CPU")
        try:
            budget = parse_budget(memory_budget)
        except UsageError as error:
            raise SystemExit(f"error: {error}") from None
        cpu_search(budget, str(memory_budget), out)
        return None
    if search and not on_cuda:
        raise SystemExit("error: on a CPU, --search True needs --memory_budget (such as 8GiB)")
    configs = quick_configs() if quick else default_configs()
    torch.backends.cudnn.benchmark = True

    started = time.time()
    description = device_description(device)
    print(f"Benchmark on {description}; torch {torch.__version__}", flush=True)
    rows = []
    for config in configs:
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

    extra = []
    if search:
        extra.append("| implementation | largest batch, BC-100 k=12 | deepest BC k=12, batch 64 |")
        extra.append("|---|---|---|")
        for impl in IMPLEMENTATIONS:
            largest, deepest = _run_in_fresh_process(_search_worker, impl, str(device)) \
                or (None, None)
            print(f"{impl}: largest batch {largest}, deepest {deepest}", flush=True)
            extra.append(f"| {LABELS[impl]} | {largest} | {deepest} |")
    command = "python benchmark.py " + " ".join(sys.argv[1:])
    extra.append(f"Command: `{command.strip()}`; torch {torch.__version__}; "
                 f"{time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s.")

    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"benchmark-{device_slug(device)}" + ("-quick" if quick else ""))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v)
                             for k, v in row.items() if k in CSV_COLUMNS})
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(rows, description, extra))
    plot(rows, stem + ".png", description)
    print(f"wrote {stem}.csv, .md, .png")
    return None


# The figures of PyTorch's tools (--tools True) ------------------------------------------------


def _training_step(model, inputs, targets):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), targets).backward()


def sgd(params, **kind):
    """The training SGD (momentum 0.9, Nesterov, weight decay 1e-4), ``kind`` = foreach/fused."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                           **kind)


def optimizer_step_counts(model):
    """Operators dispatched by one SGD step (after the first, which creates the momentum
    buffers) over the model's parameters: PyTorch's default on this device, foreach, fused."""
    counts = {}
    for name, kind in [("default", {}), ("foreach", dict(foreach=True)),
                       ("fused", dict(fused=True))]:
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = sgd(params, **kind)
        optimizer.step()
        counts[name] = count_operators(optimizer.step).total()
    return counts


def gradient_accuracy(config, seeds, batch_size, image_size):
    """Norm-relative error of the float32 parameter gradients of the naive and the efficient
    model against float64 ones (naive), with a cross-entropy loss: {"naive": [...], ...} over
    seeds. Each seed draws new weights, inputs and targets."""
    errors = {"naive": [], "efficient": []}
    for seed in seeds:
        torch.manual_seed(seed)
        reference = DenseNet(**config).double()
        inputs = torch.randn(batch_size, 3, image_size, image_size, dtype=torch.float64)
        targets = torch.randint(0, config.get("num_classes", 10), (batch_size,))
        _training_step(reference, inputs, targets)
        exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
        for name in errors:
            model = DenseNet(efficient=name == "efficient", **config)
            model.load_state_dict(reference.state_dict())
            _training_step(model, inputs.float(), targets)
            grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
            errors[name].append(((grads - exact).norm() / exact.norm()).item())
    return errors


def tools_main(out="results", repeats=None, quick=False):
    """Compiled and eager training steps, saved bytes, operator counts and gradient accuracy
    on the CPU, written to <out>/tools-cpu.md (see main's ``tools``).

    Step times are medians of forward + backward, the four implementations interleaved. The
    compiled models are compiled with Inductor's kernel profiling on, so that the profiler sees
    each generated kernel (measure.profiled_operator_count); it costs nothing when no profiler
    runs.
    """
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True
    started, load = time.time(), os.getloadavg()[0]
    depth, batch_size, image_size = (16, 8, 16) if quick else (100, 64, 32)
    repeats = repeats or (1 if quick else 5)
    config = dict(depth_to_config(depth, 12), num_classes=10)
    name = f"BC-{depth} k=12, batch {batch_size}, {image_size}x{image_size}"
    print(f"Tools figures on {device_description(torch.device('cpu'))}; torch "
          f"{torch.__version__}; {name}", flush=True)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    targets = torch.randint(0, 10, (batch_size,), generator=generator)
    torch.manual_seed(0)
    eager = {"naive": DenseNet(**config), "efficient": DenseNet(efficient=True, **config)}
    eager["efficient"].load_state_dict(eager["naive"].state_dict())
    models, compile_seconds = dict(eager), {}
    for impl, model in eager.items():
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        _training_step(compiled, inputs, targets)
        compile_seconds[impl] = time.perf_counter() - start
        print(f"compiled {impl}: first step (compilation) {compile_seconds[impl]:.0f} s",
              flush=True)
        models[f"compiled {impl}"] = compiled

    saved = {impl: saved_tensor_bytes(model, inputs) / 2**20 for impl, model in models.items()}
    counts = {}
    for impl, model in models.items():
        def one_step(model=model):
            _training_step(model, inputs, targets)

        one_step()
        counts[impl] = {"profiled": profiled_operator_count(one_step).total()}
        if not impl.startswith("compiled"):
            counts[impl]["dispatched"] = count_operators(one_step).total()
        print(f"{impl}: saved {saved[impl]:.1f} MiB, operators {counts[impl]}", flush=True)
    optimizer_counts = optimizer_step_counts(eager["naive"])
    print(f"SGD step over {len(list(eager['naive'].parameters()))} parameter tensors: "
          f"{optimizer_counts}", flush=True)
    times = time_training_steps(models, inputs, targets, repeats=repeats, warmup=1)
    for impl, t in times.items():
        print(f"{impl}: step {1e3 * t['step']:.0f} ms", flush=True)

    seeds = range(3 if quick else 30)
    accuracy = {}
    for label, study_config in [("DenseNet-BC L=40 k=12", depth_to_config(40, 12)),
                                ("DenseNet L=40 k=12", depth_to_config(40, 12, bc=False))]:
        accuracy[label] = gradient_accuracy(study_config, seeds, 4 if quick else 16,
                                            8 if quick else 32)
        print(f"{label}: median error naive {statistics.median(accuracy[label]['naive']):.2e}, "
              f"efficient {statistics.median(accuracy[label]['efficient']):.2e}", flush=True)

    text = tools_markdown(name, times, saved, counts, compile_seconds, optimizer_counts,
                          len(list(eager["naive"].parameters())), accuracy, len(seeds),
                          4 if quick else 16, 8 if quick else 32, time.time() - started, load)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tools-cpu-quick.md" if quick else "tools-cpu.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def tools_markdown(name, times, saved, counts, compile_seconds, optimizer_counts, num_params,
                   accuracy, num_seeds, study_batch, study_size, seconds, load):
    """results/tools-cpu.md: every figure of tools_main, with the machine and the command."""
    step = {impl: 1e3 * t["step"] for impl, t in times.items()}
    lines = [
        f"# PyTorch's tools on the CPU: {name}", "",
        f"Machine: {device_description(torch.device('cpu'))}, {torch.get_num_threads()} "
        f"torch thread(s), load average {load:.1f} when the run started (other jobs share the "
        "cores when it exceeds the thread count: times are then noisy, and the ratios, from "
        f"one interleaved run, are the figures to read); torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; `python benchmark.py {' '.join(sys.argv[1:])}` "
        f"({seconds:.0f} s). Compiled = "
        "`torch.compile(model, fullgraph=True)`, Inductor's CPU backend.", "",
        "## Training step (forward + backward), saved for backward, operators per step", "",
        "| implementation | step ms (median) | step vs eager efficient | step vs compiled naive |"
        " saved MiB | operators per step | first step s (compilation) |",
        "|---|---|---|---|---|---|---|"]
    for impl in times:
        count = counts[impl]
        ops = f"{count['profiled']}" if "dispatched" not in count else \
            f"{count['dispatched']} (profiler: {count['profiled']})"
        compile_time = compile_seconds.get(impl.removeprefix("compiled ")) \
            if impl.startswith("compiled") else None
        lines.append(
            f"| {impl} | {step[impl]:.0f} | {step[impl] / step['efficient']:.2f} | "
            f"{step[impl] / step['compiled naive']:.2f} | {saved[impl]:.1f} | {ops} | "
            f"{fmt(compile_time, 0)} |")
    lines += ["", "First step: compilation included; Inductor caches compiled code on disk, so a "
              "run after another compiles faster than a first run."]
    ratio = saved["compiled efficient"] / saved["efficient"]
    op_ratio = counts["efficient"]["dispatched"] / counts["naive"]["dispatched"]
    lines += [
        "", f"Saved for backward under compile: {ratio:.3f}x eager efficient (target: within 5%).",
        "Operators per step: forward + backward of one step, views and allocations not "
        "counted, a custom operator counted as the operators it runs (a proxy for GPU kernel "
        "launches). Eager: a TorchDispatchMode (measure.OperatorCounter); in parentheses the "
        "same rules applied to a profile (measure.profiled_operator_count), which is how the "
        "compiled steps are counted (one per Inductor kernel, plus the operators it calls).",
        f"Eager efficient dispatches {op_ratio:.2f}x the naive model's operators (target: at "
        "most 1.0x).", "",
        f"## Optimizer step ({num_params} parameter tensors, SGD momentum 0.9, Nesterov, weight "
        "decay 1e-4)", "",
        "| SGD implementation | operators per step |", "|---|---|"]
    for kind, count in optimizer_counts.items():
        label = "default (for-loop on a CPU)" if kind == "default" else f"{kind}=True"
        lines.append(f"| {label} | {count} |")
    lines += [
        "", f"## Gradient accuracy in float32 ({num_seeds} seeds, batch {study_batch}, "
        f"{study_size}x{study_size}, cross-entropy)", "",
        "Norm-relative error ||g32 - g64|| / ||g64|| of all parameter gradients, against the "
        "float64 naive model with the same weights and batch; each seed draws new weights and "
        "data.", "",
        "| network | median naive | median efficient | efficient / naive (target <= 2) | "
        "worst naive | worst efficient |", "|---|---|---|---|---|---|"]
    for label, errors in accuracy.items():
        median = {k: statistics.median(v) for k, v in errors.items()}
        lines.append(f"| {label} | {median['naive']:.2e} | {median['efficient']:.2e} | "
                     f"{median['efficient'] / median['naive']:.2f} | {max(errors['naive']):.2e} "
                     f"| {max(errors['efficient']):.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    fire.Fire(main)
