"""The GPU acceptance run behind `python benchmark.py --acceptance True`.

GPU time comes in short windows, so everything that only a GPU can show runs in one command of
at most 10 minutes on one H100, and lands in one report, results/gpu-<gpu name>.md:

1. the CUDA tests (pytest -m cuda), each with pass, fail or skip and its reason, and the figures
   they record (peak memory per implementation, CUDA-graph against eager step time);
2. the GPU benchmark (benchmark.py's acceptance configurations: peak memory, step time, the
   largest batch and the deepest network that fit, float32 and bf16);
3. demo.py's epoch time on CIFAR-10-sized fake data (DenseNet-BC-100, k=12, batch 64) in eager,
   bf16 + channels_last, compiled and CUDA-graph modes;
4. the versions of torch, CUDA, cuDNN and the driver, and the GPU's name.

Each part runs in its own processes under its own time limit, so one that fails or hangs is
reported as such and the others still run. Without a GPU it says so in one line and does nothing.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR_VARIABLE = "DENSENET_GPU_REPORT_DIR"  # where the CUDA tests leave their figures
# Seconds for each part; together well inside 10 minutes on one H100.
LIMITS = {"tests": 210, "benchmark": 210, "epochs": 150}
EPOCH_MODES = [
    ("eager, float32", []),
    ("bf16 + channels_last", ["--amp", "bf16", "--channels_last", "True"]),
    ("compiled (torch.compile), float32", ["--compile", "True"]),
    ("CUDA graph, float32", ["--cuda_graph", "True"]),
]
EPOCH_RUN = ["--dataset", "fake", "--fake_size", "50000,10000", "--valid_size", "5000",
             "--depth", "100", "--growth_rate", "12", "--batch_size", "64", "--n_epochs", "2",
             "--seed", "0", "--log_every", "10"]


def gpu_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = name.lower().replace("nvidia", "")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def versions():
    """(GPU name, lines naming the GPU and the software versions)."""
    import torch

    name = torch.cuda.get_device_name(0)
    properties = torch.cuda.get_device_properties(0)
    driver = "unknown"
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return name, [
        f"GPU: {name}, {properties.total_memory / 2**30:.1f} GiB, "
        f"{properties.multi_processor_count} multiprocessors, "
        f"{torch.cuda.device_count()} visible",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}, driver {driver}, Python {sys.version.split()[0]}",
    ]


def run_part(command, limit, log, env=None):
    """Run a command under a time limit, its output into log; (exit status or None, seconds)."""
    started = time.monotonic()
    with open(log, "w") as file:
        try:
            process = subprocess.run(command, cwd=ROOT, stdout=file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     timeout=limit)
            status = process.returncode
        except subprocess.TimeoutExpired:
            status = None
    return status, time.monotonic() - started


def test_outcomes(junit_xml):
    """[(test, outcome, detail, seconds)] from pytest's JUnit XML report."""
    outcomes = []
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                detail = " ".join((element.get("message") or element.text or "").split())
                break
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcomes.append((name, outcome, detail[:300], float(case.get("time", 0))))
    return outcomes


def cuda_tests(work):
    """The CUDA tests, their outcomes, and the figures they wrote into work/tests/."""
    figures = work / "tests"
    figures.mkdir()
    junit = work / "cuda-tests.xml"
    status, seconds = run_part(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
         f"--junitxml={junit}", "tests"],
        LIMITS["tests"], work / "cuda-tests.log", env={REPORT_DIR_VARIABLE: str(figures)})
    lines = [f"`pytest -m cuda tests`: {describe(status, seconds, LIMITS['tests'])}.", ""]
    if junit.exists():
        outcomes = test_outcomes(junit)
        counts = {o: sum(1 for _, outcome, _, _ in outcomes if outcome == o)
                  for o in ("passed", "FAILED", "ERROR", "skipped")}
        lines += [", ".join(f"{n} {o.lower()}" for o, n in counts.items() if n) + ".", "",
                  "| test | outcome | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {name} | {outcome} | {seconds:.1f} | {detail.replace('|', '/')} |"
                  for name, outcome, detail, seconds in outcomes]
    else:
        lines.append("No JUnit report: see the log below.")
        lines += log_tail(work / "cuda-tests.log")
    recorded = sorted(figures.glob("*.json"))
    if recorded:
        lines += ["", "Figures the tests recorded:", ""]
    for path in recorded:
        try:
            entry = json.loads(path.read_text())
            lines.append(f"- {entry['name']}: " + "; ".join(
                f"{key} {format_value(value)}" for key, value in entry["figures"].items()))
        except (ValueError, KeyError, TypeError) as error:
            lines.append(f"- {path.name}: unreadable ({error})")
    return lines


