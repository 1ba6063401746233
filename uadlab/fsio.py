"""Atomic file writes: a reader (another tab, another process, a crash) sees the old file or the new one,
never half of one.

Bottom layer: imports nothing from uadlab. Every writer gets its own temporary name in the target's folder
(same file system, so the rename is atomic), the data is fsynced before ``os.replace`` puts it in place, and
a failed write leaves no temporary file behind.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_name(path: str | os.PathLike) -> Path:
    """A hidden name next to ``path`` that no other writer uses (``.name.<random>.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path for the caller to write; on a clean exit it is fsynced and renamed to ``path``.

    For writers that want a file name (``safetensors.save_file``, ``PIL.Image.save``, a memory map). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _fsync(path: Path) -> None:
    """Flush the file's data to disk, so the rename never publishes an empty file after a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
