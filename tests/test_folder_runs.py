"""demo.py on image folders, end to end: training, a stop and resume with workers, bad files,
--predict and --evaluate, and the CIFAR-10 subset as PNG and JPEG folders against its pickles."""

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_demo import (
    CIFAR_SUBSET,
    ENV,
    ROOT,
    assert_ok,
    assert_usage_error,
    load,
    read_rows,
    run_demo,
    without_timing,
)
from test_folder import BASE, ROTATED, encode, photo, write_folder, write_image
from test_restart import TORCHRUN_ENV, torchrun_command
from test_run_control import start, wait_for

from training.build import make_test_loader, read_dataset
from training.evaluation import read_saved, saved_model

CIFAR10 = CIFAR_SUBSET / "cifar-10-batches-py"


def folder_args(data, save, **overrides):
    """A DenseNet-BC with 1 layer per block on 32 px crops of a folder."""
    args = dict(dataset="folder", data=data, image_size=32, depth=10, growth_rate=4,
                batch_size=16, valid_size=16, n_epochs=3, seed=3, workers=2, log_every=0,
                save=save)
    args.update(overrides)
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """3 classes told apart by their tint: 40 training and 8 test images each, JPEG and PNG
    of various sizes, plus files that are not images."""
    root = tmp_path_factory.mktemp("pets")
    tints = {"cat": (255, 60, 0), "dog": (0, 60, 255), "fox": (60, 255, 0)}
    sizes = [(40, 48), (48, 40), (36, 64), (64, 64), (50, 37)]
    for split, count in (("train", 40), ("test", 8)):
        for c, (name, tint) in enumerate(tints.items()):
            for i in range(count):
                fmt = ("jpg", "png")[i % 2]
                write_image(root / split / name / f"{i:03d}.{fmt}", sizes[i % 5],
                            seed=1000 * c + i + (500 if split == "test" else 0), tint=tint)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("about this data")
    return root


@pytest.fixture(scope="module")
def reference_run(pets, tmp_path_factory):
    """An uninterrupted 3-epoch run on pets, decoding in the training process."""
    save = tmp_path_factory.mktemp("reference") / "run"
    result = run_demo(folder_args(pets, save, workers=0))
    assert_ok(result)
    return save, result


def test_a_folder_run_reports_its_data_and_records_what_predictions_need(reference_run, pets):
    save, result = reference_run
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"data     {pets}: 104 training, 16 validation, 24 test images")
               for line in lines), lines
    assert "ignored  1 file (not an image, or hidden): train/cat/notes.txt" in lines
    assert f"ignored  in {pets}: README.md (only train/, val/ and test/ are read)" in lines
    assert any(line.startswith("images   32x32: training takes random-resized crops and "
                               "flips; evaluation resizes to 32 and takes the centre; mean (")
               and line.endswith("(computed from 120 training images)") for line in lines), lines
    assert ("splits   3 classes from train/; validation: 16 images held out of train/; "
            "test: test/") in lines
    config = json.loads((save / "config.json").read_text())
    assert config["classes"] == ["cat", "dog", "fox"] and config["image_size"] == 32
    assert config["resize_size"] == 32 and len(config["mean"]) == len(config["std"]) == 3
    assert load(save / "model_best.pt")["config"]["classes"] == ["cat", "dog", "fox"]
    errors = [float(row["test_error"]) for row in read_rows(save)]
    assert min(errors) < 0.5  # chance: 0.67; the tints make it learnable


