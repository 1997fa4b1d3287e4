"""Captioning image files with a saved run, and scoring a saved run on another dataset.

``capbench caption`` (:func:`caption_files`) and ``capbench eval --run`` (:func:`evaluate_run`)
both start from :func:`benchmark.checkpoint.load_run`. Captions from pixels equal the run's
own test predictions for the same images and decoding options: the features are rounded to
float16 like the feature cache the run was trained and tested from, z-scored with the run's
train statistics, and decoded with the same batched decoding code.
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmark.checkpoint import LoadedRun, load_run
from benchmark.data import resolve_dataset
from benchmark.errors import CapbenchError, DatasetError, RecordError
from benchmark.features import load_or_extract, open_store, store_folder
from benchmark.imagefile import file_problem, open_rgb
from benchmark.inference import caption_features, caption_pixels
from benchmark.metrics import MetricOptions, score_captions
from benchmark.pixels import (
    TensorPreprocess,
    check_image_decoder,
    decode_images,
    read_bytes,
    tensor_transform,
)
from benchmark.records import (
    RecordedModel,
    ScoredSplit,
    ThroughputBlock,
    make_record,
    new_run_id,
    write_record,
)

__all__ = ["IMAGE_EXTENSIONS", "CaptionResult", "expand_paths", "load_pixels", "caption_files",
           "caption_saved_run",
           "coco_image_id", "coco_results", "evaluate_run", "evaluate_saved_run", "check_split"]

#: file name endings taken from a folder (an explicitly named file is tried whatever its name)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class CaptionResult:
    """``captions``: ``[(path, caption)]`` in input order; ``failures``: ``[(path, reason)]``.

    ``seconds``: wall time of reading, encoding and decoding (model loading excluded);
    ``images_per_s``: captioned images / ``seconds``.
    """

    captions: list[tuple[Path, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.captions) / max(self.seconds, 1e-9)


def coco_image_id(path: Path) -> int | str:
    """The COCO results ``image_id`` of an image file: its stem, as an int when numeric
    (``000000391895.jpg`` -> 391895, ``shapes_00001.png`` -> ``"shapes_00001"``)."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else stem


def coco_results(captions: list[tuple[Path, str]]) -> tuple[list[dict], list[str]]:
    """``(rows, shared ids)``: ``captions`` (file, caption) as COCO results rows ``{image_id,
    file_name, caption}`` (:func:`coco_image_id`), and the image ids that two or more files
    share, sorted as strings (COCO tools would keep one caption of each)."""
    ids = [coco_image_id(p) for p, _ in captions]
    twice = sorted({str(i) for i in ids if ids.count(i) > 1})
    rows = [{"image_id": i, "file_name": p.name, "caption": c}
            for i, (p, c) in zip(ids, captions, strict=True)]
    return rows, twice


