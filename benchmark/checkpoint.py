"""A finished run's checkpoint, both ways: saving it beside its record, and loading it back
into memory (encoder, decoder, vocabulary, feature statistics).

A run's checkpoint folder ``<results_dir>/checkpoints/<run_id>/`` (written by
:func:`save_run`, through :func:`save_checkpoint`) holds ``decoder.safetensors``,
``feature_stats.safetensors`` (the z-score statistics of the train split the decoder was
trained with, :class:`~benchmark.features.FeatureStats`), ``vocab.json`` (or
``tokenizer.json``), ``config.json`` (the resolved config), for a fine-tuned encoder
``encoder_finetuned.safetensors`` (its trained part) and, for runs made since it existed,
``encoder.json`` (the encoder's :meth:`~architectures.encoders.ImageEncoder.cache_identity`).

:func:`load_run` rebuilds the frozen encoder from ``config.json`` (name, pretrained, weights,
``encoder_init_seed``) and refuses to go on when the rebuilt encoder is not the one the
decoder was trained on: its identity (name, weights id, preprocessing) must equal
``encoder.json``, or for older checkpoints the record's ``encoder`` / ``encoder_weights``.
A decoder fed another encoder's features still produces fluent captions, just wrong ones,
so this check is the difference between an error and silently bad numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from architectures import ArchitectureError, create_decoder, create_encoder
from benchmark.config import RunConfig, apply_overrides, check_ranges
from benchmark.decoding import DecodeConfig, decode
from benchmark.errors import CapbenchError, CapbenchWarning, RecordError, StorageError
from benchmark.features import FeatureStats, storage_precision
from benchmark.fsutil import temp_prefix
from benchmark.paths import cache_root
from benchmark.pixels import check_image_decoder, tensor_transform
from benchmark.records import RunRecord, config_with_new_names, find_record, load_records, write_record
from benchmark.tokenization import load_tokenizer
from benchmark.userfiles import field_type_problem, read_json
from benchmark.vocab import CaptionTokenizer

__all__ = ["CheckpointError", "Checkpoint", "LoadedRun", "load_run", "resolve_run",
           "round_like_cache", "save_checkpoint", "save_run"]

REQUIRED_FILES = ("config.json", "decoder.safetensors")
#: one of these holds the caption tokenizer (word vocabulary or Hugging Face tokenizer)
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
#: JSON types of the config.json fields a checkpoint is rebuilt from (see field_type_problem)
CONFIG_TYPES = (("decoder", (str,)), ("encoder", (str,)), ("decoder_hparams", (dict,)),
                ("decode", (dict,)),
                ("features", (dict, type(None))), ("features.normalize", (bool,)),
                ("weights", (str, type(None))), ("pretrained", (bool,)),
                ("encoder_init_seed", (int,)), ("encoder_trainable", (str,)),
                ("tokenizer", (str,)))


class CheckpointError(CapbenchError):
    """A checkpoint folder is missing, incomplete, unreadable, or its encoder cannot be
    rebuilt identically (the message names the folder, what differs and what to do)."""


def round_like_cache(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the feature cache stores it (:func:`benchmark.features.storage_precision`:
    float16, or unchanged when a value would overflow float16), returned as float32.

    A run's test captions come from cached (float16) features; captioning from pixels with the
    same rounding reproduces them exactly. Any shape; returns float32 of the same shape.
    """
    return storage_precision(t).float()


