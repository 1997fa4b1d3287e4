"""`capbench eval`: reference-exact scoring of predictions made anywhere."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.metrics import score_captions
from benchmark.stats import corpus_bleu
from tests.conftest import COCO_DEMO, needs
from tests.test_metrics import PREDS, REFS

runner = CliRunner()


@pytest.mark.slow
@needs(COCO_DEMO)
def test_reproduces_the_official_coco_caption_demo(coco_demo_cli):
    out = coco_demo_cli
    published = {"Bleu_1": 0.579, "Bleu_2": 0.404, "Bleu_3": 0.279, "Bleu_4": 0.191,
                 "METEOR": 0.195, "ROUGE_L": 0.396, "CIDEr": 0.600}
    for name, value in published.items():
        assert round(out["metrics"][name], 3) == value, name
    assert out["images"] == 1000
    lo, hi = out["confidence_intervals"]["CIDEr"]
    assert lo < out["metrics"]["CIDEr"] < hi


def test_bleu_counts_of_the_demo_match_the_published_ones():
    if not COCO_DEMO.exists():
        pytest.skip("shared data absent")
    from benchmark.references import load_predictions, load_references, match_predictions

    refs = load_references("coco-val2014")
    preds = match_predictions(load_predictions(COCO_DEMO), refs, "val2014")
    res = score_captions(preds, refs, metrics=("Bleu_4",))
    s = np.asarray(res.bleu_stats).sum(0)
    assert s[0] == 9893 and s[1] == 9855 and list(s[2:6]) == [5732, 2510, 1043, 423]


def test_corpus_bleu_from_counts_equals_pycocoevalcap():
    res = score_captions(PREDS, REFS, metrics=("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"))
    ours = corpus_bleu(np.asarray(res.bleu_stats))
    for n in range(4):
        assert ours[n] == pytest.approx(res.metrics[f"Bleu_{n + 1}"], rel=1e-12)


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.fixture
def coco_refs(tmp_path):
    return _write(tmp_path, "refs.json", {"images": [{"id": i} for i in REFS], "annotations": [
        {"id": 10 * i + j, "image_id": i, "caption": c} for i, cs in REFS.items()
        for j, c in enumerate(cs)]})


@pytest.mark.slow
def test_eval_against_coco_and_karpathy_references(tmp_path, coco_refs, tiny_shapes):
    preds = _write(tmp_path, "p.json", [{"image_id": i, "caption": c} for i, c in PREDS.items()])
    result = runner.invoke(app, ["eval", str(preds), "--references", str(coco_refs), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metrics"]["CIDEr"] == pytest.approx(
        score_captions(PREDS, REFS, metrics=("CIDEr",)).metrics["CIDEr"])
    from benchmark.data import load_karpathy

    test = load_karpathy(tiny_shapes).split("test")
    kp = _write(tmp_path, "k.json", [{"image_id": im.image_id, "caption": im.captions[0]} for im in test])
    result = runner.invoke(app, ["eval", str(kp), "--references", str(tiny_shapes), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metrics"]["Bleu_4"] > 0.9  # a reference scores itself high


@pytest.mark.parametrize("preds,message", [
    ([{"image_id": 1, "caption": "a"}, {"image_id": 77, "caption": "b"}], "not in the references"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "appears twice"),
    ([{"image_id": 1, "caption": "  "}], "empty caption"),
    ({"image_id": 1}, "expected a JSON list"),
    ([{"id": 1, "caption": "x"}], "needs 'image_id' and 'caption'"),
])
def test_eval_errors_are_specific(tmp_path, coco_refs, preds, message):
    p = _write(tmp_path, "p.json", preds)
    result = runner.invoke(app, ["eval", str(p), "--references", str(coco_refs)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_references_of_neither_format(tmp_path):
    p = _write(tmp_path, "p.json", [{"image_id": 1, "caption": "a"}])
    bad = _write(tmp_path, "bad.json", {"something": []})
    result = runner.invoke(app, ["eval", str(p), "--references", str(bad)])
    assert result.exit_code == 2 and "Karpathy" in result.output and "COCO" in result.output
