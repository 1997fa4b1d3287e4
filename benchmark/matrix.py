"""``capbench matrix``: every (decoder, encoder, seed) cell on one split, resumable.

Each encoder's features are extracted once (and cached) and shared by all its decoders. A
cell whose record already exists in the results folder (same split fingerprint, config id
and seed) is skipped, so an interrupted matrix resumes where it stopped. A failing cell is
recorded under ``<results_dir>/failures/`` with its error and the matrix carries on.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.config import RunConfig
from benchmark.records import load_records
from benchmark.runner import (
    config_id,
    prepare_features,
    resolve_dataset,
    resolved_config,
    run_experiment,
    select_device,
)

__all__ = ["Cell", "MatrixResult", "plan_cells", "run_matrix"]


@dataclass
class Cell:
    """One run of the matrix: its config, config id and status."""

    arch: str
    encoder: str
    seed: int
    cfg: RunConfig
    config_id: str
    status: str = "pending"  # pending, done (skipped), ok, failed
    run_id: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class MatrixResult:
    """All cells with their outcome, the split fingerprint and per-encoder feature times."""

    cells: list[Cell]
    split_fingerprint: str
    feature_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0


def plan_cells(base: RunConfig, archs: list[str], encoders: list[str],
               seeds: list[int]) -> list[Cell]:
    """The cells in run order: encoder-major so that each encoder's features load once."""
    cells = []
    for enc in encoders:
        for arch in archs:
            for seed in seeds:
                cfg = copy.deepcopy(base)
                cfg.arch, cfg.encoder, cfg.seed = arch, enc, seed
                resolved = resolved_config(cfg)
                cells.append(Cell(resolved["arch"], resolved["encoder"], seed, cfg,
                                  config_id(resolved)))
    return cells


def _failure_path(results_dir: Path, cell: Cell) -> Path:
    return results_dir / "failures" / f"{cell.arch}-{cell.encoder}-s{cell.seed}-{cell.config_id}.json"


def run_matrix(base: RunConfig, archs: list[str], encoders: list[str], seeds: list[int],
               console=None, on_cell=None) -> MatrixResult:
    """Run every pending cell; ``on_cell(cell)`` is called after each one finishes."""
    t0 = time.perf_counter()
    dataset = resolve_dataset(base.dataset)
    fingerprint = dataset.fingerprint
    results_dir = Path(base.results_dir)
    cells = plan_cells(base, archs, encoders, seeds)
    records, _ = load_records(results_dir)
    done = {(r["dataset"]["split_fingerprint"], r.get("config_id"), r.get("seed")): r["run_id"]
            for r in records if "dataset" in r}
    out = MatrixResult(cells, fingerprint)
    device = select_device(base.device)
    prepared: dict[str, tuple] = {}
    for cell in cells:
        key = (fingerprint, cell.config_id, cell.seed)
        if key in done:
            cell.status, cell.run_id = "done", done[key]
            if on_cell:
                on_cell(cell)
            continue
        start = time.perf_counter()
        try:
            if cell.encoder not in prepared:
                f0 = time.perf_counter()
                prepared[cell.encoder] = prepare_features(cell.cfg, dataset, device, console)
                out.feature_seconds[cell.encoder] = time.perf_counter() - f0
            record, _ = run_experiment(cell.cfg, console, dataset=dataset,
                                       prepared=prepared[cell.encoder])
            cell.status, cell.run_id = "ok", record["run_id"]
            _failure_path(results_dir, cell).unlink(missing_ok=True)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # record the failure and carry on with the next cell
            cell.status, cell.error = "failed", f"{type(exc).__name__}: {exc}"
            path = _failure_path(results_dir, cell)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"arch": cell.arch, "encoder": cell.encoder,
                                        "seed": cell.seed, "config_id": cell.config_id,
                                        "error": cell.error, "traceback": traceback.format_exc(),
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                       indent=1))
        cell.seconds = time.perf_counter() - start
        if on_cell:
            on_cell(cell)
    out.wall_seconds = time.perf_counter() - t0
    return out