@dataclass
class LoadedRun:
    """A trained run ready to caption pixels.

    ``encoder``: the frozen :class:`~architectures.encoders.ImageEncoder` (eval mode), mapping
    pixels ``(B, 3, H, W)`` to ``grid (B, N, D)`` and ``pooled (B, P)``. ``decoder``: the
    :class:`~architectures.decoders.base.CaptionDecoder` in eval mode. ``feature_stats``:
    ``grid_mean/grid_std (D,)`` and ``pooled_mean/pooled_std (P,)``
    (:class:`~benchmark.features.FeatureStats`; None when the run did not normalise).
    ``decode``: the run's decoding settings with any override applied. ``record``: the run
    record when one was found (None for a bare checkpoint folder).
    """

    run_id: str
    folder: Path
    config: dict
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    tokenizer: CaptionTokenizer
    feature_stats: FeatureStats | None
    decode: DecodeConfig
    record: RunRecord | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    load_seconds: float = 0.0

    @property
    def arch(self) -> str:
        """The decoder's registered name (``attn_lstm``, ``transformer``, ...)."""
        return self.config["decoder"]

    @property
    def image_decoder(self) -> str:
        """How the run's features were made from image files: ``pil`` (the default) or
        ``torchvision`` (:mod:`benchmark.pixels`)."""
        return (self.config.get("features") or {}).get("image_decoder", "pil")

    def preprocess(self, image) -> torch.Tensor:
        """An RGB PIL ``image`` -> pixels ``float32 (3, H, W)`` as the run's features were
        preprocessed: the encoder library's transform, or for an ``image_decoder:
        torchvision`` run its tensor version (:func:`benchmark.pixels.tensor_transform`).
        Raises ConfigError when that cannot run here."""
        if self.image_decoder == "pil":
            return self.encoder.transform(image)
        from torchvision.transforms.functional import pil_to_tensor


        check_image_decoder(self.image_decoder, self.encoder.transform)
        return tensor_transform(self.encoder.transform)([pil_to_tensor(image)])[0]

    def normalize(self, grid: torch.Tensor, pooled: torch.Tensor):
        """Z-score raw features with the run's train statistics, exactly as
        :meth:`benchmark.features.FeatureStore.rows` does: ``grid (B, N, D)``, ``pooled (B, P)``
        -> float32 tensors of the same shapes. Differentiable (Grad-CAM runs through it)."""
        grid, pooled = grid.float(), pooled.float()
        if self.feature_stats is None:
            return grid, pooled
        return self.feature_stats.normalize(grid, pooled)

    @torch.inference_mode()
    def raw_features(self, pixels: torch.Tensor):
        """The encoder's features of preprocessed ``pixels (B, 3, H, W)``, rounded like the
        feature cache (:func:`round_like_cache`): ``(grid (B, N, D), pooled (B, P))`` float32."""
        grid, pooled = self.encoder(pixels.to(self.device))
        return round_like_cache(grid), round_like_cache(pooled)

    @torch.inference_mode()
    def caption_ids(self, grid: torch.Tensor, pooled: torch.Tensor) -> list[list[int]]:
        """Word ids (no ``<bos>``/``<eos>``) of the run's decoding (:attr:`decode`) of raw
        features ``grid (B, N, D)``, ``pooled (B, P)`` (normalised here)."""
        g, p = self.normalize(grid, pooled)
        return decode(self.decoder, g, p, self.decode, self.tokenizer)


def _newest(results_dir: Path) -> RunRecord:
    records, _ = load_records(results_dir)
    if not records:
        raise RecordError(f"--run latest: no run record in {Path(results_dir) / 'runs'} "
                          "(train one with `capbench run`, or pass --results-dir)")
    trained = [r for r in records if r.evaluation is None]  # not eval --run records
    return max(trained or records, key=lambda r: (r.created, r.run_id))


def _checkpoint_of(record: RunRecord, results_dir: Path) -> Path:
    """The record's checkpoint folder; when the stored path is stale (the results folder was
    moved, or the path was relative to another working directory) the folder is looked for
    beside the record, then under ``results_dir``."""
    if record.reference_model:  # written by `capbench eval --hf`: nothing of capbench's to load
        model = record.reference_model.get("model_id", record.encoder)
        raise CheckpointError(f"run {record.run_id} is a reference row: the pretrained captioner "
                              f"{model} scored by `capbench eval --hf`, which has no capbench "
                              "checkpoint (decoder, tokenizer, feature statistics) to caption, "
                              f"explain or re-evaluate with; score it on another dataset with "
                              f"`capbench eval --hf {model} --dataset D`")
    tried = []
    candidates = []
    if record.checkpoint:
        candidates.append(Path(record.checkpoint))
    if record.path:
        candidates.append(Path(record.path).resolve().parent.parent / "checkpoints" / record.run_id)
    candidates.append(Path(results_dir) / "checkpoints" / record.run_id)
    if record.evaluation:  # an eval --run record points at its trained run's folder
        candidates.append(Path(results_dir) / "checkpoints" / str(record.evaluation["of"]))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
        tried.append(str(c))
    if not record.checkpoint:
        raise CheckpointError(f"run {record.run_id} has no checkpoint (its record stores none); "
                              "re-run it with `capbench run` to get one")
    raise CheckpointError(f"the checkpoint of run {record.run_id} is not found (looked in "
                          f"{', '.join(dict.fromkeys(tried))}); copy its checkpoint folder back "
                          "or pass the folder itself as --run")


