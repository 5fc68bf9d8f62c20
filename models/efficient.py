"""Memory-efficient dense blocks: one shared feature buffer, BatchNorm applied once per channel.

How it works, and why it needs a custom autograd Function
---------------------------------------------------------
In a dense block, layer j reads the concatenation of every feature map produced before it, applies
BatchNorm + ReLU + a convolution, and appends k new channels. Done naively, every layer copies
the concatenation and autograd keeps that copy, its normalised version and its ReLU for backward:
O(L^2) memory. Checkpointing (torchvision's ``memory_efficient``, gpleiss) frees those copies but
re-runs concatenation and BatchNorm in backward.

Here a block owns one buffer of shape (N, C_in + L*k, H, W). Each layer writes its k new channels
into its slice, and nothing else is stored per layer except the bottleneck (1x1 conv) output.

The buffer holds every channel *already normalised*. In training mode a channel's batch mean and
variance are the same for every later layer that reads it, so they are computed once, when the
channel is produced, and the buffer stores (x - mean) / std. Layer j's BatchNorm then reduces to a
per-channel affine map gamma_j * buffer + beta_j (in eval mode the buffer stores the raw x and the
running statistics are folded into that affine map instead). BatchNorm's backward splits the same
way: every reader adds gamma_j * dL/dy_j into a gradient buffer G, and the part of BatchNorm's
backward that goes through the batch statistics is applied once per channel, when the backward
pass reaches the layer that produced it (all its readers are done by then). Quadratic BatchNorm
work becomes linear.

Writing into the shared buffer would trip autograd's version checks and make it keep every
intermediate, so the block is one ``torch.autograd.Function``: forward keeps only the buffer (and
the bottleneck outputs unless ``recompute_bottleneck``), and backward walks the layers in reverse,
recomputing each layer's cheap affine + ReLU from the buffer. Transitions and the classifier head
read the buffer through the same affine map with a second small Function, so nothing there is
stored either.

Working memory is bounded too. A layer's BatchNorm-ReLU'd input, and in backward that input's
gradient, would each be as large as the buffer slice the layer reads: in a deep block, several
buffers' worth of temporaries on top of what is saved. A convolution is a sum over its input
channels, and the affine map, the ReLU and their gradients act per channel, so a layer that reads
more than CHUNK_BYTES of maps does all of this a slice of channels at a time (the partial
convolutions added up, in float32 for half precision) and its temporaries stay within
CHUNK_BYTES each; the transitions and the head read the buffer the same way. A block's backward
then holds its incoming gradient and the gradient it accumulates (two buffers) plus chunk-sized
temporaries. Layers small enough for one chunk (all of DenseNet-BC-100's at batch 64 in float32)
run exactly as without chunks.

What is saved for backward, in all: per block the buffer (in the compute dtype), the bottleneck
outputs (unless ``recompute_bottleneck``), a bool mask per layer when dropout is on, and small
per-channel batch statistics; plus the parameters.

Why the block and the reader are custom operators
-------------------------------------------------
The work of each Function (forward and backward) is a ``torch.library.custom_op``:
``densenet::dense_block``, ``densenet::dense_block_backward``, ``densenet::read_buffer`` and
``densenet::read_buffer_backward``. An operator is opaque to the compiler and to autograd: a
``torch.compile(fullgraph=True)`` graph calls it as one node, which keeps the memory plan (the
compiler cannot see, and so cannot re-plan, the writes into the shared buffer), while the rest
of the model (stem, running-statistics updates, classifier) is compiled as usual. Inside an
operator the kernels are eager PyTorch's, in either mode. Each operator has a "fake"
implementation that only computes output shapes, dtypes and layouts, which is what the compiler
traces. The autograd formula is a small ``autograd.Function`` with ``setup_context`` around the
forward operator, because ``torch.func`` transforms accept that form (custom_op's own
``register_autograd`` does not support them); its backward calls the backward operator, which
has no derivative of its own: double backward raises one error that says to use
``efficient=False``. The operators take the compute dtype as an argument instead of reading the
autocast state, so a compiled graph computes exactly what eager mode does. A SyncBatchNorm
process group travels by name (``group.group_name``).
"""

import functools
import threading
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor

_aten = torch.ops.aten


