"""Karpathy-format caption datasets (``dataset.json``) and the split fingerprint.

Format (Karpathy & Fei-Fei 2015 split files, as distributed for Flickr8k/Flickr30k/COCO):
``{"images": [{"filepath"?, "filename", "split", "sentences": [{"tokens", "raw"}], "cocoid"?
| "imgid"?}]}``. Image paths are ``<json folder>/<filepath>/<filename>``. The ``restval``
split is folded into ``train`` (the usual Karpathy convention).
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from benchmark.errors import ConfigError, DatasetError
from benchmark.shapes import MAX_IMAGES as MAX_SHAPES
from benchmark.shapes import default_shapes_path
from benchmark.userfiles import describe, quote, read_json

SPLITS = ("train", "val", "test")

__all__ = ["ImageRecord", "CaptionDataset", "load_karpathy", "resolve_dataset", "simple_tokenize",
           "normalize_text", "caption_tokens", "image_id_key", "SPLITS"]

#: scripts written without spaces between words whose every character is one token:
#: CJK Unified Ideographs (+ extensions A-I, compatibility ideographs), Hiragana, Katakana
_CJK = ("\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
        "\U00020000-\U0003ffff")
_APOSTROPHES = "'\u2019"  # ' and the typographic apostrophe (normalised to ')
#: what the Unicode pattern below reduces to on ASCII text (6x faster)
_ASCII_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def _word_re() -> re.Pattern:
    """Words: letters/digits with their combining marks, one optional ``'letters`` suffix;
    or one CJK character. Built on first use (the mark class takes ~0.15 s to list)."""
    marks, start = [], None
    for cp in range(sys.maxunicode + 1):
        is_mark = unicodedata.category(chr(cp)) in ("Mn", "Mc") and not (
            0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF)  # variation selectors
        if is_mark and start is None:
            start = cp
        elif not is_mark and start is not None:
            marks.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    mark = "[" + "".join(marks) + "]*"
    cjk = f"[{_CJK}]"
    alnum = rf"(?:(?!{cjk})[^\W_]{mark})"   # a letter or digit (not CJK) and its marks
    alpha = rf"(?:(?!{cjk})[^\W\d_]{mark})"
    return re.compile(rf"{cjk}|{alnum}+(?:[{_APOSTROPHES}]{alpha}+)?")


def normalize_text(text: str) -> str:
    """NFKC-normalised, lower-cased text (full-width forms, ligatures and compatibility
    characters folded: ``"Ｃａｆé"`` -> ``"café"``)."""
    return unicodedata.normalize("NFKC", text).lower()


def simple_tokenize(text: str) -> list[str]:
    """Word tokens of a caption, used when a sentence has no ``tokens``.

    The text is NFKC-normalised and lower-cased; a token is a run of Unicode letters and
    digits (with their combining marks, so ``café``, ``zürich``, ``हिन्दी`` stay whole)
    optionally followed by one apostrophe and letters (``don't``, ``dog's``; ``’`` is
    written ``'``). Everything else (spaces, punctuation, symbols, emoji) separates tokens
    and is dropped. Chinese/Japanese are written without spaces and no segmenter is used:
    each Han ideograph, Hiragana and Katakana character is a token of its own
    (``"東京タワー"`` -> ``["東", "京", "タ", "ワ", "ー"]``), the usual character-level
    convention of caption tokenizers for CJK. Hangul is tokenized on spaces like Latin
    script; Thai, Lao, Khmer or Myanmar text without spaces comes out as whole phrases.
    Returns ``[]`` when the text has no letter or digit.
    """
    if text.isascii():
        return _ASCII_WORD.findall(text.lower())
    return [w.replace("\u2019", "'") for w in _word_re().findall(normalize_text(text))]


def caption_tokens(text: str, where: str) -> list[str]:
    """:func:`simple_tokenize` of a caption that must have words. Raises DatasetError naming
    ``where`` when it is empty or has no letter or digit (e.g. only emoji/punctuation)."""
    if not text.strip():
        raise DatasetError(f"{where}: empty caption")
    tokens = simple_tokenize(text)
    if not tokens:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise DatasetError(f"{where}: caption has no letters or digits: {shown!r}")
    return tokens


def image_id_key(image_id) -> str:
    """The form under which two image ids are the same image: ``391895``, ``"391895"`` and
    ``391895.0`` all give ``"391895"`` (JSON files mix ints and numeric strings). Other
    strings are kept as they are (``"0042"`` is not ``42``)."""
    if isinstance(image_id, float) and image_id.is_integer():
        image_id = int(image_id)
    return str(image_id)


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

    def image_files(self, split: str) -> dict[int | str, Path]:
        """``image_id -> image file`` of one split (what CLIP-S and the other image metrics
        read)."""
        return {im.image_id: im.path for im in self.split(split)}

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


def _field(entry: dict, key: str, where: str, kind: type, default=None):
    """``entry[key]`` (``default`` when absent and not None), refused unless a ``kind``."""
    if key not in entry and default is None:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = entry.get(key, default)
    if not isinstance(value, kind):
        name = {str: "a string", list: "a list"}.get(kind, kind.__name__)
        raise DatasetError(f"{where}: field {key!r} must be {name}, got {describe(value)}")
    return value


def _sentence(s, where: str, filename: str) -> tuple[str, list[str]]:
    """``(raw, tokens)`` of one Karpathy sentence (DatasetError naming ``where`` when a
    field has the wrong type: ``raw`` a string, ``tokens`` a list of strings or null)."""
    if not isinstance(s, dict) or ("raw" not in s and "tokens" not in s):
        raise DatasetError(f"{where}: needs 'raw' text or 'tokens'")
    raw, given = s.get("raw", ""), s.get("tokens") or []
    if not isinstance(raw, str):
        raise DatasetError(f"{where}.raw (image {filename}): a caption must be a string, got "
                           f"{describe(raw)}")
    bad = given if not isinstance(given, list) else \
        next((t for t in given if not isinstance(t, str)), None)
    if bad is not None:
        raise DatasetError(f"{where}.tokens (image {filename}): must be a list of words (strings), "
                           f"got {describe(bad)}; give the words as a list, or only 'raw'")
    tokens = [normalize_text(t) for t in given] or caption_tokens(raw, where)
    return raw or " ".join(tokens), tokens


def load_karpathy(path: str | Path, *, check_images: bool = True) -> CaptionDataset:
    """Read a Karpathy-format ``dataset.json``.

    Raises :class:`DatasetError` naming the file and the field when the JSON is malformed, an
    image entry lacks ``filename``/``split``/``sentences``, a split is unknown, an image has no
    caption, a caption is empty or has no letter or digit (``images[i].sentences[j]`` named),
    ids repeat (``42`` and ``"42"`` count as the same id), a split is empty, or
    (``check_images``) image files are missing. Given ``tokens`` are NFKC-normalised and
    lower-cased; a sentence without them is tokenized with :func:`simple_tokenize`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist (pass a Karpathy dataset.json)")
    data = read_json(path, "dataset", DatasetError, walk=False)  # fields checked one by one
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    root = path.parent
    images: list[ImageRecord] = []
    seen: dict[str, tuple[int, object]] = {}
    missing: list[str] = []
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: should be an object")
        filename = _field(entry, "filename", where, str)
        split = _field(entry, "split", where, str)
        split = "train" if split == "restval" else split
        if split not in SPLITS:
            raise DatasetError(f"{where}: split {quote(split)} is not train/val/test/restval")
        sentences = _field(entry, "sentences", where, list)
        if not sentences:
            raise DatasetError(f"{where} ({filename}): has no sentences")
        raws, toks = [], []
        for j, s in enumerate(sentences):
            raw, tokens = _sentence(s, f"{where}.sentences[{j}]", filename)
            raws.append(raw)
            toks.append(tuple(tokens))
        id_field = "cocoid" if "cocoid" in entry else "imgid"
        image_id = entry.get(id_field, i)
        if not isinstance(image_id, int | str | float) or isinstance(image_id, bool):
            raise DatasetError(f"{where}: field {id_field!r} (the image id) must be an integer or "
                               f"a string, got {describe(image_id)}")
        key = image_id_key(image_id)
        if key in seen:
            j, first = seen[key]
            raise DatasetError(f"{where}: image id {quote(image_id)} appears twice: images[{j}] has id "
                               f"{quote(first)} (ids are compared as text: 42 and \"42\" are the same)")
        seen[key] = (i, image_id)
        file = root / _field(entry, "filepath", where, str, "") / filename
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
    """The dataset a ``--dataset`` value names.

    Args:
        spec: ``shapes`` / ``shapes:N`` (the embedded set of 600 or N images, generated on
            first use) or a Karpathy JSON/folder path.

    Returns:
        The :class:`CaptionDataset`.

    Raises:
        ConfigError: a bad ``shapes:N``.
        DatasetError: a bad file.
    """
    if spec == "shapes" or spec.startswith("shapes:"):
        n = spec.partition(":")[2]
        if n and not n.isdigit():
            raise ConfigError(f"dataset {spec!r}: use shapes or shapes:N with N images (>= 10)")
        if n and not 10 <= int(n) <= MAX_SHAPES:
            raise ConfigError(f"dataset {spec!r}: shapes takes 10 to {MAX_SHAPES:,} images")
        return load_karpathy(default_shapes_path(int(n) if n else 600))
    return load_karpathy(spec)
