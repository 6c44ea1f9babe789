"""Memory behaviour of large temporary tensors, and the peak memory a step reports."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def heap_reuse() -> Iterator[None]:
    """Keep large freed blocks in the heap for reuse while the block runs (glibc; elsewhere a no-op).

    Diffusion and correction allocate ``(pairs x genes)`` temporaries of hundreds of MB afresh. glibc
    serves blocks above 32 MB by ``mmap`` and unmaps them on release, so the kernel zeroes every page again
    for the next batch: those page faults cost several times the arithmetic. The default settings are
    restored and the heap trimmed afterwards.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(m_mmap_max, 65536)
        mallopt(m_trim_threshold, 128 * 1024)
        release_free_memory()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``, which also releases free pages
    inside the heap, not only at its top; elsewhere a no-op).

    Under :func:`heap_reuse` the temporaries of one batch of genes are freed among the arrays kept from it
    (on Visium HD, the kernels the low-rank model needs), and the heap would keep every such hole resident.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def peak_rss_mb() -> float:
    """Peak resident memory in MiB (2**20 bytes) of this process, or of its largest finished child process if
    larger.

    The process's own peak is ``VmHWM``, which (unlike ``ru_maxrss``) starts afresh at ``exec``, so a process
    started from a large parent reports its own peak. Children count once waited for: the report's notebook
    kernel runs in one. The function imports what it needs itself, so that ``benchmarks/previous.py`` can
    copy its source into the scripts that run earlier versions of the package.
    """
    import resource
    import sys
    from pathlib import Path

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / per_mb)
