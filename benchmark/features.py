"""Frozen-encoder features, computed once and cached on disk as safetensors.

The cache key hashes everything that determines the features: the encoder name, its weights
(pretrained tag, weights-file digest or ``random-init:seed=S``), its preprocessing, the
storage dtype and the image set (ids, paths, sizes and modification times). Any change of a
part gives a new key, so a stale file is never read. Every decoder and every later run on
the same images reuses one file. (Fine-tuning an encoder would bypass this cache: the
harness then calls the encoder on pixels, see :class:`ImageFolderDataset`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from benchmark.data import ImageRecord
from benchmark.errors import CapbenchWarning, DatasetError
from benchmark.fsutil import atomic_write, ensure_writable, remove_stale_temps
from benchmark.paths import cache_root

FORMAT_VERSION = 1

__all__ = ["FeatureStore", "ImageFolderDataset", "feature_cache_key", "extract_features",
           "load_or_extract", "default_num_workers", "feature_bytes"]


class ImageFolderDataset(Dataset):
    """Images of a list of :class:`ImageRecord` through an encoder's transform: ``(3, H, W)``."""

    def __init__(self, images: list[ImageRecord], transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.images[i].path
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB"))
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc


@dataclass
class FeatureStore:
    """Cached features of an image set: ``grid (N, L, D)``, ``pooled (N, P)`` and row index.

    Tensors are stored as float16 (float32 if a value would overflow float16) and returned in
    that dtype; :meth:`rows` converts a batch to float32 on the requested device.
    """

    grid: torch.Tensor
    pooled: torch.Tensor
    image_ids: list
    key: str
    path: Path | None = None
    extraction_images_per_s: float | None = None
    cache_hit: bool = False
    stats: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self.index = {iid: i for i, iid in enumerate(self.image_ids)}

    def standardize(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Z-score every channel with mean/std over ``rows`` (the train split); return stats.

        Frozen backbones emit features of very different scales (a random-init ResNet-50's
        have std ~20, CLIP's ~1); the harness normalises them identically for every decoder.
        Statistics come from training images only and are saved with the checkpoint.
        """
        rows = rows.to(self.grid.device)
        g = self.grid.index_select(0, rows).float().flatten(0, 1)
        p = self.pooled.index_select(0, rows).float()
        self.stats = {"grid_mean": g.mean(0), "grid_std": g.std(0).clamp_min(1e-6),
                      "pooled_mean": p.mean(0), "pooled_std": p.std(0).clamp_min(1e-6)}
        return self.stats

    def row_ids(self, images: list[ImageRecord]) -> torch.Tensor:
        """Row numbers ``(len(images),)`` of these images in the store."""
        return torch.tensor([self.index[im.image_id] for im in images], dtype=torch.long)

    def rows(self, rows: torch.Tensor, device: torch.device | str = "cpu"):
        """``(grid (B, L, D), pooled (B, P))`` float32 on ``device`` for row numbers ``rows``."""
        rows = rows.to(self.grid.device)
        g, p = self.grid.index_select(0, rows), self.pooled.index_select(0, rows)
        g, p = g.to(device, torch.float32, non_blocking=True), p.to(device, torch.float32)
        if self.stats is not None:
            st = {k: v.to(device) for k, v in self.stats.items()}
            g = (g - st["grid_mean"]) / st["grid_std"]
            p = (p - st["pooled_mean"]) / st["pooled_std"]
        return g, p

    def copy(self) -> FeatureStore:
        """A store sharing this one's feature tensors, without normalisation statistics (so
        that one run's :meth:`standardize` never changes another's features)."""
        return FeatureStore(self.grid, self.pooled, self.image_ids, self.key, self.path,
                            self.extraction_images_per_s, self.cache_hit)

    def to(self, device) -> FeatureStore:
        """A copy whose tensors live on ``device`` (e.g. the whole store on the GPU)."""
        stats = {k: v.to(device) for k, v in self.stats.items()} if self.stats else None
        return FeatureStore(self.grid.to(device), self.pooled.to(device), self.image_ids,
                            self.key, self.path, self.extraction_images_per_s, self.cache_hit,
                            stats)


def feature_cache_key(identity: dict[str, str], images: list[ImageRecord]) -> str:
    """sha256 (24 hex digits) of the encoder identity and the image set."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, **identity}, sort_keys=True).encode())
    for im in images:
        try:
            st = im.path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\n{im.image_id}|{im.path.resolve()}|{stamp}".encode())
    return h.hexdigest()[:24]


def default_num_workers() -> int:
    """DataLoader workers: none on a <=2-core machine (they would steal the encoder's cores)."""
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n - 1)


def extract_features(encoder, images: list[ImageRecord], *, batch_size: int = 32,
                     device: str | torch.device = "cpu", num_workers: int | None = None,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run ``encoder`` over ``images`` from disk.

    Returns ``grid (N, L, D)``, ``pooled (N, P)`` (float32, CPU) and end-to-end images/s
    (decode + preprocess + forward). ``progress`` is an optional callable(n_done).
    """
    device = torch.device(device)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = DataLoader(ImageFolderDataset(images, encoder.transform), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    encoder = encoder.to(device).eval()
    grids, pooleds = [], []
    t0 = time.perf_counter()
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for pixels in loader:
            g, p = encoder(pixels.to(device, non_blocking=True))
            grids.append(g.float().cpu())
            pooleds.append(p.float().cpu())
            if progress:
                progress(len(pixels))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return torch.cat(grids), torch.cat(pooleds), len(images) / max(elapsed, 1e-9)


def storage_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the feature cache stores it: float16, or float32 when a value would overflow
    float16 (``|x| >= 60000``); contiguous."""
    finite16 = t.abs().max() < 60000 if t.numel() else True
    return t.half().contiguous() if finite16 else t.float().contiguous()


def feature_bytes(encoder, n_images: int) -> int:
    """Bytes of the cached features of ``n_images`` images (float16 grid and pooled vector)."""
    return n_images * (encoder.grid_size * encoder.grid_dim + encoder.pooled_dim) * 2


def load_or_extract(encoder, images: list[ImageRecord], *, cache_dir: str | Path | None = None,
                    batch_size: int = 32, device: str | torch.device = "cpu",
                    num_workers: int | None = None, progress=None) -> FeatureStore:
    """Features of ``images`` from the cache, or extracted now and cached (atomic write).

    The file is ``<cache>/features/<encoder>-<key>.safetensors``; ``cache_dir`` defaults to
    the capbench cache root. Before extracting, the cache folder must be writable with room
    for the file (StorageError otherwise, so no extraction is wasted); temp files of killed
    extractions are removed. If saving still fails, the features are used uncached and a
    CapbenchWarning says why.
    """
    identity = encoder.cache_identity()
    key = feature_cache_key(identity, images)
    folder = Path(cache_dir) if cache_dir else cache_root() / "features"
    path = folder / f"{identity['encoder']}-{key}.safetensors"
    ids = [im.image_id for im in images]
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("image_ids", "[]")) == ids:
                    grid, pooled = f.get_tensor("grid"), f.get_tensor("pooled")
                    return FeatureStore(grid, pooled, ids, key, path, None, cache_hit=True)
        except Exception:  # unreadable/truncated cache file: recompute and overwrite
            pass
    ensure_writable(folder, need_bytes=feature_bytes(encoder, len(images)), what="feature cache",
                    hint="Set CAPBENCH_CACHE (or features.cache_dir in the config) to a writable "
                         "folder with enough space; `capbench doctor` shows the caches.")
    remove_stale_temps(folder)
    grid, pooled, ips = extract_features(encoder, images, batch_size=batch_size, device=device,
                                         num_workers=num_workers, progress=progress)
    grid, pooled = storage_precision(grid), storage_precision(pooled)
    meta = {"image_ids": json.dumps(ids), "identity": json.dumps(identity), "key": key}
    try:
        atomic_write(path, lambda tmp: save_file({"grid": grid, "pooled": pooled}, tmp, metadata=meta))
    except (OSError, SafetensorError) as exc:
        warnings.warn(f"could not save the features to the cache {path} ({exc}); this run uses "
                      "them uncached and the next run will extract them again", CapbenchWarning,
                      stacklevel=2)
        path = None
    return FeatureStore(grid, pooled, ids, key, path, ips, cache_hit=False)
