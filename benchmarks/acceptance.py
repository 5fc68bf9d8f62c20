"""The GPU acceptance run: what only a GPU can show, within 5 minutes of its own time on one H100
or H200, into one report.

    python -m benchmarks.acceptance --out DIR            # what benchmarks/gpu_window.sh runs
    python -m benchmarks.acceptance --out DIR --rerun DIR/gpu-h200.json   # only what failed
    python benchmark.py --acceptance True                # the same, into results/

Parts, in order of importance, each ended at its limit (a cap, and never past the run's own
deadline) with every process it started:

1. tests: `pytest -m cuda` over tests/test_cuda.py and tests/test_cuda_demo.py, in seven
   shards that run at once (the GPU has room for all of them; most of their time is process
   start-up, demo.py runs and compilation, and the machine has 16 CPU cores);
2. peak: the peak memory of a training step of DenseNet-BC-100 (k=12, batch 64) for each
   implementation, against torchvision's memory_efficient, float32 and bf16 (one fresh process
   per implementation, all at once: each counts only its own allocations);
3. steps: forward + backward times of every implementation at BC-100 (interleaved, one
   process), then epochs: demo.py in eager, bf16 + channels_last, CUDA-graph and compiled modes;
4. search: the largest batch and the deepest network that train within 8 GiB, per implementation
   (one process each, all at once; each caps its own allocator at 8 GiB).

How the parts were sized: by counting, on the CPU, the units of work that do not shrink on a
GPU (process starts, compilations) and the steps that do, with GPU costs assumed (not measured
yet: no GPU has run this): a process start with torch and CUDA ~5 s, a compilation of the small
test models 20-40 s, a BC-40 step ~20 ms, a BC-100 step ~50 ms. The tests' shards then take,
by their counts: models (44 one-step comparisons of tiny models, 18 runs of 50 BC-40 steps, 4
fresh processes for peak memory) ~45 s; compile (2 compilations) ~60 s; reduce-overhead (3
compilations, 11 steps) ~60-90 s; graphs (2 BC-100 captures with 68 steps each, 1 small one)
~20 s; demo (9 demo.py starts, 2 of them killed and resumed) ~60 s; demo-compiled (2 starts, 1
compilation) ~55 s; demo-graphs (4 starts) ~25 s: all within the part's 150 s cap, which only a
hang reaches (a single test is failed after 110 s). On this CPU the CUDA tests that can run
there took 169 s (issue 19's figure). The step times take 13 steps of 5 models per precision
(~5 s, ~15 s with the process's start). An epoch run is 2 epochs of 180 BC-100 steps (11,520
images) plus validation and test, ~20 s a mode with start-up; the compiled mode needs its
compilation on top and is the one most likely cut. The search's probes are single training
steps (up to BC-1726 deep), 5 to 15 per implementation. What a part does not finish in its cap
is reported as not finished, and --rerun (whose caps are twice these) finishes it.

Every part writes what it measures as it goes (one JSON line each; the tests through
benchmarks/pytest_live.py), and the report (DIR/gpu-<gpu>.md, with its state DIR/gpu-<gpu>.json
and the logs in DIR/gpu-<gpu>-logs.tar.gz) is rewritten after every part, so a run cut short
still reports every test's outcome, failure tracebacks and the figures it had. --rerun STATE
runs only the tests that failed or did not finish and the parts' items that did not finish,
and merges them into the same report. --cpu runs the plumbing on the CPU with tiny settings
(DENSENET_CUDA_TESTS_ON_CPU=1): a check of this script, not figures.

Imports no torch: the parts run in their own processes (process groups of their own; a part at
its limit gets SIGUSR2, which makes pytest write its stacks, then every process descending
from it is killed, those in sessions of their own such as torchrun's workers included).
"""

import argparse
import csv
import ctypes
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR_VARIABLE = "DENSENET_GPU_REPORT_DIR"  # where the CUDA tests leave their figures
SECONDS = 285  # the run's own time: what is left of 5 minutes after gpu_window.sh's checks
RESERVE = 8  # seconds kept for the last report and the logs' archive
CAPS = {"tests": 150, "peak": 25, "steps": 35, "epochs": 70, "search": 50}
CPU_CAPS = {"tests": 60, "peak": 60, "steps": 60, "epochs": 90, "search": 5}
TEST_LIMIT = 110  # seconds for one test (DENSENET_TEST_LIMIT) before it fails as hung
IMPLS = ("naive", "efficient", "recompute", "torchvision", "torchvision_me")
LABELS = {"naive": "naive (this project)", "efficient": "efficient (this project)",
          "recompute": "efficient + recompute_bottleneck", "torchvision": "torchvision",
          "torchvision_me": "torchvision memory_efficient"}
