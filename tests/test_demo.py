"""demo.py end to end through its command line (subprocesses on the CPU), plus a few unit tests."""

import csv
import fcntl
import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

import demo
from training.checkpoint import CHECKPOINT_KEYS
from training.devices import MALLOC_SETTINGS
from training.run_folder import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "cifar10-subset"
TIMING_COLUMNS = {"epoch_seconds", "images_per_second", "peak_memory_mb"}
# Subprocesses run on the CPU with one thread: deterministic, and no slower on a busy machine.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def tiny_args(save, **overrides):
    """Command-line arguments of a DenseNet-BC with 1 layer per block on a small fake dataset."""
    args = dict(dataset="fake", fake_size="192,48", depth=10, growth_rate=4, batch_size=32,
                valid_size=32, n_epochs=2, seed=7, save=save)
    args.update(overrides)
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def run_demo(args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_ok(result):
    assert result.returncode == 0, result.stderr


def assert_usage_error(result, *fragments):
    """Exit status 2 and one line "error: ..." on stderr holding every fragment."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def read_rows(folder):
    with open(Path(folder) / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def snapshot(folder):
    """Name -> sha256 of every file in folder, to show nothing was touched.

    .lock is left out: each process that takes the lock writes its PID there."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()
            if p.name != ".lock"}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A finished 2-epoch run on fake data, shared by the tests that only read it."""
    save = tmp_path_factory.mktemp("fake") / "run"
    result = run_demo(tiny_args(save, drop_rate=0.1))
    assert_ok(result)
    return save, result


# ---------------------------------------------------------------------------- runs

def test_fake_run_writes_config_csv_checkpoints_and_summary(fake_run):
    save, result = fake_run
    assert {p.name for p in save.iterdir()} == {"config.json", "results.csv", "checkpoint.pt",
                                                 "model_best.pt", "summary.json", "log.txt",
                                                 ".lock"}
    with open(save / "results.csv") as file:
        assert file.readline().strip() == ",".join(CSV_COLUMNS)
    rows = read_rows(save)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert [float(row["lr"]) for row in rows] == [0.1, pytest.approx(0.01)]  # milestone 1
    for row in rows:
        for column in ("train_error", "valid_error", "test_error"):
            assert 0 <= float(row[column]) <= 1
        assert float(row["train_loss"]) > 0 and float(row["images_per_second"]) > 0
        assert row["peak_memory_mb"] == ""  # CPU
    # Not a terminal: the start-up block, progress lines, a line per epoch, the final error.
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:6]] == ["run", "device", "torch", "model", "data",
                                                       "schedule"]
    assert "(new run)" in lines[0] and str(save) in lines[0]
    assert "2,666 parameters" in lines[3] and "160 training, 32 validation, 48 test" in lines[4]
    epoch_lines = [line for line in lines if line.startswith("epoch") and " lr " in line]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert lines[-1].startswith("final test error")
    # log.txt holds everything that was printed, after a line naming the process.
    logged = (save / "log.txt").read_text().splitlines()
    assert logged[0].startswith("---- ") and "PID" in logged[0]
    assert logged[1:] == lines

    config = json.loads((save / "config.json").read_text())
    assert config["depth"] == 10 and config["compression"] == 0.5 and config["bc"] is True
    assert config["milestones"] == [1] and config["seed"] == 7 and config["save"] == str(save)
    assert config["environment"]["world_size"] == 1
    assert config["environment"]["torch"] == torch.__version__

    checkpoint = load(save / "checkpoint.pt")
    assert CHECKPOINT_KEYS <= checkpoint.keys()
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["depth"] == 10
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert "features.denseblock1.denselayer1.conv1.weight" in checkpoint["model"]
    best = load(save / "model_best.pt")
    valid_errors = [float(row["valid_error"]) for row in rows]
    assert best["epoch"] == 1 + valid_errors.index(min(valid_errors))
    assert not any(key.startswith("module.") for key in best["model"])

    summary = json.loads((save / "summary.json").read_text())
    assert summary["model"] == "best" and summary["epoch"] == best["epoch"]
    best_row = rows[best["epoch"] - 1]
    assert summary["test_error"] == pytest.approx(float(best_row["test_error"]), abs=1e-6)
    assert f"{summary['test_error']:.4f}" in lines[-1]


def test_evaluate_prints_the_saved_models_test_error(fake_run):
    save, _ = fake_run
    before = snapshot(save)
    result = run_demo(["--save", save, "--evaluate", "True"])
    assert_ok(result)
    summary = json.loads((save / "summary.json").read_text())
    assert f"test error {summary['test_error']:.4f}" in result.stdout
    assert "model_best.pt" in result.stdout
    assert snapshot(save) == before


def test_learns_on_the_cifar10_subset(tmp_path):
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"{CIFAR_SUBSET} is absent")
    save = tmp_path / "run"
    result = run_demo(["--dataset", "cifar10", "--data", CIFAR_SUBSET, "--save", save,
                       "--depth", "10", "--growth_rate", "4", "--valid_size", "0",
                       "--n_epochs", "4", "--batch_size", "64", "--milestones", "[]",
                       "--augment", "False", "--seed", "0"])
    assert_ok(result)
    summary = json.loads((save / "summary.json").read_text())
    assert summary["model"] == "last"
    assert summary["test_error"] < 0.75  # chance is 0.9; these settings reach about 0.65
    assert len(read_rows(save)) == 4


def wait_for_write(path, old_mtime, process, timeout=120):
    """Wait until `path` is (re)written, i.e. the run has finished its preparations."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns != old_mtime:
            return
        assert process.poll() is None, "the run ended before it started training"
        time.sleep(0.01)
    raise AssertionError(f"{path} was not written within {timeout} s")


