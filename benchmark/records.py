"""Run records: one JSON file per run under ``<results_dir>/runs/``, written atomically."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

from benchmark.errors import RecordError

SCHEMA_VERSION = 1

__all__ = ["find_record", "new_run_id", "write_record", "load_records", "load_record", "git_commit",
           "environment", "SCHEMA_VERSION"]


def new_run_id(arch: str, encoder: str, seed: int) -> str:
    """``YYYYmmdd-HHMMSS-<arch>-<encoder>-s<seed>-<4 hex>``: sortable and unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{arch}-{encoder}-s{seed}-{secrets.token_hex(2)}"


def git_commit(path: Path | None = None) -> str | None:
    """The current git commit of the capbench checkout (``+dirty`` if modified), or None."""
    root = path or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device) -> dict:
    """Versions and hardware that shape the numbers of a run."""
    import torch

    name = str(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_record(record: dict, results_dir: str | Path) -> Path:
    """Write ``record`` to ``<results_dir>/runs/<run_id>.json`` via a temp file + rename."""
    folder = Path(results_dir) / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['run_id']}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_record(path: str | Path) -> dict:
    """Read one record (raises :class:`RecordError` with the file name when unreadable)."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read run record {path}: {exc}") from exc
    if not isinstance(rec, dict) or "run_id" not in rec or "metrics" not in rec:
        raise RecordError(f"{path} is not a capbench run record (no run_id/metrics)")
    rec["_path"] = str(path)
    return rec


def load_records(results_dir: str | Path) -> tuple[list[dict], list[str]]:
    """All records under ``<results_dir>/runs`` and a list of problems with unreadable ones."""
    folder = Path(results_dir) / "runs"
    records, problems = [], []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(load_record(p))
        except RecordError as exc:
            problems.append(str(exc))
    return records, problems


def find_record(ref: str, results_dir: str | Path) -> dict:
    """A record by path, exact run id, or unique prefix/suffix of a run id in ``results_dir``.

    Raises RecordError when nothing or more than one record matches.
    """
    p = Path(ref)
    if p.suffix == ".json" and p.is_file():
        return load_record(p)
    folder = Path(results_dir) / "runs"
    exact = folder / f"{ref}.json"
    if exact.is_file():
        return load_record(exact)
    hits = [x for x in folder.glob("*.json") if x.stem.startswith(ref) or x.stem.endswith(ref)]
    if len(hits) == 1:
        return load_record(hits[0])
    if not hits:
        raise RecordError(f"no run record matches {ref!r} in {folder} (see `capbench report`)")
    raise RecordError(f"{ref!r} matches {len(hits)} records in {folder}; give more of the run id")
