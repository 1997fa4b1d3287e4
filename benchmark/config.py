"""Run configuration: defaults < preset YAML (``configs/NAME.yaml`` or a path) < CLI flags.

Unknown keys and wrong types raise :class:`ConfigError` naming the file and the key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from architectures import get_entry, validate_decoder
from architectures.encoders import grad_checkpointing_unsupported
from benchmark.decoding import DecodeConfig
from benchmark.device import select_device
from benchmark.errors import ConfigError
from benchmark.tokenization import check_tokenizer_spec
from benchmark.tracking import check_tracker
from benchmark.userfiles import quote, read_yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

__all__ = ["RunConfig", "TrainConfig", "FeatureConfig", "load_config", "config_to_dict",
           "CONFIG_DIR", "preset_or_path", "resolve_config_path", "read_config_file", "resolved_config",
           "config_id",
           "apply_overrides", "check_ranges", "check_seeds", "parse_seeds", "MAX_SEED", "MAX_EPOCHS",
           "MAX_BATCH", "translate_old_names"]


#: numpy's and PyTorch's seeds are 32-bit (``np.random.seed`` refuses more)
MAX_SEED = 2**32 - 1
#: epochs of one phase (cross-entropy or SCST); far beyond any captioning schedule
MAX_EPOCHS = 10_000
#: images or captions per batch
MAX_BATCH = 65_536


def _r(default, **bounds):
    """A dataclass field with its allowed range in ``metadata`` (min, max, min_exclusive,
    choices), checked by :func:`check_ranges`."""
    return field(default=default, metadata=bounds)


@dataclass
class TrainConfig:
    """Harness settings shared by every decoder (teacher forcing, masked cross-entropy).

    ``lr`` peak AdamW learning rate; linear warmup over ``warmup_frac`` of the steps, then
    cosine decay to 0; ``grad_clip`` max global L2 norm (0 = off); ``max_caption_len`` tokens
    of the run's tokenizer kept per training caption (words for the word vocabulary);
    ``min_word_count`` vocabulary threshold (train split only);
    ``val_every`` validate every N epochs (and after the last).

    ``patience``: early stopping, counted in validations without a new best validation
    CIDEr-D (0 = off), separately for the cross-entropy and the SCST phase.
    ``scst_epochs``: epochs of self-critical sequence training after the cross-entropy
    epochs (Rennie et al. 2017; 0 = cross-entropy only), with ``scst_samples`` sampled
    captions per image, the "new self-critical" baseline (Luo 2020) and a constant
    ``scst_lr``. ``compile``: run the cross-entropy steps on cached features through
    ``torch.compile`` (batches padded to the full caption length so that it compiles once;
    ``dynamic=True`` for the shorter last batch; ``capbench bench decoders --compile`` measures the
    speedup).
    """

    epochs: int = _r(10, min=1, max=MAX_EPOCHS)
    batch_size: int = _r(64, min=1, max=MAX_BATCH)
    lr: float = _r(5e-4, min_exclusive=0.0)
    weight_decay: float = _r(0.01, min=0.0)
    warmup_frac: float = _r(0.05, min=0.0, max=1.0)
    grad_clip: float = _r(5.0, min=0.0)
    label_smoothing: float = _r(0.0, min=0.0, max_exclusive=1.0)
    max_caption_len: int = _r(20, min=1, max=1024)
    min_word_count: int = _r(2, min=1, max=1_000_000)
    val_every: int = _r(1, min=1, max=MAX_EPOCHS)
    patience: int = _r(0, min=0, max=MAX_EPOCHS)
    scst_epochs: int = _r(0, min=0, max=MAX_EPOCHS)
    scst_samples: int = _r(5, min=2, max=64)
    scst_lr: float = _r(5e-5, min_exclusive=0.0)
    compile: bool = False


@dataclass
class FeatureConfig:
    """Feature extraction: batch size, DataLoader workers (None = auto), cache folder, and
    ``normalize``: z-score each channel with train-split statistics before the decoder;
    ``throughput_images``: test images re-encoded from pixels to time end-to-end inference
    (0 = all; a sample keeps the matrix fast, captions still come from every test image);
    ``shard_size``: images per feature-store shard (None = about 256 MiB of float16 features
    a shard, see :func:`benchmark.features.shard_images`); ``image_decoder``: ``pil`` (the
    encoder library's own PIL preprocessing in the DataLoader's workers) or ``torchvision``
    (decoding with nvJPEG and preprocessing on the GPU, see :mod:`benchmark.pixels`)."""

    batch_size: int = _r(32, min=1, max=MAX_BATCH)
    normalize: bool = True
    throughput_images: int = _r(64, min=0, max=10_000_000)
    num_workers: int | None = _r(None, min=0, max=256)
    cache_dir: str | None = None
    shard_size: int | None = _r(None, min=1, max=10_000_000)
    image_decoder: str = _r("pil", choices=("pil", "torchvision"))


@dataclass
class RunConfig:
    """Everything that defines a run; stored in full in its record.

    ``tokenizer``: ``word`` (the word vocabulary), ``bpe`` or ``wordpiece`` (trained on the
    train captions to at most ``tokenizer_vocab_size`` entries), or the folder or hub name of
    a saved Hugging Face tokenizer (see :mod:`benchmark.tokenization`).
    ``log``: where each epoch's figures also go (``none``, ``tensorboard``, ``wandb``; see
    :mod:`benchmark.tracking`). ``encoder_trainable``: fine-tune ``none`` of the encoder
    (frozen features from the cache), its ``last`` stage or ``all`` of it, with AdamW at
    ``encoder_lr`` (cross-entropy only); ``encoder_grad_checkpointing``: recompute the
    fine-tuned encoder's activations in the backward pass instead of keeping them (less
    memory, about one more forward pass of time; ViT and CLIP encoders).

    ``decoder``: the decoder's registry name (``attn_lstm``, ``transformer``, an alias such as
    ``sat``; the CLI's ``--arch``); ``decoder_hparams``: its constructor's hyperparameters
    (a mapping named after a decoder applies to that decoder only). Config files written
    before these names (``arch: NAME`` and ``decoder: {hyperparameters}``) still load, see
    :func:`translate_old_names`.
    """

    decoder: str = "attn_lstm"
    encoder: str = "resnet50"
    dataset: str = "shapes"
    pretrained: bool = True
    weights: str | None = None
    encoder_init_seed: int = _r(0, min=0, max=MAX_SEED)
    seed: int = _r(0, min=0, max=MAX_SEED)
    device: str = "auto"
    results_dir: str = "results"
    tokenizer: str = "word"
    tokenizer_vocab_size: int = _r(1000, min=8, max=1_000_000)
    log: str = _r("none", choices=("none", "tensorboard", "wandb"))
    encoder_trainable: str = _r("none", choices=("none", "last", "all"))
    encoder_lr: float = _r(1e-4, min_exclusive=0.0)
    encoder_grad_checkpointing: bool = False
    decoder_hparams: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    name: str | None = None
    #: the split a run decodes and scores: ``test`` (every run), or ``val`` (a tuning trial,
    #: :mod:`benchmark.tuning`, which must never see the test split)
    eval_split: str = _r("test", choices=("val", "test"))


_SECTIONS = {"train": TrainConfig, "decode": DecodeConfig, "features": FeatureConfig}


_INT_FIELDS_WITH_NONE = {"num_workers", "shard_size"}


def _coerce(value: Any, default: Any, where: str, key: str = "") -> Any:
    if value is None:
        return value
    if default is None:
        if key in _INT_FIELDS_WITH_NONE and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: expected an integer or null, got {quote(value)}")
        if key not in _INT_FIELDS_WITH_NONE and not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string or null, got {quote(value)}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {quote(value)}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {quote(value)}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {quote(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {quote(value)}")
    return value


def _range_problem(value: Any, bounds: dict) -> str | None:
    """Why ``value`` is outside ``bounds`` (the allowed range, in words), or None."""
    if value is None or not bounds:
        return None
    if "choices" in bounds:
        return None if value in bounds["choices"] else "must be one of " + ", ".join(bounds["choices"])
    parts = []
    if "min" in bounds:
        parts.append(f">= {bounds['min']}")
    if "min_exclusive" in bounds:
        parts.append(f"> {bounds['min_exclusive']}")
    if "max" in bounds:
        parts.append(f"<= {bounds['max']}")
    if "max_exclusive" in bounds:
        parts.append(f"< {bounds['max_exclusive']}")
    ok = (value >= bounds.get("min", value) and value <= bounds.get("max", value)
          and ("min_exclusive" not in bounds or value > bounds["min_exclusive"])
          and ("max_exclusive" not in bounds or value < bounds["max_exclusive"]))
    return None if ok else "allowed: " + " and ".join(parts)


def check_ranges(obj: Any, source: str = "config", prefix: str = "") -> None:
    """Check every field of a config dataclass (recursively) against its declared range.

    Raises ConfigError naming ``source``, the key, its value and the allowed range, e.g.
    ``command line: train.batch_size = -4 is out of range (allowed: >= 1)``.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, source, f"{prefix}{f.name}.")
            continue
        why = _range_problem(value, dict(f.metadata))
        if why:
            raise ConfigError(f"{source}: {prefix}{f.name} = {value!r} is out of range ({why})")


