"""Where this process runs: CPU, one or several GPUs (DataParallel), or a torchrun rank (DDP).

On a CPU it also makes glibc keep freed memory for reuse (keep_freed_memory).
"""

import ctypes
import os

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
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
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
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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
