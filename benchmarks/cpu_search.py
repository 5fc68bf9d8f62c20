"""What really trains within a memory budget on a CPU, against the planner's answer.

Each probe is one real training step in a fresh process whose address space is limited
(RLIMIT_AS) to its baseline plus the budget; the search starts at the planner's prediction.
"""

import gc
import json
import os
import sys
import time

import torch

from measure import cpu_name
from models import depth_to_config, efficient

from .common import LABELS, PLAN_MODES, batch, bc_config, build, run_in_fresh_process, search_near

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


def _probe(impl, config, budget, record):
    """Whether a real training step of ``config`` fits ``budget`` (a fresh process); prints.

    ``record`` maps earlier probes of this search (also of an interrupted run) to outcomes."""
    key = f"{impl} {config['name']} batch {config['batch_size']} budget {budget}"
    if key in record:
        fits, seconds, note = record[key]
        note = "from an earlier run" + (f"; {note}" if note else "")
    else:
        result = run_in_fresh_process(_limited_step_worker, impl, config, budget)
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
    # A record of another torch, machine, environment or chunk size is not reused.
    record = _Record(os.path.join(out, "memory-search-cpu.json"),
                     f"torch {torch.__version__}; {machine}; {SEARCH_ENV}; "
                     f"CHUNK_BYTES {efficient.CHUNK_BYTES}")
    reference = dict(depth_to_config(100, 12), num_classes=10, small_inputs=True,
                     image_size=32, drop_rate=0.0)
    predicted = {impl: (deepest(reference, True, 64, PLAN_MODES[impl], budget, device="cpu"),
                        largest_growth_rate(reference, True, 64, PLAN_MODES[impl], budget,
                                            device="cpu"))
                 for impl in SEARCH_IMPLS}
    found = {}
    # Growth rates at depth 100 first: their probes take minutes, the deepest networks' up to
    # hours, so an interrupted search has answered the most it could.
    questions = [("growth", impl) for impl in SEARCH_IMPLS] + \
        [("depth", impl) for impl in SEARCH_IMPLS]
    saved_env = {key: os.environ.get(key) for key in SEARCH_ENV}
    os.environ.update(SEARCH_ENV)  # read by the child processes as they start
    try:
        for question, impl in questions:
            depth, width = predicted[impl]
            if question == "depth":
                print(f"{LABELS[impl]}: predicted deepest BC-{depth}", flush=True)
                found[question, impl] = search_near(
                    lambda n, impl=impl: _probe(impl, bc_config(6 * n + 4, 12), budget, record),
                    (depth - 4) // 6, 4096)
            else:
                print(f"{LABELS[impl]}: predicted largest k {width} at depth 100", flush=True)
                found[question, impl] = search_near(
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
             "(see SEARCH_ENV in benchmarks/cpu_search.py). The search starts at the prediction "
             "and stops within 2%: \"BC-1300 (not BC-1306)\" means BC-1300 trained and BC-1306 "
             "did not. Every probe is in memory-search-cpu.json.", "",
             "| implementation | deepest DenseNet-BC k=12, batch 64: predicted | measured | "
             "largest k at depth 100, batch 64: predicted | measured |", "|---|---|---|---|---|"]
    for impl, (depth, width) in predicted.items():
        lines.append(f"| {LABELS[impl]} | BC-{depth} | "
                     f"{measured('depth', impl, lambda n: f'BC-{6 * n + 4}')} | k={width} | "
                     f"{measured('growth', impl, lambda k: f'k={k}')} |")
    lines.append("")
    for impl in ("efficient", "recompute"):
        for question, index, what, value in [
                ("depth", 0, "Deepest network", lambda n: 6 * n + 4),
                ("growth", 1, "Largest growth rate", lambda k: k)]:
            ratio = f"{predicted[impl][index] / predicted['torchvision_me'][index]:.2f}x"
            low, reference = (found.get((question, i), (0,))[0] for i in (impl, "torchvision_me"))
            ratio += f", measured {value(low) / value(reference):.2f}x" \
                if low and reference else " (not yet measured)"
            lines.append(f"- {what}, {LABELS[impl]} / torchvision memory_efficient: "
                         f"predicted {ratio}.")
    path = os.path.join(out, "memory-search-cpu.md")
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)
