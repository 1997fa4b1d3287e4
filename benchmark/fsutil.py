"""File-system helpers every writer shares: atomic writes, the UTC timestamp format,
writability and free-space checks before expensive work, and removal of the temp files that
killed processes leave behind.

Temp files and folders carry the writing process's id and machine
(``.<name>.<pid>@<host>.<random>.tmp``), so a later run can tell a dead process's leftovers
from a live writer's and remove only those; on a filesystem shared by several machines (the
feature cache of a multi-node job), another machine's temp files are left alone unless they
are old.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmark.errors import StorageError

__all__ = ["atomic_write", "atomic_write_text", "utc_timestamp", "TIMESTAMP_FORMAT",
           "ensure_writable", "remove_stale_temps", "temp_prefix", "host_tag", "pid_alive"]

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_PID_TEMP = re.compile(r"^\..+\.(\d+)(?:@([A-Za-z0-9-]+))?\.[^.]+\.tmp$")  # no host: older
_PID_PREFIXED = re.compile(r"^(?:capbench-[a-z]+|\.tmp-shapes)-(\d+)-")


def utc_timestamp() -> str:
    """Now in UTC as ISO 8601 (``2026-11-22T01:52:32Z``), the format of every record."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime())


def host_tag() -> str:
    """This machine's name as temp names carry it: the host name's first label, letters,
    digits and ``-`` only (at most 32 characters)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32]
    return name or "host"


def temp_prefix(name: str) -> str:
    """Prefix of a temp file or folder for ``name`` written by this process on this machine."""
    return f".{name}.{os.getpid()}@{host_tag()}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temp file in the same folder,
    which then replaces ``path`` in one rename. Readers never see a half-written file, the
    temp file is removed if ``write`` fails (the error propagates), and one left by a killed
    process is removed by :func:`remove_stale_temps`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal rights
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: setting it later would race with other threads


def _umask() -> int:
    return _UMASK


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def ensure_writable(folder: str | Path, *, need_bytes: int = 0, what: str = "folder",
                    hint: str = "") -> Path:
    """Create ``folder`` if needed, prove it writable by writing a probe file, and check that
    ``need_bytes`` fit in its free space (with 10% to spare).

    Raises :class:`StorageError` naming the folder, what it is for, the reason and ``hint``
    (what to do). Costs a few milliseconds: call it before expensive work.
    """
    folder = Path(folder)
    tail = f" {hint}" if hint else ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temp_prefix("write-probe"), suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(f"the {what} {folder} is not writable ({exc.strerror or exc}).{tail}") from exc
    free = shutil.disk_usage(folder).free
    if need_bytes and free < need_bytes * 1.1:
        raise StorageError(f"the {what} {folder} has {_gib(free)} free but this run needs about "
                           f"{_gib(need_bytes)}.{tail}")
    return folder


def remove_stale_temps(folder: str | Path, *, legacy_age_s: float = 3600.0,
                       own_folder: bool = True) -> list[Path]:
    """Remove temp files and folders in ``folder`` that dead processes left behind.

    Matches this module's ``.<name>.<pid>@<host>.<random>.tmp`` names (and, from older
    versions, ``.<name>.<pid>.<random>.tmp``) and the ``capbench-<kind>-<pid>-`` /
    ``.tmp-shapes-<pid>-`` prefixes; a live process's temps are kept. Another machine's temps
    (its pid means nothing here) and those of older capbench versions (no pid in the name)
    are removed once older than ``legacy_age_s``; with
    ``own_folder=False`` (a shared folder such as the system temp folder) only names that
    start with ``capbench-`` are considered, never another program's ``tmp*.tmp``.
    Returns what was removed; never raises.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        m = _PID_TEMP.match(p.name) or _PID_PREFIXED.match(p.name)
        try:
            host = m.group(2) if m and m.re is _PID_TEMP else None
            if m and host not in (None, host_tag()):  # written on another machine
                stale = now - p.stat().st_mtime > legacy_age_s
            elif m:
                stale = int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1)))
            else:
                legacy = (own_folder and p.name.startswith("tmp") and p.name.endswith(".tmp")) \
                    or p.name.startswith(("capbench-ptb-", "capbench-spice-", "capbench-check-")) \
                    or (own_folder and p.name.startswith(".tmp-shapes-"))
                stale = legacy and now - p.stat().st_mtime > legacy_age_s
            if not stale:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed
