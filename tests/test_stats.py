import numpy as np
import pytest

from benchmark.stats import bootstrap_ci, diversity, paired_bootstrap


def _block(values, seed=0):
    rng = np.random.default_rng(seed)
    n = len(values)
    stats = [[10, 10, 8, 6, 4, 2, 10, 9, 8, 7] for _ in range(n)]
    return {"image_ids": list(range(n)), "CIDEr": list(values), "ROUGE_L": list(rng.random(n)),
            "bleu_stats": stats}


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = _block(rng.normal(1.0, 0.3, 50))
    large = _block(rng.normal(1.0, 0.3, 2000))
    ci_s, ci_l = bootstrap_ci(small)["CIDEr"], bootstrap_ci(large)["CIDEr"]
    assert ci_s[0] < np.mean(small["CIDEr"]) < ci_s[1]
    assert (ci_l[1] - ci_l[0]) < (ci_s[1] - ci_s[0]) / 4  # ~ 1/sqrt(40) narrower
    assert (ci_l[1] - ci_l[0]) == pytest.approx(2 * 1.96 * 0.3 / np.sqrt(2000), rel=0.15)


def test_paired_bootstrap_detects_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(2)
    base = rng.normal(1.0, 0.5, 300)
    a = _block(base)
    better = _block(base + 0.1 + rng.normal(0, 0.05, 300))
    same = _block(base + rng.normal(0, 0.05, 300))
    r = paired_bootstrap(a, better)["CIDEr"]
    assert r["delta"] == pytest.approx(np.mean(better["CIDEr"]) - np.mean(base))
    assert r["p"] < 0.01 and r["ci"][0] > 0
    assert paired_bootstrap(a, same)["CIDEr"]["p"] > 0.05


def test_paired_bootstrap_aligns_image_order_and_refuses_other_images():
    a = _block([1.0, 2.0, 3.0])
    b = {"image_ids": [2, 0, 1], "CIDEr": [3.0, 1.0, 2.0], "ROUGE_L": a["ROUGE_L"][::-1],
         "bleu_stats": a["bleu_stats"]}
    assert paired_bootstrap(a, b)["CIDEr"]["delta"] == 0.0
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap(a, {**b, "image_ids": [5, 6, 7]})


def test_diversity_statistics():
    d = diversity(["a red circle", "a red circle", "a blue box"], {"a red circle"})
    assert d["vocab_used"] == 5 and d["mean_length"] == 3
    assert d["distinct_1"] == pytest.approx(5 / 9) and d["distinct_2"] == pytest.approx(4 / 6)
    assert d["novel_pct"] == pytest.approx(100 / 3) and d["unique_pct"] == pytest.approx(200 / 3)
