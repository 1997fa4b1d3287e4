import pytest

from architectures import (
    UnknownModelError,
    create_decoder,
    get_entry,
    list_decoders,
    list_encoders,
    resolve_decoder_name,
    resolve_encoder_name,
)


def test_all_required_names_are_registered():
    assert {"rnn", "lstm", "attn_lstm", "transformer"} <= set(list_decoders())
    assert {"resnet50", "vit_b16", "clip_vit_b32", "resnet18", "vit_tiny"} <= set(list_encoders())


def test_aliases_resolve_to_canonical_names():
    assert resolve_encoder_name("resnet") == "resnet50"
    assert resolve_encoder_name("vit") == "vit_b16"
    assert resolve_encoder_name("clip") == "clip_vit_b32"
    assert resolve_decoder_name("sat") == "attn_lstm"


def test_wildcard_listing():
    assert list_encoders("vit*") == ["vit_b16", "vit_tiny"]
    assert "clip_vit_b32" in list_encoders("*vit*")
    assert list_decoders("*lstm") == ["attn_lstm", "lstm"]


def test_unknown_name_lists_valid_choices():
    with pytest.raises(UnknownModelError) as exc:
        create_decoder("gru", vocab_size=10, grid_dim=4, pooled_dim=4)
    assert "attn_lstm" in str(exc.value) and "capbench list" in str(exc.value)


def test_descriptions_come_from_docstrings():
    assert "Show, Attend" in get_entry("decoder", "attn_lstm").description or \
        "Xu et al" in get_entry("decoder", "attn_lstm").description