def assert_same_weights(save, reference):
    """save's run ended with reference's weights (checkpoint.pt and model_best.pt), momentum
    and results.csv rows, bitwise; returns both checkpoint.pt's contents."""
    for name in ("checkpoint.pt", "model_best.pt"):
        expected, actual = load(reference / name), load(save / name)
        assert expected["epoch"] == actual["epoch"], name
        assert expected["model"].keys() == actual["model"].keys()
        for key, tensor in expected["model"].items():
            assert torch.equal(tensor, actual["model"][key]), (name, key)
    expected, actual = load(reference / "checkpoint.pt"), load(save / "checkpoint.pt")
    for key, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           actual["optimizer"]["state"][key]["momentum_buffer"])
    assert without_timing(read_rows(save)) == without_timing(read_rows(reference))
    return expected, actual


def test_sigkill_and_resume_end_bitwise_identical(tmp_path):
    args = dict(n_epochs=5, fake_size="256,48", drop_rate=0.2, milestones="2,4", seed=11)
    reference = tmp_path / "reference"
    assert_ok(run_demo(tiny_args(reference, **args)))
    epoch_seconds = [float(row["epoch_seconds"]) for row in read_rows(reference)]

    rng = random.Random(20240601)
    save = tmp_path / "killed"
    for attempt in range(2):  # kill the first run, then the first resumed one
        config = save / "config.json"
        old_mtime = config.stat().st_mtime_ns if config.exists() else None
        checkpoint = save / "checkpoint.pt"
        done = load(checkpoint)["epoch"] if checkpoint.exists() else 0
        resume = ["--resume", "True"] if attempt else []
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "demo.py"), *tiny_args(save, **args), *resume],
            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_write(config, old_mtime, process)
            time.sleep(rng.uniform(0.0, 0.8) * sum(epoch_seconds[done:]))
            assert process.poll() is None, "the run finished before it could be killed"
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL
    assert_ok(run_demo([*tiny_args(save, **args), "--resume", "True"]))

    expected, actual = assert_same_weights(save, reference)
    assert torch.equal(expected["rng"]["data"], actual["rng"]["data"])
    assert json.loads((save / "summary.json").read_text()) == \
        json.loads((reference / "summary.json").read_text())


def test_progress_bar_on_a_terminal(tmp_path):
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen([sys.executable, str(ROOT / "demo.py"),
                                *tiny_args(tmp_path / "run", n_epochs=1)],
                               cwd=ROOT, env=ENV, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed: the run is over
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0, output
    text = output.decode(errors="replace")
    assert "epoch 1/1:" in text and "images_s=" in text and "error=" in text  # tqdm's bar
    assert "final test error" in text


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_with_gloo(tmp_path):
    save = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(ROOT / "demo.py"),
               *tiny_args(save, fake_size="128,32", valid_size=16)]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = read_rows(save)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # 128 - 16 validation images: each process trains on 56 of them per epoch.
    config = json.loads((save / "config.json").read_text())
    assert config["environment"]["world_size"] == 2
    checkpoint = load(save / "checkpoint.pt")
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert (save / "summary.json").exists()
    # Only rank 0 reports.
    assert result.stdout.count("epoch 1/2") == 1
    assert result.stdout.count("final test error") == 1


