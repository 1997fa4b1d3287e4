"""capbench's Python API: the functions the CLI is a thin layer over.

    from benchmark import load_config, run_experiment, load_run, caption_files, score_captions

    cfg = load_config("demo", {"train.epochs": 2})
    record, path = run_experiment(cfg)            # train, caption the test split, score, record
    run = load_run(record.run_id)                 # the saved checkpoint, ready for inference
    captions = caption_files(run, ["photo.jpg"]).captions
    scores = score_captions({1: "a red circle"}, {1: ["a red circle", "red disc"]})

Each name is imported on first use (PEP 562 ``__getattr__``), so ``import benchmark`` (and
``capbench --help``) does not load PyTorch; the models themselves live in
:mod:`architectures` (``create_encoder``, ``create_decoder``, ``list_decoders``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that owns it
_EXPORTS = {
    "RunConfig": "benchmark.config",
    "load_config": "benchmark.config",
    "run_experiment": "benchmark.runner",
    "run_seeds": "benchmark.runner",
    "run_matrix": "benchmark.matrix",
    "load_run": "benchmark.checkpoint",
    "caption_files": "benchmark.captioner",
    "evaluate_run": "benchmark.captioner",
    "score_captions": "benchmark.metrics",
    "evaluate_file": "benchmark.references",
    "compare_runs": "benchmark.stats",
    "RunRecord": "benchmark.records",
    "load_records": "benchmark.records",
    "leaderboard": "benchmark.report",
    "resolve_dataset": "benchmark.data",
    "CapbenchError": "benchmark.errors",
}

__all__ = [
    "CapbenchError",
    "RunConfig",
    "RunRecord",
    "caption_files",
    "compare_runs",
    "evaluate_file",
    "evaluate_run",
    "leaderboard",
    "load_config",
    "load_records",
    "load_run",
    "resolve_dataset",
    "run_experiment",
    "run_matrix",
    "run_seeds",
    "score_captions",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from benchmark.captioner import caption_files, evaluate_run
    from benchmark.checkpoint import load_run
    from benchmark.config import RunConfig, load_config
    from benchmark.data import resolve_dataset
    from benchmark.errors import CapbenchError
    from benchmark.matrix import run_matrix
    from benchmark.metrics import score_captions
    from benchmark.records import RunRecord, load_records
    from benchmark.references import evaluate_file
    from benchmark.report import leaderboard
    from benchmark.runner import run_experiment, run_seeds
    from benchmark.stats import compare_runs


def __getattr__(name: str) -> Any:
    """Import ``name`` from its owning module on first access (PEP 562). Raises
    AttributeError for a name that is not part of the API."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'benchmark' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
