"""Frozen-encoder features, computed once and cached on disk as a sharded store.

The cache key hashes everything that determines the features: the encoder name, its weights
(pretrained tag, weights-file digest or ``random-init:seed=S``), its preprocessing, the
storage dtype and the image set (ids, paths, sizes and modification times). Any change of a
part gives a new key, so a stale store is never read. Every decoder and every later run on
the same images reuses one store. (Fine-tuning an encoder bypasses this cache: the harness
then calls the encoder on pixels, see :class:`benchmark.pixels.ImageFolderDataset`.)

A store is a folder of fixed-size safetensors shards plus a manifest written last, so that
extraction, statistics, training and decoding all stream: memory holds a shard while
extracting and a batch while reading, whatever the number of images (Karpathy COCO's
123,287 ResNet-50 grids are 24.7 GB at float16). See :func:`load_or_extract`.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from benchmark import distributed
from benchmark.data import ImageRecord
from benchmark.errors import DatasetError, StorageError
from benchmark.fsutil import atomic_write, atomic_write_text, ensure_writable, remove_stale_temps
from benchmark.paths import cache_root
from benchmark.pixels import check_image_decoder, jpeg_decoder, pixel_batches

FORMAT_VERSION = 2  # 2: a folder of shards (1: one safetensors file)
SHARD_BYTES = 256 * 2**20  # float16 features per shard file
MANIFEST = "manifest.json"

__all__ = ["FeatureStore", "FeatureStats", "ShardedRows", "feature_cache_key",
           "extract_features", "encode_batches", "load_or_extract", "open_store", "store_folder",
           "shard_images", "channel_stats", "take_rows", "write_shard", "write_manifest",
           "default_num_workers", "feature_bytes", "store_identity", "extraction_mode"]


class ShardedRows:
    """One tensor of a sharded feature store (``grid`` or ``pooled``), read by row number.

    The shards are safetensors files with ``S`` rows each (the last may have fewer). Rows are
    read with positioned reads (``os.preadv``) straight into the output tensor, so only the
    rows asked for are ever in the process's memory: the page cache, not the process, holds
    the file. (A memory map would count every page read so far in the resident set.) File
    handles are opened lazily per process, so a store can be sent to DataLoader workers.

    ``shape``: ``(N, *row_shape)``; ``dtype``: float16, or float32 when any shard is float32.
    """

    def __init__(self, files: list[Path], name: str, headers: list[tuple[int, dict]] | None = None,
                 ) -> None:
        self.files, self.name = [Path(f) for f in files], name
        self._fds: dict[int, int] = {}
        # headers: the files' (data offset, header) when the caller has read them already
        headers = headers or [_safetensors_header(f) for f in self.files]
        infos = [h[name] for _, h in headers]
        self._data_start = [start + info["data_offsets"][0]
                            for (start, _), info in zip(headers, infos, strict=True)]
        counts = [info["shape"][0] for info in infos]
        self.row_shape = tuple(infos[0]["shape"][1:]) if infos else ()
        self._dtypes = [_DTYPES[info["dtype"]] for info in infos]
        self.dtype = torch.float16 if all(d == torch.float16 for d in self._dtypes) \
            else torch.float32
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        self.shape = (self._starts[-1], *self.row_shape)
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor at its stored precision."""
        per_row = math.prod(self.row_shape)
        return sum((b - a) * per_row * d.itemsize for a, b, d in
                   zip(self._starts[:-1], self._starts[1:], self._dtypes, strict=True))

    def _read(self, shard: int, first: int, out: torch.Tensor) -> None:
        """Fill ``out`` (``(n, *row_shape)``, contiguous) with rows ``first..first+n`` of
        ``shard`` (shard-local numbers)."""
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        dtype = self._dtypes[shard]
        buf = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype)
        row_bytes = math.prod(self.row_shape) * dtype.itemsize
        view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
        offset = self._data_start[shard] + first * row_bytes
        while len(view):
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                raise DatasetError(f"feature shard {self.files[shard]} is shorter than its header "
                                   "says; delete the feature cache folder to extract again")
            view, offset = view[n:], offset + n
        if buf is not out:
            out.copy_(buf)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (``(B,)`` int) as a CPU tensor ``(B, *row_shape)`` of :attr:`dtype`;
        runs of consecutive rows are read in one call."""
        rows = rows.to("cpu", torch.long)
        order = torch.argsort(rows)
        wanted = rows[order].tolist()
        out = torch.empty((len(wanted), *self.row_shape), dtype=self.dtype)
        i = 0
        while i < len(wanted):
            if not 0 <= wanted[i] < self.shape[0]:
                raise IndexError(f"row {wanted[i]} of a store with {self.shape[0]} rows")
            shard = bisect.bisect_right(self._starts, wanted[i]) - 1
            j = i + 1
            while (j < len(wanted) and wanted[j] == wanted[j - 1] + 1
                   and wanted[j] < self._starts[shard + 1]):
                j += 1
            self._read(shard, wanted[i] - self._starts[shard], out[i:j])
            i = j
        if bool((order[1:] > order[:-1]).all()):  # asked in ascending order: no reordering
            return out
        result = torch.empty_like(out)
        result[order] = out
        return result

    def all(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every row, ``(N, *row_shape)`` on ``device``, filled shard by shard (memory: the
        result plus one shard), for stores that fit."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        on_cpu = out.device.type == "cpu"
        for s, (a, b) in enumerate(zip(self._starts[:-1], self._starts[1:], strict=True)):
            if on_cpu:
                self._read(s, 0, out[a:b])
            else:
                buf = torch.empty((b - a, *self.row_shape), dtype=self.dtype)
                self._read(s, 0, buf)
                out[a:b].copy_(buf)
        return out


def take_rows(source: torch.Tensor | ShardedRows, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of an in-memory tensor or a :class:`ShardedRows`, at stored precision,
    on the source's device."""
    if isinstance(source, ShardedRows):
        return source.take(rows)
    return source.index_select(0, rows.to(source.device))


