"""benchmark.py and benchmarks/: the quick run end to end, the searches, the GPU acceptance run's
CPU answer (its report: tests/test_gpu_window.py)."""

import csv
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


def test_loader_benchmark_writes_its_two_tables_outside_the_checkout():
    result = subprocess.run([sys.executable, "benchmark.py", "--loader", "True", "--quick",
                             "True"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "SYNOPSIS" not in result.stdout  # python-fire printed the returned figures once
    path = Path(re.search(r"^wrote (\S+)$", result.stdout, re.M).group(1))
    assert path.name == "folder-loader-cpu-quick.md" and not path.is_relative_to(ROOT)
    rows = [line.strip("| ").split(" | ") for line in path.read_text().splitlines()
            if line.startswith(("| 500x375", "| 80x80"))]
    assert [row[0] for row in rows] == ["500x375 at 224 px", "80x80 at 224 px",
                                        "80x80 at 80 px"] * 2
    for row in rows[:3]:  # rates (CPU ms), then the ratios
        assert all(float(cell.split()[0].replace(",", "")) > 0 for cell in row[3:])
    for row in rows[3:]:  # ms per image of each stage: a reused batch is cheaper to fill
        stages = [float(cell) for cell in row[1:]]
        assert len(stages) == 5 and all(ms > 0 for ms in stages) and stages[4] < stages[3]
    shutil.rmtree(path.parent)
