"""Long-lived buffers on the system's small pages.

numpy asks Linux for transparent huge pages for every array of 4 MiB or more (`madvise(MADV_HUGEPAGE)`). On a
virtual machine whose balloon reports free memory to its host (virtio-balloon free page reporting, which hands back
free blocks of 2 MiB and more), a fresh huge page is carved from such a block: its first write faults the whole
2 MiB back in from the host. A cube build's block buffers, written once each, spent 1.3 CPU-s of a 2048 px build
(18 CPU-s) in those faults; on small pages, which come from memory the guest still holds, the build took 0.4-0.8 s
less wall time (measured: docs/benchmarks.md). Buffers a program fills once and reuses gain little from huge pages
anywhere, so `empty` never asks for them.
"""

from __future__ import annotations

import math
import mmap

import numpy as np


def empty(shape: tuple[int, ...] | int, dtype: np.typing.DTypeLike) -> np.ndarray:
    """An uninitialised, writable array like `np.empty`'s, in anonymous memory of its own that the system backs
    with small pages (where it can be told: Linux); freed with the array."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty(shape, dtype)
    buffer = mmap.mmap(-1, count * dtype.itemsize)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count).reshape(shape)
