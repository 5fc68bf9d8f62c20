"""Runs that restart themselves: --resume auto, recovery checkpoints, torchrun's elastic restarts
(one node and two), per-process random states under DistributedDataParallel.

Every torchrun here uses the launch README recommends (torchrun_command): c10d rendezvous at an
explicit 127.0.0.1 endpoint, and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, without which restarted
workers read the previous attempt's addresses from torchrun's shared store and fail or hang in
init_process_group (results/torchrun-restarts.md).
"""

import io
import json
import os
import random
import re
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
    assert_same_weights,
    free_port,
    load,
    read_rows,
    run_demo,
    tiny_args,
)
from test_run_control import progress_steps, start, wait_for

from training.checkpoint import copy_state, cuda_states_to_restore, rank_record
from training.devices import rank_seed
from training.errors import UsageError

TORCHRUN_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# 2 processes x 19 steps of 16 images per epoch (640 - 32 validation images), dropout on.
DDP_ARGS = dict(n_epochs=2, fake_size="640,48", drop_rate=0.2, milestones="1", seed=3,
                log_every=0, checkpoint_every=0.003)
DDP_STEPS = 19


def torchrun_command(args, nproc=2, nnodes=1, node_rank=0, port=None, max_restarts=0):
    """demo.py under torchrun, launched as README says (c10d at 127.0.0.1, see module docstring)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port or free_port()}", f"--max_restarts={max_restarts}",
            str(ROOT / "demo.py"), *map(str, args)]


def torchrun(args, output, **launch):
    """Start torchrun in the background, its output into the file `output`."""
    with open(output, "w") as file:
        return subprocess.Popen(torchrun_command(args, **launch), cwd=ROOT, env=TORCHRUN_ENV,
                                stdout=file, stderr=subprocess.STDOUT)


def end(launcher):
    """End torchrun and its workers (each in its own session, which a SIGKILL of torchrun would
    orphan): SIGTERM lets torchrun stop them; SIGKILL after a minute."""
    if launcher.poll() is None:
        launcher.terminate()
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
    launcher.wait()


def workers(launcher):
    """{pid: global rank} of the worker processes torchrun (process `launcher`) runs now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher.pid:
                continue
            environ = dict(item.split(b"=", 1) for item in
                           (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if b"RANK" in environ:
            found[int(entry.name)] = int(environ[b"RANK"])
    return found


def kill_worker(launcher, rank=None, rng=None):
    """SIGKILL one worker (of global rank `rank`, else a random one); returns its rank."""
    running = workers(launcher)
    choices = sorted(pid for pid, r in running.items() if rank is None or r == rank)
    assert choices, f"no worker {'' if rank is None else rank} of torchrun runs: {running}"
    pid = (rng or random).choice(choices)
    os.kill(pid, signal.SIGKILL)
    return running[pid]


def steps_done(save, steps_per_epoch):
    """Training steps the checkpoint in save holds (0 if none yet; an atomic write is never
    seen half-written)."""
    try:
        checkpoint = load(save / "checkpoint.pt")
    except (OSError, RuntimeError, EOFError):
        return 0
    position = checkpoint.get("position")
    return checkpoint["epoch"] * steps_per_epoch + (position["step"] if position else 0)


def in_epoch(save, epoch, steps_per_epoch):
    """Whether save holds a recovery (or stop) checkpoint inside `epoch`."""
    done = steps_done(save, steps_per_epoch)
    return (epoch - 1) * steps_per_epoch < done < epoch * steps_per_epoch


def assert_same_run(save, reference):
    """save's run ended bitwise equal to reference's: weights, momentum, rows, summary."""
    _, actual = assert_same_weights(save, reference)
    assert actual["position"] is None
    assert json.loads((save / "summary.json").read_text()) == \
        json.loads((reference / "summary.json").read_text())


def assert_no_traceback(text):
    assert "Traceback" not in text, text[-4000:]


# ---------------------------------------------------------------------------- one process

def test_resume_auto_starts_continues_after_a_sigkill_and_ends_bitwise_identical(tmp_path):
    # 31 steps per epoch; a recovery checkpoint every 0.15 s of training.
    args = dict(n_epochs=2, fake_size="1024,48", drop_rate=0.2, milestones="1", seed=2,
                log_every=0, checkpoint_every=0.0025, resume="auto")
    steps = 31
    reference = tmp_path / "reference"
    assert_ok(run_demo(tiny_args(reference, **args)))

    save = tmp_path / "run"
    command = tiny_args(save, **args)  # the same command line for every start
    process = start(command, tmp_path / "first.txt")
    try:
        wait_for(lambda: in_epoch(save, 2, steps), process, timeout=120,
                 what="a recovery checkpoint in epoch 2", output=tmp_path / "first.txt")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = steps_done(save, steps)
    assert steps < killed_at < 2 * steps
    first = (tmp_path / "first.txt").read_text()
    assert "(new run)" in first and "writing a recovery checkpoint" in first
    best = load(save / "model_best.pt")
    assert best["epoch"] == 1

    process = start(command, tmp_path / "second.txt")
    try:
        # The continued run trains on; model_best.pt is still epoch 1's model (a resume inside
        # the epoch after the best one once overwrote it with the checkpoint's weights).
        wait_for(lambda: re.search(r"^epoch 2/2 step", (tmp_path / "second.txt").read_text(),
                                   re.MULTILINE), process, timeout=120, what="a step",
                 output=tmp_path / "second.txt")
        now = load(save / "model_best.pt")
        if now["epoch"] == 1:
            for key, tensor in best["model"].items():
                assert torch.equal(tensor, now["model"][key]), key
        assert process.wait(timeout=300) == 0, (tmp_path / "second.txt").read_text()
    finally:
        process.kill()
        process.wait()
    second = (tmp_path / "second.txt").read_text()
    position = killed_at - steps
    assert f"resuming after epoch 1, at step {position} of epoch 2" in second
    assert_same_run(save, reference)
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]
    # --resume auto refuses what --resume True refuses: here, other settings.
    result = run_demo(tiny_args(save, **{**args, "growth_rate": 6}))
    assert result.returncode == 2 and "with other settings: growth_rate 4 there, 6 now" in \
        result.stderr, result.stderr


def test_resume_takes_true_false_or_auto():
    from test_demo import resolve
    assert resolve(resume="auto")["resume"] == "auto"
    assert resolve(resume="no")["resume"] is False  # True needs a run: test_faces.py
    for value in ("maybe", 2, None):  # 1 and "yes" are spellings of True
        with pytest.raises(UsageError, match="--resume must be True, False or auto"):
            resolve(resume=value)
    with pytest.raises(UsageError, match="--resume auto and --evaluate True"):
        resolve(resume="auto", evaluate=True)


# ---------------------------------------------------------------------------- random states

def test_each_rank_seeds_its_own_generator_and_rank_0_keeps_the_seed():
    torch.manual_seed(rank_seed(5, 0))
    rank0 = torch.rand(1000) < 0.5
    torch.manual_seed(5)
    assert torch.equal(rank0, torch.rand(1000) < 0.5)
    for seed in (0, 5, 2**32 - 1):
        masks = []
        for rank in range(8):
            torch.manual_seed(rank_seed(seed, rank))
            masks.append(tuple((torch.rand(1000) < 0.5).tolist()))
        assert len(set(masks)) == 8, seed


def test_fewer_gpus_on_resume_restore_what_fits_and_say_so():
    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    pairs, note = cuda_states_to_restore(states, visible=1)
    assert [index for index, _ in pairs] == [0] and "2 GPUs and 1 are visible" in note
    pairs, note = cuda_states_to_restore(states, visible=4)
    assert [index for index, _ in pairs] == [0, 1] and "restored 2" in note
    assert cuda_states_to_restore(states, visible=2)[1] is None
    assert cuda_states_to_restore([], visible=2) == ([], None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_checkpoint_of_more_gpus_than_visible_restores_those_that_fit():
    from training.checkpoint import restore
    from training.devices import Devices
    devices = Devices()
    model = torch.nn.Linear(2, 2).to(devices.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    generator = torch.Generator()
    visible = torch.cuda.device_count()
    states = []
    for seed in range(visible + 1):  # one GPU more than there is
        torch.cuda.manual_seed_all(seed)
        states.append(torch.cuda.get_rng_state(0))
    torch.cuda.manual_seed_all(99)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                  "rng": {"torch": torch.get_rng_state(), "cuda": states,
                          "data": generator.get_state()}, "position": None}
    sums, notes = restore(checkpoint, model, optimizer, scheduler, scaler, generator, devices)
    assert sums == {} and len(notes) == 1
    assert f"{visible + 1} GPUs and {visible} are visible: restored {visible}" in notes[0]
    for index in range(visible):
        assert torch.equal(torch.cuda.get_rng_state(index), states[index])


def test_another_number_of_processes_keeps_the_epochs_sums():
    ranks = [{"torch": torch.tensor([r], dtype=torch.uint8), "cuda": []} for r in range(2)]
    position = {"step": 3, "loss_sum": torch.tensor(1.0), "wrong": torch.tensor(4), "count": 8,
                "ranks": [{"loss_sum": torch.tensor(1.0 + r), "wrong": torch.tensor(4 + r),
                           "count": 8} for r in range(2)]}
    checkpoint = {"rng": {"torch": ranks[0]["torch"], "cuda": [], "ranks": ranks},
                  "position": position}
    record, note = rank_record(checkpoint, 1, 2)
    assert note is None and record["torch"].item() == 1 and record["wrong"].item() == 5
    record, note = rank_record(checkpoint, 0, 1)  # resumed by one process
    assert "2 processes and 1 resume it" in note
    assert record["loss_sum"].item() == 3.0 and record["count"] == 16
    record, _ = rank_record(checkpoint, 2, 3)
    assert "torch" not in record and record["count"] == 0


# ---------------------------------------------------------------------------- torchrun

@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """An uninterrupted 2-process torchrun run with dropout, shared by the tests below."""
    folder = tmp_path_factory.mktemp("ddp")
    save = folder / "reference"
    process = torchrun(tiny_args(save, **DDP_ARGS), folder / "reference.txt")
    assert process.wait(timeout=300) == 0, (folder / "reference.txt").read_text()
    return save


def test_torchrun_restarts_after_a_stop_and_a_sigkill_and_ends_bitwise_identical(ddp_reference,
                                                                                  tmp_path):
    # Each process draws its own dropout masks, and the checkpoint keeps every one's generator.
    states = load(ddp_reference / "checkpoint.pt")["rng"]["ranks"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])

    save = tmp_path / "run"
    output = tmp_path / "out.txt"
    process = torchrun(tiny_args(save, resume="auto", **DDP_ARGS), output, max_restarts=2)
    try:
        # A stop signal to rank 1 in epoch 1: both stop, rank 0 writes the stop checkpoint with
        # both processes' states, and torchrun starts them again.
        wait_for(lambda: re.search(r"^epoch 1/2 step 5/", output.read_text(), re.MULTILINE),
                 process, timeout=240, what="step 5", output=output)
        first = workers(process)
        os.kill(next(pid for pid, rank in first.items() if rank == 1), signal.SIGTERM)
        wait_for(lambda: "resuming after epoch 0, at step" in output.read_text(), process,
                 timeout=240, what="the first restart", output=output)
        # A SIGKILL of rank 0, which holds the run folder's lock, after a recovery checkpoint in
        # epoch 2: its successor must get the lock at once.
        wait_for(lambda: in_epoch(save, 2, DDP_STEPS), process, timeout=240,
                 what="a recovery checkpoint in epoch 2", output=output)
        assert kill_worker(process, rank=0) == 0
        assert process.wait(timeout=300) == 0, output.read_text()[-5000:]
    finally:
        end(process)
    text = output.read_text()
    assert_no_traceback(text)
    assert "stopped by a signal to another process in epoch 1" in text, text[-3000:]
    # The surviving rank said in one line what happened.
    assert re.search(r"^error: rank 1 lost contact with another process of the run \(",
                     text, re.MULTILINE), text[-3000:]
    assert "resuming after epoch 1, at step" in text
    assert_same_run(save, ddp_reference)


def test_two_nodes_train_one_run_and_restart_after_a_worker_dies(ddp_reference, tmp_path):
    save = tmp_path / "run"
    args = tiny_args(save, resume="auto", **DDP_ARGS)
    port = free_port()
    nodes = [torchrun(args, tmp_path / f"node{n}.txt", nproc=1, nnodes=2, node_rank=n,
                      port=port, max_restarts=2) for n in range(2)]
    try:
        wait_for(lambda: in_epoch(save, 2, DDP_STEPS), nodes[0], timeout=240,
                 what="a recovery checkpoint in epoch 2", output=tmp_path / "node0.txt")
        kill_worker(nodes[1])
        for n, node in enumerate(nodes):
            assert node.wait(timeout=300) == 0, (tmp_path / f"node{n}.txt").read_text()[-5000:]
    finally:
        for node in nodes:
            end(node)
    texts = [(tmp_path / f"node{n}.txt").read_text() for n in range(2)]
    for text in texts:
        assert_no_traceback(text)
    both = "".join(texts)
    assert both.count("(new run)") == 1 and "resuming after epoch 1, at step" in both
    assert "2 processes (torchrun" in both
    assert_same_run(save, ddp_reference)


def test_a_missing_process_ends_the_set_up_with_one_line_instead_of_waiting(tmp_path):
    # Rank 0 of 2 alone: nobody joins; it must not wait the default 30 minutes.
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DENSENET_INIT_TIMEOUT": "0.05"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "demo.py"),
                             *tiny_args(tmp_path / "run")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 lost contact"), result.stderr


def saved_bytes(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_a_background_checkpoint_copies_every_state_and_training_cannot_change_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4])

    def train_step():
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()

    train_step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    copied = copy_state(state)
    expected = saved_bytes(state)
    assert saved_bytes(copied) == expected
    train_step()  # in place: parameters, statistics, momentum, the scheduler's counters
    assert saved_bytes(copied) == expected


