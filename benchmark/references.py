"""Reading predictions and references for ``capbench eval`` (models from any codebase).

Predictions: a COCO results file, a JSON list of ``{"image_id", "caption"}``.
References: a Karpathy ``dataset.json`` (one split), a COCO captions annotation file
(``captions_val2014.json`` style: ``annotations[].image_id/caption``), or the built-in names
``coco-val2014`` / ``coco-train2014``, read offline from the copy of the COCO 2014 caption
annotations that ships inside pycocoevalcap's ``spice/spice-1.0.jar``.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from benchmark.data import image_id_key, load_karpathy
from benchmark.errors import ConfigError, DatasetError
from benchmark.metrics import score_captions
from benchmark.metrics.coco import _pkg_dir
from benchmark.metrics.registry import MetricOptions
from benchmark.stats import bootstrap_ci
from benchmark.userfiles import describe, quote, read_json

BUILTIN = {"coco-val2014": "coco/annotations/captions_val2014.json",
           "coco-train2014": "coco/annotations/captions_train2014.json"}

__all__ = ["load_predictions", "load_references", "match_predictions", "evaluate_file",
           "FileEvaluation", "BUILTIN", "eval_form", "read_references", "ReferenceSet"]


def eval_form(predictions, references, run, dataset, hf=None) -> str:
    """Which form of ``capbench eval`` its arguments ask for: ``"file"`` (PREDICTIONS
    --references R: score a predictions file), ``"run"`` (--run RUN --dataset D: caption and
    score with a saved model) or ``"hf"`` (--hf MODEL --dataset D: caption and score with a
    pretrained Hugging Face captioner, a reference row). Raises ConfigError when two forms,
    none, or half of one are given (None: not given)."""
    if hf is not None:  # the reference-row form (benchmark.hf_captioners)
        if run is not None:
            raise ConfigError("give --run RUN (a saved capbench model) or --hf MODEL (a pretrained "
                              "Hugging Face captioner), not both")
        if predictions is not None or references is not None:
            raise ConfigError("give either PREDICTIONS --references R (score a file) or --hf MODEL "
                              "--dataset D (score a pretrained captioner), not both")
        if dataset is None:
            raise ConfigError("scoring a pretrained captioner needs both --hf and --dataset")
        return "hf"
    file_form = predictions is not None or references is not None
    run_form = run is not None or dataset is not None
    if file_form == run_form:
        raise ConfigError("give either PREDICTIONS --references R (score a file) or --run RUN --dataset D "
                          "(score a saved model), not both" if file_form else
                          "give PREDICTIONS --references R (score a file), --run RUN --dataset D (score a "
                          "saved model) or --hf MODEL --dataset D (score a pretrained captioner)")
    if file_form and (predictions is None or references is None):
        raise ConfigError("scoring a file needs both PREDICTIONS and --references")
    if run_form and (run is None or dataset is None):
        raise ConfigError("scoring a saved model needs both --run and --dataset")
    return "file" if file_form else "run"


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise DatasetError(f"{what} file {path} does not exist")
    return read_json(path, what, DatasetError, walk=False)  # fields are checked one by one


def load_predictions(path: str | Path) -> dict:
    """``{image_id: caption}`` from a COCO results list, in file order.

    Raises DatasetError for a non-list, an entry without ``image_id``/``caption``, an id
    that is not an integer or a string, a caption that is not a string or is empty, or an
    image id given twice
    (the COCO toolkit would silently keep one). Ids are compared as text, so ``391895`` and
    ``"391895"`` are the same image; the message names both entries.
    """
    path = Path(path)
    data = _read_json(path, "predictions")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of {{image_id, caption}} (COCO results)")
    out: dict = {}
    first: dict[str, tuple[int, object]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise DatasetError(f"{path}: entry [{i}] needs 'image_id' and 'caption'")
        iid, cap = entry["image_id"], entry["caption"]
        if not isinstance(iid, int | str | float) or isinstance(iid, bool):
            raise DatasetError(f"{path}: entry [{i}] has image_id {describe(iid)}: use an integer "
                               "or a string")
        if not isinstance(cap, str):
            raise DatasetError(f"{path}: entry [{i}] (image_id {quote(iid)}): caption must be a "
                               f"string, got {describe(cap)}")
        if not cap.strip():
            raise DatasetError(f"{path}: entry [{i}] (image_id {quote(iid)}) has an empty caption")
        key = image_id_key(iid)
        if key in first:
            j, prev = first[key]
            raise DatasetError(f"{path}: image_id {quote(iid)} appears twice: entry [{j}] (image_id "
                               f"{quote(prev)}) and entry [{i}] (image_id {quote(iid)}); entries must be "
                               "unique (ids are compared as text: 42 and \"42\" are the same)")
        first[key] = (i, iid)
        out[iid] = cap
    if not out:
        raise DatasetError(f"{path}: no predictions")
    return out


def _from_coco(data: dict, source: str) -> dict:
    refs: dict = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DatasetError(f"{source}: annotations[{i}] needs 'image_id' and 'caption'")
        iid, cap = ann["image_id"], ann["caption"]
        if not isinstance(iid, int | str) or isinstance(iid, bool):
            raise DatasetError(f"{source}: annotations[{i}].image_id must be an integer or a "
                               f"string, got {describe(iid)}")
        if not isinstance(cap, str):
            raise DatasetError(f"{source}: annotations[{i}].caption (image_id {quote(iid)}) must "
                               f"be a string, got {describe(cap)}")
        refs.setdefault(iid, []).append(cap)
    return refs


@dataclass
class ReferenceSet:
    """References read from a file: ``refs`` ``{image_id: [reference, ...]}``, ``files``
    ``{image_id: image file}`` as the file names them (a Karpathy file: its image paths; a
    COCO file: ``images[].file_name``, relative) and ``has_folder``: whether those paths lead
    to the images without ``--images`` (Karpathy files only)."""

    refs: dict
    files: dict
    has_folder: bool = False

    def image_files(self, images_dir: str | Path | None) -> dict | None:
        """``{image_id: Path}`` of the images: under ``images_dir`` by file name when given,
        else the Karpathy file's own paths; None when neither says where they are."""
        if images_dir is not None:
            return {i: Path(images_dir) / Path(name).name for i, name in self.files.items()}
        return {i: Path(p) for i, p in self.files.items()} if self.has_folder else None


