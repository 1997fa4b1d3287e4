"""Uncertainty and language statistics for captioning results.

* :func:`corpus_bleu` recomputes pycocoevalcap's corpus BLEU-1..4 (``closest`` reference
  length, the same smoothing constants) from per-image n-gram counts, so BLEU can be
  bootstrapped like the per-image metrics.
* :func:`bootstrap_ci`: percentile bootstrap 95% intervals over test images (Efron &
  Tibshirani 1993) for every metric, each of the statistic that is reported: ROUGE-L,
  CIDEr-D and SPICE are means of their per-image scores (CIDEr-D's IDF stays that of the
  full test set, as is usual); BLEU is recomputed from summed n-gram counts; METEOR is the
  METEOR 1.5 jar's corpus score, which is *not* the mean of per-image METEOR: the jar sums
  the images' sufficient statistics and scores the sum (``EVAL`` in ``-stdio`` mode), so each
  resample's statistics are summed here (:func:`meteor_aggregable`) and scored by the same
  jar (:class:`benchmark.metrics.MeteorJar`). Blocks written before the statistics were kept
  get an interval of the per-image mean instead, under the key ``METEOR_image_mean``.
* :func:`paired_bootstrap`: difference between two systems on the same images, its CI and a
  two-sided p-value from the paired bootstrap (Koehn 2004, "Statistical Significance Tests
  for Machine Translation Evaluation").
* :func:`holm`: Holm's (1979) step-down adjustment of a family of p-values, by statsmodels'
  ``multipletests``, for the board's ``vs blind`` column and ``capbench compare`` of several runs.
* :func:`diversity`: vocabulary used, distinct-1/2 (Li et al. 2016), share of captions not
  seen in training, mean length.
"""

from __future__ import annotations

import math

import numpy as np

from benchmark.errors import ConfigError, RecordError
from benchmark.limits import available_memory, check_memory
from benchmark.metrics import METEOR_STATS_KEY, METEOR_STATS_LENGTH, mean_metrics, meteor_jar, metric_status

#: most bootstrap resamples ``capbench compare`` takes (METEOR's jar scores about 1,000 a second)
MAX_RESAMPLES = 100_000

__all__ = ["MAX_RESAMPLES", "corpus_bleu", "bootstrap_ci", "paired_bootstrap", "compare_runs", "diversity",
           "compare_to_first", "check_resamples", "holm",
           "metric_samples", "meteor_aggregable", "corpus_meteor", "meteor_statistic",
           "METEOR_MEAN_KEY"]

#: key of the METEOR entry when it is the mean of per-image METEOR (not the reported METEOR):
#: blocks without ``METEOR_stats`` (records written before they were kept) or no Java
METEOR_MEAN_KEY = "METEOR_image_mean"

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


def meteor_aggregable(stats) -> np.ndarray:
    """Per-image METEOR 1.5 statistics ``(M, 23)`` made summable: ``(M, 23)`` float64.

    The jar aggregates segments with ``MeteorStats.addStats``, a plain sum of every field
    except ``chunks`` (index 20), which a perfectly matched segment (all test and reference
    words matched, in one chunk) does not add. Zeroing those chunks makes the corpus
    statistics of any multiset of images the plain sum of its rows. Checked against the
    jar's own aggregate (identical to the last digit) on the COCO demo and on resamples
    of a set with perfect matches (tests/test_intervals_and_ids.py).
    """
    s = np.array(stats, dtype=np.float64).reshape(-1, METEOR_STATS_LENGTH)
    test_matches = s[:, 4:20:2].sum(axis=1)   # test content/function matches, 4 modules
    ref_matches = s[:, 5:20:2].sum(axis=1)
    perfect = (test_matches == s[:, 0]) & (ref_matches == s[:, 1]) & (s[:, 20] == 1.0)
    s[perfect, 20] = 0.0
    return s


def corpus_meteor(summed: np.ndarray) -> np.ndarray:
    """The jar's METEOR of summed statistics ``(R, 23)`` (rows of :func:`meteor_aggregable`
    summed over images) -> ``(R,)``, in one ``EVAL`` call per 2000 rows. Needs Java."""
    summed = np.asarray(summed, dtype=np.float64).reshape(-1, METEOR_STATS_LENGTH)
    with meteor_jar() as jar:
        return jar.eval_stats(summed)


def meteor_statistic(per_image: dict) -> str | None:
    """Which METEOR a ``per_image`` block can be resampled for.

    ``"corpus"`` (the reported METEOR) when it holds ``METEOR_stats`` and METEOR can run here
    (Java and its files: :func:`benchmark.metrics.metric_status`);
    ``"mean"`` (mean of per-image METEOR, reported under :data:`METEOR_MEAN_KEY`) when it
    only holds per-image ``METEOR`` scores; None without METEOR. Raises ValueError when
    ``METEOR_stats`` does not hold one row of 23 numbers per image.
    """
    stats = per_image.get(METEOR_STATS_KEY)
    if stats:
        m = len(per_image.get("image_ids", []))
        if len(stats) != m or any(len(row) != METEOR_STATS_LENGTH for row in stats):
            raise ValueError(f"per_image {METEOR_STATS_KEY} should hold {m} rows of "
                             f"{METEOR_STATS_LENGTH} numbers, one per image")
        if metric_status()["METEOR"] is None:  # Java and METEOR's files are here
            return "corpus"
    return "mean" if per_image.get("METEOR") else None


