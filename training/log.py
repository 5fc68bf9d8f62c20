"""What a run prints: to the terminal or the job's output file, and always to <save>/log.txt.

On a terminal an epoch shows a tqdm bar; where tqdm cannot draw one (a job scheduler's output
file, or a pseudo-terminal of width 0 as some CI runners and job wrappers make), a progress line
every --log_every seconds instead, with the step, images per second, running loss and error,
and the time left in the epoch and in the run. On a CPU, where a run may take days, one line
after the first few steps says how long an epoch and the rest of the run will take.
"""

import datetime
import os
import sys
import time

from tqdm import tqdm

TERMINAL_REFRESH = 0.5  # seconds between bar updates: reading the running loss syncs the GPU
ESTIMATE_STEPS = 3  # steps timed for the first estimate, after one that warms up


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


def plural(count, word):
    """'1 epoch', '2 epochs'."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def can_draw(stream):
    """Whether tqdm can draw a bar on stream: a terminal that has a width (in a pseudo-terminal
    of size 0x0 tqdm prints nothing at all)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


class Progress:
    """Progress inside one epoch: a tqdm bar on a terminal, else timed lines (and log.txt)."""

    def __init__(self, log, title, total_steps, first_step, log_every, epochs_after,
                 estimate=False):
        self.log, self.title, self.total = log, title, total_steps
        self.first_step, self.log_every = first_step, log_every
        self.epochs_after = epochs_after  # whole epochs still to run after this one
        self.terminal = log.enabled and can_draw(sys.stderr)
        # estimate: time the first steps and print how long the epoch and the run will take.
        self.estimate = estimate and log.enabled and total_steps - first_step > 1
        self.warm = None  # (time, step) once the first step is done
        self.bar = tqdm(total=total_steps, initial=first_step, desc=title, leave=False,
                        disable=not self.terminal, dynamic_ncols=True)
        self.start = time.perf_counter()
        # A bar shows figures from the first step on; timed lines start after log_every.
        self.last_line = -float("inf") if self.terminal else self.start

    def due(self):
        """Whether an update wants the running figures now (reading them syncs the GPU)."""
        if not self.log.enabled:
            return False
        return self.estimate or time.perf_counter() - self.last_line >= self.interval()

    def interval(self):
        return TERMINAL_REFRESH if self.terminal else self.log_every

    def update(self, step, images, loss, error):
        """After step (1-based) of the epoch; images trained in this process since start."""
        now = time.perf_counter()
        if self.estimate:
            self.print_estimate(step, now)
            if now - self.last_line < self.interval():
                return
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

    def print_estimate(self, step, now):
        """The first step warms up (memory, kernels); after ESTIMATE_STEPS more (or at the
        epoch's end), one line with the time per epoch and to the end of the run."""
        if self.warm is None:
            self.warm = (now, step)
            return
        timed = step - self.warm[1]
        if timed < ESTIMATE_STEPS and step < self.total:
            return
        self.estimate = False
        per_step = (now - self.warm[0]) / timed
        left = per_step * (self.total - step + self.total * self.epochs_after)
        line = (f"estimate {duration(per_step * self.total)} per epoch, {duration(left)} to the "
                f"end of the run (training steps, timed over steps {self.warm[1] + 1}-{step})")
        with tqdm.external_write_mode(file=sys.stdout):
            self.log.print(line)
        if not self.terminal:
            self.last_line = now

    def close(self):
        self.bar.close()
