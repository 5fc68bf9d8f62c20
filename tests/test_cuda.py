"""CUDA paths of the models (issue 8): every test is marked ``cuda`` and is skipped, with its
reason, where no CUDA device is available.

    python -m pytest -q -m cuda tests/test_cuda.py     # on a GPU machine (1-2 minutes on one H100)

On the GPU they check that a training step of the efficient model equals the naive one's (float64
tightly; float32 without TF32, bf16 and fp16 autocast against the float64 result), with and without
channels_last, with recompute_bottleneck, dropout and plain DenseNet; that 50 training steps of
DenseNet-BC-40 lower the loss for every implementation, AMP mode and memory format, and that the
fp16 gradient scaler skips overflowing steps without touching the weights; DataParallel over every
visible GPU; torch.compile; a whole training step captured in a CUDA graph; and the peak training
memory of each implementation, each in a fresh process.

Developer switch: with ``DENSENET_CUDA_TESTS_ON_CPU=1`` the tests run on the CPU wherever their
logic can (to debug them on a machine without a GPU); the ones that need CUDA itself (CUDA graphs,
DataParallel over GPUs, peak CUDA memory) are skipped with the reason, fp16 training runs are
skipped (fp16 convolutions take seconds each on a CPU), and the 50-step runs use 8x8 images.

Figures for the acceptance report: with ``DENSENET_GPU_REPORT_DIR`` set, the measuring tests write
``<dir>/<name>.json``: {"name", "device", "torch", "cuda", "figures"}, where "figures" is
- peak_memory: {"config", "batch_size", "amp", "peak_mib": {implementation: MiB}, ...ratios};
- cuda_graph_step: {"config", "batch_size", "eager_ms", "graph_ms", "speedup", ...}.
The same figures are printed (``-s`` shows them) and attached with ``record_property`` (JUnit XML).
"""

import contextlib
import copy
import json
import math
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from test_models import assert_same_step, make_pair, rel_err, training_step

from benchmarks.common import bc_config, build, run_in_fresh_process
from benchmarks.compare import _peak_worker
from measure import cpu_name
from models import DenseNet
from models import efficient as efficient_ops
from training.build import make_optimizer
from training.devices import Autocast
from training.step import WARMUP_STEPS, EagerStep, GraphedStep

if os.environ.get("DENSENET_CUDA_TESTS_ON_CPU") == "1":
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    DEVICE = None
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (torch.cuda.is_available() is "
                       "False); DENSENET_CUDA_TESTS_ON_CPU=1 runs what can run on a CPU"),
]


def needs_cuda(what):
    return pytest.mark.skipif(not ON_CUDA, reason=f"needs a CUDA device: {what}")


AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SMALL = dict(growth_rate=6, block_config=(3, 3), num_init_features=8, bn_size=2)


def autocast(amp):
    return torch.autocast(DEVICE.type, dtype=AMP[amp] or torch.bfloat16, enabled=amp != "off")


