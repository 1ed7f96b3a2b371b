"""What glibc's malloc keeps of the memory FSDP frees on CPU ranks: set once, when the process group starts.

glibc serves a request of at least its mmap threshold (128 KiB at first) with a mapping of its own,
unmapped when freed, but raises the threshold to the size of each such block freed (up to 32 MiB):
after the first large free, later blocks of that size come from its heaps, where freed memory stays
resident. FSDP gathers and frees each block's weights and gradients in every step, and glibc's default
kept 300-500 MiB per rank of them on a 151M model on 4 ranks (docs/benchmarks.md). Fixing the threshold,
as MALLOC_MMAP_THRESHOLD_=131072 does, turns the rise off. The price is CPU time: every large tensor is
fresh pages the kernel must zero, 25-33% of a CPU step measured; so one process and DDP, where glibc
keeps 2-9% more, stay on glibc's default. Other C libraries have no mallopt, or one that does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
RETURN_FREED_ABOVE = 128 * 1024  # bytes: glibc's own starting threshold


def return_freed_memory() -> bool:
    """Have glibc give every allocation of RETURN_FREED_ABOVE bytes or more back to the system when freed;
    whether the setting was made. A threshold the user chose (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES'
    glibc.malloc.mmap_threshold, read by glibc at start) is left as it is."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except (OSError, TypeError):  # Windows has no handle for "this process" (TypeError)
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, RETURN_FREED_ABOVE) == 1
