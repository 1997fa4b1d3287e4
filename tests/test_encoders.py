import urllib.error

import pytest
import torch
from PIL import Image

from architectures import EncoderWeightsError, create_encoder


@pytest.mark.parametrize("name,grid,dim,pooled", [
    ("resnet18", 49, 512, 512),
    ("vit_tiny", 196, 192, 192),
    ("clip_vit_b32", 49, 768, 512),
])
def test_encoder_shapes_and_frozen(name, grid, dim, pooled):
    enc = create_encoder(name, pretrained=False)
    img = Image.new("RGB", (300, 200), (200, 10, 10))
    x = torch.stack([enc.transform(img)] * 2)
    g, p = enc(x)
    assert g.shape == (2, grid, dim) and p.shape == (2, pooled)
    assert (enc.grid_size, enc.grid_dim, enc.pooled_dim) == (grid, dim, pooled)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen encoders stay in eval mode


def test_random_init_is_seeded_and_keyed():
    a = create_encoder("resnet18", pretrained=False, init_seed=0)
    b = create_encoder("resnet18", pretrained=False, init_seed=0)
    c = create_encoder("resnet18", pretrained=False, init_seed=1)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(a(x)[1], b(x)[1])
    assert not torch.equal(a(x)[1], c(x)[1])
    assert a.cache_identity() == b.cache_identity() != c.cache_identity()
    assert " at 0x" not in a.cache_identity()["preprocessing"]


def test_offline_pretrained_names_the_file_and_the_escape(monkeypatch, tmp_path):
    import torchvision.models._api as api

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(EncoderWeightsError) as exc:
        create_encoder("resnet18", pretrained=True)
    msg = str(exc.value)
    assert "resnet18-" in msg and str(tmp_path) in msg and "--no-pretrained" in msg


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(123)
    net = torchvision.models.resnet18()
    path = tmp_path / "r18.safetensors"
    save_file(net.state_dict(), str(path))
    enc = create_encoder("resnet18", weights=str(path))
    assert enc.weights_id.startswith("file:")
    assert torch.equal(enc.body[0].weight, net.conv1.weight)


def test_bad_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="bad.pt"):
        create_encoder("resnet18", weights=str(bad))
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        create_encoder("resnet18", weights=str(tmp_path / "nope.pt"))
