"""demo.py --plan True: the memory planner's table, its JSON, its speed and its refusals."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import demo
from models import depth_to_config, memory
from training.errors import UsageError
from training.plan import machine_memory, parse_budget, plan

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
JSON_MODE_KEYS = {"saved_bytes", "state_bytes", "peak_bytes", "fits"}


def run_plan(*args):
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), "--plan", "True",
                           *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_table_shows_every_mode_and_what_fits_a_budget():
    result = run_plan("--depth", 100, "--growth_rate", 12, "--memory_budget", "8GiB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "769,162 parameters" in out and "budget 8.0 GiB (--memory_budget)" in out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()
            if line.startswith(("naive", "efficient", "torchvision"))}
    assert set(rows) == {"naive", "efficient (chosen)", "efficient + recompute_bottleneck",
                         "torchvision memory_efficient (reference)"}
    for row in rows.values():
        assert " yes " in row and "DenseNet-BC-" in row


def test_json_is_one_object_with_the_documented_schema():
    result = run_plan("--depth", 190, "--batch_size", 64, "--memory_budget", "1GiB",
                      "--json", "True", "--save", "unused", "--data", "unused")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert set(report) == {"parameters", "macs_per_image", "modes", "budget_bytes", "device"}
    assert report["budget_bytes"] == 2**30 and report["device"].startswith("cpu")
    assert set(report["modes"]) == set(memory.MODES)
    net = memory.network(**depth_to_config(190, 12))
    assert report["parameters"] == memory.parameters(net)
    assert report["macs_per_image"] == memory.macs_per_image(net)
    for mode, figures in report["modes"].items():
        assert set(figures) == JSON_MODE_KEYS
        assert all(type(figures[key]) is int for key in JSON_MODE_KEYS - {"fits"})
        assert figures["saved_bytes"] == memory.saved_bytes(net, 64, mode)
        assert figures["peak_bytes"] == memory.peak_bytes(net, 64, mode)
        assert figures["fits"] is (figures["peak_bytes"] <= 2**30)
    assert report["modes"]["naive"]["fits"] is False


def test_bad_input_on_the_command_line_is_one_line_and_exit_2():
    result = run_plan("--memory_budget", "lots")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --memory_budget must be a size")


@pytest.mark.parametrize("arguments, message", [
    (dict(plan=True, memory_budget="1MiB"), "smaller than the parameters alone"),
    (dict(plan=True, memory_budget="8 GiBs"), "--memory_budget must be a size"),
    (dict(plan=True, memory_budget=-5), "--memory_budget must be"),
    (dict(plan=True, depth=101), "invalid depth 101 for DenseNet-BC"),
    (dict(plan=True, depth=40, bc=False, recompute_bottleneck=True), "--recompute_bottleneck"),
    (dict(plan="yes"), "--plan must be True or False"),
    (dict(plan=True, amp="fp8"), "--amp must be one of"),
    (dict(json=True), "go with --plan True"),
    (dict(memory_budget="8GiB"), "go with --plan True"),
])
def test_bad_input_is_refused_in_one_line(arguments, message, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(**arguments)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_planning_takes_well_under_a_second_even_for_huge_networks():
    bc1000 = dict(depth_to_config(1000, 12), num_classes=10, small_inputs=True, image_size=32)
    densenet264 = dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64,
                       num_classes=1000, small_inputs=False, image_size=224)
    for architecture, bc in ((bc1000, True), (densenet264, None)):
        start = time.perf_counter()
        report = plan(architecture, batch_size=64, budget=8 * 2**30, device="cpu", bc=bc)
        assert time.perf_counter() - start < 1.0
        assert len(report["modes"]) == 4
    assert report["parameters"] == 33_337_704  # DenseNet-264, as published


def test_largest_batch_and_deepest_network_are_the_edges_of_fitting():
    budget = 2 * 2**30
    architecture = dict(depth_to_config(100, 12), num_classes=10, small_inputs=True,
                        image_size=32, drop_rate=0.0)
    report = plan(architecture, batch_size=64, budget=budget, bc=True)
    net = memory.network(**architecture)
    for mode, figures in report["modes"].items():
        largest = figures["largest_batch"]
        assert memory.peak_bytes(net, largest, mode) <= budget
        assert memory.peak_bytes(net, largest + 1, mode) > budget
        deepest = figures["deepest"]
        fits = memory.network(**dict(architecture, **depth_to_config(deepest, 12)))
        deeper = memory.network(**dict(architecture, **depth_to_config(deepest + 6, 12)))
        assert memory.peak_bytes(fits, 64, mode) <= budget < memory.peak_bytes(deeper, 64, mode)
    order = [report["modes"][m]["deepest"] for m in
             ("naive", "torchvision_memory_efficient", "efficient", "recompute_bottleneck")]
    assert order == sorted(order) and len(set(order)) == 4


def test_plain_densenet_has_no_bottleneck_modes():
    architecture = dict(depth_to_config(40, 12, bc=False), num_classes=10, image_size=32)
    assert set(plan(architecture, batch_size=8)["modes"]) == {"naive", "efficient"}


def test_parse_budget():
    assert parse_budget("8GiB") == 8 * 2**30
    assert parse_budget("8 GiB") == 8 * 2**30
    assert parse_budget("1.5GB") == 1_500_000_000
    assert parse_budget("512MiB") == 512 * 2**20
    assert parse_budget("8G") == 8 * 2**30
    assert parse_budget("2e9") == 2_000_000_000
    assert parse_budget(4096) == 4096
    for bad in ("", "GiB", "8 GiBs", "-1GiB", "0", True, None, "1.2.3GB"):
        with pytest.raises(UsageError):
            parse_budget(bad)


def test_machine_memory_is_known_here():
    total, available = machine_memory()
    assert 0 < available <= total
