"""Measure what a training step costs: bytes saved for backward, peak CUDA memory, step time.

Pure torch; benchmark.py and the tests build on these functions.
"""

import statistics
import time

import torch


def saved_tensor_bytes(model, inputs):
    """Bytes of the distinct storages autograd keeps for backward in one forward of ``model``.

    Parameters are counted like any other saved tensor. The forward runs in the model's current
    mode; the graph is freed before returning.
    """
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        storages[key] = max(storages.get(key, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs)
    del out
    return sum(storages.values())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(models, inputs, targets, repeats=10, warmup=2):
    """Median forward+backward seconds per model, the models interleaved so noise hits all alike.

    ``models`` maps a name to a module; returns a dict of the same names.
    """
    loss_fn = torch.nn.CrossEntropyLoss()
    times = {name: [] for name in models}
    for step in range(warmup + repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            _sync(inputs.device)
            start = time.perf_counter()
            loss_fn(model(inputs), targets).backward()
            _sync(inputs.device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_training_memory(model, inputs, targets, optimizer=None):
    """Peak CUDA bytes allocated during one full training step (forward, backward, step)."""
    device = inputs.device
    if device.type != "cuda":
        raise ValueError("peak_training_memory needs a CUDA device")
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss_fn(model(inputs), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)
