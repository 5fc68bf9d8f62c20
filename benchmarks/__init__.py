"""The measurements behind benchmark.py, one kind per module.

    common.py       implementations, configurations, fresh processes, device names
    compare.py      saved bytes, peak memory, step time, largest batch, deepest network
    cpu_search.py   what really trains within a memory budget on a CPU
    model_check.py  models/memory.py against CPU measurements
    tools.py        torch.compile, operator counts, gradient accuracy (CPU)
    allocator.py    CPU steps with glibc's default allocator and with freed memory kept
    acceptance.py   the GPU acceptance run: CUDA tests, memory, times, search, one report
    gpu_measure.py  its measuring processes; pytest_live.py: its pytest plugin
    gpu_window.sh   the acceptance in one call on a bare GPU machine
"""