def check_seeds(seeds: list, where: str) -> list[int]:
    """``seeds`` as given, checked: integers in ``[0, 2**32 - 1]``, each once (a repeated seed
    would be aggregated as another run, n = 2 of the same numbers). Raises ConfigError naming
    ``where`` (``--seeds``, or a matrix file's ``matrix.seeds``)."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"{where}: give integers, e.g. [0, 1, 2]")
    bad = [x for x in seeds if not 0 <= x <= MAX_SEED]
    if bad:
        raise ConfigError(f"{where}: seed {bad[0]} is out of range (allowed: 0 to {MAX_SEED})")
    repeated = sorted({x for x in seeds if seeds.count(x) > 1})
    if repeated:
        raise ConfigError(f"{where}: seed {repeated[0]} is given twice; each seed is one run, "
                          "and the board's mean and std count every run")
    return list(seeds)


def parse_seeds(text: str) -> list[int]:
    """The seeds of a ``--seeds`` option: integers separated by commas (``"0,1,2"``), checked
    by :func:`check_seeds`. Raises ConfigError when an item is not an integer, when none is
    given, or as :func:`check_seeds` does."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not out:
        raise ConfigError("--seeds is empty")
    return check_seeds(out, "--seeds")


#: the keys of the old config form: ``arch`` named the decoder, ``decoder`` held its hyperparameters
_OLD_FORM = ("arch", "decoder")
_NEW_FORM = ("decoder", "decoder_hparams")


