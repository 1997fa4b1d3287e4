"""Matrix (resumable, failure-tolerant), regression check, determinism."""

import copy
import json

import pytest

from benchmark import matrix as matrix_mod
from benchmark.check import compare_to_baseline, write_baseline
from benchmark.config import load_config
from benchmark.matrix import run_matrix
from benchmark.records import RunRecord
from benchmark.runner import run_experiment


def _cfg(tiny_shapes, results):
    return load_config("tiny", {"dataset": str(tiny_shapes), "train.epochs": 1,
                                "results_dir": str(results)})


@pytest.mark.slow
def test_matrix_runs_resumes_and_records_failures(tiny_shapes, tmp_path, monkeypatch):
    cfg = _cfg(tiny_shapes, tmp_path)
    first = run_matrix(cfg, ["rnn", "lstm"], ["resnet18"], [0])
    assert [c.status for c in first.cells] == ["ok", "ok"]
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    assert set(first.feature_seconds) == {"resnet18"}  # features once for both decoders

    again = run_matrix(cfg, ["rnn", "lstm", "transformer"], ["resnet18"], [0])
    assert [c.status for c in again.cells] == ["done", "done", "ok"]

    real = matrix_mod.run_experiment

    def flaky(cell_cfg, *a, **k):
        if cell_cfg.decoder == "attn_lstm":
            raise RuntimeError("simulated out-of-memory")
        return real(cell_cfg, *a, **k)

    monkeypatch.setattr(matrix_mod, "run_experiment", flaky)
    third = run_matrix(cfg, ["attn_lstm", "rnn"], ["resnet18"], [0, 1])
    assert [c.status for c in third.cells] == ["failed", "failed", "done", "ok"]
    (fail,) = [p for p in (tmp_path / "failures").glob("attn_lstm-resnet18-s0-*.json")]
    info = json.loads(fail.read_text())
    assert "simulated out-of-memory" in info["error"] and "Traceback" in info["traceback"]


@pytest.mark.slow
def test_same_seed_same_machine_same_metrics(tiny_shapes, tmp_path):
    cfg = _cfg(tiny_shapes, tmp_path)
    cfg.decoder = "attn_lstm"
    a, _ = run_experiment(copy.deepcopy(cfg))
    b, _ = run_experiment(copy.deepcopy(cfg))
    assert a.metrics == b.metrics
    assert a.predictions == b.predictions
    assert a.training["history"][0]["loss"] == b.training["history"][0]["loss"]
    cfg.seed = 5
    c, _ = run_experiment(copy.deepcopy(cfg))
    assert c.training["history"][0]["loss"] != a.training["history"][0]["loss"]


def _record(cider, tok_s):
    return RunRecord.from_dict({
        "run_id": "r", "arch": "rnn", "encoder": "resnet18",
        "metrics": {"Bleu_1": 0.5, "Bleu_4": 0.2, "METEOR": 0.2, "ROUGE_L": 0.4, "CIDEr": cider},
        "throughput": {"train_tokens_per_s": tok_s, "decoder_captions_per_s": 100.0,
                       "inference_images_per_s": 10.0},
        "dataset": {"name": "shapes", "split_fingerprint": "abc"}, "environment": {},
        "git_commit": None})


def test_check_fails_on_metric_regression_not_on_slowdown(tmp_path):
    base = write_baseline(tmp_path / "b.json", "tiny", {"rnn/resnet18": _record(0.80, 1000.0)})
    same = compare_to_baseline(base, {"rnn/resnet18": _record(0.80, 1000.0)})
    assert all(r.status == "ok" for r in same)
    within = compare_to_baseline(base, {"rnn/resnet18": _record(0.76, 1000.0)})  # tol 0.05
    assert all(r.status != "FAIL" for r in within)
    worse = compare_to_baseline(base, {"rnn/resnet18": _record(0.70, 400.0)})
    status = {r.name: r.status for r in worse}
    assert status["CIDEr"] == "FAIL" and status["train_tokens_per_s"] == "slower"
    assert sum(r.status == "FAIL" for r in worse) == 1


def test_check_cli_reports_a_missing_baseline_clearly(tmp_path):
    from typer.testing import CliRunner

    from benchmark.cli import app

    result = CliRunner().invoke(app, ["check", "--baseline", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "--update" in result.output


@pytest.mark.parametrize("spec,message", [("shapes:abc", "shapes:N"), ("shapes:3", "takes 10 to")])
def test_bad_shapes_spec(spec, message):
    from benchmark.data import resolve_dataset
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_dataset(spec)


def test_matrix_variants_multiply_the_cells_and_bad_ones_fail_before_any_run(tmp_path):
    from benchmark.errors import ConfigError
    from benchmark.matrix import matrix_plan, plan_cells

    cfg_file = tmp_path / "m.yaml"
    cfg_file.write_text("matrix:\n  archs: [lstm, transformer]\n  encoders: [resnet18]\n"
                        "  variants:\n    xe: {}\n    xe+scst: {train.scst_epochs: 2}\n"
                        "    bpe: {tokenizer: bpe, tokenizer_vocab_size: 400}\n")
    plan = matrix_plan(str(cfg_file), None, None, None, 0)
    assert plan.size == 2 * 1 * 1 * 3 and list(plan.variants) == ["xe", "xe+scst", "bpe"]
    cells = plan_cells(load_config(str(cfg_file)), plan.archs, plan.encoders, plan.seeds,
                       plan.variants)
    assert [(c.arch, c.variant) for c in cells][:3] == [("lstm", "xe"), ("lstm", "xe+scst"),
                                                        ("lstm", "bpe")]
    assert len({c.config_id for c in cells}) == 6  # every cell its own config
    assert cells[1].cfg.train.scst_epochs == 2 and cells[0].cfg.train.scst_epochs == 0
    assert cells[2].cfg.tokenizer == "bpe" and cells[0].cfg.tokenizer == "word"
    bad = tmp_path / "bad.yaml"
    bad.write_text("matrix:\n  variants:\n    oops: {train.epochz: 2}\n")
    plan = matrix_plan(str(bad), ["lstm"], ["resnet18"], None, 0)
    with pytest.raises(ConfigError, match="matrix variant 'oops'.*epochz"):
        plan_cells(load_config(str(bad)), plan.archs, plan.encoders, plan.seeds, plan.variants)
    bad.write_text("matrix:\n  variants:\n    other: {encoder: vit_tiny}\n")
    plan = matrix_plan(str(bad), ["lstm"], ["resnet18"], None, 0)
    with pytest.raises(ConfigError, match="set by the matrix itself"):
        plan_cells(load_config(str(bad)), plan.archs, plan.encoders, plan.seeds, plan.variants)
    bad.write_text("matrix:\n  variants: [xe, scst]\n")
    with pytest.raises(ConfigError, match="variants"):
        matrix_plan(str(bad), None, None, None, 0)
