"""The docs' GPU figures (docs/gpu.md) in one command (``capbench gpu-table``): every figure the full-scale
work asks of a GPU, measured by capbench's own benchmarks on the machine at hand.

Each step runs capbench in a subprocess of its own, with its own time limit, so a step that
fails (a CUDA error, an op the local torch lacks) or runs out of time is reported with the end
of its output while the others go on. A lent GPU is held for minutes, not hours, so the steps
run in order of value, each under a limit (:func:`plan`), and ``--steps`` splits the table
over several calls:

==============  ==========================================================================
``encoders``    the three encoders' forward images/s at batch 256, bf16 autocast,
                channels-last (``capbench bench encoders``), random weights
``decoders``    the four decoders' training tokens/s, greedy and beam-5 captions/s and model
                FLOP utilisation against the bf16 matmul peak the bench measures itself, at
                the Show-Attend-Tell workload (``capbench bench decoders all --peak``)
``extraction``  end-to-end extraction images/s with each image decoder (Pillow in the
                DataLoader's workers, or decode_jpeg on the GPU: nvJPEG) and how far the two
                decoders' pixels are apart (``capbench bench extraction``)
``ddp``         two processes against one on the GPU (XE then SCST epochs): largest
                per-epoch loss difference, SCST reward difference, identical captions; NCCL
                with two GPUs, gloo on one (NCCL refuses two ranks on one GPU)
``matrix``      the 12-cell matrix on a Karpathy dataset end to end (extraction, training,
                beam-3 decoding, scoring) with random-weight encoders: wall time and each
                cell's throughput (its CIDEr only shows that the cell trained and scored)
``compile``     ``torch.compile`` speedup of the training step (rnn, lstm, transformer)
==============  ==========================================================================

Results go to ``<out>/gpu-table.json`` (every row of every step), ``<out>/gpu-table.md`` (the
tables the docs quote) and ``<out>/gpu-table.log`` (each step's command, time and output
tail). ``quick`` shrinks every step to seconds on a CPU, which is how the tests run it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmark.device import select_device
from benchmark.distributed import backend
from benchmark.errors import ConfigError
from benchmark.fsutil import atomic_write_text
from benchmark.records import load_records

__all__ = ["STEPS", "Step", "plan", "gpu_table", "render", "environment", "compare_ddp_runs"]

ROOT = Path(__file__).resolve().parents[1]
#: the steps, in the order they run (most wanted first, the optional compile timing last)
STEPS = ("encoders", "decoders", "extraction", "ddp", "matrix", "compile")
FULL_ENCODERS = "resnet50,vit_b16,clip_vit_b32"


@dataclass
class Step:
    """One capbench command of the table: ``runs`` are argument lists for ``python -m
    benchmark.cli`` (most steps have one; ``ddp`` has two), each limited to ``timeout``
    seconds; ``env`` is added to the environment."""

    name: str
    runs: list[list[str]]
    timeout: float
    env: dict = field(default_factory=dict)


def plan(dataset: str, device: str, work: Path, *, quick: bool = False) -> list[Step]:
    """The steps for ``dataset`` (a Karpathy ``dataset.json``, for extraction and the matrix)
    on ``device``; each step's run records and feature cache go under ``work/<step>/``.
    ``quick``: tiny encoders, workloads and epochs (seconds each on a CPU). The ``ddp`` runs
    take GPUs 0 and 1 (or share GPU 0) whatever ``cuda:N`` says."""
    dev = ["--device", device, "--format", "json"]
    if quick:
        encoders = ["encoders", "resnet18,vit_tiny", "--batch-size", "4", "--iters", "2"]
        workload = ["--grid-size", "16", "--grid-dim", "64", "--vocab-size", "200",
                    "--batch-size", "4", "--caption-len", "6", "--embed-dim", "32",
                    "--hidden-dim", "32", "--attention-dim", "32", "--num-heads", "4",
                    "--iters", "2"]
        decoders = ["decoders", "all", "--peak", *workload]
        compile_ = ["decoders", "rnn", "--compile", *workload]
        extraction = ["extraction", dataset, "--encoder", "resnet18", "--images", "8",
                      "--batch-size", "4", "--iters", "1", "--num-workers", "0"]
        matrix = ["matrix", "--config", "tiny", "--archs", "rnn,attn_lstm", "--encoders",
                  "resnet18", "--dataset", dataset, "--epochs", "1"]
        limits = {"encoders": 300, "decoders": 300, "compile": 600, "extraction": 300,
                  "ddp": 600, "matrix": 600}
    else:
        encoders = ["encoders", FULL_ENCODERS, "--batch-size", "256", "--iters", "10"]
        decoders = ["decoders", "all", "--peak", "--iters", "10"]
        compile_ = ["decoders", "rnn,lstm,transformer", "--compile", "--iters", "5"]
        extraction = ["extraction", dataset, "--encoder", FULL_ENCODERS, "--images", "1000",
                      "--batch-size", "256", "--iters", "3"]
        matrix = ["matrix", "--config", "matrix-flickr8k-mini", "--dataset", dataset]
        # seconds; the matrix took 20.5 min on the 2-core CPU, mostly extraction and decoding
        # per command (ddp has two): the first four steps take 9 min 50 s at most, the last two
        # 9 min 30 s, so each pair fits one 10-minute call of a lent machine
        limits = {"encoders": 90, "decoders": 150, "extraction": 150, "ddp": 100,
                  "matrix": 420, "compile": 150}
    ranks_on = "cuda" if device.startswith("cuda") else device  # each rank takes its own GPU
    ddp = [["run", "--config", str(work / "ddp" / "ddp.yaml"), "--device", ranks_on,
            "--results-dir", str(work / "ddp" / f"ranks-{n}"), *([] if n == 1 else ["--nproc", "2"])]
           for n in (1, 2)]
    # gloo on one GPU (NCCL refuses two ranks on one); loopback, as the ranks share a machine
    ddp_env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        ddp_env["CAPBENCH_DIST_BACKEND"] = "gloo"
    steps = {
        "encoders": Step("encoders", [["bench", *encoders, *dev]], limits["encoders"]),
        "decoders": Step("decoders", [["bench", *decoders, *dev]], limits["decoders"]),
        "extraction": Step("extraction", [["bench", *extraction, *dev]], limits["extraction"]),
        "ddp": Step("ddp", ddp, limits["ddp"], ddp_env),
        "matrix": Step("matrix", [[*matrix, "--no-pretrained", "--device", device,
                                   "--results-dir", str(work / "matrix" / "runs")]],
                       limits["matrix"]),
        "compile": Step("compile", [["bench", *compile_, *dev]], limits["compile"]),
    }
    return [steps[s] for s in STEPS]


def environment(device: str) -> dict:
    """Python, torch, CUDA, cuDNN and the GPU(s), as the run record's environment names them."""
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": device, "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=torch.cuda.get_device_name(index), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def _ddp_config(path: Path, quick: bool = False) -> None:
    """The DDP step's config: the tiny preset without dropout (each rank draws its own
    masks), 2 XE + 1 SCST epochs, a global batch of 37 so that the last batches are short;
    ``quick``: 1 + 1 epochs on 48 shapes images instead of 160."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["decoder_hparams"]["dropout"] = 0.0
    cfg["train"].update(epochs=1 if quick else 2, scst_epochs=1, batch_size=37)
    if quick:
        cfg["dataset"] = "shapes:48"
    path.write_text(yaml.safe_dump(cfg))


def _run(argv: list[str], timeout: float, env: dict, log: Callable[[str], None]) -> dict:
    """One ``python -m benchmark.cli`` command: rc (its exit status, or ``"timeout"``),
    seconds, stdout and the tail of stdout and stderr."""
    full = {**os.environ, **env,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "benchmark.cli", *argv]
    log("$ " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    # files, not pipes: a process that outlives the command cannot hold its output open; and a
    # session of its own, so that stopping it reaches torchrun and the DataLoader workers too
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = "timeout"
        except BaseException:  # Ctrl-C, or anything else: leave nothing running
            _stop(proc)
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"argv": argv, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "stdout": stdout, "tail": (stdout[-1500:] + "\n" + stderr[-2500:]).strip()}


def _stop(proc: subprocess.Popen, grace: float = 40.0) -> None:
    """End ``proc``'s process group: SIGTERM first (torchrun then stops its ranks, which run
    in sessions of their own, within its 30-second close timeout), SIGKILL for whatever is
    left after ``grace`` seconds."""
    def signal_group(sig) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so that a group of zombies does not count as alive
        if not signal_group(0):
            break
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
    proc.wait()


def _json_rows(stdout: str):
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return None


def compare_ddp_runs(one_dir: Path, two_dir: Path) -> dict:
    """The records of one run in ``one_dir`` (1 process) and one in ``two_dir`` (several),
    side by side: ``world_size``, ``phases``, the largest per-epoch loss and SCST reward
    differences, whether predictions and metrics are identical, and both CIDEr-D values.
    Raises ValueError unless each folder holds exactly one record."""
    (one,), _ = load_records(one_dir)
    (two,), _ = load_records(two_dir)
    h1, h2 = one.training["history"], two.training["history"]
    losses = [abs(a["loss"] - b["loss"]) for a, b in zip(h1, h2, strict=True)]
    rewards = [abs(a["reward"] - b["reward"]) for a, b in zip(h1, h2, strict=True)
               if a.get("reward") is not None]
    return {"world_size": two.environment.get("world_size"),
            "phases": [h["phase"] for h in h1], "max_loss_diff": max(losses),
            "max_reward_diff": max(rewards) if rewards else None,
            "same_predictions": one.predictions == two.predictions,
            "same_metrics": one.metrics == two.metrics,
            "cider_one": one.metrics.get("CIDEr"), "cider_two": two.metrics.get("CIDEr")}


def _matrix_result(work: Path, seconds: float) -> dict:
    records, _ = load_records(work / "matrix" / "runs")
    cells = [{"arch": r.arch, "encoder": r.encoder, "CIDEr": r.metrics.get("CIDEr"),
              "Bleu_4": r.metrics.get("Bleu_4"), "wall_s": r.wall_seconds,
              "extraction_images_per_s": r.throughput.get("feature_extraction_images_per_s"),
              "train_tokens_per_s": r.throughput.get("train_tokens_per_s"),
              "decoder_captions_per_s": r.throughput.get("decoder_captions_per_s")}
             for r in records]
    return {"seconds": seconds, "cells": sorted(cells, key=lambda c: (c["encoder"], c["arch"]))}


def gpu_table(out: Path, dataset: str, *, device: str = "cuda", quick: bool = False,
              steps: list[str] | None = None, work: Path | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run the ``steps`` (default all, see :data:`STEPS`) and write ``gpu-table.json``,
    ``gpu-table.md`` and ``gpu-table.log`` under ``out``; returns the JSON's content:
    ``{"environment": ..., "steps": {name: {"ok", "seconds", "rows" | "rc", "error"}}}``
    (``rc``: the failed command's exit status or ``"timeout"``; ``error``: its output's end).
    Steps of an earlier call with the same ``out``, environment, sizes and dataset that this
    call does not run are kept, so ``--steps`` can split the table over several calls.

    Raises ConfigError, before any step, for an unknown step, a missing dataset or a device
    this machine lacks; a failing step is reported in its entry, not raised."""
    chosen = list(steps or STEPS)
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ConfigError(f"--steps {','.join(unknown)}: choose from {', '.join(STEPS)}")
    dataset = str(Path(dataset).resolve())  # the steps run in the project folder
    if not Path(dataset).is_file():
        raise ConfigError(f"--dataset {dataset}: no such file; give a Karpathy dataset.json "
                          "(e.g. ../shared/data/flickr8k-mini/dataset.json)")
    select_device(device)
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="capbench-gpu-table-")).resolve()
    result = {"environment": environment(device), "quick": quick, "dataset": dataset,
              "steps": {}}
    earlier = _earlier_steps(out / "gpu-table.json", result)
    lines: list[str] = []

    def note(text: str) -> None:
        lines.append(text)
        log(text)

    if earlier:
        note(f"keeping the steps of an earlier call on this machine: {', '.join(earlier)}")
    try:
        for step in plan(dataset, device, work, quick=quick):
            if step.name not in chosen:
                continue
            folder = work / step.name  # fresh for each call: cold caches, this call's records
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            if step.name == "ddp":
                _ddp_config(folder / "ddp.yaml", quick)
            note(f"== {step.name}")
            env = {"CAPBENCH_CACHE": str(folder / "cache"), **step.env}
            runs = [_run(argv, step.timeout, env, note) for argv in step.runs]
            lines.extend(f"rc {r['rc']} in {r['seconds']} s\n{r['tail']}" for r in runs)
            entry = _entry(step, runs, work, device)
            note(f"{step.name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']} s")
            result["steps"][step.name] = entry
            _write(out, result, earlier, lines)
    finally:
        _write(out, result, earlier, lines)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return {**result, "steps": _merged(result, earlier)}


