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
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel(v):
    return v.view(1, -1, 1, 1)


_IDENTITY = {}  # (device, dtype) -> (zeros, ones), grown as needed: two launches fewer per call


def _identity_stats(like):
    """Zero means and unit variances for ``like.numel()`` channels."""
    key, n = (like.device, like.dtype), like.numel()
    zeros, ones = _IDENTITY.get(key, (like.new_empty(0), like.new_empty(0)))
    if zeros.numel() < n:
        zeros, ones = like.new_zeros(2 * n), like.new_ones(2 * n)
        _IDENTITY[key] = zeros, ones
    return zeros[:n], ones[:n]


def _affine_relu(x, scale, shift):
    """relu(scale * x + shift) per channel, into a new tensor.

    BatchNorm's inference kernel with mean 0, variance 1 and eps 0 is exactly this affine map,
    with float32 scale and shift even for half-precision x (one rounding, as nn.BatchNorm2d).
    """
    mean, var = _identity_stats(scale)
    return F.batch_norm(x, mean, var, scale, shift, False, 0.0, 0.0).relu_()


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
    """Training BatchNorm: (output, batch mean, batch invstd), over ``group``'s processes if any."""
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


class BlockSpec:
    """Static description of one dense block's computation (no tensors)."""

    def __init__(self, num_layers, growth_rate, bottleneck, training, eps, drop_rate,
                 recompute_bottleneck, group=None):
        self.num_layers = num_layers
        self.growth_rate = growth_rate
        self.bottleneck = bottleneck
        self.training = training
        self.eps = eps
        self.drop_rate = drop_rate if training else 0.0
        self.recompute_bottleneck = recompute_bottleneck
        self.params_per_layer = 6 if bottleneck else 3
        self.conv1_padding = 0 if bottleneck else 1
        self.group = group  # process group whose batches share statistics (SyncBatchNorm)


def _bottleneck_input(spec, z, z_mean, z_invstd, scale2, shift2):
    """relu(norm2(z)) recomputed: saved batch statistics (training) or folded running ones."""
    if spec.training:
        scale = scale2 * z_invstd
        return _affine_relu(z, scale, shift2 - z_mean * scale)
    return _affine_relu(z, scale2, shift2)


def block_forward(spec, x, params, keep_for_backward):
    """Run a dense block. Returns (buffer, stats, saved).

    ``buffer`` holds every channel, normalised by batch statistics in training, raw in eval.
    ``stats`` is (mean, invstd, z_mean, z_invstd): the batch statistics of the buffer's channels
    and of each layer's bottleneck output, as BatchNorm computes them (empty in eval). ``saved``
    is what backward needs beyond the buffer: bottleneck outputs and dropout masks.
    """
    n, c_in, height, width = x.shape
    k = spec.growth_rate
    if spec.training and n * height * width <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {tuple(x.shape)}")
    dtype = compute_dtype(x)
    sdt = _stat_dtype(dtype)
    c_total = c_in + spec.num_layers * k
    buf = torch.empty((n, c_total, height, width), dtype=dtype, device=x.device,
                      memory_format=memory_format(x))
    size = c_total if spec.training else 0
    mean = torch.empty(size, dtype=sdt, device=x.device)
    invstd = torch.empty(size, dtype=sdt, device=x.device)
    width2 = params[3].numel() if spec.bottleneck and spec.training else 0
    z_mean = torch.empty((spec.num_layers, width2), dtype=sdt, device=x.device)
    z_invstd = torch.empty((spec.num_layers, width2), dtype=sdt, device=x.device)
    saved_z, masks = [], []

    def store(lo, hi, features):
        if spec.training:
            normalized, mean[lo:hi], invstd[lo:hi] = _batch_norm_train(
                features, None, None, spec.eps, spec.group)
            buf[:, lo:hi] = normalized
        else:
            buf[:, lo:hi] = features

    store(0, c_in, x)
    for j in range(spec.num_layers):
        c = c_in + j * k
        p = params[j * spec.params_per_layer:(j + 1) * spec.params_per_layer]
        h = _affine_relu(buf[:, :c], p[0], p[1])
        new = F.conv2d(h, p[2].to(dtype), padding=spec.conv1_padding)
        del h
        if spec.bottleneck:
            z = new
            if spec.training:
                u, z_mean[j], z_invstd[j] = _batch_norm_train(
                    z, p[3], p[4], spec.eps, spec.group)
                u = u.relu_()
            else:
                u = _bottleneck_input(spec, z, None, None, p[3], p[4])
            if keep_for_backward and not spec.recompute_bottleneck:
                saved_z.append(z)
            del z
            new = F.conv2d(u, p[5].to(dtype), padding=1)
            del u
        if spec.drop_rate > 0:
            # Same random draws as F.dropout(new) (RNG use depends on shape only), but the mask
            # is kept so that backward applies exactly the forward's mask.
            scaled_mask = F.dropout(torch.ones_like(new), spec.drop_rate, True)
            new = new * scaled_mask
            if keep_for_backward:
                masks.append(scaled_mask != 0)
        store(c, c + k, new)
    return buf, (mean, invstd, z_mean, z_invstd), (saved_z, masks)


