"""Runs under job schedulers: one writer per run folder, stop signals, logs without a terminal."""

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_demo import (
    ENV,
    ROOT,
    assert_ok,
    assert_same_weights,
    assert_usage_error,
    load,
    read_rows,
    run_demo,
    tiny_args,
)

from data import load_dataset
from training.build import check_split
from training.errors import UsageError
from training.lock import RunLock

# Runs every write of checkpoint.pt through a window of 0.3 s, announced by <save>/.writing, so
# that a test can signal the process while checkpoint.pt.tmp is being written.
SLOW_WRITES = """
import os, runpy, sys, time
import training.files as files

write = files.write_atomically

def slow_write(path, content):
    if not path.endswith("checkpoint.pt"):
        return write(path, content)
    marker = os.path.join(os.path.dirname(path), ".writing")
    def slowly(file):
        content(file)
        open(marker, "w").close()
        time.sleep(0.3)
    try:
        write(path, slowly)
    finally:
        if os.path.exists(marker):
            os.remove(marker)

files.write_atomically = slow_write
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start(args, output, slow_writes=False, env=ENV):
    """demo.py in the background, stdout and stderr into the file `output`."""
    prefix = ["-c", SLOW_WRITES] if slow_writes else []
    with open(output, "w") as file:
        return subprocess.Popen([sys.executable, *prefix, str(ROOT / "demo.py"), *map(str, args)],
                                cwd=ROOT, env=env, stdout=file, stderr=subprocess.STDOUT)


def wait_for(condition, process, timeout=60, what="the condition", output=None):
    """Wait until condition() holds while process runs; a failure shows ``output``'s text."""
    def shown():
        return "" if output is None else ":\n" + Path(output).read_text()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}{shown()}")
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout} s{shown()}")


# ---------------------------------------------------------------------------- one writer

def start_up_seconds(tmp_path):
    """How long two demo.py processes started together take to refuse a bad flag here: the
    start-up of Python and torch, which comes before anything this project does."""
    started = time.monotonic()
    processes = [start(["--depth", "abc", "--save", "unused"], tmp_path / f"bad{i}.txt")
                 for i in range(2)]
    assert [process.wait() for process in processes] == [2, 2]
    return time.monotonic() - started


def test_two_processes_on_one_save_only_one_trains(tmp_path):
    # "At once": within 5 s, or on a machine so busy that start-up alone takes longer, within
    # 2 s after it (the refusal comes before any data is read).
    limit = max(5.0, start_up_seconds(tmp_path) + 2.0)
    save = tmp_path / "run"
    args = tiny_args(save, n_epochs=3, fake_size="1024,48", valid_size=64)
    started = time.monotonic()
    first = start(args, tmp_path / "first.txt")
    second = start(args, tmp_path / "second.txt")
    ended = {}
    while len(ended) < 2:
        for name, process in (("first", first), ("second", second)):
            if name not in ended and process.poll() is not None:
                ended[name] = (process.returncode, time.monotonic() - started)
        time.sleep(0.01)
    codes = sorted(code for code, _ in ended.values())
    assert codes == [0, 2], ended
    loser = next(name for name, (code, _) in ended.items() if code == 2)
    assert ended[loser][1] < limit, f"the refused process took {ended[loser][1]:.1f} s"
    message = (tmp_path / f"{loser}.txt").read_text().strip().splitlines()
    assert len(message) == 1 and message[0].startswith("error: ")
    assert re.search(r"in use by PID \d+ on host \S+", message[0]), message[0]
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2", "3"]


def file_names(folder):
    """The files of a run folder that a running process writes to: names only, each atomic
    write's temporary file counted as the file it becomes."""
    return {p.name.removesuffix(".tmp") for p in Path(folder).iterdir() if p.name != ".lock"}


def test_a_running_run_refuses_a_resume_and_leaves_its_files(tmp_path):
    save = tmp_path / "run"
    args = tiny_args(save, n_epochs=40, fake_size="512,48", valid_size=64)
    process = start(args, tmp_path / "out.txt")
    try:
        # Epoch 1 writes checkpoint.pt, then model_best.pt: after that, both exist.
        wait_for(lambda: (save / "model_best.pt").exists(), process, what="epoch 1's files")
        before = file_names(save)
        result = run_demo([*args, "--resume", "True"])
        assert_usage_error(result, "in use by PID", str(process.pid))
        assert process.poll() is None
        # Only the running process wrote meanwhile: the rows it added are its own.
        after = read_rows(save)
        assert [row["epoch"] for row in after] == [str(i + 1) for i in range(len(after))]
        assert file_names(save) == before
    finally:
        process.kill()
        process.wait()


def test_lock_is_released_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from training.lock import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"in use by PID {holder.pid} on host"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path)).acquire()  # nothing stale is left
    lock.release()


def test_a_new_run_that_cannot_start_leaves_no_folder(tmp_path):
    save = tmp_path / "run"
    result = run_demo(tiny_args(save, valid_size=100))  # 52% of the 192 training images
    assert_usage_error(result, "--valid_size 100", "52%", "--valid_size 38")
    assert not save.exists()


def test_validation_split_above_a_fifth_is_refused_with_a_suggestion():
    dataset = load_dataset("fake", None, fake_size=(5085, 10))
    check_split({"valid_size": 1017}, dataset, world_size=1)  # 20%: allowed
    with pytest.raises(UsageError, match=r"5000 would hold out 98% .* --valid_size 1000"):
        check_split({"valid_size": 5000}, dataset, world_size=1)


