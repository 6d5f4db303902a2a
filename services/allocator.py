"""glibc malloc settings for a process that moves megabyte-sized gRPC messages."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_message_buffers(mmap_threshold: int = 8 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Serve message buffers (1 MiB chunks, images) from the heap and keep up to `trim_threshold` bytes of it.

    By default glibc hands out each buffer over 128 KiB from a fresh mmap or a heap top it has just trimmed, so
    every message pays page faults and the kernel's zero-fill. Process-wide; call it once at startup. Returns False
    where the C library is not glibc (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
