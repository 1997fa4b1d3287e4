"""Several processes through torch.distributed: 2 CPU processes (gloo) = 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark.records import load_records

ROOT = Path(__file__).resolve().parents[1]
#: the DDP equivalence runs' dataset: 38 train images (int(0.7 x 55)), 8 val, 9 test
SMALL = "shapes:55"


def _capbench(args, cache: Path, timeout=300):
    env = {**os.environ, "CAPBENCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "benchmark.cli", *map(str, args)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.long
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """XE then SCST: per-epoch losses within 1e-5, the same SCST rewards, and identical test
    captions and metrics; the two ranks extract the feature shards between them and rank 0
    alone writes the record."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["decoder_hparams"]["dropout"] = 0.0  # each rank draws its own dropout masks
    # 55 images, 38 of them train (the sizes only need the short batches below; 160 images
    # took 3 times as long to extract and train, twice). 37: XE's last batch is short
    # (190 pairs = 5 x 37 + 5) and SCST's last batch holds one of the 38 images, so rank 1
    # has none and takes part with zero weight
    cfg["dataset"] = SMALL
    cfg["train"].update(epochs=2, scst_epochs=2, batch_size=37)
    cfg["features"] = {"shard_size": 16}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _capbench(["run", "--config", path, "--results-dir", tmp_path / "one"], tmp_path / "c1")
    out = _capbench(["run", "--config", path, "--results-dir", tmp_path / "two", "--nproc", "2"],
                    tmp_path / "c2")
    assert "torch.distributed.run" in out.stderr and "--nproc-per-node=2" in out.stderr
    (one,), _ = load_records(tmp_path / "one")
    (two,), _ = load_records(tmp_path / "two")
    assert two.environment["world_size"] == 2 and one.environment["world_size"] == 1
    h1, h2 = one.training["history"], two.training["history"]
    assert [h["phase"] for h in h1] == [h["phase"] for h in h2] == ["xe", "xe", "scst", "scst"]
    a, b = [h["loss"] for h in h1], [h["loss"] for h in h2]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    r1, r2 = [h["reward"] for h in h1[2:]], [h["reward"] for h in h2[2:]]
    assert r1[0] > 0 and max(abs(x - y) for x, y in zip(r1, r2, strict=True)) < 1e-9, (r1, r2)
    assert two.predictions == one.predictions and two.metrics == one.metrics
    assert [h.get("val_CIDEr") for h in h1] == [h.get("val_CIDEr") for h in h2]
    # the features were extracted in shards of 16 images, by both ranks, and are complete
    (store,) = (tmp_path / "c2" / "features").glob("resnet18-*")
    manifest = json.loads((store / "manifest.json").read_text())
    assert len(manifest["shards"]) == -(-len(manifest["image_ids"]) // 16) > 2
    assert not list((tmp_path / "two" / "unfinished").glob("**/*.pt"))
    # capbench gpu-table's DDP step reads the same two folders into these figures
    from benchmark.gpu_table import compare_ddp_runs, environment, render

    got = compare_ddp_runs(tmp_path / "one", tmp_path / "two")
    assert got == {"world_size": 2, "phases": ["xe", "xe", "scst", "scst"],
                   "max_loss_diff": max(abs(x - y) for x, y in zip(a, b, strict=True)),
                   "max_reward_diff": max(abs(x - y) for x, y in zip(r1, r2, strict=True)),
                   "same_predictions": True, "same_metrics": True,
                   "cider_one": one.metrics["CIDEr"], "cider_two": two.metrics["CIDEr"]}
    md = render({"environment": environment("cpu"), "quick": True,
                 "steps": {"ddp": {"ok": True, "seconds": 1.0, "backend": "gloo", "rows": got}}})
    assert (f"DDP, 2 processes (gloo) against 1, phases xe/xe/scst/scst: largest loss difference "
            f"{got['max_loss_diff']:.1e}") in md and f"CIDEr {one.metrics['CIDEr']:.4f} vs" in md


@pytest.mark.slow
@pytest.mark.long
def test_two_gloo_processes_fine_tune_like_one(tmp_path):
    """Fine-tuning the last ViT block (no batch norm): both ranks' encoders and decoders under
    DDP, each image's random crop seeded by its place in the epoch; the same per-epoch losses
    within 1e-5, validation CIDEr-D and test captions as one process with the same batch."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["decoder_hparams"]["dropout"] = 0.0
    cfg.update(encoder="vit_tiny", encoder_trainable="last", encoder_lr=1e-3)
    # 185 captions a step = 37 of the 38 train images (5 captions each): the last step holds
    # one image, so rank 1 has none and takes part with zero weight
    cfg["dataset"] = SMALL
    cfg["train"].update(epochs=2, batch_size=185)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _capbench(["run", "--config", path, "--results-dir", tmp_path / "one"], tmp_path / "c1")
    _capbench(["run", "--config", path, "--results-dir", tmp_path / "two", "--nproc", "2"],
              tmp_path / "c2")
    (one,), _ = load_records(tmp_path / "one")
    (two,), _ = load_records(tmp_path / "two")
    assert two.environment["world_size"] == 2
    assert two.training["encoder"]["trainable"] == "last"
    a = [h["loss"] for h in one.training["history"]]
    b = [h["loss"] for h in two.training["history"]]
    assert len(a) == 2 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    assert [h["val_CIDEr"] for h in one.training["history"]] == \
        [h["val_CIDEr"] for h in two.training["history"]]
    assert two.predictions == one.predictions and two.metrics == one.metrics


@pytest.mark.parametrize("name", ["attn_lstm", "lstm", "rnn", "transformer"])
def test_every_decoder_parameter_gets_a_gradient(name):
    """The decoder's DistributedDataParallel runs without ``find_unused_parameters`` (which
    costs a graph traversal a step and warns on every rank), so each decoder must use every
    parameter. (The fine-tuned encoder's DDP looks for unused ones: CLIP's projection
    feeds only the pooled vector, which the transformer and attn_lstm do not read.)"""
    import torch

    from architectures import create_decoder

    torch.manual_seed(0)
    model = create_decoder(name, vocab_size=20, grid_dim=16, pooled_dim=8)
    out = model(torch.randn(3, 5, 16), torch.randn(3, 8), torch.randint(3, 20, (3, 6)),
                torch.tensor([6, 4, 3]))
    out.logits.sum().backward()
    assert [k for k, p in model.named_parameters() if p.grad is None] == []


def test_nproc_below_one_is_refused():
    from typer.testing import CliRunner

    from benchmark.cli import app

    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--nproc", "0"])
    assert out.exit_code == 2 and "--nproc 0: must be at least 1" in out.output


def test_a_single_process_is_rank_0_of_1():
    from benchmark import distributed

    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    assert distributed.share([5, 6, 7]) == [5, 6, 7]


def test_compile_is_refused_for_a_decoder_it_does_not_suit():
    from benchmark.config import load_config
    from benchmark.errors import ConfigError
    from benchmark.runner import check_run_settings

    check_run_settings(load_config("tiny", {"arch": "transformer", "train.compile": True}))
    with pytest.raises(ConfigError, match="--compile with attn_lstm: its forward runs only"):
        check_run_settings(load_config("tiny", {"arch": "attn_lstm", "train.compile": True}))


def _thirteen_images(dataset: str) -> list:
    from benchmark.data import resolve_dataset

    ds = resolve_dataset(dataset)
    return ds.split("test") + ds.split("val") + ds.split("train")[:1]


def _join(rank: int, world: int, port: int) -> None:
    """Join a gloo process group as ``torchrun`` would set it up (collectives time out after
    30 s, so a rank left waiting fails the test instead of hanging it)."""
    import torch

    from benchmark import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CAPBENCH_DIST_TIMEOUT="30")
    distributed.init(torch.device("cpu"))


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, 2, port, *args)`` in 2 processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_then_exit, args=(fn, 2, port, *args), nprocs=2)


def _then_exit(rank: int, fn, *args) -> None:
    """``fn(rank, *args)``, then leave without the interpreter's finalization: gloo's worker
    threads can abort it ("terminate called without an active exception", SIGABRT; see
    pytorch/pytorch#190489). It failed the unreadable-image test twice in recent
    fresh-clone CI runs, after both ranks had written their results. An exception from ``fn``
    still fails the rank."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _encode_test_split(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    """One rank of :func:`test_the_fine_tuned_encoder_s_test_features_are_encoded_in_shards`."""
    import torch

    from architectures import create_encoder
    from benchmark import distributed
    from benchmark.train import FineTune

    _join(rank, world, port)
    torch.manual_seed(0)  # the same random weights on every rank
    encoder = create_encoder("resnet18", pretrained=False).eval()
    seen = []
    encoder.register_forward_hook(lambda m, args, o: seen.append(len(args[0])))
    images = _thirteen_images(dataset)
    store = FineTune(encoder, None, 1e-4, num_workers=0, batch_size=4).store_all_ranks(
        images, torch.device("cpu"))
    torch.save({"grid": store.grid, "pooled": store.pooled, "ids": store.image_ids,
                "encoded": sum(seen)}, f"{out}.{rank}")
    distributed.shutdown()


def test_the_fine_tuned_encoder_s_test_features_are_encoded_in_shards(tiny_shapes, tmp_path):
    """After fine-tuning, rank r of 2 encodes the test images r, r+2, ... and every rank
    receives all the features, in order, equal to one process's (13 images: 7 and 6)."""
    import torch

    from architectures import create_encoder
    from benchmark.train import FineTune

    out = str(tmp_path / "part")
    _spawn(_encode_test_split, str(tiny_shapes), out)
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", pretrained=False).eval()
    images = _thirteen_images(str(tiny_shapes))
    one = FineTune(encoder, None, 1e-4, num_workers=0, batch_size=4).store(
        images, torch.device("cpu"))
    parts = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert [p["encoded"] for p in parts] == [7, 6]
    for p in parts:
        assert p["ids"] == one.image_ids and p["grid"].dtype == one.grid.dtype == torch.float16
        torch.testing.assert_close(p["grid"].float(), one.grid.float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(p["pooled"].float(), one.pooled.float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(p["grid"][1::2], parts[1]["grid"][1::2])


def _fail_on_rank_1(rank: int, world: int, port: int, out: str) -> None:
    from benchmark import distributed

    _join(rank, world, port)

    def work():
        if rank == 1:
            raise OSError("disk gone")
        return "encoded"

    try:
        said = distributed.all_or_none(work)
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        said = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.{rank}").write_text(said)
    distributed.barrier()  # both ranks are done with the group before either tears it down
    distributed.shutdown()


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """Ranks that encode different images: rank 1's error reaches rank 0 at once (rank 0
    would otherwise wait in the next collective until the timeout)."""
    out = str(tmp_path / "said")
    _spawn(_fail_on_rank_1, out)
    said = [Path(f"{out}.{r}").read_text() for r in (0, 1)]
    assert said == ["CapbenchError: rank 1 failed, so this rank stops too: OSError: disk gone",
                    "OSError: disk gone"]


def _extract_with_a_bad_image_on_rank_1(rank: int, world: int, port: int, dataset: str,
                                        out: str) -> None:
    import dataclasses

    from architectures import create_encoder
    from benchmark import distributed
    from benchmark.features import load_or_extract

    _join(rank, world, port)
    images = _thirteen_images(dataset)
    bad = Path(out).with_name("broken.jpg")
    images[4] = dataclasses.replace(images[4], path=bad)  # in shard 1 of 3 images: rank 1's
    encoder = create_encoder("resnet18", pretrained=False)
    try:
        load_or_extract(encoder, images, cache_dir=Path(out).with_name("cache"), shard_size=3,
                        batch_size=3, num_workers=0)
        said = "extracted"
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        said = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.{rank}").write_text(said)
    distributed.barrier()  # both ranks are done with the group before either tears it down
    distributed.shutdown()


def test_an_unreadable_image_in_one_rank_s_shard_stops_every_rank(tiny_shapes, tmp_path):
    """Sharded extraction: rank 1 cannot read an image of its shard; rank 0, which encoded its
    own shards, stops with rank 1's error instead of waiting at the barrier (or failing with
    gloo's 'Connection closed by peer'), and no manifest is written."""
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "said")
    _spawn(_extract_with_a_bad_image_on_rank_1, str(tiny_shapes), out)
    said = [Path(f"{out}.{r}").read_text() for r in (0, 1)]
    assert said[1].startswith("DatasetError: ") and "broken.jpg: cannot read the image" in said[1]
    assert said[0] == f"CapbenchError: rank 1 failed, so this rank stops too: {said[1]}"
    assert not list((tmp_path / "cache").rglob("manifest.json"))
    assert len(list((tmp_path / "cache").rglob("shard-*.safetensors"))) >= 2  # rank 0's: kept


def test_the_backend_follows_the_device_unless_capbench_dist_backend_names_one(monkeypatch):
    """nccl on CUDA and gloo elsewhere; CAPBENCH_DIST_BACKEND=gloo lets ranks share a GPU
    (NCCL refuses two ranks on one); a wrong name, or nccl without CUDA, is refused before
    torchrun starts."""
    from typer.testing import CliRunner

    from benchmark import distributed
    from benchmark.cli import app
    from benchmark.errors import ConfigError

    monkeypatch.delenv("CAPBENCH_DIST_BACKEND", raising=False)
    assert (distributed.backend("cuda"), distributed.backend("cpu")) == ("nccl", "gloo")
    monkeypatch.setenv("CAPBENCH_DIST_BACKEND", "Gloo")
    assert distributed.backend("cuda") == "gloo"
    monkeypatch.setenv("CAPBENCH_DIST_BACKEND", "mpi")
    with pytest.raises(ConfigError, match="CAPBENCH_DIST_BACKEND='mpi': choose gloo or nccl"):
        distributed.backend("cpu")
    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--device", "cpu", "--nproc", "2"])
    assert out.exit_code == 2 and "choose gloo or nccl" in out.output
    monkeypatch.setenv("CAPBENCH_DIST_BACKEND", "nccl")
    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--device", "cpu", "--nproc", "2"])
    assert out.exit_code == 2 and "CAPBENCH_DIST_BACKEND=nccl needs CUDA" in out.output


def test_what_every_rank_would_refuse_is_said_once_before_torchrun_starts(monkeypatch, tmp_path):
    """A bad CAPBENCH_DIST_TIMEOUT, a missing dataset or an unwritable results folder: one
    error from the launcher (exit 2), and torchrun never starts."""
    from typer.testing import CliRunner

    from benchmark import distributed
    from benchmark.cli import app
    from benchmark.errors import ConfigError

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv: launched.append(argv) or 0)
    args = ["run", "--config", "tiny", "--device", "cpu", "--nproc", "2"]
    monkeypatch.delenv("CAPBENCH_DIST_TIMEOUT", raising=False)
    assert distributed.timeout_seconds() == 14400
    for bad in ("abc", "0", "-5", "1.5"):
        monkeypatch.setenv("CAPBENCH_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match=f"CAPBENCH_DIST_TIMEOUT='{bad}': give a whole"):
            distributed.timeout_seconds()
    out = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert out.exit_code == 2 and "CAPBENCH_DIST_TIMEOUT='1.5': give a whole number" in out.output
    monkeypatch.setenv("CAPBENCH_DIST_TIMEOUT", " 60 ")
    assert distributed.timeout_seconds() == 60
    out = CliRunner().invoke(app, [*args, "--dataset", str(tmp_path / "no" / "dataset.json")])
    assert out.exit_code == 2 and "no/dataset.json does not exist" in out.output
    (tmp_path / "a-file").write_text("")
    out = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "a-file")])
    assert out.exit_code == 2 and "Pass --results-dir with a writable folder" in out.output
    assert launched == []
    out = CliRunner().invoke(app, [*args, "--results-dir", str(tmp_path / "r")])
    assert out.exit_code == 0 and len(launched) == 1


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_launch_with_its_error_and_no_traceback(tmp_path):
    """An image no rank can read (found only while extracting): each rank prints its error,
    the launcher says the processes stopped and exits 2, and no Python traceback (torchrun's
    ChildFailedError) is shown."""
    from benchmark.shapes import generate_shapes

    dataset = generate_shapes(tmp_path / "ds", 40, 0)
    (tmp_path / "ds" / "images" / "shapes_00004.png").write_text("not an image")
    env = {**os.environ, "CAPBENCH_CACHE": str(tmp_path / "c"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "benchmark.cli", "run", "--config", "tiny",
                          "--dataset", str(dataset), "--device", "cpu", "--results-dir",
                          str(tmp_path / "r"), "--nproc", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text
    assert "shapes_00004.png: cannot read the image" in text and "error: " in text
    assert "error: the 2 processes stopped (exit code 2)" in text


def test_ranks_beyond_the_gpus_share_them_only_with_gloo(monkeypatch):
    """Under torchrun, `cuda` is GPU LOCAL_RANK; a rank beyond the machine's GPUs is an error,
    or with CAPBENCH_DIST_BACKEND=gloo takes GPU LOCAL_RANK % count (here 3 % 2 = 1)."""
    import torch

    from benchmark import device as devices
    from benchmark.errors import ConfigError

    monkeypatch.setattr(devices, "_select_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CAPBENCH_DIST_BACKEND", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.select_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ConfigError, match="local rank 3 has no GPU of its own .this machine has 2"):
        devices.select_device("cuda")
    monkeypatch.setenv("CAPBENCH_DIST_BACKEND", "gloo")
    assert devices.select_device("cuda") == torch.device("cuda", 1)