# ---------------------------------------------------------------------------- 10 random kills

@pytest.mark.restarts
@pytest.mark.parametrize("repetition", range(10))
def test_torchrun_restarts_after_a_sigkill_at_a_random_moment(ddp_reference, tmp_path,
                                                              repetition):
    """pytest -m restarts: a random worker killed with SIGKILL at a random moment: repetition 0
    while the workers start, 1 once rank 0 has set up (data, model), 9 after the last step
    (evaluation, checkpoints, summary, the end), the others at a random training step; each
    after a random fraction of a second more. The job must end as the uninterrupted one did.
    With DENSENET_RESTARTS_REPORT=path each repetition appends a JSON line to path."""
    rng = random.Random(1000 + repetition)
    total = DDP_ARGS["n_epochs"] * DDP_STEPS
    save = tmp_path / "run"
    output = tmp_path / "out.txt"
    if repetition == 0:
        moment, reached = "start-up", lambda: True
    elif repetition == 1:
        moment, reached = "set-up", lambda: "(new run)" in output.read_text()
    elif repetition == 9:
        moment = "after the last step"
        reached = lambda: progress_steps(output.read_text(), DDP_STEPS) >= total  # noqa: E731
    else:
        target = rng.randint(1, total - 1)
        moment = f"after step {target} of {total}"
        reached = lambda: progress_steps(output.read_text(), DDP_STEPS) >= target  # noqa: E731
    started = time.monotonic()
    process = torchrun(tiny_args(save, resume="auto", **DDP_ARGS), output, max_restarts=2)
    try:
        wait_for(lambda: workers(process) and reached(), process, timeout=300, what=moment,
                 output=output)
        time.sleep(rng.uniform(0.0, 0.5))
        held = steps_done(save, DDP_STEPS)
        lines = output.read_text().splitlines()
        killed = kill_worker(process, rng=rng)
        killed_after = time.monotonic() - started
        status = process.wait(timeout=600)
    finally:
        end(process)
    text = output.read_text()
    record = {"repetition": repetition, "moment": moment, "killed_after_s": round(killed_after, 1),
              "rank": killed, "checkpoint_steps_then": held,
              "last_line_then": lines[-1][:80] if lines else "", "exit": status,
              "seconds": round(time.monotonic() - started, 1),
              "restarts": text.count("(resuming after") + text.count("(new run)") - 1}
    try:
        assert status == 0, text[-5000:]
        assert_no_traceback(text)
        assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]
        assert_same_run(save, ddp_reference)
        record["bitwise_equal"] = True
    finally:
        report = os.environ.get("DENSENET_RESTARTS_REPORT")
        if report:
            with open(report, "a") as file:
                file.write(json.dumps(record) + "\n")
