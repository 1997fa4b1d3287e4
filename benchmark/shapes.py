"""The embedded ``shapes`` dataset: coloured shapes on a canvas, captioned by a small grammar.

Generated deterministically from a seed, in seconds, so that the main job runs offline on
any machine. Each image holds 2-3 objects (circle/square/triangle, 6 colours, 2 sizes) in
distinct cells of a 3x3 layout; each gets 5 captions drawn from templates with synonyms and
spatial relations ("a small red circle to the left of a blue box"). Every object's bounding box
is stored in the JSON (``objects[].bbox`` as ``[x0, y0, x1, y1]`` pixels) for later checks of
where attention looks. Written in Karpathy format, so the normal loader reads it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from benchmark.errors import ConfigError, DatasetError
from benchmark.fsutil import ensure_writable, refuse_overwrite, remove_stale_temps
from benchmark.paths import cache_root

VERSION = 4  # bump whenever the images or captions change
#: disk one image takes, PNG and its dataset.json entry (about 2.6 KB, rounded up to blocks)
BYTES_PER_IMAGE = 8192
#: the most images one set may have (about 8 GB on disk)
MAX_IMAGES = 1_000_000
CANVAS = 128
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
}  # well-separated hues: the demo must learn them from random-init features in minutes
SYNONYMS = {"circle": ("circle", "disc"), "square": ("square", "box", "block"),
            "triangle": ("triangle",)}
SIZES = {"small": 22, "large": 38}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (160, 160, 160)}
COUNT_WORDS = {2: "two", 3: "three"}

__all__ = ["generate_shapes", "write_shapes", "default_shapes_path", "VERSION"]


def _draw(draw: ImageDraw.ImageDraw, shape: str, color, box) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def _phrase(obj: dict, rng: random.Random) -> str:
    noun = rng.choice(SYNONYMS[obj["shape"]])
    size = f"{obj['size']} " if rng.random() < 0.5 else ""
    return f"a {size}{obj['color']} {noun}"


def _relation(a: dict, b: dict) -> tuple[str, str]:
    """How ``a`` relates to ``b`` and the converse, from their layout cells."""
    if a["col"] != b["col"]:
        return ("to the left of", "to the right of") if a["col"] < b["col"] else (
            "to the right of", "to the left of")
    return ("above", "below") if a["row"] < b["row"] else ("below", "above")


def _captions(objs: list[dict], background: str, rng: random.Random, n: int = 5) -> list[str]:
    a, b = objs[0], objs[1]
    rel, inverse = _relation(a, b)
    count = COUNT_WORDS[len(objs)]
    others = objs[2:]
    tail = "".join(f" and {_phrase(o, rng)}" for o in others)
    listing = lambda: " , ".join(_phrase(o, rng) for o in objs[:-1]) + " and " + _phrase(objs[-1], rng)  # noqa: E731
    templates = [
        lambda: f"{_phrase(a, rng)} {rel} {_phrase(b, rng)}{tail}",
        lambda: f"{_phrase(b, rng)} {inverse} {_phrase(a, rng)}",
        lambda: f"{count} shapes : {listing()}",
        lambda: f"{listing()} on a {background} background",
        lambda: f"there is {_phrase(a, rng)} {rel} {_phrase(b, rng)}",
        lambda: f"{listing()}",
    ]
    picks = rng.sample(range(len(templates)), n)
    return [templates[i]() for i in picks]


def _make_image(rng: random.Random) -> tuple[Image.Image, list[dict], str]:
    background = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.choice((2, 2, 3)))
    objs = []
    cell = (CANVAS - 16) / 3
    for row, col in cells:
        shape = rng.choice(list(SYNONYMS))
        color = rng.choice(list(COLORS))
        size = rng.choice(list(SIZES))
        side = SIZES[size]
        cx = 8 + cell * (col + 0.5) + rng.uniform(-3, 3)
        cy = 8 + cell * (row + 0.5) + rng.uniform(-3, 3)
        box = [round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2)]
        _draw(draw, shape, COLORS[color], box)
        objs.append(dict(shape=shape, color=color, size=size, row=row, col=col, bbox=box))
    return img, objs, background


def generate_shapes(out_dir: str | Path, n_images: int = 600, seed: int = 0,
                    fractions: tuple[float, float] = (0.7, 0.15), *, overwrite: bool = True) -> Path:
    """Write ``n_images`` PNGs and a Karpathy ``dataset.json`` into ``out_dir``; return the JSON.

    ``fractions`` are the train and val shares (test takes the rest). The same arguments give
    byte-identical files. Raises ValueError for fewer than 10 or more than ``MAX_IMAGES``
    images, DatasetError when ``out_dir`` already holds a ``dataset.json`` and ``overwrite`` is
    False, and StorageError when ``out_dir`` lacks the disk space (checked before writing).
    """
    if not 10 <= n_images <= MAX_IMAGES:
        raise ValueError(f"shapes takes 10 to {MAX_IMAGES:,} images (train, val and test must be "
                         f"non-empty), not {n_images:,}")
    out_dir = Path(out_dir)
    if not overwrite and (out_dir / "dataset.json").exists():
        raise DatasetError(f"{out_dir / 'dataset.json'} already exists; choose another --out "
                           "folder or pass --force to overwrite it")
    ensure_writable(out_dir, need_bytes=n_images * BYTES_PER_IMAGE, what="dataset folder",
                    hint="Give fewer images or another folder.")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_train = int(n_images * fractions[0])
    n_val = max(1, int(n_images * fractions[1]))
    entries, sentid = [], 0
    for i in range(n_images):
        img, objs, background = _make_image(rng)
        filename = f"shapes_{i:05d}.png"
        img.save(out_dir / "images" / filename, optimize=False)
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        sentences = []
        for raw in _captions(objs, background, rng):
            sentences.append({"raw": raw, "tokens": [t for t in raw.split() if t.isalnum()],
                              "imgid": i, "sentid": sentid})
            sentid += 1
        entries.append({"imgid": i, "filepath": "images", "filename": filename, "split": split,
                        "sentences": sentences, "background": background,
                        "objects": [{k: o[k] for k in ("shape", "color", "size", "bbox")}
                                    for o in objs]})
    path = out_dir / "dataset.json"
    path.write_text(json.dumps({"dataset": f"shapes-{n_images}", "version": VERSION, "seed": seed,
                                "images": entries}, indent=1))
    return path


def write_shapes(out: Path, n_images: int = 600, seed: int = 0, *, force: bool = False) -> Path:
    """``capbench data shapes``: :func:`generate_shapes` into the folder ``out``, checked first.

    Args:
        out: output folder (``dataset.json`` + ``images/``).
        n_images: number of images, 10 to :data:`MAX_IMAGES`.
        seed: generator seed (the same arguments give byte-identical files).
        force: overwrite an existing ``dataset.json`` in ``out`` (never a run record).

    Returns:
        The path of the written ``dataset.json``.

    Raises:
        ConfigError: ``n_images`` out of range, or ``out/dataset.json`` is a run record.
        DatasetError: ``out`` already holds a ``dataset.json`` and not ``force``.
        StorageError: ``out`` lacks the disk space.
    """
    if not 10 <= n_images <= MAX_IMAGES:
        raise ConfigError(f"--n-images {n_images}: give 10 to {MAX_IMAGES:,}")
    refuse_overwrite(out / "dataset.json", "--out", dataset_ok=True)  # a run record, even with --force
    return generate_shapes(out, n_images, seed, overwrite=force)


def default_shapes_path(n_images: int = 600, seed: int = 0) -> Path:
    """The embedded dataset under the cache root, generated on first use (atomically)."""
    target = cache_root() / "datasets" / f"shapes-v{VERSION}-n{n_images}-seed{seed}"
    if (target / "dataset.json").is_file():
        return target / "dataset.json"
    ensure_writable(target.parent, need_bytes=n_images * BYTES_PER_IMAGE, what="dataset cache",
                    hint="Set CAPBENCH_CACHE to a writable folder.")
    remove_stale_temps(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-shapes-{os.getpid()}-"))
    try:
        generate_shapes(tmp, n_images, seed)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "dataset.json"
