"""Atomic outputs: write beside the target, then publish, so readers never see half-written results.

One mechanism for every location, a local path or an object-store `upath.UPath` (`infra.storage.location`):
`scratch(loc)` names the scratch beside `loc`, `publish(src, loc)` moves a finished file or folder onto `loc`,
`remove(loc)` deletes one, and `atomic_path(loc)` ties them together.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from zarr.core.chunk_key_encodings import parse_chunk_key_encoding

from infra.retry import STORE_RETRY, HttpRetry

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from upath import UPath

log = logging.getLogger(__name__)
L = TypeVar("L", Path, "UPath")

# Zarr's metadata objects (v3 and v2): a store is published with them last, so that until then readers find the old
# metadata, which names only old chunks
ZARR_METADATA = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})
# the two families of Zarr v3 chunk keys, which never collide (`c/0/1` and `c`, `0.1` and `0`): a published array's
# chunks take the family its old version at the destination does not use, so copying them overwrites no old chunk
OTHER_CHUNK_KEYS = {
    "default": {"name": "v2", "configuration": {"separator": "."}},
    "v2": {"name": "default", "configuration": {"separator": "/"}},
}


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
    new, never a mixture); a folder (a Zarr store) is published by `_publish_objects`: readers find the old store,
    whole, until the new one is complete. Requests are retried (`retry`); `src` is deleted once published, and left
    to the caller on failure.
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
        _publish_objects(fs, root, target, files, retry)
    remove(src, retry)
    return dst


def _publish_objects(fs: AbstractFileSystem, root: str, target: str, files: list[str], retry: HttpRetry) -> None:
    """Publish the objects `files` under `root` at `target`, where readers find the old store until the new one is
    complete.

    1. Each object but Zarr's metadata is copied server-side over `target`; the chunks of a Zarr v3 array whose old
       version at `target` uses the same family of chunk keys take the other family (`OTHER_CHUNK_KEYS`, written
       into its metadata), so no chunk that the old metadata names is overwritten.
    2. The metadata is written, the deepest first and the top-level `zarr.json` (with the consolidated metadata that
       cropflow's readers open) last: the one request that switches readers to the new store.
    3. The old objects the new store does not have are deleted (a reader still reading chunks of the old store then
       finds them gone, which zarr reads as fill values: open the store again after a publish).

    Other objects (plain files, Zarr v2 chunks) replace theirs at `target` in step 1. If step 1 fails, the objects
    it copied that the old store does not name are deleted (the old store is left as it was); after a failure in
    step 2 or 3, a publish retried with the same `src` completes the new store.
    """
    names = {f: f[len(root) + 1 :] for f in files}
    metadata = [f for f in files if f.rsplit("/", 1)[-1] in ZARR_METADATA]
    texts = retry.call(partial(fs.cat, metadata), f"reading the metadata of {root}") if metadata else {}
    old = retry.call(partial(fs.find, target), f"listing {target}")
    old_meta = [f for f in old if f.rsplit("/", 1)[-1] == "zarr.json"]
    old_texts = retry.call(partial(fs.cat, old_meta), f"reading the metadata of {target}") if old_meta else {}
    docs = {_node(names[f]): json.loads(texts[f]) for f in metadata if f.endswith("zarr.json")}
    old_docs = {_node(f[len(target) + 1 :]): json.loads(text) for f, text in old_texts.items()}
    recoded = _recoded(docs, old_docs)
    copies = {f: f"{target}/{_chunk_name(names[f], docs, recoded)}" for f in files if f not in texts}
    for path, doc in docs.items():  # the recoded arrays' own metadata and their entries in consolidated metadata
        for array, meta in _arrays(doc, path):
            if array in recoded:
                meta["chunk_key_encoding"] = recoded[array]
    unnamed = sorted(set(copies.values()) - set(old))  # new objects that no old metadata names
    try:
        if copies:
            retry.call(partial(fs.copy, list(copies), list(copies.values())), f"copying {root} to {target}")
    except BaseException:
        try:
            if unnamed:
                fs.rm(unnamed)
        except Exception as exc:
            log.warning("could not remove the objects copied to %s (%s); a new publish removes them", target, exc)
        raise
    by_depth = defaultdict(dict)
    for f in metadata:
        doc = docs.get(_node(names[f])) if f.endswith("zarr.json") else None
        by_depth[names[f].count("/")][f"{target}/{names[f]}"] = texts[f] if doc is None else json.dumps(doc).encode()
    for depth in sorted(by_depth, reverse=True):  # the top level last
        retry.call(partial(fs.pipe, by_depth[depth]), f"writing the metadata of {target}")
    published = {f"{target}/{names[f]}" for f in metadata} | set(copies.values())
    stale = [f for f in old if f not in published]
    if stale:
        retry.call(partial(fs.rm, stale), f"deleting the old objects of {target}")


def _node(name: str) -> str:
    """The path of the Zarr node (group or array) whose metadata object is `name` (`""` for the top level)."""
    return name.rpartition("/")[0]


def _arrays(doc: dict, path: str) -> Iterator[tuple[str, dict]]:
    """The arrays `(path, metadata)` that the Zarr v3 metadata `doc` of the node at `path` describes: the node
    itself if it is an array, and the arrays of its consolidated metadata (the metadata dicts themselves)."""
    if doc.get("node_type") == "array":
        yield path, doc
    for name, child in ((doc.get("consolidated_metadata") or {}).get("metadata") or {}).items():
        yield from _arrays(child, f"{path}/{name}".lstrip("/"))


def _recoded(docs: dict[str, dict], old_docs: dict[str, dict]) -> dict[str, dict]:
    """The chunk key encoding each new array (by path) must take so that its chunks overwrite none of those that the
    old metadata `old_docs` names: the other family, for the arrays whose old version uses the same family."""
    used = defaultdict(set)
    for path, doc in old_docs.items():
        for array, meta in _arrays(doc, path):
            used[array].add(meta["chunk_key_encoding"]["name"])
    return {
        path: OTHER_CHUNK_KEYS[family]
        for path, doc in docs.items()
        if doc.get("node_type") == "array" and (family := doc["chunk_key_encoding"]["name"]) in used[path]
    }


def _chunk_name(name: str, docs: dict[str, dict], recoded: dict[str, dict]) -> str:
    """Where the object `name` of the new store goes: a chunk of a recoded array under its new key, else `name`."""
    array = _node(name)
    while array not in recoded:
        if not array:
            return name
        array = _node(array)
    meta = docs[array]
    source = parse_chunk_key_encoding(meta["chunk_key_encoding"])
    key = name[len(array) + 1 :] if array else name
    parts = key.split(source.separator)[1 if source.name == "default" else 0 :]  # "c" starts the default keys
    coords = tuple(map(int, parts)) if meta["shape"] else ()
    return f"{array}/{parse_chunk_key_encoding(recoded[array]).encode_chunk_key(coords)}".lstrip("/")


@contextmanager
def atomic_path(loc: L) -> Iterator[L]:
    """Yield a scratch location beside `loc` to write a file or folder to; when the block ends without error it is
    published at `loc` (`publish`), otherwise, or if publishing fails, it is deleted.

    The output published before at `loc` stays intact until the new one is complete, and when publishing fails
    (see `publish`).
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
