"""
glibc's allocator tuned for a server whose every request allocates and frees a few MB of image buffers.

By default glibc serves large blocks with fresh `mmap`s and gives freed heap memory back to the kernel, so image
buffers are new memory again and again: about 1,500 page faults per 1024² request (7.2 ms of server CPU instead of
4.0). With these settings the buffers come from memory the process keeps (up to `TRIM_THRESHOLD` of it free), and a
request takes no faults. After a burst, what the heap keeps free between live blocks is given back once the answers
are all sent (`release_free_memory`, called by `image_generation_server.answers`).
"""

import ctypes
import os

from hayhooks import log

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound: blocks below it come from the heap
TRIM_THRESHOLD = 128 * 1024 * 1024  # free memory kept before any is given back
TOP_PAD = 16 * 1024 * 1024  # grow the heap in steps of this much
ENV_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def tune_allocator() -> bool:
    """Apply the settings above, unless the environment sets glibc's own (`MALLOC_*_`) or libc is not glibc."""
    if any(name in os.environ for name in ENV_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left alone
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    applied = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    log.debug("glibc allocator tuned for image buffers: {}", applied)
    return applied


def release_free_memory() -> None:
    """Give the kernel back the free memory glibc keeps, at the heap's top and between live blocks (`malloc_trim`)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator is left alone
        pass
