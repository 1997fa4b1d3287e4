"""`capbench gpu-table`: every GPU figure in one command, each step a subprocess with its own
time limit. Run here with --quick on the CPU: the steps' plumbing, parsing and tables; the
figures themselves come from a GPU (docs/gpu.md: Measuring a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark import gpu_table as gt
from benchmark.cli import app
from benchmark.records import load_records


@pytest.mark.slow
def test_the_table_runs_its_steps_and_writes_what_they_measured(tiny_shapes, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = CliRunner().invoke(app, ["gpu-table", "--quick", "--device", "cpu", "--dataset",
                                   str(tiny_shapes), "--out", str(out), "--work", str(work),
                                   # compile: 30 s of torch.compile, its bench is tested
                                   # alone; ddp: 2 runs, test_distributed reads its figures
                                   # (compare_ddp_runs) from its own 2 runs, and its plan is
                                   # checked below
                                   "--steps", "encoders,decoders,extraction,matrix"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "gpu-table.json").read_text())
    steps = data["steps"]
    assert list(steps) == ["encoders", "decoders", "extraction", "matrix"]
    assert all(s["ok"] and s["seconds"] > 0 for s in steps.values())
    assert data["environment"]["device"] == "cpu" and data["quick"] is True
    enc = steps["encoders"]["rows"]
    assert [r["batch_size"] for r in enc] == [4, 4] and all(r["encoder_images_per_s"] > 0 for r in enc)
    dec = {r["arch"]: r for r in steps["decoders"]["rows"]}
    assert sorted(dec) == ["attn_lstm", "lstm", "rnn", "transformer"]
    assert all(0 < r["train_util"] < 1 and r["peak_fp32_gflops"] > 1 for r in dec.values())
    (ext,) = steps["extraction"]["rows"]
    assert ext["images"] == 8 and 0 < ext["pixel_mean_abs_diff"] < 3e-3
    # the matrix's cells are its run records, read back
    records, _ = load_records(work / "matrix" / "runs")
    cells = steps["matrix"]["rows"]["cells"]
    assert sorted((c["arch"], c["CIDEr"]) for c in cells) == \
        sorted((r.arch, r.metrics["CIDEr"]) for r in records) and len(cells) == 2
    md = (out / "gpu-table.md").read_text()
    assert md == res.stdout  # the tables are printed last
    assert "| resnet18 | 4 |" in md and "| attn_lstm |" in md and "Matrix end to end: 2 cells" in md
    assert f"{cells[0]['CIDEr']:.4f}" in md
    log = (out / "gpu-table.log").read_text()
    assert log.count("$ -m benchmark.cli ") == 4 and log.count("rc 0 in") == 4


@pytest.mark.slow
@pytest.mark.long
def test_a_failing_or_slow_step_is_reported_and_the_next_one_runs(tiny_shapes, tmp_path, monkeypatch):
    """A command that fails, and one that runs out of time (torchrun and both its ranks are
    stopped: none outlives the step), are reported with the end of their output; the next
    step runs. A later call with the same --out keeps the earlier call's other steps."""
    real_plan = gt.plan
    marker = tmp_path / "ranks-that-must-stop"
    slow = ["run", "--config", "tiny", "--device", "cpu", "--results-dir", str(marker),
            "--nproc", "2", "--epochs", "50"]

    def plan(dataset, device, work, *, quick=False):
        steps = {s.name: s for s in real_plan(dataset, device, work, quick=quick)}
        # the real decoders step without --peak (a 4096^3 matmul timed 4 times: seconds on
        # this CPU; the test above checks the peak and utilisation columns)
        (run,) = steps["decoders"].runs
        assert "--peak" in run
        return [gt.Step("encoders", [["bench", "--no-such-flag"]], 60),
                gt.Step("extraction", [slow], 20),
                gt.Step("decoders", [[a for a in run if a != "--peak"]],
                        steps["decoders"].timeout)]

    monkeypatch.setattr(gt, "plan", plan)
    res = gt.gpu_table(tmp_path, str(tiny_shapes), device="cpu", quick=True,
                       steps=["encoders", "extraction", "decoders"], log=lambda text: None)
    enc, ext, dec = (res["steps"][s] for s in ("encoders", "extraction", "decoders"))
    assert not enc["ok"] and enc["rc"] == 2 and "No such option: --no-such-flag" in enc["error"]
    assert not ext["ok"] and ext["rc"] == "timeout" and ext["seconds"] < 70
    alive = [c for c in Path("/proc").glob("[0-9]*/cmdline") if _holds(c, str(marker))]
    assert alive == []
    assert dec["ok"] and len(dec["rows"]) == 4
    md = (tmp_path / "gpu-table.md").read_text()
    assert "**encoders: failed** (rc 2 after" in md and "No such option: --no-such-flag" in md
    assert "**extraction: failed** (rc timeout after" in md and "| transformer |" in md
    # the second call of a split table: its step replaces the failed one, the others stay
    monkeypatch.setattr(gt, "plan", lambda dataset, device, work, quick=False: [
        gt.Step("encoders", [["bench", "--encoder", "resnet18", "--encoder-batch-size", "1",
                              "--iters", "1", "--device", "cpu", "--format", "json"]], 120)])
    again = gt.gpu_table(tmp_path, str(tiny_shapes), device="cpu", quick=True,
                         steps=["encoders"], log=lambda text: None)
    assert list(again["steps"]) == ["encoders", "decoders", "extraction"]  # the steps' order
    assert again["steps"]["encoders"]["ok"] and again["steps"]["encoders"]["rows"][0]["batch_size"] == 1
    assert "| resnet18 | 1 |" in (tmp_path / "gpu-table.md").read_text()
    assert again["steps"]["decoders"] == dec
    assert json.loads((tmp_path / "gpu-table.json").read_text())["steps"] == again["steps"]


