"""``capbench check``: regression checks of the ``tiny`` preset against a stored baseline.

Each cell (decoder x encoder) is trained and scored as a normal run, into a scratch results
folder that is removed afterwards. A metric that falls below its baseline by more than the
tolerance fails the check; throughput is compared and printed (ratio to the baseline) but
never fails, because CI machines are shared and noisy. With the same seed on the same machine
the metrics repeat exactly, so the tolerance only has to absorb other CPUs' floating-point
differences.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from architectures import list_decoders, list_encoders
from benchmark.config import load_config
from benchmark.data import resolve_dataset
from benchmark.errors import RecordError
from benchmark.fsutil import atomic_write_text, utc_timestamp
from benchmark.metrics import ALL_METRICS
from benchmark.records import RunRecord
from benchmark.runner import run_experiment
from benchmark.userfiles import field_type_problem, read_json

DEFAULT_TOLERANCE = {"default": 0.02, "CIDEr": 0.05}  # absolute, on pycocoevalcap's scale
#: the metrics a regression fails on: BLEU-1/4, METEOR, ROUGE-L, CIDEr-D (not the
#: intermediate BLEUs, which move with BLEU-4, nor SPICE, which needs jars CI lacks)
CHECKED = tuple(m for m in ALL_METRICS if m not in ("Bleu_2", "Bleu_3", "SPICE"))
SPEED = ("train_tokens_per_s", "decoder_captions_per_s", "inference_images_per_s")
_NUM_OR_NULL = (int, float, type(None))
#: JSON types of a baseline file's fields (see benchmark.userfiles.field_type_problem)
BASELINE_TYPES = (("preset", (str,)), ("split_fingerprint", (str, type(None))),
                  ("tolerance", (dict,)), ("tolerance.*", (int, float)),
                  ("cells.*.metrics.*", _NUM_OR_NULL), ("cells.*.throughput", (dict,)),
                  ("cells.*.throughput.*", _NUM_OR_NULL))

__all__ = ["CheckRow", "CheckOutcome", "default_cells", "run_cells", "run_check",
           "compare_to_baseline", "write_baseline", "load_baseline", "update_baseline"]


def default_cells() -> list[tuple[str, str]]:
    """Every decoder on the first CI-friendly encoder, plus attn_lstm and transformer on the
    other CI-friendly encoders and on CLIP (the smallest pretrained-size encoder)."""
    ci = list_encoders(ci=True)
    cells = [(d, ci[0]) for d in list_decoders()]
    cells += [("attn_lstm", e) for e in ci[1:]] + [("transformer", "clip_vit_b32")]
    return cells


@dataclass
class CheckRow:
    """One metric or throughput figure of one cell, compared with its baseline."""

    cell: str
    name: str
    baseline: float | None
    now: float | None
    tolerance: float | None
    status: str  # ok, FAIL, new, slower, faster, info

    def show(self, value: float | None) -> str:
        """``value`` as the check table prints it (4 decimals, throughput with separators)."""
        if value is None:
            return "-"
        return f"{value:,.1f}" if "per_s" in self.name else f"{value:.4f}"


@dataclass
class CheckOutcome:
    """Rows of a check, the number of cells run and the seconds it took."""

    rows: list[CheckRow]
    cells: int
    seconds: float

    @property
    def failed(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status == "FAIL"]

    @property
    def slower(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status == "slower"]


def run_cells(preset: str, cells: list[tuple[str, str]], console=None,
              results_dir: Path | None = None, dataset=None) -> dict[str, RunRecord]:
    """Run each (arch, encoder) cell of ``preset``; return ``{"arch/encoder": record}``.

    Without ``results_dir`` the runs go to a scratch folder that is removed afterwards.
    """
    base = load_config(preset)
    dataset = dataset or resolve_dataset(base.dataset)
    with tempfile.TemporaryDirectory(prefix=f"capbench-check-{os.getpid()}-") as scratch:
        folder = results_dir or Path(scratch)
        out = {}
        for arch, enc in cells:
            cfg = copy.deepcopy(base)
            cfg.decoder, cfg.encoder, cfg.results_dir = arch, enc, str(folder)
            record, _ = run_experiment(cfg, console, dataset=dataset)
            out[f"{arch}/{enc}"] = record
    return out


def load_baseline(path: str | Path) -> dict:
    """Read a baseline file (RecordError naming the file and the field when it is missing or
    malformed)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"cannot read baseline {path}: it does not exist. Create it with "
                          "`capbench check --baseline PATH --update`")
    data = read_json(path, "baseline", RecordError)
    if not isinstance(data, dict) or "cells" not in data or "preset" not in data:
        raise RecordError(f"{path} is not a capbench check baseline (needs 'preset' and 'cells')")
    if not isinstance(data["cells"], dict) or not data["cells"]:
        raise RecordError(f"{path}: 'cells' should name at least one 'decoder/encoder' cell; "
                          "regenerate it with `capbench check --baseline PATH --update`")
    for key, cell in data["cells"].items():
        if key.count("/") != 1 or not isinstance(cell, dict) \
                or not isinstance(cell.get("metrics"), dict):
            raise RecordError(f"{path}: cell {key!r} should be 'decoder/encoder' with a "
                              "'metrics' mapping")
    if why := field_type_problem(data, BASELINE_TYPES):
        raise RecordError(f"{path}: {why}; fix it, or regenerate the baseline with `capbench "
                          "check --baseline PATH --update`")
    return data