def expand_paths(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to caption from ``paths``: files as given, folders as their image files
    (:data:`IMAGE_EXTENSIONS`, not recursive, sorted by name) and glob patterns (sorted).

    Returns ``(files, failures)``; a path that does not exist, a pattern that matches nothing,
    a folder without images, and what is not a regular file (a named pipe, which would block,
    or a symbolic link loop, named as such) are failures ``(path, reason)``. Duplicates are
    dropped.
    """
    files, failures = [], []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            named = sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_EXTENSIONS)
            found = [x for x in named if file_problem(x) is None]
            failures += [(str(x), why) for x in named if (why := file_problem(x))
                         and not x.is_dir()]
            if not named:
                failures.append((raw, f"folder has no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            files.extend(found)
        elif p.is_symlink() or p.exists():
            if why := file_problem(p):
                failures.append((raw, why))
            else:
                files.append(p)
        elif glob.has_magic(raw):
            found = sorted(Path(x) for x in glob.glob(raw) if Path(x).is_file())
            if not found:
                failures.append((raw, "no file matches this pattern"))
            files.extend(found)
        else:
            failures.append((raw, "no such file or folder"))
    return list(dict.fromkeys(files)), failures


def load_pixels(path: Path, transform, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(3, H, W)`` float tensor of the image at ``path`` through an encoder's ``transform``
    (read with Pillow, on the CPU), or, when ``transform`` is a
    :class:`~benchmark.pixels.TensorPreprocess` (a ``torchvision`` run), decoded and
    preprocessed on ``device`` as that run's features were (:mod:`benchmark.pixels`).

    Raises DatasetError naming the file: not a regular file, not an image Pillow can read,
    truncated, too large, or unreadable (:func:`benchmark.imagefile.open_rgb`).
    """
    if isinstance(transform, TensorPreprocess):
        device = torch.device(device)
        return transform(decode_images([read_bytes(path)], [path], device))[0]
    return transform(open_rgb(path))


def caption_files(run: LoadedRun, files: list[Path], *, batch_size: int | None = None,
                  progress=None) -> CaptionResult:
    """Caption image ``files`` with ``run``: preprocess, encode, decode (the run's
    :attr:`~benchmark.checkpoint.LoadedRun.decode` settings).

    A file that cannot be read is recorded in ``failures`` with the reason and skipped; the
    others are still captioned.

    Args:
        run: the loaded run (:func:`benchmark.checkpoint.load_run`).
        files: image files, captioned in this order.
        batch_size: images per batch (default: the run's ``features.batch_size``, as its
            features were extracted).
        progress: ``progress(n)`` is called after each batch of n images.

    Returns:
        :class:`CaptionResult`: ``[(path, caption)]``, ``[(path, reason)]`` failures and the
        seconds of reading, encoding and decoding (images/s from them).

    Raises:
        ConfigError: the run's ``torchvision`` image decoder is unavailable here (checked once,
            before any file is read).
    """
    feats = run.config.get("features") or {}
    bs = batch_size or int(feats.get("batch_size", 32))
    transform = run.encoder.transform
    if run.image_decoder != "pil":  # checked once, before any file is read

        check_image_decoder(run.image_decoder, transform)
        transform = tensor_transform(transform)
    out = CaptionResult()
    t0 = time.perf_counter()
    pending: list[tuple[Path, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        grid, pooled = run.raw_features(torch.stack([px for _, px in pending]))
        for (path, _), ids in zip(pending, run.caption_ids(grid, pooled), strict=True):
            out.captions.append((path, " ".join(run.tokenizer.decode(ids))))
        if progress:
            progress(len(pending))
        pending.clear()

    for path in files:
        try:
            pending.append((path, load_pixels(path, transform, run.device)))
        except DatasetError as exc:
            out.failures.append((str(path), str(exc).removeprefix(f"{path}: ")))
            continue
        if len(pending) == bs:
            flush()
    flush()
    out.seconds = time.perf_counter() - t0
    return out


def caption_saved_run(paths: list[str], run: str, results_dir: str | Path, *,
                      beam_size: int | None = None, max_len: int | None = None,
                      encoder_weights: str | Path | None = None) -> tuple[LoadedRun, CaptionResult]:
    """``capbench caption``: expand ``paths`` (files, folders, glob patterns;
    :func:`expand_paths`), load the saved run ``run`` (id, prefix/suffix, folder or 'latest'
    under ``results_dir``, with the decoding overrides and a moved ``encoder_weights`` file;
    :func:`benchmark.checkpoint.load_run`) and :func:`caption_files` the images.

    Returns:
        ``(loaded run, result)``; ``result.failures`` lists the paths that named no image
        first, then the files that could not be read.

    Raises:
        RecordError: the run or its checkpoint cannot be found or loaded (paths that name no
            image are failures, not errors).
    """
    files, failures = expand_paths(paths)
    loaded = load_run(run, results_dir, beam_size=beam_size, max_len=max_len,
                      encoder_weights=str(encoder_weights) if encoder_weights else None)
    res = caption_files(loaded, files)
    res.failures = failures + res.failures
    return loaded, res


def _features_for(run: LoadedRun, dataset, images, console=None):
    """Features of ``images`` from the feature cache: the whole dataset's store when a run on
    that dataset already wrote it (same key as the runner's), else ``images`` only."""
    feats = run.config.get("features") or {}
    cache_dir, decoder = feats.get("cache_dir"), run.image_decoder
    whole = open_store(store_folder(run.encoder, dataset.images, cache_dir, decoder, run.device),
                       [im.image_id for im in dataset.images])
    store = whole or load_or_extract(run.encoder, images, cache_dir=cache_dir,
                                     batch_size=int(feats.get("batch_size", 32)),
                                     device=run.device, num_workers=feats.get("num_workers"),
                                     image_decoder=decoder)
    store.stats = run.feature_stats
    return store


def evaluate_run(run: LoadedRun, dataset_spec: str, split: str = "test", *,
                 results_dir: str | Path = "results", console=None):
    """Score a saved model on split ``split`` of a dataset: cross-dataset transfer without
    retraining.

    Features come from the feature cache (:func:`benchmark.features.load_or_extract` with the
    rebuilt encoder), captions from :func:`benchmark.inference.caption_features` with the run's
    feature statistics and decoding settings, scores from
    :func:`benchmark.metrics.score_captions`. Writes a new run record whose ``dataset`` is the
    evaluated one, whose ``evaluation`` is ``{"of": source run id, "split", "trained_on": the
    source's dataset name}`` and whose ``config`` is the source run's with this evaluation's
    decoding settings; ``training`` is copied from the source record
    (:func:`benchmark.records.make_record` with ``source``).

    Args:
        run: the loaded run (:func:`benchmark.checkpoint.load_run`).
        dataset_spec: ``shapes``, ``shapes:N`` or a Karpathy dataset.json.
        split: ``train``, ``val`` or ``test``.
        results_dir: where the new record goes (its ``runs/``).
        console: a rich Console for progress bars (None: quiet).

    Returns:
        ``(record, path)``: the new :class:`~benchmark.records.RunRecord` and its file.

    Raises:
        RecordError: the run has no record (its training block is needed).
        DatasetError: a bad dataset or split.
    """
    source = run.record
    if source is None:
        raise RecordError(f"eval --run needs the run record of checkpoint {run.folder} (its "
                          "training block goes into the new record); pass --results-dir with the "
                          f"folder holding runs/{run.folder.name}.json")
    t0 = time.perf_counter()
    ds = resolve_dataset(dataset_spec)
    images = ds.split(split)
    if not images:
        raise DatasetError(f"{dataset_spec}: split {split!r} has no images")
    store = _features_for(run, ds, images, console)
    predictions, captions_per_s = caption_features(run.decoder, store, images, run.tokenizer,
                                                   run.decode, run.device)
    scores = score_captions(predictions, ds.references(split), images=ds.image_files(split),
                            options=MetricOptions.from_env(device=str(run.device)))
    feats = run.config.get("features") or {}
    n_tp = int(feats.get("throughput_images", 64) or len(images))
    _, images_per_s = caption_pixels(run.encoder, run.decoder, images[:n_tp], run.tokenizer,
                                     run.decode, run.device,
                                     batch_size=int(feats.get("batch_size", 32)),
                                     num_workers=feats.get("num_workers"), stats=run.feature_stats,
                                     image_decoder=run.image_decoder)
    cfg = {**source.config, "decode": {**source.config.get("decode", {}),
                                       **{k: getattr(run.decode, k) for k in ("beam_size", "max_len")}}}
    tp = source.throughput or {}
    record = make_record(
        run_id=new_run_id(source.arch, source.encoder, source.seed or 0), config=cfg,
        scored=ScoredSplit(ds, split, scores, predictions),
        model=RecordedModel(run.encoder, run.decoder, len(run.tokenizer),
                            checkpoint=str(Path(run.folder).resolve())),
        training=None,
        throughput=ThroughputBlock(
            train_samples_per_s=tp.get("train_samples_per_s"),
            train_tokens_per_s=tp.get("train_tokens_per_s"),
            inference_images_per_s=images_per_s, decoder_captions_per_s=captions_per_s,
            feature_extraction_images_per_s=store.extraction_images_per_s,
            feature_cache_hit=store.cache_hit, beam_size=run.decode.beam_size),
        device=run.device, started=t0, source=source)
    return record, write_record(record, results_dir)


def evaluate_saved_run(run: str, dataset_spec: str, split: str, results_dir: str | Path, *,
                       beam_size: int | None = None, max_len: int | None = None,
                       encoder_weights: str | Path | None = None, console=None):
    """``capbench eval --run RUN --dataset D``: load the saved run ``run`` (id, prefix/suffix,
    folder or 'latest'; :func:`benchmark.checkpoint.load_run` with the decoding overrides and
    a moved ``encoder_weights`` file) and :func:`evaluate_run` it on ``split`` of
    ``dataset_spec``. Returns ``(loaded run, record, record path)``. Raises CapbenchError for a
    split other than train/val/test (before loading), and what load_run and evaluate_run
    raise."""
    check_split(split)
    loaded = load_run(run, results_dir, beam_size=beam_size, max_len=max_len,
                      encoder_weights=str(encoder_weights) if encoder_weights else None)
    record, path = evaluate_run(loaded, dataset_spec, split, results_dir=results_dir, console=console)
    return loaded, record, path


def check_split(split: str) -> None:
    """Raise CapbenchError for a split name other than train/val/test."""
    if split not in ("train", "val", "test"):
        raise CapbenchError(f"--split {split!r}: choose train, val or test")
