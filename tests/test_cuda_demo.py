"""demo.py end to end on CUDA: kill and resume bitwise (--deterministic), stop signals, --evaluate,
CUDA graphs, torch.compile, torchrun with nccl (2 GPUs) and SyncBatchNorm.

Every test is marked `cuda` and is skipped without a GPU. With DENSENET_CUDA_TESTS_ON_CPU=1 the
tests whose logic runs on a CPU run there (to check the tests themselves on a machine without a
GPU); the others are skipped with their reason.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_demo import ENV, ROOT, assert_ok, free_port, load, read_rows, tiny_args, without_timing
from test_run_control import start, wait_for

ON_CPU = os.environ.get("DENSENET_CUDA_TESTS_ON_CPU") == "1"
HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (HAS_CUDA or ON_CPU), reason="needs a CUDA GPU")]
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (not the CPU stand-in)")
# The GPU is visible to demo.py; OMP_NUM_THREADS keeps its CPU side quiet.
GPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")} \
    if HAS_CUDA else ENV


def demo(args, timeout=600, env=None):
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), *map(str, args)], cwd=ROOT,
                          env=env or GPU_ENV, capture_output=True, text=True, timeout=timeout)


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def test_run_writes_gpu_figures_and_evaluates(tmp_path):
    save = tmp_path / "run"
    result = demo(tiny_args(save, fake_size="320,64", n_epochs=2, drop_rate=0.1))
    assert_ok(result)
    rows = read_rows(save)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    if HAS_CUDA:
        assert all(float(row["peak_memory_mb"]) > 0 for row in rows)
        assert "device   1 x " in result.stdout
    evaluation = demo(["--save", save, "--evaluate", "True"])
    assert_ok(evaluation)
    assert "test error" in evaluation.stdout and "model_best.pt" in evaluation.stdout


def test_kill_during_epoch_2_and_resume_is_bitwise_equal_when_deterministic(tmp_path):
    args = dict(fake_size="640,64", n_epochs=3, drop_rate=0.2, milestones="2", seed=3,
                deterministic=True, log_every=0)
    reference = tmp_path / "reference"
    assert_ok(demo(tiny_args(reference, **args)))
    save = tmp_path / "killed"
    output = tmp_path / "killed.txt"
    process = start(tiny_args(save, **args), output, env=GPU_ENV)
    try:
        wait_for(lambda: "epoch 2/3 step 5/" in output.read_text(), process, timeout=300,
                 what="epoch 2's step 5", output=output)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
        process.wait()
    assert load(save / "checkpoint.pt")["epoch"] == 1
    resumed = demo([*tiny_args(save, **args), "--resume", "True"])
    assert_ok(resumed)
    assert "resuming after epoch 1" in resumed.stdout
    for name in ("checkpoint.pt", "model_best.pt"):
        assert_same_weights(load(reference / name)["model"], load(save / name)["model"])
    assert without_timing(read_rows(save)) == without_timing(read_rows(reference))


def test_sigterm_mid_epoch_and_resume_is_bitwise_equal_when_deterministic(tmp_path):
    args = dict(fake_size="640,64", n_epochs=2, seed=4, deterministic=True, log_every=0,
                amp="bf16", channels_last=True)
    reference = tmp_path / "reference"
    assert_ok(demo(tiny_args(reference, **args)))
    save = tmp_path / "stopped"
    output = tmp_path / "stopped.txt"
    process = start(tiny_args(save, **args), output, env=GPU_ENV)
    try:
        wait_for(lambda: "epoch 1/2 step 3/" in output.read_text(), process, timeout=300,
                 what="epoch 1's step 3", output=output)
        time.sleep(random.Random(1).uniform(0, 0.2))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, output.read_text()
    finally:
        process.kill()
        process.wait()
    assert load(save / "checkpoint.pt")["position"]["step"] >= 3
    assert_ok(demo([*tiny_args(save, **args), "--resume", "True"]))
    assert_same_weights(load(reference / "checkpoint.pt")["model"],
                        load(save / "checkpoint.pt")["model"])
    assert without_timing(read_rows(save)) == without_timing(read_rows(reference))


@needs_gpu
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graph_training_matches_eager(tmp_path, amp):
    """--cuda_graph True replays the captured step: the same training as eager, up to the
    order of floating-point additions that graph replay may not keep (cuDNN picks kernels)."""
    # 688 training images: 21 batches of 32 replayed, then a last batch of 16 run eagerly.
    args = dict(fake_size="720,64", n_epochs=2, seed=5, amp=amp, deterministic=True)
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert_ok(demo(tiny_args(eager, **args)))
    assert_ok(demo(tiny_args(graphed, **args, cuda_graph=True)))
    tolerance = 1e-4 if amp == "off" else 2e-2
    for expected, actual in zip(read_rows(eager), read_rows(graphed), strict=True):
        for column in ("train_loss", "valid_loss", "test_loss"):
            assert float(actual[column]) == pytest.approx(float(expected[column]),
                                                          rel=tolerance), column


def test_compiled_training_matches_eager(tmp_path):
    args = dict(fake_size="320,64", n_epochs=2, seed=6)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(demo(tiny_args(eager, **args)))
    assert_ok(demo(tiny_args(compiled, **args, compile=True)))
    for expected, actual in zip(read_rows(eager), read_rows(compiled), strict=True):
        for column in ("train_loss", "valid_loss", "test_loss"):
            assert float(actual[column]) == pytest.approx(float(expected[column]),
                                                          rel=1e-3), column


# Saves every rank's state after each epoch's training steps, so that the test can compare the
# ranks' final weights: after fit() rank 0's summarize() loads model_best.pt into its model.
EVERY_RANK_SAVES = """
import os, runpy, sys, torch
import training.loop as loop