def resolve_run(ref: str, results_dir: str | Path = "results") -> tuple[Path, RunRecord | None]:
    """``(checkpoint folder, record or None)`` for a run reference: ``latest`` (the newest
    record in ``results_dir``), a checkpoint folder, a record path, or a run id / unique
    prefix or suffix of one (:func:`benchmark.records.find_record`).

    Raises RecordError when no record or several match, CheckpointError when the record's
    checkpoint cannot be found.
    """
    results_dir = Path(results_dir)
    p = Path(ref)
    if p.is_dir() and (p / "config.json").is_file():
        record = None
        for runs in (p.resolve().parent.parent / "runs", results_dir / "runs"):
            if (runs / f"{p.name}.json").is_file():
                record = find_record(str(runs / f"{p.name}.json"), results_dir)
                break
        return p, record
    if p.is_dir():
        raise CheckpointError(f"--run {ref}: folder has no config.json; a checkpoint folder "
                              f"holds {', '.join(REQUIRED_FILES)} (see <results-dir>/checkpoints/)")
    record = _newest(results_dir) if ref == "latest" else find_record(ref, results_dir)
    return _checkpoint_of(record, results_dir), record


def _read_json(path: Path, what: str):
    return read_json(path, what, CheckpointError)


def _check_config(config, path: Path) -> None:
    """Raise CheckpointError naming ``path`` and the field when the checkpoint's config.json is
    not an object, lacks a field :func:`load_run` needs, or has one of the wrong type."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object (the run's config); not a capbench "
                              "checkpoint")
    for key in ("decoder", "encoder", "decoder_hparams", "decode"):
        if key not in config:
            raise CheckpointError(f"{path} lacks {key!r}: not a capbench checkpoint")
    if why := field_type_problem(config, CONFIG_TYPES):
        raise CheckpointError(f"{path}: {why}; the checkpoint's config was edited: restore it or "
                              "re-run the training")


def _check_stats(stats: FeatureStats, encoder, path: Path) -> None:
    """Raise CheckpointError naming ``path`` unless ``stats`` holds the four float vectors the
    features are z-scored with, each as long as the encoder's feature dimension."""
    if why := stats.problem(encoder.grid_dim, encoder.pooled_dim, encoder.name):
        raise CheckpointError(f"{path}: {why}; re-run the training")


def _load_tensors(path: Path, what: str, read=lambda p: load_file(str(p))):
    """``read(path)`` (by default the safetensors file's tensors); CheckpointError naming
    ``what`` and ``path`` when it cannot be read."""
    try:
        return read(path)
    except Exception as exc:  # truncated or foreign file
        raise CheckpointError(f"cannot read the {what} {path}: {exc}; the checkpoint is "
                              "damaged: re-run the training") from exc


def _build_encoder(config: dict, folder: Path, weights_override: str | None):
    weights = weights_override or config.get("weights")
    try:
        return create_encoder(config["encoder"],
                              pretrained=bool(config.get("pretrained")) and not weights,
                              weights=weights, init_seed=int(config.get("encoder_init_seed", 0)))
    except ArchitectureError as exc:
        hint = ("pass --encoder-weights PATH to the same weights file the run used"
                if weights else "make the pretrained weights available (see `capbench doctor`)")
        raise CheckpointError(f"cannot rebuild the encoder of checkpoint {folder}: {exc}. The "
                              f"decoder only works on that encoder's features: {hint}") from exc


def _check_identity(encoder, folder: Path, record: RunRecord | None) -> None:
    """Raise CheckpointError when the rebuilt encoder is not the trained-on one."""
    have = encoder.cache_identity()
    saved = folder / "encoder.json"
    if saved.is_file():
        want = _read_json(saved, "encoder identity")
        source = str(saved)
    elif record is not None:
        want = {"encoder": record.encoder, "weights": record.encoder_weights}
        source = f"run record {record.path or record.run_id} (checkpoint predates encoder.json)"
    else:
        warnings.warn(f"{folder} has no encoder.json and no run record was found: cannot verify "
                      f"that the rebuilt encoder ({have['encoder']}, {have['weights']}) is the one "
                      "the decoder was trained on", CapbenchWarning, stacklevel=3)
        return
    diffs = [f"{k}: trained with {want[k]!r}, rebuilt {have.get(k)!r}"
             for k in ("encoder", "weights", "preprocessing") if k in want and want[k] != have.get(k)]
    if diffs:
        what = "; ".join(diffs)
        hint = ("give the weights file the run was trained with (--encoder-weights PATH)"
                if any(d.startswith("weights") for d in diffs) else
                "install the library versions of the run (its record's `environment`), whose "
                "preprocessing the decoder was trained with")
        raise CheckpointError(f"the encoder rebuilt for checkpoint {folder} differs from the one "
                              f"its decoder was trained on ({source}): {what}. Its features would "
                              f"not match: {hint}")


