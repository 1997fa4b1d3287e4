"""Build encoders and decoders from a name and a config: the one factory of the model zoo.

A decoder's hyperparameters are whatever its registered constructor's signature declares
(after ``vocab_size``, ``grid_dim``, ``pooled_dim``), with the signature's defaults. Nothing
here lists them by hand, so adding a decoder with a new hyperparameter is one new file under
``architectures/decoders/`` plus its import line.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch

from architectures.errors import HyperparameterError
from architectures.registry import get_entry, list_decoders, list_encoders

__all__ = ["create_encoder", "create_decoder", "decoder_defaults", "known_decoder_hparams",
           "resolve_decoder_hparams", "validate_decoder", "describe_encoders", "describe_decoders"]

FIXED = ("vocab_size", "grid_dim", "pooled_dim")


def create_encoder(name: str, **kwargs: Any):
    """Build the encoder registered as ``name`` (or an alias), e.g. ``pretrained=False``.

    Raises UnknownModelError for an unknown name, EncoderWeightsError when weights cannot load.
    """
    return get_entry("encoder", name).fn(**kwargs)


def decoder_defaults(name: str) -> dict[str, Any]:
    """``{hyperparameter: default}`` that decoder ``name`` declares in its signature."""
    params = inspect.signature(get_entry("decoder", name).fn).parameters
    return {k: p.default for k, p in params.items()
            if k not in FIXED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def known_decoder_hparams() -> set[str]:
    """Every hyperparameter name any registered decoder takes."""
    return {k for name in list_decoders() for k in decoder_defaults(name)}


#: Allowed ``(low, high)`` of the hyperparameters decoders share (``dropout`` excludes 1).
#: Any other integer hyperparameter must be >= 0, and every float one finite.
HPARAM_RANGES: dict[str, tuple[float, float]] = {
    "embed_dim": (1, 65_536), "hidden_dim": (1, 65_536), "attention_dim": (1, 65_536),
    "num_layers": (1, 64), "num_heads": (1, 256), "max_len": (1, 4096),
    "dropout": (0.0, 1.0), "attention_regularization": (0.0, 1e6),
}


def _check_range(where: str, key: str, value: Any) -> None:
    low, high = HPARAM_RANGES.get(key, (0, float("inf")))
    if isinstance(value, float) and not math.isfinite(value):
        raise HyperparameterError(f"{where} should be a finite number")
    if not low <= value <= high or (key == "dropout" and value == 1.0):
        top = "< 1" if key == "dropout" else f"<= {high:,}"
        raise HyperparameterError(f"{where} is out of range (allowed: >= {low} and {top})")


def _check_type(name: str, key: str, value: Any, default: Any) -> Any:
    where = f"decoder {name}: hyperparameter {key}={value!r}"
    if default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise HyperparameterError(f"{where} should be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise HyperparameterError(f"{where} should be an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HyperparameterError(f"{where} should be a number")
        value = float(value)
    else:
        return value
    _check_range(where, key, value)
    return value


def resolve_decoder_hparams(name: str, hparams: dict | None = None, *, strict: bool = True) -> dict:
    """The hyperparameters decoder ``name`` takes: its defaults updated with ``hparams``.

    One config serves every decoder: a name that another registered decoder takes (e.g.
    ``num_heads`` for an LSTM) is dropped, and a nested mapping under a decoder's name
    (``transformer: {num_layers: 3}``) applies to that decoder only. Raises
    :class:`HyperparameterError` for a name no decoder takes (with ``strict``), for a value
    whose type differs from the default's (an int where an int is declared, and so on) and
    for a value outside its range (:data:`HPARAM_RANGES`; NaN and infinity never pass).
    """
    entry = get_entry("decoder", name)
    hparams = dict(hparams or {})
    names = set(list_decoders())
    per_arch = hparams.get(entry.name) or {}
    if not isinstance(per_arch, dict):
        raise HyperparameterError(f"decoder.{entry.name} should be a mapping of hyperparameters")
    merged = {**{k: v for k, v in hparams.items() if k not in names}, **per_arch}
    accepted = decoder_defaults(entry.name)
    unknown = set(merged) - known_decoder_hparams() - set(accepted)
    if unknown and strict:
        raise HyperparameterError(f"decoder hyperparameter(s) {sorted(unknown)} unknown; "
                                  f"{entry.name} takes {sorted(accepted)}")
    chosen = {k: _check_type(entry.name, k, v, accepted[k]) for k, v in merged.items()
              if k in accepted}
    return {**accepted, **chosen}


def create_decoder(name: str, vocab_size: int, grid_dim: int, pooled_dim: int,
                   hparams: dict | None = None, *, strict: bool = True, **kwargs: Any):
    """Build decoder ``name`` for a vocabulary of ``vocab_size`` and features ``grid (B, N,
    grid_dim)`` / ``pooled (B, pooled_dim)``.

    ``hparams`` (a config's ``decoder`` section) and ``kwargs`` are resolved by
    :func:`resolve_decoder_hparams`. Raises UnknownModelError for an unknown name and
    :class:`HyperparameterError` for a hyperparameter that is unknown, mistyped, out of its
    range (:data:`HPARAM_RANGES`) or rejected by the decoder's constructor (e.g.
    ``num_heads`` not dividing ``embed_dim``).
    """
    entry = get_entry("decoder", name)
    resolved = resolve_decoder_hparams(entry.name, {**(hparams or {}), **kwargs}, strict=strict)
    try:
        return entry.fn(vocab_size=vocab_size, grid_dim=grid_dim, pooled_dim=pooled_dim, **resolved)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as exc:
        raise HyperparameterError(f"decoder {entry.name} rejects {resolved}: {exc}") from exc


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Skips parameter initialisation's random fills (``torch.nn.init.*`` and the tensors'
    ``normal_``/``uniform_``) on meta tensors. There they fill nothing, but ``normal_`` runs
    through a torch._refs decomposition that imports torch._dynamo: seconds of start-up in
    every process that validates a config, for values that do not exist."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        fill = (getattr(func, "__module__", "") == "torch.nn.init"
                or func in (torch.Tensor.normal_, torch.Tensor.uniform_))
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes tensor=
        if fill and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device():
    """Build modules on the meta device (shapes and parameter counts, no memory, no compute),
    skipping the random fills of their initialisation (:class:`_NoRandomInit`)."""
    with torch.device("meta"), _NoRandomInit():
        yield


def validate_decoder(name: str, hparams: dict | None = None) -> dict:
    """Resolve ``hparams`` and build the decoder once on the meta device (no memory, no
    compute), so every constructor check runs before any real work. Returns the resolved
    hyperparameters; raises like :func:`create_decoder`."""
    with meta_device():
        create_decoder(name, 16, 8, 8, hparams)
    return resolve_decoder_hparams(name, hparams)


def describe_encoders(pattern: str = "*") -> list[dict]:
    """One row per encoder matching ``pattern``: name, aliases, grid ``N x D``, pooled dim,
    parameter count and description (random init: nothing is downloaded)."""
    rows = []
    for name in list_encoders(pattern):
        entry = get_entry("encoder", name)
        enc = create_encoder(name, pretrained=False)
        rows.append({"name": name, "aliases": ", ".join(entry.aliases),
                     "grid": f"{enc.grid_size} x {enc.grid_dim}", "pooled": enc.pooled_dim,
                     "params": sum(p.numel() for p in enc.parameters()),
                     "description": entry.description})
        del enc
    return rows


def describe_decoders(pattern: str = "*", *, feature_dim: int = 2048,
                      vocab_size: int = 10000) -> list[dict]:
    """One row per decoder matching ``pattern``: name, aliases, trainable parameters with its
    default hyperparameters (for ``feature_dim``-d features and ``vocab_size`` words, built on
    the meta device) and description."""
    rows = []
    for name in list_decoders(pattern):
        entry = get_entry("decoder", name)
        with meta_device():
            dec = create_decoder(name, vocab_size, feature_dim, feature_dim)
        rows.append({"name": name, "aliases": ", ".join(entry.aliases),
                     "params": dec.num_parameters(), "description": entry.description})
    return rows