# ---------------------------------------------------------------------------- stop signals

def global_step(checkpoint, steps_per_epoch):
    position = checkpoint.get("position")
    return checkpoint["epoch"] * steps_per_epoch + (position["step"] if position else 0)


def progress_steps(text, steps_per_epoch):
    """Steps finished according to the progress lines printed so far (log_every 0)."""
    found = re.findall(r"^epoch (\d+)/\d+ step (\d+)/\d+ \|", text, re.MULTILINE)
    return max(((int(e) - 1) * steps_per_epoch + int(s) for e, s in found), default=0)


def test_stop_signals_at_random_moments_then_resume_end_bitwise_identical(tmp_path):
    # 12 steps per epoch (416 - 32 validation images, batch 32), 6 epochs.
    args = dict(n_epochs=6, fake_size="416,48", drop_rate=0.2, milestones="2,4", seed=5,
                log_every=0)
    steps_per_epoch = 12
    reference = tmp_path / "reference"
    assert_ok(run_demo(tiny_args(reference, **args)))

    rng = random.Random(20261125)
    save = tmp_path / "stopped"
    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGTERM, signal.SIGTERM,
               signal.SIGTERM]
    moments = ["during set-up", "while training", "while training", "while writing a checkpoint",
               "while training", "while training"]
    for attempt, (number, moment) in enumerate(zip(signals, moments, strict=True)):
        output = tmp_path / f"attempt{attempt}.txt"
        resume = ["--resume", "True"] if attempt else []
        done = global_step(load(save / "checkpoint.pt"), steps_per_epoch) if attempt else 0
        process = start([*tiny_args(save, **args), *resume], output,
                        slow_writes=moment == "while writing a checkpoint")
        try:
            if moment == "during set-up":
                wait_for(lambda: (save / ".lock").exists(), process, what="the lock")
            elif moment == "while training":
                wait_for(lambda output=output, done=done:
                         progress_steps(output.read_text(), steps_per_epoch) > done,
                         process, what="a step")
                time.sleep(rng.uniform(0.0, 0.1))
            else:
                wait_for(lambda: (save / ".writing").exists(), process, what="a write")
            before = progress_steps(output.read_text(), steps_per_epoch)
            process.send_signal(number)
            if moment == "while writing a checkpoint":
                process.send_signal(signal.SIGTERM)  # a second signal while saving
            assert process.wait(timeout=60) == 128 + number, output.read_text()
        finally:
            process.kill()
            process.wait()
        text = output.read_text()
        assert f"stopped by {signal.Signals(number).name}" in text, text
        assert "continue with --resume True" in text
        checkpoint = load(save / "checkpoint.pt")
        saved = global_step(checkpoint, steps_per_epoch)
        # No finished step is lost, and the run stopped within a step of the signal (one more
        # step may have been printed between reading the output and the signal's arrival).
        assert before <= saved <= before + 2, (moment, before, saved)
        assert saved < args["n_epochs"] * steps_per_epoch, "the run ended before the signal"
    assert_ok(run_demo([*tiny_args(save, **args), "--resume", "True"]))

    _, actual = assert_same_weights(save, reference)
    assert actual["position"] is None
    assert (save / "summary.json").read_text() == (reference / "summary.json").read_text()
    log = (save / "log.txt").read_text()
    assert log.count("stopped by") == len(signals) and log.count("resuming after") == \
        len(signals)


# ---------------------------------------------------------------------------- logs

def test_without_a_terminal_start_up_block_at_once_and_timed_progress_lines(tmp_path):
    save = tmp_path / "run"
    output = tmp_path / "out.txt"
    started = time.monotonic()
    process = start(tiny_args(save, n_epochs=3, fake_size="1024,32", valid_size=64,
                              log_every=0.5), output)
    seen = {}  # progress line -> seconds after start when it appeared in the file
    block_seen = None
    while process.poll() is None:
        text = output.read_text()
        now = time.monotonic() - started
        if block_seen is None and "schedule " in text:
            block_seen = now
        for line in text.splitlines():
            if " step " in line and line not in seen:
                seen[line] = now
        time.sleep(0.02)
    assert process.returncode == 0, output.read_text()
    assert block_seen is not None and block_seen < 10, block_seen
    lines = output.read_text().splitlines()
    assert [line.split()[0] for line in lines[:6]] == ["run", "device", "torch", "model", "data",
                                                       "schedule"]
    progress = [line for line in lines if " step " in line]
    assert progress, lines
    for line in progress:
        assert re.fullmatch(r"epoch \d/3 step \d+/30 \| \d+ images/s \| loss \d\.\d{4} error "
                            r"\d\.\d{4} \| left: epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d",
                            line), line
    # Within an epoch, no gap between lines is much longer than log_every (0.5 s).
    times_by_epoch = {}
    for line, seconds in seen.items():
        times_by_epoch.setdefault(line.split()[1], []).append(seconds)
    for times in times_by_epoch.values():
        times.sort()
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert max(gaps, default=0) < 0.5 + 1.0, gaps
    assert progress == [line for line in (save / "log.txt").read_text().splitlines()
                        if " step " in line]
