"""PyTorch's tools on both modes: torch.compile (fullgraph), TorchScript, FX, torch.func, ONNX,
half and bfloat16 models, double backward, the operator counter, host synchronisation."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from measure import count_operators, profiled_operator_count, saved_tensor_bytes
from models import DenseNet, depth_to_config
from models.densenet import _DenseLayer
from models.efficient import (
    DOUBLE_BACKWARD_ERROR,
    BlockSpec,
    _dense_block_backward_op,
    _dense_block_op,
    _read_buffer_backward_op,
    _read_buffer_op,
    block_forward,
)

TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, bn_size=2)


def make_pair(dtype=torch.float32, seed=0, recompute_bottleneck=False, **kwargs):
    """A naive model and an efficient one holding the same weights."""
    config = dict(TINY, **kwargs)
    torch.manual_seed(seed)
    naive = DenseNet(**config).to(dtype)
    efficient = DenseNet(efficient=True, recompute_bottleneck=recompute_bottleneck, **config)
    efficient.to(dtype).load_state_dict(naive.state_dict())
    return naive, efficient


def step(model, x, seed=1):
    """One forward/backward on a fixed loss: (logits, input grad, grads, buffers)."""
    x = x.clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    logits = model(x)
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    (logits.float() * weights).sum().add(logits.float().square().mean()).backward()
    return (logits.detach(), x.grad, [p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()])


def assert_steps_close(out, ref, **tolerance):
    torch.testing.assert_close(out[0], ref[0], **tolerance)
    torch.testing.assert_close(out[1], ref[1], **tolerance)
    for a, b in zip(out[2], ref[2], strict=True):
        torch.testing.assert_close(a, b, **tolerance)
    for a, b in zip(out[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.fixture(autouse=True)
def fresh_dynamo_one_thread():
    # Tiny models gain nothing from a second thread, and OpenMP's barriers make them crawl when
    # other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


# torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["bc", "recompute", "plain+dropout"])
def test_compile_fullgraph_matches_naive_and_saves_what_eager_saves(case):
    # aot_eager: Dynamo and AOTAutograd with the operators' fake implementations, without
    # Inductor's code generation (slow on a CPU); Inductor is tested once below.
    config = {"bc": dict(), "recompute": dict(recompute_bottleneck=True),
              "plain+dropout": dict(bn_size=None, drop_rate=0.2)}[case]
    naive, efficient = make_pair(**config)
    compiled = torch.compile(efficient, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 8, 8)
    for _ in range(2):  # running statistics after two steps, too
        assert_steps_close(step(compiled, x), step(naive, x), rtol=1e-4, atol=1e-5)
    eager_bytes = saved_tensor_bytes(efficient, x)
    assert abs(saved_tensor_bytes(compiled, x) - eager_bytes) <= 0.05 * eager_bytes
    if case == "bc":  # eval, with gradients (fine-tuning with frozen statistics) and without
        naive.load_state_dict(efficient.state_dict())
        naive.eval()
        efficient.eval()
        assert_steps_close(step(compiled, x), step(naive, x), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), naive(x), rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_channels_last_autocast_computes_what_eager_does():
    _, efficient = make_pair()
    _, twin = make_pair()
    for model in (efficient, twin):
        model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    compiled = torch.compile(efficient, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(compiled, x)
        ref = step(twin, x)
    assert out[0].dtype == torch.bfloat16
    # The operators take the compute dtype as an argument: compiled computes what eager does.
    torch.testing.assert_close(out[:3], ref[:3], rtol=0, atol=0)
    # The running statistics' update is plain torch code that the compiler may decompose:
    # torch 2.11's differs from eager by one float32 rounding in one running_var.
    torch.testing.assert_close(out[3], ref[3], rtol=2.5e-7, atol=0)


def test_compile_inductor_train_eval_saved_bytes_and_operator_count():
    naive, efficient = make_pair()
    x = torch.randn(4, 3, 8, 8)
    eager_bytes = saved_tensor_bytes(efficient, x)
    compiled = torch.compile(efficient, fullgraph=True)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        compiled_bytes = saved_tensor_bytes(compiled, x)  # compiles the forward
        step(compiled, x)  # and the backward
    assert abs(compiled_bytes - eager_bytes) <= 0.05 * eager_bytes
    # The profiled count sees Inductor's kernels and what the operators run inside.
    counted = profiled_operator_count(lambda: step(compiled, x))
    assert counted.counts["inductor kernel"] > 0
    assert counted.custom["densenet::dense_block"] == 2 == \
        counted.custom["densenet::dense_block_backward"]
    assert counted.counts["aten::convolution_backward"] >= 2 * 5  # two per layer
    naive.load_state_dict(efficient.state_dict())
    assert_steps_close(step(compiled, x), step(naive, x), rtol=1e-4, atol=1e-5)
    naive.eval()
    efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), naive(x), rtol=1e-4, atol=1e-5)


def _op_cases():
    torch.manual_seed(0)
    layer_params = []
    for c in (3, 5):
        layer = _DenseLayer(c, 2, 2, 0.0)
        layer_params += layer.block_params(True)
    params = [p.detach() for p in layer_params]
    x = torch.randn(2, 3, 4, 5)
    cases = []
    for training, drop, fmt, dtype, recompute in [
            (True, 0.0, torch.contiguous_format, torch.float32, False),
            (True, 0.3, torch.channels_last, torch.float32, True),
            (False, 0.0, torch.channels_last, torch.bfloat16, False)]:
        spec = BlockSpec(2, True, training, 1e-5, drop, recompute)
        cases.append((x.to(memory_format=fmt), params, dtype, spec))
    return cases


def test_operators_pass_opcheck():
    """Schemas, fake implementations (shapes, dtypes, strides) and AOT dispatch are right."""
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for x, params, dtype, spec in _op_cases():
        torch.manual_seed(0)
        buf, _, invstd, z_mean, z_invstd, saved_z, masks = _dense_block_op(
            x, params, dtype, True, *spec)
        if spec.drop_rate == 0:  # random draws differ between the calls opcheck compares
            torch.library.opcheck(_dense_block_op, (x, params, dtype, True, *spec),
                                  test_utils=utils)
        args = (torch.randn_like(buf), buf, invstd, z_mean, z_invstd, params, saved_z, masks,
                x.dtype, *spec)
        torch.library.opcheck(_dense_block_backward_op, args, test_utils=utils)
    buf = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    scale, shift, weight = torch.randn(4), torch.randn(4), torch.randn(3, 4, 1, 1)
    for w, pool in ((weight, False), (None, True)):
        torch.library.opcheck(_read_buffer_op, (buf, scale, shift, w, pool), test_utils=utils)
        out = _read_buffer_op(buf, scale, shift, w, pool)
        torch.library.opcheck(_read_buffer_backward_op,
                              (torch.randn_like(out), buf, scale, shift, w, pool),
                              test_utils=utils)


# TorchScript, FX, torch.func, ONNX -------------------------------------------------------

TRACERS = {
    "script": lambda model, x: torch.jit.script(model),
    "trace": lambda model, x: torch.jit.trace(model, x, check_trace=False),
    "fx": lambda model, x: torch.fx.symbolic_trace(model),
}


@pytest.mark.parametrize("tool", TRACERS)
@pytest.mark.parametrize("efficient", [False, True], ids=["naive", "efficient"])
@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain"])
def test_script_trace_fx_take_the_naive_path(tool, efficient, bottleneck):
    config = {} if bottleneck else dict(bn_size=None)
    x = torch.randn(3, 3, 8, 8)
    for mode in ("train", "eval"):
        reference, model = make_pair(**config)
        model = model if efficient else make_pair(**config)[0]
        getattr(reference, mode)()
        getattr(model, mode)()
        recorded = TRACERS[tool](model, x)
        if tool == "trace":
            reference(x)  # tracing ran one forward (running statistics)
        out, ref = recorded(x), reference(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scripted_model_saves_and_loads():
    _, efficient = make_pair()
    efficient.eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(efficient), buffer)
    buffer.seek(0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.jit.load(buffer)(x), efficient(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_func_grad_over_functional_call(mode):
    naive, efficient = make_pair(torch.float64)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    results = []
    for model in (naive, efficient):
        getattr(model, mode)()
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(params, buffers, x, model=model):
            logits = torch.func.functional_call(model, (params, buffers), (x,))
            return F.cross_entropy(logits, torch.arange(3))

        results.append((torch.func.grad(loss, argnums=(0, 2))(params, buffers, x),
                        [b.clone() for b in buffers.values()]))
    (naive_grads, naive_x_grad), naive_buffers = results[0]
    (grads, x_grad), buffers = results[1]
    torch.testing.assert_close(x_grad, naive_x_grad)
    for name in naive_grads:
        torch.testing.assert_close(grads[name], naive_grads[name], msg=name)
    for a, b in zip(buffers, naive_buffers, strict=True):
        torch.testing.assert_close(a, b)
    # and the same gradients as autograd's
    naive.zero_grad()
    F.cross_entropy(naive(x), torch.arange(3)).backward()
    for name, p in naive.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def trained_pair():
    """A naive and an efficient model with equal, trained (not initial) weights and stats."""
    naive, efficient = make_pair()
    optimizer = torch.optim.SGD(efficient.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        F.cross_entropy(efficient(torch.randn(6, 3, 8, 8)), torch.arange(6) % 10).backward()
        optimizer.step()
        optimizer.zero_grad()
    naive.load_state_dict(efficient.state_dict())
    return naive.eval(), efficient.eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_onnx_export_matches_onnxruntime(dynamo):
    import onnxruntime

    x = torch.randn(4, 3, 8, 8)
    for model in trained_pair():
        if dynamo:
            data = torch.onnx.export(model, (x,), dynamo=True).model_proto.SerializeToString()
        else:
            with pytest.warns(DeprecationWarning):
                buffer = io.BytesIO()
                torch.onnx.export(model, (x,), buffer, dynamo=False)
            data = buffer.getvalue()
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


# half and bfloat16 models, double backward, failing forward ---------------------------------


def norm_rel_err(out, ref):
    out = torch.cat([t.double().flatten() for t in out])
    ref = torch.cat([t.double().flatten() for t in ref])
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_train_as_accurately_as_naive(dtype):
    """model.half() / model.bfloat16(): errors against float32 like naive's (median of seeds)."""
    errors = {"naive": [], "efficient": []}
    for seed in range(3):
        naive, efficient = make_pair(growth_rate=6, seed=seed)
        exact = step(make_pair(growth_rate=6, seed=seed)[0], x := torch.randn(8, 3, 8, 8))
        for name, model in (("naive", naive), ("efficient", efficient)):
            out = step(model.to(dtype), x.to(dtype))
            assert out[0].dtype == dtype and all(g.dtype == dtype for g in out[2])
            errors[name].append([norm_rel_err([out[0]], [exact[0]]),
                                 norm_rel_err([out[1]], [exact[1]]),
                                 norm_rel_err(out[2], exact[2]),
                                 norm_rel_err([b for b in out[3] if b.is_floating_point()],
                                              [b for b in exact[3] if b.is_floating_point()])])
    median = {name: torch.tensor(e).median(0).values for name, e in errors.items()}
    # logits, input gradient, parameter gradients, running statistics
    assert (median["efficient"] <= 2 * median["naive"] + 1e-3).all(), median
    optimizer = torch.optim.SGD(efficient.parameters(), lr=0.1)  # and steps train
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(efficient(x.to(dtype)).float(), torch.arange(8))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_double_backward_raises_one_clear_error():
    naive, efficient = make_pair()
    for model in (naive, efficient):
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        if model is naive:
            g.square().sum().backward()
            continue
        with pytest.raises(RuntimeError, match="efficient=False") as error:
            g.square().sum().backward()
        assert DOUBLE_BACKWARD_ERROR in str(error.value)


