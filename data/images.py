"""Image files to 8-bit RGB tensors, and the training and evaluation transforms of folder data.

Decoding uses torchvision.io (libjpeg-turbo, libpng, libwebp, giflib) for JPEG, PNG, WebP and
GIF: on 500x375 JPEGs it decodes faster than PIL (results/folder-loader-cpu.md). Other formats
(BMP, TIFF, PPM/PGM/PBM) go through PIL. Every image becomes a uint8 tensor (3, H, W) in RGB:
grayscale and palette images are expanded, alpha is dropped (as PIL's convert("RGB") does),
CMYK is converted, 16-bit images are scaled to 8 bits, EXIF orientation is applied, and a GIF
gives its first frame. A file that cannot be read or decoded raises ImageError with the reason in
one line.

Transforms follow torchvision's reference classification recipe: for training a random-resized
crop (scale 0.08-1, aspect ratio 3/4-4/3) to image_size x image_size and a horizontal flip;
for evaluation a resize of the shorter side to resize_size, then a centre crop of image_size.
The training draws of one image come from a random.Random seeded by a number the loader drew
for that image, so they do not depend on which process decodes it or in which order.
"""

import io
import math
import os
import re
import struct

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp",
                              ".dib", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})
# Larger images (over 0.8 GB once decoded) are refused rather than risk a worker killed for memory.
MAX_PIXELS = 2**28
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224  # torchvision's reference: resize to 256, centre crop 224
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class ImageError(Exception):
    """A file that is not a readable image; str(error) is the reason, in one line."""


def is_image_name(name):
    """Whether a file name has one of IMAGE_EXTENSIONS (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def eval_resize_size(image_size, pretrained=False):
    """The evaluation resize of folder data: image_size, so that the centre crop keeps the whole
    shorter side (images of the input size stay as they are); with pretrained weights
    image_size * 256/224, the resize torchvision's weights were evaluated with."""
    return round(image_size * EVAL_RESIZE_RATIO) if pretrained else image_size


# ---------------------------------------------------------------------------- decoding

def read_image(path):
    """The image file at path as a uint8 RGB tensor (3, H, W); ImageError if it is not one."""
    try:
        with open(path, "rb") as file:
            data = bytearray(os.fstat(file.fileno()).st_size)
            read = file.readinto(data)
    except OSError as error:
        raise ImageError(error.strerror or str(error)) from None
    if read != len(data):  # the file shrank while it was read
        data = data[:read]
    return decode(data)


def decode(data):
    """Encoded image bytes (a bytearray) -> uint8 RGB tensor (3, H, W); ImageError if invalid."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    kind = _kind(data)
    if kind is None or (kind == "WebP" and data[12:16] == b"VP8X" and len(data) > 20
                            and data[20] & 0x08):
        return _decode_with_pil(data)  # torchvision ignores a WebP's EXIF orientation
    size = _header_size(kind, data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise ImageError(f"{size[0]}x{size[1]} pixels, more than the {MAX_PIXELS:,} allowed")
    try:
        image = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)
    except (RuntimeError, ValueError) as error:
        raise ImageError(f"cannot decode this {kind} file ({_reason(error)})") from None
    if image.ndim == 4:  # an animated GIF: its frames
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _kind(data):
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _header_size(kind, data):
    """(width, height) from the header, or None if not found (the decoder then complains).

    Parsed here because PIL's header parse costs more than decoding a small JPEG."""
    try:
        if kind == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if kind == "GIF":
            return struct.unpack("<HH", data[6:10])
        if kind == "WebP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return (int.from_bytes(data[24:27], "little") + 1,
                        int.from_bytes(data[27:30], "little") + 1)
        if kind == "JPEG":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data):
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
    return None


def _reason(error):
    """torchvision's decoder messages without their C++ source location."""
    text = " ".join(str(error).split())
    return re.sub(r"^.*?\.cpp:\d+, ", "", text)


def _decode_with_pil(data):
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{width}x{height} pixels, more than the {MAX_PIXELS:,} allowed")
            image = ImageOps.exif_transpose(image)
            rgb = _pil_rgb(image)
    except UnidentifiedImageError:
        raise ImageError("not an image file (unknown format)") from None
    except ImageError:
        raise
    except Exception as error:  # PIL's plugins raise many types for damaged files
        raise ImageError(f"cannot decode ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _pil_rgb(image):
    """A PIL image -> numpy uint8 (H, W, 3); 16- and 32-bit modes scaled, not clipped."""
    import numpy as np

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)  # "I" holds 16-bit files' values
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        image = image.convert("L")
    return np.array(image.convert("RGB"))


# ---------------------------------------------------------------------------- transforms

def random_crop_box(height, width, rng, scale=CROP_SCALE, ratio=CROP_RATIO):
    """(top, left, crop height, crop width) as torchvision's RandomResizedCrop chooses it, drawn
    from the random.Random rng: up to 10 tries of an area and aspect ratio, else a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return (rng.randint(0, height - crop_height), rng.randint(0, width - crop_width),
                    crop_height, crop_width)
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def train_transform(image, image_size, rng, flip=True):
    """Random-resized crop to image_size x image_size, then a horizontal flip with probability
    1/2 if flip (drawn either way, so that flip does not change the other draws)."""
    top, left, height, width = random_crop_box(image.shape[-2], image.shape[-1], rng)
    crop = image[:, top:top + height, left:left + width]
    # Copied channels-last (as decoded) and contiguous: torch's vectorised uint8 resize needs
    # that, and then takes half the time, for the same values.
    crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    image = F.resize(crop, [image_size, image_size], antialias=True)
    mirrored = rng.random() < 0.5
    return image.flip(-1) if flip and mirrored else image


def eval_transform(image, image_size, resize_size):
    """Resize the shorter side to resize_size, then take the centre image_size x image_size."""
    image = F.resize(image, [resize_size], antialias=True)
    return F.center_crop(image, [image_size, image_size])
