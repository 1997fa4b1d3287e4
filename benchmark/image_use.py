"""Does the model look at the image? Run outputs that answer it, stored in every run record.

* **Image-shuffle test**: the test split is decoded a second time with the images' features
  permuted by a fixed derangement (no image keeps its own features) and scored with CIDEr-D.
  The drop (real - shuffled) gets a paired bootstrap CI and p-value. A model that uses the
  image loses much of its score; one that ignores it loses nothing.
* **Blind baselines** on the same test images (``most-frequent`` and ``consensus``, see
  :mod:`benchmark.baselines`), and the paired bootstrap of the run's CIDEr-D against the
  strongest of them (Koehn 2004): ``better`` is True only when the run is higher with p < 0.05.
* **Nearest neighbour** for the run's encoder (Devlin et al. 2015) from the cached features.

Everything is scored by pycocoevalcap (:func:`benchmark.metrics.score_captions`) like the run
itself. Baseline scores depend only on the split (and encoder, for ``nn``), so they are
computed once per process and reused by every run of a matrix.
"""

from __future__ import annotations

import numpy as np

from benchmark.baselines import (
    BLIND_KINDS,
    blind_predictions,
    nearest_neighbour_predictions,
    train_cider,
)
from benchmark.data import CaptionDataset
from benchmark.errors import ConfigError
from benchmark.features import FeatureStore, take_rows
from benchmark.inference import caption_features
from benchmark.metrics import ALL_METRICS, score_captions
from benchmark.records import load_records
from benchmark.stats import paired_bootstrap

__all__ = ["derangement", "shuffle_test", "baseline_scores", "image_use_report", "vs_blind",
           "records_vs_blind", "baseline_rows", "runs_vs_blind_rows",
           "SIGNIFICANCE"]

SIGNIFICANCE = 0.05
_CACHE: dict = {}


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation ``p`` of ``range(n)`` with ``p[i] != i`` for every i (one random cycle,
    Sattolo-style, from a ``seed``-fixed generator). Raises ValueError for ``n`` < 2."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def _cider_block(result) -> dict:
    return {"image_ids": result.image_ids, "CIDEr": result.per_image["CIDEr"]}


