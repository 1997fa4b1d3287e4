"""Run a matrix's cells as Slurm job-array tasks (or local processes) through submitit.

``capbench matrix --launcher slurm`` submits one array task per pending cell with
`submitit <https://github.com/facebookincubator/submitit>`_'s ``AutoExecutor.map_array``
(at most ``array_parallelism`` running at once). Each task is a :class:`CellTask`, a
``submitit.helpers.Checkpointable``: it runs its cell as ``capbench run --resume`` does
(:func:`benchmark.matrix.run_cell`), and when Slurm preempts it or its time limit nears
(submitit's ``USR2`` signal) submitit requeues it, and the requeued task continues from the
cell's last completed epoch (the exact resume of :func:`benchmark.runner.run_experiment`).
A task that Slurm itself requeues (``scontrol requeue``, a node failure) resumes the same way.
Cells whose records exist, and cells already queued or running, are not submitted.
submitit's job folder (scripts, pickles, logs) is ``<results_dir>/submitit/``, with
``cells.json`` mapping each submitted cell to its job id.

``--launcher local --parallel K`` runs the same tasks as local processes, K at a time
(:func:`run_local`; K=1 is the plain in-process loop of :func:`benchmark.matrix.run_matrix`).

:func:`matrix_status` says for every cell whether it is done, running, queued, failed (with
the end of its log) or not started, from the records, the unfinished training states (a live
local process holds its lock) and the queue (``squeue``), so ``--retry-failed`` resubmits
the failed cells alone.

Slurm settings (:data:`SLURM_SETTINGS`) come from a matrix config's ``launcher:`` section
and ``--slurm KEY=VALUE`` flags (:func:`slurm_settings`); extra ``sbatch`` options go under
``sbatch`` and are checked against the installed ``sbatch --help``.

**The seam for other studies** (tuning workers, issue 28; ``capbench tune`` is not wired to
it yet: several ``capbench tune`` jobs sharing one ``--storage`` URL do it by hand):
nothing here is matrix-specific below :class:`CellTask`. :func:`submit_array` submits any
picklable callable over a list of arguments (one array task each) with the same settings
and checks (:func:`check_slurm`), and :func:`run_local` runs the same on local processes.
A tuning study submits ``K`` workers, each a callable that opens one Optuna study in a shared
storage and runs trials until the study has enough (e.g. ``submit_array(StudyWorker(storage,
name, n_trials), list(range(K)), folder, settings, job_name="capbench-tune")``). The
storage must be reachable from every node: SQLite on a shared filesystem works for a few
workers but its file locking is unreliable over NFS; a PostgreSQL URL
(``postgresql://user@host/db``) is the setting to recommend on a cluster.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import submitit
import submitit.helpers
from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths

from benchmark.config import RunConfig, read_config_file
from benchmark.data import resolve_dataset
from benchmark.device import select_device
from benchmark.errors import CapbenchError, CapbenchWarning, ConfigError
from benchmark.fsutil import atomic_write_text, ensure_writable
from benchmark.matrix import (
    Cell,
    MatrixPlan,
    Shard,
    _feature_key,
    done_runs,
    failure_path,
    plan_cells,
    run_cell,
    shard_cells,
)
from benchmark.records import load_records
from benchmark.report import leaderboard, write_leaderboard_file
from benchmark.runner import prepare_features, unfinished_state

__all__ = ["SLURM_SETTINGS", "CellTask", "CellState", "LaunchOutcome", "board_records", "check_slurm",
           "job_folder", "launch_matrix", "matrix_status", "parse_settings", "run_local",
           "slurm_settings", "submit_array", "submit_board_job", "wait_for_cells"]

#: capbench's Slurm settings -> (submitit AutoExecutor parameter, type, what it sets)
SLURM_SETTINGS: dict[str, tuple[str, type, str]] = {
    "partition": ("slurm_partition", str, "the partition (sbatch --partition)"),
    "gpus_per_task": ("gpus_per_node", int, "GPUs per array task (one task per node)"),
    "cpus_per_task": ("cpus_per_task", int, "CPUs per array task"),
    "mem_gb": ("mem_gb", float, "memory per array task, GB"),
    "time_min": ("timeout_min", int, "time limit per task, minutes (default 240); submitit "
                                     "requeues a task whose limit nears"),
    "array_parallelism": ("slurm_array_parallelism", int, "array tasks running at once"),
    "sbatch": ("slurm_additional_parameters", dict, "extra sbatch options, e.g. "
                                                    "{account: abc, qos: high}"),
}
DEFAULT_TIME_MIN = 240
#: squeue states of a task waiting for its turn (or requeued) and of one running
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED",
           "CONFIGURING", "RESIZING"}
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}
#: seconds a Slurm client command (sbatch --help, squeue) may take before capbench gives up
SLURM_CMD_TIMEOUT_S = 60


@contextlib.contextmanager
def _scheduler(what: str):
    """Around a call to Slurm's clients: sbatch refusing a job (submitit's FailedJobError,
    e.g. an unknown partition) becomes a ConfigError carrying sbatch's own message; an sbatch
    answer without a job id (submitit's FailedSubmissionError) and a client that does not
    answer in time (a busy or unreachable slurmctld) a CapbenchError. What the call writes to
    stderr (submitit echoes a refused sbatch's stderr) is held back, and passed on only when
    the call succeeds: the error says it once."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    except FailedJobError as exc:
        said = " ".join(str(exc).split())[-600:]
        raise ConfigError(f"{what}: sbatch refused the job: {said}; check the Slurm settings "
                          "(--slurm KEY=VALUE, the config's launcher: section), e.g. the "
                          "partition (sinfo lists them)") from None
    except FailedSubmissionError as exc:  # sbatch said nothing submitit understands
        said = " ".join(str(exc).split())[-300:]
        raise CapbenchError(f"{what}: sbatch's answer names no job ({said}); see squeue "
                            "--me before submitting again") from None
    except subprocess.TimeoutExpired as exc:
        cmd = exc.cmd[0] if isinstance(exc.cmd, list | tuple) else str(exc.cmd).split()[0]
        raise CapbenchError(f"{what}: {cmd} did not answer within {exc.timeout:g} s (is "
                            "slurmctld busy or down? `sinfo` tells); try again later") from None


def _allowed() -> str:
    return ", ".join(SLURM_SETTINGS)


def parse_settings(pairs: Sequence[str]) -> dict:
    """``--slurm KEY=VALUE`` flags -> ``{key: value}``; ``sbatch.OPTION=VALUE`` adds an extra
    sbatch option. Values stay strings (:func:`slurm_settings` types them). Raises
    ConfigError for a pair without ``=``."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm {pair!r}: give KEY=VALUE, e.g. --slurm partition=gpu; "
                              f"keys: {_allowed()}, or sbatch.OPTION=VALUE")
        key = key.strip()
        if key.startswith("sbatch."):
            out.setdefault("sbatch", {})[key[len("sbatch."):]] = value
        else:
            out[key] = value
    return out


def slurm_settings(config: str | None, flags: dict | None = None) -> dict:
    """The Slurm settings: the config file's ``launcher:`` section, then ``flags``
    (:func:`parse_settings`) over it; every key checked against :data:`SLURM_SETTINGS` and
    typed. Returns ``{capbench key: value}`` with ``time_min`` defaulted.

    Raises ConfigError naming the file or flag, the key and the allowed keys."""
    merged: dict = {}
    sources: list[tuple[str, dict]] = []
    if config:
        path, data = read_config_file(config)
        section = data.get("launcher") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: launcher: expected a mapping of Slurm settings "
                              f"({_allowed()})")
        sources.append((f"{path}: launcher", section))
    sources.append(("--slurm", flags or {}))
    for where, section in sources:
        for key, value in section.items():
            if key not in SLURM_SETTINGS:
                raise ConfigError(f"{where}: {key!r} is not a Slurm setting capbench knows; the "
                                  f"settings are {_allowed()} (extra sbatch options go under "
                                  "sbatch, e.g. --slurm sbatch.account=abc)")
            merged[key] = _typed(key, value, where, merged.get(key))
    merged.setdefault("time_min", DEFAULT_TIME_MIN)
    return merged


def _typed(key: str, value, where: str, before):
    kind = SLURM_SETTINGS[key][1]
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: sbatch: expected a mapping of sbatch options, "
                              "e.g. {account: abc}")
        return {**(before or {}), **{str(k): str(v) for k, v in value.items()}}
    try:
        typed = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key}={value!r}: expected {kind.__name__}") from None
    if kind is not str and (typed < 0 or (typed == 0 and key != "gpus_per_task")):
        raise ConfigError(f"{where}: {key}={value!r}: must be positive")
    return typed


def _sbatch_options() -> set[str]:
    """The long options the installed ``sbatch`` knows (from ``sbatch --help``)."""
    with _scheduler("--launcher slurm"):
        text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True,
                              timeout=SLURM_CMD_TIMEOUT_S).stdout
    return {tok[2:].split("=")[0].split("[")[0].rstrip(",")
            for tok in text.split() if tok.startswith("--")}


def check_slurm(results_dir: str | Path, settings: dict) -> None:
    """Before anything is submitted: ``sbatch`` must be on PATH and every extra sbatch option
    one it knows (ConfigError otherwise, suggesting ``--launcher local`` or naming the
    option); a results folder under /tmp gets a CapbenchWarning (other nodes may not see it)."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: sbatch is not on PATH (no Slurm client on this "
                          "machine); run the cells here with --launcher local [--parallel K], "
                          "or submit from a Slurm login node")
    known = _sbatch_options()
    for option in settings.get("sbatch", {}):
        if option.replace("_", "-") not in known:
            raise ConfigError(f"sbatch option {option!r} does not exist (sbatch --help lists "
                              "its options, e.g. account, qos, constraint, exclude)")
    path = Path(results_dir).resolve()
    if path.parts[:2] == ("/", "tmp"):
        warnings.warn(f"results folder {path} is under /tmp: the array tasks write their "
                      "records there, and other nodes may not share this machine's /tmp; use "
                      "a folder on a shared filesystem", CapbenchWarning, stacklevel=2)


def job_folder(results_dir: str | Path) -> Path:
    """submitit's job folder of a results folder: ``<results_dir>/submitit/``."""
    return Path(results_dir) / "submitit"


def _executor(folder: Path, settings: dict, job_name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {SLURM_SETTINGS[k][0]: v for k, v in settings.items() if v not in (None, {})}
    executor.update_parameters(name=job_name, nodes=1, tasks_per_node=1, **params)
    return executor


def submit_array(fn: Callable, items: Sequence, folder: str | Path, settings: dict, *,
                 job_name: str = "capbench") -> list[str]:
    """Submit ``fn(item)`` for each of ``items`` as one Slurm job array (submitit
    ``map_array``; ``fn`` and the items must pickle, and a ``Checkpointable`` ``fn`` is
    requeued on preemption/timeout). Returns the tasks' job ids (``ARRAYID_INDEX``).
    Call :func:`check_slurm` first. Raises ConfigError when sbatch refuses the array (its
    message, e.g. an unknown partition); nothing is submitted then."""
    executor = _executor(Path(folder), settings, job_name)
    with _scheduler("--launcher slurm: submitting the job array"):
        jobs = executor.map_array(fn, list(items))
    return [job.job_id for job in jobs]


def run_local(fn: Callable, items: Sequence, parallel: int,
              on_done: Callable[[object, object], None] | None = None) -> list:
    """Run ``fn(item)`` for each of ``items`` in fresh local processes (spawned, one per item),
    at most ``parallel`` at a time; ``on_done(item, result or exception)`` as each ends.
    Returns the results (an exception where a process raised), in the items' order.

    Each item gets its own one-process pool, driven by one of ``parallel`` threads (a fresh
    process per item on every Python capbench supports; ``max_tasks_per_child`` needs 3.11),
    so a process that dies takes down its own item alone."""
    out: dict = {}
    with futures.ThreadPoolExecutor(parallel) as pool:
        pending = {pool.submit(_in_fresh_process, fn, item): i for i, item in enumerate(items)}
        for done in futures.as_completed(pending):
            i = pending[done]
            try:
                out[i] = done.result()
            except Exception as exc:  # the process's own failure: reported, the others go on
                out[i] = exc
            if on_done:
                on_done(items[i], out[i])
    return [out[i] for i in range(len(items))]


def _in_fresh_process(fn: Callable, item):
    """``fn(item)`` in a newly spawned process (its exception re-raised here)."""
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(1, mp_context=context) as one:
        return one.submit(fn, item).result()


class CellTask(submitit.helpers.Checkpointable):
    """Matrix cell ``index`` of ``plan`` over ``base``, as one job-array task: runs it with
    :func:`benchmark.matrix.run_cell` (skipped when its record exists, resumed from the last
    completed epoch when an unfinished state exists). submitit's ``checkpoint`` (inherited:
    resubmit the same call) requeues it on preemption or timeout. Returns the run id;
    raises ``RuntimeError`` with the cell's error when it failed (its failure file is
    written), so Slurm and submitit see the task fail."""

    def __init__(self, base: RunConfig, plan: MatrixPlan) -> None:
        self.base, self.plan = base, plan

    def __call__(self, index: int) -> str | None:
        cell = run_cell(self.base, self.plan, index)
        if cell.status == "failed":
            raise RuntimeError(f"cell {index} ({cell.arch} x {cell.encoder} seed {cell.seed}) "
                               f"failed: {cell.error}")
        return cell.run_id


def _cell_key(cell: Cell) -> str:
    return f"{cell.config_id}-s{cell.seed}"


def _manifest_path(results_dir: str | Path) -> Path:
    return job_folder(results_dir) / "cells.json"


def _read_manifest(results_dir: str | Path) -> dict:
    path = _manifest_path(results_dir)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _squeue() -> dict[str, str]:
    """``{job id: state}`` of this user's jobs, array tasks one by one (``squeue --me -r``).
    Raises CapbenchError when squeue is missing or fails (the tasks' states are unknown)."""
    if shutil.which("squeue") is None:
        raise CapbenchError("cells were submitted to Slurm from this results folder, but squeue "
                            "is not on PATH: run --status on a Slurm login node")
    try:
        out = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=SLURM_CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CapbenchError(f"squeue did not answer within {SLURM_CMD_TIMEOUT_S} s (is "
                            "slurmctld busy or down?), so the submitted cells' states are "
                            "unknown") from None
    if out.returncode != 0:
        raise CapbenchError(f"squeue failed, so the submitted cells' states are unknown: "
                            f"{out.stderr.strip()[-300:]}")
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def _local_holder(results_dir: str | Path, cell: Cell) -> int | None:
    """The pid of a live process on this machine training ``cell``, or None: a process holds
    the lock of the cell's run (``unfinished/<cid>/<run_id>.lock``, from the moment its run id
    is decided, before its first epoch's state exists). A lock file counts when the pid in it
    is alive (a process of another user too) and its flock is held (a leftover file of a
    killed process whose pid was reused does not)."""
    folder = Path(results_dir) / "unfinished" / cell.config_id
    for lock in sorted(folder.glob(f"*-s{cell.seed}-*.lock")) if folder.is_dir() else []:
        try:
            pid = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid > 0 and _alive(pid) and _locked(lock):
            return pid
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _locked(path: Path) -> bool:
    """Whether another process holds the flock of ``path`` (tested without waiting)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the shared lock taken, if it was
    return False


def _log_tail(results_dir: str | Path, job_id: str | None, lines: int = 8) -> str:
    """The last ``lines`` lines of a task's submitit logs (stderr, else stdout)."""
    if not job_id:
        return ""
    paths = JobPaths(job_folder(results_dir), job_id=job_id, task_id=0)
    for log in (paths.stderr, paths.stdout):
        if log.exists():
            text = log.read_text(errors="replace").rstrip().splitlines()
            if text:
                return "\n".join(text[-lines:])
    return ""


@dataclass
class CellState:
    """A cell's state for ``--status``: ``state`` is done, running, queued, failed,
    ``not started`` or ``unknown`` (submitted to Slurm, no record, and squeue cannot be asked
    here); ``detail`` the run id, job id, error, why it is unknown, or the end of the task's
    log."""

    index: int
    cell: Cell
    state: str
    job_id: str | None = None
    detail: str = ""
    log: str = ""


def matrix_status(base: RunConfig, plan: MatrixPlan, shard: Shard | None = None) -> list[CellState]:
    """Every planned cell's state (:class:`CellState`), in the plan's order (``--list-cells``
    numbering), from the records (done), the queue (queued/running Slurm tasks), a live local
    process holding the cell's run lock (running), the failure files and ended tasks without
    a record (failed, with the end of the task's log) and nothing (not started). A cell with
    an unfinished state and nothing running it is failed ("stopped after epoch N").

    squeue is asked only when a cell submitted to Slurm has no record yet, and before the
    records are read again (a task that writes its record and leaves the queue in between is
    done, not "ended without a record"); when squeue is missing or fails, those cells are
    ``unknown`` with the reason."""
    planned = plan_cells(base, plan.archs, plan.encoders, plan.seeds, plan.variants)
    chosen = {id(c) for c in shard_cells(planned, shard)}
    mine = [(i, c) for i, c in enumerate(planned) if id(c) in chosen]
    fingerprint = resolve_dataset(base.dataset).fingerprint
    results_dir = Path(base.results_dir)
    manifest = _read_manifest(results_dir)
    jobs = {i: (manifest.get(_cell_key(c)) or {}).get("job_id") for i, c in mine}
    queue, unknown = {}, ""
    done = done_runs(results_dir)
    if any(jobs[i] and (fingerprint, c.config_id, c.seed) not in done for i, c in mine):
        try:
            queue = _squeue()
        except CapbenchError as exc:
            unknown = str(exc)
        done = done_runs(results_dir)  # after the queue: a task that ended meanwhile is done
    states = []
    for index, cell in mine:
        run_id, job = done.get((fingerprint, cell.config_id, cell.seed)), jobs[index]
        if unknown and job and not run_id:
            states.append(CellState(index, cell, "unknown", job, f"job {job}: {unknown}"))
            continue
        states.append(_state_of(index, cell, results_dir, run_id, job, queue.get(job or "")))
    return states


def _state_of(index: int, cell: Cell, results_dir: Path, run_id: str | None, job: str | None,
              queued: str | None) -> CellState:
    if run_id:
        return CellState(index, cell, "done", job, run_id)
    if queued in _QUEUED:
        return CellState(index, cell, "queued", job, f"job {job} {queued.lower()}")
    if queued in _RUNNING or queued:
        return CellState(index, cell, "running", job, f"job {job}")
    pid = _local_holder(results_dir, cell)
    if pid:
        return CellState(index, cell, "running", job, f"pid {pid}")
    failure = failure_path(results_dir, cell)
    state = unfinished_state(results_dir, cell.config_id, cell.seed)
    if failure.exists() or job or state:
        try:
            error = json.loads(failure.read_text())["error"] if failure.exists() else ""
        except (OSError, json.JSONDecodeError, KeyError):
            error = ""
        error = error or (f"stopped with an unfinished run ({state.name}); it resumes from "
                          "its last completed epoch" if state else
                          f"job {job} ended without a record")
        return CellState(index, cell, "failed", job, error, _log_tail(results_dir, job))
    return CellState(index, cell, "not started")


@dataclass
class LaunchOutcome:
    """What :func:`launch_matrix` did: the cells submitted (or run locally) with their job
    ids, those skipped (done, queued or running) and the local results."""

    submitted: list[CellState]
    skipped: list[CellState]
    results: list = None  # local: run id or exception per submitted cell


def launch_matrix(base: RunConfig, plan: MatrixPlan, launcher: str, *, settings: dict | None = None,
                  parallel: int = 1, shard: Shard | None = None, retry_failed: bool = False,
                  on_done: Callable[[object, object], None] | None = None) -> LaunchOutcome:
    """Submit the matrix's pending cells (those of ``shard``; with ``retry_failed`` only the
    failed ones) as one Slurm job array (``launcher="slurm"``, returns once submitted) or run
    them as local processes, ``parallel`` at a time (``"local"``, returns when all ended).
    Done, queued and running cells are skipped. Raises ConfigError (bad plan, no sbatch, an
    unknown sbatch option) and StorageError before anything is submitted."""
    states = matrix_status(base, plan, shard)
    _refuse_unknown(states)
    wanted = {"failed"} if retry_failed else {"failed", "not started"}
    todo = [s for s in states if s.state in wanted]
    skipped = [s for s in states if s.state not in wanted]
    if launcher == "slurm":
        check_slurm(base.results_dir, settings or {})
    ensure_writable(job_folder(base.results_dir), what="results folder")
    task = CellTask(base, plan)
    if not todo:
        return LaunchOutcome([], skipped, [])
    if launcher == "local":
        _prepare_features_once(base, [s.cell for s in todo])
        results = run_local(task, [s.index for s in todo], parallel, on_done)
        return LaunchOutcome(todo, skipped, results)
    ids = submit_array(task, [s.index for s in todo], job_folder(base.results_dir),
                       settings or {}, job_name="capbench-matrix")
    manifest = _read_manifest(base.results_dir)
    for s, job_id in zip(todo, ids, strict=True):
        s.job_id, s.state = job_id, "queued"
        manifest[_cell_key(s.cell)] = {"job_id": job_id, "index": s.index, "arch": s.cell.arch,
                                       "encoder": s.cell.encoder, "seed": s.cell.seed,
                                       "variant": s.cell.variant}
    atomic_write_text(_manifest_path(base.results_dir), json.dumps(manifest, indent=1))
    return LaunchOutcome(todo, skipped)


def _refuse_unknown(states: list[CellState]) -> None:
    """CapbenchError when a cell's state is unknown (it might still be queued or running:
    running it again would train it twice)."""
    unknown = [s for s in states if s.state == "unknown"]
    if unknown:
        raise CapbenchError(f"{len(unknown)} cell(s) submitted to Slurm have no record and "
                            f"their state is unknown: {unknown[0].detail}")


def _prepare_features_once(base: RunConfig, cells: list[Cell]) -> None:
    """Extract (into the feature cache) each encoder's features once, before local processes
    start, so that parallel cells of one encoder read them rather than all extract them."""
    dataset, seen = resolve_dataset(base.dataset), set()
    for cell in cells:
        key = _feature_key(cell.cfg)
        if key not in seen:
            seen.add(key)
            prepare_features(cell.cfg, dataset, select_device(cell.cfg.device), None)


def wait_for_cells(base: RunConfig, plan: MatrixPlan, shard: Shard | None = None, *,
                   poll_s: float = 2.0, timeout_s: float | None = None,
                   on_poll: Callable[[list[CellState]], None] | None = None) -> list[CellState]:
    """Poll :func:`matrix_status` every ``poll_s`` seconds until no cell is queued or running;
    returns the last states. Raises CapbenchError after ``timeout_s`` (None: no limit)."""
    t0 = time.monotonic()
    while True:
        states = matrix_status(base, plan, shard)
        _refuse_unknown(states)
        if on_poll:
            on_poll(states)
        if not any(s.state in ("queued", "running") for s in states):
            return states
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise CapbenchError(f"cells still queued or running after {timeout_s:.0f} s; "
                                "see capbench matrix --status")
        time.sleep(poll_s)


def board_records(results_dir: str | Path, states: list[CellState]) -> list:
    """The run records of the ``done`` cells among ``states`` (the matrix's board)."""
    ids = {s.detail for s in states if s.state == "done"}
    return [r for r in load_records(results_dir)[0] if r.run_id in ids]


def write_board(results_dir: str) -> str:
    """Write ``<results_dir>/LEADERBOARD.md`` from every record there (the dependent job that
    ends an array, :func:`submit_board_job`). Returns the file's path."""
    records = load_records(results_dir)[0]
    return str(write_leaderboard_file(leaderboard(records), results_dir))


def submit_board_job(results_dir: str | Path, job_ids: Sequence[str], settings: dict) -> str:
    """Submit :func:`write_board` as a Slurm job that starts once every task of ``job_ids``
    (array task ids ``ARRAY_INDEX`` or job ids) has ended, however
    (``--dependency=afterany``). Returns its job id. Raises ConfigError when sbatch refuses it.
    """
    arrays = sorted({j.split("_")[0] for j in job_ids})
    light = {k: v for k, v in settings.items() if k in ("partition", "time_min", "sbatch")}
    light["sbatch"] = {**light.get("sbatch", {}),
                       "dependency": "afterany:" + ":".join(arrays)}
    executor = _executor(job_folder(results_dir), light, "capbench-board")
    with _scheduler("--board-job (the cells are submitted; see --status)"):
        return executor.submit(write_board, str(results_dir)).job_id
