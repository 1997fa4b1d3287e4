"""Name -> constructor registries for encoders and decoders. Imports none of the models.

Follows timm's ``register_model`` / ``list_models``: a model is a plain function (or class)
decorated with a registration decorator, and the registry is two module-level dicts. The model
modules register themselves when ``architectures/__init__.py`` imports them, as timm's
``models/__init__.py`` does, so this module never imports back into them. Building a model
from a name and a config is :mod:`architectures.factory`'s job.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from architectures.errors import UnknownModelError

__all__ = ["RegistryEntry", "register_encoder", "register_decoder", "list_encoders",
           "list_decoders", "resolve_encoder_name", "resolve_decoder_name", "get_entry"]


@dataclass(frozen=True)
class RegistryEntry:
    """One registered constructor: canonical name, aliases, description and kind.

    ``ci_friendly`` marks small encoders that CI and ``capbench check`` use
    (``list_encoders(ci=True)``). ``unsupported`` maps a capability the harness may ask of
    the model to why this one cannot have it: ``grad_checkpointing`` (encoders, when
    fine-tuning) and ``compile`` (decoders, ``torch.compile`` of the training step).
    """

    name: str
    fn: Callable[..., Any]
    description: str
    aliases: tuple[str, ...]
    kind: str  # "encoder" or "decoder"
    ci_friendly: bool = False
    unsupported: Mapping[str, str] = field(default_factory=dict)

    def why_not(self, capability: str) -> str | None:
        """Why this model cannot have ``capability`` (see ``unsupported``); None when it can."""
        return self.unsupported.get(capability)


_ENTRIES: dict[str, dict[str, RegistryEntry]] = {"encoder": {}, "decoder": {}}
_ALIASES: dict[str, dict[str, str]] = {"encoder": {}, "decoder": {}}


def _register(kind: str, name: str | None, aliases: tuple[str, ...], ci_friendly: bool,
              unsupported: Mapping[str, str] | None = None):
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__
        if key in _ENTRIES[kind] or key in _ALIASES[kind]:
            raise ValueError(f"{kind} {key!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        entry = RegistryEntry(key, fn, doc[0] if doc else "", aliases, kind, ci_friendly,
                              dict(unsupported or {}))
        _ENTRIES[kind][key] = entry
        for alias in aliases:
            _ALIASES[kind][alias] = key
        return fn

    return decorator


def register_encoder(name: str | None = None, *, aliases: tuple[str, ...] = (),
                     ci_friendly: bool = False, unsupported: Mapping[str, str] | None = None):
    """Decorator that registers an encoder constructor under ``name`` (default: function name).

    The first line of the function's docstring becomes its description in ``capbench list``.
    ``unsupported``: capability -> why not (see :class:`RegistryEntry`).
    """
    return _register("encoder", name, aliases, ci_friendly, unsupported)


def register_decoder(name: str | None = None, *, aliases: tuple[str, ...] = (),
                     unsupported: Mapping[str, str] | None = None):
    """Decorator that registers a decoder class under ``name``.

    Its ``__init__`` signature is the decoder's contract: ``vocab_size``, ``grid_dim`` and
    ``pooled_dim`` first, then keyword hyperparameters with defaults, which configs may set.
    ``unsupported``: capability -> why not (see :class:`RegistryEntry`).
    """
    return _register("decoder", name, aliases, False, unsupported)


def _resolve(kind: str, name: str) -> str:
    if name in _ENTRIES[kind]:
        return name
    if name in _ALIASES[kind]:
        return _ALIASES[kind][name]
    valid = ", ".join(sorted(_ENTRIES[kind]) + sorted(_ALIASES[kind]))
    raise UnknownModelError(f"unknown {kind} {name!r}; choose one of: {valid} (see `capbench list`)")


def resolve_encoder_name(name: str) -> str:
    """Canonical encoder name for ``name`` or one of its aliases (raises UnknownModelError)."""
    return _resolve("encoder", name)


def resolve_decoder_name(name: str) -> str:
    """Canonical decoder name for ``name`` or one of its aliases (raises UnknownModelError)."""
    return _resolve("decoder", name)


def get_entry(kind: str, name: str) -> RegistryEntry:
    """The :class:`RegistryEntry` of an encoder or decoder (``kind`` is "encoder"/"decoder")."""
    return _ENTRIES[kind][_resolve(kind, name)]


def list_encoders(pattern: str = "*", *, ci: bool | None = None) -> list[str]:
    """Registered encoder names matching a shell wildcard, e.g. ``list_encoders('*vit*')``.

    ``ci=True`` keeps the small encoders registered with ``ci_friendly`` (what CI and
    ``capbench check`` use), ``ci=False`` the full-size ones (what the matrix and
    ``bench --encoder all`` compare), ``None`` all of them.
    """
    return sorted(n for n, e in _ENTRIES["encoder"].items()
                  if fnmatch.fnmatch(n, pattern) and (ci is None or e.ci_friendly == ci))


def list_decoders(pattern: str = "*") -> list[str]:
    """Registered decoder names matching a shell wildcard."""
    return sorted(n for n in _ENTRIES["decoder"] if fnmatch.fnmatch(n, pattern))


def unregister(kind: str, name: str) -> None:
    """Remove a registration (tests that register a throwaway model clean up with this)."""
    entry = _ENTRIES[kind].pop(name)
    for alias in entry.aliases:
        _ALIASES[kind].pop(alias, None)
