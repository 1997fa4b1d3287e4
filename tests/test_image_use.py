"""Does the model look at the image? Shuffle test, blind and nearest-neighbour baselines."""

import numpy as np
import pytest
import torch

from architectures.decoders.base import CaptionDecoder
from benchmark.baselines import (
    blind_predictions,
    consensus_caption,
    most_frequent_caption,
    nearest_neighbour_predictions,
    train_cider,
)
from benchmark.cider import CiderD
from benchmark.data import ImageRecord, load_karpathy
from benchmark.decoding import DecodeConfig
from benchmark.features import FeatureStore
from benchmark.image_use import baseline_scores, derangement, image_use_report, shuffle_test
from benchmark.metrics import ptb_tokenize, score_captions
from benchmark.vocab import Vocabulary
from tests.conftest import COCO_DEMO, COCO_MINI, needs


def test_derangement_moves_every_item_and_is_fixed_by_its_seed():
    for n in (2, 3, 10, 91):
        p = derangement(n, seed=0)
        assert sorted(p) == list(range(n)) and np.all(p != np.arange(n))
    assert np.array_equal(derangement(50, 1), derangement(50, 1))
    assert not np.array_equal(derangement(50, 1), derangement(50, 2))
    with pytest.raises(ValueError):
        derangement(1)


@needs(COCO_DEMO)
def test_cached_cider_d_equals_pycocoevalcap_on_the_coco_demo():
    from pycocoevalcap.cider.cider import Cider

    from benchmark.references import load_predictions, load_references, match_predictions

    refs = load_references("coco-val2014", "test")
    preds = match_predictions(load_predictions(COCO_DEMO), refs, "coco-val2014")
    ids = list(preds)
    gts = ptb_tokenize({i: refs[i] for i in ids})
    res = ptb_tokenize({i: [preds[i]] for i in ids})
    ref_score, ref_each = Cider().compute_score(gts, res)
    scorer = CiderD(gts)
    score, each = scorer.score({i: res[i][0] for i in ids})
    assert score == pytest.approx(ref_score, abs=1e-9) and round(score, 3) == 0.600
    np.testing.assert_allclose(each, ref_each, atol=1e-9, rtol=0)
    # one caption against every image at once == one image at a time
    everywhere = scorer.score_everywhere(res[ids[0]][0])
    direct = [scorer.score_against(res[ids[0]][0], gts[i]) for i in scorer.image_ids[:200]]
    np.testing.assert_allclose(everywhere[:200], direct, atol=1e-12, rtol=0)
    # SCST rewards: several captions per image, scored in one call, equal the per-image scores
    pairs_ids = [i for i in ids[:100] for _ in range(3)]
    pairs = scorer.score_pairs([res[i][0] for i in pairs_ids], pairs_ids)
    np.testing.assert_allclose(pairs, np.repeat(ref_each[:100], 3), atol=1e-9, rtol=0)


def test_consensus_beats_most_frequent_on_the_train_split(tiny_shapes):
    ds = load_karpathy(tiny_shapes)
    refs = ds.references("train")
    mf = score_captions(blind_predictions(ds, "train", "most-frequent").predictions, refs,
                        metrics=("CIDEr",)).metrics["CIDEr"]
    cons = blind_predictions(ds, "train", "consensus")
    cs = score_captions(cons.predictions, refs, metrics=("CIDEr",)).metrics["CIDEr"]
    assert cs > mf > 0
    caption, mean, n = consensus_caption(ds)
    assert n == len({" ".join(t) for im in ds.split("train") for t in im.tokens})
    assert caption in {" ".join(t) for im in ds.split("train") for t in im.tokens}
    assert mean == pytest.approx(train_cider(ds).score_everywhere(most_frequent_caption(ds)).mean()
                                 if caption == most_frequent_caption(ds) else mean)


def _image(i, split, captions):
    return ImageRecord(i, f"{i}.png", None, split, tuple(captions),
                       tuple(tuple(c.split()) for c in captions))


def test_nearest_neighbour_returns_a_caption_of_the_true_nearest_image():
    train = [_image(0, "train", ["a red circle on the left"] * 2 + ["a red circle"]),
             _image(1, "train", ["a blue square", "a big blue square", "a blue square here"]),
             _image(2, "train", ["a green triangle", "green triangle", "a green triangle now"])]
    test = [_image(10, "test", ["x"]), _image(11, "test", ["y"])]
    train_pooled = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    test_pooled = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.2, 3.0]])  # nearest: 1, then 2
    scorer = CiderD({im.image_id: list(im.captions) for im in train})
    out = nearest_neighbour_predictions(train, test, train_pooled, test_pooled, scorer, k=1)
    assert out.predictions[10] in train[1].captions and out.predictions[11] in train[2].captions
    assert out.predictions[10] == "a blue square"  # the consensus among image 1's captions


class _FixedCaption(CaptionDecoder):
    """Ignores its input: always the same words (a blind model in decoder form)."""

    def __init__(self, vocab_size, words):
        super().__init__(vocab_size, 4, 4)
        self.words = words  # ids, then <eos>

    def forward(self, grid, pooled, tokens, lengths):
        raise NotImplementedError

    def init_state(self, grid, pooled):
        return {"t": torch.zeros(grid.shape[0], dtype=torch.long)}

    def step(self, tokens, state):
        t = state["t"]
        logits = torch.full((len(t), self.vocab_size), -10.0)
        ids = torch.tensor(self.words)[t.clamp(max=len(self.words) - 1)]
        logits[torch.arange(len(t)), ids] = 10.0
        return logits, {"t": t + 1}