class DenseBlockFunction(torch.autograd.Function):
    """A whole dense block as one autograd node; see the module docstring.

    Returns the buffer and, not differentiable, its statistics (see block_forward).
    """

    @staticmethod
    def forward(ctx, spec, x, *params):
        buf, stats, (saved_z, masks) = block_forward(spec, x, params, keep_for_backward=True)
        ctx.spec = spec
        ctx.x_dtype = x.dtype
        ctx.num_z = len(saved_z)
        ctx.save_for_backward(buf, *stats, *params, *saved_z, *masks)
        ctx.mark_non_differentiable(*stats)
        return (buf, *stats)

    @staticmethod
    def backward(ctx, grad_buf, *unused_stat_grads):
        spec = ctx.spec
        saved = ctx.saved_tensors
        buf, _, invstd, z_mean_all, z_invstd_all = saved[:5]
        num_params = spec.num_layers * spec.params_per_layer
        params = saved[5:5 + num_params]
        saved_z = saved[5 + num_params:5 + num_params + ctx.num_z]
        masks = saved[5 + num_params + ctx.num_z:]
        dtype = buf.dtype
        k = spec.growth_rate
        c_in = buf.shape[1] - spec.num_layers * k

        # Accumulates dL/d(buffer) from every reader of each channel.
        grad = torch.empty_like(buf)
        if grad_buf is None:
            grad.zero_()
        else:
            grad.copy_(grad_buf)
        param_grads = [None] * num_params

        def channel_grad(lo, hi):
            """dL/d(features) for channels whose readers are all done."""
            if spec.training:
                return _normalized_grad(grad[:, lo:hi], buf[:, lo:hi], invstd[lo:hi], spec.group)
            return grad[:, lo:hi]

        for j in reversed(range(spec.num_layers)):
            c = c_in + j * k
            p = params[j * spec.params_per_layer:(j + 1) * spec.params_per_layer]
            g_new = channel_grad(c, c + k)
            if spec.drop_rate > 0:
                g_new = g_new * masks[j] * (1.0 / (1.0 - spec.drop_rate))
            w1 = p[2].to(dtype)
            inputs = buf[:, :c]
            if inputs.device.type == "cpu":
                # On a CPU one contiguous copy is cheaper than two BatchNorm kernels on a strided
                # slice; GPU kernels read the slice at full speed, and the copy would add to the
                # peak memory.
                inputs = inputs.contiguous(memory_format=memory_format(buf))
            h = _affine_relu(inputs, p[0], p[1])
            if spec.bottleneck:
                z = F.conv2d(h, w1) if spec.recompute_bottleneck else saved_z[j]
                z_mean = z_mean_all[j] if spec.training else None
                z_invstd = z_invstd_all[j] if spec.training else None
                u = _bottleneck_input(spec, z, z_mean, z_invstd, p[3], p[4])
                g_u, g_w2, _ = _aten.convolution_backward(
                    g_new, u, p[5].to(dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                    [True, True, False])
                g_u = _relu_backward_(g_u, u)
                del u
                if spec.training and spec.group is not None:
                    z_hat = (z - _channel(z_mean)) * _channel(z_invstd)
                    _, g_scale2, g_shift2 = _affine_backward(g_u, z_hat, p[3])
                    g_z = _normalized_grad(g_u * _channel(p[3]), z_hat, z_invstd, spec.group)
                    g_z = g_z.to(dtype)
                    del z_hat
                elif spec.training:
                    # Mixed precision is fine here: statistics and gamma stay in float32.
                    g_z, g_scale2, g_shift2 = _aten.native_batch_norm_backward(
                        g_u, z, p[3], None, None, z_mean, z_invstd, True, spec.eps,
                        [True, True, True])
                else:
                    g_z, g_scale2, g_shift2 = _affine_backward(g_u, z, p[3])
                del g_u, z
                param_grads[j * 6 + 3] = g_scale2.to(p[3].dtype)
                param_grads[j * 6 + 4] = g_shift2.to(p[4].dtype)
                param_grads[j * 6 + 5] = g_w2.to(p[5].dtype)
                g_out = g_z
            else:
                g_out = g_new
            pad = spec.conv1_padding
            g_h, g_w1, _ = _aten.convolution_backward(
                g_out, h, w1, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                [True, True, False])
            g_h = _relu_backward_(g_h, h)
            del h, g_out
            _, g_scale1, g_shift1 = _affine_backward(g_h, inputs, p[0], grad_x=grad[:, :c])
            del g_h, inputs
            base = j * spec.params_per_layer
            param_grads[base] = g_scale1.to(p[0].dtype)
            param_grads[base + 1] = g_shift1.to(p[1].dtype)
            param_grads[base + 2] = g_w1.to(p[2].dtype)

        grad_x = channel_grad(0, c_in).to(ctx.x_dtype)
        return (None, grad_x, *param_grads)


class ReaderFunction(torch.autograd.Function):
    """A BatchNorm-ReLU reader of a block's buffer, then a pool and an optional 1x1 conv.

    Used for transitions (pool 2x2, then conv: the same as conv-then-pool for a 1x1 conv, at a
    quarter of the cost) and for the head (global pool, no conv). Saves only the buffer.
    """

    @staticmethod
    def forward(ctx, global_pool, buf, scale, shift, weight):
        dtype = buf.dtype
        h = _affine_relu(buf, scale, shift)
        pooled = h.mean((2, 3)) if global_pool else F.avg_pool2d(h, 2)
        out = pooled if weight is None else F.conv2d(pooled, weight.to(dtype))
        ctx.global_pool = global_pool
        ctx.save_for_backward(buf, scale, shift, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        buf, scale, shift, weight = ctx.saved_tensors
        dtype = buf.dtype
        grad_out = grad_out.to(dtype)
        h = _affine_relu(buf, scale, shift)
        grad_weight = None
        if weight is None:
            g_pooled = grad_out
        else:
            pooled = F.avg_pool2d(h, 2)
            g_pooled, grad_weight, _ = _aten.convolution_backward(
                grad_out, pooled, weight.to(dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                1, [True, True, False])
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.global_pool:
            area = h.shape[2] * h.shape[3]
            g_h = (g_pooled / area)[:, :, None, None].expand_as(h)
        else:
            g_h = _aten.avg_pool2d_backward(g_pooled, h, [2, 2], [2, 2], [0, 0], False, True, None)
        g_h = _relu_backward_(g_h.contiguous(memory_format=memory_format(h)), h)
        g_buf, g_scale, g_shift = _affine_backward(g_h, buf, scale)
        return None, g_buf, g_scale.to(scale.dtype), g_shift.to(shift.dtype), grad_weight
