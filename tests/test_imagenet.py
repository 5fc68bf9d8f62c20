"""torchvision's ImageNet DenseNets (--arch), the stem rule, --pretrained through torch hub's real
cache and from files, bad weight files, and the planner for named architectures."""

import argparse
import inspect
import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from test_demo import ENV, ROOT, assert_ok, read_rows
from test_folder import write_image

import demo
from data import load_dataset
from data.images import IMAGENET_MEAN, IMAGENET_STD
from models import ARCHITECTURES, DenseNet, imagenet_config, memory
from training.build import build_model, model_name
from training.errors import UsageError
from training.plan import plan
from training.pretrained import load_into, read_file, read_torchvision, resolve_pretrained

WEIGHTS = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
# The name torch hub gives the file: the last part of the weights' URL.
CACHED_NAME = os.path.basename(urlparse(WEIGHTS.url).path)
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}  # a closed local port: downloads fail at once


def run_demo(args, env):
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def reference_densenet121():
    """torchvision's densenet121 with distinct, non-trivial weights and statistics."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    return reference_densenet121()


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory, reference):
    """A TORCH_HOME whose hub cache holds a torchvision densenet121 state_dict under the file
    name torchvision's weights API looks for."""
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), home / "hub" / "checkpoints" / CACHED_NAME)
    return home


def densenet121(num_classes, efficient=False):
    torch.manual_seed(1)
    return DenseNet(**imagenet_config("densenet121"), num_classes=num_classes, small_inputs=False,
                    efficient=efficient)


def assert_features_equal(model, reference):
    mine, theirs = model.state_dict(), reference.state_dict()
    for key, value in theirs.items():
        if not key.startswith("classifier") and not key.endswith("num_batches_tracked"):
            assert torch.equal(mine[key], value), key


# ---------------------------------------------------------------------------- architectures

@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_named_architectures_are_torchvisions(name):
    with torch.device("meta"):
        ours = DenseNet(**imagenet_config(name), small_inputs=False, num_classes=1000)
        theirs = getattr(torchvision.models, name)()
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    net = memory.network(**imagenet_config(name), small_inputs=False, num_classes=1000)
    assert memory.parameters(net) == sum(p.numel() for p in theirs.parameters())


def resolve(**overrides):
    args = {name: p.default for name, p in inspect.signature(demo.main).parameters.items()}
    args.update(save="/tmp/unused", data="/tmp/unused")
    args.update(overrides)
    return demo.resolve_args(args)


def test_arch_fills_the_configuration_and_the_stem_follows_the_image_size():
    config = resolve(dataset="fake", arch="densenet121", image_size=64)
    assert (config["depth"], config["growth_rate"], config["bc"], config["compression"]) == \
        (121, 32, True, 0.5)
    assert config["image_size"] == 64 and config["pretrained"] is None
    assert model_name(config) == ("DenseNet-121 (torchvision's densenet121: k=32, blocks "
                                  "6-12-24-16), ImageNet stem, efficient")
    assert not build_model(config, 10).features[0].kernel_size == (3, 3)
    small = resolve(dataset="fake", arch="densenet169")  # fake defaults to 32: the CIFAR stem
    assert small["image_size"] == 32 and "stem" not in model_name(small)
    assert build_model(small, 10).features.conv0.kernel_size == (3, 3)
    default = resolve()  # the depth family, unchanged
    assert (default["arch"], default["depth"], default["growth_rate"], default["bc"],
            default["image_size"]) == (None, 100, 12, True, 32)
    assert model_name(resolve(dataset="fake", depth=40, image_size=64)) == \
        "DenseNet-BC (L=40, k=12), ImageNet stem, efficient"
    for overrides in (dict(image_size=63), dict(image_size=64)):
        model = build_model(resolve(dataset="fake", depth=10, growth_rate=4, **overrides), 3)
        logits = model(torch.randn(2, 3, overrides["image_size"], overrides["image_size"]))
        assert logits.shape == (2, 3)