def compute_dtype(x):
    """The dtype convolutions run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def memory_format(x):
    """channels_last for NHWC tensors, else the default layout."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _stat_dtype(dtype):
    """Batch statistics and BatchNorm parameters are float32 (float64 for float64 features)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel(v):
    return v.view(1, -1, 1, 1)


CHUNK_BYTES = 64 * 2**20  # a layer's working tensors are cut into channel slices of this size


def channel_chunks(channels, bytes_per_channel):
    """[(lo, hi), ...]: ``channels`` cut into slices of at most CHUNK_BYTES of maps (at least
    one channel each; a multiple of 16 channels when larger, oneDNN's channel block)."""
    step = max(1, CHUNK_BYTES // max(1, bytes_per_channel))
    if step > 16:
        step -= step % 16
    return [(lo, min(lo + step, channels)) for lo in range(0, channels, step)]


def _chunks(maps, channels):
    """channel_chunks for the first ``channels`` channels of the 4-d tensor ``maps``."""
    return channel_chunks(channels, maps[:, :1].numel() * maps.element_size())


def _joined(parts, dims):
    """Per-chunk results as one: each field's chunks concatenated along its dim (None stays)."""
    if len(parts) == 1:
        return parts[0]
    return tuple(None if field[0] is None else torch.cat(field, dim)
                 for field, dim in zip(zip(*parts, strict=True), dims, strict=True))


def _sum_over_chunks(chunks, partial):
    """The sum of partial(lo, hi) over the chunks. Several half-precision terms add up in float32
    and are rounded once, as one convolution over all channels rounds its result."""
    if len(chunks) == 1:
        return partial(*chunks[0])
    total = None
    for lo, hi in chunks:
        part = partial(lo, hi)
        if total is None:
            dtype, total = part.dtype, part.to(_stat_dtype(part.dtype))
        else:
            total.add_(part)
        del part  # before the next slice's tensors exist
    return total.to(dtype)


def _conv_of_affine_relu(buf, chunks, scale, shift, weight, padding):
    """conv2d(relu(scale * buf[:, :c] + shift), weight), one slice of channels at a time."""
    return _sum_over_chunks(chunks, lambda lo, hi: F.conv2d(
        _affine_relu(buf[:, lo:hi], scale[lo:hi], shift[lo:hi]), weight[:, lo:hi],
        padding=padding))


_running = threading.local()  # .identity: the running function's (zeros, ones); see below


def _identity_stats(like, n=None):
    """Zero means and unit variances for ``n`` (default ``like.numel()``) channels: slices of the
    pair that _with_identity_stats made for the running block or reader function."""
    n = like.numel() if n is None else n
    identity = getattr(_running, "identity", None)
    if identity is None or identity[0].numel() < n or identity[0].dtype != like.dtype \
            or identity[0].device != like.device:
        return like.new_zeros(n), like.new_ones(n)  # a call from outside those functions
    return identity[0][:n], identity[1][:n]


def _with_identity_stats(widest):
    """Decorator: while the function runs, _identity_stats serves slices of one pair of zeros
    and ones for ``widest(*args)`` -> (buffer-like tensor, statistics dtype, channels).

    Made at each call and freed at its end, never cached across calls: a CUDA graph (capture,
    or torch.compile's "reduce-overhead") replays the addresses it recorded, and a cache that
    grew later (a smaller batch takes wider channel slices) would have freed them. Two fills per
    block or reader cost nothing next to its kernels.
    """
    def decorate(function):
        @functools.wraps(function)
        def run(*args):
            like, dtype, channels = widest(*args)
            outer = getattr(_running, "identity", None)
            _running.identity = (like.new_zeros(channels, dtype=dtype),
                                 like.new_ones(channels, dtype=dtype))
            try:
                return function(*args)
            finally:
                _running.identity = outer
        return run
    return decorate


def _widest_in_block(spec, x, params, dtype, *_):
    """block_forward's widest channel count: its buffer, or a bottleneck wider than that."""
    channels = x.shape[1] + spec.num_layers(params) * spec.growth_rate
    return x, _stat_dtype(dtype), max(channels, params[2].shape[0])


def _widest_in_block_backward(spec, grad_buf, buf, invstd, z_mean, z_invstd, params, *_):
    return buf, _stat_dtype(buf.dtype), max(buf.shape[1], params[2].shape[0])


def _widest_read(buf, *_):
    return buf, _stat_dtype(buf.dtype), buf.shape[1]


def _affine_relu(x, scale, shift):
    """relu(scale * x + shift) per channel, into a new tensor.

    BatchNorm's inference kernel with mean 0, variance 1 and eps 0 is exactly this affine map,
    with float32 scale and shift even for half-precision x (one rounding, as nn.BatchNorm2d).
    torch.batch_norm, not F.batch_norm: torch 2.11's F.batch_norm refuses eps 0.
    """
    mean, var = _identity_stats(scale)
    return torch.batch_norm(x, scale, shift, mean, var, False, 0.0, 0.0,
                            torch.backends.cudnn.enabled).relu_()


def _affine_backward(grad_y, x, scale, grad_x=None):
    """Gradients of y = scale * x + shift (per channel): (grad_x, grad_scale, grad_shift).

    With ``grad_x`` given, scale * grad_y is added into it in place (and it is returned).
    """
    mean, var = _identity_stats(scale)
    # The same zeros and ones as saved statistics (invstd 1): CUDA's kernel requires them defined
    # unless it takes its fused path (not for channels_last input, nor without grad_input).
    g_x, g_scale, g_shift = _aten.native_batch_norm_backward(
        grad_y, x, scale, mean, var, mean, var, False, 0.0, [grad_x is None, True, True])
    if grad_x is not None:
        g_x = grad_x.addcmul_(grad_y, _channel(scale).to(grad_y.dtype))
    return g_x, g_scale, g_shift


def _relu_backward_(grad, out):
    """ReLU's backward in place: grad where the ReLU output is positive, else 0."""
    return _aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def _normalized_grad(grad_xhat, xhat, invstd, group=None):
    """dL/dx from dL/d(xhat), where xhat = (x - mean) * invstd with x's batch statistics.

    This is BatchNorm's training backward written for xhat: with mean 0 and invstd 1 the kernel
    computes grad - mean(grad) - xhat * mean(grad * xhat) per channel, and the weight argument
    supplies the real invstd factor. One fused kernel. With a process ``group`` (SyncBatchNorm)
    the two means are taken over every process's batch.
    """
    if group is None:
        zeros, ones = _identity_stats(invstd)
        return _aten.native_batch_norm_backward(
            grad_xhat, xhat, invstd, None, None, zeros, ones, True, 0.0, [True, False, False])[0]
    g, xh = grad_xhat.to(invstd.dtype), xhat.to(invstd.dtype)
    sums = torch.stack([g.sum((0, 2, 3)), (g * xh).sum((0, 2, 3))])
    dist.all_reduce(sums, group=group)
    mean_g, mean_gx = sums / (g.numel() // g.shape[1] * dist.get_world_size(group))
    out = (g - _channel(mean_g) - xh * _channel(mean_gx)) * _channel(invstd)
    return out.to(grad_xhat.dtype)


def _batch_norm_train(x, weight, bias, eps, group=None):
    """Training BatchNorm: (output, batch mean, batch invstd), over ``group``'s processes if any.

    Without weight and bias, float32 identity ones are passed, so that half-precision inputs get
    float32 statistics (the mixed-precision kernel), as with nn.BatchNorm2d's float32 parameters.
    """
    if weight is None:
        bias, weight = _identity_stats(x.new_empty(0, dtype=_stat_dtype(x.dtype)), x.shape[1])
    if group is None:
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    # Two reductions (mean, then squared deviations) are slower but stabler than sum/sum-of-squares.
    count = x.numel() // x.shape[1] * dist.get_world_size(group)
    xf = x.to(_stat_dtype(x.dtype))
    mean = xf.sum((0, 2, 3))
    dist.all_reduce(mean, group=group)
    mean /= count
    var = (xf - _channel(mean)).square_().sum((0, 2, 3))
    dist.all_reduce(var, group=group)
    var /= count
    out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return out, mean, torch.rsqrt(var + eps)


class BlockSpec(NamedTuple):
    """Static description of one dense block's computation (no tensors).

    ``group_name`` names the process group whose batches share statistics (SyncBatchNorm); ""
    means this process's batch only.
    """

    growth_rate: int
    bottleneck: bool
    training: bool
    eps: float
    drop_rate: float  # 0 outside training
    recompute_bottleneck: bool
    group_name: str = ""

    @property
    def params_per_layer(self):
        return 6 if self.bottleneck else 3

    @property
    def conv1_padding(self):
        return 0 if self.bottleneck else 1

    def num_layers(self, params):
        return len(params) // self.params_per_layer

    def group(self):
        if not self.group_name:
            return None
        return dist.distributed_c10d._resolve_process_group(self.group_name)


def _stack_affine(spec, params, index):
    """One (num_layers, channels) tensor of every layer's parameter number ``index``."""
    return torch.stack(params[index::spec.params_per_layer])


@_with_identity_stats(_widest_in_block)
def block_forward(spec, x, params, dtype, keep_for_backward):
    """Run a dense block in ``dtype``. Returns (buffer, stats, saved).

    ``buffer`` holds every channel, normalised by batch statistics in training, raw in eval.
    ``stats`` is (mean, invstd, z_mean, z_invstd): the batch statistics of the buffer's channels
    and of each layer's bottleneck output, as BatchNorm computes them (empty in eval). ``saved``
    is what backward needs beyond the buffer: bottleneck outputs and dropout masks.
    """
    n, c_in, height, width = x.shape
    k = spec.growth_rate
    num_layers = spec.num_layers(params)
    if spec.training and n * height * width <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {tuple(x.shape)}")
    group = spec.group() if spec.training else None
    sdt = _stat_dtype(dtype)
    fmt = memory_format(x)
    c_total = c_in + num_layers * k
    buf = torch.empty((n, c_total, height, width), dtype=dtype, device=x.device,
                      memory_format=fmt)
    size = c_total if spec.training else 0
    mean = torch.empty(size, dtype=sdt, device=x.device)
    invstd = torch.empty(size, dtype=sdt, device=x.device)
    width2 = params[3].numel() if spec.bottleneck and spec.training else 0
    z_mean = torch.empty((num_layers, width2), dtype=sdt, device=x.device)
    z_invstd = torch.empty((num_layers, width2), dtype=sdt, device=x.device)
    saved_z, masks = [], []

    def store(lo, hi, features):
        features = features.to(dtype)
        if not spec.training:
            buf[:, lo:hi] = features
        elif group is None:
            # Normalised straight into the buffer, statistics straight into their slices.
            zeros, ones = _identity_stats(mean, hi - lo)
            _aten.native_batch_norm.out(features, ones, zeros, None, None, True, 0.0, spec.eps,
                                        out=buf[:, lo:hi], save_mean=mean[lo:hi],
                                        save_invstd=invstd[lo:hi])
        else:
            buf[:, lo:hi], mean[lo:hi], invstd[lo:hi] = _batch_norm_train(
                features, None, None, spec.eps, group)

    store(0, c_in, x)
    for j in range(num_layers):
        c = c_in + j * k
        p = params[j * spec.params_per_layer:(j + 1) * spec.params_per_layer]
        new = _conv_of_affine_relu(buf, _chunks(buf, c), p[0].to(sdt), p[1].to(sdt),
                                   p[2].to(dtype), spec.conv1_padding)
        if spec.bottleneck:
            z = new
            if spec.training and group is None:
                u = torch.empty_like(z)  # statistics straight into their rows
                _aten.native_batch_norm.out(z, p[3].to(sdt), p[4].to(sdt), None, None, True,
                                            0.0, spec.eps, out=u, save_mean=z_mean[j],
                                            save_invstd=z_invstd[j])
                u = u.relu_()
            elif spec.training:
                u, z_mean[j], z_invstd[j] = _batch_norm_train(
                    z, p[3].to(sdt), p[4].to(sdt), spec.eps, group)
                u = u.relu_()
            else:
                u = _affine_relu(z, p[3].to(sdt), p[4].to(sdt))
            if keep_for_backward and not spec.recompute_bottleneck:
                saved_z.append(z.contiguous(memory_format=fmt))
            del z
            new = F.conv2d(u, p[5].to(dtype), padding=1)
            del u
        if spec.drop_rate > 0:
            # Same random draws as F.dropout(new) (RNG use depends on shape only), but the mask
            # is kept so that backward applies exactly the forward's mask.
            scaled_mask = F.dropout(torch.ones_like(new), spec.drop_rate, True)
            new = new * scaled_mask
            if keep_for_backward:
                masks.append((scaled_mask != 0).contiguous(memory_format=fmt))
        store(c, c + k, new)
    return buf, (mean, invstd, z_mean, z_invstd), (saved_z, masks)


@_with_identity_stats(_widest_in_block_backward)
def block_backward(spec, grad_buf, buf, invstd, z_mean_all, z_invstd_all, params, saved_z,
                   masks, x_dtype):
    """Gradients of a dense block: [dL/dx, dL/dparam for each param], from dL/d(buffer)."""
    dtype = buf.dtype
    sdt = _stat_dtype(dtype)
    fmt = memory_format(buf)
    k = spec.growth_rate
    num_layers = spec.num_layers(params)
    c_in = buf.shape[1] - num_layers * k
    group = spec.group() if spec.training else None

    # Accumulates dL/d(buffer) from every reader of each channel.
    grad = torch.empty_like(buf)
    grad.copy_(grad_buf)
    param_grads = [None] * len(params)
    if spec.bottleneck and spec.training:
        # Layer j's bottleneck BatchNorm as relu(scale2 * z + shift2), for all layers at once.
        scale2 = _stack_affine(spec, params, 3).to(sdt) * z_invstd_all
        shift2 = _stack_affine(spec, params, 4).to(sdt) - z_mean_all * scale2

    def channel_grad(lo, hi):
        """dL/d(features) for channels whose readers are all done."""
        if spec.training:
            return _normalized_grad(grad[:, lo:hi], buf[:, lo:hi], invstd[lo:hi], group)
        return grad[:, lo:hi]

    for j in reversed(range(num_layers)):
        c = c_in + j * k
        base = j * spec.params_per_layer
        p = params[base:base + spec.params_per_layer]
        g_new = channel_grad(c, c + k)
        if spec.drop_rate > 0:
            g_new = g_new * masks[j] * (1.0 / (1.0 - spec.drop_rate))
        w1 = p[2].to(dtype)
        scale1, shift1 = p[0].to(sdt), p[1].to(sdt)
        chunks = _chunks(buf, c)
        whole = None  # (input slice, its affine-ReLU) when the layer is one chunk: made once
        if spec.bottleneck:
            if not spec.recompute_bottleneck:
                z = saved_z[j]
            elif len(chunks) == 1:
                whole = _layer_input(buf, 0, c, scale1, shift1)
                z = F.conv2d(whole[1], w1)
            else:
                z = _conv_of_affine_relu(buf, chunks, scale1, shift1, w1, 0)
            scale = p[3].to(sdt)
            if spec.training:
                u = _affine_relu(z, scale2[j], shift2[j])
            else:
                u = _affine_relu(z, scale, p[4].to(sdt))
            g_u, g_w2, _ = _aten.convolution_backward(
                g_new, u, p[5].to(dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, True, False])
            g_u = _relu_backward_(g_u, u)
            del u
            if spec.training and group is not None:
                z_mean, z_invstd = z_mean_all[j], z_invstd_all[j]
                # In the statistics' dtype, as the kernel below computes: z_hat is float32 for
                # half-precision z, and the kernels need g_u in the same dtype.
                g_u = g_u.to(sdt)
                z_hat = (z - _channel(z_mean)) * _channel(z_invstd)
                _, g_scale2, g_shift2 = _affine_backward(g_u, z_hat, scale)
                g_z = _normalized_grad(g_u * _channel(scale), z_hat, z_invstd, group)
                g_z = g_z.to(dtype)
                del z_hat
            elif spec.training:
                # Mixed precision is fine here: statistics and gamma stay in float32.
                g_z, g_scale2, g_shift2 = _aten.native_batch_norm_backward(
                    g_u, z, scale, None, None, z_mean_all[j], z_invstd_all[j], True, spec.eps,
                    [True, True, True])
            else:
                g_z, g_scale2, g_shift2 = _affine_backward(g_u, z, scale)
            del g_u, z
            param_grads[base + 3] = g_scale2
            param_grads[base + 4] = g_shift2
            param_grads[base + 5] = g_w2
            g_out = g_z
        else:
            g_out = g_new
        pad = spec.conv1_padding
        parts = []  # (g_w1, g_scale1, g_shift1) per chunk
        for lo, hi in chunks:
            inputs, h = whole or _layer_input(buf, lo, hi, scale1, shift1)
            whole = None
            g_h, g_w1, _ = _aten.convolution_backward(
                g_out, h, w1[:, lo:hi], None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                [True, True, False])
            g_h = _relu_backward_(g_h, h)
            del h
            _, g_scale1, g_shift1 = _affine_backward(g_h, inputs, scale1[lo:hi],
                                                     grad_x=grad[:, lo:hi])
            del g_h, inputs
            parts.append((g_w1, g_scale1, g_shift1))
        del g_out
        g_w1, g_scale1, g_shift1 = _joined(parts, (1, 0, 0))
        param_grads[base] = g_scale1
        param_grads[base + 1] = g_shift1
        param_grads[base + 2] = g_w1

    grad_x = channel_grad(0, c_in).to(x_dtype).contiguous(memory_format=fmt)
    return [grad_x] + [_like(g, p) for g, p in zip(param_grads, params, strict=True)]


def _layer_input(buf, lo, hi, scale, shift):
    """(buffer channels lo:hi, their affine-ReLU) as a layer's backward reads them."""
    inputs = buf[:, lo:hi]
    if inputs.device.type == "cpu":
        # On a CPU one contiguous copy is cheaper than two BatchNorm kernels on a strided
        # slice; GPU kernels read the slice at full speed, and the copy would add to the
        # peak memory.
        inputs = inputs.contiguous(memory_format=memory_format(buf))
    return inputs, _affine_relu(inputs, scale[lo:hi], shift[lo:hi])


def _like(grad, param):
    """``grad`` in ``param``'s dtype and layout (what the fake implementations promise)."""
    return grad.to(param.dtype).contiguous(memory_format=memory_format(param))


@_with_identity_stats(_widest_read)
def reader_forward(buf, scale, shift, weight, global_pool):
    """BatchNorm-ReLU of the buffer, then a 2x2 average pool and a 1x1 conv (transition), or a
    global average pool (head, ``weight`` None); a slice of channels at a time."""
    sdt = _stat_dtype(buf.dtype)
    scale, shift = scale.to(sdt), shift.to(sdt)
    if global_pool:
        pooled = [_affine_relu(buf[:, lo:hi], scale[lo:hi], shift[lo:hi]).mean((2, 3))
                  for lo, hi in _chunks(buf, buf.shape[1])]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)
    # Pool, then conv: the same as conv-then-pool for a 1x1 conv, at a quarter of the cost.
    weight = weight.to(buf.dtype)
    out = _sum_over_chunks(_chunks(buf, buf.shape[1]), lambda lo, hi: F.conv2d(
        F.avg_pool2d(_affine_relu(buf[:, lo:hi], scale[lo:hi], shift[lo:hi]), 2),
        weight[:, lo:hi]))
    return out.contiguous(memory_format=memory_format(buf))


@_with_identity_stats(lambda grad_out, *args: _widest_read(*args))
def reader_backward(grad_out, buf, scale, shift, weight, global_pool):
    """[dL/d(buffer), dL/d(scale), dL/d(shift)] (+ [dL/d(weight)] for a transition)."""
    dtype, sdt = buf.dtype, _stat_dtype(buf.dtype)
    fmt = memory_format(buf)
    grad_out = grad_out.to(dtype)
    scale32, shift32 = scale.to(sdt), shift.to(sdt)
    weight_c = None if global_pool else weight.to(dtype)
    chunks = _chunks(buf, buf.shape[1])
    g_buf = None if len(chunks) == 1 else torch.zeros_like(buf)
    parts = []  # (g_scale, g_shift, g_weight) per chunk
    for lo, hi in chunks:
        x = buf[:, lo:hi]
        h = _affine_relu(x, scale32[lo:hi], shift32[lo:hi])
        if global_pool:
            area = h.shape[2] * h.shape[3]
            g_h = (grad_out[:, lo:hi] / area)[:, :, None, None].expand_as(h)
            g_w = None
        else:
            pooled = F.avg_pool2d(h, 2)
            g_pooled, g_w, _ = _aten.convolution_backward(
                grad_out, pooled, weight_c[:, lo:hi], None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], 1, [True, True, False])
            del pooled
            g_h = _aten.avg_pool2d_backward(g_pooled, h, [2, 2], [2, 2], [0, 0], False, True,
                                            None)
            del g_pooled
        g_h = _relu_backward_(g_h.contiguous(memory_format=memory_format(h)), h)
        del h
        g_x, g_scale, g_shift = _affine_backward(
            g_h, x, scale32[lo:hi], grad_x=None if g_buf is None else g_buf[:, lo:hi])
        del g_h
        if g_buf is None:
            g_buf = g_x
        parts.append((g_scale, g_shift, g_w))
    g_scale, g_shift, g_w = _joined(parts, (0, 0, 1))
    grads = [g_buf.contiguous(memory_format=fmt), _like(g_scale, scale), _like(g_shift, shift)]
    return grads + ([] if global_pool else [_like(g_w, weight)])


# The operators. Fake implementations compute only shapes, dtypes and layouts, exactly as the
# real ones lay out their outputs; autocast is off inside the real ones (the dtype is explicit).

@torch.library.custom_op("densenet::dense_block", mutates_args=())
def _dense_block_op(x: Tensor, params: list[Tensor], dtype: torch.dtype, keep_for_backward: bool,
                    growth_rate: int, bottleneck: bool, training: bool, eps: float,
                    drop_rate: float, recompute_bottleneck: bool, group_name: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    spec = BlockSpec(growth_rate, bottleneck, training, eps, drop_rate, recompute_bottleneck,
                     group_name)
    with torch.autocast(x.device.type, enabled=False):
        buf, stats, (saved_z, masks) = block_forward(spec, x, params, dtype, keep_for_backward)
    return (buf, *stats, saved_z, masks)


@_dense_block_op.register_fake
def _(x, params, dtype, keep_for_backward, growth_rate, bottleneck, training, eps, drop_rate,
      recompute_bottleneck, group_name):
    spec = BlockSpec(growth_rate, bottleneck, training, eps, drop_rate, recompute_bottleneck,
                     group_name)
    n, c_in, height, width = x.shape
    num_layers = spec.num_layers(params)
    fmt, sdt = memory_format(x), _stat_dtype(dtype)

    def maps(channels, dtype=dtype):
        return torch.empty((n, channels, height, width), dtype=dtype, device=x.device,
                           memory_format=fmt)

    buf = maps(c_in + num_layers * growth_rate)
    size = buf.shape[1] if training else 0
    width2 = params[3].shape[0] if bottleneck and training else 0
    stats = [x.new_empty(size, dtype=sdt), x.new_empty(size, dtype=sdt),
             x.new_empty((num_layers, width2), dtype=sdt),
             x.new_empty((num_layers, width2), dtype=sdt)]
    keep_z = keep_for_backward and bottleneck and not recompute_bottleneck
    saved_z = [maps(params[2].shape[0]) for _ in range(num_layers)] if keep_z else []
    keep_masks = keep_for_backward and drop_rate > 0
    masks = [maps(growth_rate, torch.bool) for _ in range(num_layers)] if keep_masks else []
    return (buf, *stats, saved_z, masks)


@torch.library.custom_op("densenet::dense_block_backward", mutates_args=())
def _dense_block_backward_op(grad_buf: Tensor, buf: Tensor, invstd: Tensor, z_mean: Tensor,
                             z_invstd: Tensor, params: list[Tensor], saved_z: list[Tensor],
                             masks: list[Tensor], x_dtype: torch.dtype, growth_rate: int,
                             bottleneck: bool, training: bool, eps: float, drop_rate: float,
                             recompute_bottleneck: bool, group_name: str) -> list[Tensor]:
    spec = BlockSpec(growth_rate, bottleneck, training, eps, drop_rate, recompute_bottleneck,
                     group_name)
    with torch.autocast(buf.device.type, enabled=False):
        return block_backward(spec, grad_buf, buf, invstd, z_mean, z_invstd, params, saved_z,
                              masks, x_dtype)


@_dense_block_backward_op.register_fake
def _(grad_buf, buf, invstd, z_mean, z_invstd, params, saved_z, masks, x_dtype, growth_rate,
      bottleneck, training, eps, drop_rate, recompute_bottleneck, group_name):
    num_layers = len(params) // (6 if bottleneck else 3)
    n, c_total, height, width = buf.shape
    grad_x = torch.empty((n, c_total - num_layers * growth_rate, height, width), dtype=x_dtype,
                         device=buf.device, memory_format=memory_format(buf))
    return [grad_x] + [torch.empty_like(p) for p in params]


@torch.library.custom_op("densenet::read_buffer", mutates_args=())
def _read_buffer_op(buf: Tensor, scale: Tensor, shift: Tensor, weight: Tensor | None,
                    global_pool: bool) -> Tensor:
    with torch.autocast(buf.device.type, enabled=False):
        return reader_forward(buf, scale, shift, weight, global_pool)


@_read_buffer_op.register_fake
def _(buf, scale, shift, weight, global_pool):
    n, _, height, width = buf.shape
    if global_pool:
        return buf.new_empty(buf.shape[:2])
    return torch.empty((n, weight.shape[0], height // 2, width // 2), dtype=buf.dtype,
                       device=buf.device, memory_format=memory_format(buf))


@torch.library.custom_op("densenet::read_buffer_backward", mutates_args=())
def _read_buffer_backward_op(grad_out: Tensor, buf: Tensor, scale: Tensor, shift: Tensor,
                             weight: Tensor | None, global_pool: bool) -> list[Tensor]:
    with torch.autocast(buf.device.type, enabled=False):
        return reader_backward(grad_out, buf, scale, shift, weight, global_pool)


@_read_buffer_backward_op.register_fake
def _(grad_out, buf, scale, shift, weight, global_pool):
    grads = [torch.empty_like(buf), torch.empty_like(scale), torch.empty_like(shift)]
    return grads + ([] if global_pool else [torch.empty_like(weight)])


DOUBLE_BACKWARD_ERROR = (
    "The efficient DenseNet (efficient=True) does not support double backward (gradients of "
    "gradients, create_graph=True followed by another backward): build the model with "
    "efficient=False for that; both modes share one state_dict.")


class _NoDoubleBackward(torch.autograd.Function):
    """Runs a backward operator; differentiating its result raises DOUBLE_BACKWARD_ERROR."""

    @staticmethod
    def forward(call, *tensors):
        return tuple(call(*tensors))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _backward_op(op, *args):
    """``op(*args)``, recorded by autograd only when a graph of the backward is built
    (create_graph=True, torch.func transforms), so that double backward fails clearly."""
    if not torch.is_grad_enabled():
        return op(*args)
    flat, spec = pytree.tree_flatten(args)
    where = [i for i, a in enumerate(flat) if isinstance(a, Tensor)]

    def call(*tensors):
        values = list(flat)
        for i, t in zip(where, tensors, strict=True):
            values[i] = t
        return op(*pytree.tree_unflatten(values, spec))

    return list(_NoDoubleBackward.apply(call, *(flat[i] for i in where)))


class DenseBlockFunction(torch.autograd.Function):
    """A whole dense block as one autograd node; see the module docstring.

    ``apply(spec, dtype, x, *params)`` returns the buffer, its statistics (not differentiable;
    see block_forward) and then the bottleneck outputs and dropout masks kept for backward.
    """

    @staticmethod
    def forward(spec, dtype, x, *params):
        buf, mean, invstd, z_mean, z_invstd, saved_z, masks = _dense_block_op(
            x, list(params), dtype, True, *spec)
        return (buf, mean, invstd, z_mean, z_invstd, *saved_z, *masks)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, _, x, *params = inputs
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        ctx.num_params = len(params)
        ctx.num_z = spec.num_layers(params) \
            if spec.bottleneck and not spec.recompute_bottleneck else 0
        ctx.save_for_backward(output[0], *output[2:], *params)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_buf, *unused):
        spec = ctx.spec
        if grad_buf is None:
            return (None, None, None) + (None,) * ctx.num_params
        buf, invstd, z_mean, z_invstd, *rest = ctx.saved_tensors
        params = rest[len(rest) - ctx.num_params:]
        saved_z, masks = rest[:ctx.num_z], rest[ctx.num_z:len(rest) - ctx.num_params]
        grads = _backward_op(_dense_block_backward_op, grad_buf, buf, invstd, z_mean, z_invstd,
                             list(params), list(saved_z), list(masks), ctx.x_dtype, *spec)
        return (None, None, *grads)


class ReaderFunction(torch.autograd.Function):
    """A BatchNorm-ReLU reader of a block's buffer, then a pool and an optional 1x1 conv.

    Used for transitions (pool 2x2, then conv) and for the head (global pool, no conv).
    Saves only the buffer (and the parameters).
    """

    @staticmethod
    def forward(global_pool, buf, scale, shift, weight):
        return _read_buffer_op(buf, scale, shift, weight, global_pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        global_pool, buf, scale, shift, weight = inputs
        ctx.global_pool = global_pool
        ctx.save_for_backward(buf, scale, shift, weight)

    @staticmethod
    def backward(ctx, grad_out):
        buf, scale, shift, weight = ctx.saved_tensors
        grads = _backward_op(_read_buffer_backward_op, grad_out, buf, scale, shift, weight,
                             ctx.global_pool)
        return None, grads[0], grads[1], grads[2], None if weight is None else grads[3]
