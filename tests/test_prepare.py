"""benchmark.prepare: downloaded caption formats -> a Karpathy dataset.json that load_karpathy reads."""

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmark.data import load_karpathy
from benchmark.errors import ConfigError, DatasetError
from benchmark.prepare import KARPATHY_SIZES, prepare, seeded_split, split_counts

WORDS = ["dog", "cat", "child", "man", "woman", "bird", "horse", "boat", "car", "tree", "ball", "bike"]


def _image(path: Path, i: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    Image.new("RGB", (16, 12), (20 * i % 255, 40, 90)).save(path, fmt)
    return path


def _caption(i: int, k: int) -> str:
    return f"A {WORDS[i % len(WORDS)]} number {k} , running on grass ."


def _flickr8k_names(n: int = 10) -> list[str]:
    return [f"{1000 + i}_{i:04x}abc.jpg" for i in range(n)]


@pytest.fixture
def flickr8k(tmp_path):
    """10 images (one missing, one corrupt), the three caption formats and the split lists."""
    names = _flickr8k_names()
    img = tmp_path / "Flicker8k_Dataset"
    for i, n in enumerate(names):
        if i == 3:
            continue  # missing
        if i == 7:
            img.mkdir(exist_ok=True)
            (img / n).write_bytes(b"this is not a jpeg")  # corrupt
            continue
        _image(img / n, i)
    rows = ["image,caption"]
    token = []
    for i, n in enumerate(names):
        for k in range(3):
            cap = _caption(i, k)
            rows.append(f'{n},"{cap}"' if k else f"{n},{cap}")  # quoted and unquoted commas
            token.append(f"{n}#{k}\t{cap}")
    rows.append(f'{names[0]},"{_caption(0, 1)}"')  # a duplicate line
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(token) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:6]) + "\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("\n".join(names[6:8]) + "\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("\n".join(names[8:]) + "\n")
    return tmp_path


def _split_lists(root: Path) -> list[Path]:
    return [root / f"Flickr_8k.{s}Images.txt" for s in ("train", "dev", "test")]


def test_flickr8k_kaggle_csv_with_split_lists(flickr8k):
    names = _flickr8k_names()
    out = flickr8k / "dataset.json"
    rep = prepare("flickr8k", captions=[flickr8k / "captions.txt"], images=flickr8k / "Flicker8k_Dataset",
                  splits=_split_lists(flickr8k), out=out)
    assert rep.counts == {"train": 5, "val": 1, "test": 2}  # names[3] (train) and names[7] (dev) left out
    assert rep.missing == [names[3]]
    assert len(rep.unreadable) == 1 and rep.unreadable[0].startswith(names[7] + ":")
    assert rep.duplicates and "captions.txt:" in rep.duplicates[0]
    assert rep.captions == 8 * 3 and rep.left_out == 2
    assert any("left out 2 image(s): 1 missing, 1 unreadable" in m for m in rep.messages)
    assert "Flickr_8k.trainImages.txt" in rep.split_rule

    ds = load_karpathy(out)
    assert ds.name == "flickr8k"
    assert {im.filename for im in ds.split("val")} == {names[6]}
    assert {im.filename for im in ds.split("test")} == set(names[8:])
    first = next(im for im in ds.images if im.filename == names[0])
    assert first.captions == tuple(_caption(0, k) for k in range(3))  # commas kept, duplicate dropped
    assert first.image_id == 0 and first.path == flickr8k / "Flicker8k_Dataset" / names[0]
    data = json.loads(out.read_text())
    assert data["images"][0]["filepath"] == "Flicker8k_Dataset"  # relative: inside the json folder


def test_flickr8k_token_file_gives_the_same_dataset(flickr8k):
    a = prepare("flickr8k", captions=flickr8k / "captions.txt", images=flickr8k / "Flicker8k_Dataset",
                splits=_split_lists(flickr8k), out=flickr8k / "a" / "dataset.json")
    b = prepare("flickr8k", captions=flickr8k / "Flickr8k.token.txt",
                images=flickr8k / "Flicker8k_Dataset", splits=_split_lists(flickr8k),
                out=flickr8k / "b" / "dataset.json")
    assert a.counts == b.counts and not b.duplicates
    da, db = load_karpathy(a.out), load_karpathy(b.out)
    assert da.fingerprint == db.fingerprint
    assert [im.captions for im in da.images] == [im.captions for im in db.images]
    # the json lies outside the image folder: filepath is absolute and still resolves
    assert Path(json.loads(b.out.read_text())["images"][0]["filepath"]).is_absolute()


