import json
import shutil

import pytest

from benchmark.data import load_karpathy
from benchmark.errors import DatasetError
from benchmark.shapes import generate_shapes
from benchmark.vocab import Vocabulary
from tests.conftest import COCO_MINI, needs


def _copy(tiny_shapes, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(tiny_shapes.parent, dst)
    return dst / "dataset.json"


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_loads_splits_and_references(tiny_shapes):
    ds = load_karpathy(tiny_shapes)
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [28, 6, 6]
    refs = ds.references("test")
    assert len(refs) == 6 and all(len(v) == 5 for v in refs.values())
    assert all(im.path.is_file() for im in ds.images)


def test_shapes_generation_is_deterministic(tmp_path):
    a = generate_shapes(tmp_path / "a", 12, seed=3)
    b = generate_shapes(tmp_path / "b", 12, seed=3)
    assert a.read_text() == b.read_text()
    assert (a.parent / "images/shapes_00005.png").read_bytes() == \
        (b.parent / "images/shapes_00005.png").read_bytes()
    data = json.loads(a.read_text())
    for obj in data["images"][0]["objects"]:  # boxes kept for explainability checks
        x0, y0, x1, y1 = obj["bbox"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128


def test_fingerprint_is_stable_and_split_sensitive(tiny_shapes, tmp_path):
    path = _copy(tiny_shapes, tmp_path)
    before = load_karpathy(path).split_fingerprints()
    assert before == load_karpathy(tiny_shapes).split_fingerprints()

    def move(d):
        d["images"][0]["split"] = "test"

    _edit(path, move)
    after = load_karpathy(path).split_fingerprints()
    assert after["train"] != before["train"] and after["test"] != before["test"]
    assert after["val"] == before["val"] and after["all"] != before["all"]


def test_restval_counts_as_train(tiny_shapes, tmp_path):
    path = _copy(tiny_shapes, tmp_path)
    _edit(path, lambda d: d["images"][0].update(split="restval"))
    assert load_karpathy(path).images[0].split == "train"


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["images"][3].pop("filename"), "images[3]: missing field 'filename'"),
    (lambda d: d["images"][2].update(split="holdout"), "split 'holdout'"),
    (lambda d: d["images"][1].update(sentences=[]), "has no sentences"),
    (lambda d: d.pop("images"), "'images' list"),
    (lambda d: d["images"][4].update(imgid=d["images"][5]["imgid"]), "appears twice"),
])
def test_malformed_json_names_file_and_field(tiny_shapes, tmp_path, mutate, message):
    path = _copy(tiny_shapes, tmp_path)
    _edit(path, mutate)
    with pytest.raises(DatasetError) as exc:
        load_karpathy(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_karpathy(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        load_karpathy(tmp_path / "nope.json")


def test_missing_image_is_reported_with_its_path(tiny_shapes, tmp_path):
    path = _copy(tiny_shapes, tmp_path)
    (path.parent / "images" / "shapes_00007.png").unlink()
    with pytest.raises(DatasetError) as exc:
        load_karpathy(path)
    assert "1 image file(s) not found" in str(exc.value) and "shapes_00007.png" in str(exc.value)


def test_vocabulary_from_train_only_round_trips(tiny_shapes, tmp_path):
    ds = load_karpathy(tiny_shapes)
    train_words = {w for im in ds.split("train") for t in im.tokens for w in t}
    vocab = Vocabulary.build((t for im in ds.split("train") for t in im.tokens), min_count=1)
    assert set(vocab.itos[4:]) == train_words
    caption = list(ds.split("train")[0].tokens[0])
    assert vocab.decode(vocab.encode(caption, max_len=50)) == caption
    assert vocab.decode(vocab.encode(["zebra"], 5)) == ["<unk>"]
    assert len(vocab.encode(caption, max_len=2)) == 4  # <bos> w w <eos>
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").itos == vocab.itos
    rare = Vocabulary.build([["a", "b"], ["a"]], min_count=2)
    assert rare.itos[4:] == ["a"]


@needs(COCO_MINI)
def test_coco_mini_loads_with_karpathy_sizes():
    ds = load_karpathy(COCO_MINI)
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [330, 39, 41]
    assert all(isinstance(im.image_id, int) for im in ds.images)  # cocoid
