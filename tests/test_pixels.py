"""Decoding and preprocessing on the encoder's device (``features.image_decoder:
torchvision``): the same pixels as each library's PIL transform up to resampling, its own
feature-cache key, and clear errors. Run here on the CPU; on CUDA decode_jpeg uses nvJPEG."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from architectures import create_encoder
from benchmark.data import load_karpathy
from benchmark.errors import ConfigError, DatasetError
from benchmark.features import extract_features, load_or_extract
from benchmark.pixels import (
    ImageBytesDataset,
    TensorPreprocess,
    decode_images,
    read_bytes,
    tensor_transform,
)


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
    ours = steps(decoded)
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
    assert json.loads((tv.path / "manifest.json").read_text())["identity"]["image_decoder"] == \
        "torchvision-cpu"  # nvJPEG's pixels would get another key
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
    with pytest.raises(DatasetError, match="bad.jpg: cannot read the image"):
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
    # the shapes images are 128 px, so resnet18's Resize(256) resamples: the two paths differ
    # by rounding (as in the test above), never by a wrong channel order or normalisation
    assert 0 < row["pixel_mean_abs_diff"] < 3e-3 and 0 < row["pixel_rel_l2"] < 0.01, row
    assert row["pixel_mean_abs_diff"] < row["pixel_max_abs_diff"] < 1.0
    bad = CliRunner().invoke(app, ["bench", "--extraction", str(tiny_shapes), "--images", "0"])
    assert bad.exit_code == 2 and "--images 0: must be at least 1" in bad.output


def test_exif_orientation_and_animated_files_read_as_pillow_reads_them(tmp_path):
    """TorchCodec applies a JPEG's EXIF orientation; Pillow (the reference path) does not, so
    such files go through Pillow; a GIF gives its first frame; a wrong file is named."""
    from torchvision.transforms import functional as F

    grad = torch.arange(40 * 20 * 3, dtype=torch.uint8).reshape(20, 40, 3)
    pic = Image.fromarray(grad.numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated, plain = tmp_path / "rot.jpg", tmp_path / "plain.jpg"
    pic.save(rotated, quality=95, exif=exif)
    pic.save(plain, quality=95)
    frames = [Image.new("RGB", (8, 6), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    paths = [rotated, plain, tmp_path / "anim.gif"]
    data = [read_bytes(p) for p in paths]
    rot, flat, gif = decode_images(data, paths, torch.device("cpu"))
    assert rot.shape == flat.shape == (3, 20, 40) and gif.shape == (3, 6, 8)
    ref = F.pil_to_tensor(Image.open(rotated).convert("RGB"))
    assert torch.equal(rot, ref)  # read by Pillow, exactly
    assert (flat.int() - ref.int()).abs().float().mean() < 1.0  # libjpeg-turbo's rounding
    assert gif[:, 0, 0].tolist() == [255, 0, 0]
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="notes.jpg: cannot read the image"):
        decode_images([read_bytes(tmp_path / "notes.jpg")], [tmp_path / "notes.jpg"],
                      torch.device("cpu"))


def test_fine_tuning_with_the_device_decoder_is_refused_up_front():
    from benchmark.config import load_config, resolved_config

    cfg = load_config("tiny", {"encoder_trainable": "last", "features.image_decoder": "torchvision"})
    with pytest.raises(ConfigError, match="fine-tuning reads images through the library's own PIL"):
        resolved_config(cfg)


@pytest.mark.slow
def test_a_torchvision_run_captions_its_files_as_recorded(tiny_shapes, tmp_path, monkeypatch):
    """The run's features, its throughput figure and `capbench caption` all decode on the
    device path: captioning the test files reproduces the recorded test captions."""
    from benchmark import captioner, inference
    from benchmark.config import load_config
    from benchmark.runner import run_experiment
    from tests.conftest import captions_of

    used = {"throughput": [], "caption": []}

    def spy(real, kind, pick):
        def wrapped(*args, **kwargs):
            used[kind].append(pick(args, kwargs))
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(inference, "extract_features", spy(
        inference.extract_features, "throughput", lambda a, k: k.get("image_decoder", "pil")))
    monkeypatch.setattr(captioner, "load_pixels", spy(
        captioner.load_pixels, "caption",
        lambda a, k: "torchvision" if isinstance(a[1], TensorPreprocess) else "pil"))

    cfg = load_config("tiny", {"dataset": str(tiny_shapes), "train.epochs": 2,
                               "features.image_decoder": "torchvision",
                               "features.cache_dir": str(tmp_path / "cache"),
                               "results_dir": str(tmp_path)})
    record, _ = run_experiment(cfg)
    assert record.config["features"]["image_decoder"] == "torchvision"
    (store,) = (tmp_path / "cache").glob("resnet18-*")
    assert json.loads((store / "manifest.json").read_text())["identity"]["image_decoder"] == \
        "torchvision-cpu"
    recorded = {p["filename"]: p["caption"] for p in record.predictions}
    assert captions_of(record, tiny_shapes.parent / "images", tmp_path) == recorded
    assert used["throughput"] == ["torchvision"] and set(used["caption"]) == {"torchvision"}
    assert len(used["caption"]) == len(recorded)
    # attention maps and Grad-CAM (explain, gallery, pointing game) preprocess as the run did
    from benchmark.checkpoint import load_run

    run = load_run(record.run_id, tmp_path)
    assert run.image_decoder == "torchvision"
    img = Image.open(tiny_shapes.parent / "images" / record.predictions[0]["filename"]).convert("RGB")
    ours = run.preprocess(img)
    from torchvision.transforms.functional import pil_to_tensor

    want = tensor_transform(run.encoder.transform)([pil_to_tensor(img)])[0]
    assert torch.equal(ours, want) and not torch.equal(ours, run.encoder.transform(img))


def test_without_torchcodec_s_image_decoders_torchvision_io_decodes_the_same_pixels(
        photos, monkeypatch, request):
    """A machine whose preinstalled torch is older than TorchCodec's image decoders (such as
    torch 2.11 with torchvision 0.26) decodes through torchvision.io: on the CPU the same
    libjpeg-turbo pixels, under a cache key that names the library; neither: ConfigError."""
    import sys

    from benchmark.features import store_identity
    from benchmark.pixels import jpeg_decoder

    enc = create_encoder("resnet18", pretrained=False)
    data = [ImageBytesDataset(photos)[i] for i in range(len(photos))]
    paths = [p.path for p in photos]
    request.addfinalizer(jpeg_decoder.cache_clear)  # later tests look up TorchCodec again
    jpeg_decoder.cache_clear()
    assert jpeg_decoder()[0] == "torchcodec"
    ours, key = decode_images(data, paths, torch.device("cpu")), store_identity(enc, "torchvision")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import fails
    assert jpeg_decoder()[0] == "torchcodec"  # looked up once a process
    jpeg_decoder.cache_clear()
    assert jpeg_decoder()[0] == "torchvision.io"
    theirs = decode_images(data, paths, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    fallback = store_identity(enc, "torchvision")
    assert fallback == {**key, "jpeg_decoder": "torchvision.io"} and "jpeg_decoder" not in key
    assert store_identity(enc, "pil") == enc.cache_identity()
    from benchmark.doctor import doctor_rows

    assert dict(doctor_rows())["image_decoder: torchvision"] == "[green]ok[/] (torchvision.io decode_jpeg)"
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    jpeg_decoder.cache_clear()
    with pytest.raises(ConfigError, match="TorchCodec's decode_jpeg .or torchvision.io's.*"
                                          "features.image_decoder: pil"):
        store_identity(enc, "torchvision")
    assert dict(doctor_rows())["image_decoder: torchvision"].startswith("[yellow]unavailable[/]")
