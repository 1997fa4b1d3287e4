import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from benchmark.bench import DecoderWorkload, bench_decoder, bench_encoder, time_fn
from benchmark.cli import app
from benchmark.plots import pareto_front, write_plots

SMALL = DecoderWorkload(grid_size=9, grid_dim=32, pooled_dim=16, vocab_size=50, batch_size=4,
                        caption_len=6, embed_dim=16, hidden_dim=32, attention_dim=16,
                        num_heads=2, beam_size=3)


def test_time_fn_reports_median_and_spread():
    calls = []
    stats = time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=7)
    assert len(calls) == 9 and stats["n"] == 7
    assert 0 <= stats["p05"] <= stats["median"] <= stats["p95"] and stats["iqr"] >= 0


def test_bench_decoder_figures_are_consistent():
    r = bench_decoder("attn_lstm", SMALL, torch.device("cpu"), iters=2, warmup=1)
    assert r["train_tokens_per_s"] > r["train_samples_per_s"] > 0
    assert r["beam1_captions_per_s"] > 0 and r["beam3_captions_per_s"] > 0
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p95"]
    assert r["params"] > 0 and r["peak_memory_mb"] > 0


def test_bench_encoder_counts_flops():
    r = bench_encoder("resnet18", torch.device("cpu"), batch_size=2, iters=2)
    assert 3.0 < r["encoder_gflops_per_image"] < 4.2  # ResNet-18: 1.8 GMACs = 3.6 GFLOPs
    assert r["encoder_images_per_s"] > 0


def test_bench_cli_json_with_every_dimension_as_a_flag():
    args = ["bench", "--arch", "transformer", "--grid-size", "9", "--grid-dim", "32",
            "--vocab-size", "50", "--batch-size", "4", "--caption-len", "6", "--embed-dim", "16",
            "--hidden-dim", "32", "--attention-dim", "16", "--num-heads", "2", "--beam-size", "2",
            "--iters", "2", "--device", "cpu", "--format", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads(result.output[result.output.index("["):])[0]
    assert row["arch"] == "transformer" and row["grid_size"] == 9 and row["beam2_captions_per_s"] > 0


def test_encoder_rows_take_their_own_batch_size():
    """`--encoder-batch-size` (the GPU table's batch 256) replaces the default of
    min(--batch-size, 16); 0 is refused before any model is built."""
    args = ["bench", "--encoder", "resnet18", "--batch-size", "32", "--iters", "2",
            "--device", "cpu", "--format", "json"]
    default = CliRunner().invoke(app, args)
    assert default.exit_code == 0, default.output
    assert json.loads(default.stdout)[0]["batch_size"] == 16
    own = CliRunner().invoke(app, [*args, "--encoder-batch-size", "3"])
    assert own.exit_code == 0, own.output
    (row,) = json.loads(own.stdout)
    assert row["batch_size"] == 3 and row["encoder_images_per_s"] > 0
    bad = CliRunner().invoke(app, [*args, "--encoder-batch-size", "0"])
    assert bad.exit_code == 2 and "--encoder-batch-size 0: give 1 to 65,536" in bad.output


def test_pareto_front():
    x = np.array([1.0, 2.0, 3.0, 2.5, 0.5])
    y = np.array([5.0, 4.0, 1.0, 3.0, 6.0])
    assert pareto_front(x, y).tolist() == [4, 0, 1, 3, 2]
    x2, y2 = np.array([1.0, 2.0, 1.5]), np.array([1.0, 2.0, 1.0])
    assert pareto_front(x2, y2).tolist() == [1]


def test_plots_are_written(tmp_path):
    rows = []
    for i, (a, e) in enumerate([("rnn", "resnet50"), ("lstm", "resnet50"), ("rnn", "vit_b16")]):
        rows.append({"dataset": "shapes", "split": "abc", "arch": a, "encoder": e,
                     "Bleu_4": 0.1 * (i + 1), "METEOR": 0.2, "ROUGE_L": 0.3, "CIDEr": 0.5 + i,
                     "inference_images_per_s": 10.0 * (i + 1)})
    files = write_plots(pd.DataFrame(rows), tmp_path)
    assert len(files) == 2
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000


def test_flop_accounting_and_utilisation():
    import torch

    from benchmark.bench import DecoderWorkload, add_utilisation, bench_decoder, count_flops

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16  # 1 multiply-add = 2 FLOPs
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    # forward 2*8*32*16, backward: grad input and grad weight, the same again each
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 32 * 16
    w = DecoderWorkload(grid_size=4, grid_dim=8, pooled_dim=8, vocab_size=30, batch_size=2,
                        caption_len=3, embed_dim=8, hidden_dim=8, attention_dim=8, beam_size=3)
    row = bench_decoder("lstm", w, torch.device("cpu"), iters=1, warmup=0)
    assert row["train_gflop"] > 0 and row["beam3_gflop"] > row["beam1_gflop"] > 0
    assert row["train_gflops"] == pytest.approx(row["train_gflop"] * row["train_samples_per_s"] / 2)
    util = add_utilisation(row, {"fp32": 100.0})
    assert util["peak_fp32_gflops"] == 100.0
    assert util["train_util"] == pytest.approx(row["train_gflops"] / 100.0)
    assert util["beam3_util"] == pytest.approx(row["beam3_gflops"] / 100.0)


def test_training_curves_plot_each_runs_history():
    from pathlib import Path

    import matplotlib.pyplot as plt

    from benchmark.plots import training_curves_figure
    from benchmark.records import load_records

    records, _ = load_records(Path(__file__).resolve().parents[1] / "results" / "coco-mini")
    fig = training_curves_figure(records, "coco-mini")
    loss_ax, val_ax = fig.axes
    by_label = {ln.get_label(): ln for ln in val_ax.get_lines()}
    for r in records:
        line = by_label[f"{r.arch} / {r.encoder}"]
        hist = r.training["history"]
        assert list(line.get_xdata()) == [h["epoch"] for h in hist]
        np.testing.assert_allclose(line.get_ydata(), [100 * h["val_CIDEr"] for h in hist])
    assert len(loss_ax.get_lines()) == len(records)
    plt.close(fig)


def test_report_plot_writes_training_curves(tmp_path):
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "results" / "coco-mini" / "runs"
    shutil.copytree(src, tmp_path / "runs")
    out = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path), "--plot",
                                   str(tmp_path / "plots"), "--no-leaderboard-file"])
    assert out.exit_code == 0, out.output
    curves = list((tmp_path / "plots").glob("*-training.png"))
    assert len(curves) == 1 and curves[0].read_bytes()[:4] == b"\x89PNG"