def _coco_files(data: dict) -> dict:
    images = data.get("images")
    if not isinstance(images, list):
        return {}
    return {im["id"]: im["file_name"] for im in images
            if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str)}


def read_references(spec: str | Path, split: str = "test") -> ReferenceSet:
    """The references and image file names of a Karpathy file (``split``), a COCO captions
    file, or a built-in name (see module docstring). Raises DatasetError otherwise."""
    if str(spec) in BUILTIN:
        jar = _pkg_dir() / "spice" / "spice-1.0.jar"
        with zipfile.ZipFile(jar) as z:
            data = json.loads(z.read(BUILTIN[str(spec)]))
        return ReferenceSet(_from_coco(data, f"{jar}!{BUILTIN[str(spec)]}"), _coco_files(data))
    path = Path(spec)
    data = _read_json(path, "references")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return ReferenceSet(_from_coco(data, str(path)), _coco_files(data))
    if isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] and \
            isinstance(data["images"][0], dict) and "sentences" in data["images"][0]:
        ds = load_karpathy(path, check_images=False)
        return ReferenceSet(ds.references(split), {im.image_id: im.path for im in ds.split(split)},
                            has_folder=True)
    raise DatasetError(
        f"{path}: references must be a Karpathy dataset.json (images[].sentences) or a COCO "
        f"captions file (annotations[].image_id/caption); built-in: {', '.join(BUILTIN)}")


def load_references(spec: str | Path, split: str = "test") -> dict:
    """``{image_id: [reference, ...]}`` from a Karpathy file (``split``), a COCO captions
    file, or a built-in name (see module docstring). Raises DatasetError otherwise."""
    return read_references(spec, split).refs


