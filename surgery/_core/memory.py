"""Handing freed heap memory back to the operating system between calibration batches."""

from __future__ import annotations

import ctypes
import functools
from typing import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each batch allocates and frees large temporaries of many sizes; glibc raises its mmap
    threshold after such frees and then serves them from a heap that fragments and keeps
    growing (resnet50d: +0.4 GB of peak RSS over the 256 images). Trimming once per batch
    costs milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
