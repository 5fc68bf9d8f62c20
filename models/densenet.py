"""DenseNet and DenseNet-BC (Huang et al., 2017) with torchvision's parameter names.

``efficient=True`` runs the same module tree through the shared-buffer dense block of
``models.efficient``; the state_dict is identical in both modes.
"""

import math
import numbers
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .efficient import (
    BlockSpec,
    DenseBlockFunction,
    ReaderFunction,
    _dense_block_op,
    _stat_dtype,
    compute_dtype,
)


def depth_to_config(depth, growth_rate=12, bc=True):
    """DenseNet keyword arguments for the paper's depth convention.

    DenseNet-BC has (depth - 4) / 6 bottleneck layers per block and 2 * growth_rate initial
    features; plain DenseNet has (depth - 4) / 3 layers per block and 16 initial features. Three
    blocks, as on CIFAR and SVHN. A depth that does not fit raises ValueError naming the nearest
    valid depths.
    """
    per_layer = 6 if bc else 3
    kind = "DenseNet-BC" if bc else "DenseNet"
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise ValueError(f"depth must be an integer, got {depth!r}")
    if depth < 4 + per_layer or (depth - 4) % per_layer:
        below = 4 + per_layer * max(1, (depth - 4) // per_layer)
        above = below + per_layer if below <= depth else below
        nearest = sorted({below, above})
        raise ValueError(
            f"invalid depth {depth} for {kind}: depth - 4 must be a positive multiple of "
            f"{per_layer}; nearest valid depths: {', '.join(map(str, nearest))}")
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, numbers.Integral) \
            or growth_rate < 1:
        raise ValueError(f"growth_rate must be a positive integer, got {growth_rate!r}")
    layers = (depth - 4) // per_layer
    return dict(
        growth_rate=growth_rate,
        block_config=(layers,) * 3,
        num_init_features=2 * growth_rate if bc else 16,
        bn_size=4 if bc else None,
        compression=0.5 if bc else 1.0,
    )


# torchvision's ImageNet DenseNets (Huang et al., 2017, Table 1): same names, same configurations.
ARCHITECTURES = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}
# Images at least this large get the ImageNet stem (7x7 stride-2 convolution, BatchNorm, ReLU,
# 3x3 stride-2 max-pool: a quarter of the resolution); smaller ones the 3x3 CIFAR stem.
IMAGENET_STEM_MIN_SIZE = 64


