"""capbench model zoo: image encoders and caption decoders, built by name from registries.

Importing this package imports every model module, whose decorators fill the registry (as
timm's ``models/__init__.py`` does); the registry itself imports no model.
"""

from architectures import decoders, encoders  # noqa: F401  (registers every model)
from architectures.errors import (
    ArchitectureError,
    EncoderWeightsError,
    HyperparameterError,
    UnknownModelError,
)
from architectures.factory import (
    create_decoder,
    create_encoder,
    decoder_defaults,
    known_decoder_hparams,
    resolve_decoder_hparams,
    validate_decoder,
)
from architectures.registry import (
    get_entry,
    list_decoders,
    list_encoders,
    register_decoder,
    register_encoder,
    resolve_decoder_name,
    resolve_encoder_name,
)

__all__ = [
    "ArchitectureError",
    "EncoderWeightsError",
    "HyperparameterError",
    "UnknownModelError",
    "create_decoder",
    "create_encoder",
    "decoder_defaults",
    "get_entry",
    "known_decoder_hparams",
    "list_decoders",
    "list_encoders",
    "register_decoder",
    "register_encoder",
    "resolve_decoder_hparams",
    "resolve_decoder_name",
    "resolve_encoder_name",
    "validate_decoder",
]
