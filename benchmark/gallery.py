"""A static HTML gallery of test-split captions: ``capbench report --gallery DIR``.

One page per (dataset name, split fingerprint) group of run records, plus ``index.html``
linking them. Each page is a table with one row per test image: a thumbnail, the reference
captions, and for every model (run) in the group its caption and per-image CIDEr-D (x100),
rows sorted worst first by the mean per-image CIDEr-D over the group's models. Thumbnails
are downscaled copies under ``DIR/thumbs/`` referenced by relative paths, so the folder
works offline and can be moved or zipped as a whole.

Attention strips are not computed here (that needs the checkpoint and the model loaded; see
``capbench explain``); precomputed strip images can be passed in and are shown under the
caption of their run.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from benchmark.data import image_id_key, load_karpathy
from benchmark.errors import CapbenchError, RecordError, StorageError
from benchmark.fsutil import atomic_write_text, ensure_writable
from benchmark.records import RunRecord

__all__ = ["write_gallery", "THUMB_SIZE"]

#: longest side of a thumbnail, in pixels
THUMB_SIZE = 128
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


@dataclass
class _Cell:
    caption: str | None
    cider: float | None  # x100
    strip: str | None = None  # relative path of an attention strip


@dataclass
class _Row:
    key: str
    image_id: object
    filename: str
    thumb: str | None
    references: list[str]
    cells: list[_Cell]
    mean: float | None


@dataclass
class _Model:
    run_id: str
    arch: str
    encoder: str
    cider: float | None  # x100, the run's corpus CIDEr-D
    label: str = ""


@dataclass
class _Group:
    name: str
    fingerprint: str
    page: str
    models: list[_Model]
    rows: list[_Row] = field(default_factory=list)
    n_images: int = 0
    notes: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "dataset"


def _x100(value) -> float | None:
    try:
        return None if value is None else float(value) * 100.0
    except (TypeError, ValueError):
        return None


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def _make_thumb(src: Path, dest_dir: Path) -> str:
    """Downscale ``src`` into ``dest_dir`` (named by a hash of its path); return the file name.
    Raises OSError (or PIL's errors, subclasses of it) when the image cannot be read."""
    from PIL import Image

    name = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16] + ".png"
    dest = dest_dir / name
    if dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime:
        return name
    with Image.open(src) as im:
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
        tmp = dest.with_suffix(".tmp.png")
        im.save(tmp, format="PNG", optimize=True)
        tmp.replace(dest)
    return name


def _group_records(records: Iterable[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset.name, r.dataset.split_fingerprint), []).append(r)
    for runs in groups.values():
        runs.sort(key=lambda r: (r.arch, r.encoder, r.run_id))
    return groups


def _build_group(name: str, fp: str, runs: list[RunRecord], out_dir: Path,
                 max_images: int | None, strips: Mapping[tuple[str, str], Path | str]) -> _Group:
    models = [_Model(r.run_id, r.arch, r.encoder, _x100(r.metrics.get("CIDEr"))) for r in runs]
    labels = [f"{m.arch} / {m.encoder}" for m in models]
    for m, lab in zip(models, labels, strict=True):  # a run id only where the pair repeats
        m.label = lab if labels.count(lab) == 1 else f"{lab} ({m.run_id})"
    group = _Group(name, fp, f"{_slug(name)}-{_slug(fp)}.html", models)

    # the test images, in dataset order where the dataset file can still be read
    images: dict[str, dict] = {}
    paths = list(dict.fromkeys(r.dataset.path for r in runs if r.dataset.path))
    problem = "the run records do not name their dataset file"
    for path in paths:  # runs of one group may have read copies of the file in different places
        try:
            ds = load_karpathy(path, check_images=False)
        except CapbenchError as exc:
            problem = str(exc)
            continue
        for im in ds.split("test"):
            images[image_id_key(im.image_id)] = {"id": im.image_id, "filename": im.filename,
                                                 "path": im.path, "refs": list(im.captions)}
        break
    else:
        group.notes.append(f"dataset file unavailable ({problem}): no thumbnails or references")
    dataset_ok = bool(images)

    captions: list[dict[str, str]] = []
    scores: list[dict[str, float]] = []
    for r in runs:
        caps = {}
        for p in r.predictions:
            k = image_id_key(p.get("image_id"))
            caps[k] = str(p.get("caption", ""))
            if not dataset_ok and k not in images:
                images[k] = {"id": p.get("image_id"), "filename": str(p.get("filename", "")),
                             "path": None, "refs": []}
        captions.append(caps)
        ids, cider = r.per_image.get("image_ids") or [], r.per_image.get("CIDEr") or []
        if len(ids) != len(cider):
            group.notes.append(f"{r.run_id}: per-image CIDEr-D does not match its image ids; "
                               "left out")
            ids, cider = [], []
        scores.append({image_id_key(i): v for i, c in zip(ids, cider, strict=True)
                       if (v := _x100(c)) is not None})
    if not any(captions) and not dataset_ok:
        group.notes.append("no predictions in these run records")

    thumbs = out_dir / "thumbs"
    unreadable = 0
    rows: list[_Row] = []
    for k, info in images.items():
        cells = []
        for r, caps, sc in zip(runs, captions, scores, strict=True):
            strip = strips.get((r.run_id, k))
            cells.append(_Cell(caps.get(k), sc.get(k), str(strip) if strip else None))
        vals = [c.cider for c in cells if c.cider is not None]
        rows.append(_Row(k, info["id"], info["filename"], None, info["refs"], cells,
                         sum(vals) / len(vals) if vals else None))
    # worst first; images no model scored go last; ties keep dataset order (stable sort)
    rows.sort(key=lambda row: (row.mean is None, row.mean if row.mean is not None else 0.0))
    group.n_images = len(rows)
    if max_images is not None:
        rows = rows[:max_images]
    for row in rows:
        src = images[row.key]["path"]
        if src is None:
            continue
        try:
            row.thumb = "thumbs/" + _make_thumb(Path(src), thumbs)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            unreadable += 1
    if unreadable:
        group.notes.append(f"{unreadable} image file(s) could not be read: shown without "
                           "thumbnails")
    group.rows = rows
    return group


