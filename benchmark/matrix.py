"""``capbench matrix``: every (decoder, encoder, seed) cell on one split, resumable.

Each encoder's features are extracted once (and cached) and shared by all its decoders. A
cell whose record already exists in the results folder (same split fingerprint, config id
and seed) is skipped, and a cell interrupted mid-training continues from its last completed
epoch (``run_experiment(resume=True)``), so an interrupted matrix resumes where it stopped. A failing cell is
recorded under ``<results_dir>/failures/`` with its error and the matrix carries on.

A config file may carry a ``matrix:`` section (``archs``, ``encoders``, ``seeds`` and
``variants``) beside its run settings; :func:`matrix_plan` merges it with the command line.
``variants`` names settings to compare like decoders or encoders, each a mapping of dotted
config keys, e.g. ``{xe: {}, xe+scst: {train.scst_epochs: 5}, bpe: {tokenizer: bpe}}``:
every (decoder, encoder, seed) cell runs once per variant.

:func:`run_cell` runs one planned cell alone (``capbench matrix --cell K``, and each task of
:mod:`benchmark.launcher`'s job arrays), the same way.

``--shard i/N`` (:func:`parse_shard`, :func:`shard_cells`) splits one matrix across N
machines: each runs the cells of its shard only, into its own results folder (or a shared
one), and ``capbench report --results-dir A --results-dir B ...`` merges the folders into one
leaderboard. The split depends on the plan alone (see :func:`shard_cells`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from architectures import list_decoders, list_encoders
from benchmark.config import (
    RunConfig,
    apply_overrides,
    check_seeds,
    config_id,
    read_config_file,
    resolved_config,
)
from benchmark.data import resolve_dataset
from benchmark.device import select_device
from benchmark.errors import ConfigError
from benchmark.fsutil import atomic_write_text, ensure_writable, utc_timestamp
from benchmark.records import RunRecord, load_records
from benchmark.runner import preflight, prepare_features, run_experiment

__all__ = ["Cell", "MatrixResult", "MatrixPlan", "Shard", "matrix_plan", "parse_shard", "plan_cells",
           "run_matrix", "shard_cells", "shard_units", "shards_with_cells", "idle_shard",
           "done_runs", "failure_path", "pick_cell", "run_cell"]


@dataclass
class MatrixPlan:
    """Which decoders, encoders, seeds and variants (name -> dotted config overrides) a
    matrix runs, and the pretrained captioners (Hugging Face ids or folders) scored beside
    them as reference rows (``references``, :func:`benchmark.hf_captioners.run_references`)."""

    archs: list[str]
    encoders: list[str]
    seeds: list[int]
    variants: dict[str, dict] = field(default_factory=lambda: {"": {}})
    references: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.archs) * len(self.encoders) * len(self.seeds) * len(self.variants)


def _names(value, where: str) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: give a non-empty list")
    return value


def matrix_plan(config: str | None, archs: list[str] | None, encoders: list[str] | None,
                seeds: list[int] | None, default_seed: int) -> MatrixPlan:
    """Flags first, then the config's ``matrix:`` section, then every registered decoder x the
    full-size encoders x ``default_seed``. Raises ConfigError for a malformed section."""
    spec = {}
    if config:
        path, data = read_config_file(config)
        spec = data.get("matrix") or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: matrix: expected a mapping with archs/encoders/seeds")
        unknown = set(spec) - {"archs", "encoders", "seeds", "variants", "references"}
        if unknown:
            raise ConfigError(f"{path}: matrix.{sorted(unknown)[0]}: unknown key; valid keys are "
                              "archs, encoders, seeds, variants, references")
        where = f"{path}: matrix"
        variants = _variants(spec.pop("variants", None), f"{where}.variants")
        spec = {k: _names(v, f"{where}.{k}") for k, v in spec.items()}
        spec["variants"] = variants
        check_seeds(spec.get("seeds", []), f"{where}.seeds")
    return MatrixPlan(archs or spec.get("archs") or list_decoders(),
                      encoders or spec.get("encoders") or list_encoders(ci=False),
                      seeds or spec.get("seeds") or [default_seed],
                      spec.get("variants") or {"": {}},
                      [str(r) for r in spec.get("references") or []])  # pretrained captioners


def _variants(value, where: str) -> dict[str, dict] | None:
    """``{name: {dotted key: value}}``; each is checked against the config when the cells are
    planned. Raises ConfigError for anything else."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: give a mapping of variant names to config overrides, e.g. "
                          "{xe: {}, xe+scst: {train.scst_epochs: 5}}")
    for name, over in value.items():
        if not isinstance(over, dict) and over is not None:
            raise ConfigError(f"{where}.{name}: expected a mapping of dotted config keys "
                              "(e.g. {tokenizer: bpe}), or {} for the base settings")
    return {str(k): dict(v or {}) for k, v in value.items()}


