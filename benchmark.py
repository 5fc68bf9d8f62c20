"""Memory and speed of this project's DenseNets against torchvision's, on CPU or CUDA.

    python benchmark.py                       # every default configuration, on CUDA if present
    python benchmark.py --quick True          # a small run (under a minute on a CPU), as CI does
    python benchmark.py --profile imagenet    # torchvision's ImageNet DenseNets at 224 and 448 px
    python benchmark.py --acceptance True     # on a GPU: tests, memory, times, in 5 minutes
    python benchmark.py --search True --memory_budget 8GiB   # what trains in 8 GiB on a CPU
    python benchmark.py --check_model True    # the memory model against CPU measurements
    python benchmark.py --tools True          # torch.compile, operator counts, accuracy (CPU)
    python benchmark.py --allocator True      # CPU steps: glibc's default vs freed memory kept
    python benchmark.py --loader True         # folder loader vs decoding alone and torchvision

Writes into results/ unless --out is given (--quick: a temporary folder). The measurements
live in benchmarks/; this face checks the flags and picks one. Bad input ends with one line
"error: ..." on stderr and exit status 2.
"""

import os
import sys
import tempfile

from cli import check_flags, fail, quiet_interrupt

# Written True or False, or true/false, yes/no, 1/0 in any case (cli.py).
BOOLEAN_ARGS = ("quick", "amp", "search", "check_model", "tools", "allocator", "acceptance",
                "loader")


def main(quick=False, device="auto", out=None, repeats=None, amp=None, time_max_depth=None,
         cpu_max_gb=8.0, search=None, search_budget=None, memory_budget=None,
         check_model=False, tools=False, allocator=False, acceptance=False, profile=None,
         loader=False):
    """Benchmark naive, efficient and torchvision DenseNets; write CSV, markdown and plots.

    Writes into results/ (the committed reference figures) unless --out is given; --quick
    writes into a new temporary folder.

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
        acceptance: the GPU acceptance run (README: On a GPU; benchmarks/gpu_window.sh runs
            it on a bare machine): the CUDA tests, peak memory, step and epoch times, largest
            batch and deepest network within 5 minutes, into results/gpu-<gpu name>.md;
            without a GPU it says so and does nothing.
        profile: the configurations: full (default), quick, acceptance (BC-100 k=12, float32
            and bf16, and the search within 8GiB), or imagenet (torchvision's DenseNet-121,
            -161, -169 and -201 at 224 and 448 px, with the largest batch predicted for 16 and
            80 GiB GPUs).
        loader: only the folder loader's images/s at 224 px (and small images at their own size)
            against decoding alone and against torchvision's ImageFolder + DataLoader, on JPEGs
            written for it; writes folder-loader-cpu.md (with quick: folder-loader-cpu-quick.md).
    """
    for name, value in [("quick", quick), ("check_model", check_model), ("tools", tools),
                        ("allocator", allocator), ("acceptance", acceptance), ("loader", loader),
                        ("search", search), ("amp", amp)]:
        if not isinstance(value, bool) and (value is not None or name not in ("search", "amp")):
            fail(f"--{name} must be True or False (or true/false, yes/no, 1/0), got {value!r}")
    if out is not None:
        out = os.path.expanduser(str(out))
    device = training_device(device)
    # Imported only now, once the command line is checked: torch takes a second or more to load.
    from benchmarks import acceptance as gpu_acceptance
    from benchmarks import allocator as allocator_figures
    from benchmarks import compare, cpu_search, folder_loader, model_check
    from benchmarks import tools as tool_figures
    from training.errors import UsageError
    from training.plan import parse_budget

    profile = profile or ("quick" if quick else "full")
    if profile not in compare.PROFILES:
        fail(f"--profile must be one of {', '.join(compare.PROFILES)}, got {profile!r}")
    budgets = {}
    for name, value in [("search_budget", search_budget), ("memory_budget", memory_budget)]:
        try:
            budgets[name] = None if value is None else parse_budget(value, name)
        except UsageError as error:
            fail(error)
    if acceptance:
        gpu_acceptance.run(out or "results")
        return None
    if out is None:
        out = tempfile.mkdtemp(prefix="benchmark-quick-") if profile == "quick" else "results"
    # Nothing is returned: python-fire would print a returned value after the figures.
    if tools:
        tool_figures.run(out=out, repeats=repeats, quick=quick)
    elif allocator:
        allocator_figures.run(out=out, quick=quick)
    elif loader:
        folder_loader.run(out=out, quick=quick)
    elif check_model:
        model_check.check_memory_model(out)
    elif device.type == "cpu" and (search or memory_budget is not None):
        if not search or memory_budget is None:
            fail("on a CPU, --search True goes with --memory_budget (such as 8GiB)")
        cpu_search.cpu_search(budgets["memory_budget"], str(memory_budget), out)
    elif memory_budget is not None:
        fail("--memory_budget is the CPU search's; on CUDA use --search_budget")
    else:
        compare.run(profile, device, out, repeats=repeats, amp=amp,
                    time_max_depth=time_max_depth, cpu_max_gb=cpu_max_gb, search=search,
                    search_budget=budgets["search_budget"])
    return None


def training_device(device):
    """--device as a torch.device: auto, cpu, cuda or cuda:N; one line and exit 2 for a device
    that is not there."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(str(device))
    except (RuntimeError, ValueError):
        fail(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if chosen.type not in ("cpu", "cuda"):
        fail(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA GPU here (torch.cuda.is_available() is False); use "
             f"--device cpu")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        fail(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    return chosen


if __name__ == "__main__":
    with quiet_interrupt():
        import fire

        argv, _ = check_flags(main, sys.argv[1:], BOOLEAN_ARGS)
        fire.Fire(main, argv)
