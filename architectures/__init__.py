"""capbench model zoo: image encoders and caption decoders, built by name from registries."""

from architectures.registry import (
    UnknownModelError,
    create_decoder,
    create_encoder,
    get_entry,
    list_decoders,
    list_encoders,
    register_decoder,
    register_encoder,
    resolve_decoder_name,
    resolve_encoder_name,
)

__all__ = [
    "UnknownModelError",
    "create_decoder",
    "create_encoder",
    "get_entry",
    "list_decoders",
    "list_encoders",
    "register_decoder",
    "register_encoder",
    "resolve_decoder_name",
    "resolve_encoder_name",
]
