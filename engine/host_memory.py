"""Reuse of freed host memory during a CPU run (Linux with glibc).

glibc's ``malloc`` serves each request above its mmap threshold (32 MiB at most) with fresh pages
from the kernel, and ``free`` gives them straight back. A CPU run of Mask R-CNN allocates and
frees many such blocks: convolution outputs and oneDNN's reorder buffers at the P2 level are
62 MiB per 800x1216 image. The first touch of each fresh 4 KiB page is a page fault, with the
page zeroed by the kernel. One fp32 run of four photographs took about 2.1 million faults (8 GiB
of fresh pages), 13-15 % of its time on the 2-core machine of BENCHMARKS.md.

:func:`reusing_freed_memory` makes ``malloc`` take those blocks from its heap while a run is on
(``mallopt(M_MMAP_MAX, 0)``) and keep freed memory there (``M_TRIM_THRESHOLD``), so the next block
of a size reuses pages already touched. When the last run ends it restores mmap for large blocks
and hands the free heap back to the system (``malloc_trim(0)``). This is what the environment
variables ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``, or the jemalloc / tcmalloc that
PyTorch's CPU performance guide recommends, do for a whole process, limited to the run.

Price: while a run is on, the heap holds the freed blocks, about 0.5 GiB more peak resident
memory for an fp32 batch of four 800x1216 photographs (BENCHMARKS.md).

Side effect, for the process: any ``mallopt`` call ends glibc's dynamic adjustment of the mmap
threshold, which stays at the value it had reached. Elsewhere (not glibc, not Linux) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's default
_RESTORED_TRIM_THRESHOLD = 64 << 20  # twice the largest mmap threshold: where glibc's dynamic rule ends up
_KEEP_EVERYTHING = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap

_lock = threading.Lock()
_active = 0


def _load_glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_glibc = _load_glibc()


def available() -> bool:
    """Whether :func:`reusing_freed_memory` changes anything here (Linux with glibc)."""
    return _glibc is not None


@contextlib.contextmanager
def reusing_freed_memory():
    """Inside: freed large blocks stay in ``malloc``'s heap and are reused (see the module).

    Nests and may be entered from several threads: the settings change when the first user
    enters and are restored when the last one leaves.
    """
    global _active
    if _glibc is None:
        yield
        return
    with _lock:
        if _active == 0:
            _glibc.mallopt(_M_MMAP_MAX, 0)
            _glibc.mallopt(_M_TRIM_THRESHOLD, _KEEP_EVERYTHING)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _glibc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _glibc.mallopt(_M_TRIM_THRESHOLD, _RESTORED_TRIM_THRESHOLD)
                _glibc.malloc_trim(0)
