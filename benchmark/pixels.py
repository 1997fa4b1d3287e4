"""Image files to preprocessed pixels, for feature extraction and captioning.

The default path (``features.image_decoder: pil``) reads each image with Pillow in the
DataLoader's workers and applies the encoder library's own PIL transform: the reference
preprocessing (:class:`ImageFolderDataset`). On a GPU the CPU can become the bottleneck of
extraction: decoding and resizing full-size COCO photographs costs more CPU time than a
ResNet-50 forward costs GPU time. ``features.image_decoder: torchvision`` instead has the
workers read only the files' bytes; the main process decodes the JPEGs with TorchCodec's
``decode_jpeg`` (nvJPEG on CUDA; TorchCodec took over torchvision's image decoders, which are
deprecated since torchvision 0.29; where TorchCodec has no image decoders, as on a machine with
an older preinstalled torch, ``torchvision.io.decode_jpeg`` does the same: see
:func:`jpeg_decoder`) and applies the encoder's resize, centre crop and normalisation as
torchvision tensor transforms on the device (:func:`tensor_transform`). Other files are read
with Pillow (:func:`decode_images`). Tensor resizing is not bit-identical to Pillow's, and JPEG
decoders round differently (nvJPEG also upsamples chroma differently from libjpeg-turbo), so
these features differ slightly from the PIL path's and get their own feature-cache key per
decoding device and their own run id.
"""

from __future__ import annotations

import functools
import io
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmark.data import ImageRecord
from benchmark.errors import CapbenchError, ConfigError, DatasetError, user_message
from benchmark.imagefile import file_problem, open_rgb

__all__ = ["IMAGE_DECODERS", "ImageFolderDataset", "ImageBytesDataset", "TensorPreprocess",
           "tensor_transform", "decode_images", "read_bytes", "pixel_batches",
           "check_image_decoder", "jpeg_decoder", "worker_batches"]

IMAGE_DECODERS = ("pil", "torchvision")

class ImageFolderDataset(Dataset):
    """Images of a list of :class:`ImageRecord` through an encoder's transform: ``(3, H, W)``.

    ``seeds``: one seed per image for a random (training) transform. Item ``i`` is then
    transformed with torch's and Python's generators seeded with ``seeds[i]`` (and both put
    back afterwards), so its random crop depends on its seed alone, not on the DataLoader's
    workers or the process that reads it. Raises DatasetError for an unreadable image.
    """

    def __init__(self, images: list[ImageRecord], transform,
                 seeds: list[int] | None = None) -> None:
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        self.images = images
        self.transform = transform
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        rgb = open_rgb(self.images[i].path)
        if self.seeds is None:
            return self.transform(rgb)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seeds[i])  # not CUDA's (manual_seed would)
            random.seed(self.seeds[i])  # timm's random crop draws from Python's generator
            try:
                return self.transform(rgb)
            finally:
                random.setstate(python_state)


_TO_FLOAT = {"ToTensor", "MaybeToTensor"}  # PIL/uint8 -> float in [0, 1]
_RGB = {"MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb"}  # decoding gives RGB already


