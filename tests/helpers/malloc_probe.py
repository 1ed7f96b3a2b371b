"""train_ddp.py (or, with --setting-only as the only argument, just the setting it makes on FSDP ranks),
then a probe of glibc's mmap threshold in the same process, for tests/test_malloc.py.

The last line printed is "mapped" if a 1 MiB allocation made after a 16 MiB block was freed is a
mapping of its own (returned to the system when freed: the threshold stayed at or below 1 MiB), or
"heap" if glibc's heap serves it (the free raised the threshold, as glibc's default does, or the
user fixed it higher).
"""

import ctypes
import sys


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def threshold_probe() -> str:
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    libc.free(libc.malloc(16 << 20))  # glibc's default raises its threshold to this block's size when it is freed
    before = libc.mallinfo2().hblkhd  # bytes in mappings of their own
    block = libc.malloc(1 << 20)
    mapped = libc.mallinfo2().hblkhd - before >= 1 << 20
    libc.free(block)
    return "mapped" if mapped else "heap"


if __name__ == "__main__":
    if sys.argv[1:] == ["--setting-only"]:
        from utils.malloc import return_freed_memory

        return_freed_memory()
        code = 0
    else:
        import train_ddp

        code = train_ddp.main()
    # One write: with PYTHONUNBUFFERED print sends the line and its newline apart, and two ranks' lines interleave
    sys.stdout.write(threshold_probe() + "\n")
    sys.exit(code)
