"""Image decoding and preprocessing on the encoder's device, for feature extraction.

The default path (``features.image_decoder: pil``) reads each image with Pillow in the
DataLoader's workers and applies the encoder library's own PIL transform: the reference
preprocessing. On a GPU the CPU can become the bottleneck of extraction: JPEG decoding and
resizing full-size COCO photographs costs more CPU time than a ResNet-50 forward costs GPU
time. ``features.image_decoder: torchvision`` instead has the workers read only the files'
bytes; the main process decodes them with TorchCodec's ``decode_jpeg`` on the encoder's
device (nvJPEG on CUDA, libjpeg-turbo on the CPU; TorchCodec 0.16 took over torchvision's
image decoders, deprecated since torchvision 0.29, with the same API) and applies the
encoder's resize, centre crop and normalisation as torchvision tensor transforms there
(:func:`tensor_transform`). Resizing a tensor is not bit-identical to Pillow's resize, and
the JPEG decoders differ in rounding, so these features differ slightly from the PIL path's
and get their own feature-cache key and run id.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmark.data import ImageRecord
from benchmark.errors import ConfigError, DatasetError

__all__ = ["IMAGE_DECODERS", "ImageFolderDataset", "ImageBytesDataset", "tensor_transform",
           "decode_images", "pixel_batches"]

IMAGE_DECODERS = ("pil", "torchvision")

_TO_FLOAT = {"ToTensor", "MaybeToTensor"}  # PIL/uint8 -> float in [0, 1]
_RGB = {"MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb"}  # decoding gives RGB already
_AS_IS = {"Resize", "CenterCrop", "Normalize"}  # torchvision steps that take tensors


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
        path = self.images[i].path
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
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


def tensor_transform(transform) -> Callable[[torch.Tensor], torch.Tensor]:
    """The steps of an encoder's eval ``transform`` for a decoded image: ``uint8 (3, H, W)``
    on any device -> ``float32 (3, h, w)`` normalised, on that device.

    torchvision's weight presets (``ImageClassification``) take tensors as they are; a
    ``Compose`` of ``Resize``, ``CenterCrop``, ``ToTensor``/``MaybeToTensor``, an RGB
    conversion and ``Normalize`` (timm's and open_clip's eval transforms) is rebuilt with the
    conversion to float in place of ``ToTensor``. Raises ConfigError for a step it does not
    know (use ``features.image_decoder: pil`` then)."""
    if type(transform).__name__ == "ImageClassification":
        return transform
    steps = []
    for step in getattr(transform, "transforms", [transform]):
        name = type(step).__name__ if type(step).__name__ != "function" else step.__name__
        if name in _AS_IS:
            steps.append(step)
        elif name in _TO_FLOAT:
            steps.append(_to_float)
        elif name not in _RGB:
            raise ConfigError(f"features.image_decoder: torchvision cannot run the encoder's "
                              f"preprocessing step {name!r} on tensors; use "
                              "features.image_decoder: pil")

    def run(img: torch.Tensor) -> torch.Tensor:
        for s in steps:
            img = s(img)
        return img

    return run


def _to_float(img: torch.Tensor) -> torch.Tensor:
    return img.float().div_(255.0)


class ImageBytesDataset(Dataset):
    """The files of a list of :class:`ImageRecord` as raw bytes, ``uint8 (n_bytes,)``, for
    decoding in the main process. Raises DatasetError for a file that cannot be read."""

    def __init__(self, images: list[ImageRecord]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.images[i].path
        try:
            data = bytearray(Path(path).read_bytes())
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def as_list(batch: list) -> list:
    """DataLoader ``collate_fn`` that keeps a batch of variable-length tensors as a list."""
    return batch


def decode_images(data: list[torch.Tensor], paths: list, device: torch.device) -> list[torch.Tensor]:
    """Decode files' bytes (``uint8 (n_bytes,)`` each, on the CPU) to RGB ``uint8 (3, H, W)``
    on ``device``: the JPEGs in one TorchCodec ``decode_jpeg`` call there (nvJPEG's batched
    decoder on CUDA), other formats (PNG, ...) with ``decode_image`` on the CPU, then moved.
    ``paths`` name the files in errors. Raises DatasetError for a file that does not decode
    (with the decoder's message, which also says when nvJPEG is unavailable)."""
    from torchcodec.decoders import decode_image, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(data)
    jpeg = [i for i, d in enumerate(data) if d[:3].tolist() == [0xFF, 0xD8, 0xFF]]
    try:
        if jpeg:
            decoded = decode_jpeg([data[i] for i in jpeg], mode="RGB", device=device)
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img
    except RuntimeError:  # find the file: decode them one by one
        for i in jpeg:
            out[i] = _decode_one(decode_jpeg, data[i], paths[i], device, on_device=True)
    for i, d in enumerate(data):
        if out[i] is None:
            out[i] = _decode_one(decode_image, d, paths[i], device, on_device=False)
    return out


def _decode_one(fn, data: torch.Tensor, path, device: torch.device, *,
                on_device: bool) -> torch.Tensor:
    try:
        img = fn(data, mode="RGB", **({"device": device} if on_device else {}))
    except (RuntimeError, ValueError) as exc:
        raise DatasetError(f"cannot decode image {path}: {exc}") from exc
    return img.to(device)


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
    on_device = image_decoder == "torchvision"
    steps = tensor_transform(transform) if on_device else None
    dataset = ImageBytesDataset(images) if on_device else ImageFolderDataset(images, transform)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=as_list if on_device else None,
                        pin_memory=device.type == "cuda" and not on_device)
    return _pixel_stream(loader, steps, images, batches, device, memory_format)


def _pixel_stream(loader, steps, images, batches, device, memory_format):
    for b, batch in enumerate(loader):
        if steps is not None:
            decoded = decode_images(batch, [images[i].path for i in batches[b]], device)
            batch = torch.stack([steps(img) for img in decoded])
        yield batch.to(device, non_blocking=True, memory_format=memory_format)
