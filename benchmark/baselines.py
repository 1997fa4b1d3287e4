"""Blind baselines: what a captioner scores without looking at the image."""

from __future__ import annotations

from collections import Counter

from benchmark.data import CaptionDataset

__all__ = ["most_frequent_caption", "blind_predictions"]


def most_frequent_caption(dataset: CaptionDataset) -> str:
    """The most frequent training caption (as its token sequence; ties: alphabetical)."""
    counts = Counter(" ".join(t) for im in dataset.split("train") for t in im.tokens)
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def blind_predictions(dataset: CaptionDataset, split: str = "test") -> dict:
    """``{image_id: the most frequent training caption}`` for every image of ``split``."""
    caption = most_frequent_caption(dataset)
    return {im.image_id: caption for im in dataset.split(split)}
