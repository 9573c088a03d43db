"""Long-lived buffers on small pages (`infra.memory`)."""

from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from infra import memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="small pages are asked of Linux only")


def _mapping(address: int) -> dict[str, str] | None:
    """The entry of /proc/self/smaps whose range holds `address` (its fields by name), or None."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line: "start-end perms ..."
            start, end = (int(x, 16) for x in head[0].split("-"))
            if entry is not None:
                return entry
            entry = {} if start <= address < end else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry


def test_an_empty_array_has_the_shape_and_dtype_asked_and_is_writable():
    a = memory.empty((3, 4, 5), np.uint16)
    assert a.shape == (3, 4, 5) and a.dtype == np.uint16 and a.flags.writeable and a.flags.c_contiguous
    a[...] = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    assert int(a.sum()) == sum(range(60))
    assert memory.empty(7, "float32").shape == (7,)
    assert memory.empty((0, 3), np.float32).shape == (0, 3)


@linux_only
def test_a_large_array_is_backed_by_small_pages_even_where_numpy_would_ask_for_huge_ones():
    nbytes = 16 * 2**20  # numpy madvises huge pages from 4 MiB
    a = memory.empty(nbytes // 4, np.float32)
    a[...] = 1.0  # every page faulted in
    mapping = _mapping(a.ctypes.data)
    assert mapping is not None
    assert "nh" in mapping["VmFlags"].split()  # MADV_NOHUGEPAGE
    assert mapping["AnonHugePages"] == "0 kB"
    assert int(mapping["Rss"].split()[0]) * 1024 >= nbytes


@linux_only
def test_an_arrays_memory_is_given_back_with_it():
    a = memory.empty(8 * mmap.PAGESIZE, np.uint8)
    view = a[: mmap.PAGESIZE]
    address = a.ctypes.data
    del a
    gc.collect()
    assert _mapping(address) is not None  # a view keeps it
    del view
    gc.collect()
    assert _mapping(address) is None
