"""Several processes, GPUs and machines through torch.distributed (launched by ``torchrun``).

Every helper works unchanged in a single process (rank 0 of 1), so the harness calls them
unconditionally. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set) the
harness calls :func:`init` once: backend ``nccl`` for CUDA and ``gloo`` for the CPU, or the
one ``CAPBENCH_DIST_BACKEND`` names (:func:`backend`; ``gloo`` lets several ranks share a GPU,
which NCCL refuses, so a one-GPU machine can run the CUDA code paths of DDP).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from benchmark.errors import CapbenchError, ConfigError
from benchmark.limits import cpu_count

__all__ = ["launched_by_torchrun", "launched_as_main", "backend", "init", "shutdown", "rank",
           "world_size", "local_rank",
           "is_main", "share", "all_or_none", "barrier", "all_gather_object", "all_reduce_sum",
           "broadcast_object", "launch", "timeout_seconds", "torchrun_args", "check_nproc",
           "check_launch", "relaunch"]


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def launched_as_main() -> bool:
    """Whether this process is rank 0 as ``torchrun`` numbered it (``RANK``; True outside
    torchrun), known before :func:`init` (the console output and records are rank 0's)."""
    return os.environ.get("RANK", "0") == "0"


BACKENDS = ("gloo", "nccl")


def backend(device_type: str) -> str:
    """The process-group backend for ranks on ``device_type`` (``"cuda"``, ``"cpu"``, ...):
    ``$CAPBENCH_DIST_BACKEND`` when set, else ``nccl`` on CUDA and ``gloo`` elsewhere. gloo
    also reduces CUDA tensors (through host memory, slower than NCCL) and, unlike NCCL, lets
    several ranks share one GPU. Raises ConfigError for another name, or for ``nccl``
    without CUDA."""
    name = os.environ.get("CAPBENCH_DIST_BACKEND", "").strip().lower()
    if not name:
        return "nccl" if device_type == "cuda" else "gloo"
    if name not in BACKENDS:
        raise ConfigError(f"CAPBENCH_DIST_BACKEND={name!r}: choose gloo or nccl (or leave it "
                          "unset: nccl on CUDA, gloo on the CPU)")
    if name == "nccl" and device_type != "cuda":
        raise ConfigError(f"CAPBENCH_DIST_BACKEND=nccl needs CUDA, but the ranks run on "
                          f"{device_type}: unset it or say --device cuda")
    return name


def init(device: torch.device) -> None:
    """Join the process group that ``torchrun`` set up (no-op when not launched by it or
    already joined), with :func:`backend`'s backend; on CUDA each rank first makes
    ``device`` (its GPU, :func:`benchmark.device.select_device`) the current one.
    Collectives time out after ``CAPBENCH_DIST_TIMEOUT`` seconds (default 4 hours: the other
    ranks wait while rank 0 scores and writes)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    name = backend(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else local_rank())
    dist.init_process_group(name, timeout=timedelta(seconds=timeout_seconds()))


def timeout_seconds() -> int:
    """How long a collective waits for the other ranks: ``$CAPBENCH_DIST_TIMEOUT`` seconds,
    default 14400 (4 hours: rank 0 alone scores the test split and writes the record while
    the others wait, far longer than torch's default 10 minutes). Raises ConfigError for a
    value that is not a whole number of seconds >= 1."""
    text = os.environ.get("CAPBENCH_DIST_TIMEOUT", "").strip()
    if not text:
        return 14400
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"CAPBENCH_DIST_TIMEOUT={text!r}: give a whole number of seconds, at "
                          "least 1 (or leave it unset: 14400, 4 hours)")
    return value


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m benchmark.cli *argv`` as ``nproc`` processes on this machine through
    PyTorch's own launcher, in this process: exactly ``torchrun --standalone
    --nproc-per-node nproc -m benchmark.cli *argv`` (``torch.distributed.run``). Returns the
    exit code: 0; the exit code of the rank that failed first (2 when it reported a user
    mistake; the ranks it stopped exit 2 as well, so the first is the one that counts); or
    128 + the signal number when interrupted (130 for Ctrl-C, 143 for SIGTERM). Each failed
    rank has printed its own error, so torchrun's traceback of the failure is not shown
    again."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(torchrun_args(nproc, argv))
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:
        return 130
    return 0


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    """The arguments of ``torchrun`` that run ``python -m benchmark.cli *argv`` as ``nproc``
    processes on this machine: the one place the launch command line is built."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "benchmark.cli", *argv]


def check_nproc(nproc: int) -> None:
    """ConfigError for ``--nproc`` below 1 or above the CPU cores capbench may use (each
    process needs one, :func:`benchmark.limits.cpu_count`)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if nproc > cpu_count():
        raise ConfigError(f"--nproc {nproc}: this machine gives capbench {cpu_count()} CPU cores "
                          f"and each process needs one; use at most --nproc {cpu_count()}")


def check_launch(device: str, nproc: int, select: Callable[[str], torch.device]) -> None:
    """What ``nproc`` ranks on ``device`` (a ``--device`` spec) cannot take, said once before
    any process starts: a ``cuda:N`` device (each rank takes its own GPU), a device this
    machine lacks (``select``, :func:`benchmark.device.select_device`, passed in because
    that module imports this one), a bad ``CAPBENCH_DIST_BACKEND`` or
    ``CAPBENCH_DIST_TIMEOUT``, or more NCCL ranks than GPUs. Raises ConfigError."""
    if device.startswith("cuda:"):
        raise ConfigError(f"--nproc with --device {device}: each process takes its own GPU; say "
                          "--device cuda (or auto)")
    kind = select(device).type
    name = backend(kind)
    timeout_seconds()
    gpus = torch.cuda.device_count()
    if kind == "cuda" and gpus < nproc and name != "gloo":
        raise ConfigError(f"--nproc {nproc}: this machine has {gpus} GPU(s); use at most one "
                          "process a GPU (or set CAPBENCH_DIST_BACKEND=gloo to let processes "
                          "share them)")


def relaunch(nproc: int, argv: list[str], log: Callable[[str], None]) -> int:
    """Run the command ``argv`` (``sys.argv[1:]``) again as ``nproc`` processes under
    torchrun (:func:`launch`), without its ``--nproc`` option; ``log(text)`` is told the
    command line and, when the ranks fail, what happened. Returns the exit code."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, rest)]
    log(f"launching: {' '.join(cmd)}")
    code = launch(nproc, rest)
    if code:
        log(f"error: the {nproc} processes stopped (exit code {code}); each failed rank's "
            "error is printed above. Records already written are kept.")
    return code


def shutdown() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if _on() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if _on() else 1


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 when not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes records, checkpoints and the console output (rank 0)."""
    return rank() == 0


def share(items: list) -> list:
    """This rank's items of a sharded job: ``items[r::W]`` for rank ``r`` of ``W``, as torch's
    DistributedSampler assigns them without shuffling or padding (every item in a single
    process; an empty list for a rank beyond the last item)."""
    return items[rank()::world_size()]


def all_or_none(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, where ranks do different work before a collective: when it
    raises on any rank, every rank raises (that rank its own error, the others a
    CapbenchError naming it) instead of the others waiting in the next collective until the
    timeout. One extra ``all_gather_object``; in a single process just ``fn()``."""
    try:
        out, err = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        out, err = None, exc
    errors = all_gather_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise CapbenchError(f"rank {failed[0][0]} failed, so this rank stops too: {failed[0][1]}")
    return out


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _on():
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not _on():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (unchanged when not distributed); returns ``t``."""
    if _on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
