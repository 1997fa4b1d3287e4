"""``capbench check``: regression checks of the ``tiny`` preset against a stored baseline.

Each cell (decoder x encoder) is trained and scored as a normal run, into a scratch results
folder. A metric that falls below its baseline by more than the tolerance fails the check;
throughput is compared and printed (ratio to the baseline) but never fails, because CI
machines are shared and noisy. With the same seed on the same machine the metrics repeat
exactly, so the tolerance only has to absorb other CPUs' floating-point differences.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmark.config import load_config
from benchmark.errors import RecordError
from benchmark.runner import resolve_dataset, run_experiment

DEFAULT_CELLS = [("rnn", "resnet18"), ("lstm", "resnet18"), ("attn_lstm", "resnet18"),
                 ("transformer", "resnet18"), ("attn_lstm", "vit_tiny"),
                 ("transformer", "clip_vit_b32")]
DEFAULT_TOLERANCE = {"default": 0.02, "CIDEr": 0.05}  # absolute, on pycocoevalcap's scale
CHECKED = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPEED = ("train_tokens_per_s", "decoder_captions_per_s", "inference_images_per_s")

__all__ = ["CheckRow", "run_cells", "compare_to_baseline", "write_baseline", "load_baseline"]


@dataclass
class CheckRow:
    """One metric or throughput figure of one cell, compared with its baseline."""

    cell: str
    name: str
    baseline: float | None
    now: float | None
    tolerance: float | None
    status: str  # ok, FAIL, new, slower, faster, info


def run_cells(preset: str, cells: list[tuple[str, str]], console=None,
              results_dir: Path | None = None) -> dict[str, dict]:
    """Run each (arch, encoder) cell of ``preset``; return ``{"arch/encoder": record}``."""
    base = load_config(preset)
    folder = results_dir or Path(tempfile.mkdtemp(prefix="capbench-check-"))
    dataset = resolve_dataset(base.dataset)
    out = {}
    for arch, enc in cells:
        cfg = copy.deepcopy(base)
        cfg.arch, cfg.encoder, cfg.results_dir = arch, enc, str(folder)
        record, _ = run_experiment(cfg, console, dataset=dataset)
        out[f"{arch}/{enc}"] = record
    return out


def load_baseline(path: str | Path) -> dict:
    """Read a baseline file (RecordError naming the file when missing or malformed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read baseline {path}: {exc}. Create it with "
                          "`capbench check --baseline PATH --update`") from exc
    if not isinstance(data, dict) or "cells" not in data or "preset" not in data:
        raise RecordError(f"{path} is not a capbench check baseline (needs 'preset' and 'cells')")
    return data


def write_baseline(path: str | Path, preset: str, records: dict[str, dict],
                   tolerance: dict | None = None) -> dict:
    """Store the metrics and throughput of ``records`` as the new baseline."""
    any_rec = next(iter(records.values()))
    data = {
        "preset": preset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": any_rec.get("git_commit"),
        "environment": any_rec.get("environment"),
        "split_fingerprint": any_rec["dataset"]["split_fingerprint"],
        "tolerance": tolerance or DEFAULT_TOLERANCE,
        "cells": {k: {"metrics": {m: r["metrics"].get(m) for m in CHECKED},
                      "throughput": {s: r["throughput"].get(s) for s in SPEED}}
                  for k, r in records.items()},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return data


def compare_to_baseline(baseline: dict, records: dict[str, dict]) -> list[CheckRow]:
    """Rows for every checked metric and throughput figure; status FAIL on a regression."""
    tol = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    rows = []
    for cell, rec in records.items():
        base = baseline["cells"].get(cell)
        for m in CHECKED:
            now = rec["metrics"].get(m)
            t = tol.get(m, tol["default"])
            if base is None or base["metrics"].get(m) is None:
                rows.append(CheckRow(cell, m, None, now, t, "new"))
                continue
            ref = base["metrics"][m]
            status = "ok" if now is not None and now >= ref - t else "FAIL"
            rows.append(CheckRow(cell, m, ref, now, t, status))
        for s in SPEED:
            now, ref = rec["throughput"].get(s), (base or {}).get("throughput", {}).get(s)
            if not ref or now is None:
                rows.append(CheckRow(cell, s, ref, now, None, "info"))
                continue
            ratio = now / ref
            rows.append(CheckRow(cell, s, ref, now, None,
                                 "slower" if ratio < 0.7 else "faster" if ratio > 1.3 else "ok"))
    return rows
