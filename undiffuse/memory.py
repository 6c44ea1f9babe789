"""Memory behaviour of large temporary tensors."""

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
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
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
        malloc_trim(0)
