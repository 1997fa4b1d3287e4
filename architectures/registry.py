"""Name -> constructor registries for encoders and decoders.

Follows the idea of timm's ``register_model`` / ``create_model`` / ``list_models``: a model is a
plain function decorated with a registration decorator; the registry is a pair of module-level
dicts; the factory resolves a name (or alias) to that function and calls it. Adding a decoder is
one new file under ``architectures/decoders/`` that uses :func:`register_decoder`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RegistryEntry",
    "UnknownModelError",
    "register_encoder",
    "register_decoder",
    "create_encoder",
    "create_decoder",
    "list_encoders",
    "list_decoders",
    "resolve_encoder_name",
    "resolve_decoder_name",
    "get_entry",
]


class UnknownModelError(KeyError):
    """Raised when a name matches no registered encoder or decoder (lists the valid names)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class RegistryEntry:
    """One registered constructor: its canonical name, aliases, description and kind."""

    name: str
    fn: Callable[..., Any]
    description: str
    aliases: tuple[str, ...]
    kind: str  # "encoder" or "decoder"
    ci_friendly: bool = False


_ENTRIES: dict[str, dict[str, RegistryEntry]] = {"encoder": {}, "decoder": {}}
_ALIASES: dict[str, dict[str, str]] = {"encoder": {}, "decoder": {}}


def _register(kind: str, name: str | None, aliases: tuple[str, ...], ci_friendly: bool):
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = name or fn.__name__
        if key in _ENTRIES[kind] or key in _ALIASES[kind]:
            raise ValueError(f"{kind} {key!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        entry = RegistryEntry(key, fn, doc[0] if doc else "", aliases, kind, ci_friendly)
        _ENTRIES[kind][key] = entry
        for alias in aliases:
            _ALIASES[kind][alias] = key
        return fn

    return decorator


def register_encoder(name: str | None = None, *, aliases: tuple[str, ...] = (), ci_friendly=False):
    """Decorator that registers an encoder constructor under ``name`` (default: function name).

    The first line of the function's docstring becomes its description in ``capbench list``.
    """
    return _register("encoder", name, aliases, ci_friendly)


def register_decoder(name: str | None = None, *, aliases: tuple[str, ...] = ()):
    """Decorator that registers a decoder class or constructor under ``name``."""
    return _register("decoder", name, aliases, False)


def _resolve(kind: str, name: str) -> str:
    _ensure_loaded()
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


def create_encoder(name: str, **kwargs: Any):
    """Build the encoder registered as ``name`` (or an alias) with ``kwargs``."""
    return get_entry("encoder", name).fn(**kwargs)


def create_decoder(name: str, **kwargs: Any):
    """Build the decoder registered as ``name`` (or an alias) with ``kwargs``."""
    return get_entry("decoder", name).fn(**kwargs)


def _list(kind: str, pattern: str) -> list[str]:
    _ensure_loaded()
    return sorted(n for n in _ENTRIES[kind] if fnmatch.fnmatch(n, pattern))


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder names matching a shell wildcard, e.g. ``list_encoders('*vit*')``."""
    return _list("encoder", pattern)


def list_decoders(pattern: str = "*") -> list[str]:
    """Registered decoder names matching a shell wildcard."""
    return _list("decoder", pattern)


def _ensure_loaded() -> None:
    # Importing the package modules runs their registration decorators.
    from architectures import decoders, encoders  # noqa: F401