@pytest.mark.parametrize("overrides, message", [
    (dict(arch="densenet121", depth=40), "--arch densenet121 fixes the architecture: leave out "
                                          "--depth (flags of the depth family)"),
    (dict(arch="densenet161", growth_rate=12, bc=False, compression=0.7),
     "leave out --growth_rate, --bc, --compression"),
    (dict(arch="densenet264"), "--arch must be one of densenet121, densenet161, densenet169, "
                               "densenet201"),
    (dict(dataset="cifar10", image_size=64), "--image_size 64 does not apply to cifar10"),
    (dict(dataset="fake", arch="densenet121", image_size=4), "--image_size 4: 4x4 images are "
                                                             "too small"),
    (dict(arch="densenet121", pretrained=True), "needs the ImageNet stem"),
    (dict(depth=40, pretrained=True), "--pretrained True loads torchvision's ImageNet weights"),
    (dict(pretrained="/no/such/file.pth"), "no such file"),
    (dict(pretrained=3.5), "--pretrained must be True, False or the path"),
])
def test_bad_architecture_and_weight_flags_are_refused(overrides, message):
    with pytest.raises(UsageError, match=".*") as error:
        resolve(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_fake_images_of_any_size():
    dataset = load_dataset("fake", None, fake_size=(4, 2), image_size=48)
    assert dataset.train_images.shape == (4, 3, 48, 48)
    assert dataset.test_images.shape == (2, 3, 48, 48)


# ---------------------------------------------------------------------------- --pretrained True

def test_torchvision_weights_from_torch_hubs_cache_in_both_modes_replace_the_classifier(
        torch_home, reference, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    state, source = read_torchvision("densenet121")
    path = torch_home / "hub" / "checkpoints" / CACHED_NAME
    assert source == f"torchvision's DenseNet121_Weights.IMAGENET1K_V1 from {path}"
    x = torch.randn(2, 3, 64, 64)
    logits = []
    for efficient in (False, True):
        model = densenet121(5, efficient)
        fresh_classifier = model.classifier.weight.detach().clone()
        note = load_into(model, state, source, "DenseNet-121")
        assert note == (f"{source}: 604 tensors loaded (all but the classifier); classifier "
                        f"replaced: 1000 classes in the file, 5 here (newly initialised)")
        assert_features_equal(model, reference)
        assert torch.equal(model.classifier.weight, fresh_classifier)
        with torch.no_grad():
            logits.append(model.eval()(x))
    assert torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_torchvisions_own_loader_reads_the_same_cache_file(torch_home, reference, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    theirs = torchvision.models.densenet121(weights=WEIGHTS)  # reads the cache, no network
    assert all(torch.equal(value, reference.state_dict()[key])
               for key, value in theirs.state_dict().items())


def test_offline_the_error_names_the_file_to_place(tmp_path, monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UsageError) as error:
        read_torchvision("densenet121")
    message = str(error.value)
    path = tmp_path / "hub" / "checkpoints" / CACHED_NAME
    assert message.startswith("cannot download torchvision's DenseNet121_Weights.IMAGENET1K_V1")
    assert f"place the file {WEIGHTS.url} at {path} " in message and "\n" not in message
    assert not any(path.parent.iterdir())  # nothing half-downloaded was left
    path.write_bytes(b"not a weights file")  # a damaged cache is not downloaded over
    with pytest.raises(UsageError, match=f"cannot read .* from {path} .* delete that file"):
        read_torchvision("densenet121")


# ---------------------------------------------------------------------------- --pretrained PATH
# The loading rules on a small DenseNet with the ImageNet stem (fast); densenet121 above.

SMALL = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=4,
             compression=0.5)


@pytest.fixture(scope="module")
def small_reference():
    torch.manual_seed(0)
    model = DenseNet(**SMALL, num_classes=7, small_inputs=False)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model


def small(num_classes=5, efficient=True, **overrides):
    torch.manual_seed(1)
    return DenseNet(**dict(SMALL, **overrides), num_classes=num_classes, small_inputs=False,
                    efficient=efficient)


def legacy_names(state):
    """torchvision's pre-0.4 DenseNet names: norm.1 for norm1, conv.2 for conv2..."""
    renamed = {}
    for key, value in state.items():
        if "denselayer" in key:
            for part in ("norm", "relu", "conv"):
                for i in "12":
                    key = key.replace(f".{part}{i}.", f".{part}.{i}.")
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("wrap", ["legacy", "tool", "torchvision_reference", "module_prefix",
                                  "same_classes"])
def test_state_dicts_and_checkpoints_from_files(tmp_path, small_reference, wrap):
    state = {k: v for k, v in small_reference.state_dict().items()
             if not k.endswith("num_batches_tracked")}  # as in torchvision's published files
    content = {
        "legacy": lambda: legacy_names(state),
        "tool": lambda: {"model": state, "epoch": 3, "config": {"arch": None}},
        "torchvision_reference": lambda: {"model": state, "optimizer": {}, "epoch": 89,
                                          "args": argparse.Namespace(lr=0.1, model="d")},
        "module_prefix": lambda: {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "same_classes": lambda: state,
    }[wrap]()
    if wrap == "legacy":
        assert "features.denseblock1.denselayer1.norm.1.weight" in content
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    model = small(7 if wrap == "same_classes" else 5)
    note = load_into(model, *read_file(str(path)), "the small DenseNet")
    assert str(path) in note
    if wrap == "same_classes":
        assert note.endswith("(all, the classifier's included: 7 classes)")
        assert torch.equal(model.classifier.weight, small_reference.classifier.weight)
    else:
        assert note.endswith("(all but the classifier); classifier replaced: 7 classes in the "
                             "file, 5 here (newly initialised)")
    assert_features_equal(model, small_reference)


@pytest.mark.parametrize("content, message", [
    (b"this is text, not weights", "cannot read it as a PyTorch weights file"),
    (b"", "cannot read it as a PyTorch weights file"),
    ([1, 2, 3], "is not a state_dict (names -> tensors) nor a checkpoint"),
    ({"model": "nothing", "epoch": 1}, "is not a state_dict"),
    ({}, "is not a state_dict"),
    ("deeper", ("does not fit the small DenseNet: 12 tensors in the file are not in the model "
                "(e.g. features.denseblock2.denselayer3.norm1.weight); ",
                "tensors have other shapes (e.g. features.norm5.weight: (20,) in the file, "
                "(16,) in the model); is it another architecture?")),
    ("cifar_stem", "does not fit the small DenseNet: 4 of the model's tensors are missing (e.g. "
                   "features.norm0.weight); 1 tensors have other shapes (e.g. "
                   "features.conv0.weight: (8, 3, 3, 3) in the file, (8, 3, 7, 7) in the "
                   "model); its stem differs: this tool gives the ImageNet stem to images of "
                   "64 pixels and more (--image_size)"),
    ("other_features", "classifier.weight: (7, 30) in the file, (5, 16) in the model"),
])
def test_bad_weight_files_are_refused_in_one_line(tmp_path, small_reference, content, message):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        if content == "deeper":
            content = small(block_config=(2, 3)).state_dict()
        elif content == "cifar_stem":
            torch.manual_seed(0)
            content = DenseNet(**SMALL, num_classes=5, small_inputs=True).state_dict()
        elif content == "other_features":
            content = dict(small_reference.state_dict(), **{
                "classifier.weight": torch.zeros(7, 30), "classifier.bias": torch.zeros(7)})
        torch.save(content, path)
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as error:
        load_into(model, *read_file(str(path)), "the small DenseNet")
    for fragment in (message,) if isinstance(message, str) else message:
        assert fragment in str(error.value)
    assert str(error.value).startswith(str(path)) or f" {path}: " in str(error.value)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_resolve_pretrained():
    assert resolve_pretrained(None, None, 32) is None
    assert resolve_pretrained(False, "densenet121", 32) is None
    assert resolve_pretrained(True, "densenet121", 64) is True
    assert resolve_pretrained(__file__, None, 32) == os.path.abspath(__file__)


# ---------------------------------------------------------------------------- end to end

def test_pretrained_densenet121_trains_at_64_px_and_resumes_without_the_weights(
        tmp_path, torch_home):
    save = tmp_path / "run"
    args = ["--dataset", "fake", "--fake_size", "8,4", "--image_size", 64, "--arch",
            "densenet121", "--pretrained", "True", "--batch_size", 4, "--valid_size", 0,
            "--n_epochs", 2, "--seed", 3, "--save", save]
    env = {**ENV, "TORCH_HOME": str(torch_home)}
    result = run_demo(args, env=env)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:7]] == ["run", "device", "torch", "model",
                                                       "weights", "data", "schedule"]
    assert "DenseNet-121 (torchvision's densenet121" in lines[3] and "ImageNet stem" in lines[3]
    assert lines[4] == (f"weights  torchvision's DenseNet121_Weights.IMAGENET1K_V1 from "
                        f"{torch_home}/hub/checkpoints/{CACHED_NAME}: 604 tensors loaded (all "
                        f"but the classifier); classifier replaced: 1000 classes in the file, "
                        f"10 here (newly initialised)")
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]
    config = json.loads((save / "config.json").read_text())
    assert (config["arch"], config["pretrained"], config["image_size"]) == \
        ("densenet121", True, 64)
    # Resuming takes the weights from checkpoint.pt: the cache may be gone, and offline.
    empty = tmp_path / "empty_torch_home"
    result = run_demo([*args, "--resume", "True"],
                      env={**ENV, **OFFLINE, "TORCH_HOME": str(empty)})
    assert_ok(result)
    assert "already trained its 2 epochs; nothing was changed" in result.stdout
    assert "weights" not in result.stdout and not empty.exists()


