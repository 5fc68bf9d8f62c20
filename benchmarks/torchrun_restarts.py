"""Which torchrun launch restarts reliably: a minimal gloo job (no project code) restarted twice.

    python -m benchmarks.torchrun_restarts [--tries 3] [--limit 150]
    python -m benchmarks.torchrun_restarts --issue OLD_CHECKOUT   # issue 17's command line

The job replays what issue 17 reported: in the first attempt one of 2 workers is killed with
SIGKILL while the other is in all_reduce; in the second both exit with status 2 right after
setting up (as demo.py refused to start then); the third must set up and finish. Each launch
runs --tries times with --max_restarts 3; a try that has not ended after --limit seconds is
counted as hung and killed. init_process_group has torch's default timeout (30 minutes for
gloo), as demo.py had. Writes results/torchrun-restarts.md (or --out), to which
`pytest -m restarts` adds the repetitions of demo.py itself.

--issue runs issue 17's command line instead (demo.py on the CIFAR-10 subset, 2 processes,
--max_restarts 2, one worker killed with SIGKILL in epoch 2): with the demo.py of OLD_CHECKOUT
under --standalone, as reported, and with this one under --standalone and under the launch
README recommends, both with --resume auto; prints one line per case.
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
            end(process)
            status = None
        output.seek(0)
        text = output.read()
    seconds = time.monotonic() - started
    set_up = sorted({int(a) for a in re.findall(r"attempt (\d) rank \d: set up", text)})
    failed_set_ups = len(re.findall(r"connectFullMesh failed", text))
    if status is None:
        outcome = "hung (killed)"
    elif status == 0:
        outcome = "finished" if set_up == [0, 1, 2] else "finished after failed set-ups"
    else:
        outcome = f"failed (exit {status})"
    return outcome, set_up, failed_set_ups, seconds


def issue_case(demo, launch, fresh_store, resume, limit):
    """Issue 17's job with `demo` (a demo.py), one worker killed in epoch 2: one line."""
    data = os.path.join(ROOT, "..", "shared", "cifar10-subset")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if fresh_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    with tempfile.TemporaryDirectory() as folder:
        save = os.path.join(folder, "run")
        command = [sys.executable, "-m", "torch.distributed.run", *LAUNCHES[launch](free_port()),
                   "--nproc_per_node=2", "--max_restarts=2", demo, "--data", data, "--save",
                   save, "--depth", "16", "--growth_rate", "6", "--n_epochs", "3",
                   "--valid_size", "0", "--seed", "1", "--log_every", "0", *resume]
        started = time.monotonic()
        path = os.path.join(folder, "out.txt")
        with open(path, "w") as output:  # the processes share its offset: read it elsewhere
            process = subprocess.Popen(command, env=env, cwd=os.path.dirname(demo),
                                       stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        killed = None
        while process.poll() is None and time.monotonic() - started < limit:
            if killed is None and re.search(r"^epoch 2/3 step", read(path), re.MULTILINE):
                killed = kill_a_worker(process.pid)
            time.sleep(0.2)
        status = process.poll()
        if status is None:
            end(process)
        text = read(path)
        rows = 0
        if os.path.exists(os.path.join(save, "results.csv")):
            with open(os.path.join(save, "results.csv")) as file:
                rows = len(file.read().splitlines()) - 1
    outcome = "hung (killed)" if status is None else f"exit {status}"
    starts = len(re.findall(r"^run {6}\S+ \(", text, re.MULTILINE))
    refusals = text.count("already holds a run")
    lost = len(re.findall(r"^error: rank \d lost contact", text, re.MULTILINE))
    tracebacks = text.count("Traceback")
    return (f"{outcome} after {time.monotonic() - started:.0f} s; {rows} CSV rows; worker killed "
            f"{'yes' if killed else 'no'}; starts that set up: {starts}; refusals ('already "
            f"holds a run'): {refusals}; one-line lost-contact errors: {lost}; tracebacks: "
            f"{tracebacks}")


def end(launcher):
    """End a torchrun and its workers: they run in sessions of their own, which a SIGKILL of
    torchrun would orphan; SIGTERM lets torchrun end them (SIGKILL after a minute)."""
    launcher.terminate()
    try:
        launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def read(path):
    with open(path, errors="replace") as file:
        return file.read()


def kill_a_worker(launcher):
    """SIGKILL torchrun's child of global rank 1; its pid."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as file:
                environ = file.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and b"RANK=1" in environ:
            os.kill(int(entry), signal.SIGKILL)
            return int(entry)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--issue", help="a checkout of demo.py before issue 17's changes")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--limit", type=float, default=150.0, help="seconds per try")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "torchrun-restarts.md"))
    options = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    if options.issue:
        new = os.path.join(ROOT, "demo.py")
        old = os.path.join(os.path.abspath(options.issue), "demo.py")
        for name, demo, launch, fresh, resume in [
                ("before (old demo.py, --standalone)", old, "--standalone", False, []),
                ("new demo.py, --standalone", new, "--standalone", False, ["--resume", "auto"]),
                ("new demo.py, README's launch", new, "c10d at 127.0.0.1", True,
                 ["--resume", "auto"])]:
            print(f"{name}: {issue_case(demo, launch, fresh, resume, options.limit)}",
                  flush=True)
        return
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
