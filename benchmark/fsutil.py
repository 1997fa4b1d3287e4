"""File-system helpers every writer shares: atomic writes, the UTC timestamp format,
writability and free-space checks before expensive work, and removal of the temp files that
killed processes leave behind.

Temp files and folders carry the writing process's id and machine
(``.<name>.<pid>@<host>.<random>.tmp``), so a later run can tell a dead process's leftovers
from a live writer's and remove only those; on a filesystem shared by several machines (the
feature cache of a multi-node job), another machine's temp files are left alone unless they
are old. In a shared folder (the system temp folder) only names that start with
``capbench-`` are touched, never another program's.

:func:`exclusive_lock` keeps two processes from working on the same files at once (two
``run --resume`` of one unfinished run); :func:`refuse_overwrite` keeps an output option from
writing over a run record or a dataset file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmark.errors import BusyError, ConfigError, StorageError

__all__ = ["atomic_write", "atomic_write_text", "utc_timestamp", "TIMESTAMP_FORMAT",
           "ensure_writable", "remove_stale_temps", "temp_prefix", "host_tag", "pid_alive",
           "exclusive_lock", "protected_kind", "refuse_overwrite"]

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
    start with ``capbench-`` are considered, never another program's ``.<name>.<pid>.x.tmp``,
    ``tmp*.tmp`` or ``.tmp-shapes-<pid>-*`` (those forms are capbench's only in its own
    folders: the checkpoint folder, the caches).
    Returns what was removed; never raises.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        if not own_folder and not p.name.startswith("capbench-"):
            continue  # a shared folder: another program's file, whatever its name looks like
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


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, what: str, hint: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on the file ``path`` (``fcntl.flock``; created if needed, it
    holds the holder's pid) while the ``with`` block runs.

    Never waits: when another process holds it, raises :class:`BusyError` "another process
    (pid N) is ``what``" + ``hint``. The kernel releases the lock when its process dies, so a
    crash never leaves a lock that blocks; the file is removed on release (while still held:
    a process that opened the old file in that moment sees it replaced and opens the new one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what, hint)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, what: str, hint: str) -> int:
    """An open descriptor of ``path`` holding its flock (see :func:`exclusive_lock`)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise BusyError(f"another process ({pid}) is {what} (lock file {path}).{hint}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # its last holder removed it after we opened it: take the new one


_PROTECTED_PARSE_LIMIT = 2**30  # larger JSON files are not parsed to tell what they are


def protected_kind(path: str | Path) -> str | None:
    """What the existing file ``path`` is when no output may replace it: ``"a run record"``
    (any ``*.json`` in a ``runs/`` folder, or a JSON object with ``run_id`` and ``metrics``)
    or ``"a dataset file"`` (a JSON object with an ``images`` list: Karpathy's or COCO's
    format); None for anything else, or no file. Never raises."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        if path.suffix == ".json" and path.parent.name == "runs":
            return "a run record"
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"{") or path.stat().st_size > _PROTECTED_PARSE_LIMIT:
            return None
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if "run_id" in data and "metrics" in data:
        return "a run record"
    return "a dataset file" if isinstance(data.get("images"), list) else None


def refuse_overwrite(path: str | Path, option: str, *, dataset_ok: bool = False) -> None:
    """Refuse ``option``'s value ``path`` when writing there would replace a run record, or a
    dataset file (unless ``dataset_ok``: the commands that write one). Raises
    :class:`ConfigError` naming the option, the file and what it is; call it before any work.
    """
    kind = protected_kind(path)
    if kind and not (dataset_ok and kind == "a dataset file"):
        raise ConfigError(f"{option} {path} is {kind}; writing there would replace it. Choose "
                          f"another {option}")
