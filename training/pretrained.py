"""--pretrained: start a run from torchvision's ImageNet weights for --arch, or from weights in a
file, instead of a random initialisation.

- True: torchvision's weights API (e.g. torchvision.models.DenseNet121_Weights.IMAGENET1K_V1)
  reads them from torch hub's cache, $TORCH_HOME/hub/checkpoints/<the file name in the weights'
  URL>, and downloads them there when missing. Offline, the error names the file to place there.
- PATH: a state_dict, or a checkpoint holding one under "model" or "state_dict" (torchvision's
  reference scripts, this tool's checkpoint.pt and model_best.pt, most training scripts).

Loading is strict except for the classifier: every other tensor of the model must be in the file
with its shape, and the file may hold nothing else. The classifier is loaded when its shape
matches and replaced (left newly initialised) when the number of classes differs. The model's
parameter names are torchvision's, so the same weights load in every memory mode. torchvision's
old DenseNet files name some tensors "norm.1", "conv.2"...; they are renamed as torchvision's own
DenseNet loader renames them.
"""

import argparse
import os
import re
import sys
from urllib.parse import urlparse

import torch

from models import ARCHITECTURES, IMAGENET_STEM_MIN_SIZE, small_inputs_for

from .devices import on_all_ranks
from .errors import UsageError, one_line

# torchvision.models.densenet._load_state_dict's pattern for the old names.
LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                        r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
CLASSIFIER = ("classifier.weight", "classifier.bias")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
CHECKPOINT_ENTRIES = ("model", "state_dict", "model_state_dict")


def resolve_pretrained(value, arch, image_size):
    """--pretrained as a run's configuration stores it: None (no weights), True (torchvision's
    for ``arch``) or a file's absolute path. UsageError for anything else."""
    if value is None or value is False:
        return None
    if value is True:
        if not arch:
            raise UsageError(f"--pretrained True loads torchvision's ImageNet weights, which "
                             f"exist for --arch {', '.join(ARCHITECTURES)}; for the --depth "
                             f"family give --pretrained PATH")
        if small_inputs_for(image_size):
            raise UsageError(f"--pretrained True needs the ImageNet stem, which this tool uses "
                             f"from --image_size {IMAGENET_STEM_MIN_SIZE} on; got --image_size "
                             f"{image_size}")
        return True
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = os.path.abspath(os.path.expanduser(str(value)))
        if not os.path.isfile(path):
            raise UsageError(f"--pretrained {value}: no such file (give True for torchvision's "
                             f"weights, or the path of a state_dict or checkpoint)")
        if not os.access(path, os.R_OK):
            raise UsageError(f"--pretrained {path}: the file is not readable")
        return path
    raise UsageError(f"--pretrained must be True, False or the path of a weights file, "
                     f"got {value!r}")


def torchvision_weights(arch):
    """torchvision's default ImageNet weights for ``arch`` (a WeightsEnum member)."""
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT


def cache_file(weights):
    """Where torch hub keeps ``weights``: $TORCH_HOME/hub/checkpoints/<URL's file name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints",
                        os.path.basename(urlparse(weights.url).path))


def read_torchvision(arch, progress=False):
    """(state_dict, where it came from) of torchvision's weights for ``arch``, downloaded into
    torch hub's cache when missing."""
    weights = torchvision_weights(arch)
    path = cache_file(weights)
    name = f"torchvision's {type(weights).__name__}.{weights.name}"
    cached = os.path.exists(path)
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True, map_location="cpu",
                                       weights_only=True)
    except Exception as error:  # no network, a refused download, a damaged file in the cache
        reason = f"{type(error).__name__}: {one_line(error)[:200]}"
        if cached:
            raise UsageError(f"cannot read {name} from {path} ({reason}); delete that file to "
                             f"download it again, or place a good copy of {weights.url} "
                             f"there") from None
        raise UsageError(f"cannot download {name} ({reason}); place the file {weights.url} at "
                         f"{path} (torch hub's cache, under $TORCH_HOME), or give --pretrained "
                         f"PATH") from None
    return state, f"{name} from {path}"


def read_file(path):
    """(state_dict, where it came from) of a state_dict or checkpoint file."""
    try:
        # torchvision's reference scripts store their argparse arguments beside the model.
        with torch.serialization.safe_globals([argparse.Namespace]):
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file can raise almost anything
        raise UsageError(f"--pretrained {path}: cannot read it as a PyTorch weights file "
                         f"({type(error).__name__}: {one_line(error)[:200]})") from None
    if isinstance(value, dict):
        for entry in CHECKPOINT_ENTRIES:
            if isinstance(value.get(entry), dict):
                return value[entry], f"{path} (its {entry!r} entry)"
    return value, path


def normalised(state, source):
    """The state_dict with wrappers' prefixes removed and torchvision's old names renamed."""
    if not isinstance(state, dict) or not state \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in state.items()):
        raise UsageError(f"{source} is not a state_dict (names -> tensors) nor a checkpoint "
                         f"holding one under {', '.join(map(repr, CHECKPOINT_ENTRIES))}")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    renamed = {}
    for key, value in state.items():
        match = LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def load_into(model, state, source, name):
    """Load ``state`` into ``model`` strictly but for the classifier; returns what happened, in
    words. UsageError, naming ``source`` and the model ``name``, for a state that does not fit."""
    state = normalised(state, source)
    own = model.state_dict()
    # Files from before PyTorch 0.4.1 (torchvision's DenseNet weights) have no
    # num_batches_tracked; BatchNorm's own loading accepts that too.
    missing = [key for key in own if key not in state and key not in CLASSIFIER
               and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    wrong = [key for key in state if key in own and key not in CLASSIFIER
             and state[key].shape != own[key].shape]
    weight = state.get("classifier.weight")
    if weight is not None and (weight.ndim != 2
                               or weight.shape[1] != own["classifier.weight"].shape[1]):
        wrong.append("classifier.weight")
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in (
        (missing, "of the model's tensors are missing"),
        (unexpected, "tensors in the file are not in the model")) if keys]
    if wrong:
        key = wrong[0]
        parts.append(f"{len(wrong)} tensors have other shapes (e.g. {key}: "
                     f"{tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in the "
                     f"model)")
    if parts:
        stem = any(key.startswith(("features.conv0.", "features.norm0."))
                   for key in missing + unexpected + wrong)
        hint = (f"; its stem differs: this tool gives the ImageNet stem to images of "
                f"{IMAGENET_STEM_MIN_SIZE} pixels and more (--image_size)" if stem
                else "; is it another architecture?")
        raise UsageError(f"{source} does not fit {name}: {'; '.join(parts)}{hint}")
    classes = own["classifier.weight"].shape[0]
    if all(key in state for key in CLASSIFIER) and \
            all(state[key].shape == own[key].shape for key in CLASSIFIER):
        kept = state
        what = f"all, the classifier's included: {classes} classes)"
    else:
        kept = {key: value for key, value in state.items() if key not in CLASSIFIER}
        there = (f"{state['classifier.weight'].shape[0]} classes in the file"
                 if "classifier.weight" in state else "none in the file")
        what = (f"all but the classifier); classifier replaced: {there}, {classes} here "
                f"(newly initialised)")
    model.load_state_dict({**own, **kept}, strict=True)
    loaded = sum(1 for key in kept if not key.endswith(".num_batches_tracked"))
    return f"{source}: {loaded} tensors loaded ({what}"


def read_pretrained(config, progress=False):
    """(state_dict, where it came from) of the run's --pretrained."""
    if config["pretrained"] is True:
        return read_torchvision(config["arch"], progress)
    return read_file(config["pretrained"])


def apply_pretrained(model, config, rank, name):
    """Load the run's --pretrained weights into ``model`` on every process (rank 0 first: it
    may download them); returns the start-up block's words for it."""
    progress = sys.stderr.isatty()
    first = on_all_ranks(lambda: read_pretrained(config, progress) if rank == 0 else None)
    state, source = on_all_ranks(lambda: first or read_pretrained(config))
    return on_all_ranks(lambda: load_into(model, state, source, name))
