"""benchmarks/gpu_window.sh and benchmarks/acceptance.py's plumbing, on the CPU: the one line
without a GPU, parts ended at their limits with every process they started, outcomes and
tracebacks written as they happen, and a rerun of only what did not pass, merged.

The GPU itself runs none of this here; `bash benchmarks/gpu_window.sh OUT --cpu` is the long
dry run of the whole acceptance on a CPU (README: On a GPU).
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # as test_demo.py's
SCRIPT = ROOT / "benchmarks" / "gpu_window.sh"
ACCEPTANCE_ENV = {**ENV, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


def test_without_a_gpu_the_window_says_so_in_one_line_and_exits_0(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=ACCEPTANCE_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("no CUDA GPU here"), \
        result.stdout
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


SYNTHETIC = '''
import os, subprocess, sys, time
import pytest

pytestmark = pytest.mark.cuda
FIXED = os.path.exists(os.path.join(os.path.dirname(__file__), "fixed"))


def test_passes():
    pass


def test_fails():
    assert FIXED, "the arithmetic of this test is wrong"


@pytest.mark.skip(reason="not on this machine")
def test_skipped():
    pass


def test_hangs_with_a_child_in_its_own_session():
    if FIXED:
        return
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True)  # as torchrun starts its workers
    with open(os.path.join(os.path.dirname(__file__), "child.pid"), "w") as file:
        file.write(str(child.pid))
    time.sleep(300)


def test_after_the_hang():
    pass
'''

# Runs the acceptance with only the tests part, over the synthetic shards.
DRIVER = textwrap.dedent("""
    import json, sys
    from benchmarks import acceptance
    shards, cap, out, previous = sys.argv[1:]
    acceptance.SHARDS = {name: (path, ()) for name, path in json.loads(shards).items()}
    acceptance.CAPS = dict(acceptance.CAPS, tests=float(cap), peak=0, steps=0, epochs=0,
                           search=0)
    acceptance.become_subreaper()
    state = json.loads(open(previous).read()) if previous != "-" else None
    run = acceptance.Acceptance(out, 60, cpu=False, previous=state)
    run.state.update(name="Test GPU", slug="test-gpu", versions=["a test of the plumbing"])
    run.run()
