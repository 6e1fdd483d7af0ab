"""Writing files so that a crash never leaves half of one, and folders that must be writable."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def writable_dir(path: str | os.PathLike, field: str = "cache_dir") -> Path:
    """`path` created if needed; an error naming `field` when it cannot be."""
    try:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, TypeError) as e:
        raise ValueError(f"{field}={str(path)!r} cannot be created ({e}); pick a writable folder") from e
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed onto `path` (atomic on
    POSIX within one folder), so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
