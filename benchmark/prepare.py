"""Convert downloaded caption files into a Karpathy-format ``dataset.json``.

Image-captioning papers report on the Karpathy & Fei-Fei (2015, "Deep Visual-Semantic
Alignments for Generating Image Descriptions") splits of three datasets, which people download
in several formats. :func:`prepare` reads any of them, checks every image, and writes a
``dataset.json`` that :func:`benchmark.data.load_karpathy` reads.

Caption formats (detected from the content, not the file name):

- **Kaggle Flickr8k** ``captions.txt``: a CSV with the header ``image,caption``
  (``1000268201_693b08cb0e.jpg,A child in a pink dress ...``). Flickr8k: Hodosh, Young &
  Hockenmaier 2013, "Framing Image Description as a Ranking Task", JAIR 47.
  A comma-separated ``image_name,comment_number,comment`` header is read the same way.
- **Token files**: ``Flickr8k.token.txt`` (and ``Flickr8k.lemma.token.txt``) and Flickr30k's
  ``results_20130124.token``: lines ``<image>#<n><TAB><caption>``.
- **Kaggle Flickr30k** ``results.csv``: pipe-separated with the header
  ``image_name| comment_number| comment`` (spaces after the pipes). Flickr30k: Young, Lai,
  Hodosh & Hockenmaier 2014, "From image descriptions to visual denotations", TACL 2. One line
  of the Kaggle copy lacks the ``|`` after the comment number: such lines are repaired and
  reported; lines that cannot be read are reported and skipped.
- **COCO annotations** ``captions_{train,val}{2014,2017}.json``: ``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}`` (Chen et al. 2015, "Microsoft
  COCO Captions: Data Collection and Evaluation Server", arXiv:1504.00325). Images are looked
  for in ``<images>/<subset>/`` (``train2014``, ``val2017``, ...; the subset comes from the
  file name ``captions_<subset>.json``), then in ``<images>/``.
- **Karpathy JSON** (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
  ``dataset_coco.json``; https://cs.stanford.edu/people/karpathy/deepimagesent/): validated and
  rewritten with ``filepath`` pointing at ``<images>``; its splits are kept.

A file that belongs to another dataset than the one asked for (a COCO annotation file or the
Flickr30k ``results.csv`` to ``flickr8k``, a Karpathy JSON whose ``dataset`` names another,
COCO 2014 and 2017 files together) is refused, saying which command fits it.

Splits (``splits=``), in this order of preference:

- Karpathy's JSON: each image takes the split of the entry with its ``cocoid`` (COCO; so the
  2014 split also applies to the 2017 files, whose ids are the same) or its ``filename``
  (Flickr). ``restval`` is kept (``load_karpathy`` counts it as train).
- Text lists, one image name per line, whose file name says the split (``train``, ``dev`` or
  ``val``, ``test``, ``restval``): e.g. Flickr8k's ``Flickr_8k.trainImages.txt``,
  ``Flickr_8k.devImages.txt`` (dev = val), ``Flickr_8k.testImages.txt``.
- None: a deterministic seeded split in the dataset's Karpathy proportions
  (:data:`KARPATHY_SIZES`: Flickr8k 6000/1000/1000, Flickr30k 29000/1014/1000, COCO
  113287/5000/5000), over every captioned image (before missing or unreadable ones are left
  out, so one bad file does not reshuffle the rest). COCO ``train*`` + ``val*`` files without
  a split file: train -> train, and the val images are split by the seed into val/test halves.
  The report's messages say which rule was used, with the seed and the counts.

Images named in captions but not found, and files PIL cannot open (``Image.open().verify()``),
are reported and left out; so are captioned images that the split files do not list.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from benchmark.data import image_id_key, simple_tokenize
from benchmark.errors import ConfigError, DatasetError, StorageError
from benchmark.fsutil import atomic_write_text, ensure_writable, refuse_overwrite
from benchmark.imagefile import file_problem
from benchmark.userfiles import describe, parse_json, quote

__all__ = ["prepare", "PrepareReport", "seeded_split", "split_counts", "KINDS", "KARPATHY_SIZES",
           "CSV_HEADER", "RESULTS_HEADER"]

KINDS = ("flickr8k", "flickr30k", "coco")
#: Karpathy split sizes (train, val, test); COCO's train is 82783 train2014 + 30504 restval
KARPATHY_SIZES = {"flickr8k": (6000, 1000, 1000), "flickr30k": (29000, 1014, 1000),
                  "coco": (113287, 5000, 5000)}
CSV_HEADER = ["image", "caption"]
RESULTS_HEADER = ["image_name", "comment_number", "comment"]
_TOKEN_LINE = re.compile(r"^(\S+?)#(\d+)\s+(.*)$")
_NUMBER_THEN_CAPTION = re.compile(r"^\s*(\d+)\s+(\S.*)$")
_SPLIT_ORDER = {"train": 0, "restval": 0, "val": 1, "test": 2}
_EXAMPLES = 5
_ARCHIVES = ((b"PK\x03\x04", "zip archive"), (b"\x1f\x8b", "gzip file"),
             (b"7z\xbc\xaf", "7-Zip archive"))
#: caption formats by what they belong to (:func:`_check_format`); token files are Flickr's
_FORMAT_OF = {"captions.txt": ("Kaggle Flickr8k captions.txt", ("flickr8k", "flickr30k")),
              "results.csv": ("Kaggle Flickr30k results.csv", ("flickr30k",)),
              "token": ("Flickr token file", ("flickr8k", "flickr30k")),
              "coco": ("COCO annotation file", ("coco",))}


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote and what it left out.

    ``counts``: images written per split (``restval`` listed apart when present; it counts as
    train). The lists hold image names (``missing``, ``unreadable`` as ``name: reason``,
    ``no_captions``, ``not_in_splits``) or ``file:line`` places (``duplicates``, ``malformed``,
    ``repaired``); ``messages`` are sentences for the user (split rule, how many left out).
    """

    kind: str
    out: Path
    counts: dict[str, int]
    captions: int
    split_rule: str
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    no_captions: list[str] = field(default_factory=list)
    not_in_splits: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        """Images written."""
        return sum(self.counts.values())

    @property
    def left_out(self) -> int:
        """Captioned images not written: missing, unreadable, or in no split."""
        return len(self.missing) + len(self.unreadable) + len(self.not_in_splits)

    def issues(self) -> list[tuple[str, int, list[str]]]:
        """``(label, count, first examples)`` of every non-empty problem list, for display."""
        rows = [("missing image files (left out)", self.missing),
                ("unreadable image files (left out)", self.unreadable),
                ("captioned images in no split (left out)", self.not_in_splits),
                ("listed images without captions", self.no_captions),
                ("duplicate caption lines (dropped)", self.duplicates),
                ("malformed lines (skipped)", self.malformed),
                ("repaired lines", self.repaired)]
        return [(label, len(items), items[:_EXAMPLES]) for label, items in rows if items]


