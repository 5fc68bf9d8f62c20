"""Validation split, and batching, augmentation and normalisation of in-memory uint8 images."""

import torch
import torch.nn.functional as F

PADDING = 4  # zero padding before the random crop, as torchvision's RandomCrop(32, padding=4)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def split_validation(images, labels, valid_size, seed):
    """Split off `valid_size` randomly chosen images (seeded by `seed`) as a validation set.

    Returns (train_images, train_labels, valid_images, valid_labels); both parts keep the original
    order. valid_size=0 gives empty validation tensors. Raises ValueError unless
    0 <= valid_size < len(images).
    """
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    train_index, valid_index = validation_indices(len(images), valid_size, seed)
    return images[train_index], labels[train_index], images[valid_index], labels[valid_index]


def validation_indices(count, valid_size, seed):
    """(training indices, validation indices) of split_validation, each in increasing order."""
    if not _is_int(valid_size) or not 0 <= valid_size < count:
        raise ValueError(f"valid_size must be an integer from 0 to {count - 1} "
                         f"(the training set has {count} images), got {valid_size!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[valid_size:].sort().values, order[:valid_size].sort().values


def crop_flip(images, offsets, flips, padding=PADDING):
    """Zero-pad uint8 images (B, C, H, W) by `padding`, crop H x W at per-image `offsets` (B, 2)
    = (top, left) in 0..2*padding, and mirror horizontally where the bool `flips` (B,) is True.

    One gather for the whole batch; the crop-then-flip is folded into the column indices."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
    cols = torch.arange(width, device=images.device).expand(batch, width)
    cols = torch.where(flips[:, None], width - 1 - cols, cols) + offsets[:, 1:]  # (B, W)
    pixel = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    crops = padded.view(batch, channels, -1).gather(2, pixel.expand(batch, channels, -1))
    return crops.view(batch, channels, height, width)


def channel_tensors(mean, std, device="cpu"):
    """normalise's (scale, shift) for mean and std: float32 (C, 1, 1) tensors on device,
    1 / (255 std) and -mean / std, each rounded once from float64."""
    mean, std = (torch.tensor(values, dtype=torch.float64).view(-1, 1, 1) for values in (mean, std))
    return tuple(values.float().to(device) for values in (1 / (255 * std), -mean / std))


def normalise(images, scale, shift, out=None):
    """(x / 255 - mean) / std in float32 of uint8 images, per channel, as x * scale + shift
    (channel_tensors). Every loader uses it, so that equal images give bitwise equal inputs
    whatever the source: each step is one IEEE operation, exact on every CPU kernel and on a
    GPU, whatever the memory layout (torch.addcmul would be 15% faster but rounds once or twice
    depending on how torch was built)."""
    inputs = images.to(torch.float32) if out is None else out.copy_(images)
    return inputs.mul_(scale).add_(shift)


def check_batching(labels, count, channels, batch_size, mean, std, shuffle, augment, flip,
                   drop_last, generator, rank, world_size):
    """The argument checks TensorLoader and FolderLoader share; ValueError if one fails."""
    if (not isinstance(labels, torch.Tensor) or labels.ndim != 1
            or labels.dtype.is_floating_point or labels.dtype == torch.bool
            or len(labels) != count):
        raise ValueError(f"labels must be an integer tensor of {count} labels")
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, values in (("mean", mean), ("std", std)):
        if (not isinstance(values, (tuple, list)) or len(values) != channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in values)):
            raise ValueError(f"{name} must be {channels} numbers, got {values!r}")
    if not all(v > 0 for v in std):
        raise ValueError(f"std must be positive, got {std!r}")
    for name, flag in (("shuffle", shuffle), ("augment", augment), ("flip", flip),
                       ("drop_last", drop_last)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if (shuffle or augment) and not (isinstance(generator, torch.Generator)
                                     and generator.device.type == "cpu"):
        raise ValueError("shuffle and augment need a CPU torch.Generator as generator")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer from 0 to {world_size - 1}, got {rank!r}")


class ShardedEpochs:
    """What every loader shares: this rank's number of batches, and an epoch's image order.

    Subclasses set images, batch_size, shuffle, generator, rank, world_size, drop_last and
    per_rank (len(images) // world_size), and define epoch(skip)."""

    def __len__(self):
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def __iter__(self):
        return self.epoch()

    def _order(self, skip):
        """(positions, indices): this rank's positions in the epoch's order and the images
        there. The permutation (shuffle) is the epoch's first draw from the generator."""
        if not _is_int(skip) or not 0 <= skip <= len(self):
            raise ValueError(f"skip must be an integer from 0 to {len(self)}, got {skip!r}")
        count = len(self.images)
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator)
        else:
            order = torch.arange(count)
        positions = torch.arange(self.rank, self.per_rank * self.world_size, self.world_size)
        return positions, order[positions]


class TensorLoader(ShardedEpochs):
    """Iterate over (inputs, targets) batches of a uint8 image tensor held on `device`.

    inputs: float32 (B, C, H, W), (x / 255 - mean) / std; targets: int64 (B,). Each epoch (each
    iter()) draws, from the CPU `generator`, the permutation (shuffle) and the crop offsets and
    flips (augment) for ALL images, identically on every rank, before rank `rank` of
    `world_size` takes every world_size-th position of the first world_size * (N // world_size);
    so all ranks yield the same number of batches and the images and augmentations an image
    gets do not depend on world_size. Augmentation: zero-pad 4, random crop, horizontal flip if
    `flip`; all batched tensor ops on `device`. Results are bitwise determined by the generator
    state at the start of the epoch.
    """

    def __init__(self, images, labels, batch_size, mean, std, device, shuffle=False, augment=False,
                 flip=True, generator=None, rank=0, world_size=1, drop_last=False):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor (N, C, H, W)")
        check_batching(labels, len(images), images.shape[1], batch_size, mean, std, shuffle,
                       augment, flip, drop_last, generator, rank, world_size)
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.scale, self.shift = channel_tensors(mean, std, self.device)
        self.batch_size, self.shuffle, self.augment, self.flip = batch_size, shuffle, augment, flip
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.drop_last = drop_last
        self.per_rank = len(images) // world_size

    def epoch(self, skip=0):
        """An epoch's batches, starting after the first `skip` of them (to resume mid-epoch).

        Everything random for the epoch is drawn here, for all N images, skipped or not, so
        the batches after `skip` are the ones an uninterrupted epoch yields there."""
        positions, index = self._order(skip)
        index, count = index.to(self.device), len(self.images)
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * PADDING + 1, (count, 2), generator=self.generator)
            flips = torch.zeros(count, dtype=torch.bool)
            if self.flip:
                flips = torch.randint(0, 2, (count,), generator=self.generator).bool()
            offsets, flips = offsets[positions].to(self.device), flips[positions].to(self.device)
        return self._batches(index, offsets, flips, skip)

    def _batches(self, index, offsets, flips, skip):
        for start in range(skip * self.batch_size, len(self) * self.batch_size, self.batch_size):
            stop = start + self.batch_size
            batch_index = index[start:stop]
            images = self.images.index_select(0, batch_index)  # much faster than images[index]
            if offsets is not None:
                images = crop_flip(images, offsets[start:stop], flips[start:stop])
            targets = self.labels.index_select(0, batch_index)
            yield normalise(images, self.scale, self.shift), targets