def _draw_counts(resample: np.ndarray, m: int, rows: slice) -> np.ndarray:
    """How often each of ``m`` images is drawn in ``resample[rows]`` -> ``(r, m)`` float64."""
    r = resample[rows]
    flat = (r + m * np.arange(len(r))[:, None]).ravel()
    return np.bincount(flat, minlength=len(r) * m).reshape(len(r), m).astype(np.float64)


def _summed(values: np.ndarray, resample: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per resample, the sum of the drawn images' rows of ``values (M, K)`` -> ``(R, K)``.

    Exact for integer counts (sums of integers below 2**53); memory ``chunk x M``, not
    ``R x M x K``."""
    m = len(values)
    out = np.empty((len(resample), values.shape[1]))
    for start in range(0, len(resample), chunk):
        rows = slice(start, start + chunk)
        out[rows] = _draw_counts(resample, m, rows) @ values
    return out


def _samples(blocks: list[dict], resample: np.ndarray, meteor: str | None) -> list[dict]:
    """:func:`metric_samples` of several blocks over the same resamples (one jar call)."""
    outs: list[dict[str, np.ndarray]] = []
    pending = []
    for per_image in blocks:
        out: dict[str, np.ndarray] = {}
        stats = per_image.get("bleu_stats")
        if stats:
            sums = _summed(np.asarray(stats, dtype=np.float64), resample)
            b = corpus_bleu(sums[:, None, :])
            for n in range(4):
                out[f"Bleu_{n + 1}"] = b[:, n]
        for name in mean_metrics():
            values = per_image.get(name)
            if not values:
                continue
            if name == "METEOR" and meteor != "mean":
                continue
            key = METEOR_MEAN_KEY if name == "METEOR" else name
            out[key] = np.nanmean(np.asarray(values, dtype=np.float64)[resample], axis=1)
        if meteor == "corpus":
            pending.append(_summed(meteor_aggregable(per_image[METEOR_STATS_KEY]), resample))
        outs.append(out)
    if pending:
        scores = corpus_meteor(np.concatenate(pending))
        for k, out in enumerate(outs):
            out["METEOR"] = scores[k * len(resample):(k + 1) * len(resample)]
    return outs


def metric_samples(per_image: dict, resample: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric on each resample of image indices ``resample (R, M)`` -> ``{name: (R,)}``.

    Each value is the statistic reported for the full set, computed on the resampled images:
    BLEU-1..4 from summed n-gram counts, METEOR as the jar's corpus score of the summed
    statistics (:func:`meteor_aggregable`), ROUGE_L/CIDEr/SPICE as means (SPICE ignoring
    NaN). With ``resample = arange(M)[None]`` every value equals the recorded score (METEOR
    exactly). A block without ``METEOR_stats``, or no Java, gives the mean of per-image
    METEOR under :data:`METEOR_MEAN_KEY` instead of ``METEOR``.
    """
    resample = np.asarray(resample)
    return _samples([per_image], resample, meteor_statistic(per_image))[0]


def _resamples(m: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, m, size=(n_resamples, m))


def bootstrap_ci(per_image: dict, *, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap ``[low, high]`` per metric over test images.

    ``per_image`` is a record's ``per_image`` block (``image_ids``, per-metric lists,
    ``METEOR_stats``, ``bleu_stats``). Each interval is of the reported score (see
    :func:`metric_samples`); METEOR's needs ``METEOR_stats`` and Java, else the interval of
    the mean of per-image METEOR is returned under ``METEOR_image_mean`` and ``METEOR`` has
    none. Cost: one ``EVAL`` of ``n_resamples`` lines in the METEOR jar (about 1 s per 1000,
    plus about 5 s when the jar is not already running). Raises ValueError when the block
    holds no images, RuntimeError when the METEOR jar fails.
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
    resampled image sets are used for both systems, and each metric is the reported
    statistic (:func:`metric_samples`), so ``delta`` is B's recorded score minus A's.
    METEOR is compared as the corpus score when both blocks hold ``METEOR_stats`` (and Java
    runs); otherwise as the mean of per-image METEOR, under ``METEOR_image_mean``. ``p`` is
    twice the smaller tail of the resampled differences around 0 (capped at 1), with at
    least 1/``n_resamples`` resolution. Raises ValueError for blocks on different images.
    """
    a, b = _align(a, b)
    m = len(a["image_ids"])
    # the last row is the full set: its values are the recorded scores (delta = B - A)
    idx = np.vstack([_resamples(m, n_resamples, seed), np.arange(m)[None]])
    ma, mb = meteor_statistic(a), meteor_statistic(b)
    meteor = "corpus" if ma == mb == "corpus" else ("mean" if ma and mb else None)
    sa, sb = _samples([a, b], idx, meteor)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for name in sa.keys() & sb.keys():
        d = sb[name][:-1] - sa[name][:-1]
        tail = min(np.mean(d <= 0), np.mean(d >= 0))
        out[name] = {"delta": float(sb[name][-1] - sa[name][-1]),
                     "ci": [float(x) for x in np.percentile(d, q)],
                     "p": float(min(1.0, max(2 * tail, 1.0 / n_resamples)))}
    return out


def check_resamples(n_resamples: int) -> None:
    """Raise ConfigError (naming ``--resamples``) unless 1 <= ``n_resamples`` <= :data:`MAX_RESAMPLES`."""
    if not 1 <= n_resamples <= MAX_RESAMPLES:
        raise ConfigError(f"--resamples {n_resamples}: give 1 to {MAX_RESAMPLES:,} (2000 is usual)")


def compare_runs(a, b, *, n_resamples: int = 2000) -> dict[str, dict[str, float]]:
    """:func:`paired_bootstrap` of run records ``b`` against ``a`` on their shared test images.

    Args:
        a: the baseline :class:`~benchmark.records.RunRecord`.
        b: the record compared with it.
        n_resamples: bootstrap resamples.

    Returns:
        Per metric, ``{"delta" (B - A), "ci" ([low, high], 95%), "p" (two-sided)}``, scores on
        pycocoevalcap's scale (x 1).

    Raises:
        RecordError: the runs are on different splits (their scores are not comparable).
        ValueError: ``n_resamples`` < 1.
        ResourceError: the resampled index table would not fit in memory (checked before any
            work).
    """
    _check_pair(a, b, n_resamples)
    return paired_bootstrap(a.per_image, b.per_image, n_resamples=n_resamples)


def _check_pair(a, b, n_resamples: int) -> None:
    """:func:`compare_runs`' checks of two records, before any resampling."""
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    for r in (a, b):
        if not r.per_image.get("image_ids"):
            raise RecordError(f"run {r.run_id} has no per-image scores to compare "
                              f"({r.path or 'record'}: field 'per_image' is empty)")
    m = len(a.per_image["image_ids"])
    # the resampled index table and its per-image draw counts, 8 bytes an entry each
    check_memory(2 * 8 * (n_resamples + 1) * m, f"{n_resamples:,} resamples of {m:,} images",
                 f"ask for fewer (2000 is usual; at most about {available_memory() // (16 * m):,} "
                 "fit)")
    if a.split_fingerprint != b.split_fingerprint:
        raise RecordError(f"runs are on different splits ({a.split_fingerprint} vs "
                          f"{b.split_fingerprint}): their scores are not comparable")


def compare_to_first(records, *, n_resamples: int = 2000) -> list[dict[str, dict[str, float]]]:
    """:func:`compare_runs` of each of ``records[1:]`` against ``records[0]``, with each
    metric's p-values Holm-adjusted over those comparisons (:func:`holm`; one family per
    metric, of ``len(records) - 1`` tests: with two records nothing changes).

    Returns one dict per compared record, in order: per metric ``{"delta", "ci", "p"
    (Holm-adjusted), "p_raw", "tests" (the family's size)}``; the 95% intervals are not
    adjusted. Raises ValueError for fewer than two records, and what :func:`compare_runs`
    raises, every pair checked before any resampling."""
    if len(records) < 2:
        raise ValueError("compare needs at least two runs")
    first, rest = records[0], records[1:]
    for b in rest:
        _check_pair(first, b, n_resamples)
    results = [compare_runs(first, b, n_resamples=n_resamples) for b in rest]
    for m in {m for res in results for m in res}:
        raw = [res[m]["p"] if m in res else math.nan for res in results]
        adjusted, _ = holm(raw)
        tests = int(np.isfinite(raw).sum())
        for res, p in zip(results, adjusted, strict=True):
            if m in res:
                res[m].update(p=float(p), p_raw=res[m]["p"], tests=tests)
    return results


def holm(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979, "A Simple Sequentially
    Rejective Multiple Test Procedure"), by ``statsmodels.stats.multitest.multipletests(
    method="holm")``: it controls the family-wise error rate at ``alpha``.

    ``p_values``: the family's raw p-values, shape ``(n,)``; NaN entries (no test) are left
    out of the family and stay NaN. Returns ``(adjusted, reject)``: adjusted p-values (float,
    ``(n,)``) and whether each is below ``alpha`` after adjustment (bool, ``(n,)``, False where
    NaN). The family's size is the number of finite p-values."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    adjusted, reject = np.full(p.shape, np.nan), np.zeros(p.shape, dtype=bool)
    ok = np.isfinite(p)
    if ok.any():
        # statsmodels (with scipy) costs a second or more of start-up: loaded when first used
        from statsmodels.stats.multitest import multipletests

        rej, adj, _, _ = multipletests(p[ok], alpha=alpha, method="holm")
        adjusted[ok], reject[ok] = adj, rej
    return adjusted, reject


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
