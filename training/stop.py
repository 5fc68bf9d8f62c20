"""Preemption: SIGTERM, SIGINT or SIGUSR1 asks the run to stop after the current step.

Job schedulers send SIGTERM (Slurm can be told to send SIGUSR1) a little before a job's time
limit. The handler only records the request; the training loop finishes its step, writes a
complete checkpoint that records the position in the epoch, and exits with 128 + the signal's
number (143 for SIGTERM), the status a process killed by that signal would have. Later signals
while stopping are recorded and ignored, so they cannot interrupt the checkpoint being written.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """The first stop signal received since install(), or None."""

    def __init__(self):
        self.signal = None

    def install(self):
        for number in SIGNALS:
            signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal is None:
            self.signal = number

    @property
    def requested(self):
        return self.signal is not None

    @property
    def name(self):
        return signal.Signals(self.signal).name if self.requested else None

    @property
    def exit_status(self):
        return 128 + self.signal if self.requested else None


class Stopped(Exception):
    """Raised after the stop checkpoint is written; carries the exit status."""

    DEFAULT_STATUS = 128 + signal.SIGTERM

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status
