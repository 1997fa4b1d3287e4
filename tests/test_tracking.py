"""--log tensorboard|wandb: each epoch's figures reach the tracker, W&B offline without a key."""

from __future__ import annotations

import pytest

from benchmark.errors import ConfigError


def _run(tiny_shapes, tmp_path, log):
    from benchmark.config import load_config
    from benchmark.runner import run_experiment

    cfg = load_config("tiny", {"dataset": str(tiny_shapes), "train.epochs": 2, "log": log,
                               "results_dir": str(tmp_path)})
    return run_experiment(cfg)[0]


def test_an_unknown_tracker_is_a_config_error():
    from benchmark.config import load_config

    with pytest.raises(ConfigError, match="log = 'mlflow'.*none, tensorboard, wandb"):
        load_config("tiny", {"log": "mlflow"})


@pytest.mark.slow
def test_tensorboard_gets_every_epochs_figures(tiny_shapes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = _run(tiny_shapes, tmp_path, "tensorboard")
    acc = EventAccumulator(str(tmp_path / "tensorboard" / record.run_id))
    acc.Reload()
    hist = record.training["history"]
    val = [(e.step, e.value) for e in acc.Scalars("val/CIDEr-D")]
    assert val == [(h["epoch"], pytest.approx(h["val_CIDEr"], rel=1e-6)) for h in hist]
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx([h["loss"] for h in hist], rel=1e-6)
    assert {"train/lr", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])
    # the tracker is not part of what the run is: same config id as without it
    from benchmark.config import config_id

    assert record.config_id == config_id({**record.config, "log": "none"})


@pytest.mark.slow
def test_wandb_runs_offline_without_a_key(tiny_shapes, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_SILENT", "true")
    record = _run(tiny_shapes, tmp_path, "wandb")
    runs = list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{record.run_id}"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the logged history, for `wandb sync`
