"""A pytest plugin for the GPU acceptance run: every test's outcome, written as it happens.

    DENSENET_LIVE_LOG=tests.jsonl python -m pytest -p benchmarks.pytest_live ...

appends one JSON object per line, flushed at once, so that a run killed at its time limit
still tells what it collected, which test was running, and how every finished test ended
(with the failure's traceback): {"event": "collected", "nodeids", "rootdir"}, {"event":
"collect_error", "nodeid", "longrepr"}, {"event": "start", "nodeid"}, {"event": "report",
"nodeid", "when", "outcome", "seconds", "longrepr", "properties"}. pytest's JUnit XML is written
only at the end of a run, and so is lost with a killed one.

With DENSENET_TEST_LIMIT=S a test that runs longer than S seconds fails (SIGALRM, with every
thread's stack in the log first), so that one hung test does not take its shard's whole time.
With DENSENET_ONLY=FILE only the node ids listed in FILE run (a rerun of what failed; an id
that no longer exists is left out, where pytest would refuse the whole command line).
SIGUSR2 writes every thread's stack to stderr: the acceptance run sends it before it ends a
shard at its limit, so the log shows where it was. Imports no torch.
"""

import faulthandler
import json
import os
import signal
import time

import pytest

_file = None
# The real stderr, taken when pytest imports this plugin (-p), before it captures fd 2.
_stderr = os.fdopen(os.dup(2), "w")


def _write(**entry):
    if _file is not None:
        _file.write(json.dumps(entry, default=str) + "\n")
        _file.flush()


def pytest_configure(config):
    global _file
    path = os.environ.get("DENSENET_LIVE_LOG")
    if path and _file is None:
        _file = open(path, "a")  # noqa: SIM115 (open for the whole session)
    faulthandler.register(signal.SIGUSR2, file=_stderr, all_threads=True)


def pytest_unconfigure(config):
    global _file
    if _file is not None:
        _file.close()
        _file = None
# The real stderr, taken when pytest imports this plugin (-p), before it captures fd 2.
_stderr = os.fdopen(os.dup(2), "w")


def pytest_collectreport(report):
    if report.failed:
        _write(event="collect_error", nodeid=report.nodeid or "(session)",
               longrepr=str(report.longrepr))


def pytest_collection_modifyitems(session, config, items):
    """With DENSENET_ONLY=FILE (node ids, one a line), run only those tests."""
    path = os.environ.get("DENSENET_ONLY")
    if not path:
        return
    with open(path) as file:
        wanted = set(file.read().split("\n")) - {""}
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in wanted])
    items[:] = [item for item in items if item.nodeid in wanted]


def pytest_collection_finish(session):
    _write(event="collected", nodeids=[item.nodeid for item in session.items],
           rootdir=str(session.config.rootpath))


class TestTookTooLong(Exception):
    """A test ran past DENSENET_TEST_LIMIT seconds."""


def _alarm(signum, frame):
    raise TestTookTooLong(f"the test ran past DENSENET_TEST_LIMIT="
                          f"{os.environ.get('DENSENET_TEST_LIMIT')} s (every thread's stack "
                          "is in the log above)")


@pytest.hookimpl(hookwrapper=True)  # the old style: any pytest the GPU machine has
def pytest_runtest_protocol(item, nextitem):
    _write(event="start", nodeid=item.nodeid, time=time.time())
    limit = float(os.environ.get("DENSENET_TEST_LIMIT") or 0)
    if limit > 0:
        faulthandler.dump_traceback_later(max(limit - 1, 1), exit=False, file=_stderr)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        if limit > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            faulthandler.cancel_dump_traceback_later()


def pytest_runtest_logreport(report):
    entry = dict(event="report", nodeid=report.nodeid, when=report.when,
                 outcome=report.outcome, seconds=round(report.duration, 3))
    if report.failed:
        entry["longrepr"] = str(report.longrepr)
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["longrepr"] = report.longrepr[2]  # the skip's reason
    if report.user_properties:
        entry["properties"] = dict(report.user_properties)
    _write(**entry)
