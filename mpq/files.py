"""Files written whole or not at all: a crash or a full disk leaves the old file or the new one,
never half of either."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "file_sha256", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` (ending in `suffix`, for writers that insist on one) to
    write to; when the block ends without error it is flushed to disk and replaces `path`,
    otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex: how an export or a warm start names the checkpoint
    it came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