def test_help_lists_every_flag():
    result = run_demo(["--help"])
    assert_ok(result)
    shown = result.stdout + result.stderr  # fire writes help to stderr when it is not a terminal
    for name in inspect.signature(demo.main).parameters:
        assert f"--{name}=" in shown, name


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (dict(depth=99), "nearest valid depths: 94, 100"),
    (dict(dataset="imagenet"), "unknown --dataset 'imagenet'"),
    (dict(bc="maybe"), "--bc must be True or False (or true/false, yes/no, 1/0), got 'maybe'"),
    (dict(lr="abc"), "--lr must be a positive number"),
    (dict(batch_size=0), "--batch_size must be an integer >= 1"),
    (dict(n_epochs=-2), "--n_epochs must be an integer >= 1"),
    (dict(typo_flag=1), "unknown flag --typo_flag"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, overrides, message):
    save = tmp_path / "run"
    assert_usage_error(run_demo(tiny_args(save, **overrides)), message)
    assert not save.exists()


def test_missing_data_folder_offline(tmp_path):
    save = tmp_path / "run"
    result = run_demo(tiny_args(save, dataset="cifar10", data=tmp_path / "absent",
                                download=False))
    assert_usage_error(result, "cifar-10-batches-py", str(tmp_path / "absent"))
    assert not save.exists()


