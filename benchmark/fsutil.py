"""File-system helpers every writer shares: atomic writes and the UTC timestamp format."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "utc_timestamp", "TIMESTAMP_FORMAT"]

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_timestamp() -> str:
    """Now in UTC as ISO 8601 (``2026-11-22T01:52:32Z``), the format of every record."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime())


def atomic_write(path: str | Path, write: Callable[[str], None], *, suffix: str = ".tmp") -> Path:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temp file in the same folder,
    which then replaces ``path`` in one rename. Readers never see a half-written file, and
    the temp file is removed if ``write`` fails (the error propagates)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
