"""Memory model of a DenseNet training step, predicted from the architecture alone.

Pure arithmetic on shapes: nothing is built, so it answers at once for any depth. Notation: batch
N; compute dtype of d bytes (4 in float32, 2 under bf16 or fp16 autocast); a "map" of c channels
in a block of resolution HxW is N*c*H*W values of d bytes. Block b has L layers of growth rate k;
layer j reads c_j = c_in + j*k channels; w = bn_size*k is the bottleneck width (0 without one); the
block ends with C = c_in + L*k channels and its transition keeps C' = floor(C * compression).

Parameters P: conv0; per layer BatchNorm (2 c_j) and conv1 (c_j*w), BatchNorm (2w) and conv2
(9*w*k), or without a bottleneck BatchNorm (2 c_j) and a 3x3 conv (9*c_j*k); per transition
BatchNorm (2C) and conv (C*C'); norm5 (2C) and the classifier (C*classes + classes).
Multiply-accumulates per image: those of the convolutions (at their resolution) and the classifier.

Saved for backward: the distinct storages autograd keeps after a training forward, parameters and
the input excluded (what measure.saved_tensor_bytes(..., activations_only=True) counts).
  naive: per layer its concatenated input and that input's BatchNorm output (2 c_j maps) and, with
    a bottleneck, the 1x1 output and its BatchNorm output (2w maps); per BatchNorm four float32
    vectors (running mean and variance, batch mean and inverse std); per block its concatenated
    output (C maps); per transition its BatchNorm output (C maps) and conv output (C' maps); norm5's
    ReLU output (C maps) and the pooled features. Dropout keeps a mask of k maps per layer (in the
    compute dtype on a CPU, 1 byte on CUDA). Under autocast also a d-byte copy of every
    convolution's weight.
  efficient: per block one buffer of C maps (every channel, normalised), the L bottleneck outputs
    (L*w maps), float32 statistics (C + 2Lw values: the buffer's inverse standard deviations, the
    bottleneck outputs' means and inverse standard deviations) and, with dropout, 1-byte masks
    (k maps per layer). Transitions and the head read the buffer and keep nothing more but the
    pooled features.
  efficient + recompute_bottleneck: the same without the L*w bottleneck maps.
  torchvision memory_efficient=True (checkpoints concat-BatchNorm-ReLU-conv1 in each layer): per
    block the checkpoints' inputs (c_in + (L-1)*k maps: the block input and all new features but
    the last one), per layer the bottleneck output and its BatchNorm output (2w maps), the block
    output, transitions and head as naive; under autocast the copies of the conv2 and transition
    weights.
  Every mode adds: under autocast d-byte copies of the input, of conv0's and of the classifier's
  weights; with the ImageNet stem conv0's output and its BatchNorm output (2 c0 maps at the
  stem's resolution), the max-pool indices (8 bytes per value of its output) and four BatchNorm
  vectors.

State: parameters, gradients and SGD's momentum buffers, 3P float32 values (12 bytes each).

Peak of a training step (forward, backward, optimizer step): the largest of these moments, each
plus the input batch and the BatchNorm running statistics. c = C - k is the last layer's input.
  Forward, end of block b: 3P (the last step's gradients still exist) + everything saved so far,
    the block's included, + naive and torchvision: the block's list of features (C maps);
    efficient: the block's input (c_in maps) and the last layer's working tensors (s + o maps,
    where o = w, or k without a bottleneck, + o in float32 for the partial sums when s < c, and
    on a CPU its convolution's input reordered to a multiple of 16 channels). s is the widest
    slice of channels the layer works on at once: c, or fewer when c maps exceed
    efficient.CHUNK_BYTES (efficient.channel_chunks).
  Forward, end: 3P + everything saved.
  Backward, last layer of block b (its widest): 2P + the gradients of that layer and of all
    that follows the block + everything saved up to and including block b (for naive and
    torchvision, the block output's C maps stand for its gradient, which replaced them) +
    efficient (both modes): the buffer's incoming gradient and the gradient it accumulates into
      (2C maps) + the last layer's working tensors: its output's gradient (k), a slice of its
      normalised, ReLU'd input and that slice's gradient (2s), the bottleneck's gradient (w)
      and, on a CPU, a contiguous copy of the buffer slice (s) and oneDNN's reordered copies in
      the 1x1 convolution's backward (w, and s rounded up to a multiple of 16 unless
      channels_last; without a bottleneck: no w terms, and oneDNN's copies are k and s rounded
      up); or, if larger, the moment before: the bottleneck's backward, with its output's
      gradient (k), the BatchNorm-ReLU'd bottleneck output and its gradient (2w), the
      recomputed bottleneck output (w, recompute_bottleneck only, with, when the layer is one
      slice, that slice and its copy kept for the slices' step) and on a CPU oneDNN's copies of
      the last two (2w). Efficient modes: the largest of this at the block's last layer, at its
      first and at the first layer whose input fills a whole slice (with chunks the work stops
      growing there), each with the gradients of its own and all later layers;
    naive and torchvision: the last layer's input gradients (2c + w) and on a CPU oneDNN's
      copies (w + c rounded up to a multiple of 16 unless channels_last).
  Optimizer step (demo.py's SGD with Nesterov momentum and weight decay): 3P, + P on a CPU
    (the foreach implementation adds the weight decay to a copy of the gradients; CUDA's fused
    one works in place).

Known limits: this is tensor memory, as the allocator sees it. A CPU process also needs room for
oneDNN's compiled kernels and Python's objects (see results/memory-search-cpu.md); the CPU terms
follow PyTorch's CPU kernels (oneDNN). CUDA predictions leave out cuDNN's workspaces and the
caching allocator's rounding and fragmentation, and have not been checked on a GPU yet.
"""