SEARCH_IMPLS = ("naive", "torchvision_me", "efficient", "recompute")
# Shards of the tests: (file, words); a test whose name holds one of the words belongs to the
# shard, the file's shard without words takes the rest.
SHARDS = {
    "models": ("tests/test_cuda.py", ()),
    "compile": ("tests/test_cuda.py", ("torch_compile",)),
    "reduce-overhead": ("tests/test_cuda.py", ("reduce_overhead",)),
    "graphs": ("tests/test_cuda.py", ("cuda_graph", "captured_step")),
    "demo": ("tests/test_cuda_demo.py", ()),
    "demo-compiled": ("tests/test_cuda_demo.py", ("compiled",)),
    "demo-graphs": ("tests/test_cuda_demo.py", ("cuda_graph", "torchrun")),
}
EPOCH_MODES = {
    "eager": ("eager, float32", []),
    "bf16": ("bf16 + channels_last", ["--amp", "bf16", "--channels_last", "True"]),
    "graph": ("CUDA graph, float32", ["--cuda_graph", "True"]),
    "compiled": ("compiled (torch.compile), float32", ["--compile", "True"]),
}
EPOCH_RUN = ["--dataset", "fake", "--fake_size", "12800,2560", "--valid_size", "1280",
             "--depth", "100", "--growth_rate", "12", "--batch_size", "64", "--n_epochs", "2",
             "--seed", "0", "--log_every", "3"]
CPU_EPOCH_RUN = ["--dataset", "fake", "--fake_size", "640,128", "--valid_size", "64",
                 "--depth", "10", "--growth_rate", "4", "--batch_size", "32", "--n_epochs", "2",
                 "--seed", "0", "--log_every", "1"]
CIFAR_TRAIN_IMAGES = 45000


# --- processes -----------------------------------------------------------------------------------

def become_subreaper():
    """Orphans of our processes become our children (Linux), so that ending a part finds them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def process_table():
    """{pid: (state, parent pid, process group)} from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                text = file.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def descendants(root, table):
    children = defaultdict(list)
    for pid, (_, parent, _) in table.items():
        children[parent].append(pid)
    found, todo = [], [root]
    while todo:
        for child in children[todo.pop()]:
            found.append(child)
            todo.append(child)
    return found