def _copy_strips(strips: Mapping[tuple[object, object], Path | str] | None,
                 out_dir: Path) -> dict[tuple[str, str], str]:
    """Copy precomputed attention strips into ``out_dir/attention``; return
    ``(run_id, image id key) -> relative path``."""
    out: dict[tuple[str, str], str] = {}
    if not strips:
        return out
    dest_dir = out_dir / "attention"
    dest_dir.mkdir(parents=True, exist_ok=True)
    for (run_id, image_id), src in strips.items():
        src = Path(src)
        if not src.is_file():
            raise CapbenchError(f"attention strip {src} (run {run_id}, image {image_id}) does "
                                "not exist")
        key = (str(run_id), image_id_key(image_id))
        name = hashlib.sha1("\0".join(key).encode()).hexdigest()[:16] + src.suffix.lower()
        shutil.copyfile(src, dest_dir / name)
        out[key] = f"attention/{name}"
    return out


def write_gallery(records: Iterable[RunRecord], out_dir: Path, *, max_images: int | None = None,
                  attention_strips: Mapping[tuple[object, object], Path | str] | None = None,
                  ) -> list[Path]:
    """Write a static HTML gallery of the records' test captions into ``out_dir``.

    Records are grouped by (dataset name, split fingerprint); each group gets one page,
    ``<dataset>-<fingerprint>.html``, with one row per test image: a thumbnail (a
    ``THUMB_SIZE``-pixel copy under ``out_dir/thumbs/``), its reference captions, and for each
    run its caption and per-image CIDEr-D (x100), plus the run's CIDEr-D in the column head.
    Rows are sorted worst first by the mean per-image CIDEr-D over the group's runs (images
    no run scored go last); ``max_images`` keeps only the first (worst) that many. Where a
    group's dataset file can no longer be read, its page lists the predicted images without
    thumbnails or references and says so. ``attention_strips`` maps ``(run_id, image_id)``
    to a precomputed image (e.g. a PNG strip of per-word attention maps), copied into
    ``out_dir/attention/`` and shown under that run's caption; none are computed here.

    All text is HTML-escaped (Jinja2 with autoescape). Returns the group pages followed by
    ``index.html``, which links them.

    Raises :class:`RecordError` when ``records`` is empty or ``max_images`` is below 1,
    :class:`StorageError` when ``out_dir`` cannot be created or written, and
    :class:`CapbenchError` when an attention strip file does not exist.
    """
    records = list(records)
    if not records:
        raise RecordError("no run records to show in the gallery (run `capbench run` first)")
    if max_images is not None and max_images < 1:
        raise RecordError(f"max_images must be at least 1, not {max_images}")
    out_dir = Path(out_dir)
    ensure_writable(out_dir, what="gallery folder", hint="Pass another folder to --gallery.")
    env = _environment()
    written: list[Path] = []
    try:
        (out_dir / "thumbs").mkdir(exist_ok=True)
        strips = _copy_strips(attention_strips, out_dir)
        groups = [_build_group(name, fp, runs, out_dir, max_images, strips)
                  for (name, fp), runs in sorted(_group_records(records).items())]
        page = env.get_template("gallery.html.j2")
        for g in groups:
            html = page.render(kind="group", group=g, groups=groups, thumb_size=THUMB_SIZE)
            written.append(atomic_write_text(out_dir / g.page, html))
        html = page.render(kind="index", group=None, groups=groups, thumb_size=THUMB_SIZE)
        written.append(atomic_write_text(out_dir / "index.html", html))
    except OSError as exc:
        raise StorageError(f"cannot write the gallery to {out_dir} "
                           f"({exc.strerror or exc}).") from exc
    return written