@dataclass
class _Image:
    filename: str
    image_id: int | str | None  # COCO id, Karpathy imgid/cocoid; None: numbered later
    subs: tuple[str, ...]       # folders under --images to look in ("" = --images itself)
    captions: list[tuple[str, list[str] | None]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    split: str | None = None    # from a Karpathy captions file
    subset: str = ""            # COCO: train2014 / val2017 ... (which annotation file)
    path: Path | None = None


class _Collect:
    """Images keyed by filename (Flickr) or COCO id, plus the problems met while reading."""

    def __init__(self, kind: str):
        self.kind = kind
        self.images: dict[str, _Image] = {}
        self.duplicates: list[str] = []
        self.malformed: list[str] = []
        self.repaired: list[str] = []
        self.no_captions: list[str] = []

    def image(self, key: str, filename: str, image_id=None, subs=("",), subset="") -> _Image:
        im = self.images.get(key)
        if im is None:
            im = self.images[key] = _Image(filename, image_id, tuple(subs), subset=subset)
        return im

    def caption(self, im: _Image, raw: str, where: str, tokens: list[str] | None = None) -> None:
        raw = raw.strip()
        tokens = [str(t) for t in tokens] if tokens else None
        if not tokens and not simple_tokenize(raw):
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            self.malformed.append(f"{where}: {'empty caption' if not raw else f'no words in {shown!r}'}")
            return
        norm = " ".join(raw.lower().split()) or " ".join(tokens or [])
        if norm in im.seen:
            self.duplicates.append(f"{where} ({im.filename})")
            return
        im.seen.add(norm)
        im.captions.append((raw, tokens))


# ---------------------------------------------------------------------------------------- reading


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    for magic, kind in _ARCHIVES:
        if data.startswith(magic):
            raise DatasetError(f"{path} is a {kind}; unpack it and pass the caption file inside "
                               "(e.g. Flickr8k.token.txt, results.csv, captions_train2014.json)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte offset {exc.start}); convert the "
                           f"file to UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > "
                           f"{path.with_name(path.stem + '.utf8' + path.suffix)}") from None
    return text.splitlines()


def _read_json(path: Path):
    # a key given twice is refused; the fields are checked one by one, so no depth walk
    return parse_json("\n".join(_read_lines(path)), path, "caption file", DatasetError, walk=False)


def _expected_formats() -> str:
    return (f"{','.join(CSV_HEADER)!r} (Kaggle Flickr8k captions.txt), "
            f"{'| '.join(RESULTS_HEADER)!r} (Kaggle Flickr30k results.csv), "
            "'<image>#<n><TAB><caption>' lines (Flickr8k.token.txt, results_20130124.token), "
            "COCO captions_*.json or a Karpathy dataset_*.json")


def _read_captions(path: Path, acc: _Collect) -> str:
    """Add the captions of one file to ``acc``; return the format's name."""
    if path.is_dir():
        raise DatasetError(f"--captions {path} is a folder; pass the caption file itself")
    lines = _read_lines(path)
    first_i = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first_i is None:
        raise DatasetError(f"{path}: the file is empty")
    first = lines[first_i].strip()
    if first.startswith(("{", "[")):
        return _read_caption_json(path, acc)
    if _TOKEN_LINE.match(first):  # a tab after '#n' in the originals; spaces read too
        _read_token(path, lines, acc)
        return "token"
    if "|" in first:
        _read_results_csv(path, lines, first_i, acc)
        return "results.csv"
    if "," in first:
        _read_flickr_csv(path, lines, acc)
        return "captions.txt"
    raise DatasetError(f"{path}:{first_i + 1}: unrecognised caption format: the first line is "
                       f"{first[:80]!r}; expected a header {_expected_formats()}")


def _read_flickr_csv(path: Path, lines: list[str], acc: _Collect) -> None:
    reader = csv.reader(lines)
    header = next(reader, [])
    found = [h.strip().lower() for h in header]
    if found not in (CSV_HEADER, RESULTS_HEADER):
        raise DatasetError(f"{path}:{reader.line_num}: CSV header {','.join(header)!r} found, "
                           f"{','.join(CSV_HEADER)!r} expected (Kaggle Flickr8k captions.txt; or "
                           f"{','.join(RESULTS_HEADER)!r}, or Flickr30k's pipe-separated "
                           f"{'| '.join(RESULTS_HEADER)!r})")
    first = len(found) - 1  # the caption starts in the last column
    for row in reader:
        where = f"{path.name}:{reader.line_num}"
        if not any(c.strip() for c in row):
            continue
        if len(row) <= first or not row[0].strip() or (first == 2 and not row[1].strip().isdigit()):
            acc.malformed.append(f"{where}: expected {','.join(header)!r} fields, "
                                 f"got {','.join(row)[:60]!r}")
            continue
        name = row[0].strip()  # an unquoted caption with commas comes as several fields: rejoin
        acc.caption(acc.image(name, name), ",".join(row[first:]), where)


def _read_results_csv(path: Path, lines: list[str], first_i: int, acc: _Collect) -> None:
    header = [h.strip().lower() for h in lines[first_i].split("|")]
    if header != RESULTS_HEADER:
        raise DatasetError(f"{path}:{first_i + 1}: header {lines[first_i].strip()[:80]!r} found, "
                           f"{'| '.join(RESULTS_HEADER)!r} expected (Kaggle Flickr30k results.csv)")
    for i in range(first_i + 1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        where = f"{path.name}:{i + 1}"
        parts = [p.strip() for p in line.split("|", 2)]
        if len(parts) == 3 and parts[1].isdigit() and parts[0]:
            name, caption = parts[0], parts[2]
        elif len(parts) == 2 and parts[0] and (m := _NUMBER_THEN_CAPTION.match(parts[1])):
            name, caption = parts[0], m.group(2)
            acc.repaired.append(f"{where}: no '|' after comment number {m.group(1)}; "
                                f"read the rest as the caption")
        else:
            acc.malformed.append(f"{where}: expected 'image| number| caption', got {line.strip()[:60]!r}")
            continue
        acc.caption(acc.image(name, name), caption, where)


def _read_token(path: Path, lines: list[str], acc: _Collect) -> None:
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path.name}:{i + 1}"
        m = _TOKEN_LINE.match(line.strip())
        if not m:
            acc.malformed.append(f"{where}: expected '<image>#<n><TAB><caption>', got {line.strip()[:60]!r}")
            continue
        name = m.group(1)
        acc.caption(acc.image(name, name), m.group(3), where)


def _coco_subset(path: Path, images: list) -> str:
    m = re.match(r"^captions_(.+)$", path.stem)
    if m:
        return m.group(1)
    for entry in images[:1]:  # coco_url: http://images.cocodataset.org/val2014/COCO_val2014_...jpg
        url = entry.get("coco_url", "") if isinstance(entry, dict) else ""
        if url.count("/") >= 2:
            return url.rsplit("/", 2)[-2]
    return ""


def _read_caption_json(path: Path, acc: _Collect) -> str:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list ({_expected_formats()})")
    if "annotations" in data:
        _read_coco(path, data, acc)
        return "coco"
    _check_karpathy_dataset(path, data, acc.kind)
    _read_karpathy(path, data, acc)
    return "karpathy"


def _check_karpathy_dataset(path: Path, data: dict, kind: str) -> None:
    """DatasetError when a Karpathy JSON says (its ``dataset`` field) it is another dataset."""
    said = data.get("dataset")
    if isinstance(said, str) and said in KINDS and said != kind:
        raise DatasetError(f"{path} is Karpathy's {said} file (its 'dataset' is {said!r}), not "
                           f"{kind}'s: use `capbench data {said}`, or pass dataset_{kind}.json")


def _check_format(path: Path, fmt: str, kind: str) -> None:
    """DatasetError when a caption file's format belongs to another dataset than ``kind``."""
    name, kinds = _FORMAT_OF.get(fmt, (None, KINDS))
    if kind not in kinds:
        use = " or ".join(f"`capbench data {k}`" for k in kinds)
        want = ("captions_train2014.json + captions_val2014.json (or the 2017 pair) or "
                "Karpathy's dataset_coco.json") if kind == "coco" else f"{kind}'s caption file"
        raise DatasetError(f"{path} is a {name}, which is not {kind}: use {use} for it, or "
                           f"pass {want}")


def _read_coco(path: Path, data: dict, acc: _Collect) -> None:
    if not isinstance(data["annotations"], list):
        raise DatasetError(f"{path}: 'annotations' should be a list of {{image_id, caption}}")
    subset = _coco_subset(path, data["images"])
    subs = (subset, "") if subset else ("",)
    ids: dict[str, _Image] = {}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                or not isinstance(entry.get("id"), int | str) or isinstance(entry.get("id"), bool):
            raise DatasetError(f"{path}: images[{i}] needs 'id' and 'file_name' (COCO annotation format)")
        key = image_id_key(entry["id"])
        ids[key] = acc.image(key, entry["file_name"], entry["id"], subs, subset)
    for j, ann in enumerate(data["annotations"]):
        where = f"{path.name}: annotations[{j}]"
        if not isinstance(ann, dict) or "caption" not in ann or "image_id" not in ann:
            acc.malformed.append(f"{where}: needs 'image_id' and 'caption'")
            continue
        if not isinstance(ann["caption"], str):
            acc.malformed.append(f"{where}: caption must be a string, got {describe(ann['caption'])}")
            continue
        im = ids.get(image_id_key(ann["image_id"]))
        if im is None:
            acc.malformed.append(f"{where}: image_id {quote(ann['image_id'])} is not in 'images'")
            continue
        acc.caption(im, ann["caption"], where)


def _read_karpathy(path: Path, data: dict, acc: _Collect) -> None:
    coco = acc.kind == "coco"
    for i, entry in enumerate(data["images"]):
        where = f"{path.name}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DatasetError(f"{path}: images[{i}] needs a 'filename' (Karpathy format)")
        split = entry.get("split")
        if split is not None and split not in _SPLIT_ORDER:
            raise DatasetError(f"{path}: images[{i}]: split {split!r} is not train/val/test/restval")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise DatasetError(f"{path}: images[{i}] needs a 'sentences' list (Karpathy format)")
        image_id = entry.get("cocoid", entry.get("imgid"))
        if image_id is not None and (not isinstance(image_id, int | str) or isinstance(image_id, bool)):
            raise DatasetError(f"{path}: images[{i}]: the image id ('cocoid' or 'imgid') must be an "
                               f"integer or a string, got {describe(image_id)}")
        key = image_id_key(image_id) if coco and image_id is not None else entry["filename"]
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise DatasetError(f"{path}: images[{i}]: field 'filepath' must be a string (a folder), "
                               f"got {describe(filepath)}")
        im = acc.image(key, entry["filename"], image_id, (filepath, "") if filepath else ("",),
                       subset=filepath)
        im.split = split
        for j, s in enumerate(sentences):
            if not isinstance(s, dict):
                acc.malformed.append(f"{where}.sentences[{j}]: should be an object")
                continue
            problem = _sentence_problem(s)
            if problem:
                acc.malformed.append(f"{where}.sentences[{j}] ({entry['filename']}): {problem}")
                continue
            tokens = s.get("tokens") or None
            acc.caption(im, s.get("raw") or " ".join(tokens or []), f"{where}.sentences[{j}]", tokens)


def _sentence_problem(s: dict) -> str | None:
    """Why a Karpathy sentence's fields cannot be read as they are meant, or None."""
    raw, tokens = s.get("raw"), s.get("tokens")
    if raw is not None and not isinstance(raw, str):
        return f"raw must be a string, got {describe(raw)}"
    if tokens is not None and (not isinstance(tokens, list)
                               or not all(isinstance(t, str) for t in tokens)):
        return f"tokens must be a list of words (strings), got {describe(tokens)}"
    return None


# ----------------------------------------------------------------------------------------- splits


def split_counts(n: int, kind: str) -> tuple[int, int, int]:
    """(train, val, test) image counts for ``n`` images in ``kind``'s Karpathy proportions: val
    and test rounded by proportion (at least 1 each), train the rest (at least 1)."""
    if n < 3:
        raise DatasetError(f"{n} image(s) cannot make train, val and test splits (need at least 3)")
    full_train, full_val, full_test = KARPATHY_SIZES[kind]
    total = full_train + full_val + full_test
    val = max(1, round(n * full_val / total))
    test = max(1, round(n * full_test / total))
    while n - val - test < 1:  # tiny sets: keep one training image
        if val >= test:
            val -= 1
        else:
            test -= 1
    return n - val - test, val, test


def seeded_split(keys: Iterable[str], kind: str, seed: int = 0) -> dict[str, str]:
    """Deterministic split of ``keys`` in ``kind``'s Karpathy proportions: the sorted keys are
    shuffled with ``random.Random(seed)``; the first ``test`` go to test, the next ``val`` to
    val, the rest to train. The same keys and seed always give the same split."""
    order = sorted(set(keys))
    random.Random(seed).shuffle(order)
    _, val, test = split_counts(len(order), kind)
    return {k: "test" if i < test else "val" if i < test + val else "train"
            for i, k in enumerate(order)}


def _split_name(path: Path) -> str:
    name = path.name.lower()
    for word, split in (("restval", "restval"), ("train", "train"), ("test", "test"),
                        ("dev", "val"), ("val", "val")):
        if word in name:
            return split
    raise DatasetError(f"split list {path}: its name should say the split (train, dev/val, test, "
                       "restval), e.g. Flickr_8k.trainImages.txt, or pass Karpathy's dataset_*.json")


def _read_splits(paths: list[Path], acc: _Collect
                 ) -> tuple[dict[str, str], dict[str, object], dict[str, str], str]:
    """``(key -> split, key -> Karpathy id, key -> image name, description)`` from split files."""
    coco = acc.kind == "coco"
    by_name = {im.filename: k for k, im in acc.images.items()} if coco else None
    splits: dict[str, str] = {}
    ids: dict[str, object] = {}
    where_from: dict[str, str] = {}
    names: dict[str, str] = {}

    def assign(key: str, split: str, where: str) -> None:
        if key in splits and splits[key] != split:
            raise DatasetError(f"{where}: {key} is already in split {splits[key]!r} "
                               f"({where_from[key]}); an image can be in one split only")
        splits[key] = split
        where_from[key] = where

    for path in paths:
        first = next((ln.strip() for ln in _read_lines(path) if ln.strip()), "")
        if first.startswith("{"):
            data = _read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("images"), list):
                raise DatasetError(f"{path}: a split JSON must be Karpathy's dataset_*.json "
                                   "(an object with an 'images' list)")
            _check_karpathy_dataset(path, data, acc.kind)
            for i, entry in enumerate(data["images"]):
                split = entry.get("split") if isinstance(entry, dict) else None
                if split not in _SPLIT_ORDER or not isinstance(entry.get("filename"), str):
                    raise DatasetError(f"{path}: images[{i}] needs 'filename' and a 'split' "
                                       "(train/val/test/restval)")
                if coco and entry.get("cocoid") is not None:
                    key = image_id_key(entry["cocoid"])
                else:
                    key = by_name.get(entry["filename"], entry["filename"]) if coco else entry["filename"]
                assign(key, split, f"{path.name}: images[{i}]")
                names[key] = entry["filename"]
                image_id = entry.get("cocoid", entry.get("imgid"))
                if image_id is not None:
                    ids[key] = image_id
        else:
            split = _split_name(path)
            for i, line in enumerate(_read_lines(path)):
                if not line.strip():
                    continue
                name = line.split()[0].rsplit("/", 1)[-1]
                key = by_name.get(name, name) if coco else name
                assign(key, split, f"{path.name}:{i + 1}")
                names[key] = name
    counts = {s: sum(1 for v in splits.values() if v == s) for s in ("train", "restval", "val", "test")}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return splits, ids, names, f"splits from {', '.join(p.name for p in paths)} ({shown})"