""")


def run_acceptance(shards, cap, out, previous="-"):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(shards), str(cap),
                             str(out), str(previous)], cwd=ROOT, env=ACCEPTANCE_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((out / "gpu-test-gpu.json").read_text())
    return state, (out / "gpu-test-gpu.md").read_text(), time.monotonic() - started


def test_a_shard_at_its_limit_is_reported_test_by_test_then_rerun_and_merged(tmp_path):
    (tmp_path / "test_synth.py").write_text(SYNTHETIC)
    (tmp_path / "test_broken.py").write_text("import a_module_that_is_not_there\n")
    shards = {"synth": str(tmp_path / "test_synth.py"),
              "broken": str(tmp_path / "test_broken.py")}
    out = tmp_path / "out"
    state, report, seconds = run_acceptance(shards, 8, out)

    outcomes = {nodeid.split("::")[-1]: result["outcome"]
                for nodeid, result in state["tests"].items()}
    assert outcomes == {"test_passes": "passed", "test_fails": "FAILED",
                        "test_skipped": "skipped",
                        "test_hangs_with_a_child_in_its_own_session": "killed",
                        "test_after_the_hang": "not run"}, outcomes
    assert seconds < 60, "the shard was not ended at its limit"
    assert state["shards"]["synth"]["status"] == "cut"
    child = int((tmp_path / "child.pid").read_text())
    assert not alive(child), "the hung test's child (a session of its own) was left running"
    assert "a_module_that_is_not_there" in json.dumps(state["collect_errors"])
    for text in ("### Failures", "the arithmetic of this test is wrong", "killed", "not run",
                 "not on this machine", "Collection error", "a_module_that_is_not_there"):
        assert text in report, text
    with tarfile.open(out / "gpu-test-gpu-logs.tar.gz") as archive:
        log = archive.extractfile("tests-synth.log").read().decode()
    assert "test_hangs_with_a_child_in_its_own_session" in log  # its stack, before the kill

    (tmp_path / "fixed").touch()
    (tmp_path / "test_broken.py").write_text(
        "import pytest\n\n\n@pytest.mark.cuda\ndef test_now_collects():\n    pass\n")
    state, report, _ = run_acceptance(shards, 30, out, out / "gpu-test-gpu.json")
    assert {r["outcome"] for r in state["tests"].values()} == {"passed", "skipped"}, \
        state["tests"]
    assert len(state["tests"]) == 6 and not state["collect_errors"]
    assert [run["rerun"] for run in state["runs"]] == [False, True]
    assert "Failures" not in report and "rerun of what had not passed" in report
    with tarfile.open(out / "gpu-test-gpu-logs.tar.gz") as archive:
        rerun = [json.loads(line) for line in
                 archive.extractfile("tests-synth.jsonl").read().decode().splitlines()]
    collected = next(e["nodeids"] for e in rerun if e["event"] == "collected")
    assert sorted(n.split("::")[-1] for n in collected) == [
        "test_after_the_hang", "test_fails", "test_hangs_with_a_child_in_its_own_session"]
    assert os.path.exists(out / "gpu-test-gpu.md")


def test_the_shards_split_the_cuda_tests_without_overlap():
    # Every test function of the CUDA test files lands in exactly one shard (as pytest's -k
    # selects by name): a test added with a name that matches two shards, or none, fails here.
    from benchmarks.acceptance import SHARDS

    for path in sorted({file for file, _ in SHARDS.values()}):
        names = re.findall(r"^def (test_\w+)", (ROOT / path).read_text(), re.MULTILINE)
        assert names, path
        for name in names:
            shards = [shard for shard, (file, words) in SHARDS.items() if file == path and (
                any(word in name for word in words) if words else not any(
                    word in name for f, ws in SHARDS.values() if f == path for word in ws))]
            assert len(shards) == 1, (name, shards)


def test_the_report_shows_each_parts_figures_and_what_did_not_finish():
    from benchmarks.acceptance import fresh_state, render

    state = fresh_state()
    state["runs"].append(dict(date="today", rerun=False, cpu=False, seconds=290, command="x",
                              parts={"peak": "done", "epochs": "cut"}))
    peak = dict(config="BC-100 k=12", batch=64, amp="off", predicted_mib=500.0)
    state["items"].update({
        "peak/efficient": dict(status="done", rows=[dict(peak, impl="efficient", peak_mib=400.0)]),
        "peak/torchvision_me": dict(status="done", rows=[
            dict(peak, impl="torchvision_me", peak_mib=1000.0)]),
        "peak/naive": dict(status="cut", seconds=25.0, rows=[], log_tail=["loading..."]),
        "steps/off": dict(status="done", rows=[
            dict(config="BC-100 k=12", batch=64, amp="off", impl=impl, forward_ms=10.0,
                 backward_ms=20.0, step_ms=step) for impl, step in (("naive", 30.0),
                                                                    ("efficient", 27.0))]),
        "epochs/eager": dict(status="done", rows=[
            dict(epoch_seconds="9.1", images_per_second="1800.0", peak_memory_mb="600.5"),
            dict(epoch_seconds="6.2", images_per_second="2250.0", peak_memory_mb="600.5")]),
        "epochs/compiled": dict(status="cut", seconds=40.0, rows=[],
                                progress=[["epoch 1/2", "60", "180", "900"]],
                                log_tail=["compiling"]),
        "search/efficient": dict(status="cut", seconds=50.0, rows=[
            dict(kind="prediction", impl="efficient", predicted_batch=1290, predicted_depth=1726),
            dict(kind="found", impl="efficient", what="batch", value=1270),
            dict(kind="probe", impl="efficient", what="depth", value=1690, fits=True),
            dict(kind="probe", impl="efficient", what="depth", value=1726, fits=False)]),
    })
    report = render(state)
    assert "| BC-100 k=12 | 64 | off | efficient (this project) | 400.0 | 500.0 | 0.40 |" \
        in report
    assert "- naive: ended at the part's limit after 25.0 s" in report and "loading..." in report
    assert "| efficient (this project) | 10.0 | 20.0 | 27.0 | 0.90 |" in report
    assert "| eager, float32 | done | 9.1 | 6.2 | 2250.0 | 600.5 | 20.0 |" in report
    assert "| compiled (torch.compile), float32 | cut (last seen: epoch 1/2 step 60/180, 900 " \
        "images/s) |" in report
    assert "| efficient (this project) | 1270 | 1290 | at least 1690 (unfinished) | 1726 |" \
        in report
    assert "| bf16 + channels_last | not reached |" in report