def test_sigterm_mid_epoch_with_workers_then_resume_is_bitwise_identical(reference_run, pets,
                                                                          tmp_path):
    reference, _ = reference_run
    save = tmp_path / "stopped"
    output = tmp_path / "out.txt"
    process = start(folder_args(pets, save, workers=2), output)
    try:  # 7 steps per epoch: stop in the middle of epoch 2
        wait_for(lambda: "epoch 2/3 step 3/7" in output.read_text(), process, timeout=600,
                 what="step 3 of epoch 2", output=output)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, output.read_text()
    finally:
        process.kill()
        process.wait()
    checkpoint = load(save / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and 3 <= checkpoint["position"]["step"] < 7
    # Resumed with another number of workers: the batches do not depend on it.
    assert_ok(run_demo([*folder_args(pets, save, workers=1), "--resume", "True"]))
    for name in ("checkpoint.pt", "model_best.pt"):
        expected, actual = load(reference / name), load(save / name)
        assert expected["epoch"] == actual["epoch"]
        for key, tensor in expected["model"].items():
            assert torch.equal(tensor, actual["model"][key]), (name, key)
    assert without_timing(read_rows(save)) == without_timing(read_rows(reference))
    assert (save / "summary.json").read_text() == (reference / "summary.json").read_text()


def predicted_classes(save, data):
    """The classes the saved model gives the test images, computed here as --evaluate does."""
    path, saved = read_saved(str(save), "check")
    run = {**saved["config"], "data": str(data), "workers": 0, "skip_bad_images": False}
    dataset = read_dataset(run, download=False)
    model = saved_model(path, saved, run, dataset.num_classes, torch.device("cpu"))
    loader = make_test_loader(run, dataset, torch.device("cpu"))
    with torch.no_grad():
        labels = torch.cat([model(inputs).argmax(1) for inputs, _ in loader])
    names = run.get("classes") or [str(i) for i in range(dataset.num_classes)]
    return [names[label] for label in labels.tolist()], loader.images


def read_predictions(save):
    with open(Path(save) / "predictions.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_predict_on_a_folder_and_files_matches_evaluate(reference_run, pets, tmp_path):
    save, _ = reference_run
    single = pets / "test" / "dog" / "003.png"
    copy = tmp_path / "photo without extension"
    shutil.copy(pets / "test" / "fox" / "000.jpg", copy)
    result = run_demo(["--save", save, "--predict", f"{pets / 'test'},{single},{copy}",
                       "--workers", "2"])
    assert_ok(result)
    rows = read_predictions(save)
    assert list(rows[0]) == ["file", "class", "probability", "class_2", "probability_2",
                             "class_3", "probability_3"]
    expected, files = predicted_classes(save, pets)
    assert [row["file"] for row in rows] == [*files, str(single), str(copy)]
    assert [row["class"] for row in rows[:24]] == expected
    assert rows[24]["class"] == expected[files.index(str(single))]
    assert rows[25]["class"] == expected[files.index(str(pets / "test" / "fox" / "000.jpg"))]
    for row in rows:
        probabilities = [float(row[k]) for k in ("probability", "probability_2",
                                                 "probability_3")]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
    # --evaluate's test error is the share of test images whose class is not their folder's.
    wrong = sum(row["class"] != Path(row["file"]).parent.name for row in rows[:24])
    evaluated = run_demo(["--save", save, "--evaluate", "True"])
    assert_ok(evaluated)
    assert f"test error {wrong / 24:.4f}" in evaluated.stdout


def test_predict_reports_each_bad_path_and_file_in_one_line(reference_run, pets, tmp_path):
    save, _ = reference_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(encode(BASE, "JPEG")[:700])
    result = run_demo(["--save", save, "--predict",
                       f"{tmp_path / 'absent.png'},{tmp_path / 'empty'},{tmp_path / 'broken.jpg'},"
                       f"{pets / 'test' / 'cat' / '001.png'}", "--workers", "0"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'absent.png'}: no such file or folder",
        f"error: {tmp_path / 'empty'}: no image files in this folder",
        f"error: cannot read the image {tmp_path / 'broken.jpg'}: cannot decode this JPEG file "
        f"(Image is incomplete or truncated)"]
    assert [row["file"] for row in read_predictions(save)] == [str(pets / "test" / "cat" /
                                                                   "001.png")]
    assert "1 image classified" in result.stdout
    assert "3 paths or files could not be read" in result.stdout
    # A batch with no readable image (here the only one) is passed over, not an error.
    result = run_demo(["--save", save, "--predict", tmp_path / "broken.jpg", "--workers", "0"])
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert read_predictions(save) == [] and "0 images classified" in result.stdout


# ---------------------------------------------------------------------------- bad data

@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """Training images in every format and mode users have, files that are not images, a link
    loop; and test/ holding a truncated JPEG, a text file named .jpg, a zero-byte PNG and a
    link to itself among good images."""
    root = tmp_path_factory.mktemp("odd")
    write_folder(root, {"train": {"cat": 8, "dog": 8}, "test": {"cat": 2, "dog": 2}})
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    odd = {cat / "gray.jpg": encode(BASE.convert("L"), "JPEG"),
           cat / "cmyk.jpg": encode(BASE.convert("CMYK"), "JPEG"),
           cat / "rgba.png": encode(BASE.convert("RGBA"), "PNG"),
           cat / "rotated.jpg": encode(BASE, "JPEG", exif=ROTATED.tobytes()),
           dog / "deep.png": encode(Image.fromarray(photo(40, 40)[:, :, 0].astype(np.uint16)
                                                     * 257), "PNG"),
           dog / "palette.gif": encode(BASE.convert("P"), "GIF"),
           dog / "old.bmp": encode(BASE, "BMP"),
           dog / "web.webp": encode(BASE, "WEBP"),
           dog / "scan.tiff": encode(BASE, "TIFF")}
    for path, content in odd.items():
        path.write_bytes(content)
    (cat / "labels.csv").write_text("a,b\n")
    (dog / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (dog / "again").symlink_to(dog)
    test = root / "test" / "dog"
    (test / "truncated.jpg").write_bytes(encode(BASE, "JPEG")[:700])
    (test / "notes.jpg").write_text("this is text")
    (test / "empty.png").write_bytes(b"")
    (test / "loop.jpg").symlink_to(test / "loop.jpg")
    return root


def test_an_unreadable_image_stops_the_run_then_resume_skips_it(odd_files, tmp_path):
    save = tmp_path / "run"
    args = folder_args(odd_files, save, n_epochs=2, valid_size=0, batch_size=8)
    result = run_demo(args)
    bad = odd_files / "test" / "dog" / "empty.png"
    assert_usage_error(result, f"cannot read the image {bad}: empty file (0 bytes); the run "
                       f"stopped with its last checkpoint kept", "--skip_bad_images True",
                       "--resume True")
    assert "ignored  2 files (not images, or hidden): train/cat/labels.csv, train/dog/.DS_Store" \
        in result.stdout
    assert "ignored  1 folder link looping back (not followed): train/dog/again" in result.stdout
    assert (save / "config.json").exists() and not (save / "checkpoint.pt").exists()

    resumed = run_demo([*args, "--resume", "True", "--skip_bad_images", "True"])
    assert_ok(resumed)
    skipped = [line for line in resumed.stdout.splitlines() if line.startswith("skipped ")]
    assert sorted(line.split()[1].rstrip(":") for line in skipped) == sorted(
        str(odd_files / "test" / "dog" / name)
        for name in ("empty.png", "loop.jpg", "notes.jpg", "truncated.jpg"))
    assert "Too many levels of symbolic links" in resumed.stdout
    assert skipped[-1].endswith("(4 unreadable images skipped so far)")
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]
    assert json.loads((save / "summary.json").read_text())["dataset"] == "folder"


def test_a_resumed_run_refuses_training_data_that_changed(pets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pets, data)
    save = tmp_path / "run"
    args = folder_args(data, save, n_epochs=1, workers=0)
    assert_ok(run_demo(args))
    config = json.loads((save / "config.json").read_text())
    assert config["train_images"] == 120 and config["classes"] == ["cat", "dog", "fox"]
    more = [*args[:args.index("--n_epochs") + 1], "2", *args[args.index("--n_epochs") + 2:],
            "--resume", "True"]
    shutil.copy(data / "train" / "cat" / "000.jpg", data / "train" / "cat" / "extra.jpg")
    assert_usage_error(run_demo(more), f"the data changed since the run in {save} started: "
                       f"120 training images then, 121 now; restore it, or start a new run")
    (data / "train" / "wolf").mkdir()
    (data / "train" / "cat" / "extra.jpg").rename(data / "train" / "wolf" / "extra.jpg")
    assert_usage_error(run_demo(more), "classes wolf new, none gone")
    shutil.rmtree(data / "train" / "wolf")
    resumed = run_demo(more)
    assert_ok(resumed)
    assert "(computed from" not in resumed.stdout  # the stored mean and std, not measured again
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]


def test_under_torchrun_an_unreadable_image_is_named_by_the_process_reading_it(tmp_path):
    # 1,001 training images: mean and std are measured on 1,000 of them, which leave out the
    # last; it is unreadable, and the seed puts it into rank 1's share of the first epoch.
    data = write_folder(tmp_path / "data", {"train": {"cat": 501, "dog": 500}})
    bad = data / "train" / "dog" / "499.jpg"
    bad.write_text("not an image")
    seed = next(seed for seed in range(100) if (position := torch.randperm(
        1001, generator=torch.Generator().manual_seed(seed + 1)).tolist().index(1000)) < 1000
        and position % 2 == 1)
    args = folder_args(data, tmp_path / "run", image_size=16, batch_size=32, valid_size=0,
                       n_epochs=1, seed=seed, workers=1)
    result = subprocess.run(torchrun_command(args), cwd=ROOT, env=TORCHRUN_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"error: rank 1: cannot read the image {bad}: not an image file (unknown format); " \
        f"the run stopped with its last checkpoint kept" in "\n".join(lines), result.stderr


def with_shared_memory(megabytes, command):
    """command with a /dev/shm of its own, a tmpfs of `megabytes` (in a mount namespace)."""
    mount = f"mount -t tmpfs -o size={megabytes}m tmpfs /dev/shm && exec \"$@\""
    return ["unshare", "--mount", "sh", "-c", mount, "sh", *map(str, command)]


def test_too_little_shared_memory_stops_a_run_in_one_line(pets, tmp_path):
    if subprocess.run(with_shared_memory(1, ["true"]), capture_output=True).returncode != 0:
        pytest.skip("needs unshare and mount (root) for a small /dev/shm of its own")
    # The training set's statistics need three 2.3 MiB batches at once; 4 MiB hold one.
    args = folder_args(pets, tmp_path / "run", image_size=64, n_epochs=1)
    command = with_shared_memory(4, [sys.executable, ROOT / "demo.py", *args])
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert_usage_error(result, "cannot allocate a batch of 2 MiB in shared memory",
                       "No space left on device", "--shm-size", "fewer --workers")


def test_a_folder_without_train_is_refused_in_one_line(tmp_path):
    write_folder(tmp_path / "data", {"val": {"cat": 2}})
    save = tmp_path / "run"
    assert_usage_error(run_demo(folder_args(tmp_path / "data", save)), "has no train/ folder")
    assert not save.exists()


# ---------------------------------------------------------------------------- CIFAR-10 subset

def write_cifar_copies(root, per_batch, test_count):
    """The first per_batch images of each training batch and test_count test images of the
    CIFAR-10 subset: as its pickles, as a PNG folder and as a JPEG folder (quality 90).

    The pickles hold the images in the folders' order (class, then file name; CIFAR-10's label
    numbers follow its sorted class names), so that with one seed the three runs draw the same
    permutations and see the same images in the same order: their differences are decoding and
    normalisation alone, not the luck of the order."""
    names = pickle.loads((CIFAR10 / "batches.meta").read_bytes(), encoding="latin1")
    names = names["label_names"]
    assert names == sorted(names), names
    pickles = root / "pickle" / "cifar-10-batches-py"
    pickles.mkdir(parents=True)
    shutil.copy(CIFAR10 / "batches.meta", pickles)
    splits = {"train": [], "test": []}
    for name, count in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)],
                        ("test_batch", test_count)]:
        entry = pickle.loads((CIFAR10 / name).read_bytes(), encoding="latin1")
        images = np.asarray(entry["data"][:count]).reshape(-1, 3, 32, 32)
        split = "test" if name == "test_batch" else "train"
        splits[split] += [(names[label], f"{name}_{i:05d}", label, image) for i, (image, label)
                          in enumerate(zip(images, entry["labels"][:count], strict=True))]
    for split, items in splits.items():
        items.sort(key=lambda item: item[:2])
        for class_name, file_name, _, image in items:
            for kind, options in (("png", {}), ("jpg", {"quality": 90})):
                folder = root / kind / split / class_name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{file_name}.{kind}",
                                                              **options)
    batches = {"test_batch": splits["test"]}
    for i in range(5):  # the training images in order, cut into the five batches
        batches[f"data_batch_{i + 1}"] = splits["train"][i * per_batch:(i + 1) * per_batch]
    for name, items in batches.items():
        part = {"labels": [item[2] for item in items], "filenames": [item[1] for item in items],
                "data": np.stack([item[3].reshape(-1) for item in items]),
                "batch_label": name}
        (pickles / name).write_bytes(pickle.dumps(part, protocol=2))
    return root