def _default_split(acc: _Collect, seed: int) -> tuple[dict[str, str], str]:
    keys = list(acc.images)
    subsets = {im.subset for im in acc.images.values()}
    if acc.kind == "coco" and len(subsets) == 2 and all(s.startswith(("train", "val")) for s in subsets):
        train_sub = next(s for s in subsets if s.startswith("train"))
        val_sub = next(s for s in subsets if s.startswith("val"))
        val_keys = sorted(k for k in keys if acc.images[k].subset == val_sub)
        random.Random(seed).shuffle(val_keys)
        half = (len(val_keys) + 1) // 2
        out = {k: "train" for k in keys if acc.images[k].subset == train_sub}
        out.update({k: "val" if i < half else "test" for i, k in enumerate(val_keys)})
        return out, (f"no split file: {train_sub} -> train ({len(out) - len(val_keys)} images), "
                     f"{val_sub} split by seed {seed} into val ({half}) and test "
                     f"({len(val_keys) - half}) halves. This is not Karpathy's split: pass "
                     "--splits dataset_coco.json for it (it also fits the 2017 files, by COCO id)")
    out = seeded_split(keys, acc.kind, seed)
    train, val, test = split_counts(len(keys), acc.kind)
    full = "/".join(map(str, KARPATHY_SIZES[acc.kind]))
    return out, (f"no split file: seeded random split (seed {seed}) of {len(keys)} captioned images "
                 f"in {acc.kind}'s Karpathy proportions ({full}): {train} train, {val} val, "
                 f"{test} test. Pass --splits for the standard split")


