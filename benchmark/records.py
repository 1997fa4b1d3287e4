"""Run records: the declared shape of a run's outcome, and its files.

A run writes one JSON file, ``<results_dir>/runs/<run_id>.json``, atomically. Its shape is
:class:`RunRecord` here and ``schemas/run_record.schema.json`` beside this module (JSON
Schema draft 2020-12, checked against every committed record by the tests). Every reader
(report, check, compare, matrix, the CLI) goes through :class:`RunRecord`; none indexes raw
dicts. ``schema_version`` is :data:`SCHEMA_VERSION`; records written by older versions of
capbench load with the fields they lack left empty.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark import distributed
from benchmark.config import config_id
from benchmark.device import peak_memory
from benchmark.errors import RecordError
from benchmark.fsutil import atomic_write_text, utc_timestamp
from benchmark.stats import bootstrap_ci, diversity
from benchmark.userfiles import field_type_problem, read_json

#: 2: the ``config`` block names the decoder ``decoder`` and its hyperparameters
#: ``decoder_hparams`` (version 1: ``arch`` and ``decoder``; read as version 2, see
#: :func:`config_with_new_names`)
SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "run_record.schema.json"
#: fields added after the first records were written: absent from a record while None
OPTIONAL_FIELDS = ("image_use", "evaluation", "grounding", "reference_model", "metric_sources",
                   "tuning")

_NUM, _NULL = (int, float), type(None)
#: the JSON types of the fields readers use, by dotted path (``*``: every value of an object
#: or item of a list); a record breaking one is unreadable (the board skips it with the reason)
FIELD_TYPES: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("schema_version", (int,)), ("created", (str,)), ("git_commit", (str, _NULL)),
    ("encoder_weights", (str,)), ("pretrained", (bool,)), ("config", (dict,)),
    ("config.decode", (dict, _NULL)), ("config_id", (str,)), ("seed", (int, _NULL)),
    ("environment", (dict,)), ("vocab_size", (int, _NULL)), ("metrics.*", (*_NUM, _NULL)),
    ("metrics_unavailable", (dict,)), ("metric_sources", (dict,)), ("tokenizer", (str,)),
    ("confidence_intervals.*", (list,)), ("confidence_intervals.*.*", _NUM),
    ("per_image", (dict,)), ("per_image.*", (list,)), ("diversity.*", (*_NUM, _NULL)),
    ("training", (dict,)), ("training.history", (list,)), ("training.history.*", (dict,)),
    ("training.tokenizer", (dict, _NULL)), ("training.tokenizer.vocab_size", (int, _NULL)),
    ("training.tokenizer.mean_tokens_per_caption", (*_NUM, _NULL)),
    ("training.encoder", (dict, _NULL)), ("throughput.*", (*_NUM, bool, _NULL)),
    ("peak_memory", (dict,)), ("parameters.*", (int, _NULL)), ("checkpoint", (str, _NULL)),
    ("wall_seconds", (*_NUM, _NULL)), ("predictions", (list,)), ("predictions.*", (dict,)),
    ("predictions.*.image_id", (*_NUM, str)), ("predictions.*.caption", (str,)),
    ("image_use", (dict, _NULL)), ("image_use.shuffle", (dict, _NULL)),
    ("image_use.shuffle.drop_ci", (list,)), ("image_use.shuffle.drop_ci.*", _NUM),
    ("image_use.vs_blind", (dict, _NULL)), ("image_use.baselines", (dict, _NULL)),
    ("image_use.baselines.*", (dict,)), ("image_use.baselines.*.metrics", (dict,)),
    ("image_use.baselines.*.metrics.*", (*_NUM, _NULL)), ("evaluation", (dict, _NULL)),
    ("grounding", (dict, _NULL)), ("grounding.pointing", (dict,)),
    ("grounding.pointing.*", (*_NUM, _NULL)), ("reference_model", (dict, _NULL)),
    ("tuning", (dict, _NULL)), ("tuning.params", (dict,)), ("tuning.value", (*_NUM, _NULL)),
)

__all__ = ["RunRecord", "DatasetInfo", "TrainingBlock", "ThroughputBlock", "ScoredSplit",
           "RecordedModel", "make_record", "parameter_counts", "find_record", "new_run_id",
           "write_record", "update_record", "load_records", "load_record", "git_commit", "environment",
           "SCHEMA_VERSION", "SCHEMA_PATH", "config_with_new_names", "config_with_old_names"]


@dataclass
class DatasetInfo:
    """Which data a run used: ``name``, ``path`` of its dataset.json, the ``split_fingerprint``
    (runs are comparable only when equal), per-split fingerprints and sizes."""

    name: str
    split_fingerprint: str
    path: str = ""
    splits: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, dataset, name: str | None = None) -> DatasetInfo:
        """The block of a :class:`~benchmark.data.CaptionDataset` (``name``: instead of the
        dataset's own name)."""
        return cls(name or dataset.name, dataset.fingerprint, str(dataset.source),
                   dataset.split_fingerprints(),
                   {s: len(dataset.split(s)) for s in ("train", "val", "test")})


@dataclass
class TrainingBlock:
    """A trained run's ``training`` block (made by
    :meth:`benchmark.train.TrainResult.record_block`).

    ``objective``: ``xe`` or ``xe+scst``; ``best_epoch``/``best_phase``: where the kept weights
    were taken, with their validation CIDEr-D ``best_val_CIDEr`` (in [0, 10]); ``history``: one
    dict per epoch; ``steps``: optimiser steps; ``train_seconds``: training time (validation
    excluded); ``stopped_early``: phase -> epoch; ``resumed_from``: last completed epoch read
    from a saved state (0 = a fresh start); ``encoder``: ``{"trainable", "trainable_parameters"}``
    (plus ``encoder_lr``, ``grad_checkpointing`` when fine-tuned); ``tokenizer``: ``{"kind",
    "vocab_size", "mean_tokens_per_caption"}``; ``scst_seconds``/``scst_captions_per_s``: only
    in an ``xe+scst`` record. Records written before a key existed lack it, so readers take
    ``RunRecord.training`` as a dict.
    """

    objective: str
    best_epoch: int
    best_phase: str
    best_val_CIDEr: float
    history: list[dict]
    steps: int
    train_seconds: float
    stopped_early: dict[str, int]
    resumed_from: int
    encoder: dict[str, Any]
    tokenizer: dict[str, Any]
    scst_seconds: float | None = None
    scst_captions_per_s: float | None = None

    def to_dict(self) -> dict:
        """The JSON form (key order as declared; no SCST keys for an ``xe`` run)."""
        out = dataclasses.asdict(self)
        if self.objective == "xe":
            out.pop("scst_seconds")
            out.pop("scst_captions_per_s")
        return out


@dataclass
class ThroughputBlock:
    """A record's ``throughput`` block: ``train_samples_per_s`` / ``train_tokens_per_s`` of
    the training steps (:class:`~benchmark.train.TrainResult`; an evaluation copies its
    source run's), ``inference_images_per_s`` end to end from image files
    (:func:`~benchmark.inference.caption_pixels`), ``decoder_captions_per_s`` from cached
    features (:func:`~benchmark.inference.caption_features`),
    ``feature_extraction_images_per_s`` (None on a cache hit) and ``feature_cache_hit`` of the
    feature store, and the ``beam_size`` the captions were decoded with."""

    train_samples_per_s: float | None
    train_tokens_per_s: float | None
    inference_images_per_s: float
    decoder_captions_per_s: float
    feature_extraction_images_per_s: float | None
    feature_cache_hit: bool
    beam_size: int

    def to_dict(self) -> dict:
        """The JSON form (key order as declared)."""
        return dataclasses.asdict(self)


@dataclass
class ScoredSplit:
    """Captions of split ``split`` of ``dataset`` (a :class:`~benchmark.data.CaptionDataset`):
    ``predictions`` ``{image_id: caption}`` in split order and their ``scores`` (a
    :class:`~benchmark.metrics.ScoreResult`)."""

    dataset: Any
    split: str
    scores: Any
    predictions: dict


@dataclass
class RecordedModel:
    """The model a record describes: its ``encoder`` (an
    :class:`~architectures.encoders.ImageEncoder`) and ``decoder``, the caption tokenizer's
    ``vocab_size``, the encoder parameters training updated (``encoder_trained``; None: those
    that require grad now, see :func:`parameter_counts`), its ``checkpoint`` folder (None:
    not saved) and, for a pretrained captioner scored as a reference row, its ``reference``
    block (the record's ``reference_model``)."""

    encoder: Any
    decoder: Any
    vocab_size: int
    encoder_trained: int | None = None
    checkpoint: str | None = None
    #: a pretrained captioner's ``reference_model`` block (:mod:`benchmark.hf_captioners`);
    #: None for capbench's own models
    reference: dict | None = None


@dataclass
class RunRecord:
    """One run of one (encoder, decoder) pair on one split: what it was and what it scored.

    Scores are pycocoevalcap's (``metrics``: BLEU/METEOR/ROUGE-L/SPICE in [0, 1], CIDEr-D in
    [0, 10]; None when unavailable, with the reason in ``metrics_unavailable``).
    ``confidence_intervals``: metric -> [low, high] bootstrap 95% interval. ``per_image``:
    ``image_ids``, per-image METEOR/ROUGE_L/CIDEr/SPICE lists and BLEU n-gram ``bleu_stats``.
    ``throughput``: ``train_tokens_per_s``, ``inference_images_per_s`` (from pixels),
    ``decoder_captions_per_s``, ... ``peak_memory``: ``{"kind", "bytes"}``.
    ``predictions``: ``[{image_id, filename, caption}]`` for the test split.
    """

    run_id: str
    arch: str
    encoder: str
    dataset: DatasetInfo
    metrics: dict[str, float | None]
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    git_commit: str | None = None
    encoder_weights: str = ""
    pretrained: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    config_id: str = ""
    seed: int | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None
    metrics_unavailable: dict[str, str] = field(default_factory=dict)
    #: per model-based metric (CLIP-S, ...): the package, model and weights it came from; None
    #: in records written before model-based metrics existed
    metric_sources: dict[str, str] | None = None
    tokenizer: str = ""
    confidence_intervals: dict[str, list[float]] = field(default_factory=dict)
    per_image: dict[str, list] = field(default_factory=dict)
    diversity: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    peak_memory: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    checkpoint: str | None = None
    wall_seconds: float | None = None
    predictions: list[dict] = field(default_factory=list)
    #: does the model use the image: shuffle test, baselines, test against the strongest blind
    #: baseline (benchmark.image_use); None in records written before it existed
    image_use: dict[str, Any] | None = None
    #: for a record written by ``capbench eval --run``: ``{"of": source run id, "split":
    #: evaluated split, "trained_on": source dataset name}``; None for a trained run
    evaluation: dict[str, Any] | None = None
    #: pointing game and energy in box on ``shapes`` (:mod:`benchmark.grounding`), written by
    #: ``capbench ground --save``; None when never measured
    grounding: dict[str, Any] | None = None
    #: a pretrained captioner scored by ``capbench eval --hf`` (a reference row, not trained
    #: here): model id, revision, class, parameters, decoding (benchmark.hf_captioners); None
    #: for capbench's own runs
    reference_model: dict[str, Any] | None = None
    #: a hyperparameter search's trial (scored on val) or the re-run of its best configuration
    #: (scored on test): study, storage, sampler, seed, pruner, budget, role, trial, split,
    #: objective, value, params (:func:`benchmark.tuning.tuning_block`); None otherwise
    tuning: dict[str, Any] | None = None
    #: where the record was read from (not stored in the file)
    path: str | None = field(default=None, compare=False, repr=False)

    @property
    def split_fingerprint(self) -> str:
        """The dataset's ``all`` split fingerprint."""
        return self.dataset.split_fingerprint

    @property
    def beam_size(self) -> int | None:
        """Beam size of the test captions (from the config)."""
        return (self.config.get("decode") or {}).get("beam_size")

    def to_dict(self) -> dict:
        """The JSON form (what :func:`write_record` stores); fields that older records lack
        are left out while empty, so a record reads back as it was written."""
        out = dataclasses.asdict(self)
        out.pop("path")
        if self.schema_version == 1:  # written back in the names of its version
            out["config"] = config_with_old_names(out["config"])
        for key in OPTIONAL_FIELDS:
            if out[key] is None:
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "record") -> RunRecord:
        """Read the JSON form; raises :class:`RecordError` naming ``source`` and the field
        when a required field (run_id, arch, encoder, dataset, metrics) is missing or
        malformed, or a field has the wrong type (see :func:`type_problem`)."""
        if not isinstance(data, dict):
            raise RecordError(f"{source} is not a capbench run record (expected a JSON object)")
        for key, kind in (("run_id", str), ("arch", str), ("encoder", str), ("dataset", dict),
                          ("metrics", dict)):
            if key not in data:
                raise RecordError(f"{source} is not a capbench run record: field {key!r} is missing")
            if not isinstance(data[key], kind):
                raise RecordError(f"{source}: field {key!r} should be a {kind.__name__}")
        ds = data["dataset"]
        if not isinstance(ds.get("split_fingerprint"), str) or not isinstance(ds.get("name"), str):
            raise RecordError(f"{source}: field 'dataset' needs 'name' and 'split_fingerprint' "
                              "(strings)")
        if why := type_problem(data):
            raise RecordError(f"{source}: {why}; fix the file or remove it")
        names = {f.name for f in dataclasses.fields(cls)} - {"path", "dataset"}
        kwargs = {k: v for k, v in data.items() if k in names}
        if isinstance(kwargs.get("config"), dict):  # every reader sees the new names
            kwargs["config"] = config_with_new_names(kwargs["config"])
        cfg = kwargs.get("config") or {}
        if kwargs.get("evaluation") is None and isinstance(cfg, dict) and cfg.get("eval_of"):
            # an `eval --run` record written before the evaluation field existed
            kwargs["evaluation"] = {"of": cfg["eval_of"], "split": cfg.get("eval_split", "test"),
                                    "trained_on": ""}
        info = DatasetInfo(**{k: v for k, v in ds.items()
                              if k in {f.name for f in dataclasses.fields(DatasetInfo)}})
        return cls(dataset=info, **kwargs)


