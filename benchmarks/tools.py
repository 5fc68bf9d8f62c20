"""The figures of PyTorch's tools on the CPU: compiled against eager steps, saved bytes under
compile, operators per step and per optimizer step, float32 gradient accuracy."""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from measure import (
    count_operators,
    profiled_operator_count,
    saved_tensor_bytes,
    time_training_steps,
)
from models import DenseNet, depth_to_config

from .common import cpu_allocator, device_description, fmt


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


def run(out="results", repeats=None, quick=False):
    """Compiled and eager training steps, saved bytes, operator counts and gradient accuracy
    on the CPU, written to <out>/tools-cpu.md (benchmark.py --tools True).

    Step times are medians of forward + backward, the four implementations interleaved. The
    compiled models are compiled with Inductor's kernel profiling on, so that the profiler sees
    each generated kernel (measure.profiled_operator_count); it costs nothing when no profiler
    runs.
    """
    import torch._inductor.config

    torch._inductor.config.cpp.enable_kernel_profile = True
    started, load = time.time(), os.getloadavg()[0]
    allocator = cpu_allocator()
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
                          4 if quick else 16, 8 if quick else 32, time.time() - started, load,
                          allocator)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tools-cpu-quick.md" if quick else "tools-cpu.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def tools_markdown(name, times, saved, counts, compile_seconds, optimizer_counts, num_params,
                   accuracy, num_seeds, study_batch, study_size, seconds, load, allocator):
    """results/tools-cpu.md: every figure of run(), with the machine and the command."""
    step = {impl: 1e3 * t["step"] for impl, t in times.items()}
    lines = [
        f"# PyTorch's tools on the CPU: {name}", "",
        f"Machine: {device_description(torch.device('cpu'))}, {torch.get_num_threads()} "
        f"torch thread(s), {allocator}; load average {load:.1f} when the run started "
        "(other jobs share the cores when it exceeds the thread count: times are then noisy, "
        "and the ratios, from one interleaved run, are the figures to read); torch "
        f"{torch.__version__}; {time.strftime('%Y-%m-%d')}; "
        f"`python benchmark.py {' '.join(sys.argv[1:])}` "
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