def test_flickr8k_karpathy_json_is_validated_and_rewritten(flickr8k, tmp_path):
    names = _flickr8k_names()
    entries = [{"filename": n, "imgid": 100 + i, "split": ["train", "val", "test"][i % 3],
                "sentences": [{"raw": _caption(i, 0), "tokens": ["a", WORDS[i % len(WORDS)]]}]}
               for i, n in enumerate(names)]
    src = tmp_path / "dataset_flickr8k.json"
    src.write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    rep = prepare("flickr8k", captions=[src], images=flickr8k / "Flicker8k_Dataset",
                  out=tmp_path / "out" / "dataset.json", check_images=True)
    assert "Karpathy JSON" in rep.split_rule and rep.missing == [names[3]]
    ds = load_karpathy(rep.out)
    assert {im.image_id for im in ds.images} == {100 + i for i in range(10) if i not in (3, 7)}
    assert ds.images[0].tokens == (("a", WORDS[0]),)  # Karpathy's tokens are kept


def test_images_in_a_subfolder_are_found_and_said(flickr8k):
    rep = prepare("flickr8k", captions=flickr8k / "captions.txt", images=flickr8k,
                  splits=_split_lists(flickr8k), out=flickr8k / "o.json", check_images=False)
    assert any("Flicker8k_Dataset" in m for m in rep.messages)
    # without verification the corrupt file only has to exist
    assert rep.unreadable == [] and rep.missing == [_flickr8k_names()[3]]
    assert rep.counts == {"train": 5, "val": 2, "test": 2}


def test_no_image_found_is_a_clear_error(flickr8k, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="none of the images named in the captions are in --images"):
        prepare("flickr8k", captions=flickr8k / "captions.txt", images=tmp_path / "empty",
                out=tmp_path / "x.json")


def test_bad_csv_header_names_found_and_expected(flickr8k):
    bad = flickr8k / "bad.txt"
    bad.write_text("img,text\n1000_0000abc.jpg,a dog .\n")
    with pytest.raises(DatasetError) as exc:
        prepare("flickr8k", captions=bad, images=flickr8k / "Flicker8k_Dataset", out=flickr8k / "o.json")
    msg = str(exc.value)
    assert "bad.txt:1" in msg and "'img,text' found" in msg and "'image,caption' expected" in msg
    odd = flickr8k / "odd.txt"
    odd.write_text("just some words\n")
    with pytest.raises(DatasetError, match=r"odd.txt:1: unrecognised caption format"):
        prepare("flickr8k", captions=odd, images=flickr8k / "Flicker8k_Dataset", out=flickr8k / "o.json")
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        prepare("flickr9k", captions=odd, images=flickr8k, out=flickr8k / "o.json")


def test_refuses_to_overwrite_without_force(flickr8k):
    out = flickr8k / "dataset.json"
    out.write_text("{}")
    kw = dict(captions=flickr8k / "captions.txt", images=flickr8k / "Flicker8k_Dataset",
              splits=_split_lists(flickr8k), out=out)
    with pytest.raises(DatasetError, match="already exists.*--force"):
        prepare("flickr8k", **kw)
    assert out.read_text() == "{}"
    prepare("flickr8k", force=True, **kw)
    assert load_karpathy(out).images


def test_conflicting_split_lists_are_refused(flickr8k):
    names = _flickr8k_names()
    (flickr8k / "Flickr_8k.testImages.txt").write_text(names[0] + "\n")
    with pytest.raises(DatasetError, match=r"Flickr_8k.testImages.txt:1: .* already in split 'train'"):
        prepare("flickr8k", captions=flickr8k / "captions.txt", images=flickr8k / "Flicker8k_Dataset",
                splits=_split_lists(flickr8k), out=flickr8k / "o.json")


def test_seeded_split_is_deterministic_and_in_karpathy_proportions(flickr8k):
    assert split_counts(8000, "flickr8k") == KARPATHY_SIZES["flickr8k"]
    assert split_counts(31014, "flickr30k") == KARPATHY_SIZES["flickr30k"]
    assert split_counts(123287, "coco") == KARPATHY_SIZES["coco"]
    assert split_counts(800, "flickr8k") == (600, 100, 100)
    assert split_counts(3, "coco") == (1, 1, 1) and split_counts(10, "flickr8k") == (8, 1, 1)
    keys = [f"{i}.jpg" for i in range(800)]
    a = seeded_split(keys, "flickr8k", seed=0)
    assert a == seeded_split(list(reversed(keys)), "flickr8k", seed=0)  # input order does not matter
    assert a != seeded_split(keys, "flickr8k", seed=1)
    assert sorted(a.values()).count("val") == 100 and list(a.values()).count("test") == 100

    _image(flickr8k / "Flicker8k_Dataset" / _flickr8k_names()[3], 3)  # all present
    kw = dict(captions=flickr8k / "captions.txt", images=flickr8k / "Flicker8k_Dataset",
              check_images=False)
    r1 = prepare("flickr8k", out=flickr8k / "s1.json", seed=5, **kw)
    r2 = prepare("flickr8k", out=flickr8k / "s2.json", seed=5, **kw)
    assert "seeded random split (seed 5) of 10 captioned images" in r1.split_rule
    assert "8 train, 1 val, 1 test" in r1.split_rule
    assert load_karpathy(r1.out).split_fingerprints() == load_karpathy(r2.out).split_fingerprints()


