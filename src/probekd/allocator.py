"""Keep freed memory in the process instead of returning it to the OS (glibc only).

glibc serves allocations above 32 MB with fresh `mmap`s and unmaps them on free, so every large temporary tensor
pays for page faults again: fitting all layers' probes spent more time in the kernel (page faults) than in
arithmetic (measured: copying a 34 MB tensor took 24 ms this way, 3.5 ms with reuse). The CLI and the benchmarks
call `reuse_freed_memory()` once at start; a library user may too. The price: up to `keep_bytes` of freed memory
stays mapped to the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def reuse_freed_memory(keep_bytes: int = 2**30) -> bool:
    """Serve large allocations from the heap and keep up to `keep_bytes` freed; False where not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, keep_bytes))
    log.debug("glibc mallopt: %s", "set" if ok else "refused")
    return ok
