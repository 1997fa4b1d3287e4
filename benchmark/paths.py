"""Where capbench keeps derived data: ``$CAPBENCH_CACHE`` or the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root: ``$CAPBENCH_CACHE`` if set, else platformdirs' user cache dir."""
    env = os.environ.get("CAPBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("capbench"))