def channel_stats(source: torch.Tensor | ShardedRows, rows: torch.Tensor, *,
                  flatten_tokens: bool, chunk_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std ``(D,)`` (float32) of ``rows`` of ``source``, in one
    streaming pass over chunks of ``chunk_rows`` rows with float64 accumulators, merged with
    Chan et al.'s parallel update (Chan, Golub & LeVeque 1979; Welford 1962 for one value at a
    time). Memory is one chunk, whatever the number of rows. ``flatten_tokens``: a grid
    ``(N, L, D)`` counts each of its ``L`` tokens as a sample.
    Raises DatasetError for fewer than two samples.
    """
    rows = torch.sort(rows.to("cpu", torch.long)).values  # sequential reads
    count, mean, m2 = 0, None, None
    for start in range(0, len(rows), chunk_rows):
        x = take_rows(source, rows[start : start + chunk_rows]).to(torch.float64)
        x = x.flatten(0, 1) if flatten_tokens else x
        n = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0)
        if mean is None:
            count, mean, m2 = n, mean_b, m2_b
            continue
        delta, total = mean_b - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + m2_b + delta.square() * (count * n / total)
        count = total
    if count < 2:
        raise DatasetError(f"feature statistics need at least two samples, got {count}: the "
                           "train split needs more images (or set features.normalize: false)")
    return mean.float(), (m2 / (count - 1)).sqrt().float()


@dataclass
class FeatureStats:
    """The per-channel z-score statistics of a run's features: ``grid_mean``/``grid_std``
    ``(D,)`` over every grid token and ``pooled_mean``/``pooled_std`` ``(P,)`` over the pooled
    vectors of the train split (float32; the stds clamped at 1e-6). The one place they are
    computed (:meth:`of`), applied (:meth:`normalize`), inverted (:meth:`invert_grid`), saved
    and loaded (``feature_stats.safetensors`` of a checkpoint, one float vector per field).

    Frozen backbones emit features of very different scales (a random-init ResNet-50's have
    std ~20, CLIP's ~1); the harness normalises them identically for every decoder.
    """

    grid_mean: torch.Tensor
    grid_std: torch.Tensor
    pooled_mean: torch.Tensor
    pooled_std: torch.Tensor

    #: the tensor names in feature_stats.safetensors
    KEYS: ClassVar[tuple[str, ...]] = ("grid_mean", "grid_std", "pooled_mean", "pooled_std")

    @classmethod
    def of(cls, grid: torch.Tensor | ShardedRows, pooled: torch.Tensor | ShardedRows,
           rows: torch.Tensor, device: torch.device | str = "cpu") -> FeatureStats:
        """Mean and std over ``rows`` of ``grid (N, L, D)`` and ``pooled (N, P)`` in one
        streaming pass each (:func:`channel_stats`), on ``device``.
        Raises DatasetError for fewer than two rows."""
        gm, gs = channel_stats(grid, rows, flatten_tokens=True)
        pm, ps = channel_stats(pooled, rows, flatten_tokens=False)
        return cls(gm.to(device), gs.clamp_min(1e-6).to(device), pm.to(device),
                   ps.clamp_min(1e-6).to(device))

    def normalize(self, grid: torch.Tensor, pooled: torch.Tensor):
        """``((grid - grid_mean) / grid_std, (pooled - pooled_mean) / pooled_std)`` for
        ``grid (B, N, D)`` and ``pooled (B, P)``, on their device, in the dtype PyTorch's
        promotion gives (float32 for float16/float32 inputs). Differentiable."""
        return ((grid - self.grid_mean.to(grid.device)) / self.grid_std.to(grid.device),
                (pooled - self.pooled_mean.to(pooled.device)) / self.pooled_std.to(pooled.device))

    def invert_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Raw grid features ``(B, N, D)`` back from normalised ones (the inverse of
        :meth:`normalize` for the grid). Differentiable."""
        return grid * self.grid_std.to(grid.device) + self.grid_mean.to(grid.device)

    def to(self, device: torch.device | str) -> FeatureStats:
        """The statistics on ``device``."""
        return FeatureStats(*(getattr(self, k).to(device) for k in self.KEYS))

    def save(self, path: str | Path) -> None:
        """Write the four vectors to the safetensors file ``path`` (on the CPU)."""
        save_file({k: getattr(self, k).cpu().contiguous() for k in self.KEYS}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file :meth:`save` wrote; a field it lacks is None (see :meth:`problem`).
        Raises what ``safetensors`` raises for an unreadable file."""
        tensors = load_file(str(path))
        return cls(*(tensors.get(k) for k in cls.KEYS))

    def problem(self, grid_dim: int, pooled_dim: int, encoder: str) -> str | None:
        """``'pooled_std' should be a float vector of 512 values (the resnet18 features), got
        missing`` for the first field that is not a float vector of its dimension (features
        of ``encoder``: ``grid_dim`` D, ``pooled_dim`` P), else None."""
        dims = {"grid": grid_dim, "pooled": pooled_dim}
        for name in self.KEYS:
            t = getattr(self, name)
            want = dims[name.partition("_")[0]]
            if t is None or not t.is_floating_point() or tuple(t.shape) != (want,):
                got = "missing" if t is None else \
                    f"{str(t.dtype).removeprefix('torch.')} of shape {tuple(t.shape)}"
                return (f"{name!r} should be a float vector of {want} values (the {encoder} "
                        f"features), got {got}")
        return None


@dataclass
class FeatureStore:
    """Features of an image set: ``grid (N, L, D)``, ``pooled (N, P)`` and row index.

    ``grid``/``pooled`` are either in-memory tensors or :class:`ShardedRows` read from the
    cache's shard files on demand (so memory does not grow with ``N``). Values are stored as
    float16 (float32 if a value would overflow float16); :meth:`rows` returns a batch as
    float32 on the requested device, normalised when :attr:`stats` is set.
    """

    grid: torch.Tensor | ShardedRows
    pooled: torch.Tensor | ShardedRows
    image_ids: list
    key: str
    path: Path | None = None
    extraction_images_per_s: float | None = None
    cache_hit: bool = False
    stats: FeatureStats | None = None

    def __post_init__(self) -> None:
        self.index = {iid: i for i, iid in enumerate(self.image_ids)}

    @property
    def sharded(self) -> bool:
        """Whether the features are read from shard files (not held in memory)."""
        return isinstance(self.grid, ShardedRows)

    @property
    def device(self) -> torch.device:
        return self.grid.device

    @property
    def nbytes(self) -> int:
        """Bytes of ``grid`` and ``pooled`` at stored precision."""
        return sum(t.nbytes if isinstance(t, ShardedRows) else t.numel() * t.element_size()
                   for t in (self.grid, self.pooled))

    def standardize(self, rows: torch.Tensor) -> FeatureStats:
        """Z-score every channel with mean/std over ``rows`` (the train split); return the
        statistics (:meth:`FeatureStats.of`, on the store's device), which are saved with the
        checkpoint. Statistics come from training images only, in one streaming pass.
        """
        self.stats = FeatureStats.of(self.grid, self.pooled, rows, self.device)
        return self.stats

    def row_ids(self, images: list[ImageRecord]) -> torch.Tensor:
        """Row numbers ``(len(images),)`` of these images in the store."""
        return torch.tensor([self.index[im.image_id] for im in images], dtype=torch.long)

    def raw(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid (B, L, D), pooled (B, P))`` of row numbers ``rows`` at stored precision, on
        the store's device (what a DataLoader worker reads)."""
        return take_rows(self.grid, rows), take_rows(self.pooled, rows)

    def normalize(self, grid: torch.Tensor, pooled: torch.Tensor, device):
        """A raw batch as float32 on ``device``, z-scored with :attr:`stats` when set."""
        g = grid.to(device, torch.float32, non_blocking=True)
        p = pooled.to(device, torch.float32, non_blocking=True)
        return self.stats.normalize(g, p) if self.stats is not None else (g, p)

    def rows(self, rows: torch.Tensor, device: torch.device | str = "cpu"):
        """``(grid (B, L, D), pooled (B, P))`` float32 on ``device`` for row numbers ``rows``."""
        return self.normalize(*self.raw(rows), device)

    def batches(self, batches: list[torch.Tensor], device, num_workers: int = 0):
        """Yield :meth:`rows` of each row batch in ``batches``, in order. A sharded store on
        the CPU is read ahead by a DataLoader with ``num_workers`` worker processes (pinned
        memory when ``device`` is CUDA); otherwise batches are read as they are needed."""
        device = torch.device(device)
        if num_workers > 0 and self.device.type == "cpu":
            loader = DataLoader(_RawBatches(self, batches), batch_size=None, shuffle=False,
                                num_workers=num_workers, pin_memory=device.type == "cuda",
                                prefetch_factor=4, persistent_workers=False,
                                generator=torch.Generator())  # not the global random stream
            for g, p in loader:
                yield self.normalize(g, p, device)
        else:
            for b in batches:
                yield self.rows(b, device)

    def copy(self) -> FeatureStore:
        """A store sharing this one's feature tensors, without normalisation statistics (so
        that one run's :meth:`standardize` never changes another's features)."""
        return FeatureStore(self.grid, self.pooled, self.image_ids, self.key, self.path,
                            self.extraction_images_per_s, self.cache_hit)

    def to(self, device) -> FeatureStore:
        """A copy whose features are in-memory tensors on ``device`` (e.g. the whole store
        on the GPU when it fits, see :meth:`fits_on`)."""
        stats = self.stats.to(device) if self.stats is not None else None
        grid, pooled = (t.all(device) if isinstance(t, ShardedRows) else t.to(device)
                        for t in (self.grid, self.pooled))
        return FeatureStore(grid, pooled, self.image_ids, self.key,
                            self.path, self.extraction_images_per_s, self.cache_hit, stats)

    def fits_on(self, device, fraction: float = 0.5) -> bool:
        """Whether the whole store takes at most ``fraction`` of ``device``'s free memory
        (CUDA; always False for other devices)."""
        device = torch.device(device)
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        size = sum(math.prod(t.shape) * t.dtype.itemsize for t in (self.grid, self.pooled))
        return size <= fraction * free  # at the dtype .to() gives (float32 if any shard is)


class _RawBatches(Dataset):
    """Raw row batches of a store, one item per batch (for a prefetching DataLoader)."""

    def __init__(self, store: FeatureStore, batches: list[torch.Tensor]) -> None:
        self.store, self.batches = store, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.store.raw(self.batches[i])


_DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}
_MAX_HEADER = 100_000_000  # bytes; the safetensors format's own limit on its JSON header


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """``(byte offset of the data, header)`` of a safetensors file (its documented layout: an
    8-byte little-endian header length, then the JSON header). Raises DatasetError."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > _MAX_HEADER:  # a damaged file: do not try to read terabytes
                raise ValueError(f"header length {n} exceeds safetensors' limit")
            return 8 + n, json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise DatasetError(f"cannot read the feature shard {path}: {exc}") from exc


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


def encode_batches(encoder, images: list[ImageRecord], batches: list[list[int]], *,
                   device: str | torch.device = "cpu", num_workers: int | None = None,
                   progress=None, image_decoder: str = "pil"):
    """Yield ``(grid (b, L, D), pooled (b, P))`` (float32, CPU) for each list of positions in
    ``batches``, in order, reading ``images`` from disk through one DataLoader (one pool of
    ``num_workers`` workers for all batches). On CUDA: bf16 autocast, channels-last memory
    format, ``cudnn.benchmark`` (restored afterwards), pinned memory and non-blocking copies.
    ``image_decoder``: ``pil`` (the workers decode and preprocess with the encoder's own
    transform) or ``torchvision`` (the workers read bytes; decoding and preprocessing run on
    ``device``, see :mod:`benchmark.pixels`; ConfigError before any work when the transform
    has a step without a tensor version). ``progress`` is an optional callable(n_done)."""
    workers = default_num_workers() if num_workers is None else num_workers
    with extraction_mode(encoder, device) as (encoder, memory_format), \
            contextlib.closing(pixel_batches(encoder.transform, images, batches, torch.device(device),
                                             num_workers=workers, image_decoder=image_decoder,
                                             memory_format=memory_format)) as pixels_of:
        for pixels in pixels_of:
            g, p = encoder(pixels)
            if progress:
                progress(len(pixels))
            yield g.float().cpu(), p.float().cpu()


@contextlib.contextmanager
def extraction_mode(encoder, device: str | torch.device):
    """Run ``encoder`` as feature extraction does, for the block's duration: in eval mode on
    ``device``, under inference mode; on CUDA also under bf16 autocast, with channels-last
    weights (NHWC, the tensor cores' layout) and ``cudnn.benchmark`` (cuDNN picks the
    fastest convolution for the fixed input size; the setting is restored afterwards).
    Yields ``(encoder, memory_format)``: the encoder to call and the memory format its
    pixels should have. :func:`benchmark.bench.bench_encoder` times encoders this way."""
    cuda = torch.device(device).type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    encoder = encoder.to(device).eval()
    benchmark_before = torch.backends.cudnn.benchmark
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
    try:
        if cuda:
            torch.backends.cudnn.benchmark = True
            encoder = encoder.to(memory_format=memory_format)
        with torch.inference_mode(), autocast:
            yield encoder, memory_format
    finally:
        torch.backends.cudnn.benchmark = benchmark_before


def extract_features(encoder, images: list[ImageRecord], *, batch_size: int = 32,
                     device: str | torch.device = "cpu", num_workers: int | None = None,
                     progress=None, image_decoder: str = "pil",
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run ``encoder`` over ``images`` from disk (:func:`encode_batches`, which describes
    ``image_decoder``).

    Returns ``grid (N, L, D)``, ``pooled (N, P)`` (float32, CPU) and end-to-end images/s
    (decode + preprocess + forward). ``progress`` is an optional callable(n_done).
    """
    if not images:
        raise DatasetError("no images to encode")
    batches = [list(range(a, min(a + batch_size, len(images))))
               for a in range(0, len(images), batch_size)]
    t0 = time.perf_counter()
    with contextlib.closing(encode_batches(encoder, images, batches, device=device,
                                           num_workers=num_workers, progress=progress,
                                           image_decoder=image_decoder)) as out:
        grids, pooleds = zip(*out, strict=True)
    if torch.device(device).type == "cuda":
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


def shard_images(image_bytes: int) -> int:
    """Images per shard: as many images of ``image_bytes`` (:func:`feature_bytes` of one) as
    fit in :data:`SHARD_BYTES` (1,310 for ResNet-50's 49 x 2048 grid, 887 for ViT-B/16's
    196 x 768), at least one."""
    return max(1, SHARD_BYTES // image_bytes)


def store_identity(encoder, image_decoder: str = "pil", device: str | torch.device = "cpu") -> dict:
    """What the features of ``encoder`` depend on (the cache key's part besides the images):
    :meth:`cache_identity`; on CUDA, the bf16 autocast :func:`encode_batches` runs the
    encoder under (its features differ from float32 ones by about 1% relative L2, so a CUDA
    store is never reused on the CPU or mixed with CPU shards on resume); and, when
    ``image_decoder`` is ``torchvision``, the decoder and the device type that decodes
    (nvJPEG's pixels differ from libjpeg-turbo's), and the JPEG library when it is
    torchvision.io's rather than TorchCodec's (:func:`benchmark.pixels.jpeg_decoder`). Parts
    are only added where they apply, so CPU stores written before them keep their keys.
    Raises ConfigError, before any work, for a bad ``image_decoder``
    (:func:`benchmark.pixels.check_image_decoder`)."""
    check_image_decoder(image_decoder, encoder.transform)
    identity = encoder.cache_identity()
    where = "cuda" if torch.device(device).type == "cuda" else "cpu"
    if where == "cuda":
        identity = {**identity, "autocast": "bfloat16"}
    if image_decoder == "pil":
        return identity
    library = jpeg_decoder()[0]
    return {**identity, "image_decoder": f"{image_decoder}-{where}",
            **({} if library == "torchcodec" else {"jpeg_decoder": library})}


def store_folder(encoder, images: list[ImageRecord], cache_dir: str | Path | None = None,
                 image_decoder: str = "pil", device: str | torch.device = "cpu") -> Path:
    """The cache folder of ``encoder``'s features of ``images``:
    ``<cache>/features/<encoder>-<key>/`` (``cache_dir`` replaces ``<cache>/features``)."""
    identity = store_identity(encoder, image_decoder, device)
    return _folder(identity, feature_cache_key(identity, images), cache_dir)


def _folder(identity: dict, key: str, cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir) if cache_dir else cache_root() / "features"
    return root / f"{identity['encoder']}-{key}"


def _shard_ids(path: Path, header: tuple[int, dict] | None = None) -> list | None:
    """The image ids a complete shard file holds (None when absent, unreadable or short);
    ``header``: its ``(data offset, header)`` when read already."""
    try:
        start, header = header or _safetensors_header(path)
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        if path.stat().st_size < start + end:
            return None
        return json.loads(header["__metadata__"]["image_ids"])
    except (DatasetError, OSError, KeyError, ValueError, TypeError):
        return None


def write_shard(path: Path, grid: torch.Tensor, pooled: torch.Tensor, image_ids: list,
                first_row: int) -> None:
    """Write one shard atomically: ``grid (S, L, D)`` and ``pooled (S, P)`` at
    :func:`storage_precision`, with the shard's image ids in its metadata. Raises StorageError
    (the shards written before it are kept, so the next run continues from them)."""
    tensors = {"grid": storage_precision(grid), "pooled": storage_precision(pooled)}
    meta = {"image_ids": json.dumps(image_ids), "first_row": str(first_row)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except (OSError, SafetensorError) as exc:
        raise StorageError(f"could not write the feature shard {path} ({exc}). The shards "
                           "before it are kept and the next run continues from them; free some "
                           "space or set CAPBENCH_CACHE to another folder") from exc


def write_manifest(folder: Path, key: str, identity: dict, shard_size: int, shards: list[str],
                   image_ids: list) -> None:
    """Complete the store in ``folder``: remove shard files not in ``shards`` (of an earlier
    run with another shard size), then write ``manifest.json`` atomically."""
    for stale in {p.name for p in folder.glob("shard-*.safetensors")} - set(shards):
        (folder / stale).unlink(missing_ok=True)
    manifest = {"format": FORMAT_VERSION, "key": key, "identity": identity,
                "shard_size": shard_size, "shards": shards, "image_ids": image_ids}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest))


def open_store(folder: str | Path, image_ids: list | None = None) -> FeatureStore | None:
    """The sharded store in ``folder`` when its manifest is complete (and lists exactly
    ``image_ids`` when given), and every shard is whole and holds the manifest's ids in order
    (a shard a concurrent job rewrote with another ``shard_size`` fails that), else None.
    Nothing is read but the shards' headers."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT_VERSION:
            return None
        if image_ids is not None and manifest["image_ids"] != image_ids:
            return None
        files = [folder / name for name in manifest["shards"]]
        headers = [_safetensors_header(f) for f in files]  # each read once, for all three
        held = [_shard_ids(f, h) for f, h in zip(files, headers, strict=True)]
        if None in held or [i for ids in held for i in ids] != manifest["image_ids"]:
            return None
        grid, pooled = ShardedRows(files, "grid", headers), ShardedRows(files, "pooled", headers)
    except (OSError, ValueError, KeyError, TypeError, DatasetError):
        return None
    if len(grid) != len(manifest["image_ids"]) or len(pooled) != len(grid):
        return None
    return FeatureStore(grid, pooled, manifest["image_ids"], manifest["key"], folder,
                        cache_hit=True)


def _encode_shards(encoder, images: list[ImageRecord], todo: list[tuple[int, int, Path]], *,
                   batch_size: int, device, num_workers, progress, image_decoder: str,
                   ) -> tuple[int, float]:
    """Encode and write the shards ``todo`` (``(first row, rows, path)`` each) through one
    DataLoader (one worker pool for all of them; batches never straddle a shard). Returns
    ``(images encoded, seconds)``."""
    if not todo:
        return 0, 0.0
    ids = [im.image_id for im in images]
    batches = [list(range(a, min(a + batch_size, first + n)))
               for first, n, _ in todo for a in range(first, first + n, batch_size)]
    t0 = time.perf_counter()
    with contextlib.closing(encode_batches(encoder, images, batches, device=device,
                                           num_workers=num_workers, progress=progress,
                                           image_decoder=image_decoder)) as stream:
        for first, n, path in todo:
            parts = [next(stream) for _ in range(math.ceil(n / batch_size))]
            write_shard(path, torch.cat([g for g, _ in parts]),
                        torch.cat([p for _, p in parts]), ids[first : first + n], first)
    return sum(n for _, n, _ in todo), time.perf_counter() - t0


def load_or_extract(encoder, images: list[ImageRecord], *, cache_dir: str | Path | None = None,
                    batch_size: int = 32, device: str | torch.device = "cpu",
                    num_workers: int | None = None, progress=None,
                    shard_size: int | None = None, image_decoder: str = "pil") -> FeatureStore:
    """Features of ``images`` from the cache, or extracted now into it, shard by shard.

    The store is the folder :func:`store_folder`: ``shard-00000.safetensors``, ... with
    ``shard_size`` images each (default :func:`shard_images`), and ``manifest.json``,
    written last, that makes it complete. Each shard is written atomically once its images
    are encoded, so memory holds one shard at a time, a half-written shard is never read, and
    an extraction that was killed resumes at the first missing shard. Under
    ``torchrun``/``capbench run --nproc`` every rank encodes every ``world_size``-th shard and
    rank 0 writes the manifest once all are there; an error on one rank (an unreadable
    image, a full disk) stops every rank (:func:`benchmark.distributed.all_or_none`).
    Before extracting, the cache folder must be writable with room for the shards still
    missing (so no extraction is wasted); temp files of killed extractions are removed.

    Args:
        encoder: the :class:`~architectures.encoders.ImageEncoder` (grid ``(N, D)`` and
            pooled ``(P,)`` features an image).
        images: the images to encode, in store row order.
        cache_dir: the feature cache root (None: the default cache).
        batch_size: images per encoder batch.
        device: where the encoder runs.
        num_workers: DataLoader processes decoding images (None: the default).
        progress: ``progress(n)`` is told of every n images done (read from a complete
            shard, or encoded; on rank 0).
        shard_size: images a shard (None: :func:`shard_images`).
        image_decoder: ``pil`` or ``torchvision`` (:func:`encode_batches`); ``torchvision``
            features get their own key, and so do features extracted on CUDA
            (:func:`store_identity`).

    Returns:
        A :class:`FeatureStore` that reads rows from the shards on demand
        (:class:`ShardedRows`); its ``extraction_images_per_s`` is the end-to-end rate (images/s)
        of the images this process encoded (None when it encoded none).

    Raises:
        DatasetError: ``images`` is empty, or an image cannot be read.
        StorageError: the cache folder is unwritable or lacks room, or a shard cannot be
            written (the shards already written are kept for the next run).
    """
    if not images:
        raise DatasetError("no images to encode")
    identity = store_identity(encoder, image_decoder, device)
    key = feature_cache_key(identity, images)  # hashes every image file's size and time: once
    folder = _folder(identity, key, cache_dir)
    ids = [im.image_id for im in images]
    found = open_store(folder, ids)
    if all(distributed.all_gather_object(found is not None)):  # every rank decides alike
        return found
    per = shard_size or shard_images(feature_bytes(encoder, 1))
    rank, world = distributed.rank(), distributed.world_size()
    names, todo, missing = [], [], 0  # missing: images of every rank's shards still to write
    for s, first in enumerate(range(0, len(images), per)):
        n = len(images[first : first + per])
        path = folder / f"shard-{s:05d}.safetensors"
        names.append(path.name)
        if _shard_ids(path) == ids[first : first + n]:
            if progress and rank == 0:
                progress(n)
            continue
        missing += n
        if s % world == rank:  # this rank's shard
            todo.append((first, n, path))
    # room for the shards still missing: a resumed extraction needs no more than what is left
    # (checked on every rank, whose machines may mount the cache differently)
    distributed.all_or_none(lambda: ensure_writable(
        folder.parent, need_bytes=feature_bytes(encoder, missing), what="feature cache",
        hint="Set CAPBENCH_CACHE (or features.cache_dir in the config) to a writable folder "
             "with enough space; `capbench doctor` shows the caches."))
    folder.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():  # one cleaner: another machine's live temp files look dead here
        remove_stale_temps(folder.parent)
        remove_stale_temps(folder)
    distributed.barrier()
    # a rank whose images fail stops the others too, instead of leaving them at the barrier
    encoded, seconds = distributed.all_or_none(lambda: _encode_shards(
        encoder, images, todo, batch_size=batch_size, device=device, num_workers=num_workers,
        progress=progress, image_decoder=image_decoder))
    distributed.barrier()
    distributed.all_or_none(  # rank 0 writes the manifest; a full disk there stops them all
        lambda: write_manifest(folder, key, identity, per, names, ids) if rank == 0 else None)
    store = open_store(folder, ids)
    if store is None:
        raise StorageError(f"the feature store {folder} is incomplete after extraction; "
                           "delete the folder and run again")
    store.cache_hit = False
    store.extraction_images_per_s = encoded / seconds if encoded else None
    return store
