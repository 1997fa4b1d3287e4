"""Facts for ``capbench doctor``: cache folders and pretrained weights already on disk."""

from __future__ import annotations

import os
from pathlib import Path

from benchmark.paths import cache_root

__all__ = ["cache_report", "local_weights"]


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total


def _hf_hub_dir() -> Path:
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", Path(hf_home) / "hub"))


def _torch_hub_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_report() -> dict[str, tuple[Path, int]]:
    """``{name: (folder, bytes)}`` for capbench's feature/dataset caches and the model hubs."""
    root = cache_root()
    return {name: (p, _size(p) if p.exists() else 0) for name, p in {
        "features": root / "features", "datasets": root / "datasets",
        "torch hub": _torch_hub_dir(), "hugging face hub": _hf_hub_dir()}.items()}


def local_weights() -> list[str]:
    """Weights already cached: torchvision checkpoints and timm/open_clip hub snapshots."""
    found = []
    tv = _torch_hub_dir()
    if tv.is_dir():
        found += [f"torchvision: {p.name}" for p in sorted(tv.glob("*.pth"))]
    hub = _hf_hub_dir()
    if hub.is_dir():
        found += [f"hf hub: {p.name.removeprefix('models--').replace('--', '/')}"
                  for p in sorted(hub.glob("models--*"))
                  if any(s in p.name.lower() for s in ("timm", "clip", "vit"))]
    return found
