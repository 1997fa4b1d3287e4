"""Scores and their intervals agree, and ids and captions are read as written: every CI is of
the number beside it (METEOR is a corpus score), Unicode captions, duplicate ids written as 42
and "42", predictions covering only part of the references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark import metrics
from benchmark.data import image_id_key, load_karpathy, simple_tokenize
from benchmark.errors import DatasetError
from benchmark.metrics import METEOR_STATS_KEY, coco, java_version, meteor_jar, score_captions
from benchmark.references import evaluate_file, load_predictions, match_predictions
from benchmark.stats import (
    METEOR_MEAN_KEY,
    bootstrap_ci,
    corpus_meteor,
    meteor_aggregable,
    metric_samples,
    paired_bootstrap,
)
from tests.conftest import COCO_DEMO, needs

needs_java = pytest.mark.skipif(java_version() is None, reason="no Java: METEOR cannot run")

# ------------------------------------------------------------------ a small synthetic set
_SUBJECTS = ["a man", "a woman", "two dogs", "a cat", "a child", "an old man", "a girl", "three birds",
             "a brown horse", "a boy"]
_ACTIONS = ["riding a bike", "sitting on a bench", "running through the grass", "sleeping on a sofa",
            "eating a sandwich", "walking along the beach", "playing with a ball", "standing in the snow",
            "drinking from a bowl", "flying a kite"]
_PLACES = ["in a park", "near the water", "next to a building", "on a sunny day", "in the kitchen",
           "under a tree"]


def _synthetic(n: int = 30, seed: int = 3) -> tuple[dict, dict, dict]:
    """``refs {id: [4 captions]}`` and two systems' ``{id: caption}`` of varied quality: exact
    copies of a short or a long reference (METEOR's perfect-match case), a long rambling
    caption, paraphrases, partial and unrelated captions, repeated words, one word. System A
    pairs short perfect captions with long poor ones, so its corpus METEOR (length-weighted)
    is far below the mean of its per-image METEOR, outside that mean's bootstrap interval."""
    rng = np.random.default_rng(seed)
    refs, a, b = {}, {}, {}
    for i in range(n):
        s, act, pl = _SUBJECTS[i % 10], _ACTIONS[(3 * i) % 10], _PLACES[i % 6]
        refs[i] = [f"{s.capitalize()} {act} {pl}.", f"{s} is {act}", f"There is {s} {act} {pl}",
                   f"{s} {act.split()[0]}"]
        other, other2 = _ACTIONS[int(rng.integers(10))], _ACTIONS[int(rng.integers(10))]
        s2, pl2 = _SUBJECTS[(i + 3) % 10], _PLACES[(i + 2) % 6]
        variants = [refs[i][3],                                   # short perfect copy
                    refs[i][0],                                   # long perfect copy
                    f"{s2} {other} {pl2} while {_SUBJECTS[(i + 5) % 10]} is {other2} and people watch",
                    f"{s} {act}", f"{s} {other} {pl}", f"{s2} {other}",
                    f"{s} {s} {s}", act.split()[0], f"a photo of {s} {pl}",
                    f"{s.replace('a ', 'the ')} {act.replace('ing', 's')} {pl}"]
        a[i] = variants[0] if i % 5 < 2 else variants[2 + i % 8]
        b[i] = variants[(i * 7 + 1) % len(variants)]
    return refs, a, b


REFS, SYS_A, SYS_B = _synthetic()


@pytest.fixture(scope="module")
def synthetic_scores():
    """The two systems scored once (METEOR's jar stays up for the module)."""
    return score_captions(SYS_A, REFS), score_captions(SYS_B, REFS)


def _record_block(result) -> dict:
    """A run record's per_image block, through JSON as it is stored."""
    return json.loads(json.dumps(result.per_image_block()))


def _assert_cis_contain_scores(scores: dict, cis: dict) -> None:
    scored = {k for k, v in scores.items() if v is not None}
    assert set(cis) == scored, (set(cis), scored)
    for name in scored:
        lo, hi = cis[name]
        assert lo <= scores[name] <= hi, (name, scores[name], lo, hi)


# --------------------------------------------------------------- A: METEOR is a corpus score
def test_meteor_aggregable_drops_chunks_of_perfect_segments_only():
    perfect = [8, 8, 4, 4, 4, 4, 4, 4] + [0] * 12 + [1, 8, 8]
    partial = [6, 6, 3, 3, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 2, 3, 3]
    one_chunk_not_all = [4, 8, 4, 4, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2]
    out = meteor_aggregable([perfect, partial, one_chunk_not_all])
    assert out[:, 20].tolist() == [0.0, 2.0, 1.0]
    assert np.array_equal(np.delete(out, 20, axis=1),
                          np.delete(np.array([perfect, partial, one_chunk_not_all], float), 20, axis=1))


@needs_java
def test_summed_statistics_give_the_jars_corpus_meteor(synthetic_scores):
    """Identity: jar(EVAL sum of aggregable stats) == corpus METEOR, and equals the jar's own
    aggregate for resamples with repeats; the raw sum is off when perfect matches exist."""
    res = synthetic_scores[0]
    stats = np.asarray(res.per_image[METEOR_STATS_KEY], dtype=np.float64)
    assert stats.shape == (len(REFS), 23)
    corpus = res.metrics["METEOR"]
    assert corpus_meteor(meteor_aggregable(stats).sum(0)[None])[0] == corpus
    assert corpus < np.mean(res.per_image["METEOR"]) - 0.1  # not the per-image mean
    n_perfect = int((meteor_aggregable(stats)[:, 20] != stats[:, 20]).sum())
    assert n_perfect >= 3
    assert abs(corpus_meteor(stats.sum(0)[None])[0] - corpus) > 1e-4  # chunks are not additive
    rng = np.random.default_rng(0)
    with meteor_jar() as jar:
        for _ in range(20):
            idx = rng.integers(0, len(stats), size=int(rng.integers(1, 2 * len(stats))))
            ours = corpus_meteor(meteor_aggregable(stats[idx]).sum(0)[None])[0]
            assert abs(ours - jar.aggregate(stats[idx])) <= 1e-12


@needs_java
def test_full_set_resample_equals_the_recorded_scores(synthetic_scores):
    res = synthetic_scores[0]
    full = metric_samples(_record_block(res), np.arange(len(REFS))[None])
    assert full["METEOR"][0] == res.metrics["METEOR"]  # exactly
    for name, value in res.metrics.items():
        if value is not None:
            assert full[name][0] == pytest.approx(value, rel=1e-12, abs=1e-15), name


@needs_java
def test_every_ci_of_a_run_block_contains_its_score(synthetic_scores):
    for res in synthetic_scores:
        _assert_cis_contain_scores(res.metrics, bootstrap_ci(_record_block(res)))


@needs_java
def test_paired_delta_is_the_difference_of_the_recorded_scores(synthetic_scores):
    a, b = synthetic_scores
    block_a, block_b = _record_block(a), _record_block(b)
    order = np.random.default_rng(1).permutation(len(REFS))  # B stored in another image order
    block_b = {k: [v[i] for i in order] for k, v in block_b.items()}
    out = paired_bootstrap(block_a, block_b, n_resamples=300)
    assert set(out) == {k for k, v in a.metrics.items() if v is not None}
    assert out["METEOR"]["delta"] == b.metrics["METEOR"] - a.metrics["METEOR"]
    for name, r in out.items():
        assert r["delta"] == pytest.approx(b.metrics[name] - a.metrics[name], abs=1e-12), name
        assert r["ci"][0] <= r["delta"] <= r["ci"][1], name


@needs_java
def test_blocks_without_meteor_stats_fall_back_explicitly_to_the_per_image_mean(synthetic_scores):
    a, b = synthetic_scores
    old_a = {k: v for k, v in _record_block(a).items() if k != METEOR_STATS_KEY}
    ci = bootstrap_ci(old_a)
    assert "METEOR" not in ci  # no interval is put beside the corpus METEOR
    lo, hi = ci[METEOR_MEAN_KEY]
    assert lo <= np.mean(a.per_image["METEOR"]) <= hi
    out = paired_bootstrap(old_a, _record_block(b), n_resamples=200)
    assert "METEOR" not in out
    assert out[METEOR_MEAN_KEY]["delta"] == pytest.approx(
        np.mean(b.per_image["METEOR"]) - np.mean(a.per_image["METEOR"]))


def test_without_java_there_is_no_meteor_interval(monkeypatch, synthetic_scores):
    monkeypatch.setattr(coco, "java_version", lambda: None)
    res = score_captions(SYS_A, REFS, metrics=("Bleu_4", "METEOR", "CIDEr"))
    assert res.metrics["METEOR"] is None and "Java" in res.unavailable["METEOR"]
    ci = bootstrap_ci(res.per_image_block())
    assert set(ci) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    if synthetic_scores[0].metrics["METEOR"] is not None:  # stats kept, but no jar to score them
        ci = bootstrap_ci(_record_block(synthetic_scores[0]))
        assert "METEOR" not in ci and METEOR_MEAN_KEY in ci


def _write(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _coco_refs(path, refs):
    return _write(path, {"images": [{"id": i} for i in refs], "annotations": [
        {"id": 10 * i + j, "image_id": i, "caption": c} for i, cs in refs.items() for j, c in enumerate(cs)]})


@pytest.mark.slow
def test_evaluate_file_cis_contain_scores_and_partial_coverage_is_counted(tmp_path):
    refs = _coco_refs(tmp_path / "refs.json", REFS)
    full = _write(tmp_path / "p.json", [{"image_id": i, "caption": c} for i, c in SYS_A.items()])
    out = evaluate_file(full, refs).to_json()
    _assert_cis_contain_scores(out["metrics"], out["confidence_intervals"])
    assert out["images"] == 30 and out["missing_references"] == 0
    part = _write(tmp_path / "part.json", [{"image_id": str(i), "caption": c}
                                           for i, c in SYS_A.items() if i < 21])
    out = evaluate_file(part, refs).to_json()
    assert out["images"] == 21 and out["missing_references"] == 9
    _assert_cis_contain_scores(out["metrics"], out["confidence_intervals"])


@pytest.fixture(scope="module")
def demo_evaluation():
    if not COCO_DEMO.exists():
        pytest.skip(f"{COCO_DEMO} not found (shared data absent)")
    return evaluate_file(COCO_DEMO, "coco-val2014")


@pytest.mark.slow
@needs(COCO_DEMO)
@needs_java
def test_coco_demo_identity_and_cis(demo_evaluation):
    ev = demo_evaluation
    res = ev.result
    assert round(res.metrics["METEOR"], 3) == 0.195  # the published demo value
    stats = np.asarray(res.per_image[METEOR_STATS_KEY], dtype=np.float64)
    summed = corpus_meteor(meteor_aggregable(stats).sum(0)[None])[0]
    assert abs(summed - res.metrics["METEOR"]) <= 1e-12
    block = _record_block(res)
    full = metric_samples(block, np.arange(len(block["image_ids"]))[None])
    assert full["METEOR"][0] == res.metrics["METEOR"]
    out = ev.to_json()
    _assert_cis_contain_scores(out["metrics"], out["confidence_intervals"])
    _assert_cis_contain_scores(res.metrics, bootstrap_ci(block, seed=1))
    assert out["images"] == 1000 and out["missing_references"] == 40504 - 1000


# --------------------------------------------------------------------- B: Unicode captions
@pytest.mark.parametrize("text,tokens", [
    ("Café au lait", ["café", "au", "lait"]),
    ("cafe\u0301", ["café"]),                      # decomposed accent: NFKC composes it
    ("Zürich by night", ["zürich", "by", "night"]),
    ("A naïve ZEBRA", ["a", "naïve", "zebra"]),
    ("東京タワー", ["東", "京", "タ", "ワ", "ー"]),  # CJK: one token per character
    ("a dog 🐕 runs", ["a", "dog", "runs"]),
    ("ＦＵＬＬ-width ﬁsh", ["full", "width", "fish"]),
    ("Don't touch the dog's bowl", ["don't", "touch", "the", "dog's", "bowl"]),
    ("the dog’s bowl", ["the", "dog's", "bowl"]),
    ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),              # combining vowel signs stay in the word
    ("🙂🙂", []),
])
def test_simple_tokenize_keeps_unicode_words(text, tokens):
    assert simple_tokenize(text) == tokens


def _karpathy(tmp_path, test_sentences, ids=(1, 2, 3)):
    images = [{"filename": f"{k}.jpg", "split": split, "cocoid": iid,
               "sentences": [{"raw": "a red circle"}]}
              for k, (split, iid) in enumerate(zip(("train", "val", "test"), ids, strict=True))]
    images[2]["sentences"] = test_sentences
    return _write(tmp_path / "dataset.json", {"images": images})


def test_unicode_captions_load_whole(tmp_path):
    path = _karpathy(tmp_path, [{"raw": "Zürich café"}, {"raw": "東京タワー"},
                                {"raw": "x", "tokens": ["Ｃafé", "NAÏVE"]}])
    test = load_karpathy(path, check_images=False).split("test")[0]
    assert test.tokens == (("zürich", "café"), ("東", "京", "タ", "ワ", "ー"), ("café", "naïve"))
    assert test.captions[0] == "Zürich café"  # references keep the raw text


def test_a_caption_without_letters_or_digits_is_named(tmp_path):
    path = _karpathy(tmp_path, [{"raw": "a dog"}, {"raw": "🙂🙂"}])
    with pytest.raises(DatasetError) as err:
        load_karpathy(path, check_images=False)
    msg = str(err.value)
    assert "caption has no letters or digits: '🙂🙂'" in msg
    assert str(path) in msg and "images[2].sentences[1]" in msg
    path = _karpathy(tmp_path, [{"raw": "   "}])
    with pytest.raises(DatasetError, match=r"images\[2\]\.sentences\[0\]: empty caption"):
        load_karpathy(path, check_images=False)


# ------------------------------------------------------------------ C: ids 42 and "42"
def test_image_id_key():
    assert image_id_key(391895) == image_id_key("391895") == image_id_key(391895.0) == "391895"
    assert image_id_key("0042") != image_id_key(42)


def test_duplicate_prediction_written_as_int_and_string(tmp_path):
    p = _write(tmp_path / "p.json", [{"image_id": 391895, "caption": "a dog"},
                                     {"image_id": 7, "caption": "a cat"},
                                     {"image_id": "391895", "caption": "a horse"}])
    with pytest.raises(DatasetError) as err:
        load_predictions(p)
    msg = str(err.value)
    assert "appears twice" in msg and "entry [0] (image_id 391895)" in msg
    assert "entry [2] (image_id '391895')" in msg


def test_match_predictions_refuses_two_predictions_for_one_image():
    refs = {391895: ["a dog"], 7: ["a cat"]}
    assert match_predictions({"391895": "x", 7: "y"}, refs, "refs") == {391895: "x", 7: "y"}
    with pytest.raises(DatasetError, match=r"two predictions for image 391895.*391895.*'391895'"):
        match_predictions({391895: "x", "391895": "y"}, refs, "refs")


def test_duplicate_karpathy_id_written_as_int_and_string(tmp_path):
    path = _karpathy(tmp_path, [{"raw": "a dog"}], ids=(391895, 5, "391895"))
    with pytest.raises(DatasetError, match=r"images\[2\]: image id '391895' appears twice: "
                                           r"images\[0\] has id 391895"):
        load_karpathy(path, check_images=False)


def test_partial_coverage_is_counted_without_scoring(tmp_path, monkeypatch):
    """``missing_references`` = reference images with no prediction (scoring stubbed out)."""
    from benchmark import references

    refs = _coco_refs(tmp_path / "refs.json", {i: REFS[i] for i in range(10)})
    p = _write(tmp_path / "p.json", [{"image_id": str(i), "caption": SYS_A[i]} for i in (0, 4, 9)])
    seen = {}

    def fake_score(preds, refs, **_):
        seen["preds"] = preds
        return metrics.ScoreResult(list(preds), {"CIDEr": 1.0}, {"CIDEr": [1.0] * len(preds)})

    monkeypatch.setattr(references, "score_captions", fake_score)
    monkeypatch.setattr(references, "bootstrap_ci", lambda block: {"CIDEr": [1.0, 1.0]})
    ev = evaluate_file(p, refs)
    assert list(seen["preds"]) == [0, 4, 9]  # re-keyed to the references' int ids
    assert ev.images == 3 and ev.missing_references == 7
    assert ev.to_json()["missing_references"] == 7
