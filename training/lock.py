"""One writer per run folder: an advisory lock on <save>/.lock, held for the process's life.

The operating system releases the lock when the process ends, however it ends, so a SIGKILL
leaves nothing stale. fcntl rather than the filelock package: filelock truncates the lock file on
every attempt, which would erase the holder's PID and host that a refused process reports.
"""

import fcntl
import os
import socket

from .errors import UsageError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on a run folder, taken at once or refused with the holder named."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None

    def acquire(self):
        """Take the lock; UsageError naming the holder when another process has it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UsageError(f"cannot create {self.path}: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{os.path.dirname(self.path)} is in use by {holder}; one process "
                             f"at a time may write a run (wait for it, or stop it)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self, remove=False):
        """Give the lock back (the OS does it anyway at exit), emptied of this process's PID;
        remove the file if asked (only with the folder it is in).

        Emptied rather than removed: another process may have the file open, about to lock it;
        removing it would let a third one lock a new .lock beside it at the same time."""
        if self.fd is None:
            return
        if remove:
            os.unlink(self.path)
        else:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None
