#!/usr/bin/env bash
# The GPU window in one call, on a bare GPU machine (README: "On a GPU").
#
#   bash benchmarks/gpu_window.sh OUT                        # the acceptance, into OUT
#   bash benchmarks/gpu_window.sh OUT --rerun STATE.json     # only what failed last time
#   bash benchmarks/gpu_window.sh OUT --cpu                  # a dry run of the plumbing on a CPU
#   bash benchmarks/gpu_window.sh --wheels                   # where PyPI is reachable: fill .whl/
#
# 1. One Python process checks, in a few seconds, that a CUDA GPU is there (without one the
#    script says so in one line and exits 0) and imports every module the acceptance imports,
#    the CUDA test files included (one import error there would abort a whole pytest run).
# 2. What is missing is installed from the wheels in .whl/ (git-ignored; fill it with --wheels
#    before the window) into /tmp/site, put on PYTHONPATH. The wheels are pure Python, so if pip
#    itself fails they are imported from the wheel files instead.
# 3. The acceptance (python -m benchmarks.acceptance) runs in what is left of the window's own
#    time (DENSENET_WINDOW_SECONDS, default 300) and leaves in OUT: gpu-<gpu>.md (the report),
#    gpu-<gpu>.json (its state, for --rerun) and gpu-<gpu>-logs.tar.gz, plus window.txt (this
#    script's lines). No more files than that: the device tool brings back at most 8.
# Exit status: 0 when every test passed and every part finished (or without a GPU), 1 when not,
# 2 for a usage error, 124 when the acceptance overran its time and was killed.
set -u
START=$SECONDS
BUDGET=${DENSENET_WINDOW_SECONDS:-300}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
# What the GPU machine lacks (Python 3.12 with torch 2.11, torchvision, scipy, pandas,
# matplotlib, tqdm, pytest, hypothesis): fire, and termcolor, fire's only requirement
# (termcolor requires nothing).
WHEELS=(fire==0.7.1 termcolor==3.3.0)

if [ "${1:-}" = "--wheels" ]; then
    rm -rf "$ROOT/.whl" && mkdir -p "$ROOT/.whl"
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d "$ROOT/.whl" "${WHEELS[@]}"
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_window.sh OUT [--rerun STATE.json] [--cpu] | --wheels" >&2
    exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
shift
CPU=""
for arg in "$@"; do [ "$arg" = "--cpu" ] && CPU=--cpu; done
cd "$ROOT" || exit 2

check() {  # prints one line; exit 0: ready, 10: no GPU, 11: modules missing, 3: no torch
    timeout 180 "$PY" - "$CPU" <<'EOF'  # a few seconds; the limit is against a hang
import importlib, sys, time
started = time.time()
try:
    import torch
except Exception as error:
    print(f"cannot import torch ({type(error).__name__}: {error}): the window needs it")
    sys.exit(3)
if sys.argv[1] != "--cpu" and not torch.cuda.is_available():
    print(f"no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False): "
          "the GPU window needs one; nothing was run")
    sys.exit(10)
sys.path[:0] = [".", "tests"]
missing = []
for name in ["torchvision", "numpy", "scipy", "pandas", "matplotlib", "tqdm", "pytest",
             "hypothesis", "termcolor", "fire", "models", "data", "measure", "training.loop",
             "demo", "benchmark", "benchmarks.acceptance", "benchmarks.gpu_measure",
             "benchmarks.pytest_live", "test_cuda", "test_cuda_demo"]:
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
import os, shutil, sysconfig
# torch.compile builds Triton's launchers and Inductor's C++ with a C compiler and Python.h.
note = "" if (shutil.which("cc") or shutil.which("gcc")) and os.path.exists(
    os.path.join(sysconfig.get_paths()["include"], "Python.h")) else \
    " (no C compiler or no Python.h: torch.compile will fail)"
seconds = time.time() - started
if missing:
    print(f"imports checked in {seconds:.1f} s; failed: {'; '.join(missing)}{note}")
    sys.exit(11)
print(f"imports checked in {seconds:.1f} s: all there (torch {torch.__version__}, Python "
      f"{sys.version.split()[0]}){note}")
EOF
}

LINE=$(check)
STATUS=$?
[ -z "$LINE" ] && LINE="the import check gave no answer (exit status $STATUS)"
if [ $STATUS -eq 10 ]; then
    echo "$LINE"
    exit 0
fi
say() { echo "$*" | tee -a "$OUT/window.txt"; }
: > "$OUT/window.txt"
say "$LINE"
if [ $STATUS -eq 11 ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl >> "$OUT/window.txt" 2>&1; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            say "installed into /tmp/site: $(cd .whl && echo *.whl)"
        else
            for wheel in "$ROOT"/.whl/*.whl; do PYTHONPATH=$wheel${PYTHONPATH:+:$PYTHONPATH}; done
            export PYTHONPATH
            say "pip failed: importing from the wheel files: $(cd .whl && echo *.whl)"
        fi
        LINE=$(check)
        STATUS=$?
        say "${LINE:-the import check gave no answer (exit status $STATUS)}"
    else
        say "no wheels in .whl/ to install (bash benchmarks/gpu_window.sh --wheels fills it)"
    fi
    [ $STATUS -ne 0 ] && say "going on: what needs the missing modules will fail in the report"
fi
[ $STATUS -eq 3 ] && exit 1
LEFT=$((BUDGET - (SECONDS - START) - 5))
say "acceptance: $LEFT s left of the window's $BUDGET s"
timeout -k 5 "$LEFT" "$PY" -m benchmarks.acceptance --out "$OUT" --seconds $((LEFT - 5)) "$@" \
    2>&1 | tee -a "$OUT/window.txt"
STATUS=${PIPESTATUS[0]}
say "done in $((SECONDS - START)) s, exit status $STATUS"
exit "$STATUS"
