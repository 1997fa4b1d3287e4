"""A hostile-but-honest user: every bad input fails fast with one clear message naming the
culprit (exit 2, no traceback), overwrites nothing, loses nothing, and leaves no temp file."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from benchmark.cli import app

runner = CliRunner()


def _fails(args, *messages, code=2):
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output
    assert result.exit_code == code, (args, out, result.exception)
    assert "Traceback" not in out, out
    for m in messages:
        assert m in out, (args, m, out)
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def big_dataset(tmp_path, tiny_shapes):
    """3,000 images (one PNG, repeated): extracting them would take minutes on this CPU."""
    src = json.loads(tiny_shapes.read_text())["images"][0]
    img = Path(tiny_shapes).parent / src.get("filepath", "") / src["filename"]
    images = [{"filename": img.name, "filepath": str(img.parent), "imgid": i,
               "split": ("train", "val", "test")[i % 3], "sentences": src["sentences"]}
              for i in range(3000)]
    path = tmp_path / "big" / "dataset.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": images}))
    return path


@pytest.mark.parametrize("flags,yaml_text,message", [
    (["--batch-size", "-4"], "", "train.batch_size = -4 is out of range (allowed: >= 1 and <= 65536)"),
    (["--batch-size", "0"], "", "train.batch_size = 0 is out of range"),
    (["--epochs", "0"], "", "train.epochs = 0 is out of range (allowed: >= 1 and <= 10000)"),
    (["--beam-size", "0"], "", "decode.beam_size = 0 is out of range"),
    ([], "decode: {strategy: nucleus}\n",
     "decode.strategy = 'nucleus' is out of range (must be one of beam, sample)"),
    ([], "decode: {batch_size: 0}\n", "decode.batch_size = 0 is out of range"),
    ([], "decode: {top_p: 1.5}\n", "decode.top_p = 1.5 is out of range"),
    ([], "train: {val_every: 0}\n", "train.val_every = 0 is out of range"),
    ([], "train: {lr: -0.1}\n", "train.lr = -0.1 is out of range (allowed: > 0.0)"),
    ([], "train: {epochs: 2.5}\n", "train.epochs: expected an integer"),
    ([], "arch: transformer\ndecoder: {num_heads: 3}\n", "not divisible by num_heads 3"),
    ([], "decoder: {hidden_dim: big}\n", "hidden_dim='big' should be an integer"),
    ([], "decoder: {dropout: 1.5}\n", "dropout"),
    (["--device", "mps"], "", "--device mps: MPS (Apple GPU) is not available"),
    (["--device", "cuda:3"], "", "CUDA is not available"),
    (["--device", "tpu"], "", "--device 'tpu' is not a torch device"),
])
def test_bad_settings_fail_in_under_a_second_before_reading_images(
        big_dataset, tmp_path, flags, yaml_text, message):
    args = ["run", "--dataset", big_dataset, "--encoder", "resnet50", "--no-pretrained",
            "--results-dir", tmp_path / "res", *flags]
    if yaml_text:
        (tmp_path / "c.yaml").write_text(yaml_text)
        args += ["--config", tmp_path / "c.yaml"]
    t0 = time.perf_counter()
    _fails(args, message)
    # config values fail when the config loads; decoder hyperparameters when the decoder is
    # built on the meta device (whose first use imports torch._dynamo, ~1.3 s once per process)
    limit = 15.0 if "decoder:" in yaml_text else 1.0
    assert time.perf_counter() - t0 < limit
    assert not (tmp_path / "res" / "runs").exists()  # nothing was started


def test_unwritable_results_folder_fails_before_extraction(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPBENCH_CACHE", str(tmp_path / "cache"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--results-dir", blocker / "res"],
           "results folder", str(blocker / "res" / "runs"), "not writable", "--results-dir")
    assert not (tmp_path / "cache" / "features").exists()  # no extraction was wasted


def test_unwritable_cache_fails_before_extraction(tiny_shapes, tmp_path, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    monkeypatch.setenv("CAPBENCH_CACHE", str(blocker))
    _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--results-dir", tmp_path / "r"],
           "feature cache", "not writable", "CAPBENCH_CACHE")


def test_a_full_disk_is_refused_before_extraction(tiny_shapes, tmp_path, monkeypatch):
    import shutil

    from benchmark import fsutil

    monkeypatch.setenv("CAPBENCH_CACHE", str(tmp_path / "cache"))
    real = shutil.disk_usage
    monkeypatch.setattr(fsutil.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000) if "cache" in str(p) else real(p))
    _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--results-dir", tmp_path / "r"],
           "feature cache", "free but this run needs about")
    assert not list((tmp_path / "cache" / "features").glob("*.safetensors"))


@pytest.mark.slow
def test_a_write_failure_at_the_end_saves_the_run_elsewhere(tiny_shapes, tmp_path, monkeypatch):
    from benchmark import records
    from benchmark.records import load_record

    monkeypatch.setenv("CAPBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    real = records.atomic_write_text

    def full_disk(path, text):
        if str(results) in str(path):
            raise OSError(28, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(records, "atomic_write_text", full_disk)
    out = _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--arch", "lstm",
                  "--epochs", "1", "--results-dir", results], "No space left on device",
                 "Nothing is lost")
    (saved,) = (tmp_path / "cache" / "unsaved-runs").glob("*/runs/*.json")
    assert str(saved) in out.replace("\n", "")
    rec = load_record(saved)
    assert rec.arch == "lstm" and rec.metrics["CIDEr"] is not None
    assert (Path(rec.checkpoint) / "decoder.safetensors").is_file()
    assert not list((results / "runs").glob("*.json"))
    assert not [p for p in (results / "checkpoints").iterdir()]  # no half checkpoint, no temp


def test_data_shapes_never_overwrites_without_force(tmp_path):
    out = tmp_path / "s"
    assert runner.invoke(app, ["data", "shapes", "--out", str(out), "--n-images", "10"]).exit_code == 0
    before = (out / "dataset.json").read_bytes()
    _fails(["data", "shapes", "--out", out, "--n-images", "12", "--seed", "3"],
           "already exists", "--force")
    assert (out / "dataset.json").read_bytes() == before
    assert runner.invoke(app, ["data", "shapes", "--out", str(out), "--n-images", "12",
                               "--force"]).exit_code == 0
    assert (out / "dataset.json").read_bytes() != before


def test_weights_that_do_not_fit_name_the_key_and_shapes(tiny_shapes, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), bare)
    _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--weights", bare,
            "--results-dir", tmp_path / "r"], "bare.pt", "holds a Tensor, not a state dict")
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--weights", wrong,
            "--results-dir", tmp_path / "r"], "conv1.weight has shape (8, 3, 3, 3) in the file",
           "(64, 3, 7, 7) in the model")


@pytest.mark.parametrize("text,message", [
    ("x: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
    ("a: [1\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping at the top level"),
    ("matrix: [rnn]\n", "matrix: expected a mapping"),
    ("matrix: {arch: [rnn]}\n", "matrix.arch: unknown key"),
    ("matrix: {seeds: [a]}\n", "matrix.seeds: give integers"),
    ("matrix: {archs: [gru]}\n", "unknown decoder 'gru'"),
])
def test_matrix_config_mistakes(tmp_path, text, message):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(text)
    _fails(["matrix", "--config", cfg, "--results-dir", tmp_path / "r"], message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("cells,message", [
    ({}, "'cells' should name at least one"),
    ({"rnn": {"metrics": {}}}, "cell 'rnn' should be 'decoder/encoder'"),
    ({"rnn/resnet18": 3}, "cell 'rnn/resnet18' should be"),
])
def test_check_baseline_mistakes(tmp_path, cells, message):
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"preset": "tiny", "cells": cells}))
    _fails(["check", "--baseline", base], str(base), message)


def test_small_flag_mistakes(tmp_path):
    _fails(["compare", "a", "b", "--resamples", "0"], "--resamples 0")
    for flag in ("--batch-size", "--iters", "--beam-size"):
        _fails(["bench", "--arch", "rnn", flag, "0"], f"{flag} 0: give 1 to ")
    _fails(["report", "--results-dir", tmp_path / "nowhere"], "does not exist")


def _record_folder(tmp_path) -> Path:
    src = sorted(Path(__file__).resolve().parents[1].glob("results/shapes/runs/*.json"))[0]
    (tmp_path / "runs").mkdir(parents=True)
    (tmp_path / "runs" / src.name).write_text(src.read_text())
    return tmp_path


def test_report_to_unwritable_places(tmp_path):
    results = _record_folder(tmp_path / "res")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(["report", "--results-dir", results, "--format", "csv", "--output", blocker / "b.csv"],
           str(blocker / "b.csv"))
    _fails(["report", "--results-dir", results, "--plot", blocker / "plots"], str(blocker / "plots"))
    (results / "LEADERBOARD.md").unlink()
    (results / "LEADERBOARD.md").mkdir()  # cannot be replaced by a file: like a read-only folder
    result = runner.invoke(app, ["report", "--results-dir", str(results)])
    assert result.exit_code == 0 and "could not write" in result.output and "CIDEr-D" in result.output


def test_report_skips_hand_edited_records_naming_the_field(tmp_path):
    results = _record_folder(tmp_path)
    good = next((results / "runs").glob("*.json"))
    for field in ("metrics", "dataset"):
        data = json.loads(good.read_text())
        del data[field]
        (results / "runs" / f"no-{field}.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["report", "--results-dir", str(results), "--format", "csv"])
    assert result.exit_code == 0, result.output
    for field in ("metrics", "dataset"):
        assert f"no-{field}.json is not a capbench run record: field '{field}' is missing" in \
            result.output.replace("\n", "")
    assert good.stem in result.output  # the good record is still on the board


def test_leftovers_of_killed_processes_are_removed(tmp_path, tiny_shapes, monkeypatch):
    from architectures import create_encoder
    from benchmark.data import load_karpathy
    from benchmark.features import load_or_extract
    from benchmark.fsutil import host_tag, remove_stale_temps
    from benchmark.runner import preflight

    dead, alive = _dead_pid(), os.getpid()
    feats = tmp_path / "features"
    feats.mkdir()
    orphan = feats / f".resnet18-abc.safetensors.{dead}.x1y2.tmp"
    orphan.write_bytes(b"0" * 1000)
    live = feats / f".resnet18-abc.safetensors.{alive}.x1y2.tmp"
    live.write_bytes(b"1")
    here = feats / f".manifest.json.{dead}@{host_tag()}.k3j4.tmp"  # this machine's: pid decides
    # another machine's (on a shared cache): its pid means nothing here, only its age does
    elsewhere = feats / f".shard-00001.safetensors.{dead}@other-node7.a1b2.tmp"
    old_elsewhere = feats / f".shard-00002.safetensors.{dead}@other-node7.c3d4.tmp"
    for p in (here, elsewhere, old_elsewhere):
        p.write_bytes(b"2")
    two_hours_ago = time.time() - 7200
    os.utime(old_elsewhere, (two_hours_ago, two_hours_ago))
    images = load_karpathy(tiny_shapes).images[:3]
    load_or_extract(create_encoder("resnet18", pretrained=False), images, cache_dir=feats)
    assert not orphan.exists() and live.exists() and not here.exists()
    assert elsewhere.exists() and not old_elsewhere.exists()
    assert [p.name for p in feats.glob(f"*.{alive}*.tmp")] == [live.name]  # no temp of ours left

    tmp = tmp_path / "systemp"
    for name in (f"capbench-ptb-{dead}-abcd", f"capbench-check-{dead}-abcd", f".tmp-shapes-{dead}-q"):
        (tmp / name).mkdir(parents=True)
    (tmp / f"capbench-ptb-{alive}-keep").mkdir()
    removed = remove_stale_temps(tmp)
    assert sorted(p.name for p in removed) == sorted([f"capbench-ptb-{dead}-abcd",
                                                      f"capbench-check-{dead}-abcd",
                                                      f".tmp-shapes-{dead}-q"])
    ckpt_tmp = tmp_path / "r" / "checkpoints" / f".20261122-x.{dead}.ckpt.tmp"
    ckpt_tmp.mkdir(parents=True)
    from benchmark.config import load_config, resolved_config

    cfg = load_config("tiny", {"results_dir": str(tmp_path / "r")})
    preflight(cfg, load_karpathy(tiny_shapes), resolved_config(cfg))
    assert not ckpt_tmp.exists()


def test_files_that_are_not_utf8_and_records_without_scores(tmp_path, tiny_shapes):
    utf16 = tmp_path / "d16" / "dataset.json"
    utf16.parent.mkdir()
    utf16.write_text(tiny_shapes.read_text(), encoding="utf-16")
    _fails(["run", "--config", "tiny", "--dataset", utf16, "--results-dir", tmp_path / "r"],
           str(utf16), "not UTF-8 text", "save it as UTF-8")
    results = _record_folder(tmp_path / "res")
    good = next((results / "runs").glob("*.json"))
    data = json.loads(good.read_text())
    data["run_id"], data["per_image"] = "20261122-000000-x-y-s0-0000", {}
    (results / "runs" / "empty.json").write_text(json.dumps(data))
    _fails(["compare", good.stem, "empty", "--results-dir", results], "no per-image scores")
