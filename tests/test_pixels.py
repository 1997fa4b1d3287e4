"""Decoding and preprocessing on the encoder's device (``features.image_decoder:
torchvision``): the same pixels as each library's PIL transform up to resampling, its own
feature-cache key, and clear errors. Run here on the CPU; on CUDA decode_jpeg uses nvJPEG."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from architectures import create_encoder
from benchmark.data import load_karpathy
from benchmark.errors import ConfigError, DatasetError
from benchmark.features import extract_features, load_or_extract
from benchmark.pixels import ImageBytesDataset, decode_images, tensor_transform


@pytest.fixture(scope="module")
def photos(tiny_shapes, tmp_path_factory):
    """Six shapes images: three as JPEG (quality 95, one greyscale, one 4:3), three PNG."""
    folder = tmp_path_factory.mktemp("photos")
    out = []
    for i, im in enumerate(load_karpathy(tiny_shapes).images[:6]):
        pic = Image.open(im.path).convert("RGB")
        if i == 1:
            pic = pic.convert("L")
        if i == 2:
            pic = pic.resize((320, 240))
        path = folder / (f"p{i}.jpg" if i < 3 else f"p{i}.png")
        pic.save(path, quality=95) if i < 3 else pic.save(path)
        out.append(dataclasses.replace(im, path=path))
    return out


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny", "clip_vit_b32"])
def test_tensor_preprocessing_matches_the_library_s_pil_transform(photos, name):
    """torchvision's preset, timm's and open_clip's Compose: same shape; pixels within
    resampling and JPEG-decoder differences (mean |diff| < 0.003 of a normalised unit)."""
    enc = create_encoder(name, pretrained=False)
    steps = tensor_transform(enc.transform)
    data = [ImageBytesDataset(photos)[i] for i in range(len(photos))]
    decoded = decode_images(data, [p.path for p in photos], torch.device("cpu"))
    assert [tuple(d.shape) for d in decoded][:3] == [(3, 128, 128), (3, 128, 128), (3, 240, 320)]
    assert all(d.dtype == torch.uint8 for d in decoded)
    ours = torch.stack([steps(d) for d in decoded])
    ref = torch.stack([enc.transform(Image.open(p.path).convert("RGB")) for p in photos])
    assert ours.shape == ref.shape == (6, 3, 224, 224) and ours.dtype == torch.float32
    diff = (ours - ref).abs()
    assert diff.mean() < 3e-3, diff.mean()  # measured 1.3e-4 to 3.9e-4
    assert diff[3:].mean() < 5e-4, diff[3:].mean()  # PNGs: resampling alone (5.5e-5 to 9.3e-5)
    scale = ref.std()
    assert diff.max() < scale, (diff.max(), scale)


def test_extraction_on_the_device_path_has_its_own_cache_key_and_close_features(photos, tmp_path):
    enc = create_encoder("resnet18", pretrained=False)
    pil = load_or_extract(enc, photos, cache_dir=tmp_path, batch_size=4)
    tv = load_or_extract(enc, photos, cache_dir=tmp_path, batch_size=4, image_decoder="torchvision")
    assert not tv.cache_hit and tv.key != pil.key and len(list(tmp_path.glob("resnet18-*"))) == 2
    again = load_or_extract(enc, photos, cache_dir=tmp_path, image_decoder="torchvision")
    assert again.cache_hit and torch.equal(again.grid.all(), tv.grid.all())
    a, b = tv.pooled.all().float(), pil.pooled.all().float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.99, cos
    g, _, _ = extract_features(enc, photos, batch_size=4, image_decoder="torchvision")
    torch.testing.assert_close(g.half().float(), tv.grid.all().float())


def test_a_step_without_a_tensor_version_and_a_broken_file_are_named(photos, tmp_path):
    from torchvision import transforms as T

    with pytest.raises(ConfigError, match="'ColorJitter'.*features.image_decoder: pil"):
        tensor_transform(T.Compose([T.Resize(8), T.ColorJitter(0.1), T.ToTensor()]))
    flips = SimpleNamespace(name="flips", cache_identity=lambda: {"encoder": "flips"},
                            transform=T.Compose([T.Resize(224), T.RandomHorizontalFlip(),
                                                 T.ToTensor()]))
    with pytest.raises(ConfigError, match="RandomHorizontalFlip"):
        load_or_extract(flips, photos, cache_dir=tmp_path, image_decoder="torchvision")
    assert not list(tmp_path.iterdir())  # refused before any work
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 10)
    broken = [*photos[:2], dataclasses.replace(photos[0], path=bad)]
    data = [ImageBytesDataset(broken)[i] for i in range(3)]
    with pytest.raises(DatasetError, match="cannot decode image .*bad.jpg"):
        decode_images(data, [p.path for p in broken], torch.device("cpu"))


def test_the_setting_is_checked_and_pil_keeps_run_ids():
    from benchmark.config import config_id, load_config, resolved_config

    with pytest.raises(ConfigError, match="image_decoder"):
        load_config("tiny", {"features.image_decoder": "nvjpeg"})
    pil = config_id(resolved_config(load_config("tiny")))
    assert config_id(resolved_config(load_config("tiny", {"features.image_decoder": "pil"}))) == pil
    tv = load_config("tiny", {"features.image_decoder": "torchvision"})
    assert config_id(resolved_config(tv)) != pil


def test_the_extraction_benchmark_times_both_decoders(tiny_shapes):
    import json

    from typer.testing import CliRunner

    from benchmark.cli import app

    out = CliRunner().invoke(app, ["bench", "--extraction", str(tiny_shapes), "--encoder",
                                   "resnet18", "--images", "6", "--batch-size", "4", "--iters",
                                   "1", "--device", "cpu", "--format", "json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)
    assert (row["encoder"], row["images"], row["batch_size"]) == ("resnet18", 6, 4)
    rates = [row[f"{d}_{k}_images_per_s"] for d in ("pil", "torchvision") for k in ("pixels", "e2e")]
    assert all(r > 0 for r in rates)
    assert row["pil_pixels_images_per_s"] > row["pil_e2e_images_per_s"]  # the forward costs
    assert row["speedup"] == row["torchvision_e2e_images_per_s"] / row["pil_e2e_images_per_s"]
    bad = CliRunner().invoke(app, ["bench", "--extraction", str(tiny_shapes), "--images", "0"])
    assert bad.exit_code == 2 and "--images 0: must be at least 1" in bad.output
