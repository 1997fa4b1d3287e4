"""BERTScore through the authors' package, offline: a tiny random BERT saved to a folder stands
in for roberta-large, and each image's score is checked against the definition (Zhang et al.,
2020: greedy cosine matching of contextual token embeddings, F1, best reference)."""

from __future__ import annotations

import pytest
import torch

from benchmark.metrics import MetricOptions, score_captions
from benchmark.stats import bootstrap_ci

pytest.importorskip("bert_score")
transformers = pytest.importorskip("transformers")

PREDS = {1: "a red circle left of a blue square", 2: "a green triangle", 3: "two shapes"}
REFS = {1: ["a blue square right of a red circle", "red circle and blue square"],
        2: ["a small green triangle", "a triangle that is green", "green shape"],
        3: ["a yellow circle above a red square", "two shapes on grey"]}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT and its word-level vocabulary, saved as a hub-style folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for s in [*PREDS.values(), *sum(REFS.values(), [])] for w in s.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *words]) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"), model_max_length=64)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@torch.no_grad()
def _f1(model, tok, cand: str, ref: str) -> float:
    """BERTScore F1 of one pair from its definition: last-layer token embeddings, greedy
    matching by cosine; [CLS]/[SEP] may be matched but do not count as tokens (no idf)."""
    def emb(s):
        h = model(**tok(s, return_tensors="pt")).last_hidden_state[0]
        return h / h.norm(dim=1, keepdim=True)

    sim = emb(cand) @ emb(ref).T
    p = sim[1:-1].max(dim=1).values.mean()
    r = sim[:, 1:-1].max(dim=0).values.mean()
    return float(2 * p * r / (p + r))


def test_bertscore_is_the_best_reference_f1_of_the_definition(tiny_bert):
    folder, model, tok = tiny_bert
    opts = MetricOptions(bertscore_model=str(folder))
    res = score_captions(PREDS, REFS, options=opts)  # opt-in: on because a model is named
    expected = [max(_f1(model, tok, PREDS[i], r) for r in REFS[i]) for i in PREDS]
    assert res.per_image["BERTScore"] == pytest.approx(expected, abs=1e-5)
    assert res.metrics["BERTScore"] == pytest.approx(sum(expected) / 3, abs=1e-5)
    assert res.sources["BERTScore"].startswith("bert-score ")
    assert "_L2_no-idf_version=" in res.sources["BERTScore"]  # the package's own hash
    assert "rescaled" not in res.sources["BERTScore"]  # no baseline for a local model
    lo, hi = bootstrap_ci(res.per_image_block(), n_resamples=200)["BERTScore"]
    assert lo <= res.metrics["BERTScore"] <= hi


def test_bertscore_is_off_unless_a_model_is_named():
    res = score_captions(PREDS, REFS, options=MetricOptions())
    assert "BERTScore" not in res.metrics and "BERTScore" not in res.unavailable
    res = score_captions(PREDS, REFS, options=MetricOptions(bertscore_model="/nonexistent/bert"))
    assert res.metrics["BERTScore"] is None and "/nonexistent/bert" in res.unavailable["BERTScore"]