def shuffle_test(decoder, store: FeatureStore, test, tokenizer, decode_cfg, device, references: dict,
                 real: dict, *, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Does the model use the image? Decode ``test`` with every image's features replaced by
    another test image's (a :func:`derangement`), score CIDEr-D, and compare with the
    unshuffled captions by paired bootstrap (:func:`benchmark.stats.paired_bootstrap`).

    Args:
        decoder: the trained :class:`~architectures.decoders.base.CaptionDecoder`.
        store: the cached features of the test images (grid ``(N, D)`` and pooled ``(P,)`` a
            row, z-scored with the store's statistics as in training).
        test: the test split's :class:`~benchmark.data.ImageRecord` list (at least 2).
        tokenizer: the run's tokenizer.
        decode_cfg: the run's :class:`~benchmark.decoding.DecodeConfig`.
        device: where the decoder runs.
        references: ``{image_id: [reference captions]}`` of ``test``.
        real: ``{"image_ids", "CIDEr"}``, the per-image CIDEr-D of the unshuffled captions.
        seed: the derangement's seed.
        n_resamples: bootstrap resamples.

    Returns:
        ``{"derangement_seed", "CIDEr" (shuffled), "drop" (real - shuffled), "drop_ci" (95%),
        "p" (two-sided)}``, scores on pycocoevalcap's scale (CIDEr-D x 1, not x 100).

    Raises:
        ValueError: fewer than 2 test images, or ``real`` on other images.
    """
    perm = derangement(len(test), seed)
    rows = store.row_ids(test)[perm]
    shuffled_store = store.copy()
    shuffled_store.stats = store.stats
    shuffled_store.index = {im.image_id: int(r) for im, r in zip(test, rows.tolist(), strict=True)}
    preds, _ = caption_features(decoder, shuffled_store, test, tokenizer, decode_cfg, device)
    result = score_captions(preds, references, metrics=("CIDEr",))
    cmp = paired_bootstrap(_cider_block(result), real, n_resamples=n_resamples)["CIDEr"]
    return {"derangement_seed": seed, "CIDEr": result.metrics["CIDEr"], "drop": cmp["delta"],
            "drop_ci": cmp["ci"], "p": cmp["p"]}


def _score(baseline, references: dict) -> dict:
    result = score_captions(baseline.predictions, references, metrics=ALL_METRICS)
    captions = set(baseline.predictions.values())
    return {"detail": baseline.detail, "metrics": result.metrics,
            "caption": captions.pop() if len(captions) == 1 else None,
            "per_image": _cider_block(result)}


def _scorer(dataset: CaptionDataset):
    key = (str(dataset.source), dataset.fingerprint, "scorer")
    if key not in _CACHE:
        _CACHE[key] = train_cider(dataset)
    return _CACHE[key]


def baseline_scores(dataset: CaptionDataset, store: FeatureStore | None = None,
                    encoder: str | None = None, k: int = 5, split: str = "test",
                    kinds: tuple[str, ...] = BLIND_KINDS) -> dict:
    """Scores on ``split`` of the blind baselines in ``kinds`` and, with ``store`` (an
    encoder's cached features of the dataset), the nearest-neighbour baseline of ``encoder``
    with ``k`` neighbours: ``{kind: {"detail", "metrics", "caption", "per_image"}}``. Cached
    per dataset, split fingerprint and split (and feature-store key)."""
    refs = dataset.references(split)
    key = (str(dataset.source), dataset.fingerprint, split)
    out = {}
    for kind in kinds:
        if key + (kind,) not in _CACHE:
            _CACHE[key + (kind,)] = _score(blind_predictions(dataset, split, kind,
                                                             scorer=_scorer(dataset)), refs)
        out[kind] = _CACHE[key + (kind,)]
    if store is not None:
        nn_key = key + (store.key, k)
        if nn_key not in _CACHE:
            train, target = dataset.split("train"), dataset.split(split)
            nn = nearest_neighbour_predictions(
                train, target, take_rows(store.pooled, store.row_ids(train)),
                take_rows(store.pooled, store.row_ids(target)), _scorer(dataset), k=k)
            _CACHE[nn_key] = {**_score(nn, refs), "encoder": encoder, "k": k}
        out["nn"] = _CACHE[nn_key]
    return out


def vs_blind(run_per_image: dict, baselines: dict) -> dict:
    """Paired bootstrap of a run's per-image CIDEr-D (``{image_ids, CIDEr}``) against the
    strongest blind baseline in ``baselines`` (:func:`baseline_scores`):
    ``{"baseline", "delta", "ci", "p", "better"}``, ``better`` = higher with p < 0.05."""
    strongest = max(BLIND_KINDS, key=lambda kind: baselines[kind]["metrics"]["CIDEr"])
    cmp = paired_bootstrap(baselines[strongest]["per_image"], run_per_image)["CIDEr"]
    return {"baseline": strongest, "delta": cmp["delta"], "ci": cmp["ci"], "p": cmp["p"],
            "better": bool(cmp["delta"] > 0 and cmp["p"] < SIGNIFICANCE)}


def records_vs_blind(results_dir, dataset: CaptionDataset, baselines: dict) -> list[tuple]:
    """``[(record, vs_blind verdict)]`` for every record under ``results_dir`` made on
    ``dataset``'s split (best CIDEr-D first): the blind test for records written before it
    was part of every run."""
    records = [r for r in load_records(results_dir)[0] if r.split_fingerprint == dataset.fingerprint]
    return [(r, vs_blind({"image_ids": r.per_image["image_ids"], "CIDEr": r.per_image["CIDEr"]},
                         baselines)) for r in sorted(records, key=lambda r: -r.metrics["CIDEr"])]


BASELINE_COLUMNS = ("baseline", "caption", "B@4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
VERDICT_COLUMNS = ("run", "decoder", "encoder", "CIDEr-D", "delta", "95% CI", "p", "better?", "uniq%")


def baseline_rows(scores: dict, encoder: str, k: int) -> list[list[str]]:
    """``capbench baseline``'s table (:data:`BASELINE_COLUMNS`): per baseline of ``scores``
    (:func:`baseline_scores`) its label, caption (or how it was chosen) and metrics x100
    (``n/a`` for one not computed)."""
    rows = []
    for name, b in scores.items():
        m = b["metrics"]
        label = f"nn ({encoder}, k={k})" if name == "nn" else f"blind: {name}"
        rows.append([label, b["caption"] or b["detail"],
                     *("n/a" if m.get(x) is None else f"{100 * m[x]:.1f}"
                       for x in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"))])
    return rows


def runs_vs_blind_rows(results_dir, dataset: CaptionDataset, baselines: dict,
                       split: str) -> list[list[str]]:
    """``capbench baseline --runs``'s table (:data:`VERDICT_COLUMNS`, CIDEr-D x100): each
    record of :func:`records_vs_blind` against the strongest blind baseline, ``better?``
    ``yes``/``no``. Raises ConfigError when no record was made on ``dataset``'s split
    (only the test split is tested)."""
    verdicts = records_vs_blind(results_dir, dataset, baselines) if split == "test" else []
    if not verdicts:
        raise ConfigError(f"--runs {results_dir}: no run record on {dataset.name}'s split "
                          f"{dataset.fingerprint} (test split)")
    rows = []
    for r, v in verdicts:
        parts = r.run_id.split("-")
        rows.append([f"{parts[0][4:]}-{parts[1]}-{parts[-1]}", r.arch, r.encoder,
                     f"{100 * r.metrics['CIDEr']:.1f}", f"{100 * v['delta']:+.1f}",
                     f"[{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}]", f"{v['p']:.3f}",
                     "yes" if v["better"] else "no",
                     f"{r.diversity.get('unique_pct', float('nan')):.0f}"])
    return rows


def image_use_report(run_per_image: dict, baselines: dict, shuffle: dict) -> dict:
    """The record's ``image_use`` block: the shuffle test, each baseline's metrics (without
    per-image lists) and the paired test of the run against the strongest blind baseline."""
    return {
        "shuffle": shuffle,
        "baselines": {kind: {k: v for k, v in b.items() if k != "per_image"}
                      for kind, b in baselines.items()},
        "vs_blind": vs_blind(run_per_image, baselines),
    }