def _holds(cmdline: Path, text: str) -> bool:
    try:
        return text in cmdline.read_bytes().decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return False


def test_bad_arguments_are_refused_before_any_step(tiny_shapes, tmp_path):
    runner = CliRunner()
    args = ["gpu-table", "--quick", "--out", str(tmp_path / "o")]
    bad = runner.invoke(app, [*args, "--device", "cpu", "--dataset", str(tiny_shapes),
                              "--steps", "encoders,flops"])
    assert bad.exit_code == 2 and "--steps flops: choose from encoders, decoders" in bad.output
    bad = runner.invoke(app, [*args, "--device", "cpu", "--dataset", str(tmp_path / "no.json")])
    assert bad.exit_code == 2 and "no.json: no such file" in bad.output
    import torch

    if not torch.cuda.is_available():
        bad = runner.invoke(app, [*args, "--dataset", str(tiny_shapes)])  # --device cuda
        assert bad.exit_code == 2 and "CUDA is not available" in bad.output
    assert not (tmp_path / "o").exists()


def test_the_ddp_step_plans_one_and_two_processes_of_one_config(tiny_shapes, tmp_path,
                                                                monkeypatch):
    """The DDP step's two commands (run here by tests/test_distributed.py's own pair of runs,
    whose figures gpu_table.compare_ddp_runs reads): one process, then the same command with
    --nproc 2, which passes every check before torchrun would start."""
    from benchmark import distributed
    from benchmark.config import load_config
    from benchmark.runner import check_run_settings

    (step,) = [s for s in gt.plan(str(tiny_shapes), "cpu", tmp_path, quick=True) if s.name == "ddp"]
    one, two = step.runs
    assert two == [*one[:-2], "--results-dir", str(tmp_path / "ddp" / "ranks-2"), "--nproc", "2"]
    assert one[one.index("--results-dir") + 1] == str(tmp_path / "ddp" / "ranks-1")
    assert step.env["GLOO_SOCKET_IFNAME"] and "CAPBENCH_DIST_BACKEND" not in step.env
    (tmp_path / "ddp").mkdir()
    gt._ddp_config(tmp_path / "ddp" / "ddp.yaml", quick=True)
    cfg = load_config(str(tmp_path / "ddp" / "ddp.yaml"))
    check_run_settings(cfg)
    assert (cfg.dataset, cfg.decoder_hparams["dropout"], cfg.train.epochs, cfg.train.scst_epochs) == \
        ("shapes:48", 0.0, 1, 1)
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv: launched.append(nproc) or 0)
    res = CliRunner().invoke(app, two)
    assert res.exit_code == 0, res.output
    assert launched == [2]
