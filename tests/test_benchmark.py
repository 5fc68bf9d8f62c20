"""benchmark.py and benchmarks/: the quick run end to end, the searches, the GPU acceptance run's
CPU answer and its report."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_sane_figures_outside_the_checkout():
    results_before = sorted((ROOT / "results").rglob("*"))
    result = subprocess.run([sys.executable, "benchmark.py", "--quick", "True"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted((ROOT / "results").rglob("*")) == results_before
    stem = Path(re.search(r"^wrote (\S+)\.csv, \.md, \.png$", result.stdout, re.M).group(1))
    assert stem.name == "benchmark-cpu-quick"
    assert not stem.is_relative_to(ROOT)
    rows = list(csv.DictReader(open(f"{stem}.csv")))
    assert {r["impl"] for r in rows} == {"naive", "efficient", "recompute", "torchvision",
                                         "torchvision_me"}
    for config in {r["config"] for r in rows}:
        saved = {r["impl"]: float(r["saved_mb"]) for r in rows if r["config"] == config}
        params = {r["params"] for r in rows if r["config"] == config}
        assert len(params) == 1, "all implementations must have the same architecture"
        assert saved["torchvision"] > 0.95 * saved["naive"]
        assert saved["efficient"] < 0.6 * saved["torchvision_me"] < 0.6 * saved["naive"]
        assert saved["recompute"] < 0.5 * saved["efficient"]
    timed = [r for r in rows if r["step_ms"]]
    assert timed and all(float(r["step_ms"]) > 0 for r in timed)
    table = open(f"{stem}.md").read()
    assert "efficient (this project)" in table and "Command:" in table
    assert open(f"{stem}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(stem.parent)


def test_search_near_brackets_the_threshold_starting_from_the_prediction():
    from benchmarks.common import search_near

    for threshold in (1, 7, 100, 1000, 4095):
        for predicted in (1, threshold // 2 + 1, threshold, threshold + 3, 2 * threshold):
            calls = []

            def fits(n, threshold=threshold, calls=calls):
                calls.append(n)
                return n <= threshold

            low, high = search_near(fits, predicted, 4096)
            assert low <= threshold < high and high - low <= max(1, low // 50)
            assert calls[0] == min(predicted, 4096) and len(calls) < 20
    assert search_near(lambda n: True, 100, 4096) == (4096, None)
    assert search_near(lambda n: False, 100, 4096) == (0, 1)
    calls = []
    search_near(lambda n: calls.append(n) or n <= 500, 500, 4096)
    assert calls == [500, 510]  # an exact prediction costs two probes


def test_a_training_step_under_an_address_space_limit(monkeypatch):
    """The search's probe: a real step fits a generous budget and fails a tiny one."""
    from benchmarks import cpu_search
    from benchmarks.common import bc_config, run_in_fresh_process

    for key, value in cpu_search.SEARCH_ENV.items():
        monkeypatch.setenv(key, value)
    config = bc_config(16, 4, batch_size=8)
    fits, baseline, _, error = run_in_fresh_process(
        cpu_search._limited_step_worker, "efficient", config, 2**30)
    assert fits and baseline > 0 and error == ""
    fits, _, _, error = run_in_fresh_process(
        cpu_search._limited_step_worker, "efficient", config, 2**20)
    assert not fits and error  # an allocation (or oneDNN, allocating) failed


def test_acceptance_run_without_a_gpu_says_so_in_one_line_and_exits_0():
    results_before = sorted((ROOT / "results").rglob("*"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmark.py", "--acceptance", "True"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "no CUDA GPU here: the GPU acceptance run needs one (nothing was run)"]
    assert sorted((ROOT / "results").rglob("*")) == results_before


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_a[float64]" time="1.5"/>
<testcase classname="tests.test_cuda" name="test_b" time="0.2"><failure message="assert 1 == 2">
long traceback</failure></testcase>
<testcase classname="tests.test_cuda_demo" name="test_c" time="0.0"><skipped
 message="needs 2 GPUs for torchrun with nccl"/></testcase>
</testsuite></testsuites>"""


def test_acceptance_report_parts_from_what_their_commands_leave(tmp_path, monkeypatch):
    """Each part of the report, its commands replaced by stand-ins that leave what the real
    ones leave: pytest's JUnit XML and the tests' figures, the benchmark's table, demo.py's
    results.csv (or nothing, for a mode that fails)."""
    from benchmarks import acceptance

    commands = []

    def fake_run_part(command, limit, log, env=None):
        commands.append(command)
        log.write_text("line 1\nTraceback: the last line\n")
        if "pytest" in command:
            junit = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--junitxml"))
            Path(junit).write_text(JUNIT)
            figures = Path(env[acceptance.REPORT_DIR_VARIABLE])
            (figures / "peak_memory.json").write_text(json.dumps(
                {"name": "peak_memory", "figures": {"peak_mib": {"naive": 2100.5,
                                                                 "efficient": 480.2}}}))
            return 1, 12.0
        if "benchmark.py" in command:
            out = Path(command[command.index("--out") + 1])
            out.mkdir()
            (out / "benchmark-cuda-h100-acceptance.md").write_text("| the table |")
            return 0, 30.0
        if "--cuda_graph" in command:
            return 2, 3.0  # refused, wrote nothing
        save = Path(command[command.index("--save") + 1])
        save.mkdir()
        (save / "results.csv").write_text(
            "epoch,epoch_seconds,images_per_second,peak_memory_mb\n1,14.2,4000.0,510.3\n"
            "2,9.8,4700.5,510.3\n")
        return 0, 25.0

    monkeypatch.setattr(acceptance, "run_part", fake_run_part)
    tests = "\n".join(acceptance.cuda_tests(tmp_path))
    assert "1 passed, 1 failed, 1 skipped." in tests
    assert "| test_cuda::test_b | FAILED | 0.2 | assert 1 == 2 |" in tests
    assert "needs 2 GPUs for torchrun with nccl" in tests
    assert "- peak_memory: peak_mib naive 2100.5, efficient 480.2" in tests
    assert "| the table |" in "\n".join(acceptance.benchmark(tmp_path))
    epochs = acceptance.epoch_times(tmp_path)
    assert "| eager, float32 | exit status 0 after 25 s | 14.2 | 9.8 | 4700.5 | 510.3 |" in epochs
    assert any(line.startswith("| CUDA graph, float32 | exit status 2 after 3 s; Traceback: "
                               "the last line |") for line in epochs)
    demo_runs = [c for c in commands if "demo.py" in c]
    assert len(demo_runs) == len(acceptance.EPOCH_MODES)
    for command in demo_runs:
        assert command[command.index("--fake_size") + 1] == "50000,10000"
        assert command[command.index("--depth") + 1] == "100"


def test_allocator_comparison_writes_both_allocators_outside_the_checkout():
    result = subprocess.run([sys.executable, "benchmark.py", "--allocator", "True", "--quick",
                             "True"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    path = Path(re.search(r"^wrote (\S+)$", result.stdout, re.M).group(1))
    assert path.name == "cpu-allocator-quick.md" and not path.is_relative_to(ROOT)
    rows = [line.split(" | ") for line in path.read_text().splitlines()
            if line.startswith(("| efficient", "| naive"))]
    assert [(row[0], row[1]) for row in rows] == [
        ("| efficient", "glibc default"), ("| efficient", "freed memory kept"),
        ("| naive", "glibc default"), ("| naive", "freed memory kept")]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3].split()[0]) >= 0
        assert float(row[4].rstrip(" |")) > 0.1  # GiB: torch alone takes more
    shutil.rmtree(path.parent)
