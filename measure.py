"""Measure what a training step costs: bytes saved for backward, peak CUDA memory, step time,
operators dispatched.

Pure torch; benchmark.py, demo.py and the tests build on these functions.
"""

import collections
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def saved_tensor_bytes(model, inputs, activations_only=False):
    """Bytes of the distinct storages autograd keeps for backward in one forward of ``model``.

    Parameters are counted like any other saved tensor, unless ``activations_only``: then the
    storages of the model's parameters and of ``inputs`` are left out (what models.memory
    predicts; a copy of the input made under autocast still counts). The forward runs in the
    model's current mode; the graph is freed before returning.
    """
    storages = {}
    excluded = set()
    if activations_only:
        excluded = {(t.untyped_storage().data_ptr(), t.device)
                    for t in [*model.parameters(), inputs]}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in excluded:
            storages[key] = max(storages.get(key, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs)
    del out
    return sum(storages.values())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(models, inputs, targets, repeats=10, warmup=2, autocast_dtype=None):
    """Median forward and backward seconds per model, interleaved so noise hits all alike.

    ``models`` maps a name to a module. Returns {name: {"forward": s, "backward": s, "step": s}},
    where "step" is the median of forward + backward per repetition.
    """
    loss_fn = torch.nn.CrossEntropyLoss()
    device = inputs.device
    times = {name: {"forward": [], "backward": [], "step": []} for name in models}
    for step in range(warmup + repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                loss = loss_fn(model(inputs), targets)
            _sync(device)
            middle = time.perf_counter()
            loss.backward()
            _sync(device)
            end = time.perf_counter()
            if step >= warmup:
                times[name]["forward"].append(middle - start)
                times[name]["backward"].append(end - middle)
                times[name]["step"].append(end - start)
    return {name: {part: statistics.median(values) for part, values in parts.items()}
            for name, parts in times.items()}


def peak_training_memory(model, inputs, targets, optimizer=None, autocast_dtype=None):
    """Peak CUDA bytes allocated during one full training step (forward, backward, step).

    The model, its gradients and optimizer state are counted: this is what the step needs.
    """
    device = inputs.device
    if device.type != "cuda":
        raise ValueError("peak_training_memory needs a CUDA device")
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        loss = loss_fn(model(inputs), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def cpu_peak_training_memory(model, inputs, targets, autocast_dtype=None):
    """Peak bytes of tensors alive during one CPU training step, as the CPU allocator sees them.

    The step is demo.py's (forward, zero_grad, backward, foreach SGD with Nesterov momentum and
    weight decay) in its steady state: the gradients and momentum of a previous step exist.
    Counts what exists before the step (parameters, gradients, momentum, buffers, the batch)
    plus the largest net allocation during it, read from the profiler's memory events (the CPU
    allocator reports every allocation to it). Run it in a fresh process for a clean figure.
    """
    from torch._C._profiler import _EventType

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4, foreach=True)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
        optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    existing = [*model.parameters(), *model.buffers(), inputs, targets,
                *(p.grad for p in model.parameters()),
                *(s["momentum_buffer"] for s in optimizer.state.values())]
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                  for t in existing}.values())
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profile:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        with torch.profiler.record_function("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    allocations, freed_at = [], []

    def walk(event):
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.total_allocated))
        elif event.name == "zero_grad":
            freed_at.append(event.start_time_ns)
        for child in event.children:
            walk(child)

    for root in profile.profiler.kineto_results.experimental_event_tree():
        walk(root)
    # The old gradients were allocated before profiling: the profiler does not see them freed.
    return before + max(total - (grads if time > freed_at[0] else 0)
                        for time, total in allocations)


def cpu_name():
    """The processor's model name, for naming the machine a figure was measured on."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Allocations launch no kernel; views only change metadata.
_ALLOCATIONS = frozenset(["empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"])


class OperatorCounter(TorchDispatchMode):
    """Counts the operators a piece of eager code dispatches: a proxy for GPU kernel launches.

    Views and allocations are not counted. A composite operator is counted as the operators it
    decomposes into, and a custom operator (``torch.library.custom_op``, e.g. ``densenet::``) as
    the operators its implementation dispatches: opaque to the counter it would count as one,
    however many kernels it launches. ``counts`` maps "namespace.op.overload" to a count;
    ``custom`` counts the custom operators seen.
    """

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.custom = collections.Counter()

    def total(self):
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if func.namespace not in ("aten", "prims"):
            key = torch._C.DispatchKey.CompositeExplicitAutograd
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                self.custom[str(func)] += 1
                with self:  # the implementation's operators are counted too
                    return func._op_dk(key, *args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(
                name, torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:
                return func.decompose(*args, **kwargs)
        if not func.is_view and func._overloadpacket.__name__ not in _ALLOCATIONS:
            self.counts[str(func)] += 1
        return func(*args, **kwargs)


def count_operators(step):
    """Run ``step()`` once and return the OperatorCounter that watched it."""
    with OperatorCounter() as counter:
        step()
    return counter


def _op_packet(name):
    namespace, _, op = name.partition("::")
    try:
        return getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return None


def _composite(packet):
    """Whether every overload of ``packet`` decomposes (CompositeImplicitAutograd)."""
    found = []
    for overload in packet.overloads():
        try:
            found.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                getattr(packet, overload).name(), torch._C.DispatchKey.CompositeImplicitAutograd))
        except RuntimeError:  # an overload the dispatcher does not know (TorchScript's own)
            pass
    return bool(found) and all(found)


def _is_view(packet):
    return any(getattr(packet, overload).is_view for overload in packet.overloads())


def profiled_operator_count(step):
    """The count of OperatorCounter, taken from a profile of ``step()``: works for compiled code.

    A TorchDispatchMode turns torch.compile off, so compiled steps are counted from the
    profiler's event tree with the same rules: the outermost non-composite operators (views and
    allocations excepted), the operators inside custom operators, and one per kernel Inductor
    generated (on a CPU its events exist only when the model was compiled with
    ``torch._inductor.config.cpp.enable_kernel_profile = True``).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counter = OperatorCounter()
    packets = {}

    def visit(event):
        name = event.name
        if name.startswith("graph_") and "_fused" in name:
            counter.counts["inductor kernel"] += 1
            return
        if "::" in name and not name.startswith(("aten::", "prims::")):
            if name not in packets:
                packets[name] = _op_packet(name)
            if packets[name] is not None:
                counter.custom[name] += 1
        elif name.startswith("aten::"):
            if name not in packets:
                packets[name] = _op_packet(name)
            packet = packets[name]
            if packet is not None and not _composite(packet):
                if not _is_view(packet) and name.partition("::")[2] not in _ALLOCATIONS:
                    counter.counts[name] += 1
                return
        for child in event.cpu_children:
            visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return counter
