"""Process-wide settings for CPU training that are not the library's to change on import.

:func:`retain_freed_memory` is called by ``train/pretrain.py`` (``--no-retain-memory`` turns it off)
and by the benchmarks for every provider alike. It only affects the speed of allocation, never a
result.
"""

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit.
MAX_MMAP_THRESHOLD = 32 << 20

_applied = None


def retain_freed_memory(trim_threshold=256 << 20, mmap_threshold=MAX_MMAP_THRESHOLD):
    """Keep memory that a training step frees inside the process for the next step (glibc only).

    glibc's malloc returns freed memory to the kernel when more than ``M_TRIM_THRESHOLD`` bytes are
    free at the top of the heap, and serves blocks over ``M_MMAP_THRESHOLD`` with fresh mappings that
    ``free`` unmaps. A training step frees its activations in the backward and allocates them again in
    the next forward, so by default much of that memory is mapped anew every step, and every 4 KiB page
    of it costs a page fault (zero-filled by the kernel) on its first write: measured here, ~5000-7000
    faults and ~7 ms of a 46 ms CPU bf16 step (the reference MAE's step loses as much). This keeps up
    to ``trim_threshold`` bytes of free heap in the process and serves blocks up to ``mmap_threshold``
    from the heap (the same effect as ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` in the
    environment, or an allocator such as jemalloc preloaded): the process's resident memory then stays
    near its peak instead of following each step's rise and fall.

    Returns True where the settings were applied, False elsewhere (not Linux with glibc): there it does
    nothing. Idempotent; the first call's values stay.
    """
    global _applied
    if _applied is not None:
        return _applied
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold must be in (0, {MAX_MMAP_THRESHOLD}], got {mmap_threshold}")
    if not 0 < trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in (0, 2**31), got {trim_threshold}")
    _applied = False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return _applied
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        # The mmap threshold first: setting either disables glibc's dynamic adjustment of both.
        _applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _applied