def reap():
    """Collect the exit status of any child that ended (orphans we adopted included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_tree(root, group=None):
    """SIGKILL ``root`` (None: only what descends from this process), every process descending
    from it and every process of ``group``, until none is left (at most 10 s)."""
    me = os.getpid()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = process_table()
        targets = set(descendants(me if root is None else root, table))
        if root is not None and root in table:
            targets.add(root)
        if group is not None:
            targets |= {pid for pid, (_, _, pgrp) in table.items() if pgrp == group}
        targets = {pid for pid in targets - {me} if table.get(pid, ("X",))[0] not in "ZX"}
        if not targets:
            return
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
        reap()


class Job:
    """A command running in its own process group, its output into a log file. ``stacks``:
    it is a pytest with benchmarks/pytest_live.py, which writes its stacks on SIGUSR2."""

    def __init__(self, name, command, log, env=None, stacks=False):
        self.name, self.log, self.stacks = name, log, stacks
        self.started = time.monotonic()
        with open(log, "ab") as file:
            file.write(f"$ {' '.join(map(str, command))}\n".encode())
            file.flush()
            self.process = subprocess.Popen(
                [str(c) for c in command], cwd=ROOT, stdout=file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                start_new_session=True)
        self.status = None  # exit status, or "cut" when ended at its limit
        self.seconds = None

    def poll(self):
        if self.status is None and self.process.poll() is not None:
            self.status = self.process.returncode
            self.seconds = time.monotonic() - self.started
        return self.status

    def end(self):
        """Kill the whole tree: the process, its group, every descendant."""
        if self.poll() is not None:
            return
        end_tree(self.process.pid, self.process.pid)
        self.process.wait()
        self.status, self.seconds = "cut", time.monotonic() - self.started


def wait_for(jobs, deadline):
    """Until every job ended or the deadline; then end the rest (pytest is asked for its
    stacks first) and every stray process."""
    while any(job.poll() is None for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    late = [job for job in jobs if job.poll() is None]
    asked = [job for job in late if job.stacks]
    for job in asked:
        try:
            os.kill(job.process.pid, signal.SIGUSR2)  # pytest only: its children would die
        except OSError:
            pass
    if asked:
        time.sleep(1.0)
    for job in late:
        job.end()
    end_tree(None)  # what a finished job left behind (a demo.py of a killed test, ...)


# --- reading what the parts wrote ----------------------------------------------------------------

def read_lines(path):
    """The JSON objects of a file written line by line (a torn last line is left out)."""
    entries = []
    if not Path(path).exists():
        return entries
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass
    return entries


def test_outcomes(live_log, cut):
    """({nodeid: result}, [collection errors], the node ids' root folder or None when it did
    not finish collecting) from a shard's pytest_live log."""
    results, errors, rootdir, started = {}, [], None, None
    for entry in read_lines(live_log):
        event = entry.get("event")
        if event == "collected":
            rootdir = entry["rootdir"]
            for nodeid in entry["nodeids"]:
                results.setdefault(nodeid, dict(outcome="not run", seconds=0.0, detail=""))
        elif event == "collect_error":
            errors.append(dict(nodeid=entry["nodeid"], longrepr=entry.get("longrepr", "")))
        elif event == "start":
            started = entry["nodeid"]
            results[started] = dict(outcome="running", seconds=0.0, detail="")
        elif event == "report":
            result = results.setdefault(entry["nodeid"], dict(outcome="running", seconds=0.0,
                                                              detail=""))
            result["seconds"] = round(result["seconds"] + entry.get("seconds", 0.0), 2)
            if entry.get("properties"):
                result["properties"] = entry["properties"]
            outcome, when = entry["outcome"], entry["when"]
            if outcome == "failed":
                result["outcome"] = "FAILED" if when == "call" else "ERROR"
                result["longrepr"] = entry.get("longrepr", "")
                result["detail"] = last_line(result["longrepr"])
            elif outcome == "skipped" and result["outcome"] not in ("FAILED", "ERROR"):
                result["outcome"], result["detail"] = "skipped", entry.get("longrepr", "")
            elif when == "call" and result["outcome"] == "running":
                result["outcome"] = "passed"
            elif when == "teardown" and result["outcome"] == "running":
                result["outcome"] = "passed"
    for result in results.values():
        if result["outcome"] == "running":
            result["outcome"] = "killed" if cut else "ERROR"
            result["detail"] = ("running when its shard was ended at the limit" if cut else
                                "pytest ended during this test (see the shard's log)")
    return results, errors, rootdir