@dataclass
class Cell:
    """One run of the matrix: its config, config id and status."""

    arch: str
    encoder: str
    seed: int
    cfg: RunConfig
    config_id: str
    variant: str = ""
    status: str = "pending"  # pending, done (skipped), ok, failed
    run_id: str | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based: ``1 <= index <= count``), as ``--shard i/N``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/N"`` -> :class:`Shard`; raises ConfigError naming the flag and the valid form for
    anything but two integers with ``N >= 1`` and ``1 <= i <= N`` (``0/2``, ``3/2``, ``a/b``,
    ``1/0``)."""
    how = "give i/N (this machine's shard i of N, 1 <= i <= N), e.g. --shard 1/4"
    parts = str(text).strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"--shard {text!r}: {how}") from None
    if count < 1:
        raise ConfigError(f"--shard {text!r}: the number of shards N must be at least 1; {how}")
    if not 1 <= index <= count:
        raise ConfigError(f"--shard {text!r}: no shard {index}; shards are numbered 1 to {count}; "
                          f"{how}")
    return Shard(index, count)


def _shard_unit(cell: Cell) -> tuple[str, str, str]:
    """What moves between shards as a whole: one (encoder, decoder, variant) with all its
    seeds."""
    return (cell.encoder, cell.arch, cell.variant)


def shard_cells(cells: list[Cell], shard: Shard | None) -> list[Cell]:
    """The cells of ``shard`` among the planned ``cells``, in their plan (run) order; all of
    them for ``shard=None``.

    The unit of the split is an (encoder, decoder, variant) with **all its seeds**, so a
    config's seeds run on one machine and are aggregated from one folder. The units are
    sorted by their canonical names (encoder, decoder, variant name) and cut into ``N``
    contiguous blocks of near-equal size (block ``i`` holds units ``(i-1)*U//N`` to
    ``i*U//N - 1`` of ``U``): encoder-major, so an encoder's cells stay together and most
    shards extract only one or two encoders' features. Every cell lies in exactly one shard.

    The split depends only on the plan's names: not on the machine, on the records already
    written (those are skipped later, by each shard), on the order the decoders/encoders/
    variants were listed in, nor on the seeds (adding a seed keeps every unit on its
    shard). Every shard must be given the same matrix (config and flags); adding a decoder,
    encoder or variant moves the block boundaries. With more shards than units, some shards
    get none."""
    if shard is None:
        return list(cells)
    units = shard_units(cells)
    mine = set(units[(shard.index - 1) * len(units) // shard.count:
                     shard.index * len(units) // shard.count])
    return [c for c in cells if _shard_unit(c) in mine]


def shard_units(cells: list[Cell]) -> list[tuple[str, str, str]]:
    """The sorted (encoder, decoder, variant) units of ``cells``: what moves between shards
    as a whole (:func:`shard_cells`)."""
    return sorted({_shard_unit(c) for c in cells})


def shards_with_cells(cells: list[Cell], count: int) -> list[int]:
    """The shard numbers (1-based) of ``count`` that :func:`shard_cells` gives any of the
    planned ``cells``: all of them unless there are more shards than (encoder, decoder,
    variant) units."""
    return [i for i in range(1, count + 1) if shard_cells(cells, Shard(i, count))]


def idle_shard(planned: list[Cell], shard: Shard) -> tuple[int, list[int]]:
    """Why ``shard`` got none of the ``planned`` cells: ``(number of (encoder, decoder,
    variant) units, the shards that get cells)`` (:func:`shard_units`,
    :func:`shards_with_cells`)."""
    return len(shard_units(planned)), shards_with_cells(planned, shard.count)


@dataclass
class MatrixResult:
    """The cells run (those of ``shard``, or all) with their outcome, the split fingerprint
    and per-encoder feature times; ``planned`` counts the whole matrix's cells."""

    cells: list[Cell]
    split_fingerprint: str
    feature_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    shard: Shard | None = None
    planned: int = 0

    def count(self, status: str) -> int:
        """Number of cells with ``status`` (ok, done, failed)."""
        return sum(c.status == status for c in self.cells)

    def records(self, results_dir: str | Path) -> list[RunRecord]:
        """The run records in ``results_dir`` of this result's cells that have a
        run id (run now or already done), in the folder's order."""
        ids = {c.run_id for c in self.cells if c.run_id}
        return [r for r in load_records(results_dir)[0] if r.run_id in ids]


def plan_cells(base: RunConfig, archs: list[str], encoders: list[str],
               seeds: list[int], variants: dict[str, dict] | None = None) -> list[Cell]:
    """The cells in run order: encoder-major so that each encoder's features load once.

    Every cell's config is resolved here, so a bad name, hyperparameter or variant setting
    fails before any cell runs."""
    cells = []
    for enc in encoders:
        for arch in archs:
            for name, overrides in (variants or {"": {}}).items():
                fixed = sorted(_variant_heads(overrides) & _MATRIX_OWNED)
                if fixed:
                    raise ConfigError(f"matrix variant {name!r}: {fixed[0]!r} is set by the matrix "
                                      "itself (archs, encoders, seeds, the dataset, device and "
                                      "results folder are shared by every cell); vary it with "
                                      "another matrix")
                for seed in seeds:
                    cfg = copy.deepcopy(base)
                    apply_overrides(cfg, overrides, f"matrix variant {name!r}")
                    cfg.decoder, cfg.encoder, cfg.seed = arch, enc, seed
                    resolved = resolved_config(cfg)
                    cells.append(Cell(resolved["decoder"], resolved["encoder"], seed, cfg,
                                      config_id(resolved), name))
    return cells


#: settings a variant may not change: the matrix sets them for every cell
_MATRIX_OWNED = {"arch", "decoder", "encoder", "seed", "dataset", "device", "results_dir"}


def _variant_heads(overrides: dict) -> set[str]:
    """The top-level settings a variant's ``overrides`` change; ``decoder.KEY`` or a mapping
    under ``decoder`` (the old form of ``decoder_hparams``) set hyperparameters, not the
    decoder."""
    return {k.split(".")[0] for k, v in overrides.items()
            if not (k.startswith("decoder.") or (k == "decoder" and isinstance(v, dict)))}


def _feature_key(cfg: RunConfig) -> str:
    """What decides a cell's frozen features: cells with equal keys share one extraction."""
    return json.dumps([cfg.encoder, cfg.pretrained, cfg.weights, cfg.encoder_init_seed,
                       dataclasses.asdict(cfg.features)], sort_keys=True, default=str)


def failure_path(results_dir: str | Path, cell: Cell) -> Path:
    """Where a failed ``cell``'s error and traceback are recorded (JSON), under
    ``<results_dir>/failures/``; removed when the cell later succeeds."""
    return Path(results_dir) / "failures" / f"{cell.arch}-{cell.encoder}-s{cell.seed}-{cell.config_id}.json"


def _record_failure(results_dir: Path, cell: Cell, exc: BaseException) -> None:
    """Mark ``cell`` failed with ``exc`` and write its failure file (call inside ``except``)."""
    cell.status, cell.error = "failed", f"{type(exc).__name__}: {exc}"
    atomic_write_text(failure_path(results_dir, cell), json.dumps(
        {"arch": cell.arch, "encoder": cell.encoder, "seed": cell.seed,
         "variant": cell.variant,
         "config_id": cell.config_id, "error": cell.error,
         "traceback": traceback.format_exc(), "time": utc_timestamp()}, indent=1))


def run_matrix(base: RunConfig, archs: list[str], encoders: list[str], seeds: list[int],
               console=None, on_cell=None, variants: dict[str, dict] | None = None, *,
               shard: Shard | None = None,
               on_plan: Callable[[list[Cell], list[Cell]], None] | None = None) -> MatrixResult:
    """Run every pending cell of a decoder x encoder (x seed, x variant) matrix (of ``shard`` only,
    when given: :func:`shard_cells`); a cell whose record is already in the results folder is
    ``done`` and skipped, so a killed matrix resumes. Cells that share an encoder extract its
    features once.

    Args:
        base: the config every cell starts from (dataset, epochs, device, results folder).
        archs: decoder names.
        encoders: encoder names.
        seeds: seeds, one run each.
        console: a rich Console for progress bars (None: quiet).
        on_cell: ``on_cell(cell)`` after each cell finishes (ok, done or failed).
        variants: ``{variant name: config overrides}`` (None: one plain variant).
        shard: this machine's share of the cells (:class:`Shard`), or None for all.
        on_plan: ``on_plan(cells, planned)`` once the cells are planned, before any work, with
            the cells this call runs and the whole matrix's cells.

    Returns:
        :class:`MatrixResult`: every cell's status, run id, seconds or error, the feature
        extraction seconds per encoder and the wall time (seconds).

    Raises:
        ConfigError, DatasetError: a bad name, setting or dataset, before any cell runs.
        StorageError: the results folder cannot take records. A cell's own failure is
            recorded (``failures/``) and the matrix goes on.
    """
    t0 = time.perf_counter()
    planned = plan_cells(base, archs, encoders, seeds, variants)
    cells = shard_cells(planned, shard)
    if on_plan:
        on_plan(cells, planned)
    dataset = resolve_dataset(base.dataset)
    fingerprint = dataset.fingerprint
    results_dir = Path(base.results_dir)
    records, _ = load_records(results_dir)
    done = {(r.split_fingerprint, r.config_id, r.seed): r.run_id for r in records}
    out = MatrixResult(cells, fingerprint, shard=shard, planned=len(planned))
    device = select_device(base.device)
    if cells:  # the results folder must take records before any extraction starts
        preflight(cells[0].cfg, dataset, resolved_config(cells[0].cfg))
        ensure_writable(results_dir / "failures", what="results folder")
    else:  # a shard with no cells: its (empty) folder still exists for `report --results-dir`
        ensure_writable(results_dir / "runs", what="results folder")
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
            fkey = _feature_key(cell.cfg)
            if fkey not in prepared:
                f0 = time.perf_counter()
                prepared[fkey] = prepare_features(cell.cfg, dataset, device, console)
                out.feature_seconds[cell.encoder] = (out.feature_seconds.get(cell.encoder, 0.0)
                                                     + time.perf_counter() - f0)
            record, _ = run_experiment(cell.cfg, console, dataset=dataset,
                                       prepared=prepared[fkey], resume=True)
            cell.status, cell.run_id = "ok", record.run_id
            failure_path(results_dir, cell).unlink(missing_ok=True)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # record the failure and carry on with the next cell
            _record_failure(results_dir, cell, exc)
        cell.seconds = time.perf_counter() - start
        if on_cell:
            on_cell(cell)
    out.wall_seconds = time.perf_counter() - t0
    return out


def done_runs(results_dir: str | Path) -> dict[tuple[str, str, int], str]:
    """``{(split fingerprint, config id, seed): run id}`` of the records in ``results_dir``:
    the cells that are done."""
    return {(r.split_fingerprint, r.config_id, r.seed): r.run_id
            for r in load_records(results_dir)[0]}


def pick_cell(planned: list[Cell], index: int) -> Cell:
    """Cell ``index`` (0-based, the plan's run order, as ``--list-cells`` numbers them) of
    ``planned``; ConfigError saying the valid range otherwise."""
    if not 0 <= index < len(planned):
        raise ConfigError(f"--cell {index}: no such cell; this matrix has {len(planned)} cells, "
                          f"numbered 0 to {len(planned) - 1} (see --list-cells)")
    return planned[index]


def run_cell(base: RunConfig, plan: MatrixPlan, index: int, console=None) -> Cell:
    """Run cell ``index`` (0-based, :func:`pick_cell`) of ``plan`` alone, as :func:`run_matrix`
    runs each cell: skipped (``done``) when its record exists, else trained with ``resume=True``
    (a killed or requeued task continues from its last completed epoch), a failure recorded
    under ``<results_dir>/failures/``.

    Returns the :class:`Cell` with its status (done, ok or failed), run id or error.
    Raises ConfigError (a bad plan or ``index``), DatasetError, StorageError before any work."""
    planned = plan_cells(base, plan.archs, plan.encoders, plan.seeds, plan.variants)
    cell = pick_cell(planned, index)
    dataset = resolve_dataset(base.dataset)
    results_dir = Path(base.results_dir)
    done = done_runs(results_dir).get((dataset.fingerprint, cell.config_id, cell.seed))
    if done:
        cell.status, cell.run_id = "done", done
        return cell
    preflight(cell.cfg, dataset, resolved_config(cell.cfg))
    ensure_writable(results_dir / "failures", what="results folder")
    start = time.perf_counter()
    try:
        prepared = prepare_features(cell.cfg, dataset, select_device(cell.cfg.device), console)
        record, _ = run_experiment(cell.cfg, console, dataset=dataset, prepared=prepared,
                                   resume=True)
        cell.status, cell.run_id = "ok", record.run_id
        failure_path(results_dir, cell).unlink(missing_ok=True)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, as the matrix does
        _record_failure(results_dir, cell, exc)
    cell.seconds = time.perf_counter() - start
    return cell
