"""Whole chunks of a local Zarr v3 array written straight to their files, past the page cache.

Zarr writes a chunk through its codecs into a new buffer, then through the page cache into the file. For a long
stream of large chunks (a cube build) both cost fresh memory at every chunk: on a VM that hands freed memory back to
its host, the system's share of a 2048 px build (copying chunks into the page cache, zeroing the codec's output
pages, writing them back to disk) was a fifth of its CPU. `DirectChunks` encodes a chunk with the array's own Blosc
codec (the c-blosc that numcodecs ships, so the bytes are those zarr writes) into one reused page-aligned buffer, and
writes it with `O_DIRECT`; where the file system refuses `O_DIRECT` (tmpfs), through the page cache. Each chunk goes
to a scratch file renamed over the chunk's, as zarr does.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import sys
import uuid
from pathlib import Path

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.storage import LocalStore

from infra import memory

ALIGN = 4096  # what `O_DIRECT` needs of a buffer's address and length (a page; the disk's block size divides it)
BLOSC_MAX_OVERHEAD = 16  # c-blosc's header: an encoded chunk is at most this much larger than its data
SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@functools.cache
def _blosc_compress() -> ctypes._CFuncPtr | None:
    """`blosc_compress_ctx` of the c-blosc inside numcodecs (the one zarr's `BloscCodec` encodes with), or None when
    that build does not export it."""
    try:
        function = ctypes.CDLL(numcodecs.blosc.__file__).blosc_compress_ctx
    except (OSError, AttributeError):
        return None
    integer, size, pointer = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
    # clevel, doshuffle, typesize, nbytes, src, dest, destsize, compressor, blocksize, numinternalthreads
    function.argtypes = [integer, integer, size, size, pointer, pointer, size, ctypes.c_char_p, size, integer]
    function.restype = integer
    return function


class DirectChunks:
    """Writes whole chunks of a local Zarr v3 array (bytes, then Blosc) straight to their files (`direct_chunks`).

    Used by one thread at a time: the buffers are reused from chunk to chunk."""

    def __init__(self, array: zarr.Array, root: Path, compress: ctypes._CFuncPtr) -> None:
        self.array, self.root, self._compress, self._blosc = array, root, compress, array.metadata.codecs[1]
        # a chunk cut by the array's edge, strided or of another dtype is copied here first (filled beyond the edge)
        self._chunk = memory.empty(array.chunks, array.dtype)
        self._out = mmap.mmap(-1, -(-(self._chunk.nbytes + BLOSC_MAX_OVERHEAD) // ALIGN) * ALIGN)  # page-aligned
        self._direct = hasattr(os, "O_DIRECT")

    def write(self, coords: tuple[int, ...], data: np.ndarray) -> None:
        """Write `data`, the part of chunk `coords` (chunk indices) inside the array, as that chunk's file."""
        if data.shape != self._chunk.shape or data.dtype != self._chunk.dtype or not data.flags.c_contiguous:
            self._chunk[...] = self.array.metadata.fill_value  # zarr stores edge chunks whole, filled beyond the edge
            self._chunk[tuple(slice(0, n) for n in data.shape)] = data
            data = self._chunk
        blosc, address = self._blosc, ctypes.addressof(ctypes.c_char.from_buffer(self._out))
        size = self._compress(
            blosc.clevel, SHUFFLES[blosc.shuffle.value], blosc.typesize, data.nbytes, data.ctypes.data, address,
            data.nbytes + BLOSC_MAX_OVERHEAD, blosc.cname.value.encode(), blosc.blocksize, 1,
        )  # fmt: skip
        if size <= 0:
            raise OSError(f"Blosc could not encode chunk {coords} of {self.array.path} (code {size})")
        path = self.root / self.array.path / self.array.metadata.encode_chunk_key(coords)
        path.parent.mkdir(parents=True, exist_ok=True)
        # zarr's own scratch name (not `infra.atomic.atomic_path`'s): a build killed in the middle of a chunk leaves
        # the same kind of file whichever wrote it, and `tasks.cube.prepare_cube` clears those before resuming
        scratch = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            self._put(scratch, size)
            scratch.replace(path)
        except OSError as exc:  # (os.write's errors name no file: a full disk would not say which)
            scratch.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        except BaseException:
            scratch.unlink(missing_ok=True)
            raise

    def _put(self, path: Path, size: int) -> None:
        """The first `size` bytes of the encoded buffer into the new file `path`: with `O_DIRECT` (whole pages,
        then cut to `size`) where the file system allows it, else through the page cache."""
        view = memoryview(self._out)
        if self._direct:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
                try:
                    padded, done = -(-size // ALIGN) * ALIGN, 0
                    while done < padded:
                        done += os.write(fd, view[done:padded])
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
                return
            except OSError as exc:  # a file system without O_DIRECT refuses it at the open (tmpfs) or the write
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # this chunk and every later one through the page cache
        with path.open("wb") as f:
            f.write(view[:size])


def direct_chunks(array: zarr.Array) -> DirectChunks | None:
    """A `DirectChunks` for `array` when it is in a local store and encoded with bytes (in this machine's byte order)
    then Blosc alone, and numcodecs' c-blosc can be called; else None (write through zarr)."""
    codecs = array.metadata.codecs
    if not isinstance(array.store, LocalStore) or len(codecs) != 2:
        return None
    if not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder:
        return None
    compress = _blosc_compress()
    return None if compress is None else DirectChunks(array, Path(array.store.root), compress)