def match_predictions(predictions: dict, references: dict, source: str) -> dict:
    """Predictions re-keyed to the references' ids (``"42"`` matches ``42``), in prediction
    order.

    Ids are compared as text (:func:`benchmark.data.image_id_key`). Raises DatasetError
    naming the ids that have no references, two predictions for one image (``42`` and
    ``"42"``), or references holding one image under two ids.
    """
    by_key: dict[str, object] = {}
    for k in references:
        other = by_key.setdefault(image_id_key(k), k)
        if other is not k and other != k:
            raise DatasetError(f"references {source} hold image {quote(k)} twice (as {quote(other)} and "
                               f"{quote(k)}); ids are compared as text")
    out, missing, given = {}, [], {}
    for iid, cap in predictions.items():
        key = by_key.get(image_id_key(iid))
        if key is None:
            missing.append(iid)
            continue
        if key in given:
            raise DatasetError(f"two predictions for image {quote(key)}: image_id {quote(given[key])} and "
                               f"image_id {quote(iid)} (ids are compared as text: 42 and \"42\" are "
                               "the same); keep one")
        given[key] = iid
        out[key] = cap
    if missing:
        raise DatasetError(f"{len(missing)} predicted image id(s) are not in the references "
                           f"{source}, e.g. {quote(missing[:5], 300)}; check --references and --split")
    return out


@dataclass
class FileEvaluation:
    """What ``capbench eval`` reports: the ScoreResult, bootstrap CIs, image count, seconds.

    ``images``: predictions scored (all of them match a reference image).
    ``missing_references``: reference images without a prediction; when > 0 the scores are
    of a subset of the references (the COCO toolkit scores only the predicted images, too)
    and the CLI warns. ``confidence_intervals``: metric -> ``[low, high]``, each of the score
    beside it (see :func:`benchmark.stats.bootstrap_ci`).
    """

    result: object  # benchmark.metrics.ScoreResult
    confidence_intervals: dict[str, list[float]]
    images: int
    seconds: float
    missing_references: int = 0

    def to_json(self) -> dict:
        """``metrics``, ``confidence_intervals``, ``unavailable``, ``images``,
        ``missing_references``, ``tokenizer``, ``seconds``."""
        r = self.result
        return {"metrics": r.metrics, "confidence_intervals": self.confidence_intervals,
                "unavailable": r.unavailable, "images": self.images,
                "missing_references": self.missing_references, "tokenizer": r.tokenizer,
                "metric_sources": r.sources, "seconds": self.seconds}


def evaluate_file(predictions: str | Path, references: str | Path, split: str = "test", *,
                  images_dir: str | Path | None = None,
                  options: MetricOptions | None = None) -> FileEvaluation:
    """Score a COCO results file against references exactly as the COCO caption toolkit does,
    with bootstrap 95% CIs (1000 resamples, seed 0). Only the predicted images are scored.

    Args:
        predictions: a COCO results JSON, ``[{"image_id", "caption"}, ...]``.
        references: a Karpathy dataset.json, a COCO captions JSON, or ``coco-val2014`` /
            ``coco-train2014`` (the offline copy in pycocoevalcap).
        split: the split of a Karpathy references file.
        images_dir: the folder of the images, for the metrics that look at them (CLIP-S,
            PAC-S), found by the file names the references give (None: a Karpathy file's own
            paths, else those metrics are unavailable).
        options: weights and device of the model-based metrics (None:
            :meth:`~benchmark.metrics.MetricOptions.from_env`).

    Returns:
        :class:`FileEvaluation`: the scores, their intervals, the images scored, how many
        reference images have no prediction (``missing_references``) and the seconds taken.

    Raises:
        DatasetError: unreadable or mismatching files (see :func:`load_predictions`,
            :func:`match_predictions`).
    """
    t0 = time.perf_counter()
    refset = read_references(references, split)
    refs = refset.refs
    preds = match_predictions(load_predictions(predictions), refs, str(references))
    result = score_captions(preds, refs, images=refset.image_files(images_dir), options=options)
    ci = bootstrap_ci(result.per_image_block())
    return FileEvaluation(result, ci, len(preds), time.perf_counter() - t0,
                          missing_references=len(refs) - len(preds))
