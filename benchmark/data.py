"""Karpathy-format caption datasets (``dataset.json``) and the split fingerprint.

Format (Karpathy & Fei-Fei 2015 split files, as distributed for Flickr8k/Flickr30k/COCO):
``{"images": [{"filepath"?, "filename", "split", "sentences": [{"tokens", "raw"}], "cocoid"?
| "imgid"?}]}``. Image paths are ``<json folder>/<filepath>/<filename>``. The ``restval``
split is folded into ``train`` (the usual Karpathy convention).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import ConfigError, DatasetError
from benchmark.shapes import default_shapes_path

SPLITS = ("train", "val", "test")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

__all__ = ["ImageRecord", "CaptionDataset", "load_karpathy", "resolve_dataset", "simple_tokenize",
           "SPLITS"]


def simple_tokenize(text: str) -> list[str]:
    """Lower-case word tokens without punctuation, used when a sentence has no ``tokens``."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class ImageRecord:
    """One image: its id (``cocoid``/``imgid``/position), file, split and reference captions."""

    image_id: int | str
    filename: str
    path: Path
    split: str
    captions: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]


@dataclass
class CaptionDataset:
    """A loaded dataset: ``images`` in file order; ``source`` is the JSON file."""

    name: str
    source: Path
    images: list[ImageRecord]

    def split(self, name: str) -> list[ImageRecord]:
        """The images of split ``name`` (train/val/test), in file order."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return [im for im in self.images if im.split == name]

    def references(self, split: str) -> dict[int | str, list[str]]:
        """``image_id -> raw reference captions`` of one split (what the metrics score against)."""
        return {im.image_id: list(im.captions) for im in self.split(split)}

    def split_fingerprints(self) -> dict[str, str]:
        """Per split, a short sha256 of its sorted image ids; plus ``all`` over the three.

        Two runs are comparable only when their ``all`` fingerprints are equal.
        """
        out = {}
        for s in SPLITS:
            ids = sorted(str(im.image_id) for im in self.split(s))
            out[s] = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
        out["all"] = hashlib.sha256("|".join(out[s] for s in SPLITS).encode()).hexdigest()[:12]
        return out

    @property
    def fingerprint(self) -> str:
        """The ``all`` split fingerprint (12 hex digits)."""
        return self.split_fingerprints()["all"]


def _field(entry: dict, key: str, where: str, kind: type | tuple[type, ...]):
    if key not in entry:
        raise DatasetError(f"{where}: missing field {key!r}")
    if not isinstance(entry[key], kind):
        raise DatasetError(f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}")
    return entry[key]


def load_karpathy(path: str | Path, *, check_images: bool = True) -> CaptionDataset:
    """Read a Karpathy-format ``dataset.json``.

    Raises :class:`DatasetError` naming the file and the field when the JSON is malformed, an
    image entry lacks ``filename``/``split``/``sentences``, a split is unknown, an image has no
    caption, ids repeat, a split is empty, or (``check_images``) image files are missing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist (pass a Karpathy dataset.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON (line {exc.lineno}, col {exc.colno})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    root = path.parent
    images: list[ImageRecord] = []
    seen: set = set()
    missing: list[str] = []
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: should be an object")
        filename = _field(entry, "filename", where, str)
        split = _field(entry, "split", where, str)
        split = "train" if split == "restval" else split
        if split not in SPLITS:
            raise DatasetError(f"{where}: split {split!r} is not train/val/test/restval")
        sentences = _field(entry, "sentences", where, list)
        if not sentences:
            raise DatasetError(f"{where} ({filename}): has no sentences")
        raws, toks = [], []
        for j, s in enumerate(sentences):
            if not isinstance(s, dict) or not isinstance(s.get("raw", s.get("tokens")), str | list):
                raise DatasetError(f"{where}.sentences[{j}]: needs 'raw' text or 'tokens'")
            tokens = s.get("tokens") or simple_tokenize(s.get("raw", ""))
            raw = s.get("raw") or " ".join(tokens)
            if not tokens:
                raise DatasetError(f"{where}.sentences[{j}]: empty caption")
            raws.append(raw)
            toks.append(tuple(str(t).lower() for t in tokens))
        image_id = entry.get("cocoid", entry.get("imgid", i))
        if image_id in seen:
            raise DatasetError(f"{where}: image id {image_id!r} appears twice")
        seen.add(image_id)
        file = root / entry.get("filepath", "") / filename
        if check_images and not file.is_file():
            missing.append(str(file))
        images.append(ImageRecord(image_id, filename, file, split, tuple(raws), tuple(toks)))
    if missing:
        shown = "\n  ".join(missing[:5])
        raise DatasetError(
            f"{path}: {len(missing)} image file(s) not found, e.g.\n  {shown}\n"
            "Paths are <dataset.json folder>/<filepath>/<filename>."
        )
    name = str(data.get("dataset") or root.name)
    if root.name.lower().startswith(name.lower()):  # e.g. "coco" in folder "coco-mini"
        name = root.name
    ds = CaptionDataset(name, path, images)
    for s in SPLITS:
        if not ds.split(s):
            raise DatasetError(f"{path}: split {s!r} has no images; train, val and test are needed")
    return ds


def resolve_dataset(spec: str) -> CaptionDataset:
    """``shapes`` / ``shapes:N`` (the embedded set of 600 or N images, generated on first use)
    or a Karpathy JSON/folder path. Raises ConfigError for a bad ``shapes:N`` and
    DatasetError for a bad file."""
    if spec == "shapes" or spec.startswith("shapes:"):
        n = spec.partition(":")[2]
        if n and not n.isdigit():
            raise ConfigError(f"dataset {spec!r}: use shapes or shapes:N with N images (>= 10)")
        if n and int(n) < 10:
            raise ConfigError(f"dataset {spec!r}: shapes needs at least 10 images")
        return load_karpathy(default_shapes_path(int(n) if n else 600))
    return load_karpathy(spec)