import math
import numbers
from dataclasses import dataclass

from .densenet import check_architecture, check_positive_int
from .efficient import channel_chunks

MODES = ("naive", "efficient", "recompute_bottleneck", "torchvision_memory_efficient")
BOTTLENECK_MODES = ("recompute_bottleneck", "torchvision_memory_efficient")
COMPUTE_BYTES = {"off": 4, "bf16": 2, "fp16": 2}
FLOAT = 4  # parameters, gradients, momentum and statistics stay float32


@dataclass(frozen=True)
class Block:
    """One dense block: input channels, layers, output channels, resolution."""

    c_in: int
    layers: int
    c_out: int
    height: int
    width: int

    def input_sum(self, growth_rate):
        """The sum over the block's layers of the channels each one reads."""
        return self.layers * self.c_in + growth_rate * self.layers * (self.layers - 1) // 2


@dataclass(frozen=True)
class Network:
    """A DenseNet's shapes on one image size; build it with network()."""

    growth_rate: int
    bottleneck_width: int  # bn_size * growth_rate; 0 without bottleneck layers
    num_init_features: int
    drop_rate: float
    num_classes: int
    small_inputs: bool
    image: tuple  # (height, width)
    stem: tuple  # resolution after conv0
    blocks: tuple  # Block per dense block
    transitions: tuple  # output channels of each transition

    @property
    def features(self):
        return self.blocks[-1].c_out


