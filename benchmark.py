"""Memory and speed of this project's DenseNets against torchvision's, on CPU or CUDA.

    python benchmark.py                       # every default configuration, on CUDA if present
    python benchmark.py --quick True          # a small run (under a minute on a CPU), as CI does
    python benchmark.py --acceptance True     # on a GPU: CUDA tests, benchmark, epoch times
    python benchmark.py --search True --memory_budget 8GiB   # what trains in 8 GiB on a CPU
    python benchmark.py --check_model True    # the memory model against CPU measurements
    python benchmark.py --tools True          # torch.compile, operator counts, accuracy (CPU)
    python benchmark.py --allocator True      # CPU steps: glibc's default vs freed memory kept
    python benchmark.py --loader True         # folder loader vs decoding alone and torchvision

The measurements live in benchmarks/; this face checks the flags and picks one.
"""

import tempfile

import fire
import torch

from benchmarks import acceptance as gpu_acceptance
from benchmarks import allocator as allocator_figures
from benchmarks import compare, cpu_search, folder_loader, model_check
from benchmarks import tools as tool_figures

PROFILES = tuple(compare.PROFILES)


def main(quick=False, device="auto", out=None, repeats=None, amp=None, time_max_depth=None,
         cpu_max_gb=8.0, search=None, search_budget=None, memory_budget=None,
         check_model=False, tools=False, allocator=False, acceptance=False, profile=None,
         loader=False):
    """Benchmark naive, efficient and torchvision DenseNets; write CSV, markdown and plots.

    Args:
        quick: a small run (saved bytes at BC-40 and BC-100, times at BC-40, batch 32) that
            finishes within a minute on a CPU; the same as --profile quick.
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        out: folder for the figures; default results/, or with quick a new temporary folder
            (quick figures are a check, not results).
        repeats: timed repetitions per implementation (median reported); default 5 on CPU,
            10 on CUDA, 2 with quick.
        amp: also measure under bf16 autocast; default True on CUDA, False on CPU.
        time_max_depth: time only configurations up to this depth; default 100 on CPU (deeper
            steps take minutes there), 40 with quick, unlimited on CUDA.
        cpu_max_gb: on CPU, skip configurations whose naive model would save more than this
            (a forward takes about twice that).
        search: find the largest batch (BC-100 k=12) and the deepest network (k=12, batch 64)
            each implementation trains, by real steps starting at the planner's prediction;
            default True on CUDA without quick. On a CPU it needs --memory_budget (and then
            also finds the largest growth rate at depth 100; an hour or more: writes
            memory-search-cpu.md).
        search_budget: on CUDA, the memory the search may use, such as 8GiB (default: the
            whole GPU; 8GiB with --profile acceptance).
        memory_budget: the CPU search's budget, such as 8GiB (an address-space limit).
        check_model: only compare models/memory.py's predicted saved bytes and CPU peak with
            measurements (a fresh process per case); writes memory-model-cpu.md.
        tools: only the figures of PyTorch's tools on the CPU: compiled against eager steps,
            saved bytes under torch.compile, operators per step and per optimizer step, float32
            gradient accuracy; writes tools-cpu.md (with quick, a tiny model: tools-cpu-quick.md).
        allocator: only CPU steps with glibc's default allocator against freed memory kept (as
            demo.py does on a CPU), each model in fresh processes; writes cpu-allocator.md.
        acceptance: the GPU acceptance run (README: On a GPU): every CUDA test, the benchmark's
            acceptance profile, demo.py's epoch times, into results/gpu-<gpu name>.md; without
            a GPU it says so and does nothing.
        profile: the configurations: full (default), quick, or acceptance (BC-100 k=12, float32
            and bf16, and the search within 8GiB: the benchmark part of --acceptance True).
        loader: only the folder loader's images/s at 224 px against decoding alone and against
            torchvision's ImageFolder + DataLoader, on JPEGs written for it; writes
            folder-loader-cpu.md (with quick, fewer images: folder-loader-cpu-quick.md).
    """
    from training.errors import UsageError
    from training.plan import parse_budget

    for name, value in [("quick", quick), ("check_model", check_model), ("tools", tools),
                        ("allocator", allocator), ("acceptance", acceptance),
                        ("loader", loader)]:
        if not isinstance(value, bool):
            raise SystemExit(f"error: --{name} must be True or False, got {value!r}")
    if search is not None and not isinstance(search, bool):
        raise SystemExit(f"error: --search must be True or False, got {search!r}")
    profile = profile or ("quick" if quick else "full")
    if profile not in PROFILES:
        raise SystemExit(f"error: --profile must be one of {', '.join(PROFILES)}, "
                         f"got {profile!r}")
    budgets = {}
    for name, value in [("search_budget", search_budget), ("memory_budget", memory_budget)]:
        try:
            budgets[name] = None if value is None else parse_budget(value, name)
        except UsageError as error:
            raise SystemExit(f"error: {error}") from None
    if acceptance:
        gpu_acceptance.run(out or "results")
        return None
    if out is None:
        out = tempfile.mkdtemp(prefix="benchmark-quick-") if profile == "quick" else "results"
    if tools:
        return tool_figures.run(out=out, repeats=repeats, quick=quick)
    if allocator:
        return allocator_figures.run(out=out, quick=quick)
    if loader:
        return folder_loader.run(out=out, quick=quick)
    if check_model:
        return model_check.check_memory_model(out)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if device.type == "cpu" and (search or memory_budget is not None):
        if not search or memory_budget is None:
            raise SystemExit("error: on a CPU, --search True goes with --memory_budget (such "
                             "as 8GiB)")
        return cpu_search.cpu_search(budgets["memory_budget"], str(memory_budget), out)
    if memory_budget is not None:
        raise SystemExit("error: --memory_budget is the CPU search's; on CUDA use "
                         "--search_budget")
    compare.run(profile, device, out, repeats=repeats, amp=amp, time_max_depth=time_max_depth,
                cpu_max_gb=cpu_max_gb, search=search, search_budget=budgets["search_budget"])
    return None


if __name__ == "__main__":
    fire.Fire(main)