def test_a_decoder_that_ignores_the_image_loses_nothing_and_is_not_better_than_blind(tiny_shapes):
    ds = load_karpathy(tiny_shapes)
    test = ds.split("test")
    vocab = Vocabulary.build([t for im in ds.split("train") for t in im.tokens])
    caption = most_frequent_caption(ds).split()
    dec = _FixedCaption(len(vocab), [vocab.stoi[w] for w in caption] + [vocab.eos_id])
    g = torch.Generator().manual_seed(0)
    store = FeatureStore(torch.randn(len(ds.images), 3, 4, generator=g),
                         torch.randn(len(ds.images), 4, generator=g),
                         [im.image_id for im in ds.images], key="synthetic")
    from benchmark.inference import caption_features

    cfg = DecodeConfig(beam_size=1, max_len=30)
    preds, _ = caption_features(dec, store, test, vocab, cfg, torch.device("cpu"))
    assert set(preds.values()) == {" ".join(caption)}
    refs = ds.references("test")
    scores = score_captions(preds, refs, metrics=("CIDEr",))
    real = {"image_ids": scores.image_ids, "CIDEr": scores.per_image["CIDEr"]}
    shuffle = shuffle_test(dec, store, test, vocab, cfg, torch.device("cpu"), refs, real)
    assert shuffle["drop"] == pytest.approx(0.0, abs=1e-12) and shuffle["p"] == 1.0
    report = image_use_report(real, baseline_scores(ds), shuffle)
    assert report["vs_blind"]["better"] is False and report["vs_blind"]["delta"] <= 0
    assert report["baselines"]["most-frequent"]["caption"] == " ".join(caption)
    assert "per_image" not in report["baselines"]["consensus"]


def test_a_decoder_that_reads_the_image_loses_under_shuffling(tiny_shapes):
    """An oracle that writes each image's first reference: shuffling costs most of its score."""
    ds = load_karpathy(tiny_shapes)
    test = ds.split("test")
    vocab = Vocabulary.build([t for im in ds.images for t in im.tokens])
    L = max(len(im.tokens[0]) for im in ds.images) + 1
    table = torch.full((len(ds.images), L), vocab.eos_id)
    for r, im in enumerate(ds.images):
        ids = [vocab.stoi[w] for w in im.tokens[0]]
        table[r, : len(ids)] = torch.tensor(ids)

    class Oracle(CaptionDecoder):
        def init_state(self, grid, pooled):  # the row number is encoded in the pooled feature
            return {"row": pooled[:, 0].round().long(), "t": torch.zeros(len(grid), dtype=torch.long)}

        def step(self, tokens, state):
            logits = torch.full((len(state["t"]), self.vocab_size), -10.0)
            ids = table[state["row"], state["t"].clamp(max=L - 1)]
            logits[torch.arange(len(ids)), ids] = 10.0
            return logits, {**state, "t": state["t"] + 1}

    rows = torch.arange(len(ds.images), dtype=torch.float32)
    store = FeatureStore(torch.zeros(len(ds.images), 2, 4), rows[:, None].repeat(1, 4),
                         [im.image_id for im in ds.images], key="oracle")
    dec = Oracle(len(vocab), 4, 4)
    from benchmark.inference import caption_features

    cfg = DecodeConfig(beam_size=1, max_len=30)
    preds, _ = caption_features(dec, store, test, vocab, cfg, torch.device("cpu"))
    scores = score_captions(preds, ds.references("test"), metrics=("CIDEr",))
    real = {"image_ids": scores.image_ids, "CIDEr": scores.per_image["CIDEr"]}
    shuffle = shuffle_test(dec, store, test, vocab, cfg, torch.device("cpu"), ds.references("test"), real)
    assert shuffle["drop"] > 0.5 * scores.metrics["CIDEr"]
    assert shuffle["drop_ci"][0] > 0


@needs(COCO_MINI)
def test_committed_coco_mini_runs_are_tested_against_blind():
    """The honest verdict on the committed coco-mini board (random-init encoders, 41 test
    images): no run is significantly better than the best constant caption."""
    from pathlib import Path

    from benchmark.image_use import records_vs_blind

    ds = load_karpathy(COCO_MINI)
    baselines = baseline_scores(ds)
    assert baselines["consensus"]["metrics"]["CIDEr"] > baselines["most-frequent"]["metrics"]["CIDEr"]
    verdicts = records_vs_blind(Path(__file__).resolve().parents[1] / "results" / "coco-mini",
                                ds, baselines)
    assert len(verdicts) == 12
    for record, v in verdicts:
        assert v["baseline"] == "consensus" and v["ci"][0] <= v["delta"] <= v["ci"][1]
        blind = baselines["consensus"]["metrics"]["CIDEr"]
        assert v["delta"] == pytest.approx(record.metrics["CIDEr"] - blind)
        # the verdict the run wrote into its record is the one the post-hoc test reaches
        mine = record.image_use["vs_blind"]
        assert mine["baseline"] == "consensus" and mine["better"] == v["better"]
        assert mine["p"] == v["p"] and mine["delta"] == pytest.approx(v["delta"], abs=1e-12)
    assert not any(v["better"] for _, v in verdicts)
