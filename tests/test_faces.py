"""The faces a newcomer meets: flags checked before any work in demo.py, plot.py and
benchmark.py, runs that remember their settings, paths with ~, sizes that cannot fit, progress
where tqdm cannot draw, Ctrl-C during start-up (the real command lines, in subprocesses)."""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_demo import (
    ENV,
    ROOT,
    assert_ok,
    assert_usage_error,
    read_rows,
    resolve,
    run_demo,
    tiny_args,
)

import cli
import demo
from data.datasets import DataError, _download, load_dataset
from training.errors import UsageError
from training.lock import RunLock
from training.plan import check_fits


def tree_hashes(*folders):
    """Path -> sha256 of every file below the folders (dot files included)."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def face(name, *args, env=ENV, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result, *fragments, status=2):
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------- flags

def a_run_folder(folder):
    """A run folder with a results.csv, as plot.py reads it."""
    folder.mkdir(parents=True)
    (folder / "results.csv").write_text("epoch,train_loss,train_error\n1,2.0,0.9\n2,1.5,0.7\n")
    return folder


MISTYPED = {  # face -> (arguments in an output folder, the mistake's name, the suggestion)
    "demo.py": (lambda out: ["--dataset", "fake", "--save", out / "run", "--depht", "40"],
                "--depht", "--depth"),
    "plot.py": (lambda out: [a_run_folder(out / "run"), "--logeror", "True"], "--logeror",
                "--log_error"),
    "benchmark.py": (lambda out: ["--quik", "True"], "--quik", "--quick"),
}


@pytest.mark.parametrize("name", MISTYPED)
def test_a_mistyped_flag_is_refused_at_once_and_changes_nothing(tmp_path, name):
    arguments, mistake, suggestion = MISTYPED[name]
    args = arguments(tmp_path)
    before = tree_hashes(tmp_path, ROOT / "results")
    started = time.monotonic()
    result = face(name, *args)
    seconds = time.monotonic() - started
    assert_one_error_line(result, f"unknown flag {mistake}", f"did you mean {suggestion}?")
    assert seconds < 2, f"{name} took {seconds:.1f} s to refuse a mistyped flag"
    assert tree_hashes(tmp_path, ROOT / "results") == before


def test_words_that_are_not_flags_and_flags_without_values_are_refused(tmp_path):
    assert_one_error_line(face("demo.py", "--depth", "40", "50"), "unexpected argument '50'")
    assert_one_error_line(face("benchmark.py", "--out"), "--out needs a value")
    assert_one_error_line(face("demo.py", "--depth", "40", "--depth", "100"),
                          "--depth is given twice")


def check(argv, booleans=("efficient", "resume")):
    def main(data=None, depth=100, efficient=True, resume=False, lr=0.1):
        pass
    return cli.check_flags(main, argv, booleans)


def test_check_flags_spells_booleans_and_names_the_flags_given():
    assert check(["--efficient", "true", "--resume=YES", "--depth", "40"]) == (
        ["--efficient=True", "--resume=True", "--depth=40"], {"efficient", "resume", "depth"})
    assert check(["--efficient", "0", "--resume", "No"])[0] == ["--efficient=False",
                                                                 "--resume=False"]
    assert check(["--efficient", "--noresume", "--lr", "-1"]) == (
        ["--efficient=True", "--resume=False", "--lr=-1"], {"efficient", "resume", "lr"})
    # A word that is no boolean is left for the function to refuse (or to take: resume auto).
    assert check(["--resume", "auto"])[0] == ["--resume=auto"]
    assert check(["-depth", "4", "-l", "0.5"])[0] == ["--depth=4", "--lr=0.5"]  # as fire reads
    assert check(["--help", "--nonsense"]) == (["--help", "--nonsense"], set())  # fire's help
    assert check(["--depth", "4", "--", "--trace"])[0] == ["--depth=4", "--", "--trace"]
    assert [cli.parse_boolean(v) for v in (True, 0, "1", "Yes", "FALSE", "maybe", 2)] == \
        [True, False, True, True, False, None, None]


def test_demo_takes_the_usual_spellings_of_booleans_and_refuses_others(monkeypatch, tmp_path):
    resolved = resolve(efficient="no", augment=1, bc="TRUE")
    assert (resolved["efficient"], resolved["augment"], resolved["bc"]) == (False, True, True)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve(save="~/run")["save"] == str(tmp_path / "run")
    assert resolve(data="~")["data"] == str(tmp_path)
    with pytest.raises(demo.UsageError, match="no user's home folder"):
        resolve(save="~no_such_user_here/run")
    result = run_demo(["--save", "unused", "--dataset", "fake", "--efficient", "maybe"])
    assert_usage_error(result, "--efficient must be True or False", "yes/no", "'maybe'")


def test_benchmark_without_a_gpu_refuses_device_cuda_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    before = tree_hashes(ROOT / "results")
    result = face("benchmark.py", "--device", "cuda", env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert_one_error_line(result, "--device cuda: no CUDA GPU here")
    assert tree_hashes(ROOT / "results") == before


def test_help_says_where_benchmark_writes():
    shown = face("benchmark.py", "--help")
    assert shown.returncode == 0
    assert "Writes into results/" in shown.stdout + shown.stderr


# ---------------------------------------------------------------------------- Ctrl-C

def wait_until_importing_torch(process, timeout=60):
    """Until torch's C++ library is being loaded by process (its start-up imports)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the process ended before it imported torch"
        try:
            if "libtorch" in Path(f"/proc/{process.pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("torch was not imported")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("name, args", [
    ("demo.py", ["--dataset", "fake", "--save", "unused", "--depth", "99"]),
    ("benchmark.py", ["--profile", "no such profile"]),
])
def test_ctrl_c_during_start_up_ends_quietly(name, args):
    # Both commands would end with exit status 2 right after their imports.
    process = subprocess.Popen([sys.executable, str(ROOT / name), *args], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_importing_torch(process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, stderr


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return found


def command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_ctrl_c_while_benchmark_works_in_other_processes_prints_no_traceback(tmp_path):
    # As a terminal's Ctrl-C does: SIGINT to every process of the group.
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmark.py"), "--check_model",
                                "True", "--out", tmp_path], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        workers = []
        while not workers:
            assert process.poll() is None and time.monotonic() < deadline, "no worker started"
            workers = [child for child in children(process.pid)
                       if "spawn_main" in command_line(child)]
            time.sleep(0.02)
        time.sleep(0.5)  # the worker imports torch and starts measuring
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, stderr
    time.sleep(0.5)
    assert not any(Path(f"/proc/{worker}").exists() and "spawn_main" in command_line(worker)
                   for worker in workers)


# ---------------------------------------------------------------------------- resume

def in_home(tmp_path):
    """(environment whose HOME is a new folder, that folder, a working folder beside it)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return {**ENV, "HOME": str(home)}, home, work


def test_resume_true_alone_continues_extends_and_leaves_a_finished_run_untouched(tmp_path):
    env, home, work = in_home(tmp_path)
    save = home / "run"
    args = tiny_args("~/run", n_epochs=2, fake_size="416,48", log_every=0)
    at = args.index("--save")
    args[at:at + 2] = ["--save=~/run"]  # bash leaves a ~ after "=" as it is
    output = tmp_path / "first.txt"
    with open(output, "w") as file:  # a run started with --save=~/run, stopped early
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "demo.py"), *args, "--efficient", "yes", "--augment",
             "TRUE"], cwd=work, env=env, stdout=file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while " step " not in output.read_text():
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143, output.read_text()
    finally:
        process.kill()
        process.wait()
    assert not (work / "~").exists() and save.is_dir()
    started = json.loads((save / "config.json").read_text())
    assert started["milestones"] == [1] and started["depth"] == 10
    assert "schedule 2 epochs, SGD lr 0.1 (x0.1 after epoch 1)" in output.read_text()

    resumed = face("demo.py", "--save=~/run", "--resume", "True", env=env, cwd=work)
    assert_ok(resumed)
    assert "(resuming after epoch 0, at step" in resumed.stdout
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]
    config = json.loads((save / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("resume", "environment")} == \
        {k: v for k, v in started.items() if k not in ("resume", "environment")}

    extended = face("demo.py", "--save", "~/run", "--resume", "true", "--n_epochs", "3",
                    env=env, cwd=work)
    assert_ok(extended)
    rows = read_rows(save)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert float(rows[2]["lr"]) == pytest.approx(0.01)  # the stored milestone [1], not [1, 2]
    assert json.loads((save / "config.json").read_text())["milestones"] == [1]
    assert (save / ".lock").read_bytes() == b""  # released: no old PID left

    before = tree_hashes(save)
    finished = face("demo.py", "--save=~/run", "--resume", "True", env=env, cwd=work)
    assert_ok(finished)
    assert "already trained its 3 epochs; nothing was changed" in finished.stdout
    assert tree_hashes(save) == before

    other = face("demo.py", "--save=~/run", "--resume", "True", "--depth", "16", env=env,
                 cwd=work)
    assert_usage_error(other, "depth 10 there, 16 now")
    assert tree_hashes(save) == before
    assert not (work / "~").exists()


def test_resume_true_without_a_run_says_so(tmp_path):
    with pytest.raises(UsageError, match="nothing to resume in .*: it holds no run"):
        resolve(save=str(tmp_path / "nothing"), resume="true")
    assert not (tmp_path / "nothing").exists()


# ---------------------------------------------------------------------------- paths

def test_a_data_path_with_tilde_is_the_home_folder_never_a_folder_named_tilde(tmp_path):
    env, home, work = in_home(tmp_path)
    result = face("demo.py", "--dataset", "cifar10", "--data=~/cifar", "--download", "False",
                  "--save=~/run", env=env, cwd=work)
    assert_usage_error(result, f"not found in {home / 'cifar'}")
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []


def write_cifar_files(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not read")


def test_data_that_names_the_inner_folder_says_to_give_its_parent(tmp_path):
    inner = tmp_path / "cifar-10-batches-py"
    write_cifar_files(inner, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    with pytest.raises(DataError, match=f"give its parent, --data {re.escape(str(tmp_path))}$"):
        load_dataset("cifar10", inner)  # download allowed: still nothing is fetched
    renamed = tmp_path / "cifar"
    inner.rename(renamed)
    with pytest.raises(DataError, match="in a folder named cifar-10-batches-py/ inside --data"):
        load_dataset("cifar10", renamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar"]


def test_an_incomplete_data_folder_names_the_missing_files(tmp_path):
    write_cifar_files(tmp_path / "cifar-10-batches-py", ["data_batch_1"])
    with pytest.raises(DataError, match=r"incomplete: data_batch_2, data_batch_3, data_batch_4, "
                                        r"data_batch_5, test_batch missing \(found data_batch_1\)"
                                        r"; put the missing files there"):
        load_dataset("cifar10", tmp_path)


def test_a_failed_download_leaves_no_folder_it_created(tmp_path):
    def fetch(folder):
        folder.mkdir(parents=True)
        (folder / "cifar-10-python.tar.gz").write_bytes(b"part of an archive")
        raise OSError("network unreachable")

    new = tmp_path / "a" / "datasets"
    with pytest.raises(DataError, match="could not be downloaded"):
        _download(lambda: fetch(new), "CIFAR-10", "files", new, "url")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(DataError):
        _download(lambda: fetch(existing / "inner"), "CIFAR-10", "files", existing, "url")
    assert existing.is_dir()


# ---------------------------------------------------------------------------- sizes

def test_a_network_that_cannot_fit_is_refused_before_anything_is_built(tmp_path):
    # Start-up here (Python, torch) before the refusal: measured with a flag refused after the
    # same imports, so that a busy machine does not fail the test.
    started = time.monotonic()
    assert_usage_error(run_demo(["--save", tmp_path / "bad", "--dataset", "fake", "--depth",
                                 "abc"]), "--depth must be")
    start_up = time.monotonic() - started
    started = time.monotonic()
    result = run_demo(["--save", tmp_path / "run", "--dataset", "fake", "--depth", "100000"])
    seconds = time.monotonic() - started
    assert_usage_error(result, "DenseNet-BC (L=100000, k=12) cannot train on",
                       "parameters alone take 1.9 TiB", "for one training step at batch",
                       "--plan True")
    assert seconds < max(3.0, start_up + 1.0), (seconds, start_up)
    assert not (tmp_path / "run").exists()
    assert_usage_error(run_demo(["--plan", "True", "--depth", "10000000"]),
                       "at most 1,000,000")


def test_what_fits_is_not_refused():
    check_fits(resolve(dataset="fake"))  # the paper's BC-100 at batch 64: under 1 GiB
    with pytest.raises(UsageError, match=r"L=40, k=12\) cannot train on .* at batch 10,000,000"):
        check_fits(resolve(dataset="fake", depth=40, batch_size=10**7))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_fit_is_checked_against_its_total_memory():
    check_fits(resolve(dataset="fake", depth=250, growth_rate=24))
    with pytest.raises(UsageError, match=r"cannot train on GPU 0 \(.+\): its parameters alone "
                                         r"take 1\.9 TiB .* more than its .* GiB of memory"):
        check_fits(resolve(dataset="fake", depth=100000))


# ---------------------------------------------------------------------------- progress

@pytest.mark.skipif(not (shutil.which("script") and shutil.which("stty")),
                    reason="needs util-linux's script and stty")
def test_progress_lines_in_a_terminal_of_size_0x0(tmp_path):
    """Where tqdm cannot draw (a pseudo-terminal of width 0), timed lines are printed."""
    args = tiny_args(tmp_path / "run", n_epochs=1, milestones=5, log_every=0)
    command = f"stty cols 0 rows 0; exec {shlex.quote(sys.executable)} " \
        f"{shlex.quote(str(ROOT / 'demo.py'))} {shlex.join(args)}"
    result = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=ROOT, env=ENV,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.replace("\r", "").splitlines()
    assert len([line for line in lines if re.match(r"epoch 1/1 step \d/5 \|", line)]) >= 4
    assert "schedule 1 epoch, SGD lr 0.1 (x0.1 after epoch 5), seed 7" in lines
    assert "warning  milestone 5 not before the last epoch (1): no drop there within this " \
           "run" in lines
    estimate = [line for line in lines if line.startswith("estimate ")]
    assert len(estimate) == 1 and re.fullmatch(
        r"estimate \d+:\d\d:\d\d per epoch, \d+:\d\d:\d\d to the end of the run \(training "
        r"steps, timed over steps 2-4\)", estimate[0]), estimate


# ---------------------------------------------------------------------------- small things

def test_a_released_lock_is_left_empty(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    assert f"PID {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()
    assert (tmp_path / ".lock").read_bytes() == b""
    RunLock(str(tmp_path)).acquire().release()


def requirement_names(path):
    names = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower())
    return names


def test_the_cpu_requirements_list_the_same_packages():
    assert requirement_names(ROOT / "requirements-cpu.txt") == \
        requirement_names(ROOT / "requirements.txt")
    text = (ROOT / "requirements-cpu.txt").read_text()
    assert "torch==2.13.0+cpu" in text and "torchvision==0.28.0+cpu" in text
    assert "torch===2.13.0" in (ROOT / "requirements.txt").read_text()


def test_readme_states_the_size_of_this_install():
    """README's size of the default (CUDA) install against this virtual environment's."""
    if sys.prefix == sys.base_prefix or torch.version.cuda is None:
        pytest.skip("not a virtual environment with the CUDA build of torch")
    claimed = re.search(r"takes ([\d.]+) GB\s+on disk", (ROOT / "README.md").read_text())
    assert claimed, "README does not state the install's size"
    size = sum(entry.stat(follow_symlinks=False).st_size
               for folder, _, files in os.walk(sys.prefix)
               for entry in map(Path(folder).joinpath, files))
    assert abs(size / 1e9 - float(claimed.group(1))) < 0.15 * float(claimed.group(1)), size
