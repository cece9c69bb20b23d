"""Handing freed memory back to the operating system.

glibc keeps memory that Python and torch have freed in its heap for reuse, and returns little of it: after a
float32 pass over a bfloat16 model the process stays hundreds of megabytes above what it holds. Trimming the heap
at the points where a phase ends (a block pruned, a peak-memory window opened) makes resident memory, and so the
peak, follow what is live.
"""
import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Return the C heap's free memory to the operating system (glibc's malloc_trim); elsewhere a no-op."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
