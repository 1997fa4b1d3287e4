"""capbench tune / matrix --tune (issue 28): seeded trials on the validation split, resume,
the records' tuning block, and bad input refused before any trial."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import jsonschema
import optuna
import pytest
from typer.testing import CliRunner

import benchmark.tuning as tuning
from benchmark.cli import app
from benchmark.data import resolve_dataset
from benchmark.records import SCHEMA_PATH, load_records
from benchmark.report import leaderboard

TUNING_KEYS = {"study", "storage", "sampler", "seed", "pruner", "budget", "role", "trial",
               "split", "objective", "value", "params"}


def _tune(shapes, results, *extra):
    return ["tune", "--config", "tiny", "--dataset", str(shapes), "--arch", "rnn",
            "--encoder", "resnet18", "--space", "tiny", "--epochs", "1",
            "--results-dir", str(results), *extra]


def _draw(kind: str, seed: int, trial: int) -> dict:
    space = tuning.load_space("tiny", "attn_lstm")
    study = optuna.create_study(direction="maximize",
                                sampler=tuning.make_sampler(kind, seed, trial, 8))
    t = study.ask()
    return {p.name: p.suggest(t) for p in space.params}


def test_trial_parameters_depend_only_on_the_seed_and_the_trial_number():
    for kind in ("random", "tpe"):
        first = [_draw(kind, 0, k) for k in range(4)]
        assert [_draw(kind, 0, k) for k in (3, 2, 1, 0)] == first[::-1]  # any order, any process
        assert len({json.dumps(d, sort_keys=True) for d in first}) == 4  # trials differ
        assert [_draw(kind, 1, k) for k in range(4)] != first  # another seed, other draws
    lr = _draw("random", 0, 0)["train.lr"]
    assert 3e-4 <= lr <= 1e-2  # the tiny space's log range


def _trials(results):
    """{trial number: (params, value, run id)} of the trial records in ``results``."""
    out = {}
    for r in load_records(results)[0]:
        t = r.tuning or {}
        if t.get("role") == "trial":
            assert t["trial"] not in out, "a trial was recorded twice"
            out[t["trial"]] = (t["params"], t["value"], r.run_id)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_shapes, tmp_path_factory):
    """A 2-trial study run straight through, then its best configuration on test (seed 0)."""
    results = tmp_path_factory.mktemp("tune-a")
    out = CliRunner().invoke(app, _tune(tiny_shapes, results, "--trials", "2",
                                        "--final-seeds", "0"))
    assert out.exit_code == 0, out.output
    return results, out.output


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_same_trials(tiny_shapes, tmp_path, monkeypatch,
                                                   uninterrupted):
    whole, _ = uninterrupted
    calls = {"n": 0}
    real = tuning.run_experiment

    def interrupted(*args, **kwargs):  # Ctrl-C as the second trial starts
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "run_experiment", interrupted)
    out = CliRunner().invoke(app, _tune(tiny_shapes, tmp_path, "--trials", "2"))
    assert out.exit_code == 130, out.output
    assert sorted(_trials(tmp_path)) == [0]
    before = _trials(tmp_path)
    # and a process killed in trial 1 left it running: its pid is gone on this host
    dead = subprocess.Popen(["true"])
    dead.wait()
    study = optuna.load_study(study_name="rnn-resnet18-shapes-40",
                              storage=tuning.default_storage(tmp_path, "rnn-resnet18-shapes-40"))
    t = study.ask()
    for k, v in (("trial", 1), ("host", socket.gethostname()), ("pid", dead.pid)):
        t.set_user_attr(k, v)
    calls["n"] = 0

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "run_experiment", counted)
    out = CliRunner().invoke(app, _tune(tiny_shapes, tmp_path, "--trials", "2"))
    assert out.exit_code == 0, out.output
    assert calls["n"] == 1  # only trial 1 ran again; trial 0 was not repeated
    after = _trials(tmp_path)
    assert {0: after[0]} == before
    expected = _trials(whole)
    assert sorted(after) == sorted(expected) == [0, 1]
    for k in expected:  # same configurations, same validation scores
        assert after[k][0] == expected[k][0]
        assert after[k][1] == pytest.approx(expected[k][1], abs=1e-9)
    states = sorted((tr.user_attrs["trial"], tr.state.name) for tr in study.get_trials())
    assert states == [(0, "COMPLETE"), (1, "COMPLETE"), (1, "FAIL"),
                      (1, "FAIL")]  # interrupted, then left running by the dead process


@pytest.mark.slow
def test_every_trial_record_validates_and_says_its_study(uninterrupted, tiny_shapes):
    results, output = uninterrupted
    dataset = resolve_dataset(str(tiny_shapes))
    val_ids = [im.image_id for im in dataset.split("val")]
    schema = json.loads(SCHEMA_PATH.read_text())
    records = load_records(results)[0]
    trials = [r for r in records if (r.tuning or {}).get("role") == "trial"]
    finals = [r for r in records if (r.tuning or {}).get("role") == "final"]
    assert len(trials) == 2 and len(finals) == 1
    for r in records:
        jsonschema.validate(json.loads(open(r.path).read()), schema)
        assert set(r.tuning) == TUNING_KEYS
        assert r.tuning["study"] == "rnn-resnet18-shapes-40" and r.tuning["budget"] == 2
        assert r.tuning["storage"].startswith("sqlite:///") and r.tuning["sampler"] == "random"
    for r in trials:  # scored on val, never on test
        assert r.tuning["split"] == "val" and r.config["eval_split"] == "val"
        assert r.dataset.name == "shapes-40 (val split)" and r.image_use is None
        assert r.tuning["value"] == r.metrics["CIDEr"]
        assert [p["image_id"] for p in r.predictions] == val_ids
    best = max(trials, key=lambda r: (r.tuning["value"], -r.tuning["trial"]))
    (final,) = finals
    assert final.tuning["split"] == "test" and final.tuning["trial"] == best.tuning["trial"]
    assert final.tuning["value"] == best.tuning["value"]
    assert final.tuning["params"] == best.tuning["params"]
    assert [p["image_id"] for p in final.predictions] == [im.image_id
                                                          for im in dataset.split("test")]
    assert final.dataset.name == "shapes-40"
    hp = final.config["decoder_hparams"]
    assert hp["hidden_dim"] == best.tuning["params"]["decoder_hparams.hidden_dim"]
    assert final.config["train"]["lr"] == best.tuning["params"]["train.lr"]
    board = leaderboard(finals, baselines=False)
    assert list(board["arch"]) == ["rnn (tuned, N=2)"]
    assert "best" in output


def _space(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, words", [
    ("all:\n  train.learning_rate: {low: 0.001, high: 0.01}\n",
     ["train.learning_rate", "is not a searchable setting", "train.lr", "decoder_hparams.hidden_dim"]),
    ("all:\n  train.lr: {low: 0.01, high: 0.001}\n", ["train.lr", "is empty", "low < high"]),
    ("all:\n  decoder_hparams.dropout: {choices: []}\n", ["dropout", "non-empty list"]),
    ("all:\n  train.weight_decay: {low: 0.0, high: 0.1, log: true}\n",
     ["train.weight_decay", "log range must lie above 0"]),
    ("all:\n  decoder_hparams.dropout: {low: 0.1, high: 1.5}\n", ["dropout", "1.5"]),
    ("resnet:\n  train.lr: {low: 0.001, high: 0.01}\n", ["neither all nor a decoder"]),
])
def test_a_bad_search_space_is_refused_before_any_trial(tiny_shapes, tmp_path, text, words):
    out = CliRunner().invoke(app, _tune(tiny_shapes, tmp_path / "r", "--trials", "2")
                             + ["--space", _space(tmp_path, text)])
    assert out.exit_code == 2, out.output
    assert out.output.startswith("error:") and "Traceback" not in out.output
    assert "space.yaml" in out.output
    for w in words:
        assert w in " ".join(out.output.split()), (w, out.output)
    assert not list((tmp_path / "r").rglob("*.json"))  # no trial ran


def test_bad_budgets_and_storage_are_refused_before_any_trial(tiny_shapes, tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, _tune(tiny_shapes, tmp_path, "--trials", "0"))
    assert out.exit_code == 2 and "--trials/--tune 0" in out.output, out.output
    out = runner.invoke(app, ["matrix", "--config", "tiny", "--dataset", str(tiny_shapes),
                              "--archs", "rnn", "--encoders", "resnet18", "--seeds", "0",
                              "--tune", "0", "--results-dir", str(tmp_path)])
    assert out.exit_code == 2 and "--trials/--tune 0" in out.output, out.output
    url = "postgresql://capbench:s3cret@127.0.0.1:1/studies"
    out = runner.invoke(app, _tune(tiny_shapes, tmp_path, "--trials", "2", "--storage", url))
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and "cannot be opened" in text, out.output
    assert "postgresql://capbench:***@127.0.0.1:1/studies" in text and "s3cret" not in text
    out = runner.invoke(app, _tune(tiny_shapes, tmp_path, "--trials", "2", "--storage",
                                   "not a url"))
    assert out.exit_code == 2 and "'not a url' cannot be opened" in out.output, out.output
    assert not list(tmp_path.rglob("*.json"))  # neither the matrix nor a trial ran
    assert os.path.isdir(tmp_path)
