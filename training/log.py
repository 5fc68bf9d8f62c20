"""What a run prints: to the terminal or the job's output file, and always to <save>/log.txt.

On a terminal an epoch shows a tqdm bar; without one (a job scheduler's output file), a
progress line every --log_every seconds instead, with the step, images per second, running
loss and error, and the time left in the epoch and in the run.
"""

import datetime
import os
import sys
import time

from tqdm import tqdm

TERMINAL_REFRESH = 0.5  # seconds between bar updates: reading the running loss syncs the GPU


class Log:
    """Prints lines (rank 0 only) and appends them to log.txt once the run folder is known."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.file = None

    def open(self, path):
        if self.enabled:
            self.file = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
            self.file.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S %z')}, PID "
                            f"{os.getpid()}\n")

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def print(self, line, stream=None, echo=True):
        """line on stdout (or stream), flushed, and in log.txt; echo=False: log.txt only."""
        if not self.enabled:
            return
        if echo:
            print(line, file=stream or sys.stdout, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")


def duration(seconds):
    """Seconds as h:mm:ss."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0))))


class Progress:
    """Progress inside one epoch: a tqdm bar on a terminal, else timed lines (and log.txt)."""

    def __init__(self, log, title, total_steps, first_step, log_every, epochs_after):
        self.log, self.title, self.total = log, title, total_steps
        self.first_step, self.log_every = first_step, log_every
        self.epochs_after = epochs_after  # whole epochs still to run after this one
        self.terminal = log.enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=first_step, desc=title, leave=False,
                        disable=not self.terminal, dynamic_ncols=True)
        self.start = time.perf_counter()
        # A bar shows figures from the first step on; timed lines start after log_every.
        self.last_line = -float("inf") if self.terminal else self.start

    def due(self):
        """Whether an update wants the running figures now (reading them syncs the GPU)."""
        if not self.log.enabled:
            return False
        interval = TERMINAL_REFRESH if self.terminal else self.log_every
        return time.perf_counter() - self.last_line >= interval

    def update(self, step, images, loss, error):
        """After step (1-based) of the epoch; images trained in this process since start."""
        now = time.perf_counter()
        elapsed = now - self.start
        rate = images / elapsed if elapsed > 0 else 0.0
        self.last_line = now
        if self.terminal:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", error=f"{error:.3f}", images_s=f"{rate:.0f}")
            return
        per_step = elapsed / max(step - self.first_step, 1)
        left = per_step * (self.total - step)
        run_left = left + per_step * self.total * self.epochs_after
        self.log.print(f"{self.title} step {step}/{self.total} | {rate:.0f} images/s | loss "
                       f"{loss:.4f} error {error:.4f} | left: epoch {duration(left)}, run "
                       f"{duration(run_left)}")

    def close(self):
        self.bar.close()
