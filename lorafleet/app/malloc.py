"""Large buffers go back to the operating system when they are freed (glibc's malloc).

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with a mapping
of its own, which ``free`` unmaps at once. By default the threshold then rises to the size of the
largest such block freed (up to 32 MiB on 64-bit), so after the first update body of 10 MB is freed,
payloads and tensors of a few MB come from the heap, which gives memory back only from its top: the
aggregator stayed 60-90 MiB above its working set after a burst of updates, and its peak grew by as
much (tests/integration/test_update_burst.py). Setting the threshold keeps it where it is.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: mallopt's parameter number for the mmap threshold (malloc.h)
M_MMAP_THRESHOLD = -3
#: glibc's own starting value
MMAP_THRESHOLD_BYTES = 128 * 1024
#: a worker process's threshold: MiniLM's per-step activations of 1 MiB and more (hidden states,
#: attention scores, the feed-forward's 1536-wide output) go back to the OS when freed, the many smaller
#: ones stay on the heap. Measured on the issue-19 job (batch 16, one thread): 128 KiB made a step
#: 40-60% slower (an mmap, a munmap and fresh zeroed pages for every activation), 512 KiB 27% slower,
#: 1 MiB as fast as glibc's own sliding threshold, which kept 60-250 MiB more per worker
#: (benchmarks/results/distributed_memory.md).
TRAINING_MMAP_THRESHOLD_BYTES = 1024 * 1024


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes for this process; False where the C library
    has no ``mallopt`` (not glibc) or refuses the value (nothing changes then)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: large buffers are left to its allocator")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> bool:
    """Give the free pages of every glibc arena back to the OS (``malloc_trim(0)``); True if any went
    back, False where there was none or the C library has no ``malloc_trim`` (not glibc).

    A training step's freed activations under the mmap threshold stay in the arenas of the thread that
    trained; a worker that waits between tasks (worker/host_turns.py) need not hold them."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