def test_pretrained_densenet121_on_a_5_class_folder_at_64_px_in_both_memory_modes(
        tmp_path, torch_home):
    data = tmp_path / "data"
    tints = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for split, count in (("train", 6), ("test", 2)):
        for c, tint in enumerate(tints):
            for i in range(count):
                write_image(data / split / f"class{c}" / f"{i}.{('jpg', 'png')[i % 2]}",
                            (72 + 8 * i, 96), seed=100 * c + i, tint=tint)
    first_steps = {}
    for efficient in (False, True):
        save = tmp_path / f"run-{efficient}"
        result = run_demo(["--dataset", "folder", "--data", data, "--image_size", 64, "--arch",
                           "densenet121", "--pretrained", "True", "--efficient", efficient,
                           "--batch_size", 10, "--lr", 0.01, "--valid_size", 0, "--n_epochs", 2,
                           "--seed", 3, "--workers", 1, "--log_every", 0, "--save", save],
                          env={**ENV, **OFFLINE, "TORCH_HOME": str(torch_home)})
        assert_ok(result)
        lines = result.stdout.splitlines()
        assert (f"weights  torchvision's DenseNet121_Weights.IMAGENET1K_V1 from {torch_home}/hub/"
                f"checkpoints/{CACHED_NAME}: 604 tensors loaded (all but the classifier); "
                f"classifier replaced: 1000 classes in the file, 5 here (newly initialised)"
                in lines), result.stdout
        assert "evaluation resizes to 73 and takes the centre" in result.stdout  # 64 * 8/7
        assert "(ImageNet's)" in result.stdout
        config = json.loads((save / "config.json").read_text())
        assert config["classes"] == [f"class{c}" for c in range(5)]
        assert (config["mean"], config["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
        losses = [float(row["train_loss"]) for row in read_rows(save)]
        assert len(losses) == 2 and losses[1] < losses[0], losses  # it learns
        first_steps[efficient] = next(float(line.split("| loss ")[1].split()[0])
                                      for line in lines if line.startswith("epoch 1/2 step 1/3"))
    # The same weights and inputs in both modes: the same first step, up to float rounding
    # (later steps drift apart: a fine-tuned BatchNorm network on batches of 10 amplifies it).
    assert first_steps[True] == pytest.approx(first_steps[False], abs=2e-4), first_steps


# ---------------------------------------------------------------------------- planner

def test_plan_for_a_named_architecture_at_512_px(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(plan=True, arch="densenet121", image_size=512, memory_budget="16GiB")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("DenseNet-121 (torchvision's densenet121: k=32, blocks 6-12-24-16), "
                          "ImageNet stem, dropout 0, 10 classes; batch 64 of 512x512 images")
    assert "deepest: of torchvision's DenseNets with this growth rate (DenseNet-121, " \
           "DenseNet-169, DenseNet-201)." in out
    architecture = dict(imagenet_config("densenet121"), num_classes=10, small_inputs=False,
                        image_size=512)
    report = plan(architecture, batch_size=64, budget=16 * 2**30, arch="densenet121")
    net = memory.network(**architecture)
    rows = {line.split("  ")[0].replace(" (chosen)", "").replace(" (reference)", ""): line
            for line in out.splitlines() if line.startswith(("naive", "efficient", "torch"))}
    assert len(rows) == 4
    for mode, figures in report["modes"].items():
        largest = figures["largest_batch"]
        assert memory.peak_bytes(net, largest, mode) <= 16 * 2**30 \
            < memory.peak_bytes(net, largest + 1, mode)
        assert f"{largest:,}" in rows[{"recompute_bottleneck": "efficient + recompute_bottleneck",
                                       "torchvision_memory_efficient":
                                       "torchvision memory_efficient"}.get(mode, mode)]
        deepest = figures["deepest"]  # the deepest of 121, 169, 201 that fits at batch 64
        assert deepest in (None, 121, 169, 201)
        for name, depth in (("densenet121", 121), ("densenet169", 169), ("densenet201", 201)):
            peak = memory.peak_bytes(memory.network(**dict(architecture,
                                                           **imagenet_config(name))), 64, mode)
            assert (peak <= 16 * 2**30) == (deepest is not None and depth <= deepest)


def test_benchmarks_memory_table_holds_the_planners_largest_batches():
    from benchmarks.compare import GPU_MEMORY, imagenet_configs, memory_table
    from training.plan import largest_batch

    configs = imagenet_configs()
    assert {(c["name"], c["image_size"]) for c in configs} >= {("DenseNet-121 224px", 224),
                                                               ("DenseNet-201 448px", 448)}
    lines = memory_table([dict(config="DenseNet-121 448px", impl="efficient", amp="off",
                               saved_mb=949.0)], configs)
    row = next(line for line in lines if line.startswith("| DenseNet-121 448px | 4 | efficient"))
    net = memory.network(**imagenet_config("densenet121"), num_classes=1000, small_inputs=False,
                         image_size=448)
    expected = [f"{largest_batch(net, 'efficient', budget, amp=amp, device='cuda'):,}"
                for budget in GPU_MEMORY for amp in ("off", "bf16")]
    assert row.split(" | ")[3:5] == ["949.0", "237.25"]
    assert row.rstrip(" |").split(" | ")[-4:] == expected
    assert sum("not run" in line for line in lines) == 4 * len(configs) - 1


def test_a_named_arch_accepts_the_values_it_implies():
    """A resumed run's stored settings repeat what --arch implied: they are not a conflict."""
    config = resolve(arch="densenet121", depth=121, growth_rate=32, bc=True, compression=0.5)
    assert (config["arch"], config["depth"], config["growth_rate"]) == ("densenet121", 121, 32)
