"""benchmark.py --quick: runs end to end and its figures are sane."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_sane_figures(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmark.py", "--quick", "True", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stem = tmp_path / "benchmark-cpu-quick"
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