def _entry(step: Step, runs: list[dict], work: Path, device: str) -> dict:
    """A step's entry from its commands' results: its rows, or why it has none."""
    seconds = round(sum(r["seconds"] for r in runs), 1)
    bad = next((r for r in runs if r["rc"] != 0), None)
    if bad is not None:
        return {"ok": False, "seconds": seconds, "rc": bad["rc"], "error": bad["tail"][-1200:]}
    entry: dict = {"ok": True, "seconds": seconds}
    try:
        if step.name == "ddp":
            entry["rows"] = compare_ddp_runs(work / "ddp" / "ranks-1", work / "ddp" / "ranks-2")

            entry["backend"] = step.env.get("CAPBENCH_DIST_BACKEND") or \
                backend("cuda" if device.startswith("cuda") else "cpu")
        elif step.name == "matrix":
            entry["rows"] = _matrix_result(work, seconds)
        else:
            entry["rows"] = _json_rows(runs[0]["stdout"])
            if entry["rows"] is None:
                raise ValueError("its output holds no JSON rows")
    except Exception as exc:  # noqa: BLE001 - a step's failure is reported, the next one runs
        return {"ok": False, "seconds": seconds, "rc": 0,
                "error": f"{type(exc).__name__} reading its results: {exc}\n{runs[-1]['tail'][-800:]}"}
    return entry


