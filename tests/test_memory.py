"""models/memory.py: predictions against measurements on the CPU.

Saved-for-backward bytes are measured with saved_tensors_hooks (measure.saved_tensor_bytes); the
peak of a training step with the CPU allocator's own accounting (measure.cpu_peak_training_memory:
tensors alive before the step plus the largest net allocation the profiler's memory events show
during it), each in a fresh process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from measure import saved_tensor_bytes
from models import DenseNet, depth_to_config, efficient, memory

ROOT = Path(__file__).resolve().parents[1]
DENSENET121 = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)


def build(mode, kwargs, small_inputs):
    """This project's model in a mode, or torchvision's memory_efficient one (CIFAR stem when
    small_inputs)."""
    if mode == "torchvision_memory_efficient":
        model = torchvision.models.DenseNet(
            growth_rate=kwargs["growth_rate"], block_config=kwargs["block_config"],
            num_init_features=kwargs["num_init_features"], bn_size=kwargs.get("bn_size", 4),
            drop_rate=kwargs.get("drop_rate", 0.0), num_classes=kwargs.get("num_classes", 1000),
            memory_efficient=True)
        if small_inputs:
            model.features.conv0 = torch.nn.Conv2d(3, kwargs["num_init_features"], 3, padding=1,
                                                   bias=False)
            del model.features.norm0, model.features.relu0, model.features.pool0
        return model
    return DenseNet(**kwargs, small_inputs=small_inputs, efficient=mode != "naive",
                    recompute_bottleneck=mode == "recompute_bottleneck")


def bc(depth, k, **extra):
    return {**depth_to_config(depth, k), **extra}


def plain(depth, k, **extra):
    return {**depth_to_config(depth, k, bc=False), **extra}


# (mode, DenseNet kwargs, small_inputs, batch, image size, amp): BC and plain, k 12 to 40,
# depth 40 to 250, batch 1 to 128, float32 and bf16, CIFAR and ImageNet stems, every mode.
SMALL_IMAGENET = dict(growth_rate=32, block_config=(2, 3, 4, 2), num_init_features=64)
SAVED_CASES = [
    ("efficient", bc(40, 12), True, 16, 32, "off"),
    ("naive", bc(100, 12), True, 2, 16, "bf16"),
    ("recompute_bottleneck", bc(250, 12), True, 1, 8, "off"),
    ("efficient", plain(40, 12), True, 4, 16, "bf16"),
    ("naive", plain(40, 12), True, 128, 4, "off"),
    ("efficient", bc(76, 40), True, 2, 8, "bf16"),
    ("recompute_bottleneck", bc(100, 24, drop_rate=0.2), True, 8, 8, "bf16"),
    ("efficient", dict(DENSENET121, num_classes=1000), False, 2, 32, "off"),
    ("naive", dict(growth_rate=16, block_config=(2, 4, 6, 4), num_init_features=32,
                   num_classes=100), False, 4, 64, "bf16"),
    ("torchvision_memory_efficient", bc(100, 12), True, 8, 16, "off"),
    ("torchvision_memory_efficient", dict(SMALL_IMAGENET, drop_rate=0.2, num_classes=1000),
     False, 2, 48, "bf16"),
    ("efficient", bc(160, 24, drop_rate=0.2), True, 1, 8, "off"),
    ("naive", bc(40, 40, drop_rate=0.2), True, 32, 8, "off"),
    ("recompute_bottleneck", dict(SMALL_IMAGENET, num_classes=10), False, 3, 48, "bf16"),
]


@pytest.mark.parametrize("mode, kwargs, small_inputs, batch, size, amp", SAVED_CASES)
def test_predicted_saved_bytes_are_within_3_percent(mode, kwargs, small_inputs, batch, size, amp):
    torch.manual_seed(0)
    model = build(mode, kwargs, small_inputs).train()
    inputs = torch.randn(batch, 3, size, size)
    # oneDNN would compile kernels for every shape (seconds); convolutions save the same tensors.
    previous, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp != "off"):
            measured = saved_tensor_bytes(model, inputs, activations_only=True)
    finally:
        torch.backends.mkldnn.enabled = previous
    net = memory.network(**kwargs, small_inputs=small_inputs, image_size=size)
    predicted = memory.saved_bytes(net, batch, mode, amp)
    assert abs(predicted - measured) <= 0.03 * measured, (predicted, measured)


# One training step per mode, each in a fresh process: the CPU allocator's peak.
PEAK_CASES = [
    dict(mode="efficient", depth=40, k=12, batch=16, amp="off", channels_last=False),
    dict(mode="recompute_bottleneck", depth=64, k=24, batch=4, amp="bf16", channels_last=False),
    dict(mode="naive", depth=40, k=12, batch=8, amp="off", channels_last=True),
    dict(mode="torchvision_memory_efficient", depth=40, k=16, batch=8, amp="bf16",
         channels_last=False),
    # Layers wider than CHUNK_BYTES (1 MiB here) work in slices of channels.
    dict(mode="efficient", depth=40, k=12, batch=16, amp="off", channels_last=False,
         chunk_bytes=2**20),
    dict(mode="recompute_bottleneck", depth=52, k=16, batch=16, amp="off", channels_last=True,
         chunk_bytes=2**20),
]
PEAK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
import models.efficient
from tests.test_memory import bc, build
from measure import cpu_peak_training_memory
case = json.loads(sys.argv[1])
models.efficient.CHUNK_BYTES = case.get("chunk_bytes", models.efficient.CHUNK_BYTES)
torch.manual_seed(0)
kwargs = bc(case["depth"], case["k"], num_classes=10)
layout = torch.channels_last if case["channels_last"] else torch.contiguous_format
model = build(case["mode"], kwargs, True).train().to(memory_format=layout)
inputs = torch.randn(case["batch"], 3, 32, 32).contiguous(memory_format=layout)
targets = torch.randint(0, 10, (case["batch"],))
dtype = torch.bfloat16 if case["amp"] == "bf16" else None
print(json.dumps(cpu_peak_training_memory(model, inputs, targets, autocast_dtype=dtype)))
"""