def test_corrupted_data_files(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")
    result = run_demo(tiny_args(tmp_path / "run", dataset="cifar10", data=tmp_path / "data",
                                download=False))
    assert_usage_error(result, "data_batch_1")
    assert not (tmp_path / "run").exists()


def test_truncated_data_file(tmp_path):
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip(f"{CIFAR_SUBSET} is absent")
    data = tmp_path / "data"
    shutil.copytree(CIFAR_SUBSET / "cifar-10-batches-py", data / "cifar-10-batches-py")
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    result = run_demo(tiny_args(tmp_path / "run", dataset="cifar10", data=data, download=False))
    assert_usage_error(result, "data_batch_3")
    assert not (tmp_path / "run").exists()


def test_save_that_is_a_file_or_below_one(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    assert_usage_error(run_demo(tiny_args(path)), "is a file, not a folder")
    assert_usage_error(run_demo(tiny_args(path / "run")), "is a file, not a folder")
    assert path.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_save_that_is_not_writable(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_usage_error(run_demo(tiny_args(folder / "run")), "not writable")
    finally:
        folder.chmod(0o700)


def test_save_that_holds_a_run_is_refused_untouched(fake_run):
    save, _ = fake_run
    before = snapshot(save)
    assert_usage_error(run_demo(tiny_args(save)), "already holds a run", "--resume True")
    assert snapshot(save) == before


def copy_of(fake_run, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(fake_run[0], save)
    return save


def test_resume_refuses_a_corrupted_checkpoint_and_leaves_it(fake_run, tmp_path):
    save = copy_of(fake_run, tmp_path)
    checkpoint = save / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = snapshot(save)
    result = run_demo([*tiny_args(save, drop_rate=0.1), "--resume", "True"])
    assert_usage_error(result, "checkpoint.pt", "left as it is")
    assert snapshot(save) == before


def test_resume_refuses_another_architecture_and_leaves_the_run(fake_run, tmp_path):
    save = copy_of(fake_run, tmp_path)
    before = snapshot(save)
    result = run_demo([*tiny_args(save, drop_rate=0.1, depth=16), "--resume", "True"])
    assert_usage_error(result, "depth 10 there, 16 now")
    assert snapshot(save) == before


def test_resume_drops_csv_rows_past_the_checkpoint_and_trains_on(fake_run, tmp_path):
    save = copy_of(fake_run, tmp_path)
    rows = read_rows(save)
    with open(save / "results.csv", "a") as file:
        file.write("3,9.9")  # a kill in the middle of appending epoch 3's row
    result = run_demo([*tiny_args(save, drop_rate=0.1, n_epochs=3, milestones=1),
                       "--resume", "True"])
    assert_ok(result)
    assert "resuming" in result.stdout
    resumed = read_rows(save)
    assert [row["epoch"] for row in resumed] == ["1", "2", "3"]
    assert resumed[:2] == rows and resumed[2]["train_loss"] != "9.9"
    assert load(save / "checkpoint.pt")["epoch"] == 3


def test_a_loss_that_becomes_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    save = tmp_path / "run"
    # Epoch 1 trains at lr 0.1; the milestone then multiplies it by 1e20.
    result = run_demo(tiny_args(save, n_epochs=3, milestones=1, gamma=1e20))
    assert_usage_error(result, "in epoch 2", "checkpoint.pt keeps epoch 1")
    assert load(save / "checkpoint.pt")["epoch"] == 1
    assert [row["epoch"] for row in read_rows(save)] == ["1"]
    assert not (save / "summary.json").exists()


# ---------------------------------------------------------------------------- unit tests

def test_default_milestones_are_half_and_three_quarters_of_the_epochs():
    assert demo.default_milestones(300) == [150, 225]
    assert demo.default_milestones(3) == [1, 2]
    assert demo.default_milestones(1) == []


def resolve(**overrides):
    args = {name: p.default for name, p in inspect.signature(demo.main).parameters.items()}
    args.update(save="/tmp/unused", data="/tmp/unused")
    args.update(overrides)
    return demo.resolve_args(args)


def test_resolve_args_fills_defaults_and_accepts_what_fire_passes():
    config = resolve()
    assert config["milestones"] == [150, 225] and config["compression"] == 0.5
    assert resolve(bc=False, depth=40)["compression"] == 1.0
    assert resolve(milestones=(10, 20))["milestones"] == [10, 20]  # "10,20" from fire
    assert resolve(milestones=[10])["milestones"] == [10]
    assert resolve(milestones=10)["milestones"] == [10]
    assert resolve(lr=1)["lr"] == 1.0 and isinstance(resolve(lr=1)["lr"], float)
    assert resolve(fake_size=(5, 6))["fake_size"] == [5, 6]
    assert resolve(save=7)["save"] == os.path.abspath("7")  # fire turns "7" into 7


@pytest.mark.parametrize("overrides", [
    dict(efficient="maybe"), dict(augment=2), dict(lr=float("inf")), dict(lr=0), dict(lr=True),
    dict(momentum=1.0), dict(wd=-1e-4), dict(gamma=0), dict(compression=1.5),
    dict(drop_rate=1.0), dict(valid_size=-1), dict(milestones=(0, 5)), dict(milestones=(3, 2)),
    dict(milestones="x"), dict(depth="abc"),
    dict(seed=2**32), dict(seed=1.5), dict(amp="fp32"), dict(fake_size=(5,)), dict(save=None),
    dict(data=None), dict(growth_rate=0), dict(depth=100.0), dict(svhn_extra=True),
    dict(resume=True, evaluate=True), dict(sync_bn=True),
    dict(recompute_bottleneck=True, efficient=False),
])
def test_resolve_args_refuses(overrides):
    with pytest.raises(demo.UsageError):
        resolve(**overrides)


def test_every_flag_is_documented():
    doc = inspect.getdoc(demo.main).split("Args:")[1]
    documented = {line.split(":")[0].strip() for line in doc.splitlines()
                  if line.startswith("    ") and not line.startswith("        ")}
    assert documented == set(inspect.signature(demo.main).parameters)


# ---------------------------------------------------------------------------- CPU memory

REFAULTS = """
import resource, sys, torch
from training.devices import Devices

def faults_of_new_tensors(count):
    faults = []
    for _ in range(count):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 * 2**20 // 4)  # 64 MiB, filled, then freed
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

default = min(faults_of_new_tensors(4))
Devices()  # on a CPU, as demo.py trains or evaluates
# The heap grows a few times (small allocations take parts of freed blocks), then settles.
print(default, min(faults_of_new_tensors(12)[6:]))
"""


def _glibc():
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


def _huge_pages_always():
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only")
@pytest.mark.skipif(_huge_pages_always(), reason="huge pages fault 2 MiB at a time")
def test_cpu_runs_keep_freed_memory_instead_of_faulting_it_in_again():
    env = {k: v for k, v in ENV.items() if k not in MALLOC_SETTINGS}
    result = subprocess.run([sys.executable, "-c", REFAULTS], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert_ok(result)
    default, after = map(int, result.stdout.split())
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert default > pages // 2  # by default, every new 64 MiB tensor is faulted in
    assert after < pages // 20, (default, after)
