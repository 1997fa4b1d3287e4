"""The matrix on Slurm and on local processes (``capbench matrix --launcher``, issue 29),
against a real single-node Slurm (Debian's slurm-wlm, started by ``tests/slurm/start.sh``;
the Slurm tests skip with the reason where it cannot be installed or started).

The cells are the tiny preset's rnn and lstm on a random-init resnet18, on the
40-image set (2 epochs). Every process of these tests (the reference, the Slurm tasks, the local
processes) runs with a ``java`` that fails first on PATH: METEOR and the Java PTB tokenizer
are then unavailable, which makes a cell several times faster and changes nothing that is
tested here (which process runs a cell, and that it ends with the same record)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from benchmark import launcher
from benchmark import matrix as matrix_mod
from benchmark.cli import app
from benchmark.config import load_config
from benchmark.errors import CapbenchWarning, ConfigError
from benchmark.fsutil import exclusive_lock
from benchmark.launcher import check_slurm, run_local, slurm_settings
from benchmark.matrix import plan_cells
from benchmark.metrics import coco
from benchmark.records import load_records

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _sinfo_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc"))
                                       for s in out.stdout.split())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node Slurm cluster on this machine: already up, or installed and started by
    tests/slurm/start.sh (root and apt needed); skips with the reason otherwise."""
    if _sinfo_up():
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster answers and this is not root: cannot install/start one")
    out = subprocess.run([str(ROOT / "tests" / "slurm" / "start.sh")], capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0 or not _sinfo_up():
        pytest.skip(f"no Slurm cluster: {out.stderr.strip()[-400:]}")


@pytest.fixture(scope="module")
def no_java(tmp_path_factory):
    """A PATH whose first ``java`` fails (so: no METEOR, Python PTB tokenization), set for
    this module's processes and for the subprocesses and Slurm tasks they start."""
    folder = tmp_path_factory.mktemp("nojava")
    (folder / "java").write_text("#!/bin/sh\nexit 1\n")
    (folder / "java").chmod(0o755)
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    coco.java_version.cache_clear()
    yield dict(os.environ)
    mp.undo()
    coco.java_version.cache_clear()


@pytest.fixture(scope="module")
def matrix_file(tiny_shapes, tmp_path_factory) -> Path:
    """The 2-cell matrix config (tiny preset, rnn and lstm x resnet18, 2 epochs), with a
    launcher section."""
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data.update(dataset=str(tiny_shapes), matrix={"archs": ["rnn", "lstm"],
                                                  "encoders": ["resnet18"], "seeds": [0]},
                launcher={"cpus_per_task": 1, "time_min": 20})
    data["train"]["epochs"] = 2
    path = tmp_path_factory.mktemp("matrix") / "matrix.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(matrix_file, no_java, tmp_path_factory) -> dict:
    """The same cells run in this one process (the plain matrix loop): ``{arch: record}``."""
    results = tmp_path_factory.mktemp("reference")
    out = runner.invoke(app, ["matrix", "--config", str(matrix_file), "--results-dir",
                              str(results)])
    assert out.exit_code == 0, out.output
    records = {r.arch: r for r in load_records(results)[0]}
    assert sorted(records) == ["lstm", "rnn"]
    assert records["rnn"].metrics["METEOR"] is None  # no Java here
    assert records["rnn"].metrics["CIDEr"] >= 0
    return records


def _same(records: dict, reference: dict) -> None:
    assert sorted(records) == sorted(reference)
    for arch, ref in reference.items():
        assert records[arch].metrics == ref.metrics, arch
        assert records[arch].predictions == ref.predictions, arch
        assert records[arch].config_id == ref.config_id


def _matrix(matrix_file: Path, results: Path, *flags):
    """``capbench matrix`` in this process (its PATH, without Java, goes to the Slurm tasks
    and local processes it starts)."""
    return runner.invoke(app, ["matrix", "--config", str(matrix_file), "--results-dir",
                               str(results), *map(str, flags)])


def _status(matrix_file: Path, results: Path) -> list[dict]:
    out = _matrix(matrix_file, results, "--status", "--format", "json")
    assert out.exit_code in (0, 1), out.output
    return json.loads(out.stdout)["cells"]


def _until(what: str, check, timeout: float = 240, poll: float = 0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = check()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def test_list_cells_cell_range_and_not_started(matrix_file, tmp_path):
    out = runner.invoke(app, ["matrix", "--config", str(matrix_file), "--list-cells",
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    cells = json.loads(out.stdout)["cells"]
    assert [(c["index"], c["arch"], c["encoder"], c["seed"]) for c in cells] == \
        [(0, "rnn", "resnet18", 0), (1, "lstm", "resnet18", 0)]
    bad = runner.invoke(app, ["matrix", "--config", str(matrix_file), "--cell", "2",
                              "--results-dir", str(tmp_path)])
    assert bad.exit_code == 2
    assert "--cell 2: no such cell; this matrix has 2 cells, numbered 0 to 1" in \
        " ".join(bad.output.split())
    assert not (tmp_path / "runs").exists()  # nothing ran
    status = runner.invoke(app, ["matrix", "--config", str(matrix_file), "--status",
                                 "--format", "json", "--results-dir", str(tmp_path)])
    assert status.exit_code == 0, status.output
    assert [c["state"] for c in json.loads(status.stdout)["cells"]] == ["not started"] * 2


def test_status_sees_a_local_process_and_a_recorded_failure(matrix_file, tmp_path):
    """A process holding the lock of cell 0's unfinished run (as ``run_experiment`` does
    while it trains) makes it running; cell 1's failure file (written by the matrix's own
    writer) makes it failed with its error, and --status exits 1."""
    cfg = load_config(str(matrix_file), {"results_dir": str(tmp_path)})
    cells = plan_cells(cfg, ["rnn", "lstm"], ["resnet18"], [0])
    state = tmp_path / "unfinished" / cells[0].config_id / "20260101-000000-rnn-resnet18-s0-abcd.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"")
    try:
        raise RuntimeError("simulated out-of-memory")
    except RuntimeError as exc:
        matrix_mod._record_failure(tmp_path, cells[1], exc)
    with exclusive_lock(state.with_suffix(".lock"), what="training"):
        out = _matrix(matrix_file, tmp_path, "--status", "--format", "json")
    assert out.exit_code == 1
    rows = json.loads(out.stdout)["cells"]
    assert rows[0]["state"] == "running" and rows[0]["detail"] == f"pid {os.getpid()}"
    assert rows[1]["state"] == "failed" and "simulated out-of-memory" in rows[1]["detail"]
    after = json.loads(_matrix(matrix_file, tmp_path, "--status", "--format", "json").stdout)
    assert after["cells"][0]["state"] == "failed"  # stopped, nothing continues it
    assert "resumes from its last completed epoch" in after["cells"][0]["detail"]


def test_bad_slurm_settings_fail_before_anything_is_submitted(matrix_file, tmp_path,
                                                              monkeypatch):
    def fails(*flags, env_path=None):
        if env_path is not None:
            monkeypatch.setenv("PATH", env_path)
        out = runner.invoke(app, ["matrix", "--config", str(matrix_file), "--results-dir",
                                  str(tmp_path), "--launcher", "slurm", *flags])
        assert out.exit_code == 2, out.output
        assert out.output.count("error:") == 1 and "Traceback" not in out.output
        return " ".join(out.output.split())

    said = fails("--slurm", "partiton=gpu")
    assert "'partiton' is not a Slurm setting" in said
    assert "partition, gpus_per_task, cpus_per_task, mem_gb, time_min, array_parallelism, sbatch" in said
    assert "mem_gb='lots': expected float" in fails("--slurm", "mem_gb=lots")
    assert "give KEY=VALUE" in fails("--slurm", "partition")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(matrix_file.read_text().replace("cpus_per_task", "cpus"))
    with pytest.raises(ConfigError, match=r"bad.yaml: launcher: 'cpus' is not a Slurm setting"):
        slurm_settings(str(bad_file))
    assert slurm_settings(str(matrix_file), {"time_min": "5", "sbatch": {"qos": "high"}}) == \
        {"cpus_per_task": 1, "time_min": 5, "sbatch": {"qos": "high"}}
    if shutil.which("sbatch"):
        assert "sbatch option 'acount' does not exist" in fails("--slurm", "sbatch.acount=abc")
        with pytest.warns(CapbenchWarning, match="under /tmp.*other nodes may not share"):
            check_slurm("/tmp/capbench-results", {"sbatch": {"account": "abc"}})
    said = fails(env_path=str(tmp_path))  # a PATH without sbatch
    assert "sbatch is not on PATH" in said and "--launcher local" in said
    assert not list((tmp_path / "submitit").glob("*.sh"))  # nothing was submitted


@pytest.mark.slow
def test_cell_alone_and_local_parallel_give_the_same_records(matrix_file, reference, no_java,
                                                             tmp_path):
    out = _matrix(matrix_file, tmp_path, "--launcher", "local", "--parallel", "2")
    assert out.exit_code == 0, out.output[-3000:]
    said = " ".join(out.stdout.split())
    assert "matrix: 2 cell(s) run" in said
    assert "matrix cell 0: ok" in said and "matrix cell 1: ok" in said
    _same({r.arch: r for r in load_records(tmp_path)[0]}, reference)
    again = runner.invoke(app, ["matrix", "--config", str(matrix_file), "--results-dir",
                                str(tmp_path), "--cell", "1"])
    assert again.exit_code == 0 and "lstm x resnet18 seed 0: done" in again.output


@pytest.mark.slow
def test_slurm_array_requeue_status_retry_and_board(slurm_cluster, matrix_file, reference,
                                                    no_java, tmp_path):
    """Both cells as one Slurm array; cell 0 is sent submitit's preemption/timeout signal
    (USR2) after its first epoch, so submitit checkpoints and requeues it and the requeued
    task resumes from that epoch; cell 1's task is killed (SIGKILL, as the kernel's OOM killer
    would) while it trains (failed, with its log) and resubmitted alone with --retry-failed.
    (A plain scancel is not used: submitit bypasses SIGTERM and srun then waits 4 s, long
    enough for a tiny cell to finish and write its record.) Both end with the records of the
    uninterrupted in-process run, and --status says each state along the way.

    Slurm delays a requeued job's start by 2 minutes (its EligibleTime); the test, as the
    cluster's admin, releases it at once with ``scontrol update StartTime=now``."""
    results = tmp_path / "results"
    out = _matrix(matrix_file, results, "--launcher", "slurm")
    assert out.exit_code == 0, out.output[-3000:]
    assert "matrix: 2 cell(s) submitted" in out.stdout and "job array" in out.stdout
    if str(results.resolve()).startswith("/tmp/"):  # warned: other nodes may not share it
        assert "under /tmp" in out.stderr
    first = _status(matrix_file, results)
    assert {c["state"] for c in first} <= {"queued", "running"}
    job0, job1 = first[0]["job"], first[1]["job"]
    assert job0.endswith("_0") and job1.endswith("_1") and job0.split("_")[0] == job1.split("_")[0]
    cid0, cid1 = reference["rnn"].config_id, reference["lstm"].config_id
    _until("cell 1 training (its run lock)",
           lambda: list((results / "unfinished" / cid1).glob("*.lock")), poll=0.05)
    subprocess.run(["scancel", "--full", "--signal=KILL", job1], check=True)
    state0 = _until("cell 0's first epoch", lambda: list((results / "unfinished" / cid0).glob("*.pt")))
    subprocess.run(["scancel", "--signal=USR2", job0], check=True)
    _until("cell 0 requeued", lambda: _squeue(job0) == "PENDING")
    states = _until("cell 1 failed", lambda: (s := _status(matrix_file, results))[1]["state"]
                    == "failed" and s, poll=0.5)
    assert states[0]["state"] == "queued" and "pending" in states[0]["detail"]
    logs = [results / "submitit" / f"{job1}_0_log.{kind}" for kind in ("err", "out")]
    ends = [p.read_text().rstrip().splitlines()[-8:] for p in logs if p.exists()]
    assert states[1]["log"] and states[1]["log"].splitlines() in ends  # the end of its log
    subprocess.run(["scontrol", "update", f"JobId={job0}", "StartTime=now"], check=True)
    out = _matrix(matrix_file, results, "--launcher", "slurm", "--retry-failed", "--board-job",
                  "--wait")
    assert out.exit_code == 0, out.output[-3000:]
    said = " ".join(out.stdout.split())
    assert "matrix: 1 cell(s) submitted" in said and "board job" in said
    records = {r.arch: r for r in load_records(results)[0]}
    _same(records, reference)
    assert records["rnn"].run_id == state0[0].stem  # the requeued task continued its run
    assert records["rnn"].training["resumed_from"] >= 1
    log0 = "".join((results / "submitit" / f"{job0}_0_log.{kind}").read_text()
                   for kind in ("err", "out"))
    # submitit's handler: preempted or timed out (a short time limit), checkpointed, requeued
    assert re.search(r"SIGUSR2 .* this job is (preempted|timed-out)", log0), log0
    assert "Calling checkpoint method" in log0, log0
    assert [c["state"] for c in _status(matrix_file, results)] == ["done", "done"]
    _until("the board job", lambda: (results / "LEADERBOARD.md").exists(), timeout=120)
    board = (results / "LEADERBOARD.md").read_text()
    assert "| rnn |" in board and "| lstm |" in board


def test_launcher_flags_need_their_launcher(matrix_file, tmp_path):
    """--slurm/--wait/--board-job without --launcher slurm and --parallel K without --launcher
    local are refused before anything runs (they used to be ignored, training the matrix in
    this process)."""
    for flags, said in ((["--slurm", "partition=gpu"], "--slurm needs --launcher slurm"),
                        (["--wait"], "--wait needs --launcher slurm"),
                        (["--launcher", "local", "--board-job"],
                         "--board-job needs --launcher slurm (this command has --launcher local)"),
                        (["--parallel", "2"], "--parallel 2 needs --launcher local"),
                        (["--launcher", "slurm", "--parallel", "3"],
                         "--parallel 3 needs --launcher local")):
        out = _matrix(matrix_file, tmp_path, *flags)
        assert out.exit_code == 2, (flags, out.output)
        assert said in " ".join(out.output.split()) and "Traceback" not in out.output
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_run_local_gives_every_item_a_fresh_process():
    """Three items, two at a time: three processes, none of them this one; an item's
    exception comes back in its place."""
    if not Path("/proc/self").exists():
        pytest.skip("no /proc/self here")
    got = run_local(os.readlink, ["/proc/self"] * 3 + ["/nonexistent-capbench"], 2)
    pids = got[:3]
    assert len(set(pids)) == 3 and str(os.getpid()) not in pids, got
    assert isinstance(got[3], FileNotFoundError)


def test_status_sees_a_run_lock_before_its_first_epoch_and_unknown_without_squeue(
        matrix_file, tmp_path, monkeypatch):
    """Cell 0's run lock is held but no epoch is saved yet: running (pid). Cell 1 was
    submitted to Slurm (cells.json) and has no record, and squeue is not on PATH: --status
    shows it unknown, saying why; --launcher local refuses to run it a second time."""
    cfg = load_config(str(matrix_file), {"results_dir": str(tmp_path)})
    cells = plan_cells(cfg, ["rnn", "lstm"], ["resnet18"], [0])
    lock = tmp_path / "unfinished" / cells[0].config_id / "20260101-000000-rnn-resnet18-s0-abcd.lock"
    manifest = tmp_path / "submitit" / "cells.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({f"{cells[1].config_id}-s0": {"job_id": "99_1"}}))
    monkeypatch.setenv("PATH", str(tmp_path / "submitit"))  # no squeue, no sbatch
    with exclusive_lock(lock, what="training"):
        out = _matrix(matrix_file, tmp_path, "--status", "--format", "json")
        assert out.exit_code == 0, out.output
        rows = json.loads(out.stdout)["cells"]
        refused = _matrix(matrix_file, tmp_path, "--launcher", "local", "--parallel", "2")
    assert rows[0]["state"] == "running" and rows[0]["detail"] == f"pid {os.getpid()}"
    assert rows[1]["state"] == "unknown" and "squeue is not on PATH" in rows[1]["detail"]
    assert refused.exit_code == 2 and "state is unknown" in " ".join(refused.output.split())
    after = json.loads(_matrix(matrix_file, tmp_path, "--status", "--format", "json").stdout)
    assert after["cells"][0]["state"] == "not started"  # the lock was released: nothing runs


def test_a_slurm_client_that_does_not_answer_is_one_error(matrix_file, tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nsleep 5\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(launcher, "SLURM_CMD_TIMEOUT_S", 0.5)
    out = _matrix(matrix_file, tmp_path / "results", "--launcher", "slurm")
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert "sbatch did not answer within 0.5 s" in " ".join(out.output.split()), out.output


def test_slurm_refusal_and_nothing_new_to_submit(slurm_cluster, matrix_file, tmp_path):
    """sbatch refusing the array (an unknown partition) is one error line with sbatch's own
    message; with every cell already queued (a held job stands for their task),
    --launcher slurm --board-job submits nothing new, still submits the board job after the
    queued task, and returns at once."""
    results = tmp_path / "results"
    out = _matrix(matrix_file, results, "--launcher", "slurm", "--slurm", "partition=nosuch")
    said = " ".join(out.output.split())
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert "sbatch refused the job" in said and "partition" in said.split("refused")[1].lower()
    assert said.count("Batch job submission failed") == 1  # said once, in the error line
    assert not (results / "submitit" / "cells.json").exists()
    held = subprocess.run(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "true"],
                          capture_output=True, text=True, check=True).stdout.strip()
    board = None
    try:
        cfg = load_config(str(matrix_file), {"results_dir": str(results)})
        cells = plan_cells(cfg, ["rnn", "lstm"], ["resnet18"], [0])
        (results / "submitit").mkdir(parents=True, exist_ok=True)
        (results / "submitit" / "cells.json").write_text(json.dumps(
            {f"{c.config_id}-s0": {"job_id": held} for c in cells}))
        out = _matrix(matrix_file, results, "--launcher", "slurm", "--board-job")
        said = " ".join(out.stdout.split())
        assert out.exit_code == 0, out.output
        assert "matrix: 0 cell(s) submitted; skipped 2 queued" in said
        board = re.search(r"board job (\d+)", said).group(1)
        assert "follow it with the same command and --status" in said
        dependency = subprocess.run(["squeue", "-h", "-j", board, "-o", "%E"],
                                    capture_output=True, text=True).stdout
        assert held in dependency
    finally:
        subprocess.run(["scancel", held, *([board] if board else [])])