def load_run(ref: str, results_dir: str | Path = "results", *, beam_size: int | None = None,
             max_len: int | None = None, encoder_weights: str | None = None,
             device: str | torch.device = "cpu") -> LoadedRun:
    """Load run ``ref`` for inference.

    The encoder is rebuilt from ``config.json`` and checked against ``encoder.json`` (or the
    record); the decoder is built with ``architectures.create_decoder(name, len(tokenizer),
    encoder.grid_dim, encoder.pooled_dim, hyperparameters)`` and its weights loaded strictly.
    Everything is put in eval mode on ``device``.

    Args:
        ref: a run id, a unique prefix/suffix of one, a checkpoint folder, or ``latest``
            (:func:`resolve_run`).
        results_dir: the folder holding ``runs/`` and ``checkpoints/``.
        beam_size: overrides the run's beam size (range-checked).
        max_len: overrides the run's maximum caption length (words, range-checked).
        encoder_weights: replaces the run's ``weights`` path (a moved file; its digest must
            still match).
        device: where the models are put.

    Returns:
        :class:`LoadedRun`: encoder, decoder, tokenizer, feature statistics and decoding
        settings.

    Raises:
        RecordError: no record, or an ambiguous ``ref``.
        CheckpointError: missing or damaged files, an encoder that cannot be rebuilt or differs
            from the trained-on one, weights that do not fit the decoder.
        ConfigError: an override out of range.
    """
    import time


    t0 = time.perf_counter()
    folder, record = resolve_run(ref, results_dir)
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {', '.join(missing)} missing "
                              "(a run killed while saving?); re-run the training")
    config = _read_json(folder / "config.json", "checkpoint config")
    if isinstance(config, dict):  # a checkpoint saved before the rename: arch, decoder
        config = config_with_new_names(config)
    _check_config(config, folder / "config.json")
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the tokenizer of checkpoint {folder}: {exc}") from exc
    stats = None
    if (folder / "feature_stats.safetensors").is_file():
        stats = _load_tensors(folder / "feature_stats.safetensors", "feature statistics",
                              FeatureStats.load)
    elif (config.get("features") or {}).get("normalize", True):
        raise CheckpointError(f"checkpoint {folder} lacks feature_stats.safetensors although the "
                              "run normalised its features; the decoder cannot be fed correctly: "
                              "re-run the training")
    device = torch.device(device)
    encoder = _build_encoder(config, folder, encoder_weights)
    if stats is not None:
        _check_stats(stats, encoder, folder / "feature_stats.safetensors")
    finetuned = folder / "encoder_finetuned.safetensors"
    if finetuned.is_file():  # a fine-tuned run: its encoder part on top of the base weights
        try:
            encoder.apply_finetuned(_load_tensors(finetuned, "fine-tuned encoder weights"),
                                    str(config.get("encoder_trainable", "last")))
        except RuntimeError as exc:
            raise CheckpointError(f"{finetuned} does not fit encoder {encoder.name}: {exc}") from exc
    _check_identity(encoder, folder, record)
    try:
        decoder = create_decoder(config["decoder"], len(tokenizer), encoder.grid_dim,
                                 encoder.pooled_dim, config["decoder_hparams"])
    except ArchitectureError as exc:
        raise CheckpointError(f"cannot build the decoder of checkpoint {folder}: {exc}") from exc
    state = _load_tensors(folder / "decoder.safetensors", "decoder weights")
    try:
        decoder.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"decoder.safetensors in {folder} does not fit a {config['decoder']} "
                              f"decoder for {encoder.name} features and {len(tokenizer)} words: "
                              f"{str(exc).splitlines()[0]}") from exc
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    # through the config's own type and range checks, naming config.json and the key
    dcfg = apply_overrides(RunConfig(), {f"decode.{k}": v for k, v in config["decode"].items()
                                         if k in known}, str(folder / "config.json")).decode
    if beam_size is not None:
        dcfg.beam_size = beam_size
    if max_len is not None:
        dcfg.max_len = max_len
    check_ranges(dcfg, "command line", "decode.")
    run_id = record.run_id if record is not None else folder.name
    return LoadedRun(run_id, folder, config, encoder.to(device).eval(),
                     decoder.to(device).eval(), tokenizer, stats, dcfg, record, device,
                     time.perf_counter() - t0)


