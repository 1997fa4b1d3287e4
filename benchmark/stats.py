"""Uncertainty and language statistics for captioning results.

* :func:`corpus_bleu` recomputes pycocoevalcap's corpus BLEU-1..4 (``closest`` reference
  length, the same smoothing constants) from per-image n-gram counts, so BLEU can be
  bootstrapped like the per-image metrics.
* :func:`bootstrap_ci`: percentile bootstrap 95% intervals over test images (Efron &
  Tibshirani 1993) for every metric; METEOR, ROUGE-L, CIDEr-D and SPICE are means of their
  per-image scores (CIDEr-D's IDF stays that of the full test set, as is usual).
* :func:`paired_bootstrap`: difference between two systems on the same images, its CI and a
  two-sided p-value from the paired bootstrap (Koehn 2004, "Statistical Significance Tests
  for Machine Translation Evaluation").
* :func:`diversity`: vocabulary used, distinct-1/2 (Li et al. 2016), share of captions not
  seen in training, mean length.
"""

from __future__ import annotations

import math

import numpy as np

from benchmark.metrics import PER_IMAGE_METRICS

__all__ = ["corpus_bleu", "bootstrap_ci", "paired_bootstrap", "compare_runs", "diversity",
           "metric_samples"]

_TINY, _SMALL = 1e-15, 1e-9


def corpus_bleu(stats: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from summed counts.

    ``stats``: ``(..., M, 10)`` per image ``[hyp_len, ref_len, correct_1..4, guess_1..4]``;
    returns ``(..., 4)``. Matches ``pycocoevalcap.bleu.Bleu`` to floating-point precision.
    """
    s = np.asarray(stats, dtype=np.float64).sum(axis=-2)
    testlen, reflen = s[..., 0], s[..., 1]
    correct, guess = s[..., 2:6], s[..., 6:10]
    ratios = (correct + _TINY) / (guess + _SMALL)
    cum = np.cumprod(ratios, axis=-1)
    bleu = cum ** (1.0 / np.arange(1, 5))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    with np.errstate(divide="ignore", over="ignore"):
        penalty = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, 1e-300)), 1.0)
    return bleu * penalty[..., None]


def metric_samples(per_image: dict, resample: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric on each resample of image indices ``resample (R, M)`` -> ``{name: (R,)}``."""
    out: dict[str, np.ndarray] = {}
    stats = per_image.get("bleu_stats")
    if stats:
        b = corpus_bleu(np.asarray(stats, dtype=np.float64)[resample])
        for n in range(4):
            out[f"Bleu_{n + 1}"] = b[:, n]
    for name in PER_IMAGE_METRICS:
        values = per_image.get(name)
        if values:
            out[name] = np.nanmean(np.asarray(values, dtype=np.float64)[resample], axis=1)
    return out


def _resamples(m: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m, size=(n_resamples, m))


def bootstrap_ci(per_image: dict, *, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap ``[low, high]`` per metric over test images.

    ``per_image`` is a record's ``per_image`` block (``image_ids``, per-metric lists,
    ``bleu_stats``). Raises ValueError when it holds no images.
    """
    m = len(per_image.get("image_ids", []))
    if m == 0:
        raise ValueError("no per-image scores to bootstrap")
    samples = metric_samples(per_image, _resamples(m, n_resamples, seed))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: [float(x) for x in np.percentile(v, q)] for k, v in samples.items()}


def _align(a: dict, b: dict) -> tuple[dict, dict]:
    ids_a, ids_b = [str(i) for i in a["image_ids"]], [str(i) for i in b["image_ids"]]
    if sorted(ids_a) != sorted(ids_b):
        raise ValueError("the two runs were scored on different images")
    pos = {i: k for k, i in enumerate(ids_b)}
    order = [pos[i] for i in ids_a]
    b2 = {"image_ids": a["image_ids"]}
    for key, val in b.items():
        if key != "image_ids" and val:
            b2[key] = [val[k] for k in order]
    return a, b2


def paired_bootstrap(a: dict, b: dict, *, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict[str, float]]:
    """Per metric: ``delta`` (B - A), its ``ci`` and two-sided ``p`` from a paired bootstrap.

    Both inputs are ``per_image`` blocks over the same images (in any order); the same
    resampled image sets are used for both systems. ``p`` is twice the smaller tail of the
    resampled differences around 0 (capped at 1), with at least 1/``n_resamples`` resolution.
    """
    a, b = _align(a, b)
    idx = _resamples(len(a["image_ids"]), n_resamples, seed)
    full = np.arange(len(a["image_ids"]))[None]
    sa, sb = metric_samples(a, idx), metric_samples(b, idx)
    fa, fb = metric_samples(a, full), metric_samples(b, full)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name in sa.keys() & sb.keys():
        d = sb[name] - sa[name]
        tail = min(np.mean(d <= 0), np.mean(d >= 0))
        out[name] = {"delta": float(fb[name][0] - fa[name][0]),
                     "ci": [float(x) for x in np.percentile(d, q)],
                     "p": float(min(1.0, max(2 * tail, 1.0 / n_resamples)))}
    return out


def compare_runs(a, b, *, n_resamples: int = 2000) -> dict[str, dict[str, float]]:
    """:func:`paired_bootstrap` of run records ``b`` against ``a`` (RunRecord objects).

    Raises RecordError when the runs are on different splits (their scores are not
    comparable) and ValueError for ``n_resamples`` < 1.
    """
    from benchmark.errors import RecordError

    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    if a.split_fingerprint != b.split_fingerprint:
        raise RecordError(f"runs are on different splits ({a.split_fingerprint} vs "
                          f"{b.split_fingerprint}): their scores are not comparable")
    return paired_bootstrap(a.per_image, b.per_image, n_resamples=n_resamples)


def diversity(captions: list[str], train_captions: set[str]) -> dict[str, float]:
    """Language statistics of generated captions (whitespace tokens).

    ``vocab_used`` distinct words; ``distinct_1``/``distinct_2`` distinct uni/bigrams over all
    uni/bigrams; ``novel_pct`` % of captions not found verbatim among training captions;
    ``mean_length`` words per caption; ``unique_pct`` % of distinct captions.
    """
    toks = [c.split() for c in captions]
    uni = [w for t in toks for w in t]
    bi = [(t[i], t[i + 1]) for t in toks for i in range(len(t) - 1)]
    n = max(1, len(captions))
    return {
        "vocab_used": len(set(uni)),
        "distinct_1": len(set(uni)) / max(1, len(uni)),
        "distinct_2": len(set(bi)) / max(1, len(bi)),
        "novel_pct": 100.0 * sum(" ".join(t) not in train_captions for t in toks) / n,
        "unique_pct": 100.0 * len({" ".join(t) for t in toks}) / n,
        "mean_length": len(uni) / n if captions else math.nan,
    }
