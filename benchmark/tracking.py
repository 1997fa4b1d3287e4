"""Experiment tracking of a training run: ``log: none | tensorboard | wandb``.

Each epoch's figures (training loss, learning rate, validation CIDEr-D, training tokens/s,
and SCST's mean sample reward) go to TensorBoard (``torch.utils.tensorboard``, event files
under ``<results_dir>/tensorboard/<run_id>/``) or to Weights & Biases (project
``capbench``, run name = run id, the resolved config as the run's config). Without a W&B
key (``WANDB_API_KEY`` or ``wandb login``) W&B runs in offline mode under
``<results_dir>/wandb/`` (``wandb sync`` uploads it later), so a run never waits for a
login or a network. The run record holds the same history either way.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmark.errors import ConfigError

__all__ = ["TRACKERS", "check_tracker", "open_tracker", "Tracker"]

TRACKERS = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(kind: str) -> None:
    """ConfigError, before any work, for an unknown tracker or one whose package is missing."""
    if kind not in TRACKERS:
        raise ConfigError(f"log = {kind!r}: choose {', '.join(TRACKERS)}")
    if kind != "none":
        import importlib.util

        if importlib.util.find_spec(_PACKAGES[kind]) is None:
            raise ConfigError(f"log = {kind!r} needs the {_PACKAGES[kind]} package: pip install "
                              f"'capbench[logging]' (or pip install {_PACKAGES[kind]}), or use "
                              "--log none")


class Tracker:
    """Where a run's per-epoch figures go; :meth:`log` takes a flat dict of numbers and the
    epoch. ``location``: the folder it writes (None for ``none``)."""

    location: Path | None = None

    def log(self, values: dict[str, float], step: int) -> None:
        """Record ``values`` (name -> number) at epoch ``step``."""

    def close(self) -> None:
        """Flush and close."""


class _TensorBoard(Tracker):
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.location = folder
        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, values, step):
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)

    def close(self):
        self._writer.close()


class _WandB(Tracker):
    def __init__(self, folder: Path, run_id: str, config: dict) -> None:
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        online = bool(os.environ.get("WANDB_API_KEY")) or bool(_stored_wandb_key())
        mode = os.environ.get("WANDB_MODE") or ("online" if online else "offline")
        self.mode = mode
        self.location = folder
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "capbench"), name=run_id,
                               id=run_id, config=config, dir=str(folder), mode=mode,
                               resume="allow", reinit="finish_previous")

    def log(self, values, step):
        self._run.log(dict(values), step=step)

    def close(self):
        self._run.finish()


def _stored_wandb_key() -> str | None:
    try:
        import netrc

        auth = netrc.netrc().authenticators("api.wandb.ai")
        return auth[2] if auth else None
    except (OSError, netrc.NetrcParseError):
        return None


def open_tracker(kind: str, results_dir: str | Path, run_id: str, config: dict) -> Tracker:
    """The tracker ``kind`` for run ``run_id`` (see the module docstring)."""
    check_tracker(kind)
    root = Path(results_dir)
    if kind == "tensorboard":
        return _TensorBoard(root / "tensorboard" / run_id)
    if kind == "wandb":
        return _WandB(root / "wandb", run_id, config)
    return Tracker()