@dataclass
class Checkpoint:
    """What a run's checkpoint folder holds (see the module docstring): the resolved
    ``config``, the decoder's weights ``decoder_state``, the caption tokenizer ``tokenizer``, the
    encoder's ``encoder_identity`` (name, weights id, preprocessing: what rebuilding it must
    reproduce), the ``feature_stats`` (None when the run did not normalise) and, for a
    fine-tuned encoder, its trained part ``encoder_finetuned`` (empty otherwise)."""

    config: dict
    decoder_state: dict[str, torch.Tensor]
    tokenizer: CaptionTokenizer
    encoder_identity: dict
    feature_stats: FeatureStats | None = None
    encoder_finetuned: dict[str, torch.Tensor] = field(default_factory=dict)


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` into ``folder`` (created): the files :func:`load_run` reads.
    Raises OSError or SafetensorError when a write fails."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.json").write_text(json.dumps(checkpoint.encoder_identity, indent=1))
    save_file({k: v.contiguous() for k, v in checkpoint.decoder_state.items()},
              folder / "decoder.safetensors")
    if checkpoint.encoder_finetuned:  # the fine-tuned part, on top of the base weights
        save_file({k: v.contiguous() for k, v in checkpoint.encoder_finetuned.items()},
                  folder / "encoder_finetuned.safetensors")
    if checkpoint.feature_stats is not None:
        checkpoint.feature_stats.save(folder / "feature_stats.safetensors")
    checkpoint.tokenizer.save_to(folder)
    (folder / "config.json").write_text(json.dumps(checkpoint.config, indent=1))


def _fallback_bases() -> list[Path]:
    """Where a run goes when its results folder fails: the cache, the user's own temp folder,
    the home folder."""
    user = os.environ.get("USER") or str(os.getuid())
    return [cache_root() / "unsaved-runs", Path(tempfile.gettempdir()) / f"capbench-unsaved-{user}",
            Path.home() / "capbench-unsaved-runs"]


def save_run(record: RunRecord, checkpoint: Checkpoint, results_dir: Path) -> Path:
    """Write the checkpoint (into ``record.checkpoint``) and then the record
    (:func:`~benchmark.records.write_record`); return the record's path. A checkpoint folder
    appears only together with its record (it is written under a temp name and renamed last).

    If a write fails (read-only or full disk), or the run id has a record or checkpoint
    already, both go to a fallback folder and StorageError says where, so the run is never
    lost; a record this process did not write is never replaced or removed.
    """
    final = Path(record.checkpoint)
    tmp = final.parent / f"{temp_prefix(final.name)}ckpt.tmp"
    target, path = Path(results_dir) / "runs" / f"{record.run_id}.json", None
    try:
        if target.exists() or final.exists():  # never write over (or remove) another's run
            raise FileExistsError(f"run {record.run_id} has a record or checkpoint there already")
        save_checkpoint(tmp, checkpoint)
        path = write_record(record, results_dir)
        os.replace(tmp, final)
        return path
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if path is not None:  # only the record this process wrote
            path.unlink(missing_ok=True)
        raise StorageError(_save_elsewhere(record, checkpoint, results_dir, exc)) from exc


def _save_elsewhere(record: RunRecord, checkpoint: Checkpoint, results_dir: Path,
                    cause: Exception) -> str:
    """Save the record (and, if there is room, the checkpoint) in the first fallback folder
    that takes them; return the message that says where. As a last resort the record's JSON
    goes to stderr, so even then the scores are not lost."""
    head = f"could not write the run's outputs under {results_dir} ({cause})."
    for base in _fallback_bases():
        spare = base / record.run_id
        try:
            spare.mkdir(parents=True, exist_ok=True, mode=0o700)
            record.checkpoint = None
            saved = write_record(record, spare)  # the record first: it is small
            try:
                save_checkpoint(spare / "checkpoint", checkpoint)
                record.checkpoint = str(spare / "checkpoint")
                saved = write_record(record, spare)
                ckpt = f" and the checkpoint at {record.checkpoint}"
            except (OSError, SafetensorError):
                ckpt = " (no room for the checkpoint)"
        except (OSError, SafetensorError):
            continue
        return (f"{head} Nothing is lost: the record is at {saved}{ckpt}. Copy the record into "
                "<results-dir>/runs/ once the folder is writable.")
    sys.stderr.write(json.dumps(record.to_dict(), default=str) + "\n")
    return f"{head} No folder could take the record either; its JSON was written to stderr above."
