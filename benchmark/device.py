"""The machine a run uses: device choice, synchronisation, seeding and peak memory."""

from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch

from benchmark.distributed import backend
from benchmark.errors import ConfigError

__all__ = ["select_device", "synchronize", "seed_everything", "peak_memory", "peak_memory_mb"]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is checked to exist. Under ``torchrun``,
    ``cuda`` without a number is this process's GPU (``cuda:LOCAL_RANK``); with
    ``CAPBENCH_DIST_BACKEND=gloo`` ranks beyond the machine's GPUs share them
    (``cuda:LOCAL_RANK % count``; NCCL refuses two ranks on one GPU).

    Raises ConfigError for a name torch does not know or a device this machine lacks.
    """
    dev = _select_device(name)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        rank, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if rank >= count:
            if backend("cuda") != "gloo":
                raise ConfigError(f"local rank {rank} has no GPU of its own (this machine has "
                                  f"{count}): start at most one process a GPU, or set "
                                  "CAPBENCH_DIST_BACKEND=gloo to let ranks share them")
            rank %= count
        return torch.device("cuda", rank)
    return dev


def _select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), numbered from 0")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS (Apple GPU) is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: capbench runs on cpu, cuda or mps")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA/MPS) so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> dict:
    """``{"kind", "bytes"}``: CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": "process_max_rss", "bytes": int(rss_kib) * 1024}


def peak_memory_mb(device: torch.device) -> float:
    """:func:`peak_memory` in MiB."""
    return peak_memory(device)["bytes"] / 2**20
