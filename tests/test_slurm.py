"""examples/slurm.sbatch on a real SLURM (one node on this machine, set up by
tests/slurm/start_slurm.sh): a run longer than its time limit is stopped with a checkpoint before
the limit, requeued, resumed and completed, bitwise equal to an uninterrupted torchrun run.

Not in the default run (about 10 to 15 minutes: every requeued start waits about 2.5 minutes):

    python -m pytest -m slurm tests/test_slurm.py
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from test_demo import ROOT, read_rows, tiny_args
from test_restart import TORCHRUN_ENV, assert_same_run, torchrun

pytestmark = pytest.mark.slurm

# 2 processes x 63 steps per epoch; 16 epochs take 2 to 4 minutes here, more than the 3-minute
# limit below, which signals the job 1 to 2 minutes after it starts (SLURM checks once a minute).
ARGS = dict(fake_size="2048,48", n_epochs=16, drop_rate=0.2, milestones="8,12", seed=7,
            checkpoint_every=0.25)


def job_state(job):
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                           text=True)
    found = re.search(r"JobState=(\S+)", shown.stdout)
    return found.group(1) if found else "gone"


def test_a_run_longer_than_its_time_limit_is_requeued_resumed_and_completed(tmp_path):
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("installing and starting SLURM needs root and apt-get")
    subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "start_slurm.sh")], check=True,
                   timeout=900)

    reference = tmp_path / "reference"
    process = torchrun(tiny_args(reference, **ARGS), tmp_path / "reference.txt")
    assert process.wait(timeout=900) == 0, (tmp_path / "reference.txt").read_text()

    save = tmp_path / "run"
    output = tmp_path / "job.out"
    env = {**TORCHRUN_ENV, "PYTHON": sys.executable, "PROCESSES_PER_NODE": "1"}
    # One node here: two tasks on it stand for two nodes (two torchrun agents meeting at the
    # c10d rendezvous), one process each.
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--time=3:00", "--signal=B:USR1@60", f"--output={output}",
         str(ROOT / "examples" / "slurm.sbatch"), *tiny_args(save, **ARGS)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 30 * 60
        while job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "gone"):
            assert time.monotonic() < deadline, output.read_text()[-5000:]
            time.sleep(5)
        state = job_state(job)
    finally:
        subprocess.run(["scancel", job], check=False)
    text = output.read_text()
    assert state == "COMPLETED", text[-5000:]
    starts = re.findall(r"^\S+ \S+ job \d+ start (\d+) on", text, re.MULTILINE)
    assert len(starts) >= 2 and text.count("time limit near: stopping with a checkpoint") >= 1
    assert "requeued" in text and text.rstrip().endswith("the run is complete"), text[-3000:]
    assert re.search(r"^stopped by SIGUSR1 ", text, re.MULTILINE), text[-3000:]
    assert [row["epoch"] for row in read_rows(save)] == [str(e + 1) for e in range(16)]
    assert_same_run(save, reference)
