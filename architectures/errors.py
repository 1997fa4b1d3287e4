"""Errors of the model zoo. Each one is a user mistake with a message that says what to fix."""

from __future__ import annotations

__all__ = ["ArchitectureError", "UnknownModelError", "HyperparameterError", "EncoderWeightsError"]


class ArchitectureError(Exception):
    """Base class of the errors ``architectures`` raises for bad names, settings or weights."""


class UnknownModelError(ArchitectureError, KeyError):
    """A name matches no registered encoder or decoder (the message lists the valid names)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class HyperparameterError(ArchitectureError, ValueError):
    """A decoder hyperparameter is unknown, of the wrong type, or rejected by the decoder."""


class EncoderWeightsError(ArchitectureError, RuntimeError):
    """Pretrained weights could not be loaded (offline, missing or mismatching file)."""