def test_failing_training_forward_counts_the_batch_like_batchnorm():
    for config in (dict(block_config=(1,)), dict(block_config=(2, 2))):
        naive, efficient = make_pair(**config)
        size = 1 if len(config["block_config"]) == 1 else 3  # 3x3, then 1x1 after a transition
        x = torch.randn(1, 3, size, size)
        for model in (naive, efficient):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                model(x)
        for (name, a), b in zip(naive.named_buffers(), efficient.buffers(), strict=True):
            torch.testing.assert_close(b, a, msg=name)
        assert any(b.item() == 1 for n, b in naive.named_buffers() if "num_batches" in n)


# operators dispatched, host synchronisation --------------------------------------------------


def test_operator_counter_counts_inside_custom_operators():
    (x, params, dtype, spec) = _op_cases()[0]
    inside = count_operators(lambda: block_forward(spec, x, params, dtype, True))
    through_op = count_operators(lambda: _dense_block_op(x, params, dtype, True, *spec))
    assert through_op.custom == {"densenet.dense_block.default": 1}
    assert through_op.counts == inside.counts
    assert inside.total() > 10


def test_profiler_count_agrees_with_dispatch_count():
    x = torch.randn(3, 3, 8, 8)
    for model in make_pair():
        def training_step(model=model):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), torch.arange(3)).backward()

        training_step()
        assert profiled_operator_count(training_step).total() == \
            count_operators(training_step).total()


