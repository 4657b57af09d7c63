"""Memory of long runs: handing freed heap back to the system.

A process that decodes photos in several threads for hours (`facegender serve`, `predict` over a big
folder) keeps memory it no longer uses: glibc gives each thread its own malloc arena and keeps freed
blocks in it. Under 16 server clients RSS climbed to a 500 MiB plateau that way
(benchmarks/serve_soak.py). `limit_heap_arenas` caps the arenas (serve calls it at start-up) and
`release_heap` trims the heap (serve after each request, predict every few batches); see
docs/serving.md, "Memory under load". Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import functools

#: mallopt's M_ARENA_MAX parameter (glibc malloc.h).
_M_ARENA_MAX = -8
#: malloc arenas of the server process: enough for the event loop and the inference threads.
SERVE_MALLOC_ARENAS = 2


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library of this process when it is glibc (it has malloc_trim and mallopt), else None.
    `CDLL(None)` is the process's own symbols: no library search, no subprocess."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_heap_arenas(arenas: int = SERVE_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before the worker threads start); False where not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_ARENA_MAX, int(arenas)))


def release_heap() -> bool:
    """Return freed heap memory to the system (glibc `malloc_trim`); False where not glibc or when
    there was nothing to return."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