def test_flickr30k_results_csv_with_quirks_and_karpathy_split(tmp_path):
    names = [f"{2000 + i}.jpg" for i in range(6)]
    for i, n in enumerate(names):
        _image(tmp_path / "flickr30k_images" / n, i)
    lines = ["image_name| comment_number| comment"]
    for i, n in enumerate(names):
        for k in range(5):
            lines.append(f"{n}| {k}| {_caption(i, k)}")
    lines[5 * 2 + 4 + 1] = f"{names[2]}| 4 {_caption(2, 4)}"  # the Kaggle line without its '|'
    lines.insert(3, "garbage without separators")
    lines.insert(4, f"{names[0]}| 9| !!!")  # a caption without words
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    split = {"images": [{"filename": n, "imgid": i, "split": s, "sentences": []}
                        for i, (n, s) in enumerate(zip(names, ["train", "train", "val", "test",
                                                                 "train", "restval"], strict=True))]
             + [{"filename": "9999.jpg", "imgid": 6, "split": "test", "sentences": []}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(split))

    rep = prepare("flickr30k", captions=[tmp_path / "results.csv"], images=tmp_path / "flickr30k_images",
                  splits=tmp_path / "dataset_flickr30k.json", out=tmp_path / "dataset.json")
    assert rep.counts == {"train": 3, "val": 1, "test": 1, "restval": 1}
    assert len(rep.repaired) == 1 and "results.csv:" in rep.repaired[0]
    assert len(rep.malformed) == 2 and any("results.csv:4:" in m for m in rep.malformed)
    assert rep.no_captions == ["9999.jpg"]
    ds = load_karpathy(rep.out)
    assert len(ds.split("train")) == 4  # restval counts as train
    val = ds.split("val")[0]
    assert val.filename == names[2] and val.image_id == 2 and len(val.captions) == 5
    assert val.captions[4] == _caption(2, 4)


def test_flickr30k_results_csv_header_must_match(tmp_path):
    (tmp_path / "results.csv").write_text("1000092795.jpg| 0| Two young guys .\n")
    (tmp_path / "img").mkdir()
    with pytest.raises(DatasetError, match=r"results.csv:1: header .* found, 'image_name\| comment_number"):
        prepare("flickr30k", captions=tmp_path / "results.csv", images=tmp_path / "img",
                out=tmp_path / "o.json")


def _coco_ann(subset: str, ids: list[int], prefix: str) -> dict:
    return {"images": [{"id": i, "file_name": f"{prefix}{i:012d}.jpg"} for i in ids],
            "annotations": [{"id": 10 * i + k, "image_id": i, "caption": _caption(i, k)}
                            for i in ids for k in range(2)]}


def test_coco_2014_with_karpathy_split_and_restval(tmp_path):
    root = tmp_path / "coco"
    train_ids, val_ids = [11, 12, 13, 14], [21, 22, 23, 24, 25]
    for subset, ids in (("train2014", train_ids), ("val2014", val_ids)):
        for i in ids:
            if i != 14:  # 14 is missing
                _image(root / subset / f"COCO_{subset}_{i:012d}.jpg", i)
        ann = _coco_ann(subset, ids, f"COCO_{subset}_")
        if subset == "val2014":
            ann["images"].append({"id": 26, "file_name": "COCO_val2014_000000000026.jpg"})  # no captions
        (tmp_path / f"captions_{subset}.json").write_text(json.dumps(ann))
    splits = {"train": [11, 12, 14], "restval": [21, 22], "val": [23], "test": [24, "25"]}
    karpathy = [{"filepath": "train2014" if int(c) < 20 else "val2014", "cocoid": c, "split": s,
                 "filename": f"COCO_{'train' if int(c) < 20 else 'val'}2014_{int(c):012d}.jpg",
                 "sentences": []} for s, cs in splits.items() for c in cs]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))

    rep = prepare("coco", captions=[tmp_path / "captions_train2014.json", tmp_path / "captions_val2014.json"],
                  images=root, splits=tmp_path / "dataset_coco.json", out=root / "dataset.json")
    assert rep.counts == {"train": 2, "val": 1, "test": 2, "restval": 2}
    assert rep.missing == ["COCO_train2014_000000000014.jpg"]
    assert rep.not_in_splits == ["COCO_train2014_000000000013.jpg"]  # in captions, not in the split
    assert "COCO_val2014_000000000026.jpg" in rep.no_captions
    data = json.loads(rep.out.read_text())
    by_id = {e["cocoid"]: e for e in data["images"]}
    assert by_id[21]["split"] == "restval" and by_id[21]["filepath"] == "val2014"
    assert by_id[11]["filepath"] == "train2014"
    ds = load_karpathy(rep.out)
    assert {im.image_id for im in ds.split("test")} == {24, 25}
    assert {im.image_id for im in ds.split("train")} == {11, 12, 21, 22}
    assert ds.references("val") == {23: [_caption(23, 0), _caption(23, 1)]}