def test_eager_efficient_dispatches_fewer_operators_than_naive_at_bc100():
    # The count depends on the architecture, not on batch or image size: tiny inputs suffice.
    naive, efficient = make_pair(**depth_to_config(100, 12))
    x = torch.randn(2, 3, 8, 8)
    counts = []
    for model in (naive, efficient):
        def training_step(model=model):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), torch.arange(2)).backward()

        training_step()
        counts.append(count_operators(training_step).total())
    assert counts[1] <= counts[0]


SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default",
           "aten.is_nonzero.default", "aten.equal.default", "aten.masked_select.default",
           "aten.unique_dim.default", "aten._unique2.default", "aten.allclose.default"}


class HostSyncs(TorchDispatchMode):
    """Records operators that copy a value to the host (a GPU synchronisation)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_no_host_synchronisation_in_a_training_step(momentum):
    naive, efficient = make_pair(drop_rate=0.2)
    for model in (naive, efficient):
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = momentum
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                    weight_decay=1e-4, foreach=True)
        x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
        for _ in range(2):  # the second step has momentum buffers
            with HostSyncs() as syncs:
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
            if model is efficient or momentum is not None:
                assert syncs.seen == [], syncs.seen
            else:  # nn.BatchNorm2d turns 1 / num_batches_tracked into a Python float
                assert "aten._local_scalar_dense.default" in syncs.seen


def test_float32_gradients_as_accurate_as_naive():
    """Median over 30 seeds of the norm-relative float32 gradient error (against float64),
    DenseNet-BC and plain DenseNet: efficient within 2x of naive (the figures at a larger size
    are in results/tools-cpu.md)."""
    from benchmarks.tools import gradient_accuracy

    for bc in (True, False):
        config = dict(depth_to_config(10 if bc else 7, 4, bc=bc), num_classes=10)
        errors = gradient_accuracy(config, range(30), batch_size=4, image_size=8)
        median = {name: torch.tensor(e).median().item() for name, e in errors.items()}
        assert 0 < median["efficient"] <= 2 * median["naive"], median
        assert max(errors["efficient"]) < 1e-4


def test_foreach_and_fused_sgd_dispatch_a_handful_of_operators():
    from benchmarks.tools import optimizer_step_counts

    _, model = make_pair()
    counts = optimizer_step_counts(model)
    num_params = len(list(model.parameters()))
    assert counts["default"] >= 3 * num_params  # one loop iteration per parameter on a CPU
    assert counts["fused"] <= counts["foreach"] <= 10