def _earlier_steps(path: Path, result: dict) -> dict:
    """The steps of an earlier call's ``gpu-table.json`` at ``path`` made with the same
    environment, sizes and dataset (so that ``--steps`` can split the table over calls);
    nothing when there is none or it was made otherwise."""
    try:
        old = json.loads(path.read_text())
        same = all(old.get(k) == result[k] for k in ("environment", "quick", "dataset"))
        return dict(old["steps"]) if same else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _merged(result: dict, earlier: dict) -> dict:
    """This call's steps over the earlier call's, in :data:`STEPS` order."""
    both = {**earlier, **result["steps"]}
    return {s: both[s] for s in STEPS if s in both}


def _write(out: Path, result: dict, earlier: dict, lines: list[str]) -> None:
    merged = {**result, "steps": _merged(result, earlier)}
    atomic_write_text(out / "gpu-table.json", json.dumps(merged, indent=1) + "\n")
    atomic_write_text(out / "gpu-table.md", render(merged))
    atomic_write_text(out / "gpu-table.log", "\n".join(lines) + "\n")


def _f(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _table(columns: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines, and a blank line after it."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def render(result: dict) -> str:
    """The Markdown tables of a :func:`gpu_table` result (a failed step says why; rows this
    version cannot read, say from another version's JSON, are named, not raised)."""
    try:
        return _render(result)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return (f"(the tables could not be drawn from these results: {type(exc).__name__} "
                f"{exc}; gpu-table.json holds them)\n")


def _render(result: dict) -> str:
    env, steps = result["environment"], result["steps"]
    head = env.get("gpu") or f"{env['device']} ({env.get('cpu_count')} cores)"
    out = [f"## capbench on {head}", "",
           f"torch {env['torch']}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, "
           f"Python {env['python']}" + (", quick sizes (a test, not figures)" if result.get("quick") else ""),
           ""]

    def failed(name: str) -> bool:
        s = steps.get(name)
        if s is None:
            return True
        if not s["ok"] or s.get("rows") is None:
            tail = "\n".join((s.get("error") or "no JSON rows in its output").strip().splitlines()[-8:])
            out.extend([f"**{name}: failed** (rc {s.get('rc', 0)} after {s['seconds']} s); the "
                        "end of its output:", "```", tail, "```", ""])
            return True
        return False

    if not failed("encoders"):
        out += _table(["encoder", "batch", "images/s", "GFLOP/image", "peak memory (MB)"], [
            [r["encoder"], r["batch_size"], _f(r["encoder_images_per_s"]),
             _f(r["encoder_gflops_per_image"], ".1f"), _f(r.get("peak_memory_mb"))]
            for r in steps["encoders"]["rows"]])
    if not failed("decoders"):
        rows = steps["decoders"]["rows"]
        bf16 = rows[0].get("peak_bf16_gflops")
        peak = bf16 or rows[0].get("peak_fp32_gflops")
        out += [f"Decoders at the Show-Attend-Tell workload; matmul peak measured: "
                f"{_f(peak and peak / 1000, ',.1f')} TFLOP/s ({'bf16' if bf16 else 'fp32'}).", ""]
        out += _table(["decoder", "train tokens/s", "train MFU", "greedy captions/s",
                       "beam-5 captions/s", "beam-5 MFU", "peak memory (MB)"], [
            [r["arch"], _f(r["train_tokens_per_s"]), _f(r.get("train_util"), ".1%"),
             _f(r["beam1_captions_per_s"]), _f(r.get("beam5_captions_per_s")),
             _f(r.get("beam5_util"), ".1%"), _f(r.get("peak_memory_mb"))] for r in rows])
    if not failed("extraction"):
        out += _table(["encoder", "images", "pixels alone PIL / on-device decode (img/s)",
                       "end to end PIL / on-device decode (img/s)", "speedup", "pixel mean / max abs diff"], [
            [r["encoder"], r["images"],
             f"{_f(r['pil_pixels_images_per_s'])} / {_f(r['torchvision_pixels_images_per_s'])}",
             f"{_f(r['pil_e2e_images_per_s'])} / {_f(r['torchvision_e2e_images_per_s'])}",
             f"{r['speedup']:.2f}x", f"{r['pixel_mean_abs_diff']:.1e} / {r['pixel_max_abs_diff']:.2f}"]
            for r in steps["extraction"]["rows"]])
    if not failed("ddp"):
        d = steps["ddp"]["rows"]
        out += [f"DDP, {d['world_size']} processes ({steps['ddp']['backend']}) against 1, phases "
                f"{'/'.join(d['phases'])}: largest loss difference {d['max_loss_diff']:.1e}, SCST "
                f"reward difference {_f(d['max_reward_diff'], '.1e')}, identical test captions: "
                f"{'yes' if d['same_predictions'] else 'no'}, identical metrics: "
                f"{'yes' if d['same_metrics'] else 'no'} (CIDEr {_f(d['cider_one'], '.4f')} vs "
                f"{_f(d['cider_two'], '.4f')}).", ""]
    if not failed("matrix"):
        m = steps["matrix"]["rows"]
        out += [f"Matrix end to end: {len(m['cells'])} cells in {m['seconds'] / 60:.1f} min, "
                "encoders with random weights (`--no-pretrained`, as on the CPU), so the CIDEr "
                "column only shows that every cell trained and scored.", ""]
        out += _table(["encoder", "decoder", "CIDEr", "extraction img/s", "train tokens/s",
                       "beam captions/s"], [
            [c["encoder"], c["arch"], _f(c["CIDEr"], ".4f"), _f(c["extraction_images_per_s"]),
             _f(c["train_tokens_per_s"]), _f(c["decoder_captions_per_s"])] for c in m["cells"]])
    if not failed("compile"):
        # both rates from the alternating rounds the speedup comes from (compiled / speedup)
        out += _table(["decoder", "training samples/s, eager", "compiled", "speedup"], [
            [r["arch"], _f(r["train_compiled_samples_per_s"] / r["compile_speedup"]),
             _f(r["train_compiled_samples_per_s"]), f"{r['compile_speedup']:.2f}x"]
            for r in steps["compile"]["rows"]])
    return "\n".join(out) + "\n"
