"""The main job: dataset -> features -> decoder training -> captions -> metrics -> run record."""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors.torch import save_file

from architectures import create_encoder, get_entry
from benchmark.config import RunConfig, config_to_dict
from benchmark.data import CaptionDataset, load_karpathy
from benchmark.errors import ConfigError
from benchmark.features import FeatureStore, load_or_extract
from benchmark.inference import caption_features, caption_pixels
from benchmark.metrics import ptb_tokenize, score_captions
from benchmark.records import environment, git_commit, new_run_id, write_record
from benchmark.shapes import default_shapes_path
from benchmark.stats import bootstrap_ci, diversity
from benchmark.train import train_decoder
from benchmark.vocab import Vocabulary

__all__ = ["select_device", "seed_everything", "resolve_dataset", "build_decoder",
           "prepare_features", "run_experiment"]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is checked to exist (ConfigError)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dataset(spec: str) -> CaptionDataset:
    """``shapes`` / ``shapes:N`` (the embedded set of 600 or N images, generated on first use)
    or a Karpathy JSON/folder path."""
    if spec == "shapes" or spec.startswith("shapes:"):
        n = spec.partition(":")[2]
        if n and not n.isdigit():
            raise ConfigError(f"dataset {spec!r}: use shapes or shapes:N with N images (>= 10)")
        if n and int(n) < 10:
            raise ConfigError(f"dataset {spec!r}: shapes needs at least 10 images")
        return load_karpathy(default_shapes_path(int(n) if n else 600))
    return load_karpathy(spec)


KNOWN_HPARAMS = {"embed_dim", "hidden_dim", "attention_dim", "num_layers", "num_heads", "dropout",
                 "max_len", "attention_regularization"}


def resolve_decoder_hparams(arch: str, hparams: dict, *, strict: bool = True) -> dict:
    """The hyperparameters decoder ``arch`` takes, with its defaults filled in.

    Standard names it does not take (e.g. ``num_heads`` for an LSTM) are dropped, so one
    config serves every decoder; a nested mapping under a decoder's name (``transformer:
    {num_layers: 3}``) applies to that decoder only. With ``strict``, names no decoder knows
    raise ConfigError.
    """
    from architectures import list_decoders

    entry = get_entry("decoder", arch)
    names = set(list_decoders())
    per_arch = hparams.get(entry.name) or {}
    if not isinstance(per_arch, dict):
        raise ConfigError(f"decoder.{entry.name} should be a mapping of hyperparameters")
    hparams = {**{k: v for k, v in hparams.items() if k not in names}, **per_arch}
    fixed = {"vocab_size", "grid_dim", "pooled_dim"}
    accepted = {k: p.default for k, p in inspect.signature(entry.fn).parameters.items()
                if k not in fixed}
    unknown = set(hparams) - KNOWN_HPARAMS - set(accepted)
    if unknown and strict:
        raise ConfigError(f"decoder hyperparameter(s) {sorted(unknown)} unknown; "
                          f"{entry.name} takes {sorted(accepted)}")
    return {**accepted, **{k: v for k, v in hparams.items() if k in accepted}}


def build_decoder(arch: str, vocab_size: int, encoder, hparams: dict):
    """Build decoder ``arch`` for an encoder's feature dims (``grid_dim``/``pooled_dim``).

    Returns ``(decoder, resolved hyperparameters incl. defaults)``; raises ConfigError for a
    hyperparameter no decoder accepts.
    """
    resolved = resolve_decoder_hparams(arch, hparams)
    decoder = get_entry("decoder", arch).fn(vocab_size=vocab_size, grid_dim=encoder.grid_dim,
                                            pooled_dim=encoder.pooled_dim, **resolved)
    return decoder, resolved


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=console is None)


def prepare_features(cfg: RunConfig, dataset: CaptionDataset, device, console=None):
    """Build the encoder and return ``(encoder, FeatureStore)`` for every image of the dataset."""
    encoder = create_encoder(cfg.encoder, pretrained=cfg.pretrained and not cfg.weights,
                             weights=cfg.weights, init_seed=cfg.encoder_init_seed)
    with _progress(console) as prog:
        task = prog.add_task(f"features {encoder.name}", total=len(dataset.images), info="")
        store = load_or_extract(encoder, dataset.images, cache_dir=cfg.features.cache_dir,
                                batch_size=cfg.features.batch_size, device=device,
                                num_workers=cfg.features.num_workers,
                                progress=lambda n: prog.advance(task, n))
        prog.update(task, completed=len(dataset.images),
                    info="cache hit" if store.cache_hit
                    else f"{store.extraction_images_per_s:.1f} img/s")
    return encoder, store


def resolved_config(cfg: RunConfig) -> dict:
    """The config as stored in a record: canonical model names, decoder defaults filled in."""
    out = config_to_dict(cfg)
    out["arch"] = get_entry("decoder", cfg.arch).name
    out["encoder"] = get_entry("encoder", cfg.encoder).name
    out["decoder"] = resolve_decoder_hparams(out["arch"], cfg.decoder)
    return out


