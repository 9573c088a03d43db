"""Atomic outputs: write beside the target, then publish, so readers never see half-written results.

One mechanism for every location, a local path or an object-store `upath.UPath` (`infra.storage.location`):
`scratch(loc)` names the scratch beside `loc`, `publish(src, loc)` moves a finished file or folder onto `loc`,
`remove(loc)` deletes one, and `atomic_path(loc)` ties them together.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from infra.retry import STORE_RETRY, HttpRetry

if TYPE_CHECKING:
    from upath import UPath

log = logging.getLogger(__name__)
L = TypeVar("L", Path, "UPath")


def scratch(loc: L) -> L:
    """A new, unused name beside `loc` (same folder or prefix, hidden, unique to this process and call)."""
    return loc.with_name(f".{loc.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove(loc: Path | UPath, retry: HttpRetry = STORE_RETRY) -> None:
    """Delete the file or folder (or object prefix) at `loc`, if any; object-store requests retried (`retry`)."""
    if isinstance(loc, Path):
        if loc.is_dir() and not loc.is_symlink():
            shutil.rmtree(loc)
        else:
            loc.unlink(missing_ok=True)
    elif retry.call(loc.exists, f"listing {loc}"):
        retry.call(partial(loc.fs.rm, loc.path, recursive=True), f"deleting {loc}")


def discard(loc: Path | UPath) -> None:
    """`remove(loc)` while cleaning up after an error: a failure is logged, not raised over the first error."""
    try:
        remove(loc)
    except Exception as exc:
        log.warning("could not remove %s (%s); delete it by hand", loc, exc)


def publish(src: L, dst: L, retry: HttpRetry = STORE_RETRY) -> L:
    """Move the finished file or folder `src` onto `dst` (same file system or bucket), replacing what was there.

    Locally a rename (readers see the old or the new, never a mixture): a file replaces a file in one step; a
    folder is swapped (the old one renamed aside, the new one renamed in, then the old deleted), and if the second
    rename fails the old one is put back. On an object store, a file is copied server-side in one request (old or
    new, never a mixture); a folder's old objects are deleted first (readers may find nothing at `dst` meanwhile),
    then each new object is copied server-side, the top level last (a Zarr store's `zarr.json`: it makes the store
    openable), then `src` is deleted. Requests are retried (`retry`); if the copy fails anyway, the objects copied so
    far are deleted: `dst` is left empty, never half-written, and `src` is left for the caller.
    """
    if isinstance(dst, Path):
        if not (dst.is_dir() or (dst.exists() and src.is_dir())):  # a file onto a file, or anything onto nothing
            os.replace(src, dst)
            return dst
        old = scratch(dst)
        dst.rename(old)
        try:
            src.rename(dst)
        except BaseException:
            old.rename(dst)
            raise
        discard(old)
        return dst
    fs, root, target = src.fs, src.path.rstrip("/"), dst.path.rstrip("/")
    files = retry.call(partial(fs.find, root), f"listing {src}")
    if not files:
        raise FileNotFoundError(f"nothing to publish at {src}")
    if files == [root]:  # one object
        retry.call(partial(fs.copy, root, target), f"copying {src} to {dst}")
    else:
        nested = {f: "/" in f[len(root) + 1 :] for f in files}
        try:
            remove(dst, retry)
            for batch in ([f for f in files if nested[f]], [f for f in files if not nested[f]]):  # the top level last
                if batch:
                    copies = [target + f[len(root) :] for f in batch]
                    retry.call(partial(fs.copy, batch, copies), f"copying {src} to {dst}")
        except BaseException:
            discard(dst)
            raise
    remove(src, retry)
    return dst


@contextmanager
def atomic_path(loc: L) -> Iterator[L]:
    """Yield a scratch location beside `loc` to write a file or folder to; when the block ends without error it is
    published at `loc` (`publish`), otherwise, or if publishing fails, it is deleted.

    The output published before at `loc` stays intact until the new one is complete, and locally also when
    publishing fails (on an object store a folder's old objects are deleted as publishing starts, see `publish`).
    """
    if isinstance(loc, Path):
        loc.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch(loc)
    try:
        yield tmp
        publish(tmp, loc)
    except BaseException:
        discard(tmp)
        raise
