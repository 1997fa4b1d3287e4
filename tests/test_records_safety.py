"""Run records are never lost (issue 24, classes 5 and 6).

Two processes continuing one unfinished run: the second stops at once with a clear error
(the lock is a real flock held by another process, released when that process dies); a run
id that has a record already is never written over; output options never replace a run
record or a dataset file; and the start-up cleaner, with TMPDIR pointing at a shared folder,
removes only capbench's own leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.config import config_id, load_config, resolved_config
from benchmark.errors import StorageError
from benchmark.fsutil import exclusive_lock, host_tag
from benchmark.records import RunRecord, new_run_id

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fails(args, *messages) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output
    assert result.exit_code == 2, (args, out, result.exception)
    assert "Traceback" not in out and out.count("error:") == 1, out
    for m in messages:
        assert m in out.replace("\n", ""), (m, out)
    return out


def _unfinished(results: Path, dataset: Path) -> tuple[str, Path]:
    """A saved training state of the tiny config (seed 0), as a killed run leaves it; its
    bytes are never read here: every case stops before."""
    resolved = resolved_config(load_config("tiny", {"dataset": str(dataset),
                                                    "results_dir": str(results)}))
    run_id = new_run_id(resolved["decoder"], resolved["encoder"], 0)
    state = results / "unfinished" / config_id(resolved) / f"{run_id}.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"epoch 3 of 8")
    return run_id, state


def _record(run_id: str) -> dict:
    return {"run_id": run_id, "arch": "attn_lstm", "encoder": "resnet18",
            "dataset": {"name": "shapes", "split_fingerprint": "abc"},
            "metrics": {"CIDEr": 0.512}}


HOLDER = textwrap.dedent("""
    import sys, time
    from benchmark.fsutil import exclusive_lock
    with exclusive_lock(sys.argv[1], what="continuing this run (" + sys.argv[2] + ")"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_second_process_resuming_the_same_run_is_refused(tmp_path, tiny_shapes):
    """Process 1 holds the run's lock (as `run --resume` does while it trains); process 2,
    `capbench run --resume` of the same config and seed, stops with one error line naming
    process 1 before any feature is extracted, and the saved state is untouched. Once process
    1 is killed, the kernel has released the lock: nothing blocks the next resume."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    run_id, state = _unfinished(results, tiny_shapes)
    env = {**os.environ, "CAPBENCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state.with_suffix(".lock")),
                               run_id], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "benchmark.cli", "run", "--config", "tiny", "--dataset",
             str(tiny_shapes), "--results-dir", str(results), "--resume", "--device", "cpu"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        err = " ".join(second.stderr.split())
        assert f"error: another process (pid {holder.pid}) is continuing this run ({run_id})" \
            in err, err
        assert "Traceback" not in err and err.count("error:") == 1
        assert state.read_bytes() == b"epoch 3 of 8"
        assert not (cache / "features").exists()  # refused before any work
        assert not (results / "runs").exists() or not any((results / "runs").iterdir())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    t0 = time.perf_counter()
    with exclusive_lock(state.with_suffix(".lock"), what="continuing this run"):
        pass  # the dead holder's lock is gone at once
    assert time.perf_counter() - t0 < 1.0
    assert not state.with_suffix(".lock").exists() and state.exists()


def test_resume_of_a_run_with_a_record_is_refused(tmp_path, tiny_shapes, monkeypatch):
    """A state left beside a finished run's record (its process stopped before removing the
    state) is not trained again into the same run id: one error, both files kept."""
    monkeypatch.setenv("CAPBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    run_id, state = _unfinished(results, tiny_shapes)
    record = results / "runs" / f"{run_id}.json"
    record.parent.mkdir()
    record.write_text(json.dumps(_record(run_id)))
    before = record.read_bytes()
    _fails(["run", "--config", "tiny", "--dataset", tiny_shapes, "--results-dir", results,
            "--resume", "--device", "cpu"], f"run {run_id} is finished already", str(state))
    assert record.read_bytes() == before and state.read_bytes() == b"epoch 3 of 8"
    assert not (tmp_path / "cache" / "features").exists()


def test_persist_never_writes_over_or_removes_another_record(tmp_path, monkeypatch):
    """A run id whose record and checkpoint exist already (another process finished it): the
    new record goes to the fallback folder, as the message says, and the first one is kept
    byte for byte (it was overwritten, then removed)."""
    from benchmark import checkpoint as ckpt_mod

    results = tmp_path / "results"
    run_id = "20261122-015232-attn_lstm-resnet18-s0-ab12"
    first = results / "runs" / f"{run_id}.json"
    first.parent.mkdir(parents=True)
    first.write_text(json.dumps(_record(run_id)))
    before = first.read_bytes()
    ckpt = results / "checkpoints" / run_id
    ckpt.mkdir(parents=True)
    (ckpt / "decoder.safetensors").write_bytes(b"first")
    monkeypatch.setattr(ckpt_mod, "save_checkpoint",
                        lambda folder, contents: (Path(folder).mkdir(parents=True),
                                                  (Path(folder) / "w").write_bytes(b"2")))
    monkeypatch.setattr(ckpt_mod, "_fallback_bases", lambda: [tmp_path / "spare"])
    second = RunRecord.from_dict({**_record(run_id), "metrics": {"CIDEr": 0.3}}, "second")
    second.checkpoint = str(ckpt)
    with pytest.raises(StorageError, match="Nothing is lost") as info:
        ckpt_mod.save_run(second, None, results)
    assert first.read_bytes() == before
    assert (ckpt / "decoder.safetensors").read_bytes() == b"first"
    saved = tmp_path / "spare" / run_id / "runs" / f"{run_id}.json"
    assert str(saved) in str(info.value)
    assert json.loads(saved.read_text())["metrics"] == {"CIDEr": 0.3}
    assert [p.name for p in (results / "checkpoints").iterdir()] == [run_id]  # no temp left


def test_outputs_never_replace_records_or_datasets(tmp_path, tiny_shapes):
    """report/bench --output and data --out (even with --force) refuse a run record (in a
    runs/ folder, or anywhere by content) and, where they do not write datasets, a dataset
    file; each file is kept byte for byte."""
    results = tmp_path / "results"
    in_runs = results / "runs" / "r1.json"
    in_runs.parent.mkdir(parents=True)
    in_runs.write_text(json.dumps(_record("r1")))
    elsewhere = tmp_path / "saved" / "dataset.json"  # a record kept under another name
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps(_record("r2")))
    dataset = tmp_path / "data.json"
    shutil.copy(tiny_shapes, dataset)
    kept = {p: p.read_bytes() for p in (in_runs, elsewhere, dataset)}
    for target, kind in ((in_runs, "a run record"), (elsewhere, "a run record"),
                         (dataset, "a dataset file")):
        _fails(["report", "--results-dir", results, "--format", "csv", "--output", target],
               f"--output {target} is {kind}")
        _fails(["bench", "--output", target], f"--output {target} is {kind}")
    (tmp_path / "images").mkdir()
    for target in (in_runs, elsewhere):
        _fails(["data", "coco", "--captions", dataset, "--images", tmp_path / "images",
                "--out", target, "--force"], f"--out {target} is a run record")
    _fails(["data", "shapes", "--out", elsewhere.parent, "--force", "--n-images", "10"],
           f"--out {elsewhere} is a run record")
    assert {p: p.read_bytes() for p in kept} == kept
    assert not (results / "LEADERBOARD.md").exists()  # refused before any work


def test_startup_cleaner_leaves_other_programs_files_in_a_shared_temp_folder(tmp_path,
                                                                             monkeypatch):
    """TMPDIR is a folder other programs share: a capbench command removes the scratch
    folders dead capbench processes left there, and nothing else, whatever its name looks
    like."""
    shared = tmp_path / "shared"
    shared.mkdir()
    dead, alive = _dead_pid(), os.getpid()
    two_hours_ago = time.time() - 7200
    foreign = [shared / f".name.{dead}.keep.tmp", shared / f".name.{dead}@{host_tag()}.keep.tmp",
               shared / "tmp123.tmp"]
    foreign_dirs = [shared / f"name-{dead}-keep", shared / f".tmp-shapes-{dead}-keep"]
    ours_stale = [shared / f"capbench-ptb-{dead}-abcd", shared / f"capbench-check-{dead}-x1",
                  shared / "capbench-spice-q7w8"]  # the last: an older version's, 2 hours old
    ours_live = shared / f"capbench-ptb-{alive}-live"
    for p in foreign:
        p.write_text("another program's")
    for p in [*foreign_dirs, *ours_stale, ours_live]:
        p.mkdir()
        (p / "inside.txt").write_text("x")
    for p in [*foreign, *foreign_dirs, *ours_stale]:
        os.utime(p, (two_hours_ago, two_hours_ago))
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    # any command cleans at start-up (`list` as in the issue, but it builds every model: 9 s)
    (tmp_path / "none").mkdir()
    result = runner.invoke(app, ["report", "--results-dir", tmp_path / "none",
                                 "--no-leaderboard-file"])
    assert result.exit_code == 0, result.output
    made = [*foreign, *foreign_dirs, *ours_stale, ours_live]
    assert sorted(p.name for p in made if p.exists()) == sorted(
        p.name for p in [*foreign, *foreign_dirs, ours_live])
    assert all((p / "inside.txt").exists() for p in foreign_dirs)


def test_version_1_records_load_in_the_new_config_names(tmp_path):
    """Records written before the rename (schema 1: ``config.arch``, ``config.decoder`` the
    hyperparameters) read as ``decoder`` / ``decoder_hparams``, write back unchanged, keep
    their config id, and give the same board as the same records in schema 2."""
    import pandas as pd

    from benchmark.records import config_with_old_names, load_records, write_record
    from benchmark.report import leaderboard

    old, _ = load_records(ROOT / "results" / "shapes")
    assert old and all(r.schema_version == 1 for r in old)
    for r in old:
        raw = json.loads(Path(r.path).read_text())
        assert "arch" in raw["config"] and isinstance(raw["config"]["decoder"], dict)
        assert (r.config["decoder"], r.config["decoder_hparams"]) == \
            (raw["config"]["arch"], raw["config"]["decoder"]) and "arch" not in r.config
        assert r.to_dict()["config"] == config_with_old_names(r.config) == raw["config"]
        assert config_id(r.config) == r.config_id
        r.schema_version = 2  # as a run of this version writes it
        write_record(r, tmp_path)
    new, _ = load_records(tmp_path)
    assert all(json.loads(Path(r.path).read_text())["config"]["decoder"] == r.arch for r in new)
    pd.testing.assert_frame_equal(leaderboard(old), leaderboard(new))


@pytest.mark.slow
def test_a_checkpoint_saved_before_the_rename_loads(tiny_run, tmp_path):
    """A checkpoint whose config.json has the old names (arch, decoder) loads as one saved
    now: the same decoder, hyperparameters and captions."""
    from benchmark.checkpoint import load_run
    from benchmark.records import config_with_old_names

    _, record = tiny_run
    folder = tmp_path / "old-checkpoint"
    shutil.copytree(record.checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config_with_old_names(config)))
    now, before = load_run(record.checkpoint), load_run(str(folder))
    assert before.config == now.config and before.arch == now.arch == "attn_lstm"
    state = now.decoder.state_dict()
    assert all((v == state[k]).all() for k, v in before.decoder.state_dict().items())