def imagenet_config(name):
    """DenseNet keyword arguments of torchvision's ``name`` (densenet121, densenet161,
    densenet169 or densenet201): bottleneck width 4k, compression 0.5. ValueError otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of "
                         f"{', '.join(ARCHITECTURES)}")
    return dict(ARCHITECTURES[name], bn_size=4, compression=0.5)


def imagenet_depth(name):
    """The number in the name: convolutions and the classifier (two per layer, one per
    transition, conv0, classifier)."""
    blocks = ARCHITECTURES[name]["block_config"]
    return 2 * sum(blocks) + len(blocks) - 1 + 2


def small_inputs_for(image_size):
    """DenseNet's ``small_inputs`` for images of ``image_size`` pixels (the smaller side): the
    CIFAR stem below IMAGENET_STEM_MIN_SIZE, the ImageNet stem from there on."""
    return image_size < IMAGENET_STEM_MIN_SIZE


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (bottleneck), or BN-ReLU-Conv3x3 without one."""

    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size:
            self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(num_input_features, growth_rate, 3, padding=1, bias=False)
            # None, not absent: TorchScript then compiles the bottleneck branch away.
            self.norm2 = self.relu2 = self.conv2 = None
        self.bottleneck = bool(bn_size)
        self.drop_rate = float(drop_rate)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Naive mode: concatenate every earlier feature map, return the k new channels."""
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        if self.norm2 is not None and self.relu2 is not None and self.conv2 is not None:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out

    def block_params(self, training):
        """The tensors the efficient block needs, BatchNorms as per-channel affine maps."""
        params = [*_bn_affine(self.norm1, training), self.conv1.weight]
        if self.bottleneck:
            params += [*_bn_affine(self.norm2, training), self.conv2.weight]
        return params


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size,
                                drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)
        self.growth_rate = growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def _bn_affine(bn, training):
    """BatchNorm as y = scale * x + shift per channel.

    In training the efficient buffer already holds batch-normalised channels, so this is gamma and
    beta; in eval the buffer holds raw features and the running statistics are folded in.
    """
    if training:
        return bn.weight, bn.bias
    dtype = _stat_dtype(bn.weight.dtype)  # float32 for a half or bfloat16 model, as BatchNorm
    scale = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    return scale, bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale


@torch.no_grad()
def _update_running_stats(norms, means, variances):
    """What nn.BatchNorm2d does to its buffers in a training forward, for several BatchNorms at
    once (one fused update per buffer kind), from given unbiased batch variances.

    Each BatchNorm takes the first running_mean.numel() channels of its statistics. No host
    synchronisation, also for momentum=None (the cumulative average's factor stays a tensor).
    """
    torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    sizes = [bn.running_mean.numel() for bn in norms]
    means = [m[:n].to(bn.running_mean.dtype) for bn, m, n in zip(norms, means, sizes, strict=True)]
    variances = [v[:n].to(bn.running_var.dtype)
                 for bn, v, n in zip(norms, variances, sizes, strict=True)]
    momenta = {bn.momentum for bn in norms}
    if len(momenta) == 1 and None not in momenta:
        momentum = momenta.pop()
        torch._foreach_lerp_([bn.running_mean for bn in norms], means, momentum)
        torch._foreach_lerp_([bn.running_var for bn in norms], variances, momentum)
        return
    for bn, mean, var in zip(norms, means, variances, strict=True):
        momentum = bn.momentum
        if momentum is None:
            momentum = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
        bn.running_mean.lerp_(mean, momentum)
        bn.running_var.lerp_(var, momentum)


def _unbiased_variance(invstd, eps, count):
    """The unbiased batch variance BatchNorm's running_var tracks, from its 1 / sqrt(var + eps)."""
    return invstd.pow(-2).sub_(eps).mul_(count / max(count - 1, 1))


def _sync_group(norm):
    """The process group a SyncBatchNorm synchronises over in training, None if it does not."""
    if not (isinstance(norm, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _values_per_channel(buf, group):
    """Values behind each channel's batch statistics; every process has the same batch size."""
    count = buf.shape[0] * buf.shape[2] * buf.shape[3]
    return count * (dist.get_world_size(group) if group is not None else 1)


def check_positive_int(name, value, allow_zero=False):
    """int(value), or ValueError naming ``name`` unless it is a positive (non-negative) integer."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) \
        and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def check_architecture(growth_rate, block_config, compression, num_init_features, bn_size,
                       drop_rate, num_classes):
    """ValueError for an architecture DenseNet refuses; returns bn_size as an int (0: none)."""
    check_positive_int("growth_rate", growth_rate)
    check_positive_int("num_init_features", num_init_features)
    check_positive_int("num_classes", num_classes)
    bn_size = check_positive_int("bn_size", bn_size or 0, allow_zero=True)
    if isinstance(block_config, (str, bytes)) or not hasattr(block_config, "__len__") \
            or len(block_config) == 0:
        raise ValueError(
            f"block_config must be a non-empty sequence of positive integers, "
            f"got {block_config!r}")
    for n in block_config:
        check_positive_int("each entry of block_config", n)
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real) \
            or not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, numbers.Real) \
            or not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    return bn_size


class DenseNet(nn.Module):
    """DenseNet-BC (and plain DenseNet, -B and -C) for CIFAR/SVHN or ImageNet-sized inputs.

    Args:
        growth_rate: k, channels each layer adds.
        block_config: number of layers in each dense block.
        compression: channel reduction at transitions, in (0, 1]; 1 disables it (no "C").
        num_init_features: channels of the first convolution.
        bn_size: bottleneck width as a multiple of growth_rate; None or 0 for no bottleneck.
        drop_rate: dropout after each layer's last convolution, in [0, 1).
        num_classes: size of the classifier output.
        small_inputs: True for the 3x3 CIFAR/SVHN stem, False for the ImageNet stem.
        efficient: shared-buffer dense blocks (same parameters, far less memory).
        recompute_bottleneck: with efficient, also recompute the 1x1 convs in backward.
    """

    def __init__(self, growth_rate=12, block_config=(16, 16, 16), compression=0.5,
                 num_init_features=24, bn_size=4, drop_rate=0.0, num_classes=10,
                 small_inputs=True, efficient=False, recompute_bottleneck=False):
        super().__init__()
        bn_size = check_architecture(growth_rate, block_config, compression, num_init_features,
                                     bn_size, drop_rate, num_classes)
        for name, flag in [("small_inputs", small_inputs), ("efficient", efficient),
                           ("recompute_bottleneck", recompute_bottleneck)]:
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if recompute_bottleneck and not efficient:
            raise ValueError("recompute_bottleneck=True requires efficient=True")
        if recompute_bottleneck and not bn_size:
            raise ValueError("recompute_bottleneck=True requires a bottleneck (bn_size > 0)")

        self.efficient = efficient
        self.recompute_bottleneck = recompute_bottleneck
        if small_inputs:
            stem = [("conv0", nn.Conv2d(3, num_init_features, 3, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(math.floor(num_features * compression))
                if out_features < 1:
                    raise ValueError(
                        f"compression {compression} leaves no channels after block {i + 1}")
                self.features.add_module(f"transition{i + 1}",
                                         _Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.efficient and not torch.jit.is_scripting() and self._efficient_path_available():
            return self.classifier(self._efficient_features(x))
        # A mean, not adaptive_avg_pool2d: that one's CUDA backward has no deterministic kernel.
        out = F.relu(self.features(x)).mean((2, 3))
        return self.classifier(out)

    @torch.jit.unused
    def _efficient_path_available(self) -> bool:
        """False while TorchScript tracing, FX symbolic tracing or torch.export (hence ONNX) record
        the model: those keep the naive path, on the same parameters, so that the recorded graph
        holds only standard operators (export is for inference, where memory in training does
        not matter). torch.compile, torch.func and eager mode use the efficient operators.
        """
        # torch.export's flag itself: torch 2.11's Dynamo folds torch.compiler.is_exporting()
        # to True inside every torch.compile (which then ran the naive path).
        return not (torch.jit.is_tracing() or is_fx_symbolic_tracing()
                    or getattr(torch.compiler, "_is_exporting_flag", False))

    @torch.jit.unused
    def _efficient_features(self, x: Tensor) -> Tensor:
        """Pooled features computed block by block through the shared-buffer operators."""
        children = list(self.features.named_children())
        buf = None  # the last dense block's buffer
        for i, (name, module) in enumerate(children):
            if isinstance(module, _DenseBlock):
                reader = children[i + 1][1] if i + 1 < len(children) else None
                reader_norm = reader.norm if isinstance(reader, _Transition) else reader
                if not isinstance(reader_norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                    raise RuntimeError("a dense block must be followed by a transition or norm5")
                buf = self._run_block(module, x, reader_norm)
            elif isinstance(module, _Transition):
                x = self._read_buffer(module.norm, buf, module.conv.weight)
            elif name == "norm5":
                return self._read_buffer(module, buf, None)
            else:
                x = module(x)
        raise RuntimeError("features must end with norm5")

    def _run_block(self, block, x, reader_norm):
        """The block's buffer; in training, updates the running statistics of every BatchNorm
        that reads it (the block's own and ``reader_norm``) as nn.BatchNorm2d would."""
        layers = list(block.values())
        first = layers[0]
        n, _, height, width = x.shape
        if self.training and n * height * width <= 1:
            if first.norm1.num_batches_tracked is not None:
                first.norm1.num_batches_tracked.add_(1)  # nn.BatchNorm2d counts, then raises
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {tuple(x.shape)}")
        group = _sync_group(first.norm1) if self.training else None
        spec = BlockSpec(block.growth_rate, first.bottleneck, self.training, first.norm1.eps,
                         first.drop_rate if self.training else 0.0, self.recompute_bottleneck,
                         "" if group is None else group.group_name)
        params = [t for layer in layers for t in layer.block_params(self.training)]
        dtype = compute_dtype(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
            buf, mean, invstd, z_mean, z_invstd = \
                DenseBlockFunction.apply(spec, dtype, x, *params)[:5]
        else:
            buf, mean, invstd, z_mean, z_invstd, _, _ = _dense_block_op(
                x, params, dtype, False, *spec)
        if self.training:
            count = _values_per_channel(buf, group)
            var = _unbiased_variance(invstd, spec.eps, count)
            norms = [layer.norm1 for layer in layers] + [reader_norm]
            means, variances = [mean] * len(norms), [var] * len(norms)
            if first.bottleneck:
                norms += [layer.norm2 for layer in layers]
                means += list(z_mean.unbind())
                variances += list(_unbiased_variance(z_invstd, spec.eps, count).unbind())
            _update_running_stats(norms, means, variances)
        return buf

    def _read_buffer(self, norm, buf, weight):
        scale, shift = _bn_affine(norm, self.training)
        return ReaderFunction.apply(weight is None, buf, scale, shift, weight)