class TensorPreprocess:
    """An encoder's eval transform for decoded images on any device: :meth:`__call__` takes
    ``uint8 (3, H_i, W_i)`` images (sizes may differ) and returns the batch ``float32 (B, 3,
    h, w)`` on their device. The geometric steps (resize, centre crop) run per image; the
    conversion to float and the normalisation run once on the stacked batch."""

    def __init__(self, geometry: list[Callable], mean=None, std=None) -> None:
        self.geometry = geometry
        self.mean, self.std = mean, std

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``uint8 (3, H_i, W_i)`` images, at least one -> ``float32 (B, 3, h, w)``; ValueError
        for an empty list."""
        from torchvision.transforms import functional as F

        if not images:
            raise ValueError("no images to preprocess")

        out = []
        for img in images:
            for step in self.geometry:
                img = step(img)
            out.append(img)
        batch = torch.stack(out).float().div_(255.0)
        return batch if self.mean is None else F.normalize(batch, self.mean, self.std, inplace=True)


def tensor_transform(transform) -> TensorPreprocess:
    """The steps of an encoder's eval ``transform`` for decoded images (:class:`TensorPreprocess`).

    torchvision's weight presets (``ImageClassification``: resize, centre crop, to float,
    normalise) and a ``Compose`` of torchvision ``Resize`` and ``CenterCrop``, ``ToTensor`` or
    timm's ``MaybeToTensor``, an RGB conversion (open_clip's ``MaybeConvertMode``) and
    ``Normalize`` (timm's and open_clip's eval transforms) are supported: torchvision's
    functional resize on a uint8 tensor interpolates in float, rounds and clamps back to uint8
    as Pillow does. Raises ConfigError for another step (use ``features.image_decoder: pil``
    then)."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    if type(transform).__name__ == "ImageClassification":
        t = transform
        return TensorPreprocess([lambda im: F.resize(im, t.resize_size, t.interpolation,
                                                     antialias=t.antialias),
                                 lambda im: F.center_crop(im, t.crop_size)], t.mean, t.std)
    geometry, norm, seen_float = [], None, False
    for step in getattr(transform, "transforms", [transform]):
        name = getattr(step, "__name__", type(step).__name__)
        if isinstance(step, T.Resize | T.CenterCrop) and not seen_float and norm is None:
            geometry.append(step)
        elif name in _TO_FLOAT and not seen_float:
            seen_float = True
        elif isinstance(step, T.Normalize) and seen_float and norm is None:
            norm = step
        elif name not in _RGB:
            raise ConfigError(f"features.image_decoder: torchvision cannot run the encoder's "
                              f"preprocessing step {name!r} (in that place) on tensors; use "
                              "features.image_decoder: pil")
    if not seen_float:
        raise ConfigError("features.image_decoder: torchvision: the encoder's preprocessing has "
                          "no ToTensor step; use features.image_decoder: pil")
    return TensorPreprocess(geometry, *((norm.mean, norm.std) if norm is not None else ()))


class ImageBytesDataset(Dataset):
    """The files of a list of :class:`ImageRecord` as raw bytes, ``uint8 (n_bytes,)``, for
    decoding in the main process. Raises DatasetError for a file that cannot be read."""

    def __init__(self, images: list[ImageRecord]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_bytes(self.images[i].path)


def read_bytes(path) -> torch.Tensor:
    """The file at ``path`` as ``uint8 (n_bytes,)``. Raises DatasetError naming it (also for
    a named pipe or anything else that is not a regular file, which would block or mislead)."""
    if why := file_problem(path):
        raise DatasetError(f"{path}: {why}")
    try:
        data = bytearray(Path(path).read_bytes())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc})") from exc
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def as_list(batch: list) -> list:
    """DataLoader ``collate_fn`` that keeps a batch of variable-length tensors as a list."""
    return batch


def _plain_jpeg(data: torch.Tensor) -> bool:
    """A JPEG without an EXIF orientation other than 1 (TorchCodec always applies the
    orientation; Pillow, the reference path, does not), read from the header alone."""
    if data[:3].tolist() != [0xFF, 0xD8, 0xFF]:
        return False
    try:
        with warnings.catch_warnings():  # a huge one: open_rgb warns, naming the file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return img.getexif().get(0x0112, 1) == 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False  # let Pillow name the problem


def decode_images(data: list[torch.Tensor], paths: list, device: torch.device) -> list[torch.Tensor]:
    """Decode files' bytes (``uint8 (n_bytes,)`` each, on the CPU) to RGB ``uint8 (3, H, W)``
    on ``device``, as Pillow reads them up to the JPEG decoder's rounding.

    Plain JPEGs go through one ``decode_jpeg`` call (:func:`jpeg_decoder`): on CUDA it is nvJPEG's batched
    decoder, elsewhere libjpeg-turbo on the CPU and a copy. A JPEG nvJPEG rejects (CMYK, a
    damaged file libjpeg still reads), JPEGs with an EXIF orientation, and other formats (PNG,
    GIF's first frame, ...) are read with Pillow, as the reference path does, and copied.
    ``paths`` name the files in errors. Raises DatasetError for a file Pillow cannot read
    either; CUDA's out-of-memory error passes through."""
    decode_jpeg = jpeg_decoder()[1]
    on_gpu = device.type == "cuda"
    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [i for i, d in enumerate(data) if _plain_jpeg(d)]
    try:
        if jpeg:
            decoded = decode_jpeg([data[i] for i in jpeg], device if on_gpu else "cpu")
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img.to(device)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError):  # one file failed the batch: decode them one by one
        for i in jpeg:
            try:
                out[i] = decode_jpeg([data[i]], device if on_gpu else "cpu")[0].to(device)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError):
                pass  # Pillow below
    for i, d in enumerate(data):
        if out[i] is None:
            out[i] = _pil_decode(d, paths[i]).to(device)
    return out


def _pil_decode(data: torch.Tensor, path) -> torch.Tensor:
    rgb = np.asarray(open_rgb(path, data.numpy().tobytes()))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


