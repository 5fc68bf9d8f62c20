"""benchmark.py --quick: runs end to end and its figures are sane."""

import csv
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


def test_largest_finds_the_threshold_by_doubling_and_bisection():
    from benchmark import _largest

    for threshold in (64, 65, 100, 1000, 4095, 4096):
        calls = []

        def fits(n, threshold=threshold, calls=calls):
            calls.append(n)
            return n <= threshold

        found = _largest(fits, 64, 4096)
        assert threshold - max(1, threshold // 64) <= found <= threshold
        assert len(calls) < 25
    assert _largest(lambda n: n <= 10, 64, 4096) is None
    assert _largest(lambda n: True, 16, 4096) == 4096


def test_search_near_brackets_the_threshold_starting_from_the_prediction():
    from benchmark import _search_near

    for threshold in (1, 7, 100, 1000, 4095):
        for predicted in (1, threshold // 2 + 1, threshold, threshold + 3, 2 * threshold):
            calls = []

            def fits(n, threshold=threshold, calls=calls):
                calls.append(n)
                return n <= threshold

            low, high = _search_near(fits, predicted, 4096)
            assert low <= threshold < high and high - low <= max(1, low // 50)
            assert calls[0] == min(predicted, 4096) and len(calls) < 20
    assert _search_near(lambda n: True, 100, 4096) == (4096, None)
    assert _search_near(lambda n: False, 100, 4096) == (0, 1)
    calls = []
    _search_near(lambda n: calls.append(n) or n <= 500, 500, 4096)
    assert calls == [500, 510]  # an exact prediction costs two probes


def test_a_training_step_under_an_address_space_limit(monkeypatch):
    """The search's probe: a real step fits a generous budget and fails a tiny one."""
    import benchmark

    for key, value in benchmark.SEARCH_ENV.items():
        monkeypatch.setenv(key, value)
    config = benchmark.bc_config(16, 4, batch_size=8)
    fits, baseline, _, error = benchmark._run_in_fresh_process(
        benchmark._limited_step_worker, "efficient", config, 2**30)
    assert fits and baseline > 0 and error == ""
    fits, _, _, error = benchmark._run_in_fresh_process(
        benchmark._limited_step_worker, "efficient", config, 2**20)
    assert not fits and error  # an allocation (or oneDNN, allocating) failed