#: the config keys of records (and checkpoints) written before the rename: ``arch`` named the
#: decoder and ``decoder`` held its hyperparameters
_NEW_NAMES = {"arch": "decoder", "decoder": "decoder_hparams"}
_OLD_NAMES = {v: k for k, v in _NEW_NAMES.items()}


def config_with_new_names(config: dict) -> dict:
    """A resolved config (a record's ``config`` block, a checkpoint's ``config.json``) in the
    current names: a version-1 block (``arch``: the decoder's name, ``decoder``: its
    hyperparameters) becomes ``decoder`` / ``decoder_hparams``, keys in place; a block
    already in the new names (or without these keys) is returned unchanged."""
    if "arch" not in config and not isinstance(config.get("decoder"), dict):
        return config
    return {_NEW_NAMES.get(k, k): v for k, v in config.items()}


def config_with_old_names(config: dict) -> dict:
    """The inverse of :func:`config_with_new_names`: ``decoder`` / ``decoder_hparams`` back
    to version 1's ``arch`` / ``decoder`` (how a version-1 record is written back)."""
    if "decoder_hparams" not in config:
        return config
    return {_OLD_NAMES.get(k, k): v for k, v in config.items()}


def type_problem(data: dict) -> str | None:
    """``field 'metrics.CIDEr' must be a number or null, got string 'high'`` for the first
    field of a record's JSON form whose type breaks :data:`FIELD_TYPES`, else None."""
    return field_type_problem(data, FIELD_TYPES)