def format_value(value):
    if isinstance(value, dict):
        return ", ".join(f"{key} {format_value(inner)}" for key, inner in value.items())
    return str(value)


def benchmark(work):
    """benchmark.py's acceptance configurations; its markdown table."""
    out = work / "benchmark"
    status, seconds = run_part(
        [sys.executable, "benchmark.py", "--profile", "acceptance", "--out", str(out)],
        LIMITS["benchmark"], work / "benchmark.log")
    lines = [f"`python benchmark.py --profile acceptance`: "
             f"{describe(status, seconds, LIMITS['benchmark'])}.", ""]
    tables = sorted(out.glob("benchmark-*.md")) if out.exists() else []
    if tables:
        lines.append(tables[0].read_text().strip())
    else:
        lines += log_tail(work / "benchmark.log")
    return lines


def epoch_times(work):
    """demo.py's epoch times in each mode, from the results.csv of a 2-epoch run."""
    lines = ["demo.py on fake CIFAR-10-sized data (45,000 training, 5,000 validation, 10,000 "
             "test images), DenseNet-BC-100 k=12 efficient, batch 64, 2 epochs; epoch 1 "
             "includes compilation, capture and cuDNN's kernel search; epoch time includes "
             "evaluating validation and test sets.", "",
             "| mode | exit | epoch 1 s | epoch 2 s | train images/s (epoch 2) | peak MiB |",
             "|---|---|---|---|---|---|"]
    deadline = time.monotonic() + LIMITS["epochs"]
    for mode, flags in EPOCH_MODES:
        left = deadline - time.monotonic()
        if left < 10:
            lines.append(f"| {mode} | not run: the part's {LIMITS['epochs']} s were used up "
                         "| | | | |")
            continue
        save = work / f"run-{len(lines)}"
        log = work / f"{save.name}.log"
        status, seconds = run_part([sys.executable, "demo.py", *EPOCH_RUN, "--save", str(save),
                                    *flags], left, log)
        rows = read_csv(save / "results.csv")
        cells = [row.get("epoch_seconds", "") for row in rows[:2]] + ["", ""]
        last = rows[-1] if rows else {}
        status_text = describe(status, seconds, left)
        if status != 0:
            status_text += "; " + " ".join(log_tail(log, 1))
        lines.append(f"| {mode} | {status_text} | {cells[0]} | {cells[1]} | "
                     f"{last.get('images_per_second', '')} | {last.get('peak_memory_mb', '')} |")
    return lines


def read_csv(path):
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def describe(status, seconds, limit):
    if status is None:
        return f"stopped at its limit of {limit:.0f} s"
    return f"exit status {status} after {seconds:.0f} s"


def log_tail(path, count=15):
    if not path.exists():
        return ["(no log)"]
    lines = path.read_text(errors="replace").strip().splitlines()[-count:]
    return ["    " + line for line in lines] if count > 1 else lines


def run(out="results"):
    """Run every part on the GPU and write <out>/gpu-<gpu name>.md; the report's path."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU acceptance run needs one (nothing was run)")
        return None
    started = time.time()
    name, header = versions()
    work = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))  # logs, kept for a closer look
    parts = []
    for title, part in (("CUDA tests", cuda_tests), ("Benchmark", benchmark),
                        ("Epoch time of demo.py", epoch_times)):
        print(f"{title} ...", flush=True)
        parts += ["", f"## {title}", "", *part(work)]
    report = [f"# GPU acceptance run on {name}", "", *[f"- {line}" for line in header],
              f"- Command: `python benchmark.py --acceptance True`, "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {time.time() - started:.0f} s in all.",
              *parts]
    path = Path(out) / f"gpu-{gpu_slug(name)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(report) + "\n")
    print(f"wrote {path}; logs in {work}")
    failed = [line for line in report if re.search(r"\| (FAILED|ERROR) \|", line)]
    print(f"{len(failed)} CUDA test(s) failed or errored" if failed else "all CUDA tests ran "
          "without failure")
    return path
