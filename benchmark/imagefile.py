"""Reading one image file as 8-bit RGB: the single place capbench opens images with Pillow.

:func:`open_rgb` refuses what is not a regular file before opening it (a named pipe would
block forever, a symbolic link loop would read as "missing"), turns Pillow's
decompression-bomb error into a :class:`~benchmark.errors.DatasetError` naming the file (and
its warning into a :class:`~benchmark.errors.CapbenchWarning` naming it), and converts with
:func:`to_rgb`, which scales high-bit-depth pixels to 8 bits instead of clipping them at 255
as ``Image.convert("RGB")`` does (a 16-bit PNG became a nearly white image).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmark.errors import CapbenchWarning, DatasetError

__all__ = ["open_rgb", "to_rgb", "needs_scaling", "file_problem"]

#: Pillow modes of one channel wider than 8 bits, and the value that maps to 255
_FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535,
               "F": 1.0}

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable regular file (``None`` when it is one): missing, a
    symbolic link loop, a folder, a named pipe, a socket or a device. Never blocks, never
    raises."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (it points back at itself); fix or remove the link"
        if isinstance(exc, FileNotFoundError):
            return "a symbolic link to a missing file" if os.path.islink(path) else "no such file"
        return exc.strerror or str(exc)
    for test, kind in _KINDS:
        if test(mode):
            return f"{kind}, not a regular file; pass image files"
    return None


def needs_scaling(mode: str) -> bool:
    """Whether Pillow ``mode`` holds pixels wider than 8 bits (see :func:`to_rgb`)."""
    return mode in _FULL_SCALE


def to_rgb(img: Image.Image, name: str | Path = "image") -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I``) is scaled
    by 255/65535 and floating point (``F``) in [0, 1] by 255, rounded; other modes convert as
    Pillow does (16-bit RGB PNGs already open as 8-bit RGB, their high bytes). Raises
    DatasetError naming ``name`` for ``I`` or ``F`` pixels outside those ranges (or not
    finite), whose scale cannot be known."""
    full = _FULL_SCALE.get(img.mode)
    if full is None:
        return img.convert("RGB")
    a = np.asarray(img).astype(np.float64)
    if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > full):
        raise DatasetError(f"{name}: {img.mode} pixels range from {a.min():g} to {a.max():g}, "
                           f"outside 0..{full:g}, so their scale to 8 bits is unknown; save "
                           "the image as 8-bit RGB (or a 16-bit PNG) and pass that")
    grey = np.rint(a * (255.0 / full)).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def open_rgb(path: str | Path, data: bytes | None = None) -> Image.Image:
    """The image file ``path`` (or its bytes ``data``, read before) fully decoded as 8-bit RGB
    (:func:`to_rgb`).

    Raises DatasetError naming the file: not a regular file (:func:`file_problem`), not an
    image Pillow can read, damaged or truncated, or above Pillow's decompression-bomb limit
    (twice ``Image.MAX_IMAGE_PIXELS``). Above ``Image.MAX_IMAGE_PIXELS`` itself Pillow only
    warns, and so does this, as a CapbenchWarning naming the file."""
    if data is None and (why := file_problem(path)):
        raise DatasetError(f"{path}: {why}")
    try:
        with _open_quietly(path, data) as img:
            img.load()
            return to_rgb(img, path)
    except UnidentifiedImageError as exc:
        raise DatasetError(f"{path}: cannot read the image (not an image file Pillow can "
                           "read)") from exc
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: too large to read safely ({exc}); downscale it to at most "
                           f"{Image.MAX_IMAGE_PIXELS:,} pixels and pass that") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # damaged, truncated, unsupported mode
        why = getattr(exc, "strerror", None) or exc
        raise DatasetError(f"{path}: cannot read the image ({why})") from exc


def _open_quietly(path, data) -> Image.Image:
    """``Image.open`` with Pillow's anonymous decompression-bomb warning replaced by one that
    names the file (other warnings pass on)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = Image.open(io.BytesIO(data) if data is not None else path)
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            w_, h_ = img.size
            warnings.warn(CapbenchWarning(
                f"{path}: {w_}x{h_} = {w_ * h_:,} pixels, more than Pillow's decompression-bomb "
                f"limit of {Image.MAX_IMAGE_PIXELS:,}; reading it anyway (about "
                f"{3 * w_ * h_ / 2**20:.0f} MiB); downscale it if it is not meant to be this "
                "large"), stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return img
