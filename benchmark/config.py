"""Run configuration: defaults < preset YAML (``configs/NAME.yaml`` or a path) < CLI flags.

Unknown keys and wrong types raise :class:`ConfigError` naming the file and the key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.decoding import DecodeConfig
from benchmark.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

__all__ = ["RunConfig", "TrainConfig", "FeatureConfig", "load_config", "config_to_dict",
           "CONFIG_DIR", "resolve_config_path", "read_config_file", "resolved_config", "config_id"]


@dataclass
class TrainConfig:
    """Harness settings shared by every decoder (teacher forcing, masked cross-entropy).

    ``lr`` peak AdamW learning rate; linear warmup over ``warmup_frac`` of the steps, then
    cosine decay to 0; ``grad_clip`` max global L2 norm; ``max_caption_len`` words kept per
    training caption; ``min_word_count`` vocabulary threshold (train split only).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    max_caption_len: int = 20
    min_word_count: int = 2
    val_every: int = 1


@dataclass
class FeatureConfig:
    """Feature extraction: batch size, DataLoader workers (None = auto), cache folder, and
    ``normalize``: z-score each channel with train-split statistics before the decoder;
    ``throughput_images``: test images re-encoded from pixels to time end-to-end inference
    (0 = all; a sample keeps the matrix fast, captions still come from every test image)."""

    batch_size: int = 32
    normalize: bool = True
    throughput_images: int = 64
    num_workers: int | None = None
    cache_dir: str | None = None


@dataclass
class RunConfig:
    """Everything that defines a run; stored in full in its record."""

    arch: str = "attn_lstm"
    encoder: str = "resnet50"
    dataset: str = "shapes"
    pretrained: bool = True
    weights: str | None = None
    encoder_init_seed: int = 0
    seed: int = 0
    device: str = "auto"
    results_dir: str = "results"
    decoder: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    name: str | None = None


_SECTIONS = {"train": TrainConfig, "decode": DecodeConfig, "features": FeatureConfig}


def _coerce(value: Any, default: Any, where: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(obj: Any, values: dict, source: str, prefix: str = "") -> None:
    valid = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{source}: {prefix}{key}"
        if key not in valid:
            raise ConfigError(f"{where}: unknown key; valid keys are {', '.join(sorted(valid))}")
        current = getattr(obj, key)
        if key in _SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping")
            _apply(current, value, source, f"{key}.")
        elif key == "decoder" and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of decoder hyperparameters")
            current.update(value)
        else:
            setattr(obj, key, _coerce(value, current, where))


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (``demo``) -> ``configs/demo.yaml``; a path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no config {name_or_path!r}: give a YAML path or a preset ({names})")
    return preset


def read_config_file(name_or_path: str) -> tuple[Path, dict]:
    """``(path, mapping)`` of a preset or YAML file. Raises ConfigError naming the file when it
    is missing, unreadable, not YAML (tags such as ``!!python`` are refused, never run) or not a
    mapping at the top level."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return path, data


def load_config(config: str | None = None, overrides: dict | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from defaults, an optional preset/YAML and flag overrides.

    ``overrides`` may use dotted keys (``{"train.epochs": 3}``); None values are ignored.
    """
    cfg = RunConfig()
    if config:
        path, data = read_config_file(config)
        data.pop("matrix", None)  # matrix presets may share a file with run settings
        _apply(cfg, data, str(path))
    nested: dict = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        head, _, tail = key.partition(".")
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            nested[key] = value
    _apply(cfg, nested, "command line")
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain-JSON form of a config (as stored in run records)."""
    return dataclasses.asdict(cfg)


def resolved_config(cfg: RunConfig) -> dict:
    """The config as stored in a record: canonical model names and the decoder's
    hyperparameters with its defaults filled in.

    Raises UnknownModelError / HyperparameterError (from ``architectures``) for a bad name or
    hyperparameter: every constructor check runs here, on the meta device, before any work.
    """
    from architectures import get_entry, validate_decoder

    out = config_to_dict(cfg)
    out["arch"] = get_entry("decoder", cfg.arch).name
    out["encoder"] = get_entry("encoder", cfg.encoder).name
    out["decoder"] = validate_decoder(out["arch"], cfg.decoder)
    return out


def config_id(resolved: dict) -> str:
    """Hash of a resolved config without seed, device and output folder: runs that differ only
    in seed share it, so the report can aggregate them (mean +- std)."""
    keep = {k: v for k, v in resolved.items() if k not in ("seed", "device", "results_dir", "name")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]