def write_baseline(path: str | Path, preset: str, records: dict[str, RunRecord],
                   tolerance: dict | None = None) -> dict:
    """Store the metrics and throughput of ``records`` as the new baseline."""
    any_rec = next(iter(records.values()))
    data = {
        "preset": preset,
        "created": utc_timestamp(),
        "git_commit": any_rec.git_commit,
        "environment": any_rec.environment,
        "split_fingerprint": any_rec.split_fingerprint,
        "tolerance": tolerance or DEFAULT_TOLERANCE,
        "cells": {k: {"metrics": {m: r.metrics.get(m) for m in CHECKED},
                      "throughput": {s: r.throughput.get(s) for s in SPEED}}
                  for k, r in records.items()},
    }
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return data


def update_baseline(path: str | Path, preset: str, console=None) -> int:
    """``capbench check --update``: run :func:`default_cells` of ``preset`` (in a scratch
    folder) and write their figures as the baseline ``path`` (:func:`write_baseline`).
    Returns the number of cells."""
    records = run_cells(preset, default_cells(), console)
    write_baseline(path, preset, records)
    return len(records)


def compare_to_baseline(baseline: dict, records: dict[str, RunRecord]) -> list[CheckRow]:
    """Rows for every checked metric and throughput figure; status FAIL on a regression."""
    tol = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    rows = []
    for cell, rec in records.items():
        base = baseline["cells"].get(cell)
        for m in CHECKED:
            now = rec.metrics.get(m)
            t = tol.get(m, tol["default"])
            if base is None or base["metrics"].get(m) is None:
                rows.append(CheckRow(cell, m, None, now, t, "new"))
                continue
            ref = base["metrics"][m]
            status = "ok" if now is not None and now >= ref - t else "FAIL"
            rows.append(CheckRow(cell, m, ref, now, t, status))
        for s in SPEED:
            now, ref = rec.throughput.get(s), (base or {}).get("throughput", {}).get(s)
            if not ref or now is None:
                rows.append(CheckRow(cell, s, ref, now, None, "info"))
                continue
            ratio = now / ref
            rows.append(CheckRow(cell, s, ref, now, None,
                                 "slower" if ratio < 0.7 else "faster" if ratio > 1.3 else "ok"))
    return rows


def run_check(baseline_path: str | Path, console=None) -> CheckOutcome:
    """Run the baseline's cells and compare them with it.

    Raises RecordError for an unreadable baseline and when the preset's split fingerprint
    differs from the baseline's (its figures would not be comparable).
    """
    t0 = time.perf_counter()
    base = load_baseline(baseline_path)
    dataset = resolve_dataset(load_config(base["preset"]).dataset)
    if dataset.fingerprint != base.get("split_fingerprint"):
        raise RecordError(f"the {base['preset']} dataset's split fingerprint changed "
                          f"({base.get('split_fingerprint')} -> {dataset.fingerprint}); "
                          "regenerate the baseline with --update")
    cells = [tuple(k.split("/")) for k in base["cells"]]
    records = run_cells(base["preset"], cells, console, dataset=dataset)
    return CheckOutcome(compare_to_baseline(base, records), len(records), time.perf_counter() - t0)