@pytest.fixture
def exact_float32():
    """float32 convolutions and matmuls in full precision (no TF32) during the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def report(name, figures, record_property):
    """Print the figures, attach them to the test, and write them for the acceptance report."""
    record_property(name, json.dumps(figures))
    print(f"\n{name}: {json.dumps(figures)}")
    folder = os.environ.get("DENSENET_GPU_REPORT_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        device = torch.cuda.get_device_name(DEVICE) if ON_CUDA else cpu_name()
        payload = dict(name=name, device=device, torch=torch.__version__, cuda=torch.version.cuda,
                       figures=figures)
        with open(os.path.join(folder, f"{name}.json"), "w") as file:
            json.dump(payload, file, indent=2)


def fake_batches(steps, batch_size, size, seed=0):
    """Random images whose per-channel means depend on the class: a signal learnt in few steps."""
    generator = torch.Generator().manual_seed(seed)
    means = 0.3 * torch.randn(10, 3, 1, 1, generator=generator)
    labels = torch.randint(0, 10, (steps, batch_size), generator=generator)
    images = means[labels] + torch.randn(steps, batch_size, 3, size, size, generator=generator)
    return images.to(DEVICE), labels.to(DEVICE)


# --- 1. efficient == naive in a training step ------------------------------------------------

def run_step(model, x, amp="off", seed=1):
    """training_step of test_models.py with the forward under autocast and the backward outside
    it, as in training; the loss is taken in float32 (float64 for float64 models).

    Returns ({quantity: tensor}, {buffer: num_batches_tracked}).
    """
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with autocast(amp):
        logits = model(x)
    out = logits.to(torch.promote_types(x.dtype, torch.float32))
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    (out * weights.view_as(out)).sum().add(out.square().mean()).backward()
    quantities = {"logits": logits.detach(), "input grad": x.grad}
    quantities.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    counts = {}
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            counts[name] = buffer.item()
        else:
            quantities[name] = buffer.detach().clone()
    return quantities, counts


def norm_err(a, b):
    """||a - b|| / ||b||: norm-wise, so that a ReLU that flips at one element moves it little."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def dropout_masks(record=None, replay=None):
    """F.dropout that records the masks it draws, or applies recorded ones in any dtype.

    The float64 reference needs the masks of the run it is compared with: on CUDA the dropout
    kernel maps its random numbers to elements by dtype (vectorised by 16 bytes), so float64 and
    bf16 draw different masks from the same seed.
    """
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return original(input, p, training, inplace)
        if replay is not None:
            return input * replay.pop(0).to(input.dtype) / (1 - p)
        out = original(input, p, training, inplace)
        record.append(out != 0)  # a conv output of exactly 0 is too rare to matter
        return out

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


VARIANTS = {
    "bc": {},
    "recompute": dict(recompute_bottleneck=True),
    "dropout": dict(drop_rate=0.2),  # 1 / 0.8 is exact in every dtype
    "plain": dict(bn_size=None),
}

# How the reduced-precision tolerances were chosen. Each quantity's error is ||q - q64|| / ||q64||
# against the naive model in float64 on the same weights, input and dropout masks. Two things
# dominate it: rounding, and ReLUs whose input is so close to 0 that the rounding flips them. The
# flips are rare, random and large (one can move a gradient by 1e-3 in float32), so a ratio of two
# errors is only stable where flips are either absent (float32 on a small input: 8 x 16 x 16) or
# many (bf16 and fp16 on a large one: 32 x 32 x 32). On those inputs, over 144 float32, 32 bf16 and
# 32 fp16 CPU trials (seeds x the four variants x both memory formats), the efficient model's error
# on every quantity stayed below 3 x naive's error on it + 1.91 x the median of naive's errors
# (float32; bf16: + 0.01; fp16: + 0.47), and the median of its errors below 1.44 x naive's. Hence
# C = 3 and FLOOR = 5 x that median (a margin of 2.6 over the worst trial), and MEDIAN_RATIO = 2.5.
# A wrong mask, layout or dtype moves errors to order 1, far beyond these bounds.
C, FLOOR, MEDIAN_RATIO = 3.0, 5.0, 2.5
INPUT_SHAPE = {"float32": (8, 3, 16, 16), "bf16": (32, 3, 32, 32), "fp16": (32, 3, 32, 32)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["float64", "float32", "bf16", "fp16"])
def test_efficient_matches_naive_training_step(precision, channels_last, variant, exact_float32):
    kwargs = dict(SMALL, **VARIANTS[variant])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if precision == "float64":
        naive, efficient = make_pair(torch.float64, **kwargs)
        for model in (naive, efficient):
            model.to(DEVICE, memory_format=memory_format)
        x = torch.randn(8, 3, 16, 16, dtype=torch.float64, device=DEVICE)
        assert_same_step(naive, efficient, x.contiguous(memory_format=memory_format), 1e-10)
        return

    amp = "off" if precision == "float32" else precision
    naive, efficient = make_pair(torch.float32, **kwargs)
    reference = copy.deepcopy(naive).double()
    for model in (naive, efficient, reference):
        model.to(DEVICE, memory_format=memory_format)
    x = torch.randn(*INPUT_SHAPE[precision], generator=torch.Generator().manual_seed(0))
    x = x.to(DEVICE).contiguous(memory_format=memory_format)

    masks = []
    with dropout_masks(record=masks):
        low, counts_naive = run_step(naive, x, amp)
    with dropout_masks(replay=masks):
        ref, _ = run_step(reference, x.double())
    assert not masks, "the reference must use every recorded dropout mask"
    out, counts = run_step(efficient, x, amp)

    assert counts == counts_naive and set(counts.values()) == {1}, counts
    assert out.keys() == ref.keys()
    expected_dtype = torch.float32 if amp == "off" else AMP[amp]
    assert out["logits"].dtype == low["logits"].dtype == expected_dtype
    assert all(out[n].dtype == t.dtype for n, t in low.items() if n.startswith("grad"))
    naive_err = {n: norm_err(low[n], ref[n]) for n in ref}
    eff_err = {n: norm_err(out[n], ref[n]) for n in ref}
    scale = statistics.median(naive_err.values())
    assert scale > 0, "the naive model must differ from its float64 result at this precision"
    too_far = {n: (f"{eff_err[n]:.3g}", f"{naive_err[n]:.3g}") for n in ref
               if not eff_err[n] <= C * naive_err[n] + FLOOR * scale}
    assert not too_far, (f"efficient vs naive error (median naive error {scale:.3g}): {too_far}")
    assert statistics.median(eff_err.values()) <= MEDIAN_RATIO * scale


