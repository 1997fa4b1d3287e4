"""capbench report --gallery: the static HTML page per dataset/split group."""

from __future__ import annotations

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmark.data import image_id_key, load_karpathy
from benchmark.errors import RecordError, StorageError
from benchmark.gallery import write_gallery
from benchmark.records import RunRecord

CHROMIUM = Path("/usr/bin/chromium")
NASTY = "a <b>bold</b> & shape"


class _Page(HTMLParser):
    """Collect the gallery's rows (image key, captions, references, img src) and links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.links: list[str] = []
        self.imgs: list[str] = []
        self._capture: str | None = None
        self._tags: list[str] = []
        self.raw_b_tags = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "b":
            self.raw_b_tags += 1
        if tag == "tr" and "row" in cls:
            self.rows.append({"key": a["data-image-id"], "mean": a["data-mean"], "captions": [],
                              "refs": [], "imgs": []})
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "img":
            self.imgs.append(a["src"])
            if self.rows:
                self.rows[-1]["imgs"].append(a["src"])
        elif tag == "div" and "cap" in cls and "missing" not in cls:
            self._capture = "captions"
            self.rows[-1]["captions"].append("")
        elif tag == "li" and "ref" in cls:
            self._capture = "refs"
            self.rows[-1]["refs"].append("")

    def handle_endtag(self, tag):
        if tag in ("div", "li"):
            self._capture = None

    def handle_data(self, data):
        if self._capture:
            self.rows[-1][self._capture][-1] += data


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def _records(dataset_json: Path) -> tuple[list[RunRecord], list]:
    ds = load_karpathy(dataset_json)
    test = ds.split("test")
    ids = [im.image_id for im in test]
    n = len(ids)
    cider_a = [0.1 * i for i in range(n)]           # increasing
    cider_b = [0.05 * (n - i) ** 2 for i in range(n)]  # decreasing, different shape

    def rec(run_id, arch, cider, captions):
        return RunRecord.from_dict({
            "run_id": run_id, "arch": arch, "encoder": "tiny_cnn",
            "dataset": {"name": ds.name, "split_fingerprint": ds.fingerprint,
                        "path": str(dataset_json)},
            "metrics": {"CIDEr": sum(cider) / n, "Bleu_4": 0.2},
            "per_image": {"image_ids": ids, "CIDEr": cider},
            "predictions": [{"image_id": im.image_id, "filename": im.filename, "caption": c}
                            for im, c in zip(test, captions, strict=True)],
        })

    caps_a = [f"model a says shape {i}" for i in range(n)]
    caps_a[0] = NASTY
    caps_b = [f"model b sees thing {i}" for i in range(n)]
    return [rec("run-a", "lstm", cider_a, caps_a), rec("run-b", "attn_lstm", cider_b, caps_b)], test


def test_gallery_page(tiny_shapes, tmp_path):
    records, test = _records(tiny_shapes)
    out = tmp_path / "gallery"
    pages = write_gallery(records, out)
    assert [p.name for p in pages][-1] == "index.html" and len(pages) == 2
    page = pages[0]
    html = page.read_text(encoding="utf-8")
    parsed = _parse(page)

    # one row per test image, worst (lowest mean per-image CIDEr-D) first
    assert len(parsed.rows) == len(test)
    assert {r["key"] for r in parsed.rows} == {image_id_key(im.image_id) for im in test}
    means = [float(r["mean"]) for r in parsed.rows]
    assert means == sorted(means)
    a, b = records[0].per_image["CIDEr"], records[1].per_image["CIDEr"]
    expect = sorted((100 * (x + y) / 2 for x, y in zip(a, b, strict=True)))
    assert means == pytest.approx(expect)

    # each model's caption (escaped) and the references are on the row of their image
    by_key = {r["key"]: r for r in parsed.rows}
    for im in test:
        row = by_key[image_id_key(im.image_id)]
        assert row["refs"] == list(im.captions)
        for rec in records:
            cap = next(p["caption"] for p in rec.predictions if p["image_id"] == im.image_id)
            assert cap in row["captions"]
    assert parsed.raw_b_tags == 0  # <b> in the caption did not become markup
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; shape" in html

    # thumbnails exist and resolve relative to the page
    assert all(len(r["imgs"]) == 1 for r in parsed.rows)
    for src in parsed.imgs:
        assert not src.startswith(("/", "file:")), src
        target = (page.parent / src).resolve()
        assert target.is_file() and target.is_relative_to(out.resolve())
        from PIL import Image

        with Image.open(target) as im:
            assert max(im.size) <= 128

    # index links the group page
    index = _parse(out / "index.html")
    assert page.name in index.links
    assert (out / index.links[index.links.index(page.name)]).is_file()


def test_gallery_max_images_and_missing_dataset(tiny_shapes, tmp_path):
    records, test = _records(tiny_shapes)
    pages = write_gallery(records, tmp_path / "g", max_images=2)
    assert len(_parse(pages[0]).rows) == 2

    # the dataset file is gone: still a page, without thumbnails/references, with a note
    for r in records:
        r.dataset.path = str(tmp_path / "nope" / "dataset.json")
    pages = write_gallery(records, tmp_path / "g2")
    parsed = _parse(pages[0])
    assert len(parsed.rows) == len(test) and parsed.imgs == []
    assert all(r["refs"] == [] for r in parsed.rows)
    assert "dataset file unavailable" in pages[0].read_text(encoding="utf-8")


def test_gallery_asks_the_strip_maker_only_for_shown_rows(tiny_shapes, tmp_path):
    from PIL import Image

    records, test = _records(tiny_shapes)
    asked = []

    def maker(record, image):
        asked.append((record.run_id, image.name))
        return Image.new("RGB", (20, 10), "red") if record.run_id == "run-b" else None

    pages = write_gallery(records, tmp_path / "g", max_images=2, strip_maker=maker)
    rows = _parse(pages[0]).rows
    assert len(rows) == 2 and len(asked) == 2 * len(records)  # not for the rows left out
    for row in rows:
        assert len(row["imgs"]) == 2  # the thumbnail, then run-b's strip
        with Image.open(pages[0].parent / row["imgs"][1]) as im:
            assert im.size == (20, 10)


def test_gallery_errors(tiny_shapes, tmp_path):
    with pytest.raises(RecordError):
        write_gallery([], tmp_path / "g")
    records, _ = _records(tiny_shapes)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="gallery folder"):
        write_gallery(records, blocker / "sub")


def test_gallery_screenshot(tiny_shapes, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: no headless screenshot")
    records, _ = _records(tiny_shapes)
    page = write_gallery(records, tmp_path / "g")[0]
    png = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
           "--window-size=1200,900", page.resolve().as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("headless chromium did not finish in 120 s on this machine")
    if done.returncode != 0 and not png.is_file():
        pytest.skip(f"headless chromium cannot render here: {done.stderr.decode()[-300:]}")
    assert png.is_file(), "chromium wrote no screenshot"
    assert png.stat().st_size > 10_000
