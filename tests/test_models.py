"""models/: efficient and naive DenseNets agree, save far less, and match torchvision's names."""


import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from measure import saved_tensor_bytes
from models import DenseNet, depth_to_config
from models import efficient as efficient_ops
from models.densenet import _DenseBlock
from models.efficient import BlockSpec, DenseBlockFunction, ReaderFunction

TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, bn_size=2)


def rel_err(a, b, floor=1e-30):
    """Largest absolute difference relative to the reference's largest magnitude."""
    scale = max(b.double().abs().max().item(), floor)
    return (a.double() - b.double()).abs().max().item() / scale


def make_pair(dtype=torch.float64, seed=0, recompute_bottleneck=False, **kwargs):
    """A naive model and an efficient one holding the same weights."""
    torch.manual_seed(seed)
    naive = DenseNet(**kwargs).to(dtype)
    efficient = DenseNet(efficient=True, recompute_bottleneck=recompute_bottleneck, **kwargs)
    efficient.to(dtype).load_state_dict(naive.state_dict())
    return naive, efficient


def training_step(model, x, seed=1):
    """One forward/backward on a fixed loss; returns logits, input grad, named grads, buffers."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    logits = model(x)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype,
                             device=logits.device).view_as(logits)
    (logits * weights).sum().add(logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return logits.detach(), x.grad, grads, buffers


def assert_same_step(naive, efficient, x, tol):
    ref = training_step(naive, x)
    out = training_step(efficient, x)
    assert rel_err(out[0], ref[0]) < tol, "logits"
    assert rel_err(out[1], ref[1]) < tol, "input gradient"
    assert ref[2].keys() == out[2].keys()
    # A gradient that cancels to almost nothing (norm0's scale right before the blocks' own
    # BatchNorm) is compared at the scale of the model's gradients, not at its own.
    floor = 1e-4 * max(g.abs().max().item() for g in ref[2].values())
    for name in ref[2]:
        assert rel_err(out[2][name], ref[2][name], floor) < tol, name
    for name in ref[3]:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(out[3][name], ref[3][name]), name
            assert out[3][name].item() == int(naive.training), name
        else:
            assert rel_err(out[3][name], ref[3][name]) < tol, name


CASES = [
    dict(TINY),
    dict(TINY, compression=1.0),
    dict(TINY, bn_size=None),
    dict(TINY, bn_size=None, compression=1.0),
    dict(TINY, small_inputs=False),
    dict(TINY, recompute_bottleneck=True),
    dict(TINY, block_config=(3,)),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()
                                                                 if a not in TINY or TINY[a] != b))
@pytest.mark.parametrize("batch", [1, 3])
def test_efficient_matches_naive_float64(kwargs, batch):
    naive, efficient = make_pair(torch.float64, **kwargs)
    size = (37, 29) if not kwargs.get("small_inputs", True) else (11, 7)
    x = torch.randn(batch, 3, *size, dtype=torch.float64)
    assert_same_step(naive, efficient, x, 1e-10)


@pytest.mark.parametrize("kwargs", [dict(TINY), dict(TINY, bn_size=None),
                                    dict(TINY, recompute_bottleneck=True)])
def test_efficient_matches_naive_float32(kwargs):
    naive, efficient = make_pair(torch.float32, **kwargs)
    assert_same_step(naive, efficient, torch.randn(4, 3, 16, 12), 1e-4)


@pytest.mark.parametrize("kwargs", CASES[:6] + [dict(TINY, drop_rate=0.3)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()
                                                if a not in TINY or TINY[a] != b))
@pytest.mark.parametrize("chunk_channels", [1, 5])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_layers_and_readers_in_channel_chunks_match_naive(kwargs, chunk_channels, layout,
                                                          monkeypatch):
    # Slices of chunk_channels channels in the first block (more at lower resolutions).
    size = (11, 7) if kwargs.get("small_inputs", True) else (37, 29)
    x = torch.randn(3, 3, *size, dtype=torch.float64).contiguous(memory_format=layout)
    first_block = size if kwargs.get("small_inputs", True) else (10, 8)
    monkeypatch.setattr(efficient_ops, "CHUNK_BYTES",
                        chunk_channels * 3 * first_block[0] * first_block[1] * 8)
    naive, efficient = make_pair(torch.float64, **kwargs)
    naive.to(memory_format=layout)
    efficient.to(memory_format=layout)
    assert len(efficient_ops._chunks(x.new_empty(3, 10, *first_block), 10)) > 1
    assert_same_step(naive, efficient, x, 1e-10)
    naive, efficient = make_pair(torch.float64, **kwargs)  # eval, with distinct statistics
    for name, buffer in naive.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    efficient.load_state_dict(naive.state_dict())
    naive.to(memory_format=layout)
    efficient.to(memory_format=layout)
    assert_same_step(naive.eval(), efficient.eval(), x, 1e-10)


def test_channel_chunks():
    mib = 2**20
    assert efficient_ops.channel_chunks(216, 256 * 1024) == [(0, 216)]  # BC-100, batch 64
    chunks = efficient_ops.channel_chunks(2568, 256 * 1024)  # BC-1276's widest layer
    assert chunks[0] == (0, 256) and chunks[-1] == (2560, 2568) and len(chunks) == 11
    assert all(b - a == 256 for a, b in chunks[:-1])
    assert efficient_ops.channel_chunks(3, 65 * mib) == [(0, 1), (1, 2), (2, 3)]
    assert efficient_ops.channel_chunks(40, 3 * mib) == [(0, 16), (16, 32), (32, 40)]


def test_cumulative_moving_average_momentum_none():
    naive, efficient = make_pair(torch.float64, **TINY)
    for model in (naive, efficient):
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
    for _ in range(3):
        x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
        naive(x)
        efficient(x)
    for (name, a), b in zip(naive.named_buffers(), efficient.buffers(), strict=True):
        assert rel_err(b, a) < 1e-10, name


def test_channels_last():
    naive, efficient = make_pair(torch.float64, **TINY)
    naive.to(memory_format=torch.channels_last)
    efficient.to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_same_step(naive, efficient, x, 1e-10)


def test_efficient_matches_naive_with_dropout():
    # Same seed, same random draws: the masks agree, and backward must use the forward's mask.
    naive, efficient = make_pair(torch.float64, **dict(TINY, drop_rate=0.3))
    assert_same_step(naive, efficient, torch.randn(3, 3, 9, 9, dtype=torch.float64), 1e-10)


def test_dropout_is_active_and_off_in_eval():
    naive, efficient = make_pair(torch.float64, **dict(TINY, drop_rate=0.5))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    a = efficient(x)
    torch.manual_seed(1)
    b = efficient(x)
    assert not torch.allclose(a, b)
    efficient.eval()
    assert torch.equal(efficient(x), efficient(x))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    growth_rate=st.integers(1, 4),
    block_config=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    bn_size=st.sampled_from([None, 1, 2]),
    compression=st.sampled_from([0.5, 1.0]),
    num_init_features=st.integers(2, 6),
    batch=st.integers(1, 3),
    height=st.integers(9, 14),
    width=st.integers(9, 14),
    drop_rate=st.sampled_from([0.0, 0.2]),
    recompute=st.booleans(),
)
def test_efficient_matches_naive_random_configs(growth_rate, block_config, bn_size, compression,
                                                num_init_features, batch, height, width,
                                                drop_rate, recompute):
    kwargs = dict(growth_rate=growth_rate, block_config=block_config, bn_size=bn_size,
                  compression=compression, num_init_features=num_init_features,
                  drop_rate=drop_rate, recompute_bottleneck=recompute and bool(bn_size))
    naive, efficient = make_pair(torch.float64, **kwargs)
    # Enough values per channel after every transition for training-mode BatchNorm.
    scale = 2 ** (len(block_config) - 1)
    x = torch.randn(batch, 3, height * scale // 2 + 2, width * scale // 2 + 2,
                    dtype=torch.float64)
    assert_same_step(naive, efficient, x, 1e-10)


def test_eval_mode_matches_with_distinct_running_stats():
    naive, efficient = make_pair(torch.float64, **TINY)
    torch.manual_seed(3)
    for bn in naive.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    efficient.load_state_dict(naive.state_dict())
    naive.eval()
    efficient.eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    # Eval with gradients (e.g. fine-tuning with frozen statistics) and under no_grad.
    assert_same_step(naive, efficient, x, 1e-10)
    with torch.no_grad():
        assert rel_err(efficient(x), naive(x)) < 1e-10


def test_no_grad_saves_nothing_and_updates_stats_once():
    _, efficient = make_pair(torch.float32, **TINY)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert saved_tensor_bytes(efficient, x) == 0
    counts = {n: b.item() for n, b in efficient.named_buffers() if "num_batches" in n}
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("chunk_bytes", [efficient_ops.CHUNK_BYTES, 1])
def test_gradcheck_dense_block(chunk_bytes, monkeypatch):
    monkeypatch.setattr(efficient_ops, "CHUNK_BYTES", chunk_bytes)  # 1: one channel at a time
    torch.manual_seed(0)
    block = _DenseBlock(num_layers=2, num_input_features=3, bn_size=2, growth_rate=2,
                        drop_rate=0.0).double()
    for bn in block.modules():  # keep every ReLU input away from its kink at 0
        if isinstance(bn, torch.nn.BatchNorm2d):
            for t in (bn.weight.data, bn.bias.data, bn.running_mean):
                t.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 1.5)
    layers = list(block.values())
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        for recompute in (False, True):
            spec = BlockSpec(2, True, training, 1e-5, 0.0, recompute)
            params = [p.detach().clone().requires_grad_()
                      for layer in layers for p in layer.block_params(training)]

            def run(x, *params, spec=spec):
                return DenseBlockFunction.apply(spec, torch.float64, x, *params)[0]

            assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [efficient_ops.CHUNK_BYTES, 1])
def test_gradcheck_reader(chunk_bytes, monkeypatch):
    monkeypatch.setattr(efficient_ops, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    buf = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: ReaderFunction.apply(False, *a), (buf, scale, shift, weight))
    assert torch.autograd.gradcheck(
        lambda *a: ReaderFunction.apply(True, *a, None), (buf, scale, shift))


@pytest.mark.parametrize("efficient", [False, True])
def test_torchvision_densenet121_weights_load(efficient):
    torch.manual_seed(0)
    reference = torchvision.models.densenet121()
    for bn in reference.modules():  # non-trivial statistics so the comparison means something
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    model = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64,
                     bn_size=4, small_inputs=False, num_classes=1000, efficient=efficient)
    model.load_state_dict(reference.state_dict(), strict=True)
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < 1e-4


def test_state_dict_shared_between_modes():
    naive, efficient = make_pair(torch.float32, **TINY)
    assert list(naive.state_dict()) == list(efficient.state_dict())
    efficient.load_state_dict(naive.state_dict(), strict=True)


def cifar_stem_torchvision(memory_efficient, growth_rate, block_config, num_init_features):
    model = torchvision.models.DenseNet(growth_rate=growth_rate, block_config=block_config,
                                        num_init_features=num_init_features, bn_size=4,
                                        num_classes=10, memory_efficient=memory_efficient)
    model.features.conv0 = torch.nn.Conv2d(3, num_init_features, 3, padding=1, bias=False)
    del model.features.norm0, model.features.relu0, model.features.pool0
    return model


def test_saved_bytes_efficient_far_below_naive_and_checkpointing():
    cfg = depth_to_config(40, growth_rate=12)
    naive, efficient = make_pair(torch.float32, **cfg)
    _, recompute = make_pair(torch.float32, recompute_bottleneck=True, **cfg)
    checkpointed = cifar_stem_torchvision(True, 12, cfg["block_config"], 24)
    assert sum(p.numel() for p in checkpointed.parameters()) == \
        sum(p.numel() for p in naive.parameters())
    x = torch.randn(16, 3, 32, 32)
    naive_bytes = saved_tensor_bytes(naive, x)
    efficient_bytes = saved_tensor_bytes(efficient, x)
    recompute_bytes = saved_tensor_bytes(recompute, x)
    checkpoint_bytes = saved_tensor_bytes(checkpointed, x)
    assert efficient_bytes < 0.3 * naive_bytes
    assert efficient_bytes < 0.65 * checkpoint_bytes
    assert recompute_bytes < 0.4 * efficient_bytes
    # The floor: block buffers (plus bottleneck outputs unless recomputed), nothing per layer.
    layers, k, n = cfg["block_config"][0], 12, 16
    buffers = sum(n * c * s * s * 4 for c, s in [(24 + layers * k, 32), (66 + layers * k, 16),
                                                 (105 + layers * k, 8)])
    bottlenecks = sum(n * layers * 4 * k * s * s * 4 for s in (32, 16, 8))
    params = sum(p.numel() * 4 for p in naive.parameters())
    assert recompute_bytes <= 1.02 * buffers + params + x.numel() * 4
    assert efficient_bytes <= 1.02 * (buffers + bottlenecks) + params + x.numel() * 4


@pytest.mark.parametrize("chunk_channels", [None, 1], ids=["whole", "chunks of one channel"])
def test_autocast_bf16_as_accurate_as_naive(chunk_channels, monkeypatch):
    # bf16 rounding makes the two modes differ by far more than float32 does, so each is compared
    # with the float32 result: the efficient mode must not be less accurate than the naive one,
    # also when every layer sums its convolution over one-channel slices.
    naive, efficient = make_pair(torch.float32, **dict(TINY, growth_rate=6))
    x = torch.randn(8, 3, 12, 12)
    if chunk_channels:
        monkeypatch.setattr(efficient_ops, "CHUNK_BYTES", chunk_channels * 8 * 12 * 12 * 2)
    exact = training_step(naive, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = training_step(naive, x)
        out = training_step(efficient, x)
    assert out[0].dtype == ref[0].dtype == torch.bfloat16
    assert out[1].dtype == torch.float32
    assert rel_err(out[0], exact[0]) <= 2 * rel_err(ref[0], exact[0]) + 1e-3
    assert rel_err(out[1], exact[1]) <= 2 * rel_err(ref[1], exact[1]) + 1e-3
    assert all(out[2][name].dtype == torch.float32 for name in out[2])
    worst_naive = max(rel_err(ref[2][n], exact[2][n]) for n in exact[2])
    worst_efficient = max(rel_err(out[2][n], exact[2][n]) for n in exact[2])
    assert worst_efficient <= 1.5 * worst_naive


def test_data_parallel_wrapper_on_cpu():
    naive, efficient = make_pair(torch.float32, **TINY)
    wrapped = torch.nn.DataParallel(efficient)
    x = torch.randn(3, 3, 8, 8)
    ref = training_step(naive, x)
    out = training_step(wrapped, x)
    assert rel_err(out[0], ref[0]) < 1e-4


def test_depth_to_config():
    assert depth_to_config(100) == dict(growth_rate=12, block_config=(16, 16, 16),
                                        num_init_features=24, bn_size=4, compression=0.5)
    assert depth_to_config(40, growth_rate=12, bc=False) == dict(
        growth_rate=12, block_config=(12, 12, 12), num_init_features=16, bn_size=None,
        compression=1.0)
    assert depth_to_config(190, growth_rate=40)["block_config"] == (31, 31, 31)
    with pytest.raises(ValueError, match="nearest valid depths: 94, 100"):
        depth_to_config(99)
    with pytest.raises(ValueError, match="nearest valid depths: 40, 43"):
        depth_to_config(41, bc=False)
    with pytest.raises(ValueError, match="nearest valid depths: 10"):
        depth_to_config(3)
    for bad in (100.5, "100", True):
        with pytest.raises(ValueError, match="depth must be an integer"):
            depth_to_config(bad)
    with pytest.raises(ValueError, match="growth_rate"):
        depth_to_config(100, growth_rate=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(growth_rate=0), "growth_rate must be a positive integer"),
    (dict(growth_rate=2.5), "growth_rate must be a positive integer"),
    (dict(block_config=()), "block_config must be a non-empty sequence"),
    (dict(block_config=(2, 0)), "each entry of block_config"),
    (dict(block_config="16"), "block_config must be a non-empty sequence"),
    (dict(compression=0), r"compression must be in \(0, 1\]"),
    (dict(compression=1.5), r"compression must be in \(0, 1\]"),
    (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\)"),
    (dict(drop_rate=-0.1), r"drop_rate must be in \[0, 1\)"),
    (dict(bn_size=-1), "bn_size must be a non-negative integer"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(num_init_features=0), "num_init_features must be a positive integer"),
    (dict(efficient="yes"), "efficient must be True or False"),
    (dict(recompute_bottleneck=True), "requires efficient=True"),
    (dict(efficient=True, recompute_bottleneck=True, bn_size=None), "requires a bottleneck"),
    (dict(num_init_features=1, growth_rate=1, block_config=(1, 1), compression=0.1),
     "leaves no channels"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseNet(**kwargs)


def test_training_needs_more_than_one_value_per_channel():
    _, efficient = make_pair(torch.float32, **dict(TINY, block_config=(1,)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        efficient(torch.randn(1, 3, 1, 1))
