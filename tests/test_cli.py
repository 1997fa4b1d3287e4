"""The CLI end to end: run -> record -> report, on a tiny `shapes` set and on coco-mini."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.data import load_karpathy
from benchmark.metrics import score_captions
from tests.conftest import COCO_MINI, needs

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tiny_record(tiny_run):
    """The shared tiny run (conftest) as the JSON its record holds."""
    results, record = tiny_run
    return results, json.loads(Path(record.path).read_text())


@pytest.mark.slow
def test_record_has_everything_a_reader_needs(tiny_record, tiny_shapes):
    _, rec = tiny_record
    ds = load_karpathy(tiny_shapes)
    assert rec["arch"] == "attn_lstm" and rec["encoder"] == "resnet18"
    assert rec["dataset"]["split_fingerprint"] == ds.fingerprint
    assert rec["config"]["train"]["epochs"] == 2 and rec["config"]["decoder_hparams"]["attention_dim"] == 64
    assert rec["encoder_weights"] == "random-init:seed=0" and rec["pretrained"] is False
    assert set(rec["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L",
                                   "CIDEr", "SPICE", "CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S"}
    assert rec["metrics"]["SPICE"] is None or rec["metrics"]["SPICE"] >= 0
    for m in ("CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S"):  # offline without weights: None, and why
        assert (rec["metrics"][m] is None and "weights" in rec["metrics_unavailable"][m]
                or 0 <= rec["metrics"][m] <= 2.5)
    for m, (lo, hi) in rec["confidence_intervals"].items():  # each CI holds its own estimate
        assert m == "METEOR_image_mean" or lo <= rec["metrics"][m] <= hi, (m, lo, hi)
    use = rec["image_use"]
    assert set(use["baselines"]) == {"most-frequent", "consensus", "nn"}
    assert use["vs_blind"]["baseline"] in ("most-frequent", "consensus")
    lo, hi = use["shuffle"]["drop_ci"]
    assert lo <= use["shuffle"]["drop"] <= hi
    assert use["shuffle"]["drop"] == pytest.approx(rec["metrics"]["CIDEr"] - use["shuffle"]["CIDEr"])
    tp = rec["throughput"]
    assert tp["train_tokens_per_s"] > tp["train_samples_per_s"] > 0
    assert tp["inference_images_per_s"] > 0 and tp["decoder_captions_per_s"] > 0
    assert rec["peak_memory"]["bytes"] > 0 and rec["parameters"]["decoder_trainable"] > 0
    assert len(rec["training"]["history"]) == 2
    assert [p["image_id"] for p in rec["predictions"]] == [im.image_id for im in ds.split("test")]


@pytest.mark.slow
def test_record_metrics_equal_rescoring_its_predictions(tiny_record, tiny_shapes):
    _, rec = tiny_record
    refs = load_karpathy(tiny_shapes).references("test")
    preds = {p["image_id"]: p["caption"] for p in rec["predictions"]}
    again = score_captions(preds, refs, metrics=("Bleu_4", "ROUGE_L", "CIDEr"))
    for m in ("Bleu_4", "ROUGE_L", "CIDEr"):
        assert rec["metrics"][m] == pytest.approx(again.metrics[m], abs=1e-12)


@pytest.mark.slow
def test_report_formats(tiny_record, tmp_path):
    results, rec = tiny_record
    out = _run("report", "--results-dir", str(results), "--format", "json").output
    rows = [r for r in json.loads(out) if r["kind"] == "run"]  # baseline reference rows too
    assert rows[0]["run_id"] == rec["run_id"] and rows[0]["CIDEr"] == pytest.approx(rec["metrics"]["CIDEr"])
    csv = _run("report", "--results-dir", str(results), "--format", "csv").output
    assert csv.splitlines()[0].startswith("dataset,split,run_id,config_id,arch,encoder")
    md_path = tmp_path / "board.md"
    _run("report", "--results-dir", str(results), "--format", "markdown", "--output", str(md_path))
    md = md_path.read_text()
    assert f"split {rec['dataset']['split_fingerprint']}" in md and "| attn_lstm |" in md
    table = _run("report", "--results-dir", str(results)).output
    assert "CIDEr-D" in table


@pytest.mark.slow
def test_report_skips_a_corrupt_record_with_a_warning(tiny_record, tmp_path):
    results, _ = tiny_record
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "broken.json").write_text("{")
    result = runner.invoke(app, ["report", "--results-dir", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 0 and "broken.json" in result.output


def test_user_mistakes_get_one_clear_line(tiny_shapes, tmp_path):
    cases = [
        (["run", "--arch", "gru", "--dataset", str(tiny_shapes)], "unknown decoder 'gru'"),
        (["run", "--config", "nope"], "no config 'nope'"),
        (["run", "--dataset", str(tmp_path / "missing.json")], "does not exist"),
        (["report", "--format", "xml"], "'xml' is not one of"),  # a Typer choice
    ]
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("train:\n  epoch: 3\n")
    cases.append((["run", "--config", str(bad_cfg)], "train.epoch: unknown key"))
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_list_shows_encoders_and_decoders():
    out = _run("list").output
    for name in ("resnet50", "vit_b16", "clip_vit_b32", "rnn", "lstm", "attn_lstm", "transformer"):
        assert name in out
    assert "49 x 2048" in out and "196 x 768" in out


def test_data_shapes_writes_a_loadable_dataset(tmp_path):
    _run("data", "shapes", "--out", str(tmp_path / "s"), "--n-images", "20")
    assert len(load_karpathy(tmp_path / "s" / "dataset.json").images) == 20


@pytest.mark.slow
@pytest.mark.long
@needs(COCO_MINI)
def test_cli_on_coco_mini(tmp_path):
    _run("run", "--config", "tiny", "--dataset", str(COCO_MINI), "--arch", "lstm", "--epochs", "1",
         "--results-dir", str(tmp_path))
    (path,) = (tmp_path / "runs").glob("*.json")
    rec = json.loads(path.read_text())
    assert rec["dataset"]["sizes"] == {"train": 330, "val": 39, "test": 41}
    assert len(rec["predictions"]) == 41 and rec["metrics"]["Bleu_1"] > 0


@pytest.mark.slow
def test_seeds_compare_and_aggregate(tiny_shapes, tmp_path):
    said = _run("run", "--config", "tiny", "--dataset", str(tiny_shapes), "--arch", "lstm",
                "--epochs", "1", "--seeds", "0,1", "--results-dir", str(tmp_path), "--resume")
    # nothing to resume: said for each seed, and both run afresh
    assert " ".join(said.output.split()).count("--resume: no unfinished run of this config and "
                                               "seed in") == 2
    recs = sorted((json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")),
                  key=lambda r: r["seed"])
    assert [r["seed"] for r in recs] == [0, 1] and recs[0]["config_id"] == recs[1]["config_id"]
    assert recs[0]["confidence_intervals"]["CIDEr"][0] <= recs[0]["metrics"]["CIDEr"]
    assert 0 < recs[0]["diversity"]["distinct_1"] <= 1
    out = _run("compare", recs[0]["run_id"], recs[1]["run_id"], "--results-dir", str(tmp_path),
               "--resamples", "200").output
    assert "CIDEr" in out and "B - A" in out
    agg = json.loads(_run("report", "--results-dir", str(tmp_path), "--aggregate",
                          "--format", "json").output)
    assert {r["arch"] for r in agg if r["kind"] == "baseline"} == {"most-freq", "consensus", "nn"}
    agg = [r for r in agg if r["kind"] == "run"]
    assert len(agg) == 1 and agg[0]["n"] == 2 and agg[0]["seeds"] == "0,1"
    assert agg[0]["CIDEr"] == pytest.approx(np.mean([r["metrics"]["CIDEr"] for r in recs]))
    # a run on another split is refused
    other = dict(recs[1], run_id="other-split")
    other["dataset"] = dict(other["dataset"], split_fingerprint="000000000000")
    (tmp_path / "runs" / "other-split.json").write_text(json.dumps(other))
    result = runner.invoke(app, ["compare", recs[0]["run_id"], "other-split", "--results-dir",
                                 str(tmp_path)])
    assert result.exit_code == 2 and "different splits" in result.output
