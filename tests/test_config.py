"""Config loading: defaults < preset < flags, strict keys and types, resolved names."""

import re

import pytest

from architectures import UnknownModelError
from benchmark.config import CONFIG_DIR, config_id, load_config, resolved_config
from benchmark.errors import ConfigError


def test_layers_apply_in_order(tmp_path):
    cfg = load_config()
    assert cfg.train.epochs == 10 and cfg.decoder == "attn_lstm"
    y = tmp_path / "c.yaml"
    y.write_text("arch: lstm\ntrain:\n  epochs: 3\n  lr: 1\ndecoder:\n  hidden_dim: 64\n")
    cfg = load_config(str(y), {"train.epochs": 5, "seed": 7, "decode.beam_size": None})
    assert (cfg.decoder, cfg.train.epochs, cfg.seed, cfg.train.lr) == ("lstm", 5, 7, 1.0)
    assert isinstance(cfg.train.lr, float) and cfg.decoder_hparams == {"hidden_dim": 64}


def test_the_old_and_the_new_decoder_keys_load_alike(tmp_path):
    """``decoder: NAME`` + ``decoder_hparams: {...}``, and the old form ``arch: NAME`` +
    ``decoder: {...}`` (files written before the rename), give the same config and id."""
    new, old = tmp_path / "new.yaml", tmp_path / "old.yaml"
    new.write_text("decoder: lstm\ndecoder_hparams:\n  hidden_dim: 64\n")
    old.write_text("arch: lstm\ndecoder:\n  hidden_dim: 64\n")
    a, b = load_config(str(new)), load_config(str(old))
    assert a == b and (a.decoder, a.decoder_hparams) == ("lstm", {"hidden_dim": 64})
    assert load_config(None, {"arch": "lstm", "decoder.hidden_dim": 64}) == a  # old overrides
    assert load_config(None, {"decoder": "lstm", "decoder_hparams.hidden_dim": 64}) == a


@pytest.mark.parametrize("text,keys", [
    ("arch: lstm\ndecoder_hparams:\n  hidden_dim: 64\n", "keys arch (the old form"),
    ("arch: lstm\ndecoder: rnn\n", "keys arch (the old form"),
    ("decoder:\n  hidden_dim: 64\ndecoder_hparams:\n  dropout: 0.1\n",
     "keys decoder (the old form"),
])
def test_mixing_the_old_and_the_new_decoder_keys_names_the_file_and_keys(tmp_path, text, keys):
    y = tmp_path / "mixed.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(keys)) as exc:
        load_config(str(y))
    assert str(y) in str(exc.value) and "decoder_hparams" in str(exc.value)


def test_the_tiny_preset_keeps_its_config_id_in_the_new_form(tmp_path):
    """config_id hashes the old key names, so baselines and committed records still match:
    configs/tiny.yaml in the new form has the id of its old form, pinned."""
    text = (CONFIG_DIR / "tiny.yaml").read_text()
    assert "decoder_hparams:" in text and "\narch:" not in text
    old = tmp_path / "tiny-old.yaml"
    old.write_text(text.replace("\ndecoder: ", "\narch: ").replace("decoder_hparams:", "decoder:"))
    ids = {config_id(resolved_config(load_config(c))) for c in ("tiny", str(old))}
    assert ids == {"deb622dc6e"}


@pytest.mark.parametrize("text,message", [
    ("train:\n  epoch: 3\n", "train.epoch: unknown key"),
    ("train:\n  epochs: three\n", "train.epochs: expected an integer"),
    ("pretrained: 1\n", "pretrained: expected true/false"),
    ("train: 3\n", "train: expected a mapping"),
    ("- 1\n- 2\n", "expected a mapping at the top level"),
    ("a: [1\n", "not valid YAML"),
    ("x: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(str(y))
    assert str(y) in str(exc.value)


def test_resolved_config_uses_canonical_names_and_fills_defaults():
    cfg = load_config(None, {"arch": "sat", "encoder": "clip"})
    out = resolved_config(cfg)
    assert out["decoder"] == "attn_lstm" and out["encoder"] == "clip_vit_b32"
    assert out["decoder_hparams"]["attention_regularization"] == 1.0
    cfg.decoder = "nope"
    with pytest.raises(UnknownModelError):
        resolved_config(cfg)


def test_config_id_ignores_seed_and_output_folder_only():
    a = resolved_config(load_config(None, {"seed": 1, "results_dir": "x"}))
    b = resolved_config(load_config(None, {"seed": 2, "results_dir": "y"}))
    c = resolved_config(load_config(None, {"train.epochs": 3}))
    assert config_id(a) == config_id(b) != config_id(c)
    assert len(config_id(a)) == 10


def test_storage_and_compile_settings_that_are_off_keep_the_config_id():
    from benchmark.config import config_id, load_config, resolved_config

    base = config_id(resolved_config(load_config("tiny")))
    sharded = config_id(resolved_config(load_config("tiny", {"features.shard_size": 7})))
    assert sharded == base  # how features are stored does not change the run
    off = config_id(resolved_config(load_config("tiny", {"train.compile": False})))
    on = config_id(resolved_config(load_config("tiny", {"train.compile": True})))
    assert off == base != on
