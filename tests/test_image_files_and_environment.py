"""Images and the environment a careless user can break: 16-bit pixels, decompression bombs,
pipes, link loops and worker errors; offline tokenizers and a cache root that is a file; a
full disk while the training state is written; paths that rich would read as markup
(issue 24, classes 7-9)."""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.errors import CapbenchWarning, DatasetError, StorageError
from benchmark.imagefile import open_rgb

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error(out, *messages):
    """Exit 2, one ``error:`` line, no traceback, each of ``messages`` said."""
    text = " ".join(out.output.split())
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and out.output.count("error:") == 1, out.output
    for m in messages:
        assert m in text, (m, out.output)
    return text


def _pixels(seed=0, shape=(12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------ class 8: wrong pixels
def test_16_bit_images_read_as_their_8_bit_equivalents(tmp_path):
    """A 16-bit greyscale PNG (I;16), a 32-bit integer image (I) and a float TIFF in [0, 1]
    give the pixels of the 8-bit image they came from (within 1/255); convert('RGB') made the
    16-bit PNG nearly white (every value above 255 clipped)."""
    grey = _pixels()
    Image.fromarray(grey, "L").save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(grey.astype(np.int32) * 257, "I").save(tmp_path / "g32.tif")
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "gf.tif")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16" and np.asarray(im.convert("RGB")).mean() > 250  # the bug
    want = np.asarray(open_rgb(tmp_path / "g8.png")).astype(int)
    for name in ("g16.png", "g32.tif", "gf.tif"):
        got = np.asarray(open_rgb(tmp_path / name)).astype(int)
        assert got.shape == want.shape == (12, 16, 3)
        assert np.abs(got - want).max() <= 1, name


def test_16_bit_rgb_and_odd_ranges(tmp_path):
    """A 16-bit RGB image matches its 8-bit version within 1/255; float pixels outside [0, 1]
    have no known scale and are refused, naming the file."""
    rgb = _pixels(1, (12, 16, 3))
    Image.fromarray(rgb, "RGB").save(tmp_path / "c8.png")
    wide = rgb.astype(">u2") * 257  # a 16-bit RGB PNG, written by hand (Pillow cannot)
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + row.tobytes() for row in wide)
    (tmp_path / "c16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 12, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    got = np.asarray(open_rgb(tmp_path / "c16.png")).astype(int)
    assert np.abs(got - np.asarray(open_rgb(tmp_path / "c8.png")).astype(int)).max() <= 1
    Image.fromarray(np.full((4, 4), 3.5, np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(DatasetError, match=r"hdr.tif: F pixels range from 3.5 to 3.5, outside 0..1"):
        open_rgb(tmp_path / "hdr.tif")


def test_every_reader_scales_16_bit_pixels(tmp_path):
    """The feature extractor's dataset, the torchvision decoder's Pillow path and the
    gallery's thumbnails all read a 16-bit PNG as its 8-bit version."""
    from benchmark.data import ImageRecord
    from benchmark.gallery import _make_thumb
    from benchmark.pixels import ImageFolderDataset, decode_images, read_bytes

    grey = _pixels(2, (40, 40))
    Image.fromarray(grey, "L").save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    recs = [ImageRecord(i, n, tmp_path / n, "test", (), ()) for i, n in enumerate(("g8.png", "g16.png"))]
    to_tensor = lambda im: torch.from_numpy(np.asarray(im).copy()).float()  # noqa: E731
    ds = ImageFolderDataset(recs, to_tensor)
    assert (ds[0] - ds[1]).abs().max() <= 1
    dec = decode_images([read_bytes(r.path) for r in recs], [r.path for r in recs], torch.device("cpu"))
    assert (dec[0].int() - dec[1].int()).abs().max() <= 1
    thumbs = [np.asarray(Image.open(tmp_path / _make_thumb(r.path, tmp_path))).astype(int) for r in recs]
    assert np.abs(thumbs[0] - thumbs[1]).max() <= 1


# ------------------------------------------------------------------ class 7: bombs, workers
def test_decompression_bombs_are_refused_or_warned_naming_the_file(tmp_path, monkeypatch):
    """Above Pillow's limit it only warns: a CapbenchWarning naming the file (not Pillow's
    anonymous one); above twice the limit Pillow refuses: a DatasetError naming the file and
    what to do (it was a traceback in feature extraction)."""
    from benchmark.data import ImageRecord
    from benchmark.pixels import ImageFolderDataset

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 pixels: a warning
    Image.new("RGB", (50, 50)).save(tmp_path / "huge.png")  # 2500 > 2 x 1000: refused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_rgb(tmp_path / "big.png").size == (40, 40)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and issubclass(caught[0].category, CapbenchWarning)
    assert "big.png: 40x40 = 1,600 pixels, more than Pillow's decompression-bomb limit" in said[0]
    ds = ImageFolderDataset([ImageRecord(0, "huge.png", tmp_path / "huge.png", "test", (), ())],
                            lambda im: im)
    with pytest.raises(DatasetError, match=r"huge.png: too large to read safely .* downscale it"):
        ds[0]


def _truncated_shapes(tiny_shapes: Path, tmp_path: Path) -> Path:
    """A copy of the tiny shapes set whose 5th image is a truncated JPEG (under a .png name)."""
    root = tmp_path / "ds[x]"
    shutil.copytree(tiny_shapes.parent, root)
    victim = sorted((root / "images").iterdir())[4]
    buf = tmp_path / "whole.jpg"
    Image.open(victim).convert("RGB").save(buf, "JPEG")
    victim.write_bytes(buf.read_bytes()[:300])
    return root / "dataset.json", victim


def test_a_worker_s_error_is_one_line_naming_the_file(tiny_shapes, tmp_path, monkeypatch):
    """features.num_workers: 1 and a truncated JPEG: one `error:` line naming the file, not
    torch's 'Caught DatasetError in DataLoader worker process 0' with the worker's traceback.
    The dataset lies in a folder named with [ ], which rich used to read as markup."""
    monkeypatch.setenv("CAPBENCH_CACHE", str(tmp_path / "cache"))
    dataset, victim = _truncated_shapes(tiny_shapes, tmp_path)
    cfg = tmp_path / "workers.yaml"
    tiny = (Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text()
    cfg.write_text(tiny + "features:\n  num_workers: 1\n")
    text = _one_error(_invoke("run", "--config", cfg, "--arch", "lstm", "--dataset", dataset,
                              "--results-dir", tmp_path / "r[1]", "--device", "cpu"),
                      f"{victim}: cannot read the image (Truncated File Read)")
    assert "DataLoader worker" not in text and "Original" not in text


# ------------------------------------------------------------------ class 7: a full disk
def test_a_full_disk_while_saving_the_training_state_keeps_the_last_one(tmp_path, monkeypatch):
    """torch.save's 'unexpected pos' (a full disk) is a StorageError naming the folder; the
    half-written temp file is removed and the previous epoch's state is kept whole. A temp
    left by a killed process has a name the next write removes."""
    from benchmark import train

    state = tmp_path / "unfinished" / "cid" / "run.pt"
    train.write_train_state(state, {"epoch": 1})
    dead = state.parent / ".run.pt.999999999.x.tmp"  # pid 999999999: no such process
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 4096)  # what got written before the disk filled
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4544 vs 4438")

    monkeypatch.setattr(train.torch, "save", full_disk)
    dead.write_bytes(b"\0" * 10)
    with pytest.raises(StorageError, match=rf"cannot write the training state to the folder "
                                           rf"{state.parent} \(.*unexpected pos.*--resume"):
        train.write_train_state(state, {"epoch": 2})
    monkeypatch.setattr(train.torch, "save", real_save)
    assert sorted(p.name for p in state.parent.iterdir()) == ["run.pt"]  # no temp, dead one gone
    assert torch.load(state)["epoch"] == 1


# ------------------------------------------------------------------ class 9: pipes, loops, doctor
def _fake_run():
    """What caption_files needs of a run: its 'caption' is the mean pixel value."""
    run = SimpleNamespace(config={"features": {"batch_size": 4}}, image_decoder="pil",
                          device=torch.device("cpu"), run_id="fake[run]", arch="lstm",
                          decode=SimpleNamespace(beam_size=1), load_seconds=0.0)
    run.encoder = SimpleNamespace(name="fake", transform=lambda im: torch.tensor(
        [np.asarray(im, dtype=np.float64).mean()]))
    run.raw_features = lambda px: (px, px)
    run.caption_ids = lambda grid, pooled: [[round(float(v))] for v in grid[:, 0]]
    run.tokenizer = SimpleNamespace(decode=lambda ids: [f"mean{ids[0]}"])
    return run


def test_caption_refuses_pipes_and_names_link_loops(tmp_path, monkeypatch):
    """caption on a FIFO returned at once (it blocked forever); a symbolic link loop, given or
    in a folder, is named as one (it was 'no such file', or silently skipped); the other
    images are captioned, 16-bit ones as their 8-bit selves, in a folder named with [ ]."""
    from benchmark import captioner

    monkeypatch.setattr(captioner, "load_run", lambda *a, **k: _fake_run())  # where it is called
    folder = tmp_path / "imgs[x]"
    folder.mkdir()
    grey = _pixels(3)
    Image.fromarray(grey, "L").save(folder / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "b16.png")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("loop.png", folder / "loop.png")
    t0 = time.perf_counter()
    out = _invoke("caption", folder, folder / "pipe.jpg", folder / "loop.png", "--run", "x",
                  "--format", "json")
    assert time.perf_counter() - t0 < 30 and out.exit_code == 1, out.output
    text = " ".join(out.output.split())
    assert f"failed: {folder / 'pipe.jpg'}: a named pipe (FIFO), not a regular file" in text
    assert f"failed: {folder / 'loop.png'}: a symbolic link loop" in text
    assert "Traceback" not in out.output
    import json

    rows = json.loads(out.stdout[out.stdout.index("["):out.stdout.rindex("]") + 1])
    assert [r["file_name"] for r in rows] == ["a8.png", "b16.png"]
    assert rows[0]["caption"] == rows[1]["caption"] == f"mean{round(grey.mean())}"


def test_explain_and_data_name_pipes_and_link_loops(tmp_path):
    """explain on a FIFO fails at once with one error line; `data flickr8k` names a link loop
    among the images (it counted it as missing) and an --images folder that is one."""
    os.mkfifo(tmp_path / "pipe.png")
    _one_error(_invoke("explain", tmp_path / "pipe.png", "--run", "x", "--results-dir", tmp_path),
               "pipe.png: a named pipe (FIFO), not a regular file")
    img = tmp_path / "imgs"
    img.mkdir()
    names = [f"{1000 + i}_{i:04x}abc.jpg" for i in range(10)]
    rows = ["image,caption"]
    for i, n in enumerate(names):
        if i == 3:
            os.symlink(n, img / n)
        else:
            Image.new("RGB", (16, 12), (20 * i, 40, 90)).save(img / n)
        rows += [f"{n},a dog number {k} runs on the grass ." for k in range(3)]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    out = _invoke("data", "flickr8k", "--captions", tmp_path / "captions.txt", "--images", img,
                  "--out", tmp_path / "out" / "dataset.json")
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "0 missing, 1 unreadable" in text and "1003_0003abc.jpg: a symbolic link loop" in text
    os.symlink("loopdir", tmp_path / "loopdir")
    _one_error(_invoke("data", "flickr8k", "--captions", tmp_path / "captions.txt", "--images",
                       tmp_path / "loopdir", "--out", tmp_path / "o2" / "dataset.json"),
               "is not a folder (a symbolic link loop")


def test_doctor_reports_a_cache_root_that_is_a_file(tmp_path, monkeypatch):
    from benchmark.doctor import cache_root_problem

    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("CAPBENCH_CACHE", str(tmp_path / "f"))
    out = _invoke("doctor")
    text = " ".join(out.output.split())
    assert out.exit_code == 0 and "unusable: it is a file, not a folder; set CAPBENCH_CACHE" in text
    assert "is a file, not a folder" in cache_root_problem(tmp_path / "f" / "sub")
    assert cache_root_problem(tmp_path / "new" / "sub") is None


# ------------------------------------------------------------------ class 9: offline tokenizer
def test_an_offline_hub_tokenizer_fails_in_seconds(tiny_shapes, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE, or a hub that takes no connection, with a name not in the local cache:
    refused at once saying so and what to do (it retried for 215 s)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    args = ("run", "--config", "tiny", "--dataset", tiny_shapes, "--tokenizer",
            "bert-base-uncased", "--results-dir", tmp_path / "r")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    _one_error(_invoke(*args), "tokenizer 'bert-base-uncased'", "not a folder",
               "not in the local Hugging Face cache", "HF_HUB_OFFLINE is set",
               "pass the folder of a saved tokenizer")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    _one_error(_invoke(*args), "not in the local Hugging Face cache", "127.0.0.1 cannot be reached")
    assert time.perf_counter() - t0 < 20


def test_the_hub_probe_gives_up_after_its_timeout(monkeypatch):
    from benchmark import tokenization

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    def silent(*args, **kwargs):  # a host that never answers
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(tokenization.socket, "create_connection", silent)
    t0 = time.perf_counter()
    assert "did not answer within 0.3 s" in tokenization.hub_offline_reason(0.3)
    assert time.perf_counter() - t0 < 2


# ------------------------------------------------------------------ class 7: markup
def test_paths_with_brackets_are_printed_as_given(tmp_path):
    """Errors and warnings quoting a path with [ ] print it whole (rich read '[x]' as a style
    tag: a MarkupError traceback, or the text silently dropped)."""
    missing = tmp_path / "[bold]x[/bold]" / "dataset.json"
    text = _one_error(_invoke("run", "--config", "tiny", "--dataset", missing, "--results-dir",
                              tmp_path / "r"))
    assert "[bold]x[/bold]" in text
    out = _invoke("report", "--results-dir", tmp_path / "[/]")
    assert "Traceback" not in out.output and "[/]" in out.output
