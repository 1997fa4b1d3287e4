"""Sizes and values a careless user can type (issue 24, classes 2 to 4): every size has an
upper bound or an up-front estimate, every value its real range checked when the config
loads, and a run that diverges or input that is ambiguous is refused, never recorded."""

import pytest
import yaml
from typer.testing import CliRunner

from benchmark import fsutil, limits
from benchmark.cli import app
from benchmark.config import CONFIG_DIR, MAX_SEED

runner = CliRunner()


def _fails(args, *messages):
    result = runner.invoke(app, [str(a) for a in args])
    out = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert "Traceback" not in out and "error" in out.lower(), out
    for m in messages:
        assert m in out, (args, m, out)
    return out


# ----------------------------------------------------------- class 2: bounded sizes
@pytest.mark.parametrize("args,message", [
    (["compare", "a", "b", "--resamples", "100000000"], "--resamples 100000000: give 1 to 100,000"),
    (["run", "--config", "tiny", "--epochs", "1000000000"],
     "train.epochs = 1000000000 is out of range (allowed: >= 1 and <= 10000)"),
    (["run", "--config", "tiny", "--nproc", "64"], "--nproc 64: this machine gives capbench"),
    (["data", "shapes", "--out", "{tmp}/s", "--n-images", "2000000"],
     "--n-images 2000000: give 10 to 1,000,000"),
    (["run", "--config", "tiny", "--dataset", "shapes:2000000"],
     "shapes takes 10 to 1,000,000 images"),
    (["baseline", "--k", "1000", "--no-pretrained"], "--k 1000: give 1 to 100"),
    (["bench", "--arch", "lstm", "--grid-dim", "100000"], "--grid-dim 100000: give 1 to 65,536"),
    (["ground", "--run", "x", "--tolerance", "nan"], "--tolerance nan: give a finite number"),
    (["ground", "--run", "x", "--tolerance", "inf"], "--tolerance inf: give a finite number"),
])
def test_sizes_beyond_their_bound_are_refused_before_any_work(tmp_path, args, message):
    _fails([a.replace("{tmp}", str(tmp_path)) for a in args], message)
    assert not (tmp_path / "s").exists()


def test_a_workload_that_cannot_fit_in_memory_is_refused_with_an_estimate():
    out = _fails(["bench", "--arch", "lstm", "--grid-size", "60000", "--grid-dim", "60000",
                  "--batch-size", "64"], "this decoder workload needs about", "GiB of memory")
    assert "--batch-size" in out


def test_resamples_that_cannot_fit_in_memory_are_refused(monkeypatch):
    from benchmark.errors import ResourceError
    from benchmark.stats import compare_runs

    class Run:
        run_id, path, split_fingerprint = "r", None, "f"
        per_image = {"image_ids": list(range(1000)), "CIDEr": [0.5] * 1000}

    monkeypatch.setattr(limits, "available_memory", lambda: 10 * 2**20)  # 10 MiB
    with pytest.raises(ResourceError, match=r"100,000 resamples of 1,000 images needs about 1.5 GiB"):
        compare_runs(Run(), Run(), n_resamples=100_000)
    assert compare_runs(Run(), Run(), n_resamples=200)["CIDEr"]["delta"] == 0.0


def test_a_shapes_set_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch):
    real = fsutil.shutil.disk_usage
    monkeypatch.setattr(fsutil.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=2**20))  # 1 MiB free
    _fails(["data", "shapes", "--out", tmp_path / "s", "--n-images", "1000"],
           "has 1.0 MiB free but this run needs about 7.8 MiB")
    assert not (tmp_path / "s" / "images").exists()


# ------------------------------------------------------- class 3: real ranges, finite
@pytest.mark.parametrize("flags,yaml_text,message", [
    (["--seed", str(MAX_SEED + 1)], "", f"seed = {MAX_SEED + 1} is out of range"),
    (["--epochs", str(10**20)], "", f"train.epochs = {10**20} is out of range"),
    ([], "arch: transformer\ndecoder: {num_heads: 0}\n",
     "hyperparameter num_heads=0 is out of range (allowed: >= 1"),
    ([], "decoder: {dropout: .nan}\n", "hyperparameter dropout=nan should be a finite number"),
    ([], "decoder: {dropout: 1.0}\n", "dropout=1.0 is out of range (allowed: >= 0.0 and < 1)"),
    ([], "train: {lr: .inf}\n", "train.lr: expected a finite number, got inf"),
    ([], "train: {warmup_frac: .nan}\n", "train.warmup_frac: expected a finite number"),
    ([], "decode: {length_penalty: -.inf}\n", "decode.length_penalty: expected a finite number"),
    ([], "encoder_init_seed: 4294967296\n", "encoder_init_seed = 4294967296 is out of range"),
])
def test_values_outside_their_real_range_fail_when_the_config_loads(tmp_path, flags, yaml_text,
                                                                     message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: shapes:20\npretrained: false\n" + yaml_text)
    _fails(["run", "--config", cfg, "--results-dir", tmp_path / "r", *flags], message)
    assert not (tmp_path / "r").exists()


# ------------------------------------------- class 4: broken runs and ambiguous input
def test_repeated_seeds_are_refused(tmp_path):
    _fails(["run", "--config", "tiny", "--seeds", "0,1,0"], "--seeds: seed 0 is given twice")
    cfg = tmp_path / "m.yaml"
    cfg.write_text("matrix: {seeds: [3, 3]}\n")
    _fails(["matrix", "--config", cfg, "--results-dir", tmp_path], "matrix.seeds: seed 3 is given twice")
    _fails(["run", "--config", "tiny", "--seeds", f"1,{MAX_SEED + 1}"], "seed 4294967296 is out of range")


@pytest.mark.slow
def test_a_run_whose_loss_diverges_stops_with_no_record(tmp_path, tiny_shapes):
    cfg = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    cfg["train"].update(lr=1e30, grad_clip=0.0, warmup_frac=0.0, epochs=2)
    cfg["dataset"] = str(tiny_shapes)
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = _fails(["run", "--config", path, "--results-dir", tmp_path],
                 "training diverged: epoch 1 (xe) ended with loss nan",
                 "no record is written", "Most likely train.lr = 1e+30 (lower it)")
    assert not list((tmp_path / "runs").glob("*.json")), out