def make_record(*, run_id: str, config: dict, scored: ScoredSplit, model: RecordedModel,
                training: TrainingBlock | None, throughput: ThroughputBlock, device,
                started: float, image_use: dict | None = None,
                source: RunRecord | None = None) -> RunRecord:
    """The record of a finished run, or with ``source``, of an evaluation of ``source``'s saved
    model on another dataset or split (``capbench eval --run``): the one writer of
    :class:`RunRecord`.

    A trained run (``source`` None) takes its decoder name, encoder and seed from ``config`` and
    its ``config_id`` is :func:`~benchmark.config.config_id` of it. An evaluation takes them, and
    its ``training`` block, from ``source``; its ``evaluation`` is ``{"of": source run id,
    "split", "trained_on": source dataset name}``, its config id includes the split (an
    evaluation is never folded with trained runs as a seed) and a val/train evaluation's dataset
    is named ``"<name> (<split> split)"`` (its own board group, never ranked with test-split
    runs).

    Args:
        run_id: the record's id (also its file name under ``runs/``).
        config: the resolved config (an evaluation's: the source's with its own decoding
            settings).
        scored: the captions and scores the record reports (:class:`ScoredSplit`), from which
            come the ``dataset`` block, ``metrics``, ``per_image``, the bootstrap 95%
            ``confidence_intervals`` (1000 resamples, seed 0,
            :func:`~benchmark.stats.bootstrap_ci`) and ``diversity`` against the dataset's
            training captions.
        model: ``encoder_weights``, ``parameters``, ``vocab_size`` and ``checkpoint``
            (:class:`RecordedModel`); with ``model.reference`` the record is a pretrained
            captioner's reference row: its name, encoder and seed come from ``config``, its
            ``training`` block is empty (nothing was trained here).
        training: the trained run's ``training`` block (:class:`TrainingBlock`; ignored with
            ``source``).
        throughput: tokens/s, images/s and captions/s, feature-extraction figures
            (:class:`ThroughputBlock`).
        device: the torch device, for ``environment`` and ``peak_memory`` (MB).
        started: :func:`time.perf_counter` at the start of the run (``wall_seconds``, in
            seconds, runs to the end of this call's statistics).
        image_use: the shuffled-features test and blind baselines, or None.
        source: the record of the evaluated run, or None for a trained run.

    Returns:
        The :class:`RunRecord` (not written: :func:`write_record` writes it).

    Raises:
        KeyError: ``config`` without ``encoder``, ``seed`` or the decoder's name (trained run).
    """
    dataset, split, scores = scored.dataset, scored.split, scored.scores
    ci = bootstrap_ci(scores.per_image_block(), n_resamples=1000, seed=0)
    div = diversity(list(scored.predictions.values()),
                    {" ".join(t) for im in dataset.split("train") for t in im.tokens})
    wall_seconds = time.perf_counter() - started
    reference = model.reference
    if reference is not None:  # a pretrained captioner: nothing trained here
        arch, encoder, seed = config["decoder"], config["encoder"], config["seed"]
        cid, evaluation, block = config_id(config), None, {}
    elif source is None:
        arch, encoder, seed = config["decoder"], config["encoder"], config["seed"]
        cid, evaluation, block = config_id(config), None, training.to_dict()
    else:
        arch, encoder, seed, block = source.arch, source.encoder, source.seed, source.training
        cid = config_id({**config, "evaluation_split": split})
        evaluation = {"of": source.run_id, "split": split, "trained_on": source.dataset.name}
    by_id = {im.image_id: im for im in dataset.split(split)}
    weights = model.encoder.weights_id
    return RunRecord(
        run_id=run_id, created=utc_timestamp(), git_commit=git_commit(), arch=arch,
        encoder=encoder, encoder_weights=weights, pretrained=not weights.startswith("random-init"),
        config=config, config_id=cid,
        dataset=DatasetInfo.of(dataset, None if split == "test" else
                               f"{dataset.name} ({split} split)"),
        seed=seed, environment=environment(device), vocab_size=model.vocab_size,
        metrics=scores.metrics, metrics_unavailable=scores.unavailable,
        metric_sources=scores.sources, tokenizer=scores.tokenizer,
        confidence_intervals=ci, per_image=scores.per_image_block(), diversity=div,
        training=block, throughput=throughput.to_dict(), peak_memory=peak_memory(device),
        parameters=parameter_counts(model.encoder, model.decoder, model.encoder_trained),
        checkpoint=model.checkpoint, wall_seconds=wall_seconds,
        predictions=[{"image_id": i, "filename": by_id[i].filename, "caption": c}
                     for i, c in scored.predictions.items()],
        image_use=image_use, evaluation=evaluation, reference_model=reference,
    )


