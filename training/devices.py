"""Where this process runs: CPU, one or several GPUs (DataParallel), or a torchrun rank (DDP).

On a CPU it also makes glibc keep freed memory for reuse (keep_freed_memory).

Under torchrun, a dead or missing process must end the others, never leave them waiting: that
is what lets torchrun restart the run. A dead peer breaks gloo's connections at once; setting up
the process group waits at most INIT_TIMEOUT for every process, and a collective at most
COLLECTIVE_TIMEOUT (rank 0 evaluates and writes checkpoints alone at each epoch's end while the
others wait in the next collective, so that one is long). A process whose peer died ends with
one line (LostPeer), not a traceback.
"""

import ctypes
import datetime
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn

from data import DataError
from measure import cpu_name

from .errors import UsageError, one_line


def is_distributed():
    """Whether torchrun started this process."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def world_size_from_env():
    """Processes in this run: torchrun's WORLD_SIZE, else 1."""
    return int(os.environ["WORLD_SIZE"]) if is_distributed() else 1


def _minutes_from_env(name, default):
    value = os.environ.get(name)
    try:
        return datetime.timedelta(minutes=float(value)) if value else default
    except ValueError:
        raise UsageError(f"{name} must be a number of minutes, got {value!r}") from None


INIT_TIMEOUT = datetime.timedelta(minutes=5)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class LostPeer(Exception):
    """Another process of the run died or stopped answering: this one ends (exit status 1)."""

    EXIT_STATUS = 1


def lost_peer(error):
    """LostPeer for a communication failure (a gloo, nccl or store error) under torchrun, else
    None."""
    if not is_distributed():
        return None
    rank, text = os.environ["RANK"], str(error)
    if not (isinstance(error, dist.DistError) or re.search(
            r"gloo|nccl|connection (reset|closed|refused)|timed out|broken pipe", text, re.I)):
        return None
    # gloo: "[.../pair.cc:537] Read error [127.0.0.1]:123: Connection reset by peer. This is
    # typically caused by ..." -> "Read error [127.0.0.1]:123: Connection reset by peer"
    reason = one_line(re.sub(r"^\[[^\]]*\]\s*", "", text)).split(". ")[0][:200]
    return LostPeer(f"rank {rank} lost contact with another process of the run ({reason}); "
                    f"torchrun restarts all processes if --max-restarts allows")


def default_workers():
    """Image-decoding processes per training process: the CPU cores this process may use,
    shared among torchrun's processes on this machine, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def make_deterministic():
    """Bitwise repeatable GPU runs: deterministic kernels only (somewhat slower).

    cuBLAS needs a fixed workspace for that, set before CUDA starts.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory():
    """Make glibc keep freed memory for reuse instead of handing large blocks back to the OS.

    By default glibc gives each large allocation (over a threshold that grows up to 32 MiB) its
    own mapping and unmaps it when it is freed, so every such tensor is page-faulted anew: a
    CPU training step of DenseNet-BC-100 at batch 64 spent about a quarter of its time on that
    (results/cpu-allocator.md). Here blocks under 1 GiB (32 MiB where an older glibc allows no
    more) stay in the heap, and the process keeps its peak memory until it ends. Does nothing
    without glibc, or when the environment sets glibc's malloc itself (MALLOC_SETTINGS).
    Returns whether it applied.
    """
    if any(name in os.environ for name in MALLOC_SETTINGS):
        return False
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (ValueError, OSError, AttributeError):
        return False
    if not glibc:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not any(mallopt(M_MMAP_THRESHOLD, size) for size in (2**30, 2**25)):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2**30))


