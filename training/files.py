"""Atomic writes (temporary file, fsync, rename) and checked reads of the run's files."""

import json
import os

import torch

from .errors import UsageError, one_line


def write_atomically(path, write):
    """write(file) into a temporary file in the same folder, fsync it, then rename over path.

    A kill at any moment leaves either the old file or the new one, never a mix.
    """
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def write_json(path, value):
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


def save_torch(path, value):
    write_atomically(path, lambda f: torch.save(value, f))


def read_torch(path, keys):
    """A dict saved by this tool, checked for `keys`; bad files are refused and left alone."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file can raise almost anything while unpickling
        raise UsageError(f"cannot read {path} ({type(error).__name__}: {one_line(error)}); "
                         f"it was left as it is") from None
    if not isinstance(value, dict) or not keys <= value.keys():
        raise UsageError(f"{path} is not a file this tool wrote; it was left as it is")
    return value