def parameter_counts(encoder, decoder, encoder_trained: int | None = None) -> dict:
    """The record's ``parameters``: total and trainable parameters of the encoder, the decoder
    and both; ``encoder_trained``: the encoder parameters training updated (when fine-tuned;
    the encoder is frozen again afterwards), else those that require grad now."""
    enc_total = sum(p.numel() for p in encoder.parameters())
    enc_train = encoder_trained if encoder_trained is not None else \
        sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    dec_total = sum(p.numel() for p in decoder.parameters())
    return {"decoder_trainable": decoder.num_parameters(), "decoder_total": dec_total,
            "encoder_total": enc_total, "encoder_trainable": enc_train,
            "trainable": decoder.num_parameters() + enc_train, "total": dec_total + enc_total}


def new_run_id(arch: str, encoder: str, seed: int) -> str:
    """``YYYYmmdd-HHMMSS-<arch>-<encoder>-s<seed>-<4 hex>``: sortable and unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{arch}-{encoder}-s{seed}-{secrets.token_hex(2)}"


def git_commit(path: Path | None = None) -> str | None:
    """The current git commit of the capbench checkout (``+dirty`` if modified), or None."""
    root = path or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device) -> dict:
    """Versions and hardware that shape the numbers of a run."""
    import torch


    name = str(device)
    gpu = {}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "gpu_count": torch.cuda.device_count()}
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": distributed.world_size(),
        **gpu,
    }


def write_record(record: RunRecord, results_dir: str | Path) -> Path:
    """Write ``record`` to ``<results_dir>/runs/<run_id>.json`` atomically; return the path."""
    path = Path(results_dir) / "runs" / f"{record.run_id}.json"
    atomic_write_text(path, json.dumps(record.to_dict(), indent=1, default=str))
    record.path = str(path)
    return path


def update_record(record: RunRecord, **fields) -> Path:
    """Set ``fields`` on ``record`` and rewrite its file (``record.path``) atomically.

    Raises RecordError when the record was not read from a file or a field is unknown."""
    if not record.path:
        raise RecordError(f"run {record.run_id}: the record was not read from a file; nothing "
                          "to update")
    unknown = set(fields) - {f.name for f in dataclasses.fields(RunRecord)} - {"path"}
    if unknown:
        raise RecordError(f"run record has no field {sorted(unknown)[0]!r}")
    for k, v in fields.items():
        setattr(record, k, v)
    path = Path(record.path)
    atomic_write_text(path, json.dumps(record.to_dict(), indent=1, default=str))
    return path


def load_record(path: str | Path) -> RunRecord:
    """Read one record (raises :class:`RecordError` naming the file and what is wrong)."""
    path = Path(path)
    data = read_json(path, "run record", RecordError)
    rec = RunRecord.from_dict(data, str(path))
    rec.path = str(path)
    return rec


def load_records(results_dir: str | Path) -> tuple[list[RunRecord], list[str]]:
    """All records under ``<results_dir>/runs``, and the problems with unreadable ones.

    Args:
        results_dir: a results folder (its ``runs/*.json``, read in file-name order; a missing
            folder gives no records).

    Returns:
        ``(records, problems)``: the :class:`RunRecord` of every readable file, and one message
        per file that is not a valid record (:func:`load_record`'s RecordError text).
    """
    folder = Path(results_dir) / "runs"
    records, problems = [], []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(load_record(p))
        except RecordError as exc:
            problems.append(str(exc))
    return records, problems


def find_record(ref: str, results_dir: str | Path) -> RunRecord:
    """A record by path, exact run id, or unique prefix/suffix of a run id in ``results_dir``.

    Raises RecordError when nothing or more than one record matches.
    """
    p = Path(ref)
    if p.suffix == ".json" and p.is_file():
        return load_record(p)
    folder = Path(results_dir) / "runs"
    exact = folder / f"{ref}.json"
    if exact.is_file():
        return load_record(exact)
    hits = [x for x in folder.glob("*.json") if x.stem.startswith(ref) or x.stem.endswith(ref)]
    if len(hits) == 1:
        return load_record(hits[0])
    if not hits:
        raise RecordError(f"no run record matches {ref!r} in {folder} (see `capbench report`)")
    raise RecordError(f"{ref!r} matches {len(hits)} records in {folder}; give more of the run id")