def train_three_ways(root, kinds=("pickle", "png", "jpg")):
    """DenseNet-BC-40 for 3 epochs on the pickles and on the folders of kinds, all at once.

    Without augmentation: the two paths augment differently by design (zero-pad and crop
    against random-resized crops), while decoding, labels and normalisation must agree. Batch
    32 at a constant learning rate: on a CPU a larger batch costs as much per image and learns
    less in 3 epochs."""
    common = ["--depth", "40", "--growth_rate", "12", "--n_epochs", "3", "--batch_size", "32",
              "--milestones", "[]", "--augment", "False", "--valid_size", "0", "--seed", "0",
              "--log_every", "600"]
    commands = {
        "pickle": ["--dataset", "cifar10", "--data", root / "pickle"],
        "png": ["--dataset", "folder", "--image_size", "32", "--data", root / "png",
                "--workers", "0"],
        "jpg": ["--dataset", "folder", "--image_size", "32", "--data", root / "jpg",
                "--workers", "0"]}
    processes = {kind: subprocess.Popen(
        [sys.executable, str(ROOT / "demo.py"), *map(str, command), *common, "--save",
         str(root / f"run-{kind}")], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for kind, command in commands.items()
        if kind in kinds}
    errors = {}
    for kind, process in processes.items():
        output, _ = process.communicate(timeout=3600)
        assert process.returncode == 0, output
        errors[kind] = json.loads((root / f"run-{kind}" / "summary.json").read_text())[
            "test_error"]
    return errors


@pytest.fixture(scope="module")
def cifar_subset_runs(tmp_path_factory):
    if not CIFAR10.is_dir():
        pytest.skip(f"{CIFAR_SUBSET} is absent")
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_copies(root, 120, 300)
    errors = train_three_ways(root, ("pickle", "png"))  # the JPEGs: on the pickle run's model
    print(f"test errors after 3 epochs: {errors}")
    return root, errors


LEARNED = ("train_loss", "train_error", "test_error", "test_loss")


def prediction_error(save, images):
    """Test error of the run in save on the images below `images`/<class>/, by --predict."""
    assert_ok(run_demo(["--save", save, "--predict", images, "--workers", "1"]))
    rows = read_predictions(save)
    return sum(Path(row["file"]).parent.name != row["class"] for row in rows) / len(rows)


def test_cifar_subset_as_png_and_jpeg_folders_learns_as_the_pickles_do(cifar_subset_runs):
    # 600 training and 300 test images of the subset (the whole subset: the long test below).
    root, errors = cifar_subset_runs
    assert errors["pickle"] < 0.85, errors  # chance: 0.9; these settings reach about 0.79
    # PNG is lossless and the order is the pickles' (write_cifar_copies): the same inputs,
    # bitwise, so the same run, epoch by epoch.
    learned = {kind: [{key: row[key] for key in LEARNED} for row in read_rows(root / f"run-{kind}")]
               for kind in ("pickle", "png")}
    assert len(learned["pickle"]) == 3 and learned["png"] == learned["pickle"]
    # JPEG changes pixels by a few levels, and 57 steps on 600 images amplify any change into
    # test errors up to 0.08 apart (as a 1e-7 difference of the mean did): the decoding is
    # compared on one model, the pickle run's, on the JPEG test images (and the PNG ones: below).
    jpeg_error = prediction_error(root / "run-pickle", root / "jpg" / "test")
    assert abs(jpeg_error - errors["pickle"]) <= 0.03, (jpeg_error, errors)


@pytest.mark.long
@pytest.mark.skipif(os.environ.get("DENSENET_LONG_TESTS") != "1",
                    reason="long: DENSENET_LONG_TESTS=1 pytest -m long runs it")
def test_the_whole_cifar_subset_as_folders_learns_as_the_pickles_do(tmp_path):
    if not CIFAR10.is_dir():
        pytest.skip(f"{CIFAR_SUBSET} is absent")
    write_cifar_copies(tmp_path, 1017, 1017)
    errors = train_three_ways(tmp_path)
    print(f"test errors after 3 epochs: {errors}")
    assert errors["pickle"] < 0.8, errors
    assert abs(errors["png"] - errors["pickle"]) <= 0.03, errors
    assert abs(errors["jpg"] - errors["pickle"]) <= 0.03, errors


def test_predict_with_a_cifar_run_on_32_px_images(cifar_subset_runs):
    root, errors = cifar_subset_runs
    save = root / "run-pickle"
    result = run_demo(["--save", save, "--predict", root / "png" / "test", "--workers", "1"])
    assert_ok(result)
    rows = read_predictions(save)
    # The pickle run's own test loader, on the same (lossless) images.
    path, saved = read_saved(str(save), "check")
    run = {**saved["config"], "workers": 0, "skip_bad_images": False}
    dataset = read_dataset(run, download=False)
    model = saved_model(path, saved, run, 10, torch.device("cpu"))
    loader = make_test_loader(run, dataset, torch.device("cpu"))
    with torch.no_grad():
        logits = torch.cat([model(inputs) for inputs, _ in loader])
    names = saved["config"]["classes"]
    # The pickles hold the test images in the folders' order (write_cifar_copies).
    files = pickle.loads((root / "pickle" / "cifar-10-batches-py" / "test_batch").read_bytes())
    by_file = {Path(row["file"]).name: row for row in rows}
    assert len(by_file) == len(logits) == 300
    for name, probabilities, label in zip(files["filenames"], logits.softmax(1),
                                          dataset.test_labels, strict=True):
        row = by_file[f"{name}.png"]
        assert Path(row["file"]).parent.name == names[label]
        assert row["class"] == names[probabilities.argmax()]
        assert float(row["probability"]) == pytest.approx(probabilities.max().item(), abs=1e-5)
    wrong = sum(Path(row["file"]).parent.name != row["class"] for row in rows)
    assert wrong / len(rows) == errors["pickle"]  # the run's own test error