def last_line(text):
    """The failure's own message: pytest's "E   ..." lines, else the last line."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = lines or [line.strip() for line in text.splitlines() if line.strip()][-1:]
    return " ".join(lines)[:300]


def shard_of(nodeid):
    path, _, name = nodeid.partition("::")
    for shard, (file, words) in SHARDS.items():
        if path == file and words and any(word in name for word in words):
            return shard
    return next(shard for shard, (file, words) in SHARDS.items() if path == file and not words)


def keyword(shard):
    """The -k expression of a shard: its words, or none of its file's other shards' words."""
    file, words = SHARDS[shard]
    if words:
        return " or ".join(words)
    others = [w for s, (f, ws) in SHARDS.items() if f == file for w in ws]
    return f"not ({' or '.join(others)})" if others else ""


def read_csv(path):
    if not Path(path).exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


# --- the run -------------------------------------------------------------------------------------

def fresh_state():
    return dict(name=None, slug=None, versions=[], runs=[], tests={}, shards={},
                collect_errors={}, items={}, parts={})


def gpu_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = name.lower().replace("nvidia", "")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split()) or "gpu"


class Terminated(Exception):
    """SIGTERM: the run is ended before its own deadline."""


class Acceptance:
    def __init__(self, out, seconds, cpu, previous=None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.started, self.began = time.monotonic(), time.time()
        self.deadline = self.started + seconds
        self.caps = CPU_CAPS if cpu else CAPS
        self.work = Path(tempfile.mkdtemp(prefix="densenet-acceptance-"))
        self.state = previous or fresh_state()
        self.rerun = previous is not None
        self.env = {"PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
        if cpu:
            self.env.update(DENSENET_CUDA_TESTS_ON_CPU="1", CUDA_VISIBLE_DEVICES="")
        self.run_entry = dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), rerun=self.rerun,
                              cpu=cpu, seconds=None, command=" ".join(sys.argv), parts={})
        self.state["runs"].append(self.run_entry)

    # what a part may still use; a rerun has less to do, and twice the caps
    def limit(self, part):
        cap = self.caps[part] * (2 if self.rerun else 1)
        return min(cap, self.deadline - RESERVE - time.monotonic())

    def part_deadline(self, part):
        return time.monotonic() + max(self.limit(part), 0)

    def python(self, *args):
        return [sys.executable, *args]

    def todo(self, part, items):
        """The items of a part this run does: all, or on a rerun those not done."""
        if not self.rerun:
            return list(items)
        return [item for item in items
                if self.state["items"].get(f"{part}/{item}", {}).get("status") != "done"]

    def mark(self, part, item, status, **data):
        self.state["items"][f"{part}/{item}"] = dict(status=status, **data)

    # 1. tests
    def tests(self):
        targets = self.tests_to_rerun() if self.rerun else dict.fromkeys(SHARDS)
        jobs, figures = [], self.work / "figures"
        figures.mkdir(exist_ok=True)
        versions = None
        if not self.state.get("name"):
            versions = Job("versions", self.python("-m", "benchmarks.gpu_measure", "versions",
                                                   "--out", self.work / "versions.jsonl"),
                           self.work / "versions.log", self.env)
        for shard, wanted in targets.items():
            live = self.work / f"tests-{shard}.jsonl"
            command = self.python("-m", "pytest", "-p", "benchmarks.pytest_live",
                                  "-p", "no:cacheprovider", "-o", "addopts=", "-m", "cuda",
                                  "-rA", "-q", "--continue-on-collection-errors",
                                  SHARDS[shard][0])
            if keyword(shard):
                command += ["-k", keyword(shard)]
            env = {**self.env, "DENSENET_LIVE_LOG": str(live), REPORT_DIR_VARIABLE: str(figures),
                   "DENSENET_TEST_LIMIT": str(TEST_LIMIT)}
            if wanted is not None:
                only = self.work / f"tests-{shard}.only"
                only.write_text("\n".join(wanted) + "\n")
                env["DENSENET_ONLY"] = str(only)
            jobs.append(Job(shard, command, self.work / f"tests-{shard}.log", env, stacks=True))
        deadline = self.part_deadline("tests")
        wait_for(jobs + ([versions] if versions else []), deadline)
        if versions:
            self.read_versions()
        for job in jobs:
            cut = job.status == "cut"
            results, errors, rootdir = test_outcomes(self.work / f"tests-{job.name}.jsonl", cut)
            for nodeid, result in results.items():
                self.state["tests"][nodeid] = dict(result, shard=job.name)
            if rootdir is not None:
                for nodeid in set(targets[job.name] or ()) - set(results):
                    self.state["tests"][nodeid] = dict(
                        outcome="gone", seconds=0.0, shard=job.name,
                        detail="the rerun did not collect it (renamed or removed?)")
            for path, error in list(self.state["collect_errors"].items()):
                if error.get("shard") == job.name:  # collected again by this run
                    del self.state["collect_errors"][path]
            for error in errors:
                self.state["collect_errors"][error["nodeid"]] = dict(shard=job.name,
                                                                     longrepr=error["longrepr"])
            self.state["shards"][job.name] = dict(
                status=job.status, seconds=round(job.seconds or 0, 1),
                collected=rootdir is not None, rootdir=rootdir,
                log_tail=tail(self.work / f"tests-{job.name}.log", 25))
        for path in sorted(figures.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
                self.state.setdefault("figures", {})[entry["name"]] = entry["figures"]
            except (ValueError, KeyError, TypeError):
                pass
        cut = any(job.status == "cut" for job in jobs)
        failed = any(job.status not in (0, 1, 5, "cut") for job in jobs)  # 1: a test failed
        return "cut" if cut else "failed" if failed else "done"

    def tests_to_rerun(self):
        """{shard: node ids, or None for all of the shard}: the tests that failed, errored, were
        killed or did not run, and all of each shard that did not finish collecting."""
        targets = defaultdict(list)
        for nodeid, result in self.state["tests"].items():
            if result["outcome"] not in ("passed", "skipped", "gone"):
                targets[result.get("shard") or shard_of(nodeid)].append(nodeid)
        whole = {shard for shard in SHARDS if shard not in self.state["shards"]
                 or not self.state["shards"][shard].get("collected")}
        whole |= {error.get("shard") for error in self.state["collect_errors"].values()}
        return {**targets, **dict.fromkeys(whole & set(SHARDS))}

    def read_versions(self):
        for entry in read_lines(self.work / "versions.jsonl"):
            self.state.update(name=entry["name"], slug=gpu_slug(entry["name"]),
                              versions=entry["lines"])

    # 2. peak memory
    def peak(self):
        impls = self.todo("peak", IMPLS)
        rows = self.work / "peak.jsonl"
        jobs = [Job(impl, self.python("-m", "benchmarks.gpu_measure", "peak", "--impl", impl,
                                      "--out", rows, *(["--cpu"] if self.cpu else [])),
                    self.work / f"peak-{impl}.log", self.env) for impl in impls]
        wait_for(jobs, self.part_deadline("peak"))
        measured = defaultdict(list)
        for row in read_lines(rows):
            measured[row["impl"]].append(row)
        for job in jobs:
            found = measured[job.name]
            status = "done" if len(found) == 2 and job.status in (0, "cut") else \
                "cut" if job.status == "cut" else "failed"
            self.mark("peak", job.name, status, rows=found, seconds=round(job.seconds, 1),
                      log_tail=[] if status == "done" else tail(job.log, 12))
        return self.part_status("peak", IMPLS)

    # 3. step times, then epoch times
    def steps(self):
        amps = self.todo("steps", ("off", "bf16"))
        rows = self.work / "steps.jsonl"
        deadline = self.part_deadline("steps")
        for amp in amps:  # one after the other: timings must not share the GPU
            if deadline - time.monotonic() < 5:
                self.mark("steps", amp, "not run", note="no time left in the part")
                continue
            job = Job(amp, self.python("-m", "benchmarks.gpu_measure", "steps", "--amp", amp,
                                       "--out", rows, *(["--cpu"] if self.cpu else [])),
                      self.work / f"steps-{amp}.log", self.env)
            wait_for([job], deadline)
            found = [r for r in read_lines(rows) if r["amp"] == amp]
            status = "done" if job.status == 0 and found else \
                "cut" if job.status == "cut" else "failed"
            self.mark("steps", amp, status, rows=found, seconds=round(job.seconds, 1),
                      log_tail=[] if status == "done" else tail(job.log, 12))
        return self.part_status("steps", ("off", "bf16"))

    def epochs(self):
        modes = self.todo("epochs", EPOCH_MODES)
        deadline = self.part_deadline("epochs")
        for mode in modes:
            _, flags = EPOCH_MODES[mode]
            if self.cpu and mode in ("graph", "compiled"):
                self.mark("epochs", mode, "done", note="not run on the CPU dry run")
                continue
            if deadline - time.monotonic() < 5:
                self.mark("epochs", mode, "not run", note="no time left in the part")
                continue
            save = self.work / f"epochs-{mode}"
            log = self.work / f"epochs-{mode}.log"
            job = Job(mode, self.python("demo.py", *(CPU_EPOCH_RUN if self.cpu else EPOCH_RUN),
                                        "--save", save, *flags), log, self.env)
            wait_for([job], deadline)
            rows = read_csv(save / "results.csv")
            progress = re.findall(r"^(epoch \d+/\d+) step (\d+)/(\d+) \| (\d+) images/s",
                                  log.read_text(errors="replace"), re.MULTILINE)
            status = "done" if job.status == 0 and len(rows) == 2 else \
                "cut" if job.status == "cut" else "failed"
            self.mark("epochs", mode, status, rows=rows, progress=progress[-1:],
                      seconds=round(job.seconds, 1),
                      log_tail=[] if status == "done" else tail(log, 12))
        return self.part_status("epochs", EPOCH_MODES)

    # 4. largest batch and deepest network
    def search(self):
        if self.cpu:
            for impl in SEARCH_IMPLS:
                self.mark("search", impl, "done", note="not run on the CPU dry run")
            return "done"
        impls = self.todo("search", SEARCH_IMPLS)
        rows = self.work / "search.jsonl"
        jobs = [Job(impl, self.python("-m", "benchmarks.gpu_measure", "search", "--impl", impl,
                                      "--out", rows), self.work / f"search-{impl}.log", self.env)
                for impl in impls]
        wait_for(jobs, self.part_deadline("search"))
        entries = defaultdict(list)
        for row in read_lines(rows):
            entries[row["impl"]].append(row)
        for job in jobs:
            found = entries[job.name]
            status = "done" if job.status == 0 else "cut" if job.status == "cut" else "failed"
            self.mark("search", job.name, status, rows=found, seconds=round(job.seconds, 1),
                      log_tail=[] if status == "done" else tail(job.log, 12))
        return self.part_status("search", SEARCH_IMPLS)

    def part_status(self, part, items):
        statuses = {self.state["items"].get(f"{part}/{item}", {}).get("status") for item in items}
        return "done" if statuses == {"done"} else "cut" if "cut" in statuses else \
            "failed" if "failed" in statuses else "not finished"

    def run(self):
        def terminate(signum, frame):
            raise Terminated

        signal.signal(signal.SIGTERM, terminate)  # `timeout` past the run's own deadline
        part = None
        try:
            for part in ("tests", "peak", "steps", "epochs", "search"):
                self.run_part(part)
        except Terminated:
            self.state["parts"][part] = self.run_entry["parts"][part] = "terminated (SIGTERM)"
        finally:
            end_tree(None)
        return self.save()

    def run_part(self, part):
        if self.rerun and self.state["parts"].get(part) == "done" and part != "tests":
            return
        if self.limit(part) < 3:
            status = "not run"
            for_items = {"peak": IMPLS, "steps": ("off", "bf16"), "epochs": EPOCH_MODES,
                         "search": SEARCH_IMPLS}.get(part, ())
            for item in self.todo(part, for_items):
                self.mark(part, item, "not run", note="no time left in the run")
        else:
            print(f"{part} (up to {self.limit(part):.0f} s) ...", flush=True)
            started = time.monotonic()
            status = getattr(self, part)()
            print(f"{part}: {status} after {time.monotonic() - started:.0f} s", flush=True)
        self.state["parts"][part] = status
        self.run_entry["parts"][part] = status
        self.save()

    def save(self):
        """Write the state, the report and the logs' archive; the report's path."""
        self.run_entry["seconds"] = round(time.monotonic() - self.started)
        slug = self.state.get("slug") or ("cpu" if self.cpu else "unknown-gpu")
        stem = self.out / f"gpu-{slug}"
        Path(f"{stem}.json").write_text(json.dumps(self.state, indent=1) + "\n")
        Path(f"{stem}.md").write_text(render(self.state))
        pack_logs(self.work, Path(f"{stem}-logs.tar.gz"))
        return Path(f"{stem}.md")


def tail(path, count):
    if not Path(path).exists():
        return ["(no log)"]
    return Path(path).read_text(errors="replace").strip().splitlines()[-count:]


def pack_logs(work, path, largest=4 * 2**20):
    """Every log and JSON line file of the run (no checkpoints), each cut to its last 4 MiB."""
    partial = path.with_suffix(".partial")
    with tarfile.open(partial, "w:gz") as archive:
        for file in sorted(work.rglob("*")):
            if not file.is_file() or file.suffix not in (".log", ".jsonl", ".json", ".csv",
                                                         ".txt"):
                continue
            name = str(file.relative_to(work))
            if file.stat().st_size <= largest:
                archive.add(file, arcname=name)
                continue
            with open(file, "rb") as handle:
                handle.seek(-largest, os.SEEK_END)
                data = handle.read()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(file.stat().st_mtime)
            archive.addfile(info, io.BytesIO(data))
    os.replace(partial, path)


# --- the report ----------------------------------------------------------------------------------

def fmt(value, digits=1):
    return "" if value in (None, "") else f"{value:,.{digits}f}"


def render(state):
    """The markdown report of everything the state holds."""
    name = state.get("name") or "an unknown GPU"
    lines = [f"# GPU acceptance run on {name}", ""]
    lines += [f"- {line}" for line in state.get("versions", [])]
    for run in state["runs"]:
        kind = "rerun of what had not passed" if run["rerun"] else "run"
        where = " (CPU dry run: checks the plumbing, not figures)" if run.get("cpu") else ""
        parts = ", ".join(f"{part} {status}" for part, status in run["parts"].items())
        lines.append(f"- {run['date']}: {kind}{where}, {run['seconds']} s of its own time; "
                     f"{parts or 'no part finished'}. Command: `{run['command']}`")
    lines += ["", *render_tests(state), "", *render_peak(state), "", *render_steps(state), "",
              *render_epochs(state), "", *render_search(state)]
    return "\n".join(lines) + "\n"


def render_tests(state):
    tests = state["tests"]
    counts = defaultdict(int)
    for result in tests.values():
        counts[result["outcome"]] += 1
    lines = ["## 1. CUDA tests", "",
             "`pytest -m cuda` over tests/test_cuda.py and tests/test_cuda_demo.py, seven shards "
             "at once: " + (", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or
                            "no test reported") + "."]
    for shard, info in state["shards"].items():
        status = info["status"]
        said = ("ended at its limit" if status == "cut" else
                f"exit status {status}")
        if not info.get("collected"):
            said += "; it did not finish collecting (its log's end below)"
        lines.append(f"- shard {shard}: {said} after {info['seconds']} s")
        if not info.get("collected"):
            lines += ["", "```", *info.get("log_tail", []), "```", ""]
    for path, error in state["collect_errors"].items():
        lines += ["", f"Collection error in {path}:", "", "```",
                  *error["longrepr"].splitlines()[-40:], "```"]
    lines += ["", "| test | outcome | seconds | detail |", "|---|---|---|---|"]
    for nodeid in sorted(tests):
        result = tests[nodeid]
        detail = " ".join(str(result.get("detail", "")).split()).replace("|", "/")[:200]
        lines.append(f"| {nodeid} | {result['outcome']} | {result['seconds']:.1f} | {detail} |")
    figures = state.get("figures", {})
    if figures:
        lines += ["", "Figures the tests recorded (measured while the other shards ran):", ""]
        lines += [f"- {name}: " + "; ".join(f"{k} {v}" for k, v in values.items())
                  for name, values in sorted(figures.items())]
    failures = {n: r for n, r in sorted(tests.items()) if r.get("longrepr")}
    if failures:
        lines += ["", "### Failures", ""]
    for nodeid, result in failures.items():
        text = result["longrepr"].splitlines()
        shown = text if len(text) <= 80 else text[:20] + ["..."] + text[-58:]
        lines += [f"**{nodeid}** ({result['outcome']})", "", "```", *shown, "```", ""]
    return lines


def item_rows(state, part, items):
    rows, notes = [], []
    for item in items:
        entry = state["items"].get(f"{part}/{item}")
        if entry is None:
            notes.append(f"- {item}: not reached")
            continue
        rows += entry.get("rows", [])
        if entry["status"] != "done" or entry.get("note"):
            note = entry.get("note") or {"cut": "ended at the part's limit",
                                         "failed": "failed"}.get(entry["status"],
                                                                 entry["status"])
            notes.append(f"- {item}: {note}" + (f" after {entry['seconds']} s"
                                                if entry.get("seconds") else ""))
            if entry.get("log_tail"):
                notes += ["", "```", *entry["log_tail"], "```", ""]
    return rows, notes


def render_peak(state):
    rows, notes = item_rows(state, "peak", IMPLS)
    lines = ["## 2. Peak memory against torchvision's memory_efficient", "",
             "Peak memory allocated during one training step (forward, backward, SGD with "
             "momentum; model, gradients and momentum included), one fresh process per "
             "implementation; predicted = models/memory.py.", "",
             "| config | batch | amp | implementation | peak MiB | predicted MiB | "
             "vs torchvision m.e. |", "|---|---|---|---|---|---|---|"]
    reference = {r["amp"]: r["peak_mib"] for r in rows if r["impl"] == "torchvision_me"}
    for row in rows:
        ratio = row["peak_mib"] / reference[row["amp"]] \
            if row["peak_mib"] and reference.get(row["amp"]) else None
        lines.append(f"| {row['config']} | {row['batch']} | {row['amp']} | "
                     f"{LABELS[row['impl']]} | {fmt(row['peak_mib'])} | "
                     f"{fmt(row['predicted_mib'])} | {fmt(ratio, 2)} |")
    return lines + ([""] + notes if notes else [])


def render_steps(state):
    rows, notes = item_rows(state, "steps", ("off", "bf16"))
    lines = ["## 3. Step and epoch times", "",
             "Forward + backward of each implementation, interleaved in one process, median of "
             "the timed repetitions (cuDNN benchmark mode on).", "",
             "| config | batch | amp | implementation | forward ms | backward ms | step ms | "
             "step vs naive |", "|---|---|---|---|---|---|---|---|"]
    naive = {r["amp"]: r["step_ms"] for r in rows if r["impl"] == "naive"}
    for row in rows:
        ratio = row["step_ms"] / naive[row["amp"]] if naive.get(row["amp"]) else None
        lines.append(f"| {row['config']} | {row['batch']} | {row['amp']} | "
                     f"{LABELS[row['impl']]} | {fmt(row['forward_ms'])} | "
                     f"{fmt(row['backward_ms'])} | {fmt(row['step_ms'])} | {fmt(ratio, 2)} |")
    return lines + ([""] + notes if notes else [])


def render_epochs(state):
    lines = ["demo.py, DenseNet-BC-100 k=12 efficient, batch 64, on fake data of 11,520 "
             "training, 1,280 validation and 2,560 test images, 2 epochs; epoch 1 includes "
             "compilation, capture and cuDNN's search; an epoch's time includes validation and "
             "test. The last column is 45,000 training images (a CIFAR-10 epoch) at epoch 2's "
             "rate, evaluation not included.", "",
             "| mode | status | epoch 1 s | epoch 2 s | train images/s (epoch 2) | peak MiB | "
             "45,000 images at that rate, s |", "|---|---|---|---|---|---|---|"]
    notes = []
    for mode, (title, _) in EPOCH_MODES.items():
        entry = state["items"].get(f"epochs/{mode}")
        if entry is None:
            lines.append(f"| {title} | not reached | | | | | |")
            continue
        rows = entry.get("rows", [])
        cells = [row.get("epoch_seconds", "") for row in rows[:2]] + ["", ""]
        last = rows[1] if len(rows) > 1 else {}
        rate = last.get("images_per_second", "")
        status = entry.get("note") or entry["status"]
        if entry["status"] != "done" and entry.get("progress"):
            epoch, step, total, seen = entry["progress"][0]
            status += f" (last seen: {epoch} step {step}/{total}, {seen} images/s)"
        estimate = f"{CIFAR_TRAIN_IMAGES / float(rate):.1f}" if rate else ""
        lines.append(f"| {title} | {status} | {cells[0]} | {cells[1]} | {rate} | "
                     f"{last.get('peak_memory_mb', '')} | {estimate} |")
        if entry.get("log_tail"):
            notes += [f"- {mode}'s log ends:", "", "```", *entry["log_tail"], "```", ""]
    return lines + ([""] + notes if notes else [])


def render_search(state):
    rows, notes = item_rows(state, "search", SEARCH_IMPLS)
    lines = ["## 4. Largest batch and deepest network within 8 GiB", "",
             "Real training steps, each implementation in its own process with its allocator "
             "capped at 8 GiB, the search starting at the planner's prediction (a cut search "
             "gives the largest that fitted so far).", "",
             "| implementation | largest batch, BC-100 k=12 | predicted | deepest BC k=12, batch "
             "64 | predicted |", "|---|---|---|---|---|"]
    by_impl = defaultdict(list)
    for row in rows:
        by_impl[row["impl"]].append(row)
    deepest = {}
    for impl in SEARCH_IMPLS:
        entries = by_impl.get(impl)
        if not entries:
            continue
        prediction = next((e for e in entries if e["kind"] == "prediction"), {})
        found = {e["what"]: e["value"] for e in entries if e["kind"] == "found"}
        cells = []
        for what in ("batch", "depth"):
            fitted = [e["value"] for e in entries if e["kind"] == "probe" and e["what"] == what
                      and e["fits"]]
            if what in found:
                cells.append(str(found[what]))
            elif fitted:
                cells.append(f"at least {max(fitted)} (unfinished)")
            else:
                cells.append("not found")
        if found.get("depth"):
            deepest[impl] = found["depth"]
        lines.append(f"| {LABELS[impl]} | {cells[0]} | {prediction.get('predicted_batch', '')} "
                     f"| {cells[1]} | {prediction.get('predicted_depth', '')} |")
    if deepest.get("efficient") and deepest.get("torchvision_me"):
        lines += ["", f"Deepest, efficient / torchvision memory_efficient: "
                      f"{deepest['efficient'] / deepest['torchvision_me']:.2f}x (target: at "
                      "least 2x)."]
    return lines + ([""] + notes if notes else [])


# --- the command line ----------------------------------------------------------------------------

def cuda_available():
    """Asked in a child process, so that this one never starts CUDA."""
    result = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True, timeout=120)
    return result.stdout.strip() == "True"


def run(out="results", rerun=None, seconds=SECONDS, cpu=False):
    """Run the acceptance into ``out``; the report's path (None without a GPU)."""
    if not cpu and not cuda_available():
        print("no CUDA GPU here: the GPU acceptance run needs one (nothing was run)")
        return None
    previous = json.loads(Path(rerun).read_text()) if rerun else None
    become_subreaper()
    acceptance = Acceptance(out, seconds, cpu, previous)
    path = acceptance.run()
    state = acceptance.state
    bad = [n for n, r in state["tests"].items() if r["outcome"] not in ("passed", "skipped")]
    unfinished = [p for p, s in state["parts"].items() if s != "done"]
    print(f"wrote {path}: {len(bad)} test(s) did not pass"
          + (f"; not finished: {', '.join(unfinished)}" if unfinished else "")
          + f"; logs in {acceptance.work}", flush=True)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for the report")
    parser.add_argument("--rerun", help="the state (gpu-<name>.json) of the run to complete")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="this run's own time")
    parser.add_argument("--cpu", action="store_true", help="a dry run on the CPU")
    args = parser.parse_args(argv)
    path = run(args.out, args.rerun, args.seconds, args.cpu)
    if path is None:
        return 0
    state = json.loads(path.with_suffix(".json").read_text())
    passed = all(r["outcome"] in ("passed", "skipped") for r in state["tests"].values()) \
        and all(s == "done" for s in state["parts"].values()) and not state["collect_errors"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