class Devices:
    """Where this process runs: device, rank and number of processes."""

    def __init__(self, deterministic=False):
        if deterministic:
            make_deterministic()
        self.distributed = is_distributed()
        self.rank = int(os.environ["RANK"]) if self.distributed else 0
        self.world_size = world_size_from_env()
        if torch.cuda.is_available():
            index = int(os.environ["LOCAL_RANK"]) if self.distributed else 0
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
            # Fixed input size: let cuDNN pick the fastest kernels (unless deterministic).
            torch.backends.cudnn.benchmark = not deterministic
        else:
            self.device = torch.device("cpu")
            keep_freed_memory()
        if self.distributed:
            init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.data_parallel = not self.distributed and torch.cuda.device_count() > 1

    @property
    def is_main(self):
        return self.rank == 0

    def describe(self):
        if self.device.type == "cuda":
            count = torch.cuda.device_count() if self.data_parallel else 1
            text = f"{count} x {torch.cuda.get_device_name(self.device)}"
        else:
            text = f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
        if self.distributed:
            text += f", {self.world_size} processes (torchrun, DistributedDataParallel)"
        elif self.data_parallel:
            text += " (DataParallel)"
        return text

    def peak_memory_mb(self):
        """Peak CUDA memory allocated since the last reset, in MiB ('' on a CPU)."""
        if self.device.type != "cuda":
            return ""
        indices = range(torch.cuda.device_count()) if self.data_parallel else [self.device]
        return f"{max(torch.cuda.max_memory_allocated(i) for i in indices) / 2**20:.1f}"

    def reset_peak_memory(self):
        if self.device.type == "cuda":
            indices = range(torch.cuda.device_count()) if self.data_parallel else [self.device]
            for index in indices:
                torch.cuda.reset_peak_memory_stats(index)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def init_process_group(backend):
    """The process group of torchrun's environment, with timeouts (module docstring).

    The store comes from the same env:// rendezvous init_process_group uses, created here so
    that waiting for the other processes has its own, shorter, limit. Both limits can be set in
    minutes by DENSENET_INIT_TIMEOUT and DENSENET_COLLECTIVE_TIMEOUT."""
    init_timeout = _minutes_from_env("DENSENET_INIT_TIMEOUT", INIT_TIMEOUT)
    collective_timeout = _minutes_from_env("DENSENET_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=init_timeout))
    store.set_timeout(init_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=collective_timeout)


def on_all_ranks(step):
    """Run step() here; if it failed with bad input on any process, raise that on every one."""
    try:
        result, error = step(), None
    except (UsageError, DataError) as failure:
        result, error = None, one_line(failure)
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UsageError(error)
    return result


def broadcast(value):
    """Rank 0's value, on every process."""
    if not dist.is_initialized():
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def any_rank(flag, device):
    """Whether flag is true on any process (a collective: every rank must call it)."""
    return any_rank_each([flag], device)[0]


def any_rank_each(flags, device):
    """For each flag, whether it is true on any process: one collective for all of them."""
    if not dist.is_initialized():
        return [bool(flag) for flag in flags]
    values = torch.tensor([int(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def gather(value):
    """Every process's value, in rank order (a collective: every rank must call it)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def rank_seed(seed, rank):
    """The seed of torch's generators in process `rank`: distinct for every rank, so that ranks
    draw different dropout masks; rank 0 keeps --seed itself. Below 2**32, since the CPU
    generator keeps only a seed's low 32 bits; an odd step makes every rank's seed distinct."""
    return (seed + rank * 0x9E3779B9) % 2**32


def autocast(amp, device):
    """The autocast context of --amp (off, bf16, fp16) on device: one code path for all."""
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")


class Autocast(nn.Module):
    """Runs the wrapped model under --amp's autocast.

    DataParallel's worker threads re-enter autocast without its dtype (torch 2.13), so bf16
    would silently become fp16 there: each replica enters the right autocast itself.
    """

    def __init__(self, model, amp):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, inputs):
        with autocast(self.amp, inputs.device):
            return self.model(inputs)


def wrap(model, devices, amp="off"):
    """DistributedDataParallel under torchrun, DataParallel over several GPUs, else as is."""
    if devices.distributed:
        ids = [devices.device.index] if devices.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if devices.data_parallel:
        return nn.DataParallel(Autocast(model, amp) if amp != "off" else model)
    return model
