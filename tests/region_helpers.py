"""Helpers of the tests that read region folders (the layout `tasks/sample_region.py` writes), compare stores and
look at how they were written (the page cache, `O_DIRECT`)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from datetime import date
from pathlib import Path

import numpy as np

from infra.stac_api import read_items


def region_items(region_dir: Path, collection: str = "sentinel-2-l2a") -> list[dict]:
    """The STAC items of `collection` in a region folder (`items/<collection>.ndjson`)."""
    return read_items(region_dir / "items" / f"{collection}.ndjson")


def region_season(region_dir: Path) -> tuple[dict, date, date]:
    """`region.json` of a region folder and its season's first and last day."""
    meta = json.loads((region_dir / "region.json").read_text())
    start, end = (date.fromisoformat(d) for d in meta["season"])
    return meta, start, end


def pages_cached(path: Path) -> tuple[int, int]:
    """How many of `path`'s pages are in the page cache (`mincore` of a mapping of it), of how many."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * pages)()
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        address = np.frombuffer(mapped, np.uint8).ctypes.data
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec), pages


def accepts_o_direct(folder: Path) -> bool:
    """Whether files in `folder` can be opened with `O_DIRECT` (a disk's file system; not tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(folder / ".o_direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    (folder / ".o_direct").unlink()
    return True


def file_bytes(folder: Path) -> dict[str, bytes]:
    """The bytes of every file under `folder`, by path relative to it: equal for identical trees (stores, regions)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Reflectance is stored in steps of 1e-4 from -0.2 (`tasks.cube.REFLECTANCE_PACKING`): what a cube reads back is
# within half a step of what was computed, plus float32 rounding.
STORED_ATOL = 0.5e-4 + 1e-6


def _steps(values: np.ndarray) -> np.ndarray:
    """Reflectance `values` rounded (in float64, half to even) to steps of 1e-4 from -0.2, NaN as step 2000 (0.0).
    Written out here rather than taken from cropflow, so that the tests check the packing too."""
    return np.rint((np.where(np.isnan(values), 0, values).astype(np.float64) + 0.2) / 1e-4)


def packed(values: np.ndarray) -> np.ndarray:
    """Reflectance `values` as the integers a cube stores: `_steps`, clipped to 0..65534, 65535 where NaN."""
    values = np.asarray(values)
    return np.where(np.isnan(values), 65535, np.clip(_steps(values), 0, 65534)).astype(np.uint16)


def as_stored(values: np.ndarray) -> np.ndarray:
    """Reflectance `values` as a cube stores them and `infra.storage.open_zarr` reads them back: `_steps`, decoded in
    float32; NaN kept."""
    values = np.asarray(values)
    steps = _steps(values)
    return np.where(
        np.isnan(values), np.float32(np.nan), steps.astype(np.float32) * np.float32(1e-4) + np.float32(-0.2)
    )
