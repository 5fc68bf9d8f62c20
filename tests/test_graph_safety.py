"""CUDA-graph safety of the efficient operators, checked on the CPU.

A CUDA graph (demo.py's --cuda_graph, torch.compile's "reduce-overhead") replays the addresses
it recorded. Whatever an operator allocates inside a call is allocated inside the capture too,
so the graph owns it; a tensor kept between calls is not, and a later call that replaced it
(a smaller batch takes wider channel slices) would leave the graph reading freed memory. So
the operators keep no tensor between calls. tests/test_cuda.py replays graphs on a GPU.
"""

import threading

import torch
import torch.nn.functional as F

from models import DenseNet
from models import efficient as efficient_ops

SMALL = dict(growth_rate=6, block_config=(3, 3), num_init_features=8, bn_size=2)


def tensors_kept_by(module):
    """{path: tensor} for every tensor reachable from the module's globals."""
    found = {}

    def visit(value, path, depth=0):
        if isinstance(value, torch.Tensor):
            found[path] = value
        elif depth < 4 and isinstance(value, dict):
            for key, inner in value.items():
                visit(inner, f"{path}[{key!r}]", depth + 1)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for index, inner in enumerate(value):
                visit(inner, f"{path}[{index}]", depth + 1)
        elif depth < 4 and isinstance(value, threading.local):
            visit(vars(value), path, depth + 1)

    for name, value in vars(module).items():
        visit(value, name)
    return found


def test_operators_keep_no_tensor_between_calls(monkeypatch):
    x = torch.randn(8, 3, 8, 8)
    # Slices of 5 channels at batch 8: a batch of 3 then takes slices of 13 channels.
    monkeypatch.setattr(efficient_ops, "CHUNK_BYTES", 5 * x[:, :1].nbytes)
    torch.manual_seed(0)
    model = DenseNet(efficient=True, recompute_bottleneck=True, **SMALL)
    for batch, training in [(8, True), (3, True), (3, False), (8, True)]:
        model.train(training)
        with torch.set_grad_enabled(training):
            logits = model(x[:batch])
        if training:
            F.cross_entropy(logits, torch.arange(batch)).backward()
        kept = tensors_kept_by(efficient_ops)
        assert not kept, {path: tuple(t.shape) for path, t in kept.items()}