def test_coco_2017_without_split_halves_val(tmp_path):
    root = tmp_path / "coco"
    ids = {"train2017": list(range(100, 110)), "val2017": list(range(200, 206))}
    for subset, sub_ids in ids.items():
        for i in sub_ids:
            _image(root / subset / f"{i:012d}.png", i)
        ann = _coco_ann(subset, sub_ids, "")
        for im in ann["images"]:
            im["file_name"] = im["file_name"].replace(".jpg", ".png")
        (tmp_path / f"captions_{subset}.json").write_text(json.dumps(ann))
    caps = [tmp_path / "captions_train2017.json", tmp_path / "captions_val2017.json"]
    rep = prepare("coco", captions=caps, images=root, out=tmp_path / "a.json", seed=3)
    assert rep.counts == {"train": 10, "val": 3, "test": 3}
    assert "train2017 -> train" in rep.split_rule and "seed 3" in rep.split_rule
    assert "val (3) and test (3) halves" in rep.split_rule
    again = prepare("coco", captions=caps, images=root, out=tmp_path / "b.json", seed=3)
    a, b = load_karpathy(rep.out), load_karpathy(again.out)
    assert a.split_fingerprints() == b.split_fingerprints()
    assert {im.image_id for im in a.split("val") + a.split("test")} == set(ids["val2017"])


def test_comma_separated_results_header_and_bad_rows(tmp_path):
    names = [f"{4000 + i}.jpg" for i in range(4)]
    for i, n in enumerate(names):
        _image(tmp_path / "img" / n, i)
    rows = ["image_name,comment_number,comment"]
    rows += [f'{n},{k},"{_caption(i, k)}"' for i, n in enumerate(names) for k in range(2)]
    rows.append(f"{names[0]},x,not a number")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    rep = prepare("flickr30k", captions=tmp_path / "captions.csv", images=tmp_path / "img",
                  out=tmp_path / "d.json")
    assert rep.counts == {"train": 2, "val": 1, "test": 1}
    assert len(rep.malformed) == 1 and rep.malformed[0].startswith("captions.csv:10:")
    ds = load_karpathy(rep.out)
    expected = {_caption(i, k) for i in range(4) for k in range(2)}
    assert {c for im in ds.images for c in im.captions} == expected