train_epoch = loop.train_epoch

def train_epoch_and_save(run, *args):
    result = train_epoch(run, *args)
    torch.save(run.raw_model.state_dict(), os.path.join(run.config["save"],
               f"rank{run.devices.rank}.pt"))
    return result

loop.train_epoch = train_epoch_and_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2,
                    reason="needs 2 GPUs for torchrun with nccl")
@pytest.mark.parametrize("sync_bn", [False, True])
def test_torchrun_two_processes_end_with_equal_weights(tmp_path, sync_bn):
    """torchrun with nccl on 2 GPUs (gloo on the CPU stand-in).

    What is equal: DDP averages the gradients, so every rank ends with the same parameters.
    BatchNorm's running statistics are each rank's own (DDP hands rank 0's buffers to the
    others before each forward, then each rank updates them from its own batch), so they are
    equal only with --sync_bn True; checkpoint.pt holds rank 0's.
    """
    if sync_bn and not HAS_CUDA:
        pytest.skip("--sync_bn True needs CUDA (DDP refuses SyncBatchNorm on a CPU)")
    save = tmp_path / "run"
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "0,1"} if HAS_CUDA else ENV
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "--no-python", sys.executable, "-c",
               EVERY_RANK_SAVES, str(ROOT / "demo.py"),
               *tiny_args(save, fake_size="256,64", sync_bn=sync_bn)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["epoch"] for row in read_rows(save)] == ["1", "2"]
    assert "2 processes (torchrun" in result.stdout
    ranks = [load(save / f"rank{rank}.pt") for rank in range(2)]
    assert_same_weights(ranks[0], load(save / "checkpoint.pt")["model"])
    statistics = [k for k in ranks[0] if k.endswith(("running_mean", "running_var"))]
    assert statistics
    if sync_bn:
        assert_same_weights(*ranks)
        return
    assert_same_weights(*({k: v for k, v in rank.items() if k not in statistics}
                          for rank in ranks))  # parameters, and num_batches_tracked
    assert any(not torch.equal(ranks[0][k], ranks[1][k]) for k in statistics), \
        "without --sync_bn each rank keeps the running statistics of its own batches"


def test_refuses_what_cuda_graphs_cannot_do(tmp_path):
    result = demo(tiny_args(tmp_path / "run", cuda_graph=True, amp="fp16"))
    expected = "fp16" if HAS_CUDA else "needs a CUDA GPU"
    assert result.returncode == 2 and expected in result.stderr
