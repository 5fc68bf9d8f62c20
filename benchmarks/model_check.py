"""models/memory.py against measurements on a CPU: saved bytes and the peak of a step."""

import os
import sys
import time

import torch

from measure import cpu_name, saved_tensor_bytes
from models import depth_to_config, memory

from .common import LABELS, PLAN_MODES, batch, build, run_in_fresh_process


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
        saved, peak = run_in_fresh_process(_model_check_worker, case)
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
