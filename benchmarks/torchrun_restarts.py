"""Which torchrun launch restarts reliably: a minimal gloo job (no project code) restarted twice.

    python -m benchmarks.torchrun_restarts [--tries 3] [--limit 150]

The job replays what issue 17 reported: in the first attempt one of 2 workers is killed with
SIGKILL while the other is in all_reduce; in the second both exit with status 2 right after
setting up (as demo.py refused to start then); the third must set up and finish. Each launch
runs --tries times with --max_restarts 3; a try that has not ended after --limit seconds is
counted as hung and killed. init_process_group has torch's default timeout (30 minutes for
gloo), as demo.py had. Writes results/torchrun-restarts.md (or --out), to which
`pytest -m restarts` adds the repetitions of demo.py itself.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

from measure import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = r"""
import os, sys, time, torch, torch.distributed as dist
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
started = time.monotonic()
dist.init_process_group("gloo")
print(f"attempt {attempt} rank {rank}: set up in {time.monotonic() - started:.1f} s", flush=True)
x = torch.zeros(1)
if attempt == 0:
    for step in range(200):
        dist.all_reduce(x)
        if step == 50 and rank == 1:
            os.kill(os.getpid(), 9)
        time.sleep(0.01)
elif attempt == 1:
    dist.all_reduce(x)
    sys.exit(2)
for step in range(50):
    dist.all_reduce(x)
print(f"attempt {attempt} rank {rank}: done", flush=True)
dist.destroy_process_group()
"""
LAUNCHES = {
    "--standalone": lambda port: ["--standalone"],
    "c10d at 127.0.0.1": lambda port: ["--nnodes=1", "--rdzv_backend=c10d",
                                       f"--rdzv_endpoint=127.0.0.1:{port}"],
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_try(launch, fresh_store, worker, limit):
    """(outcome, attempts that set up, seconds) of one torchrun job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if fresh_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", *LAUNCHES[launch](free_port()),
               "--nproc_per_node=2", "--max_restarts=3", worker]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
        output.seek(0)
        text = output.read()
    seconds = time.monotonic() - started
    set_up = sorted({int(a) for a in re.findall(r"attempt (\d) rank \d: set up", text)})
    failed_set_ups = len(re.findall(r"connectFullMesh failed", text))
    if status is None:
        outcome = "hung (killed)"
    elif status == 0 and "attempt 2 rank 0: done" in text and "attempt 2 rank 1: done" in text:
        outcome = "finished"
    else:
        outcome = f"failed (exit {status})"
    return outcome, set_up, failed_set_ups, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--limit", type=float, default=150.0, help="seconds per try")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "torchrun-restarts.md"))
    options = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(WORKER)
    try:
        for attempt in range(options.tries):
            for fresh_store in (False, True):
                for launch in LAUNCHES:
                    outcome, set_up, failed, seconds = one_try(launch, fresh_store, file.name,
                                                               options.limit)
                    rows.append((launch, fresh_store, attempt + 1, outcome, set_up, failed,
                                 seconds))
                    print(rows[-1], flush=True)
    finally:
        os.unlink(file.name)
    lines = [
        "# torchrun's restarts: which launch restarts reliably",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, shared with other engineers' jobs; "
        f"torch {torch.__version__}; {started}.",
        f"Command: `python -m benchmarks.torchrun_restarts --tries {options.tries} --limit "
        f"{options.limit:g}`.",
        "",
        "A minimal gloo job (no project code, 2 workers, `--max_restarts 3`): attempt 0 loses a "
        "worker to SIGKILL in all_reduce, attempt 1 exits with status 2 right after setting up "
        "(what demo.py did when it refused to start), attempt 2 must set up and finish. "
        f"A job not ended after {options.limit:g} s counts as hung.",
        "",
        "| launch | TORCH_DISABLE_SHARE_RDZV_TCP_STORE | try | outcome | attempts that set up "
        "| failed set-ups (connectFullMesh) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for launch, fresh, attempt, outcome, set_up, failed, seconds in rows:
        lines.append(f"| `{launch}` | {'1' if fresh else 'unset'} | {attempt} | {outcome} | "
                     f"{', '.join(map(str, set_up)) or 'none'} | {failed} | {seconds:.0f} |")
    lines.append("")
    with open(options.out, "w") as out:
        out.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