def translate_old_names(values: dict, source: str) -> dict:
    """``values`` (a config file's top-level mapping, or overrides) with the old form's keys
    renamed to the new ones: ``arch: NAME`` -> ``decoder: NAME`` and a mapping under
    ``decoder:`` -> ``decoder_hparams:`` (a string ``decoder:`` is already the new name).
    Key order is kept. Raises ConfigError naming ``source`` and the keys when both forms are
    mixed (``arch`` with ``decoder_hparams`` or with a string ``decoder``)."""
    old = [k for k in _OLD_FORM if k in values and (k == "arch" or isinstance(values[k], dict))]
    new = [k for k in _NEW_FORM if k in values and (k == "decoder_hparams"
                                                    or not isinstance(values[k], dict))]
    if old and new:
        raise ConfigError(f"{source}: keys {', '.join(old)} (the old form: arch names the "
                          "decoder, decoder holds its hyperparameters) mixed with "
                          f"{', '.join(new)} (the new form); use decoder: NAME and "
                          "decoder_hparams: {...}")
    if not old:
        return values
    renamed = {"arch": "decoder", "decoder": "decoder_hparams"}
    return {renamed.get(k, k): v for k, v in values.items()}


def _apply(obj: Any, values: dict, source: str, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{source}: {prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key; valid keys are {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if key in _SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping")
            _apply(current, value, source, f"{key}.")
        elif key == "decoder_hparams" and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of decoder hyperparameters")
            current.update(value)
        else:
            value = _coerce(value, fields[key].default, where, key)
            why = _range_problem(value, dict(fields[key].metadata))
            if why:
                raise ConfigError(f"{where} = {value!r} is out of range ({why})")
            setattr(obj, key, value)


def preset_or_path(name_or_path: str, folder: Path, what: str, presets: str) -> Path:
    """A YAML path, returned as is, or a preset name ``NAME`` -> ``folder/NAME.yaml``.

    ``what`` names the kind of file in messages (``config``, ``search space``) and
    ``presets`` the presets (``a preset``). Raises ConfigError for a missing file or an
    unknown name, listing the presets there are."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{what} file {p} does not exist")
        return p
    preset = folder / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(x.stem for x in folder.glob("*.yaml")))
        raise ConfigError(f"no {what} {name_or_path!r}: give a YAML path or {presets} ({names})")
    return preset


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (``demo``) -> ``configs/demo.yaml``; a path is returned as is."""
    return preset_or_path(name_or_path, CONFIG_DIR, "config", "a preset")


def read_config_file(name_or_path: str) -> tuple[Path, dict]:
    """``(path, mapping)`` of a preset or YAML file. Raises ConfigError naming the file when it
    is missing, unreadable, not YAML (tags such as ``!!python`` are refused, never run), not a
    mapping at the top level, or ambiguous (see :func:`benchmark.userfiles.read_yaml`:
    duplicate keys, alias bombs, deep nesting)."""
    path = resolve_config_path(name_or_path)
    data = read_yaml(path, "config file", ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return path, data


def load_config(config: str | None = None, overrides: dict | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from defaults, an optional preset/YAML and flag overrides.

    Args:
        config: a preset name in ``configs/`` (``demo``, ``tiny``, ...) or a YAML path; None:
            the defaults alone. A ``matrix:`` section is ignored here; older key names are
            translated.
        overrides: ``{key: value}``, dotted keys allowed (``{"train.epochs": 3}``); None values
            are ignored.

    Returns:
        The :class:`RunConfig`, values type- and range-checked.

    Raises:
        ConfigError: the file is missing, unreadable or not a YAML mapping
            (:func:`read_config_file`), or a key is unknown, a value of the wrong type or out of
            range.
    """
    cfg = RunConfig()
    if config:
        path, data = read_config_file(config)
        data.pop("matrix", None)  # matrix presets may share a file with run settings
        data.pop("launcher", None)  # and the matrix's Slurm settings (benchmark.launcher)
        _apply(cfg, translate_old_names(data, str(path)), str(path))
    return apply_overrides(cfg, overrides or {}, "command line")


def apply_overrides(cfg: RunConfig, overrides: dict, source: str) -> RunConfig:
    """Set dotted keys (``{"train.epochs": 3, "tokenizer": "bpe"}``; None values ignored) on
    ``cfg`` in place and return it. Raises ConfigError naming ``source`` and the key for an
    unknown key, a wrong type or a value out of range."""
    nested: dict = {}
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, tail = key.partition(".")
        if isinstance(nested.get(head, {}), dict) != bool(tail or key not in nested):
            # e.g. decoder (the name) with decoder.KEY (the old form of decoder_hparams.KEY)
            raise ConfigError(f"{source}: keys {head} and {head}.* mix a value and a mapping; "
                              "give the decoder's hyperparameters as decoder_hparams.KEY")
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            nested[key] = value
    _apply(cfg, translate_old_names(nested, source), source)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain-JSON form of a config (as stored in run records)."""
    return dataclasses.asdict(cfg)


def resolved_config(cfg: RunConfig) -> dict:
    """The config as stored in a record: canonical model names and the decoder's
    hyperparameters with its defaults filled in.

    This is the whole up-front validation of a run, cheap and before any image is read:
    declared ranges (ConfigError), the device (ConfigError when absent), model names
    (UnknownModelError) and decoder hyperparameters (HyperparameterError: the decoder is
    built once on the meta device, so every constructor check runs).
    """
    check_ranges(cfg)
    select_device(cfg.device)

    check_tokenizer_spec(cfg.tokenizer, cfg.tokenizer_vocab_size)
    check_tracker(cfg.log)
    if cfg.encoder_grad_checkpointing and cfg.encoder_trainable == "none":
        raise ConfigError("encoder_grad_checkpointing is for fine-tuning: set encoder_trainable "
                          "(--finetune-encoder last|all) or drop --grad-checkpointing")
    if cfg.encoder_grad_checkpointing:
        why = grad_checkpointing_unsupported(cfg.encoder)
        if why:
            raise ConfigError(f"--grad-checkpointing with {cfg.encoder}: {why}")
    if cfg.encoder_trainable != "none" and cfg.features.image_decoder != "pil":
        raise ConfigError(f"encoder_trainable = {cfg.encoder_trainable!r} with "
                          f"features.image_decoder = {cfg.features.image_decoder!r}: fine-tuning "
                          "reads images through the library's own PIL transforms (training "
                          "crops); use features.image_decoder: pil")
    if cfg.encoder_trainable != "none" and cfg.train.scst_epochs:
        raise ConfigError(f"encoder_trainable = {cfg.encoder_trainable!r} with train.scst_epochs = "
                          f"{cfg.train.scst_epochs}: SCST trains the decoder on frozen features; "
                          "fine-tune the encoder with cross-entropy only (train.scst_epochs: 0)")
    out = config_to_dict(cfg)
    out["decoder"] = get_entry("decoder", cfg.decoder).name
    out["encoder"] = get_entry("encoder", cfg.encoder).name
    out["decoder_hparams"] = validate_decoder(out["decoder"], cfg.decoder_hparams)
    return out


def config_id(resolved: dict) -> str:
    """Hash of a resolved config without seed, device and output folder: runs that differ only
    in seed share it, so the report can aggregate them (mean +- std)."""
    keep = {k: v for k, v in resolved.items()
            if k not in ("seed", "device", "results_dir", "name", "log")}
    if "decoder_hparams" in keep:  # hashed under the old names, so ids (baselines, committed
        # records, unfinished training states) stay those of the same settings before the rename
        keep["arch"], keep["decoder"] = keep.pop("decoder"), keep.pop("decoder_hparams")
    # settings that are off do not change the run, so they do not change its id either (runs
    # recorded before these settings existed keep theirs)
    train = dict(keep.get("train") or {})
    if not train.get("patience"):
        train.pop("patience", None)
    if not train.get("compile"):
        train.pop("compile", None)
    if not train.get("scst_epochs"):
        for k in ("scst_epochs", "scst_samples", "scst_lr"):
            train.pop(k, None)
    keep["train"] = train
    if "features" in keep:  # how features are stored does not change them
        keep["features"] = {k: v for k, v in keep["features"].items() if k != "shard_size"
                            and (k, v) != ("image_decoder", "pil")}
    if not keep.get("encoder_grad_checkpointing"):  # memory, not the model: ids stay
        keep.pop("encoder_grad_checkpointing", None)
    if keep.get("encoder_trainable", "none") == "none":
        keep.pop("encoder_trainable", None)
        keep.pop("encoder_lr", None)
    if keep.get("eval_split", "test") == "test":  # scored on test, as every run before it
        keep.pop("eval_split", None)
    if keep.get("tokenizer", "word") == "word":
        keep.pop("tokenizer", None)
        keep.pop("tokenizer_vocab_size", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]
