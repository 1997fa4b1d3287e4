"""Up-front checks that a requested size fits this machine, before any work starts.

Sizes a user types (bootstrap resamples, benchmark workloads, processes) are checked against
the memory and cores the machine has, as the feature cache checks its disk ("needs about
X GiB"), so a typo such as ``--resamples 100000000`` is one clear error instead of a process
the kernel kills after minutes.
"""

from __future__ import annotations

import os

from benchmark.errors import ResourceError

__all__ = ["available_memory", "check_memory", "cpu_count", "GIB"]

GIB = 1024**3


def available_memory() -> int:
    """Bytes of memory a new allocation can have without swapping: ``MemAvailable`` of
    ``/proc/meminfo`` on Linux, else free physical pages (``os.sysconf``)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(need: float, what: str, fix: str) -> None:
    """Raise ResourceError when ``need`` bytes exceed the memory available now.

    ``what`` names the request (``--resamples 100000000 over 1,000 images``) and ``fix`` says
    what to do instead; the message gives both sizes in GiB.
    """
    have = available_memory()
    if need > have:
        raise ResourceError(f"{what} needs about {need / GIB:,.1f} GiB of memory and "
                            f"{have / GIB:,.1f} GiB is available: {fix}")


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