def test_bench_reward_times_both_cider_implementations(tiny_shapes):
    out = CliRunner().invoke(app, ["bench", "--reward", "shapes:200", "--format", "json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["captions"] == 20 * 32 * 5 and res["train_images"] == 140
    assert res["capbench_CiderD_captions_per_s"] > 0 and res["pycocoevalcap_Cider_captions_per_s"] > 0
    small = CliRunner().invoke(app, ["bench", "--reward", str(tiny_shapes)])
    assert small.exit_code != 0 and "28 images" in small.output and "Traceback" not in small.output


def test_store_benchmark_streams_a_synthetic_store_and_deletes_it(tmp_path):
    from benchmark.bench import StoreWorkload, bench_store

    w = StoreWorkload(grid_size=4, grid_dim=32, pooled_dim=32, shard_size=64, batch_size=8,
                      train_steps=3, read_batches=5, decode_images=16)
    res = bench_store(300, torch.device("cpu"), folder=str(tmp_path), workload=w, num_workers=0)
    assert res["shards"] == 5 and res["shard_size"] == 64  # 64 * 4 + 44
    assert res["store_gb"] == pytest.approx(300 * (4 * 32 + 32) * 2 / 1e9)
    for k in ("build_s", "stats_s", "read_samples_per_s", "train_samples_per_s",
              "decode_captions_per_s", "peak_rss_mb"):
        assert res[k] > 0, k
    assert list(tmp_path.iterdir()) == []  # the synthetic store is gone


def test_store_benchmark_cli_refuses_a_bad_size():
    out = CliRunner().invoke(app, ["bench", "--store", "1"])
    assert out.exit_code == 2 and "--store 1" in out.output and "Traceback" not in out.output


def test_compiled_training_step_is_timed_against_eager():
    w = DecoderWorkload(grid_size=4, grid_dim=16, pooled_dim=16, vocab_size=50, batch_size=4,
                        caption_len=5, embed_dim=16, hidden_dim=16, attention_dim=16)
    row = bench_decoder("transformer", w, torch.device("cpu"), iters=2, warmup=1, compile=True)
    assert row["train_compiled_samples_per_s"] > 0 and row["compile_speedup"] > 0


def test_gemm_rates_of_given_shapes():
    out = CliRunner().invoke(app, ["bench", "gemm", "8x16x32,64X64x64", "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [(r["m"], r["k"], r["n"]) for r in rows] == [(8, 16, 32), (64, 64, 64)]
    assert all(r["gflops"] > 0 for r in rows)
    old = CliRunner().invoke(app, ["bench", "--gemm", "8x16x32", "--format", "json"])
    assert old.exit_code == 0 and json.loads(old.stdout)[0]["m"] == 8  # the older form works,
    assert "note: `capbench bench --gemm 8x16x32` is now `capbench bench gemm 8x16x32`" in old.stderr
    bad = CliRunner().invoke(app, ["bench", "--gemm", "32x2048"])
    assert bad.exit_code == 2 and "--gemm '32x2048': give M x K x N" in bad.output