@pytest.mark.parametrize("variant", ["bc", "recompute", "plain"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_layers_in_channel_chunks_match_naive(dtype, channels_last, variant, exact_float32,
                                              monkeypatch):
    # Slices of 5 channels in the first block: layers and readers cut their work into chunks
    # (strided buffer slices and weight slices into cuDNN), as deep networks do.
    x = torch.randn(8, 3, 16, 16, dtype=dtype, device=DEVICE)
    monkeypatch.setattr(efficient_ops, "CHUNK_BYTES", 5 * x[:, :1].nbytes)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    naive, efficient = make_pair(dtype, **dict(SMALL, **VARIANTS[variant]))
    for model in (naive, efficient):
        model.to(DEVICE, memory_format=memory_format)
    assert len(efficient_ops._chunks(x.new_empty(8, 12, 16, 16), 12)) == 3
    assert_same_step(naive, efficient, x.contiguous(memory_format=memory_format),
                     1e-10 if dtype == torch.float64 else 1e-4)


# --- 2. 50 training steps, and the fp16 gradient scaler --------------------------------------

def train(model, images, labels, amp, channels_last):
    """SGD steps as demo.py takes them; returns the losses and the gradient scaler."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp == "fp16")
    losses = []
    for x, y in zip(images, labels, strict=True):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach().float())
    return torch.stack(losses).tolist(), scaler


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("impl", ["naive", "efficient", "recompute"])
def test_fifty_training_steps_lower_the_loss(impl, amp, channels_last):
    if DEVICE.type == "cpu" and amp == "fp16":
        pytest.skip("fp16 convolutions take seconds each on a CPU; this runs on CUDA only")
    size = 32 if ON_CUDA else 8
    images, labels = fake_batches(50, 32, size)
    torch.manual_seed(0)
    model = build(impl, bc_config(40, 12)).to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    losses, scaler = train(model, images, labels, amp, channels_last)
    assert all(math.isfinite(loss) for loss in losses), losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # The signal is learnt within 50 steps: at 8x8 the loss falls to 0.42x on a CPU, at 32x32 to
    # 0.09x (mean of the last 10 steps over the first 10).
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}: {[round(v, 3) for v in losses]}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if amp == "fp16":
        assert scaler.get_scale() >= 1.0


def snapshot(model, optimizer):
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"momentum of {n}": optimizer.state[p]["momentum_buffer"].clone()
                  for n, p in model.named_parameters()})
    return state


@pytest.mark.parametrize("impl", ["naive", "efficient"])
def test_grad_scaler_skips_overflowing_fp16_steps(impl):
    torch.manual_seed(0)
    model = DenseNet(efficient=impl == "efficient", **SMALL).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    x = torch.randn(8, 3, 16, 16, device=DEVICE)
    y = torch.arange(8, device=DEVICE) % 10

    def step(inject_inf=False):
        with autocast("fp16"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if inject_inf:
            model.classifier.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()

    step()  # a normal step, which also creates the momentum buffers
    assert scaler.get_scale() == 2.0**8, "the first step must not overflow"
    for cause in ("scale so large that fp16 gradients overflow", "inf injected into a gradient"):
        # 2**40 times the loss's gradient overflows fp16 as soon as it reaches the fp16 logits.
        scaler.update(new_scale=2.0**40 if cause.startswith("scale") else 2.0**8)
        scale = scaler.get_scale()
        before = snapshot(model, optimizer)
        step(inject_inf=cause.startswith("inf"))
        assert scaler.get_scale() == scale / 2, cause
        after = snapshot(model, optimizer)
        changed = [n for n in before if not torch.equal(after[n], before[n])]
        assert not changed, f"{cause}: a skipped step changed {changed}"
        assert all(torch.isfinite(b).all() for b in model.buffers()), cause
    before = snapshot(model, optimizer)
    step()
    assert scaler.get_scale() == 2.0**7
    after = snapshot(model, optimizer)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])


# --- 3. DataParallel ---------------------------------------------------------------------------

@needs_cuda("DataParallel over GPUs")
def test_data_parallel_matches_naive_and_updates_statistics_once():
    ids = list(range(torch.cuda.device_count()))
    naive, efficient = make_pair(torch.float64, **SMALL)
    single = copy.deepcopy(naive).to(DEVICE)
    x = torch.randn(4 * len(ids), 3, 16, 16, dtype=torch.float64, device=DEVICE)
    wrapped_naive = torch.nn.DataParallel(naive.to(DEVICE), device_ids=ids)
    wrapped = torch.nn.DataParallel(efficient.to(DEVICE), device_ids=ids)
    # Logits, input and parameter gradients, running statistics, num_batches_tracked == 1.
    assert_same_step(wrapped_naive, wrapped, x, 1e-10)
    # The statistics are those of one update with the first replica's share of the batch (the
    # replica on device_ids[0] shares the module's buffers; the others update copies).
    training_step(single, x.chunk(len(ids))[0])
    for (name, expected), actual in zip(single.named_buffers(), efficient.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert actual.item() == expected.item() == 1, name
        else:
            assert rel_err(actual, expected) < 1e-10, name


@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2,
                    reason="needs 2 or more CUDA devices: DataParallel runs replicas in threads "
                           "only then")
def test_data_parallel_keeps_the_bf16_autocast_dtype():
    # Autocast's dtype is thread-local; DataParallel's replica threads re-enter autocast without
    # it (fp16), so training.devices.wrap has each replica enter --amp's autocast itself.
    torch.manual_seed(0)
    model = DenseNet(efficient=True, **SMALL).to(DEVICE)
    x = torch.randn(4 * torch.cuda.device_count(), 3, 16, 16, device=DEVICE)
    with autocast("bf16"):
        plain = torch.nn.DataParallel(model)(x)
        wrapped = torch.nn.DataParallel(Autocast(model, "bf16"))(x)
    assert wrapped.dtype == torch.bfloat16, f"replicas ran in {wrapped.dtype}, not bfloat16"
    if plain.dtype != torch.bfloat16:  # what the wrapper is for; tell when torch fixes it
        print(f"plain DataParallel ran the replicas in {plain.dtype}")


# --- 4. peak training memory -------------------------------------------------------------------

@needs_cuda("peak memory is torch.cuda.max_memory_allocated")
def test_peak_training_memory_efficient_below_checkpointing_below_naive(record_property):
    config = bc_config(100, 12, batch_size=64)
    impls = ("naive", "torchvision_me", "efficient", "recompute")
    peaks = {impl: run_in_fresh_process(_peak_worker, impl, config, str(DEVICE), False)
             for impl in impls}
    figures = dict(config=config["name"], batch_size=config["batch_size"], amp="off",
                   peak_mib={impl: peaks[impl] and round(peaks[impl], 1) for impl in impls})
    if all(peaks.values()):
        figures.update(efficient_vs_torchvision_me=round(peaks["efficient"]
                                                         / peaks["torchvision_me"], 3),
                       efficient_vs_naive=round(peaks["efficient"] / peaks["naive"], 3))
    report("peak_memory", figures, record_property)
    assert all(peaks.values()), f"a training step did not fit or its process died: {peaks}"
    assert peaks["efficient"] < peaks["torchvision_me"] < peaks["naive"], peaks
    assert peaks["recompute"] < peaks["efficient"], peaks


# --- 5. torch.compile --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["naive", "efficient"])
def test_torch_compile_fullgraph_matches_eager(impl, exact_float32):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DenseNet(efficient=impl == "efficient", **SMALL).to(DEVICE)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(8, 3, 16, 16, device=DEVICE)
    ref, ref_counts = run_step(model, x)
    out, counts = run_step(compiled, x)
    out = {n.replace("_orig_mod.", ""): t for n, t in out.items()}
    assert out.keys() == ref.keys() and list(counts.values()) == list(ref_counts.values())
    errors = {n: norm_err(out[n], ref[n]) for n in ref}
    assert max(errors.values()) < 1e-4, {n: e for n, e in errors.items() if e >= 1e-4}
    model.eval()
    compiled_model.eval()
    with torch.no_grad():
        assert norm_err(compiled(x), model(x)) < 1e-5


# --- 6. a whole training step in a CUDA graph ---------------------------------------------------

@needs_cuda("CUDA graphs")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graph_training_step_matches_eager(exact_float32, record_property, amp):
    """demo.py's --cuda_graph step (training.step.GraphedStep: forward, backward and fused SGD of
    the efficient BC-100 captured once after warm-up steps on a side stream, then replayed)
    against the same steps run eagerly."""
    config = bc_config(100, 12, batch_size=64)
    steps, timed = 8, 10
    images, labels = fake_batches(steps, 64, 32)
    torch.manual_seed(0)
    graphed_model = build("efficient", config).to(DEVICE)
    eager_model = copy.deepcopy(graphed_model)
    run_config = {"lr": 0.05, "momentum": 0.9, "wd": 1e-4, "amp": amp, "cuda_graph": True}

    def step_of(model, graphed):
        optimizer = make_optimizer({**run_config, "cuda_graph": graphed}, model, DEVICE)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        eager = EagerStep(model, optimizer, scaler, amp, DEVICE)
        return GraphedStep(eager) if graphed else eager

    graphed, eager = step_of(graphed_model, True), step_of(eager_model, False)

    def replay(i):
        return graphed(images[i], labels[i])[0].clone()

    def eager_step(i):
        return eager(images[i], labels[i])[0]

    graph_losses = torch.stack([replay(i) for i in range(steps)])
    eager_losses = torch.stack([eager_step(i) for i in range(steps)])
    assert graphed.graph is not None and graphed.steps == WARMUP_STEPS
    tolerance = 1e-4 if amp == "off" else 2e-2
    assert torch.isfinite(graph_losses).all()
    assert norm_err(graph_losses, eager_losses) < tolerance, (graph_losses, eager_losses)
    for (name, p), q in zip(graphed_model.named_parameters(), eager_model.parameters(),
                            strict=True):
        assert norm_err(p, q) < tolerance, name
    for (name, b), c in zip(graphed_model.named_buffers(), eager_model.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert b.item() == c.item() == steps, name
        else:
            assert norm_err(b, c) < tolerance, name

    def seconds_per_step(run):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(timed):
            run(i % len(images))
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / timed

    rounds = [(seconds_per_step(eager_step), seconds_per_step(replay)) for _ in range(3)]
    eager_ms = 1e3 * statistics.median(r[0] for r in rounds)
    graph_ms = 1e3 * statistics.median(r[1] for r in rounds)
    figures = dict(config=config["name"], batch_size=config["batch_size"], impl="efficient",
                   amp=amp, tf32="off", optimizer="SGD fused", eager_ms=round(eager_ms, 2),
                   graph_ms=round(graph_ms, 2), speedup=round(eager_ms / graph_ms, 2),
                   steps_timed=f"median of 3 rounds of {timed}")
    report(f"cuda_graph_step_{amp}", figures, record_property)


# --- 7. CUDA graphs after a smaller batch and evaluation ----------------------------------------
# A graph replays the addresses it recorded. A smaller batch takes wider channel slices in a
# chunked layer, and evaluation other shapes: whatever those allocate must leave the graph's
# memory alone (models/efficient.py keeps no tensor between calls). Slices of 5 channels at
# batch 8 make the small model's layers work in chunks, as a very deep network's do.

def chunked(monkeypatch, x):
    monkeypatch.setattr(efficient_ops, "CHUNK_BYTES", 5 * x[:, :1].nbytes)


def scribble():
    """Allocate and fill small blocks, so that a replay reading freed memory reads garbage."""
    return [torch.full((n,), float("nan"), device=DEVICE) for n in range(64, 4096, 16)]


# (batch size, training) in order: captured steps, a smaller last batch run eagerly,
# evaluation at both sizes, then more replays of the captured step.
SCHEDULE = [(8, True)] * 5 + [(5, True), (5, False), (8, False)] + [(8, True)] * 3


def schedule_data():
    images, labels = fake_batches(len(SCHEDULE), 8, 16, seed=3)
    return [(x[:n], y[:n], training) for (n, training), x, y in zip(SCHEDULE, images, labels,
                                                                       strict=True)]


@needs_cuda("CUDA graphs")
def test_captured_step_replays_right_after_a_smaller_batch_and_evaluation(exact_float32,
                                                                          monkeypatch):
    """demo.py's --cuda_graph step (GraphedStep) against the same steps run eagerly."""
    data = schedule_data()
    chunked(monkeypatch, data[0][0])
    torch.manual_seed(0)
    graphed_model = DenseNet(efficient=True, **SMALL).to(DEVICE)
    eager_model = copy.deepcopy(graphed_model)
    run_config = {"lr": 0.05, "momentum": 0.9, "wd": 1e-4, "amp": "off", "cuda_graph": True}

    def step_of(model, graphed):
        optimizer = make_optimizer({**run_config, "cuda_graph": graphed}, model, DEVICE)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        eager = EagerStep(model, optimizer, scaler, "off", DEVICE)
        return GraphedStep(eager) if graphed else eager

    results = []
    for model, step in ((graphed_model, step_of(graphed_model, True)),
                        (eager_model, step_of(eager_model, False))):
        outputs = []
        for x, y, training in data:
            model.train(training)
            if training:
                outputs.append(step(x, y)[0].clone())
            else:
                with torch.no_grad():
                    outputs.append(model(x).sum())
            garbage = scribble()
            del garbage
        results.append(torch.stack(outputs))
    graph_out, eager_out = results
    assert torch.isfinite(graph_out).all(), graph_out
    assert norm_err(graph_out, eager_out) < 1e-4, (graph_out, eager_out)
    for (name, a), b in zip(graphed_model.state_dict().items(),
                            eager_model.state_dict().values(), strict=True):
        assert torch.isfinite(a.float()).all() and norm_err(a, b) < 1e-4, name


@needs_cuda("CUDA graphs (torch.compile mode='reduce-overhead')")
def test_reduce_overhead_compile_matches_eager_with_a_smaller_batch_and_evaluation(
        exact_float32, monkeypatch):
    data = schedule_data()
    chunked(monkeypatch, data[0][0])
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = DenseNet(efficient=True, **SMALL).to(DEVICE)
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True, mode="reduce-overhead")
    results = []
    for model, forward in ((eager_model, eager_model), (compiled_model, compiled)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        outputs = []
        for x, y, training in data:
            torch.compiler.cudagraph_mark_step_begin()
            model.train(training)
            with torch.set_grad_enabled(training):
                logits = forward(x)
            if training:  # PyTorch's recipe for training under reduce-overhead
                loss = F.cross_entropy(logits, y)
                outputs.append(loss.detach().clone())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                outputs.append(logits.sum().clone())
            del logits
            garbage = scribble()
            del garbage
        results.append(torch.stack(outputs))
    eager_out, compiled_out = results
    assert torch.isfinite(compiled_out).all(), compiled_out
    assert norm_err(compiled_out, eager_out) < 1e-4, (compiled_out, eager_out)
    for (name, a), b in zip(compiled_model.state_dict().items(),
                            eager_model.state_dict().values(), strict=True):
        assert norm_err(a, b) < 1e-4, name
