"""Captioning a set of images with a trained decoder, from cached features or from pixels."""

from __future__ import annotations

import time

import torch

from benchmark import distributed
from benchmark.data import ImageRecord
from benchmark.decoding import DecodeConfig, decode
from benchmark.device import synchronize
from benchmark.features import FeatureStats, FeatureStore, extract_features
from benchmark.vocab import CaptionTokenizer

__all__ = ["caption_features", "caption_features_all_ranks", "caption_pixels"]


def caption_features(decoder, store: FeatureStore, images: list[ImageRecord], tokenizer: CaptionTokenizer,
                     cfg: DecodeConfig, device: torch.device, generator=None):
    """Captions ``{image_id: text}`` from cached features, and decoder-only captions/s."""
    decoder.eval()
    rows = store.row_ids(images)
    out: dict = {}
    synchronize(device)
    t0 = time.perf_counter()
    for start in range(0, len(images), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        grid, pooled = store.rows(batch, device)
        ids = decode(decoder, grid, pooled, cfg, tokenizer, generator=generator)
        for im, seq in zip(images[start : start + len(batch)], ids, strict=True):
            out[im.image_id] = " ".join(tokenizer.decode(seq))
    synchronize(device)
    return out, len(images) / max(time.perf_counter() - t0, 1e-9)


def caption_features_all_ranks(decoder, store: FeatureStore, images: list[ImageRecord],
                               tokenizer: CaptionTokenizer, cfg: DecodeConfig, device: torch.device):
    """:func:`caption_features` sharded over the ranks of a distributed run (rank ``r`` of
    ``W`` decodes images ``r, r+W, ...``, as torch's DistributedSampler without shuffling
    assigns them) and gathered on every rank. Beam search is batch-composition independent,
    so the captions equal a single process's. Returns ``({image_id: text}, captions/s of all
    ranks together)``; in a single process it is :func:`caption_features`."""
    world = distributed.world_size()
    if world == 1:
        return caption_features(decoder, store, images, tokenizer, cfg, device)
    mine = distributed.share(images)
    synchronize(device)
    t0 = time.perf_counter()
    part, _ = caption_features(decoder, store, mine, tokenizer, cfg, device) if mine else ({}, 0.0)
    parts = distributed.all_gather_object((part, time.perf_counter() - t0))
    out = {}
    for p, _ in parts:
        out.update(p)
    slowest = max(t for _, t in parts)
    return {im.image_id: out[im.image_id] for im in images}, len(images) / max(slowest, 1e-9)


def caption_pixels(encoder, decoder, images: list[ImageRecord], tokenizer: CaptionTokenizer,
                   cfg: DecodeConfig, device: torch.device, batch_size: int = 32,
                   num_workers: int | None = None, stats: FeatureStats | None = None,
                   image_decoder: str = "pil"):
    """End-to-end captioning from image files (decode + preprocess + encoder + decoder).

    Args:
        encoder: the run's encoder (its ``transform`` preprocesses each image).
        decoder: the trained :class:`~architectures.decoders.base.CaptionDecoder`.
        images: the image files to caption (:class:`~benchmark.data.ImageRecord`).
        tokenizer: the run's tokenizer.
        cfg: decoding settings (:class:`~benchmark.decoding.DecodeConfig`).
        device: where the encoder and decoder run.
        batch_size: images per encoder batch.
        num_workers: DataLoader processes reading images (None: the default).
        stats: the feature normalisation the decoder was trained with
            (:class:`~benchmark.features.FeatureStats`, or None).
        image_decoder: ``pil`` or ``torchvision``, as the run's features were extracted
            (:func:`benchmark.features.encode_batches`).

    Returns:
        ``({image_id: caption text}, images/s)``; the throughput includes JPEG/PNG decoding.

    Raises:
        DatasetError: an image that cannot be read.
    """
    t0 = time.perf_counter()
    grid, pooled, _ = extract_features(encoder, images, batch_size=batch_size, device=device,
                                       num_workers=num_workers, image_decoder=image_decoder)
    store = FeatureStore(grid, pooled, [im.image_id for im in images], key="pixels", stats=stats)
    caps, _ = caption_features(decoder, store, images, tokenizer, cfg, device)
    return caps, len(images) / max(time.perf_counter() - t0, 1e-9)