def test_cli_data_flickr8k_reports_and_refuses_to_overwrite(flickr8k):
    from typer.testing import CliRunner

    from benchmark.cli import app

    out = flickr8k / "out" / "dataset.json"
    args = ["data", "flickr8k", "--captions", str(flickr8k / "captions.txt"), "--images",
            str(flickr8k / "Flicker8k_Dataset"), "--out", str(out)]
    for s in _split_lists(flickr8k):
        args += ["--splits", str(s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "missing" in result.output and "unreadable" in result.output and "wrote" in result.output
    ds = load_karpathy(out)
    assert len(ds.images) == 8  # one missing and one corrupt image left out
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output


def test_files_of_another_dataset_are_refused_before_any_image_is_checked(flickr8k, tmp_path):
    """The wrong subcommand for a file, the wrong split file, a COCO 2014 + 2017 mix: each a
    DatasetError that says which command or file fits, raised before the image check."""
    img, checked = flickr8k / "Flicker8k_Dataset", []

    def refused(kind, captions, match, **kw):
        with pytest.raises(DatasetError, match=match):
            prepare(kind, captions=captions, images=img, out=tmp_path / "o.json",
                    progress=lambda done, total: checked.append(done), **kw)

    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps(_coco_ann("val2014", [1, 2, 3], "COCO_val2014_")))
    refused("flickr8k", coco, r"captions_val2014.json is a COCO annotation file, which is not "
            r"flickr8k: use `capbench data coco`")
    results = tmp_path / "results.csv"
    results.write_text("image_name| comment_number| comment\n1.jpg| 0| A dog runs .\n")
    refused("flickr8k", results, r"Kaggle Flickr30k results.csv, which is not flickr8k: use "
            r"`capbench data flickr30k`")
    refused("coco", flickr8k / "Flickr8k.token.txt", r"Flickr token file, which is not coco: use "
            r"`capbench data flickr8k` or `capbench data flickr30k` for it, or pass "
            r"captions_train2014.json")
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"dataset": "coco", "images": [
        {"filename": "COCO_val2014_000000000001.jpg", "cocoid": 1, "split": "test",
         "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]}]}))
    refused("flickr30k", karpathy, r"dataset_coco.json is Karpathy's coco file \(its 'dataset' "
            r"is 'coco'\), not flickr30k's: use `capbench data coco`, or pass dataset_flickr30k.json")
    refused("flickr8k", flickr8k / "captions.txt", r"dataset_coco.json is Karpathy's coco file",
            splits=karpathy)
    c17 = tmp_path / "captions_train2017.json"
    c17.write_text(json.dumps(_coco_ann("train2017", [1, 4], "")))
    refused("coco", [c17, coco], r"--captions mixes COCO 2014 and 2017 files "
            r"\(captions_train2017.json, captions_val2014.json\): they hold the same images")
    assert checked == [] and not (tmp_path / "o.json").exists()


def test_inputs_are_never_overwritten_and_bad_files_say_what_to_do(flickr8k, tmp_path):
    img, caps = flickr8k / "Flicker8k_Dataset", flickr8k / "captions.txt"
    before = caps.read_bytes()
    with pytest.raises(DatasetError, match=r"--out .*captions.txt is also an input .*--force "
                                           r"never overwrites an input"):
        prepare("flickr8k", captions=caps, images=img, out=caps, force=True)
    assert caps.read_bytes() == before
    with pytest.raises(DatasetError, match=r"--captions .*captions.txt is given twice"):
        prepare("flickr8k", captions=[caps, flickr8k / "." / "captions.txt"], images=img,
                out=tmp_path / "o.json")
    zipped = tmp_path / "Flickr8k_text.zip"
    zipped.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(DatasetError, match=r"Flickr8k_text.zip is a zip archive; unpack it"):
        prepare("flickr8k", captions=zipped, images=img, out=tmp_path / "o.json")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("image,caption\n1000_0000abc.jpg,un caf\xe9 .\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.txt:2: not UTF-8 text \(byte offset 37\); "
                                           r"convert the file to UTF-8, e.g. iconv"):
        prepare("flickr8k", captions=latin, images=img, out=tmp_path / "o.json")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match=r"a-file is a file, not a folder; choose another --out"):
        prepare("flickr8k", captions=caps, images=img, out=blocker / "sub" / "dataset.json")
    # only the train list: the error says which lists are missing
    with pytest.raises(DatasetError, match=r"split 'val' would have no images .*no split file "
                                           r"gives 'val' images: pass every split's list"):
        prepare("flickr8k", captions=caps, images=img, out=tmp_path / "o.json",
                splits=_split_lists(flickr8k)[:1])
    assert not (tmp_path / "o.json").exists()


def test_token_lines_with_spaces_read_and_every_image_lists_its_sentids(flickr8k, tmp_path):
    spaced = tmp_path / "Flickr8k.token.txt"
    spaced.write_text((flickr8k / "Flickr8k.token.txt").read_text().replace("\t", "  "))
    rep = prepare("flickr8k", captions=spaced, images=flickr8k / "Flicker8k_Dataset",
                  splits=_split_lists(flickr8k), out=tmp_path / "d.json")
    assert rep.counts == {"train": 5, "val": 1, "test": 2} and rep.captions == 24
    # one Karpathy JSON as both --captions and --splits, as before
    karpathy = prepare("flickr8k", captions=rep.out, splits=rep.out,
                       images=flickr8k / "Flicker8k_Dataset", out=tmp_path / "again.json")
    assert karpathy.counts == rep.counts
    images = json.loads(rep.out.read_text())["images"]
    assert [im["sentids"] for im in images] == [[s["sentid"] for s in im["sentences"]]
                                                for im in images]
    assert sorted(i for im in images for i in im["sentids"]) == list(range(24))
