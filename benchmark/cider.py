"""CIDEr-D with document frequencies computed once, for training loops and baselines.

pycocoevalcap's ``Cider`` recounts every reference's n-grams and document frequencies on each
call, which is right for scoring a test set once and far too slow inside a training loop
(SCST rewards) or for scoring thousands of candidate captions (consensus and nearest-neighbour
baselines). :class:`CiderD` precomputes the references' tf-idf vectors and an inverted n-gram
index once, then scores any caption against any image, or one caption against every image at
once. It computes exactly what ``pycocoevalcap.cider.cider_scorer.CiderScorer`` computes
(Vedantam et al. 2015, CIDEr-D: n = 1..4, idf from the reference set's images, clipped
term-frequency products, Gaussian length penalty with sigma = 6, x10), equal to 1e-9 (tested
on the official COCO demo file); only the order of floating-point sums differs.

Inputs are PTB-tokenized, lower-cased strings (what :func:`benchmark.metrics.ptb_tokenize`
returns), as for pycocoevalcap.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

__all__ = ["CiderD", "ngram_counts"]


def ngram_counts(caption: str, n: int = 4) -> Counter:
    """Counts of the 1..n-grams (tuples of words) of a whitespace-tokenized caption."""
    words = caption.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D against a fixed reference set ``{image_id: [reference, ...]}``.

    The document frequencies (one document = one image's references) and every reference's
    tf-idf vector are computed at construction. Raises ValueError for an empty reference set.
    """

    def __init__(self, references: dict, n: int = 4, sigma: float = 6.0) -> None:
        if not references:
            raise ValueError("CIDEr-D needs at least one image with references")
        self.n, self.sigma = n, sigma
        self.image_ids = list(references)
        self.df: Counter = Counter()
        cooked = {i: [ngram_counts(r, n) for r in refs] for i, refs in references.items()}
        for refs in cooked.values():
            self.df.update({g for r in refs for g in r})
        self.log_docs = math.log(float(len(references)))
        self._refs = {i: [self._vector(c) for c in refs] for i, refs in cooked.items()}
        self._build_index()

    # ----------------------------------------------------------------------------- vectors
    def _vector(self, counts: Counter):
        vec = [dict() for _ in range(self.n)]
        norm = np.zeros(self.n)
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = float(tf) * (self.log_docs - math.log(max(1.0, self.df.get(g, 0.0))))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap's "length" counts bigrams
                length += tf
        return vec, np.sqrt(norm), length

    def _sim(self, hyp, ref) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        val = np.zeros(self.n)
        for k in range(self.n):
            for g, w in vh[k].items():
                r = vr[k].get(g, 0.0)
                val[k] += min(w, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
        return val * math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))

    def _score_vector(self, hyp, refs) -> float:
        total = np.zeros(self.n)
        for ref in refs:
            total += self._sim(hyp, ref)
        return float(np.mean(total) / len(refs) * 10.0)

    # ------------------------------------------------------------------------------ scoring
    def score(self, predictions: dict) -> tuple[float, np.ndarray]:
        """``(corpus CIDEr-D, per-image scores (M,))`` of ``{image_id: caption}``, in the
        order of ``predictions``, each against its own image's references (KeyError for an
        unknown id). Equals pycocoevalcap's ``Cider().compute_score`` when the reference
        set is the predictions' own images."""
        per = np.array([self._score_vector(self._vector(ngram_counts(c, self.n)), self._refs[i])
                        for i, c in predictions.items()])
        return float(per.mean()) if len(per) else 0.0, per

    def score_pairs(self, captions: list[str], image_ids: list) -> np.ndarray:
        """CIDEr-D ``(M,)`` of each ``captions[m]`` against the references of
        ``image_ids[m]`` (several captions may share an image: the SCST reward of the samples
        of one image). KeyError for an image outside the reference set; ValueError when the
        two lists differ in length."""
        if len(captions) != len(image_ids):
            raise ValueError(f"{len(captions)} captions but {len(image_ids)} image ids")
        return np.array([self._score_vector(self._vector(ngram_counts(c, self.n)), self._refs[i])
                         for c, i in zip(captions, image_ids, strict=True)], dtype=np.float64)

    def score_against(self, caption: str, references: list[str]) -> float:
        """CIDEr-D of ``caption`` against an arbitrary list of references, with this scorer's
        document frequencies (e.g. a candidate against the other candidates)."""
        refs = [self._vector(ngram_counts(r, self.n)) for r in references]
        return self._score_vector(self._vector(ngram_counts(caption, self.n)), refs)

    def _build_index(self) -> None:
        """Inverted index: n-gram -> (reference row, tf-idf weight) over all references."""
        rows: dict = defaultdict(list)
        norms, lengths, owner = [], [], []
        r = 0
        for img, refs in enumerate(self._refs.values()):
            for vec, norm, length in refs:
                for k in range(self.n):
                    for g, w in vec[k].items():
                        rows[g].append((r, w))
                norms.append(norm)
                lengths.append(length)
                owner.append(img)
                r += 1
        self._index = {g: (np.array([a for a, _ in v]), np.array([b for _, b in v]))
                       for g, v in rows.items()}
        self._norms = np.array(norms).reshape(-1, self.n)
        self._lengths = np.array(lengths, dtype=np.float64)
        self._owner = np.array(owner)
        self._refs_per_image = np.bincount(self._owner, minlength=len(self.image_ids))

    def score_everywhere(self, caption: str) -> np.ndarray:
        """CIDEr-D ``(M,)`` of one caption against every image of the reference set (in
        ``image_ids`` order): what a blind system that always says ``caption`` scores on each
        image. Vectorised over references with the inverted index."""
        vec, norm, length = self._vector(ngram_counts(caption, self.n))
        acc = np.zeros((len(self._lengths), self.n))
        for k in range(self.n):
            for g, w in vec[k].items():
                hit = self._index.get(g)
                if hit is not None:
                    rows, weights = hit
                    np.add.at(acc[:, k], rows, np.minimum(w, weights) * weights)
        denom = norm[None, :] * self._norms
        acc = np.where(denom != 0, acc / np.where(denom != 0, denom, 1.0), acc)
        penalty = np.exp(-((length - self._lengths) ** 2) / (2 * self.sigma ** 2))
        per_ref = acc.mean(1) * penalty
        per_image = np.bincount(self._owner, weights=per_ref, minlength=len(self.image_ids))
        return per_image / self._refs_per_image * 10.0
