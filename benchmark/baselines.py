"""Baselines that show whether a captioner uses the image at all.

* ``most-frequent``: the most frequent training caption, for every image (blind).
* ``consensus``: the training caption with the highest mean CIDEr-D against the references
  of the training images: the best constant caption the train split offers (blind). Scored
  over all training images against a fixed-seed sample of at most ``max_candidates`` distinct
  training captions (all of them when there are fewer).
* ``nn``: nearest neighbour per encoder (Devlin et al. 2015, "Exploring Nearest Neighbor
  Approaches for Image Captioning"): for each test image, its ``k`` nearest training images
  by cosine similarity of the encoder's pooled features; among their captions, the one with
  the highest CIDEr-D against the others (the consensus caption). It needs only the feature
  cache, so it shows in seconds whether an encoder's features carry caption information.

CIDEr-D here uses :class:`benchmark.cider.CiderD` with the training references' document
frequencies; the baselines' test scores come from pycocoevalcap like every run's.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from benchmark.cider import CiderD
from benchmark.data import CaptionDataset, ImageRecord

__all__ = ["BLIND_KINDS", "BaselineCaptions", "most_frequent_caption", "consensus_caption",
           "blind_predictions", "nearest_neighbour_predictions", "train_cider"]

BLIND_KINDS = ("most-frequent", "consensus")

#: most neighbours the nn baseline pools (its cost grows with the square of their captions)
MAX_NN_K = 100


@dataclass
class BaselineCaptions:
    """A baseline's ``predictions {image_id: caption}`` and a line that says how it chose them."""

    kind: str
    predictions: dict
    detail: str


def _train_captions(dataset: CaptionDataset) -> list[str]:
    return [" ".join(t) for im in dataset.split("train") for t in im.tokens]


def most_frequent_caption(dataset: CaptionDataset) -> str:
    """The most frequent training caption (as its token sequence; ties: alphabetical)."""
    counts = Counter(_train_captions(dataset))
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def train_cider(dataset: CaptionDataset) -> CiderD:
    """CIDEr-D over the training images' references (their word tokens, lower-cased)."""
    return CiderD({im.image_id: [" ".join(t) for t in im.tokens] for im in dataset.split("train")})


def consensus_caption(dataset: CaptionDataset, *, max_candidates: int = 2000, seed: int = 0,
                      scorer: CiderD | None = None) -> tuple[str, float, int]:
    """The training caption with the highest mean CIDEr-D over the training images.

    Returns ``(caption, its mean train CIDEr-D, number of candidates tried)``; candidates are
    the distinct training captions, or a ``seed``-fixed sample of ``max_candidates`` of them.
    """
    scorer = scorer or train_cider(dataset)
    candidates = sorted(set(_train_captions(dataset)))
    if len(candidates) > max_candidates:
        candidates = sorted(random.Random(seed).sample(candidates, max_candidates))
    means = [float(scorer.score_everywhere(c).mean()) for c in candidates]
    best = int(np.argmax(means))
    return candidates[best], means[best], len(candidates)


def blind_predictions(dataset: CaptionDataset, split: str = "test", kind: str = "most-frequent",
                      **kwargs) -> BaselineCaptions:
    """One constant caption for every image of ``split`` (``kind`` in :data:`BLIND_KINDS`;
    ``kwargs`` go to :func:`consensus_caption`). Raises ValueError for an unknown kind."""
    images = dataset.split(split)
    if kind == "most-frequent":
        caption = most_frequent_caption(dataset)
        detail = "the most frequent training caption"
    elif kind == "consensus":
        caption, score, n = consensus_caption(dataset, **kwargs)
        detail = (f"the best of {n} distinct training captions by mean CIDEr-D over the "
                  f"training images ({100 * score:.1f})")
    else:
        raise ValueError(f"unknown blind baseline {kind!r}; choose {', '.join(BLIND_KINDS)}")
    return BaselineCaptions(kind, {im.image_id: caption for im in images}, detail)


def nearest_neighbour_predictions(train: list[ImageRecord], test: list[ImageRecord],
                                  train_pooled: torch.Tensor, test_pooled: torch.Tensor,
                                  scorer: CiderD, k: int = 5) -> BaselineCaptions:
    """Devlin et al.'s nearest-neighbour captions.

    ``train_pooled (Ntr, P)`` and ``test_pooled (Nte, P)`` are pooled features in the order of
    ``train`` / ``test``. For each test image: the ``k`` most cosine-similar training images,
    then among their captions the one with the highest CIDEr-D (``scorer``'s document
    frequencies) against the other candidates. Raises ValueError for ``k`` < 1.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    a = torch.nn.functional.normalize(train_pooled.float(), dim=1)
    b = torch.nn.functional.normalize(test_pooled.float(), dim=1)
    nearest = []
    for start in range(0, len(b), 1024):  # (1024, Ntr) similarities at a time, not (Nte, Ntr)
        sim = b[start:start + 1024] @ a.T
        nearest += sim.topk(min(k, len(train)), dim=1).indices.tolist()
    out = {}
    for im, idx in zip(test, nearest, strict=True):
        cands = [" ".join(t) for j in idx for t in train[j].tokens]
        if len(cands) == 1:
            out[im.image_id] = cands[0]
            continue
        scores = [scorer.score_against(c, cands[:i] + cands[i + 1:]) for i, c in enumerate(cands)]
        out[im.image_id] = cands[int(np.argmax(scores))]
    return BaselineCaptions("nn", out, f"consensus caption of the {k} nearest training images "
                                       "(cosine on pooled features)")