# ----------------------------------------------------------------------------------------- images


def _subdirs(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_dir())


def _locate(images_dir: Path, acc: _Collect, keys: list[str]) -> tuple[Path, str | None]:
    """Set ``path`` of each image found; return the base folder used (``images_dir`` or, when
    none is directly there, the sub-folder holding most of a sample) and a note."""
    def find(base: Path, im: _Image) -> Path | None:
        for sub in im.subs:
            p = base / sub / im.filename
            if p.is_file() or os.path.lexists(p):  # a link loop or a pipe: said, not "missing"
                return p
        return None

    sample = [acc.images[k] for k in keys[:: max(1, len(keys) // 50)][:50]]
    base, note = images_dir, None
    if not any(find(images_dir, im) for im in sample):
        subdirs = _subdirs(images_dir)
        subdirs += [d2 for d in subdirs for d2 in _subdirs(d)]
        hits = [(sum(find(d, im) is not None for im in sample), d) for d in subdirs]
        best = max(hits, key=lambda h: h[0], default=(0, None))
        if best[0] == 0:
            im = sample[0]
            raise DatasetError(f"none of the images named in the captions are in --images {images_dir} "
                               f"(e.g. {images_dir / im.subs[0] / im.filename}); pass the folder "
                               "that holds the image files")
        base = best[1]
        note = f"images found under {base} (not directly in --images {images_dir})"
    for k in keys:
        acc.images[k].path = find(base, acc.images[k])
    return base, note


def _check_image(path: Path, decode: bool) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if decode:
                img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still reads every byte
                img.load()
            else:
                img.verify()
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {exc}"[:120]
    return None


def _check_images(paths: list[Path], decode: bool,
                  progress: Callable[[int, int], None] | None) -> list[str | None]:
    workers = min(8, (os.cpu_count() or 1) * 2)
    out: list[str | None] = []
    with ThreadPoolExecutor(workers) as pool:
        for i, reason in enumerate(pool.map(lambda p: _check_image(p, decode), paths, chunksize=64)):
            out.append(reason)
            if progress and (i + 1 == len(paths) or (i + 1) % 500 == 0):
                progress(i + 1, len(paths))
    return out


def _filepath(folder: Path, out_dir: Path) -> str:
    """``folder`` relative to ``out_dir`` when it lies inside it, else absolute."""
    folder, out_dir = Path(os.path.abspath(folder)), Path(os.path.abspath(out_dir))
    try:
        rel = folder.relative_to(out_dir)
    except ValueError:
        return str(folder)
    return "" if str(rel) == "." else rel.as_posix()


# ---------------------------------------------------------------------------------------- prepare


def _check_out_folder(out: Path) -> None:
    """DatasetError, before any image is checked, when ``out``'s folder cannot be written:
    probes its nearest existing folder (nothing is created)."""
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DatasetError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
    try:
        ensure_writable(folder, what="folder of --out")
    except StorageError as exc:
        raise DatasetError(f"--out {out}: {exc} Choose another --out") from None


def prepare(kind: str, *, captions: list[Path] | Path, images: Path, out: Path,
            splits: Path | list[Path] | None = None, seed: int = 0, force: bool = False,
            check_images: bool | Literal["decode"] = True,
            progress: Callable[[int, int], None] | None = None) -> PrepareReport:
    """Write a Karpathy ``dataset.json`` for ``kind`` (flickr8k, flickr30k, coco) to ``out``.
    Nothing is written unless all of it succeeds.

    Args:
        kind: ``flickr8k``, ``flickr30k`` or ``coco``.
        captions: the caption file(s) (formats in the module docstring; COCO usually
            ``captions_train2014.json`` and ``captions_val2014.json``).
        images: the folder holding the image files (COCO: holding ``train2014/`` and
            ``val2014/``).
        out: the JSON to write (a folder means ``<out>/dataset.json``); refused when it exists
            unless ``force``. ``filepath`` is written relative to the JSON's folder when the
            images lie inside it, else absolute.
        splits: Karpathy's ``dataset_*.json`` or per-split name lists; None for a seeded split.
        seed: the seed of that split.
        force: overwrite an existing ``out``.
        check_images: True opens every file with PIL and runs ``verify()``; ``"decode"`` also
            decodes it (catches truncated JPEGs; slower); False only checks that files exist.
        progress: ``progress(done, total)`` is called while images are checked.

    Returns:
        :class:`PrepareReport`: images per split, image and caption counts, the problems found
        and the path written.

    Raises:
        DatasetError: (naming the file and line, and what to do) before any image is checked,
            for input that cannot be read at all (unknown format or header, invalid JSON, not
            UTF-8, an archive, conflicting split lists), for a file of another dataset than
            ``kind`` (a COCO annotation file to ``flickr8k``, Karpathy's ``dataset_coco.json`` to
            ``flickr30k``, ...), for COCO 2014 and 2017 files together, for a file given twice,
            when ``out`` is one of the inputs (even with ``force``), exists (without ``force``)
            or its folder cannot be written; and, after the check, when a split would be empty.
        ConfigError: an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; choose {', '.join(KINDS)}")
    captions = [Path(captions)] if isinstance(captions, str | Path) else [Path(c) for c in captions]
    split_paths = [] if splits is None else [Path(splits)] if isinstance(splits, str | Path) \
        else [Path(s) for s in splits]
    out = _check_arguments(captions, split_paths, Path(images), Path(out), force)
    acc, formats = _collect_captions(kind, captions)
    rule, ids, not_in_splits, messages = _assign_splits(acc, kind, captions, split_paths,
                                                        formats, seed)
    keys = list(acc.images)
    ids = _image_ids(acc, kind, keys, ids)
    found, missing, unreadable, note = _find_images(acc, Path(images), keys, check_images,
                                                    progress)
    messages += [note] if note else []
    if missing or unreadable:
        messages.append(f"left out {len(missing) + len(unreadable)} image(s): {len(missing)} missing, "
                        f"{len(unreadable)} unreadable")
    counts = {s: sum(acc.images[k].split == s for k in found) for s in ("train", "val", "test")}
    if restval := sum(acc.images[k].split == "restval" for k in found):
        counts["restval"] = restval
    entries, sentid = _entries(acc, kind, found, ids, out.parent)
    _check_splits_filled(acc, counts, split_paths, rule,
                         f"{len(missing)} missing, {len(unreadable)} unreadable", out)
    if counts.get("restval"):
        messages.append(f"{counts['restval']} restval image(s) kept as 'restval' "
                        "(load_karpathy counts them as train)")
    report = PrepareReport(kind, out, counts, sentid, rule, missing, unreadable, acc.no_captions,
                           not_in_splits, acc.duplicates, acc.malformed, acc.repaired, messages)
    payload = {"dataset": kind, "images": entries,
               "prepared": {"by": "capbench data " + kind, "captions": [p.name for p in captions],
                            "splits": [p.name for p in split_paths], "split_rule": rule,
                            "seed": seed, "left_out": {"missing": len(missing),
                                                       "unreadable": len(unreadable),
                                                       "not_in_splits": len(not_in_splits)}}}
    atomic_write_text(out, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    return report


def _check_arguments(captions: list[Path], split_paths: list[Path], images: Path, out: Path,
                     force: bool) -> Path:
    """The JSON to write (``out``, or ``out/dataset.json`` for a folder), once every file and
    folder :func:`prepare` was given is checked (DatasetError, see there)."""
    if not captions:
        raise DatasetError("no caption file given (--captions)")
    if out.is_dir():
        out = out / "dataset.json"
    if not images.is_dir():
        raise DatasetError(f"--images {images} is not a folder ({file_problem(images) or 'a file'})")
    for p in [*captions, *split_paths]:
        if not p.is_file():
            raise DatasetError(f"{p} does not exist")
    for p in [*captions, *split_paths]:
        if out.exists() and os.path.samefile(p, out):
            raise DatasetError(f"--out {out} is also an input ({p}); choose another --out "
                               "(--force never overwrites an input)")
    for flag, paths in (("--captions", captions), ("--splits", split_paths)):
        for i, p in enumerate(paths):  # one Karpathy JSON as --captions and --splits is fine
            if any(os.path.samefile(p, q) for q in paths[:i]):
                raise DatasetError(f"{flag} {p} is given twice; pass each file once")
    if out.exists() and not force:
        raise DatasetError(f"{out} already exists; choose another --out or pass --force to overwrite it")
    refuse_overwrite(out, "--out", dataset_ok=True)  # a run record, even with --force
    _check_out_folder(out)
    return out


def _collect_captions(kind: str, captions: list[Path]) -> tuple[_Collect, list[str]]:
    """Every captioned image of the caption files, and each file's format. DatasetError for
    a file of another dataset, COCO 2014 and 2017 files together, or no usable caption."""
    acc = _Collect(kind)
    formats = []
    for p in captions:
        formats.append(_read_captions(p, acc))
        _check_format(p, formats[-1], kind)
    years = {}  # COCO: the 2014 and 2017 files hold the same images, split differently
    for im in acc.images.values() if kind == "coco" else ():
        if m := re.search(r"(20\d\d)$", im.subset):
            years.setdefault(m.group(1), im.subset)
    if len(years) > 1:
        raise DatasetError(f"--captions mixes COCO {' and '.join(sorted(years))} files "
                           f"({', '.join(p.name for p in captions)}): they hold the same images, "
                           "split differently; pass captions_train2014.json + "
                           "captions_val2014.json, or captions_train2017.json + "
                           "captions_val2017.json")
    if not acc.images:
        raise DatasetError(f"no captions found in {', '.join(map(str, captions))}")
    for key, im in list(acc.images.items()):
        if not im.captions:  # every caption of it was malformed, or COCO lists it uncaptioned
            acc.no_captions.append(im.filename)
            del acc.images[key]
    if not acc.images:
        raise DatasetError(f"no usable caption found in {', '.join(map(str, captions))}")
    return acc, formats


def _assign_splits(acc: _Collect, kind: str, captions: list[Path], split_paths: list[Path],
                   formats: list[str], seed: int) -> tuple[str, dict, list[str], list[str]]:
    """Give every image of ``acc`` its split: from the split files, the Karpathy JSON itself,
    or a seeded split. Returns ``(rule, ids from the split files, names left out, messages)``;
    DatasetError when no captioned image is in the split files."""
    messages: list[str] = []
    ids: dict[str, object] = {}
    not_in_splits: list[str] = []
    if split_paths:
        assigned, ids, names, rule = _read_splits(split_paths, acc)
        acc.no_captions += [names[k] for k in assigned if k not in acc.images]
        for key in list(acc.images):
            if key in assigned:
                acc.images[key].split = assigned[key]
            else:
                not_in_splits.append(acc.images.pop(key).filename)
        if not_in_splits:
            messages.append(f"{len(not_in_splits)} captioned image(s) are in none of the split files "
                            "and were left out")
    elif all(f == "karpathy" for f in formats) and all(im.split for im in acc.images.values()):
        rule = f"splits from {', '.join(p.name for p in captions)} (Karpathy JSON)"
    else:
        assigned, rule = _default_split(acc, seed)
        for key, split in assigned.items():
            acc.images[key].split = split
    messages.insert(0, rule)
    if not acc.images:
        raise DatasetError(f"no captioned image is in the split files ({rule}); do they belong to "
                           f"these captions? ({kind}: Karpathy's dataset_{kind}.json"
                           + (", or Flickr_8k.trainImages.txt, ...)" if kind == "flickr8k" else ")"))
    return rule, ids, not_in_splits, messages


def _image_ids(acc: _Collect, kind: str, keys: list[str], ids: dict) -> dict:
    """``{key: image id}``: COCO's annotation id; Flickr's split-file imgid, else the caption
    file's, else the images numbered by sorted name (before any are dropped)."""
    ids = {k: acc.images[k].image_id if kind == "coco" and acc.images[k].image_id is not None
           else ids.get(k, acc.images[k].image_id) for k in keys}
    if kind != "coco" and (None in ids.values() or len({image_id_key(v) for v in ids.values()}) < len(ids)):
        ids = {k: i for i, k in enumerate(sorted(keys, key=lambda k: acc.images[k].filename))}
    return ids


def _find_images(acc: _Collect, images: Path, keys: list[str], check_images, progress):
    """``(usable keys, missing names, 'name: reason' of unreadable files, note)``: each image
    located under ``images`` and, with ``check_images``, opened (see :func:`prepare`)."""
    _, note = _locate(images, acc, keys)
    missing = [acc.images[k].filename for k in keys if acc.images[k].path is None]
    found = [k for k in keys if acc.images[k].path is not None]
    odd = {k: why for k in found if (why := file_problem(acc.images[k].path))}
    unreadable = [f"{acc.images[k].filename}: {why}" for k, why in odd.items()]
    found = [k for k in found if k not in odd]
    if check_images:
        reasons = _check_images([acc.images[k].path for k in found], check_images == "decode", progress)
        bad = {k for k, r in zip(found, reasons, strict=True) if r}
        unreadable += [f"{acc.images[k].filename}: {r}" for k, r in zip(found, reasons, strict=True) if r]
        found = [k for k in found if k not in bad]
    return found, missing, unreadable, note


def _entries(acc: _Collect, kind: str, found: list[str], ids: dict,
             out_dir: Path) -> tuple[list[dict], int]:
    """The Karpathy ``images`` entries of ``found`` and the number of sentences."""
    entries, sentid = [], 0
    for k in found:
        im = acc.images[k]
        image_id = ids[k]
        entry = {"filepath": _filepath(im.path.parent, out_dir), "filename": im.filename,
                 "split": im.split}
        if kind == "coco" and image_id is not None:
            entry["cocoid"] = image_id
        entry["imgid"] = len(entries) if kind == "coco" else image_id
        sentences = []
        for raw, tokens in im.captions:
            sentences.append({"raw": raw, "tokens": tokens or simple_tokenize(raw),
                              "imgid": entry["imgid"], "sentid": sentid})
            sentid += 1
        entry["sentences"] = sentences
        entry["sentids"] = [x["sentid"] for x in sentences]
        entries.append(entry)
    return entries, sentid


def _check_splits_filled(acc: _Collect, counts: dict, split_paths: list[Path], rule: str,
                         left_out: str, out: Path) -> None:
    """DatasetError when train (or restval), val or test would have no images."""
    listed = {im.split for im in acc.images.values()}
    for s in ("train", "val", "test"):
        if counts[s] == 0 and not (s == "train" and counts.get("restval")):
            hint = ""
            if split_paths and s not in listed and not (s == "train" and "restval" in listed):
                hint = (f"; no split file gives {s!r} images: pass every split's list "
                        "(e.g. Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt and "
                        "Flickr_8k.testImages.txt) or Karpathy's dataset_*.json")
            raise DatasetError(f"split {s!r} would have no images ({rule}; {left_out}){hint}; "
                               f"nothing written to {out}")
