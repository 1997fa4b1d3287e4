"""A static HTML gallery of test-split captions: ``capbench report --gallery DIR``.

One page per (dataset name, split fingerprint) group of run records, plus ``index.html``
linking them. Each page is a table with one row per test image: a thumbnail, the reference
captions, and for every model (run) in the group its caption and per-image CIDEr-D (x100),
rows sorted worst first by the mean per-image CIDEr-D over the group's models. Thumbnails
are downscaled copies under ``DIR/thumbs/`` referenced by relative paths, so the folder
works offline and can be moved or zipped as a whole.

Under the caption of an attention decoder (``attn_lstm``, ``transformer``) a row can show an
attention strip: one small panel per generated word with its soft-attention map
(:func:`benchmark.explain.render_strip`). :class:`AttentionStrips` computes them from each
run's checkpoint, only for the rows the page shows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from benchmark.checkpoint import load_run
from benchmark.data import image_id_key, load_karpathy
from benchmark.errors import CapbenchError, DatasetError, RecordError, StorageError
from benchmark.explain import ExplainError, explain_image, open_image, render_strip
from benchmark.fsutil import atomic_write_text, ensure_writable
from benchmark.imagefile import file_problem, needs_scaling, to_rgb
from benchmark.records import RunRecord

__all__ = ["write_gallery", "AttentionStrips", "THUMB_SIZE"]

#: ``(record, image file) -> strip image or None``: see :class:`AttentionStrips`
StripMaker = Callable[[RunRecord, Path], "Image.Image | None"]

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
    Raises OSError (or PIL's errors, subclasses of it), or DatasetError, when the image cannot
    be read or is not a regular file (16-bit pixels are scaled, :func:`to_rgb`)."""
    name = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:16] + ".png"
    dest = dest_dir / name
    if why := file_problem(src):
        raise DatasetError(f"{src}: {why}")
    if dest.is_file() and dest.stat().st_mtime >= src.stat().st_mtime:
        return name
    with Image.open(src) as im:
        if needs_scaling(im.mode):
            im = to_rgb(im, src)
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
                 max_images: int | None, strip_maker: StripMaker | None) -> _Group:
    models = [_Model(r.run_id, f"{r.reference_model.get('family', r.arch)} (pretrained)"
                     if r.reference_model else r.arch,  # a pretrained captioner (eval --hf)
                     r.encoder, _x100(r.metrics.get("CIDEr"))) for r in runs]
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
        for caps, sc in zip(captions, scores, strict=True):
            cells.append(_Cell(caps.get(k), sc.get(k)))
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
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, DatasetError):
            unreadable += 1
    if unreadable:
        group.notes.append(f"{unreadable} image file(s) could not be read: shown without "
                           "thumbnails")
    if strip_maker is not None:
        _add_strips(rows, runs, images, out_dir, strip_maker)
    group.rows = rows
    return group


def _add_strips(rows: list[_Row], runs: list[RunRecord], images: dict[str, dict],
                out_dir: Path, strip_maker: StripMaker) -> None:
    """Ask ``strip_maker`` for a strip per shown (row, run) and save it under
    ``out_dir/attention/`` (named by a hash of run id and image id)."""
    dest_dir = out_dir / "attention"
    for row in rows:
        src = images[row.key]["path"]
        if src is None:
            continue
        for r, cell in zip(runs, row.cells, strict=True):
            strip = strip_maker(r, Path(src))
            if strip is None:
                continue
            dest_dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1(f"{r.run_id}\0{row.key}".encode()).hexdigest()[:16] + ".png"
            tmp = dest_dir / f".{name}.tmp"
            strip.save(tmp, format="PNG", optimize=True)
            tmp.replace(dest_dir / name)
            cell.strip = f"attention/{name}"


class AttentionStrips:
    """A :data:`StripMaker` that draws each attention decoder's per-word soft attention.

    For a record, the run is loaded once from its checkpoint (searched as ``capbench caption
    --run`` does, under ``results_dir``); the image is captioned with the run's decoding
    settings (the caption of the record, see ``capbench caption``) and
    :func:`benchmark.explain.render_strip` draws the maps. Runs whose decoder has no
    attention (``rnn``, ``lstm``) get no strip; runs whose checkpoint cannot be loaded get
    none either, and :attr:`problems` says why (run id -> reason). ``seconds`` is the time
    spent computing strips.
    """

    def __init__(self, results_dir: str | Path, *, panel: int = 64):
        self.results_dir = Path(results_dir)
        self.panel = panel
        self.problems: dict[str, str] = {}
        self.count = 0
        self.seconds = 0.0
        self._runs: dict[str, object] = {}

    def _load(self, record: RunRecord):
        if record.reference_model:  # a pretrained captioner (eval --hf): no capbench decoder
            return None  # whose attention could be drawn, as for rnn/lstm: no strip, no problem
        if record.run_id not in self._runs:
            try:
                run = load_run(record.run_id, self.results_dir)
            except CapbenchError as exc:
                self.problems[record.run_id] = str(exc)
                run = None
            self._runs[record.run_id] = run
        return self._runs[record.run_id]

    def __call__(self, record: RunRecord, image: Path):
        import time


        run = self._load(record)
        if run is None:
            return None
        t0 = time.perf_counter()
        try:
            picture = open_image(image)
        except CapbenchError as exc:  # an unreadable file: no strip for it, the page goes on
            self.problems.setdefault(record.run_id, str(exc))
            return None
        try:
            ex = explain_image(run, picture, ("attention",))
        except ExplainError as exc:
            if "no attention" not in str(exc):
                self.problems[record.run_id] = str(exc)
            self._runs[record.run_id] = None  # rnn/lstm: nothing to draw for any image
            return None
        strip = render_strip(ex, "attention", panel=self.panel)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        return strip


def write_gallery(records: Iterable[RunRecord], out_dir: Path, *, max_images: int | None = None,
                  strip_maker: StripMaker | None = None) -> list[Path]:
    """Write a static HTML gallery of the records' test captions into ``out_dir``.

    Records are grouped by (dataset name, split fingerprint); each group gets one page,
    ``<dataset>-<fingerprint>.html``, with one row per test image: a thumbnail (a
    ``THUMB_SIZE``-pixel copy under ``out_dir/thumbs/``), its reference captions, and for each
    run its caption and per-image CIDEr-D (x100), plus the run's CIDEr-D in the column head.
    Rows are sorted worst first by the mean per-image CIDEr-D over the group's runs (images
    no run scored go last); ``max_images`` keeps only the first (worst) that many. Where a
    group's dataset file can no longer be read, its page lists the predicted images without
    thumbnails or references and says so. ``strip_maker(record, image_file)`` (e.g.
    :class:`AttentionStrips`) is asked for a strip image for every shown row and run; what it
    returns is saved under ``out_dir/attention/`` and shown under that run's caption.

    All text is HTML-escaped (Jinja2 with autoescape). Returns the group pages followed by
    ``index.html``, which links them.

    Raises :class:`RecordError` when ``records`` is empty or ``max_images`` is below 1,
    and :class:`StorageError` when ``out_dir`` cannot be created or written.
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
        groups = [_build_group(name, fp, runs, out_dir, max_images, strip_maker)
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