def _peak_id(case):
    return case["mode"] + (" chunked" if "chunk_bytes" in case else "")


@pytest.mark.parametrize("case", PEAK_CASES, ids=_peak_id)
def test_predicted_peak_of_a_cpu_training_step_is_within_15_percent(case, monkeypatch):
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT.format(root=str(ROOT)), json.dumps(case)], cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    net = memory.network(**bc(case["depth"], case["k"], num_classes=10))
    predicted = memory.peak_bytes(net, case["batch"], case["mode"], case["amp"],
                                  case["channels_last"])
    if "chunk_bytes" in case:  # the case does cut its layers, and the model knows it
        monkeypatch.setattr(efficient, "CHUNK_BYTES", case["chunk_bytes"])
        unchunked = predicted
        predicted = memory.peak_bytes(net, case["batch"], case["mode"], case["amp"],
                                      case["channels_last"])
        assert predicted < 0.95 * unchunked
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


@pytest.mark.parametrize("kwargs, small_inputs, size", [
    (bc(100, 12), True, 32), (plain(40, 12, compression=0.7), True, 32),
    (dict(DENSENET121, num_classes=1000), False, 224),
    (dict(growth_rate=6, block_config=(3, 1, 2, 2), num_init_features=9, bn_size=2,
          compression=0.7, num_classes=13), False, 37),
])
def test_parameters_and_macs_match_the_model(kwargs, small_inputs, size):
    model = DenseNet(**kwargs, small_inputs=small_inputs)
    net = memory.network(**kwargs, small_inputs=small_inputs, image_size=size)
    assert memory.parameters(net) == sum(p.numel() for p in model.parameters())
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        weight = module.weight
        macs += output.numel() // output.shape[0] * weight[0].numel()

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    assert memory.macs_per_image(net) == macs


def test_known_figures():
    assert memory.parameters(memory.network(**bc(100, 12))) == 769_162
    net121 = memory.network(**DENSENET121, num_classes=1000, small_inputs=False, image_size=224)
    assert memory.parameters(net121) == 7_978_856
    assert 2.8e9 < memory.macs_per_image(net121) < 2.9e9  # torchvision: 2.83 GFLOPS
    assert memory.state_bytes(net121) == 12 * 7_978_856


def test_modes_orders_and_scaling():
    net = memory.network(**bc(100, 12))
    saved = {mode: memory.saved_bytes(net, 64, mode) for mode in memory.MODES}
    assert saved["recompute_bottleneck"] < saved["efficient"] \
        < saved["torchvision_memory_efficient"] < saved["naive"]
    for mode in memory.MODES:
        peaks = [memory.peak_bytes(net, n, mode) for n in (16, 32, 64)]
        assert peaks[0] < peaks[1] < peaks[2]
        assert peaks[2] > memory.state_bytes(net) + saved[mode]
        assert memory.saved_bytes(net, 64, mode, "bf16") < saved[mode]
    assert memory.modes(memory.network(**plain(40, 12))) == ("naive", "efficient")


@pytest.mark.parametrize("kwargs, message", [
    (dict(growth_rate=0), "growth_rate"),
    (dict(block_config=()), "block_config"),
    (dict(compression=1.5), "compression"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(image_size=2, block_config=(1, 1, 1)), "too small"),
])
def test_network_refuses_what_densenet_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory.network(**kwargs)
    with pytest.raises(ValueError, match="needs bottleneck"):
        memory.saved_bytes(memory.network(**plain(40, 12)), 8, "recompute_bottleneck")
