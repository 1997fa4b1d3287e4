import json
import zipfile

import pytest

from benchmark.metrics import coco as metrics
from benchmark.metrics import ptb_tokenize, score_captions

REFS = {
    1: ["A man riding a horse on a beach.", "A person rides a brown horse!", "man, horse, sand"],
    2: ["Two dogs play in the snow.", "Dogs running through snow", "two puppies in the snow"],
    3: ["A red circle next to a blue square.", "a circle that is red", "Shapes: red & blue"],
    4: ["A bowl of soup on a wooden table", "Soup in a white bowl.", "a table with soup"],
}
PREDS = {1: "a man rides a horse on the beach", 2: "a dog in the snow", 3: "a red circle .",
         4: "a plate of food on a table"}


def _coco_eval(preds, refs, monkeypatch):
    """pycocoevalcap's own COCOEvalCap; SPICE replaced (its CoreNLP jars are not here)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in refs],
                    "annotations": [{"id": 100 * i + j, "image_id": i, "caption": c}
                                    for i, cs in refs.items() for j, c in enumerate(cs)]}
    coco.createIndex()
    res = coco.loadRes([{"image_id": i, "caption": c} for i, c in preds.items()])
    ev = coco_eval.COCOEvalCap(coco, res)
    ev.params["image_id"] = res.getImgIds()
    ev.evaluate()
    return ev.eval


@pytest.mark.slow
def test_scores_equal_cocoevalcap(monkeypatch, capsys):
    ours = score_captions(PREDS, REFS)
    theirs = _coco_eval(PREDS, REFS, monkeypatch)
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert ours.metrics[name] == pytest.approx(theirs[name], abs=1e-12), name
    assert 0 < ours.metrics["CIDEr"] < 10
    assert set(ours.per_image) >= {"METEOR", "ROUGE_L", "CIDEr"}
    assert len(ours.per_image["CIDEr"]) == 4
    assert sum(ours.per_image["CIDEr"]) / 4 == pytest.approx(ours.metrics["CIDEr"])


def test_spice_unavailable_is_reported_not_invented(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "corenlp_dir", lambda: None)
    res = score_captions(PREDS, REFS, metrics=("CIDEr", "SPICE"))
    assert res.metrics["SPICE"] is None
    assert "CoreNLP 3.6.0" in res.unavailable["SPICE"] and "CAPBENCH_CORENLP" in res.unavailable["SPICE"]


def test_without_java_meteor_is_unavailable_and_the_rest_computed(monkeypatch):
    monkeypatch.setattr(metrics, "java_version", lambda: None)
    res = score_captions(PREDS, REFS)
    assert res.metrics["METEOR"] is None and "Java" in res.unavailable["METEOR"]
    assert res.tokenizer == "python-approximation"
    assert res.metrics["CIDEr"] > 0 and res.metrics["Bleu_1"] > 0


def test_a_trimmed_pycocoevalcap_install_falls_back_and_names_what_is_missing(monkeypatch, tmp_path):
    """`make gpu-bundle` copies pycocoevalcap without its jars and METEOR's paraphrase table:
    with Java on PATH the tokenizer falls back to Python, METEOR and SPICE say which files are
    missing, and BLEU, ROUGE-L and CIDEr-D are those of the full install's Python tokenizer."""
    if metrics.java_version() is None:
        pytest.skip("no Java on PATH: the trimmed install behaves as without Java")
    assert score_captions(PREDS, REFS, metrics=("CIDEr",)).tokenizer == "ptb-java"
    assert metrics.java_tokenizer_available()
    (tmp_path / "meteor" / "data").mkdir(parents=True)
    (tmp_path / "meteor" / "meteor-1.5.jar").write_bytes(b"")  # the jar alone: no paraphrases
    monkeypatch.setattr(metrics, "_pkg_dir", lambda: tmp_path)
    assert not metrics.java_tokenizer_available()
    status = metrics.metric_status()
    assert "data/paraphrase-en.gz missing from" in status["METEOR"]
    assert "meteor-1.5.jar" not in status["METEOR"]
    assert "spice-1.0.jar missing" in status["SPICE"]
    res = score_captions(PREDS, REFS)
    assert res.tokenizer == "python-approximation"
    assert res.metrics["METEOR"] is None and res.metrics["SPICE"] is None
    assert res.metrics["CIDEr"] > 0 and res.metrics["Bleu_1"] > 0
    monkeypatch.setattr(metrics, "java_version", lambda: None)
    no_java = score_captions(PREDS, REFS)
    assert {k: res.metrics[k] for k in ("Bleu_4", "ROUGE_L", "CIDEr")} == \
        {k: no_java.metrics[k] for k in ("Bleu_4", "ROUGE_L", "CIDEr")}


def test_ptb_tokenizer_lowercases_and_strips_punctuation():
    out = ptb_tokenize({7: ["A man's dog, running!", "Shapes: red & blue."]})
    assert out[7] == ["a man 's dog running", "shapes red & blue"]


def test_unknown_prediction_id_is_an_error():
    with pytest.raises(ValueError, match="no references"):
        score_captions({99: "a cat"}, REFS)


def test_coco_references_ship_inside_the_spice_jar():
    jar = metrics._pkg_dir() / "spice" / "spice-1.0.jar"
    with zipfile.ZipFile(jar) as z:
        data = json.loads(z.read("coco/annotations/captions_val2014.json"))
    assert len(data["images"]) == 40504


def test_spice_invocation_and_parsing(monkeypatch, tmp_path):
    """SPICE itself needs CoreNLP jars that cannot be fetched here; check our side of it."""
    import subprocess

    for jar in metrics.CORENLP_JARS:
        (tmp_path / jar).write_bytes(b"")
    monkeypatch.setenv("CAPBENCH_CORENLP", str(tmp_path))
    seen = {}
    real_run = subprocess.run

    def fake_run(cmd, cwd=None, **kw):
        if "edu.anu.spice.SpiceScorer" not in cmd:
            return real_run(cmd, cwd=cwd, **kw)
        seen["cmd"], seen["cwd"] = cmd, cwd
        data = json.loads((tmp_path.__class__(cwd) / "in.json").read_text())
        out = [{"image_id": d["image_id"], "scores": {"All": {"f": 0.5 if d["image_id"] != 3 else "NaN",
                                                              "pr": 0.5, "re": 0.5}}} for d in data]
        (tmp_path.__class__(cwd) / "out.json").write_text(json.dumps(out))
        return subprocess.CompletedProcess(cmd, 0, b"", b"")

    monkeypatch.setattr(metrics.subprocess, "run", fake_run)
    assert metrics.metric_status()["SPICE"] is None
    res = score_captions(PREDS, REFS, metrics=("SPICE",))
    assert any(a.startswith("--add-opens=java.base/java.lang") for a in seen["cmd"])
    assert str(metrics._pkg_dir()) not in seen["cwd"]  # runs in a temporary folder
    assert "-cache" in seen["cmd"] and "-subset" in seen["cmd"]
    assert res.per_image["SPICE"][2] != res.per_image["SPICE"][2]  # NaN kept as NaN
    # like pycocoevalcap's Spice (np.mean), a NaN image makes the corpus score NaN
    assert res.metrics["SPICE"] != res.metrics["SPICE"]
    res = score_captions({1: PREDS[1], 2: PREDS[2]}, REFS, metrics=("SPICE",))
    assert res.metrics["SPICE"] == pytest.approx(0.5)
