"""Encoder fine-tuning: which parameters train, the loss falls and the encoder changes, the
frozen path and its feature cache stay untouched, and the saved model captions as recorded."""

from __future__ import annotations

import pytest
import torch

from architectures import create_encoder
from benchmark.errors import ConfigError
from tests.conftest import captions_of


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_last_unfreezes_only_the_last_stage_and_frozen_batchnorm_stays_in_eval(name):
    enc = create_encoder(name, pretrained=False)
    modules, loose = enc.last_stage()
    want = sum(p.numel() for m in modules for p in m.parameters()) + sum(p.numel() for p in loose)
    assert enc.set_trainable("last") == want < sum(p.numel() for p in enc.parameters())
    enc.train()
    inside = {id(m) for top in modules for m in top.modules()}
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.training == (id(m) in inside)
    for p in enc.parameters():
        assert p.requires_grad == any(p is q for m in modules for q in m.parameters())
    assert enc.set_trainable("all") == sum(p.numel() for p in enc.parameters())
    assert enc.set_trainable("none") == 0 and not enc.training


def test_scst_with_a_trainable_encoder_is_refused_up_front():
    from benchmark.config import load_config, resolved_config

    cfg = load_config("tiny", {"encoder_trainable": "last", "train.scst_epochs": 2})
    with pytest.raises(ConfigError, match="cross-entropy only"):
        resolved_config(cfg)
    with pytest.raises(ConfigError, match="encoder_trainable"):
        load_config("tiny", {"encoder_trainable": "some"})


@pytest.mark.slow
def test_fine_tuning_trains_the_last_stage_and_leaves_the_frozen_path_alone(tiny_shapes, tmp_path):
    from benchmark.config import load_config
    from benchmark.data import resolve_dataset
    from benchmark.runner import prepare_features, run_experiment

    cache = tmp_path / "cache"
    cfg = load_config("tiny", {"dataset": str(tiny_shapes), "train.epochs": 3,
                               "encoder_trainable": "last", "encoder_lr": 1e-3,
                               "features.cache_dir": str(cache), "results_dir": str(tmp_path)})
    dataset = resolve_dataset(cfg.dataset)
    shared, store = prepare_features(cfg, dataset, torch.device("cpu"))
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    cached = sorted(p.name for p in cache.rglob("*.safetensors"))
    grid = store.grid.all()
    record, _ = run_experiment(cfg, dataset=dataset, prepared=(shared, store))
    # the shared (frozen) encoder, its features and the cache are as they were
    assert all(torch.equal(before[k], v) for k, v in shared.state_dict().items())
    assert not any(p.requires_grad for p in shared.parameters())
    assert torch.equal(store.grid.all(), grid) and store.stats is None
    assert sorted(p.name for p in cache.rglob("*.safetensors")) == cached
    # the run's own encoder trained its last stage only, and the loss fell
    losses = [h["loss"] for h in record.training["history"]]
    assert losses[-1] < losses[0]
    assert record.training["encoder"]["trainable"] == "last"
    assert record.parameters["encoder_trainable"] == record.training["encoder"][
        "trainable_parameters"] > 0
    assert "+finetuned-last:" in record.encoder_weights
    from safetensors.torch import load_file

    tuned = load_file(f"{record.checkpoint}/encoder_finetuned.safetensors")
    assert tuned and all(k.startswith("body.7.") for k in tuned)  # ResNet layer4 only
    assert any(not torch.equal(before[k], v) for k, v in tuned.items())
    # the checkpoint rebuilds the fine-tuned encoder: captions equal the record's
    got = captions_of(record, tiny_shapes.parent / "images", tmp_path)
    assert got == {p["filename"]: p["caption"] for p in record.predictions}


@pytest.mark.parametrize("name", ["vit_tiny", "clip_vit_b32"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """The library's own checkpointing recomputes activations: same loss and gradients."""
    grads = []
    for checkpointing in (False, True):
        enc = create_encoder(name, pretrained=False)
        enc.set_trainable("all")
        if checkpointing:
            enc.set_grad_checkpointing(True)
        pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        grid, pooled = enc(pixels)
        (grid.square().mean() + pooled.mean()).backward()
        grads.append({k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_trains_the_last_block_when_only_it_is_trainable():
    """Checkpointing must not cut the gradient to a trainable block whose input does not
    require grad (reentrant checkpointing would, silently)."""
    enc = create_encoder("vit_tiny", pretrained=False)
    enc.set_trainable("last")
    enc.set_grad_checkpointing(True)
    grid, pooled = enc(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    (grid.square().mean() + pooled.mean()).backward()
    last = enc.net.blocks[-1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last.parameters())
    assert all(p.grad is None for p in enc.net.blocks[0].parameters())


def test_gradient_checkpointing_settings_are_checked_before_any_work():
    from benchmark.config import load_config, resolved_config
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match="is for fine-tuning"):
        resolved_config(load_config("tiny", {"encoder_grad_checkpointing": True}))
    with pytest.raises(ConfigError, match="resnet18: torchvision's ResNet has no gradient"):
        resolved_config(load_config("tiny", {"encoder_grad_checkpointing": True,
                                             "encoder_trainable": "last"}))
    ok = resolved_config(load_config("tiny", {"encoder": "vit_tiny", "encoder_trainable": "last",
                                              "encoder_grad_checkpointing": True}))
    assert ok["encoder_grad_checkpointing"] is True