def network(growth_rate=12, block_config=(16, 16, 16), compression=0.5, num_init_features=24,
            bn_size=4, drop_rate=0.0, num_classes=10, small_inputs=True, image_size=32):
    """The shapes of DenseNet(...) (same arguments) on images of ``image_size`` (an int or
    (height, width)). ValueError for arguments DenseNet refuses or images too small for it."""
    bn_size = check_architecture(growth_rate, block_config, compression, num_init_features,
                                 bn_size, drop_rate, num_classes)
    size = (image_size, image_size) if isinstance(image_size, numbers.Integral) \
        else tuple(image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an integer or (height, width), got {image_size!r}")
    height, width = (check_positive_int("image_size", s) for s in size)
    if small_inputs:
        stem = h, w = height, width
    else:  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool, both padded
        stem = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        h, w = (stem[0] - 1) // 2 + 1, (stem[1] - 1) // 2 + 1
    blocks, transitions = [], []
    channels = num_init_features
    for i, layers in enumerate(block_config):
        if h < 1 or w < 1:
            raise ValueError(f"{height}x{width} images are too small for {len(block_config)} "
                             f"dense blocks (each transition halves the resolution)")
        c_out = channels + layers * growth_rate
        blocks.append(Block(channels, layers, c_out, h, w))
        if i < len(block_config) - 1:
            channels = int(math.floor(c_out * compression))
            if channels < 1:
                raise ValueError(f"compression {compression} leaves no channels after block "
                                 f"{i + 1}")
            transitions.append(channels)
            h, w = h // 2, w // 2
    return Network(growth_rate, bn_size * growth_rate, num_init_features, float(drop_rate),
                   num_classes, bool(small_inputs), (height, width), stem, tuple(blocks),
                   tuple(transitions))


def modes(net):
    """The modes this architecture allows: two of them need bottleneck layers."""
    return tuple(m for m in MODES if net.bottleneck_width or m not in BOTTLENECK_MODES)


def _param_parts(net):
    """Parameters of the stem, then (block, transition or head after it) per block."""
    k, w, c0 = net.growth_rate, net.bottleneck_width, net.num_init_features
    stem = 3 * c0 * (9 if net.small_inputs else 49) + (0 if net.small_inputs else 2 * c0)
    parts = []
    for i, b in enumerate(net.blocks):
        inputs = b.input_sum(k)
        block = 2 * inputs + (inputs * w + b.layers * (2 * w + 9 * w * k) if w else 9 * k * inputs)
        if i < len(net.transitions):
            after = 2 * b.c_out + b.c_out * net.transitions[i]
        else:
            after = 2 * b.c_out + b.c_out * net.num_classes + net.num_classes
        parts.append((block, after))
    return stem, parts


def parameters(net):
    """Number of parameters (BatchNorm's affine ones included, its running statistics not)."""
    stem, parts = _param_parts(net)
    return stem + sum(block + after for block, after in parts)


def macs_per_image(net):
    """Multiply-accumulates of the convolutions and the classifier for one image."""
    k, w, c0 = net.growth_rate, net.bottleneck_width, net.num_init_features
    total = net.stem[0] * net.stem[1] * 3 * c0 * (9 if net.small_inputs else 49)
    for i, b in enumerate(net.blocks):
        inputs = b.input_sum(k)
        area = b.height * b.width
        total += area * (inputs * w + b.layers * 9 * w * k if w else 9 * k * inputs)
        if i < len(net.transitions):
            total += area * b.c_out * net.transitions[i]
    return total + net.features * net.num_classes


def state_bytes(net):
    """Parameters, their gradients and SGD's momentum buffers, all float32."""
    return 3 * FLOAT * parameters(net)


def _check(net, batch_size, mode, amp):
    check_positive_int("batch_size", batch_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode not in modes(net):
        raise ValueError(f"{mode} needs bottleneck layers (bn_size > 0)")
    if amp not in COMPUTE_BYTES:
        raise ValueError(f"amp must be one of {', '.join(COMPUTE_BYTES)}, got {amp!r}")


def _saved_parts(net, n, mode, amp, device):
    """Saved bytes of the stem, then (block, transition or head after it) per block."""
    k, w, d = net.growth_rate, net.bottleneck_width, COMPUTE_BYTES[amp]
    casts = amp != "off"
    drop = net.drop_rate > 0
    mask = d if device == "cpu" else 1  # F.dropout's mask: the input's dtype on a CPU
    c0 = net.num_init_features
    checkpointed = mode == "torchvision_memory_efficient"
    stem = 0
    if casts:
        stem += n * 3 * net.image[0] * net.image[1] * d \
            + c0 * 3 * (9 if net.small_inputs else 49) * d
    if not net.small_inputs:
        first = net.blocks[0]
        stem += 2 * c0 * n * net.stem[0] * net.stem[1] * d + 4 * c0 * FLOAT \
            + c0 * n * first.height * first.width * 8
    parts = []
    for i, b in enumerate(net.blocks):
        values = n * b.height * b.width  # per channel
        m = values * d  # bytes of one channel map
        inputs = b.input_sum(k)
        if mode in ("efficient", "recompute_bottleneck"):
            block = b.c_out * m + b.c_out * FLOAT + 2 * b.layers * w * FLOAT
            block += b.layers * w * m if mode == "efficient" else 0
            block += b.layers * k * values if drop else 0
        else:
            if checkpointed:
                block = (b.c_in + (b.layers - 1) * k) * m
            else:
                block = 2 * inputs * m + 4 * inputs * FLOAT
            block += b.c_out * m + b.layers * (2 * w * m + 4 * w * FLOAT)
            block += b.layers * k * values * mask if drop else 0
            if casts:
                conv1 = 0 if checkpointed else (inputs * w if w else 9 * k * inputs)
                block += (conv1 + b.layers * 9 * w * k) * d
        naive_like = mode in ("naive", "torchvision_memory_efficient")
        if i < len(net.transitions):
            after = 0
            if naive_like:
                out = net.transitions[i]
                after = b.c_out * m + 4 * b.c_out * FLOAT + out * m
                after += b.c_out * out * d if casts else 0
        else:
            after = n * b.c_out * d + (b.c_out * net.num_classes * d if casts else 0)
            after += b.c_out * m + 4 * b.c_out * FLOAT if naive_like else 0
        parts.append((block, after))
    return stem, parts


def saved_bytes(net, batch_size, mode, amp="off", device="cpu"):
    """Bytes autograd keeps for backward after one training forward (parameters and the input
    excluded). ``amp``: "off", "bf16" or "fp16"; ``device``: "cpu" or "cuda"."""
    _check(net, batch_size, mode, amp)
    stem, parts = _saved_parts(net, batch_size, mode, amp, device)
    return stem + sum(block + after for block, after in parts)


def _round16(channels):
    return -(-channels // 16) * 16


def peak_bytes(net, batch_size, mode, amp="off", channels_last=False, device="cpu",
               moments=False):
    """Predicted peak bytes of a training step: forward, backward, SGD step (see the module
    docstring). With ``moments``, a dict of every moment's bytes instead."""
    _check(net, batch_size, mode, amp)
    n, k, w, d = batch_size, net.growth_rate, net.bottleneck_width, COMPUTE_BYTES[amp]
    cpu = device == "cpu"

    def onednn_copy(c):  # oneDNN's blocked layout pads channels to a multiple of 16
        return _round16(c) if cpu and not channels_last else 0

    stem_params, param_parts = _param_parts(net)
    p = parameters(net)
    bn_values = (0 if net.small_inputs else net.num_init_features) + sum(
        b.input_sum(k) + b.layers * w + b.c_out for b in net.blocks)
    fixed = 2 * FLOAT * bn_values + n * 3 * net.image[0] * net.image[1] * FLOAT + 8 * n
    stem, parts = _saved_parts(net, n, mode, amp, device)
    found = {}
    held = stem  # saved by everything before the current block
    for i, b in enumerate(net.blocks):
        block, after = parts[i]
        m = n * b.height * b.width * d
        c = b.c_out - k

        def later_grads(j, b=b, i=i):
            """Parameter gradients that exist at the backward of block i's layer j: those of
            layers j and later and of everything after the block."""
            layers = b.layers - j
            inputs = layers * b.c_in + k * (b.layers - 1 + j) * layers // 2  # sum of c_j
            own = 2 * inputs + (inputs * w + layers * (2 * w + 9 * w * k) if w
                                else 9 * k * inputs)
            return own + param_parts[i][1] + sum(sum(pair) for pair in param_parts[i + 1:])

        forward = fixed + 3 * FLOAT * p + held + block
        if mode in ("efficient", "recompute_bottleneck"):
            def layer_work(c, m=m):
                """A layer's working tensors in backward, reading c channels (see docstring)."""
                s = channel_chunks(c, m)[0][1]  # the widest slice it works on at once
                copy = s if cpu else 0
                if not w:
                    return k + copy + 2 * s + (k + onednn_copy(s) if cpu else 0)
                slices = k + copy + 2 * s + w + (w + onednn_copy(s) if cpu else 0)
                bottleneck = k + 2 * w + (2 * w if cpu else 0)
                if mode == "recompute_bottleneck":  # z, and with one slice its input and h
                    bottleneck += w + (s + copy if s == c else 0)
                return max(slices, bottleneck)

            # The widest layer, the first, and the first whose input fills a whole slice: with
            # chunks the work stops growing there while the gradients of the block accumulate.
            s = channel_chunks(c, m)[0][1]  # the last layer's widest slice
            candidates = {b.layers - 1, 0, min(b.layers - 1, max(0, -(-(s - b.c_in) // k)))}
            found[f"backward, block {i + 1}"] = max(
                fixed + 2 * FLOAT * p + FLOAT * later_grads(j) + held + block
                + (2 * b.c_out + layer_work(b.c_in + j * k)) * m for j in candidates)
            out = w or k  # what the last layer's first convolution produces
            # With chunks, the partial sums' accumulator (float32)
            partial = out * FLOAT // d if s < c else 0
            found[f"forward, block {i + 1}"] = \
                forward + (b.c_in + s + out + partial + onednn_copy(s)) * m
        else:
            work = 2 * c + w + (w + onednn_copy(c) if cpu else 0)
            found[f"backward, block {i + 1}"] = (fixed + 2 * FLOAT * p
                                                 + FLOAT * later_grads(b.layers - 1) + held
                                                 + block + work * m)
            found[f"forward, block {i + 1}"] = forward + b.c_out * m
        held += block + after
    found["forward, end"] = fixed + 3 * FLOAT * p + held
    # demo.py's SGD: foreach on a CPU (weight decay adds to a copy of the gradients), fused on
    # CUDA (in place).
    found["optimizer step"] = fixed + (4 if cpu else 3) * FLOAT * p
    return found if moments else max(found.values())
