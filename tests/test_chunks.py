"""Whole chunks written straight to their files (`infra.chunks`): the bytes zarr writes, past the page cache."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from region_helpers import accepts_o_direct, file_bytes, pages_cached
from zarr.codecs import BloscCodec, ZstdCodec

from infra import chunks

BLOSC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _array(path: Path, shape: tuple[int, ...], dtype: str, fill: float, compressors=(BLOSC,)) -> zarr.Array:
    chunk_shape = (*shape[:-2], 32, 32)  # whole along the leading axes, as a cube's
    return zarr.create_array(
        path, shape=shape, chunks=chunk_shape, dtype=dtype, fill_value=fill, compressors=compressors, zarr_format=3
    )


def _write_all(writer: chunks.DirectChunks, data: np.ndarray) -> None:
    """Every chunk of `data` (rows and columns of 32, the last ones cut by the edge) through `writer`."""
    for r in range(-(-data.shape[-2] // 32)):
        for c in range(-(-data.shape[-1] // 32)):
            part = data[..., r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
            writer.write((0,) * (data.ndim - 2) + (r, c), part)


@pytest.fixture
def group_writable():
    """A umask that lets the group write (as on shared project folders): new files' modes show it."""
    before = os.umask(0o002)
    yield
    os.umask(before)


@pytest.mark.parametrize(("dtype", "fill"), [("uint16", 65535), ("float32", np.nan)])
def test_chunks_hold_the_bytes_zarr_writes_and_skip_the_page_cache(tmp_path, dtype, fill, group_writable):
    rng = np.random.default_rng(0)
    data = (rng.random((3, 2, 70, 50)) * 3000).astype(dtype)  # edge chunks of 6 rows and 18 columns
    by_zarr = _array(tmp_path / "zarr.zarr", data.shape, dtype, fill)
    by_zarr[...] = data
    direct = _array(tmp_path / "direct.zarr", data.shape, dtype, fill)
    writer = chunks.direct_chunks(direct)
    assert writer is not None
    strided = np.repeat(data, 2, axis=-1)[..., ::2]  # every other column of a wider array: copied first
    assert not strided.flags.c_contiguous
    _write_all(writer, strided)
    files = [p for p in (tmp_path / "direct.zarr" / "c").rglob("*") if p.is_file()]
    assert len(files) == 3 * 2 and not list((tmp_path / "direct.zarr").rglob("*.partial"))  # no scratch left
    if accepts_o_direct(tmp_path):  # written with O_DIRECT (a disk's file system, not tmpfs): none of it cached
        assert writer._direct and sum(pages_cached(p)[0] for p in files) == 0
    by_zarr_files = [p for p in (tmp_path / "zarr.zarr" / "c").rglob("*") if p.is_file()]
    assert {p.stat().st_mode for p in files} == {p.stat().st_mode for p in by_zarr_files}  # permissions alike
    assert file_bytes(tmp_path / "direct.zarr") == file_bytes(tmp_path / "zarr.zarr")
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "direct.zarr")[...], data)


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_file_system_without_o_direct_gets_the_same_chunks_through_the_page_cache(tmp_path, monkeypatch, refused_at):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this system has no O_DIRECT")
    data = np.arange(2 * 64 * 40, dtype="uint16").reshape(2, 64, 40)
    by_zarr = _array(tmp_path / "zarr.zarr", data.shape, "uint16", 65535)
    by_zarr[...] = data
    opened = []
    real_open = os.open

    def refuse_o_direct(path, flags, *args):
        opened.append(flags)
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    def refuse_the_write(fd, data):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(chunks.os, "open", refuse_o_direct)
    if refused_at == "write":
        monkeypatch.setattr(chunks.os, "write", refuse_the_write)
    writer = chunks.direct_chunks(_array(tmp_path / "direct.zarr", data.shape, "uint16", 65535))
    _write_all(writer, data)
    assert file_bytes(tmp_path / "direct.zarr") == file_bytes(tmp_path / "zarr.zarr")
    assert len(opened) == 1 and not writer._direct  # refused once, then not asked again


def test_only_local_arrays_of_bytes_then_blosc_are_written_directly(tmp_path):
    shape = (2, 64, 64)
    assert chunks.direct_chunks(_array(tmp_path / "blosc.zarr", shape, "uint16", 0)) is not None
    assert chunks.direct_chunks(_array(tmp_path / "zstd.zarr", shape, "uint16", 0, (ZstdCodec(),))) is None
    assert chunks.direct_chunks(_array(tmp_path / "raw.zarr", shape, "uint16", 0, ())) is None
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, chunks=(2, 32, 32), dtype="uint16")
    assert chunks.direct_chunks(in_memory) is None


def test_a_failed_write_names_the_chunk_and_leaves_no_scratch_file(tmp_path, monkeypatch):
    writer = chunks.direct_chunks(_array(tmp_path / "a.zarr", (2, 32, 32), "uint16", 0))

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chunks.os, "write", full_disk)
    with pytest.raises(OSError, match=r"No space left on device: '.*a\.zarr/c/0/0/0'"):
        writer.write((0, 0, 0), np.zeros((2, 32, 32), np.uint16))
    assert not [p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