@functools.cache
def jpeg_decoder() -> tuple[str, Callable[[list[torch.Tensor], str | torch.device], list[torch.Tensor]]]:
    """The library that decodes JPEGs for ``features.image_decoder: torchvision`` and its
    batched decoder ``fn(files, device) -> images``: ``uint8 (n_bytes,)`` CPU tensors in,
    RGB ``uint8 (3, H, W)`` tensors on ``device`` out (nvJPEG on CUDA, libjpeg-turbo on the
    CPU), neither applying the EXIF orientation.

    ``"torchcodec"`` (``torchcodec.decoders.decode_jpeg``: TorchCodec's image decoders, which
    0.11 lacks and the pinned 0.17 has), else ``"torchvision.io"``
    (``torchvision.io.decode_jpeg``, the same decoders under the API that TorchCodec's
    replaced; deprecated since torchvision 0.29, and the only one on a machine whose
    preinstalled torch is older, such as 2.11 with torchvision 0.26). Looked up once a process
    (``jpeg_decoder.cache_clear()`` looks again). Raises ConfigError when neither loads."""
    try:
        from torchcodec.decoders import decode_jpeg

        return "torchcodec", lambda files, device: decode_jpeg(files, mode="RGB", device=device)
    except (ImportError, OSError, RuntimeError) as exc:
        reason = exc
    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg
    except (ImportError, OSError, RuntimeError):
        raise ConfigError(f"features.image_decoder: torchvision needs TorchCodec's decode_jpeg "
                          f"(or torchvision.io's), which did not load ({reason}); reinstall "
                          "capbench (`make install`) or use features.image_decoder: pil") from reason

    def decode(files, device):
        with warnings.catch_warnings():  # torchvision >= 0.29 deprecates it for TorchCodec's
            warnings.simplefilter("ignore", DeprecationWarning)
            return tv_decode_jpeg(files, mode=ImageReadMode.RGB, device=device)

    return "torchvision.io", decode


def check_image_decoder(image_decoder: str, transform) -> None:
    """ConfigError, before any work, for an unknown ``image_decoder``, or for ``torchvision``
    when no JPEG decoder loads (:func:`jpeg_decoder`) or ``transform`` has no tensor version."""
    if image_decoder not in IMAGE_DECODERS:
        raise ConfigError(f"features.image_decoder {image_decoder!r}: choose one of "
                          f"{', '.join(IMAGE_DECODERS)}")
    if image_decoder == "pil":
        return
    jpeg_decoder()
    tensor_transform(transform)


def pixel_batches(transform, images: list[ImageRecord], batches: list[list[int]],
                  device: torch.device, *, num_workers: int = 0, image_decoder: str = "pil",
                  memory_format: torch.memory_format = torch.contiguous_format,
                  ) -> Iterator[torch.Tensor]:
    """Yield the preprocessed pixels ``float32 (b, 3, H, W)`` of each list of positions in
    ``batches``, in order, on ``device`` in ``memory_format``, through one DataLoader of
    ``num_workers`` workers. ``image_decoder``: ``pil`` (the workers decode with Pillow and
    apply ``transform``; pinned memory and a non-blocking copy on CUDA) or ``torchvision``
    (the workers read bytes; :func:`decode_images` and :func:`tensor_transform` run on
    ``device``). Raises ConfigError, before reading anything, for a ``transform`` without a
    tensor version, and DatasetError for an unreadable image."""
    check_image_decoder(image_decoder, transform)
    on_device = image_decoder == "torchvision"
    steps = tensor_transform(transform) if on_device else None
    dataset = ImageBytesDataset(images) if on_device else ImageFolderDataset(images, transform)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=as_list if on_device else None,
                        pin_memory=device.type == "cuda" and not on_device)
    return _pixel_stream(loader, steps, images, batches, device, memory_format)


def worker_batches(loader: DataLoader) -> Iterator:
    """The batches of ``loader``; a CapbenchError raised in one of its worker processes comes
    out as the same type with the worker's own message (:func:`~benchmark.errors.user_message`),
    not with the traceback text torch wraps around it."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except CapbenchError as exc:
            raise type(exc)(user_message(exc)) from None
        yield batch


def _pixel_stream(loader, steps, images, batches, device, memory_format):
    for b, batch in enumerate(worker_batches(loader)):
        if steps is not None:
            batch = steps(decode_images(batch, [images[i].path for i in batches[b]], device))
        yield batch.to(device, non_blocking=True, memory_format=memory_format)