def config_id(resolved: dict) -> str:
    """Hash of a resolved config without seed, device and output folder: runs that differ only
    in seed share it, so the report can aggregate them (mean +- std)."""
    keep = {k: v for k, v in resolved.items() if k not in ("seed", "device", "results_dir", "name")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _parameter_counts(encoder, decoder) -> dict:
    enc_total = sum(p.numel() for p in encoder.parameters())
    enc_train = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    dec_total = sum(p.numel() for p in decoder.parameters())
    return {"decoder_trainable": decoder.num_parameters(), "decoder_total": dec_total,
            "encoder_total": enc_total, "encoder_trainable": enc_train,
            "trainable": decoder.num_parameters() + enc_train, "total": dec_total + enc_total}


def _peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": "process_max_rss", "bytes": int(rss_kib) * 1024}


def run_experiment(cfg: RunConfig, console: Console | None = None, *,
                   dataset: CaptionDataset | None = None,
                   prepared: tuple | None = None) -> tuple[dict, Path]:
    """Train and evaluate one (encoder, decoder) pair; write and return its run record.

    ``dataset``/``prepared`` (encoder, FeatureStore) let a caller (the matrix) share them.
    """
    t_start = time.perf_counter()
    device = select_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dataset = dataset or resolve_dataset(cfg.dataset)
    resolved = resolved_config(cfg)  # canonical names and decoder hyperparameters, once
    arch, enc_name = resolved["arch"], resolved["encoder"]
    encoder, store = prepared or prepare_features(cfg, dataset, device, console)
    seed_everything(cfg.seed)
    store = FeatureStore(store.grid, store.pooled, store.image_ids, store.key, store.path,
                         store.extraction_images_per_s, store.cache_hit)  # own normalisation
    train, val, test = dataset.split("train"), dataset.split("val"), dataset.split("test")
    vocab = Vocabulary.build((t for im in train for t in im.tokens), cfg.train.min_word_count)
    feature_stats = store.standardize(store.row_ids(train)) if cfg.features.normalize else None
    decoder, _ = build_decoder(arch, len(vocab), encoder, resolved["decoder"])
    val_refs = ptb_tokenize({im.image_id: list(im.captions) for im in val})
    if device.type == "cuda":
        store = store.to(device)

    with _progress(console) as prog:
        task = prog.add_task(f"train {arch}", total=cfg.train.epochs, info="")
        state = {"epoch": 0, "val": "-"}

        def callback(event, **info):
            if event == "epoch_start":
                state["epoch"] = info["epoch"]
            elif event == "step":
                prog.update(task, info=f"epoch {state['epoch']}/{cfg.train.epochs}  "
                            f"loss {info['loss']:.3f}  {info['tokens_per_s']:.0f} tok/s  "
                            f"val CIDEr-D {state['val']}")
            elif event == "epoch_end":
                if "val_CIDEr" in info:
                    state["val"] = f"{info['val_CIDEr']:.3f}"
                prog.advance(task)

        result = train_decoder(decoder, store, train, val, val_refs, vocab, cfg.train, device,
                               seed=cfg.seed, callback=callback)
    decoder.load_state_dict(result.best_state)
    predictions, captions_per_s = caption_features(decoder, store, test, vocab, cfg.decode, device)
    refs = dataset.references("test")
    scores = score_captions(predictions, refs)
    sample = test[: cfg.features.throughput_images] if cfg.features.throughput_images else test
    _, images_per_s = caption_pixels(encoder, decoder, sample, vocab, cfg.decode, device,
                                     batch_size=cfg.features.batch_size,
                                     num_workers=cfg.features.num_workers,
                                     stats=store.stats)
    run_id = new_run_id(arch, enc_name, cfg.seed)
    ckpt = Path(cfg.results_dir) / "checkpoints" / run_id
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.best_state.items()}, ckpt / "decoder.safetensors")
    if feature_stats:
        save_file({k: v.cpu().contiguous() for k, v in feature_stats.items()},
                  ckpt / "feature_stats.safetensors")
    vocab.save(ckpt / "vocab.json")
    (ckpt / "config.json").write_text(json.dumps(resolved, indent=1))
    by_id = {im.image_id: im for im in test}
    per_image = {"image_ids": scores.image_ids, **scores.per_image, "bleu_stats": scores.bleu_stats}
    train_captions = {" ".join(t) for im in train for t in im.tokens}
    record = {
        "schema_version": 1,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "arch": arch,
        "encoder": enc_name,
        "encoder_weights": encoder.weights_id,
        "pretrained": not encoder.weights_id.startswith("random-init"),
        "config": resolved,
        "config_id": config_id(resolved),
        "dataset": {"name": dataset.name, "path": str(dataset.source),
                    "split_fingerprint": dataset.fingerprint,
                    "splits": dataset.split_fingerprints(),
                    "sizes": {s: len(dataset.split(s)) for s in ("train", "val", "test")}},
        "seed": cfg.seed,
        "environment": environment(device),
        "vocab_size": len(vocab),
        "metrics": scores.metrics,
        "metrics_unavailable": scores.unavailable,
        "tokenizer": scores.tokenizer,
        "confidence_intervals": bootstrap_ci(per_image, n_resamples=1000, seed=0),
        "per_image": per_image,
        "diversity": diversity(list(predictions.values()), train_captions),
        "training": {"best_epoch": result.best_epoch, "best_val_CIDEr": result.best_val_cider,
                     "history": result.history, "steps": result.steps,
                     "train_seconds": result.train_seconds},
        "throughput": {
            "train_samples_per_s": result.samples_per_s,
            "train_tokens_per_s": result.tokens_per_s,
            "inference_images_per_s": images_per_s,
            "decoder_captions_per_s": captions_per_s,
            "feature_extraction_images_per_s": store.extraction_images_per_s,
            "feature_cache_hit": store.cache_hit,
            "beam_size": cfg.decode.beam_size,
        },
        "peak_memory": _peak_memory(device),
        "parameters": _parameter_counts(encoder, decoder),
        "checkpoint": str(ckpt),
        "wall_seconds": time.perf_counter() - t_start,
        "predictions": [{"image_id": i, "filename": by_id[i].filename, "caption": c}
                        for i, c in predictions.items()],
    }
    path = write_record(record, cfg.results_dir)
    return record, path
