"""Atomic outputs: write beside the target, then rename, so readers never see half-written results."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _scratch(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a scratch path beside `path` (file or folder); on success it replaces `path`, on error it is removed.

    A previous `path` stays intact until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and tmp.is_dir():
        old = _scratch(path)
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
