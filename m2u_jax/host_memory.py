"""Keep freed host memory in the process: glibc's malloc tuned for XLA's CPU backend.

Every step of a CPU training run, XLA's CPU runtime (the Eigen convolutions' packing buffers,
the thunks' temporaries) allocates and frees blocks of tens of megabytes from several threads.
With glibc's defaults those blocks go back to the kernel when freed: a block above the mmap
threshold (at most 32 MiB) is its own mapping, and each thread's arena trims its heap. The next
step faults the same memory back in, page by zeroed page: about 115,000 minor faults per
`configs/cpu_real.py` step on the 2-core development machine, a third of a core spent in the
kernel (docs/performance.md, "Host memory"). `keep_freed_memory()` sets three `mallopt`
parameters so freed blocks stay in the process for the next step: one arena (the threads share
the main heap), no separate mappings for large blocks, no trimming of the heap's top.

The cost is that the process keeps its peak heap until it exits, which a training or evaluation
run reaches again every step anyway. Call it first thing in a program's entry point, before
JAX or TensorFlow start their threads: a thread keeps the arena it was given. It is the entry
points' choice (train.py, eval.py, the study tools); importing the library changes nothing.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest value mallopt takes (an int): the heap's top is never given back in practice.
_NEVER_TRIM = 2**31 - 1

# `M2U_HOST_MALLOC=system` leaves glibc's defaults (to compare, or for a process that must give
# memory back while it runs).
ENV_VAR = "M2U_HOST_MALLOC"

_kept = False  # whether this process's malloc keeps freed memory (set once, process-wide)


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory (see the module docstring); True if set, False
    where the C library is not glibc (mallopt absent), a setting was refused, or
    `M2U_HOST_MALLOC=system`."""
    global _kept
    if os.environ.get(ENV_VAR, "").strip().lower() == "system":
        return False
    try:
        # The process's own symbols (libc's, or a preloaded allocator's): no library search,
        # which would run `ldconfig -p` in a subprocess at start-up.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt: musl, macOS; Windows
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error; all three are needed (measured: without the
    # single arena the per-thread heaps still give their memory back).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    _kept = all([mallopt(parameter, value) == 1 for parameter, value in settings])
    return _kept


def kept() -> bool:
    """Whether `keep_freed_memory()` has set this process's malloc (the benchmark records it)."""
    return _kept
