"""Hyperparameter search with the same budget for every decoder: ``capbench tune`` and
``capbench matrix --tune N``.

Each (decoder, encoder) cell gets an Optuna study (Akiba et al., KDD 2019) of ``budget``
trials. A trial is an ordinary run (:func:`benchmark.runner.run_experiment`) of the cell's
config with the sampled hyperparameters, decoded and scored on the **validation** split
(``RunConfig.eval_split = "val"``): the test split is never read by a trial. The objective
is the validation CIDEr-D. Then the best configuration is re-run over seeds and scored on
test (the ``final`` records). Melis et al. (ICLR 2018) and Dodge et al. (EMNLP 2019, "Show
Your Work") show why equal tuning matters: rankings of untuned architectures flip once each
gets the same search.

* **Search spaces** are YAML files, ``configs/search/<name>.yaml`` (or any path): a section
  ``all:`` for every decoder and one section per decoder name that adds to it (or replaces a
  key). Keys are dotted config keys, ``train.<field>`` or ``decoder_hparams.<name>``; values
  ``{low, high}`` (an integer range when both are integers; ``log: true`` samples
  log-uniformly; ``step`` optional) or ``{choices: [...]}``. See :func:`load_space`.
* **Sampler**: a seeded ``RandomSampler`` (Dodge et al.'s estimator assumes random search)
  or ``TPESampler``. The sampler is re-made for each trial with a seed derived from (study
  seed, trial number), so trial k's parameters depend only on them: a resumed study draws
  the same configurations as an uninterrupted one.
* **Storage**: any SQLAlchemy URL; by default an SQLite file,
  ``<results_dir>/tuning/<study>.db``. Workers on several machines can share one study
  through a server database (PostgreSQL): each takes the next trial number nobody holds.
* **Resume**: trials already complete (or pruned, or diverged) are never re-run; a trial
  left running by a dead process (its pid gone on this host, or no heartbeat for
  :data:`GRACE_S` seconds) is marked failed and its number run again.
* **Pruning** (opt-in): Optuna's ``MedianPruner`` on each epoch's validation CIDEr-D, which
  the trainer computes anyway to keep the best epoch.

Every trial's record carries a ``tuning`` block (:func:`tuning_block`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from architectures import get_entry, list_decoders
from architectures.factory import resolve_decoder_hparams
from benchmark.config import (
    CONFIG_DIR,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_id,
    preset_or_path,
    resolved_config,
)
from benchmark.data import CaptionDataset, resolve_dataset
from benchmark.device import select_device
from benchmark.errors import ConfigError, StorageError, TrainingDivergedError
from benchmark.records import RunRecord, load_records, update_record
from benchmark.runner import (
    observe_epochs,
    preflight,
    prepare_features,
    run_experiment,
    unfinished_state,
)
from benchmark.userfiles import quote, read_yaml

__all__ = ["SPACE_DIR", "Param", "SearchSpace", "TuneSettings", "TuneResult", "load_space",
           "open_study", "tune_cell", "run_final", "tuning_block", "mask_url", "default_storage",
           "trial_seed", "trial_config", "make_sampler", "SAMPLERS", "GRACE_S", "plan_tuning",
           "tune_matrix", "TunedCell", "check_space"]

SPACE_DIR = CONFIG_DIR / "search"
SAMPLERS = ("random", "tpe")
#: seconds between a running trial's heartbeats, and without one before it counts as dead
HEARTBEAT_S, GRACE_S = 20, 60
#: the train settings a space may search (numbers; ``compile`` and the like are not tuned)
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                   if f.type in ("int", "float") and f.name not in ("val_every",))
_SPEC_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass
class Param:
    """One searched hyperparameter: dotted config key ``name`` and either a range ``low`` ..
    ``high`` (integers when both are; ``log``-uniform; grid ``step``) or ``choices``."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None

    def suggest(self, trial: optuna.Trial):
        """Draw this parameter in ``trial`` (Optuna's ``suggest_*``)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step,
                                   log=self.log)

    def corners(self) -> list:
        """The extreme values (checked against the config's ranges before any trial)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass
class SearchSpace:
    """The parameters searched for one decoder, and the ``source`` file they came from."""

    params: list[Param]
    source: str
    name: str

    def to_dict(self) -> dict:
        """The JSON form (stored with the study; a resumed study must search the same)."""
        return {p.name: {k: v for k, v in dataclasses.asdict(p).items()
                         if k != "name" and v not in (None, False)} for p in self.params}


def _space_path(name_or_path: str) -> Path:
    return preset_or_path(name_or_path, SPACE_DIR, "search space", "one of configs/search/")


def _param(name: str, spec: Any, where: str) -> Param:
    """One entry of a space file, checked: a mapping of known keys, a non-empty range
    (``low < high``), a log range above 0, or a non-empty ``choices`` list."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: expected {{low: .., high: ..}} or {{choices: [..]}}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: "
                          f"{', '.join(sorted(_SPEC_KEYS))}")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: choices must be a non-empty list, alone "
                              "(no low/high/log/step with it)")
        return Param(name, choices=list(spec["choices"]))
    low, high = spec.get("low"), spec.get("high")
    for k, v in (("low", low), ("high", high), ("step", spec.get("step", 1))):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{where}: {k} must be a finite number, got {quote(v)}")
    if not low < high:
        raise ConfigError(f"{where}: the range {low} .. {high} is empty; give low < high "
                          "(or choices: [value] for a fixed value)")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range must lie above 0 (low = {low}); use "
                          "log: false, or a low above 0 such as 1.0e-5")
    if log and "step" in spec:
        raise ConfigError(f"{where}: step and log: true cannot go together (Optuna)")
    return Param(name, low, high, log, spec.get("step"))


def load_space(name_or_path: str, decoder: str) -> SearchSpace:
    """The search space of ``decoder`` from a space file (``configs/search/<name>.yaml`` or a
    path): its ``all:`` section updated by its ``<decoder>:`` section.

    Raises:
        ConfigError: naming the file and key, before any trial: a missing file, a section
            that is not a mapping or names no decoder, a key that is not a searchable setting
            (the message lists the allowed ones: ``train.*`` numbers and the decoder's
            hyperparameters), an empty range, a log range through 0 or below, empty choices,
            or a space with no parameter for ``decoder``.
    """
    path = _space_path(name_or_path)
    data = read_yaml(path, "search space file", ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (all:, and decoder names)")
    name = get_entry("decoder", decoder).name
    for section, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of settings")
        if section != "all" and str(section) not in list_decoders():
            raise ConfigError(f"{path}: section {quote(section)} is neither all nor a decoder; "
                              f"sections: all, {', '.join(list_decoders())}")
    merged = {**(data.get("all") or {}), **(data.get(name) or {})}
    allowed = [f"train.{k}" for k in TRAIN_KEYS] + [
        f"decoder_hparams.{k}" for k in resolve_decoder_hparams(name, {})]
    params = []
    for key, spec in merged.items():
        if key not in allowed:
            raise ConfigError(f"{path}: {quote(key)} is not a searchable setting for {name}; "
                              f"allowed: {', '.join(allowed)}")
        params.append(_param(key, spec, f"{path}: {key}"))
    if not params:
        raise ConfigError(f"{path}: no parameter to search for {name} (add an all: or a "
                          f"{name}: section)")
    return SearchSpace(params, str(path), path.stem)


def trial_config(base: RunConfig, params: dict, split: str, source: str = "trial") -> RunConfig:
    """A copy of ``base`` with ``params`` (dotted keys) set and scored on ``split``.
    ``decoder_hparams.*`` go into the decoder's own mapping, so they win over a per-decoder
    mapping in the base config. Raises ConfigError naming ``source`` for a value out of range."""
    cfg = copy.deepcopy(base)
    name = get_entry("decoder", cfg.decoder).name
    hp = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("decoder_hparams.")}
    if hp:
        own = cfg.decoder_hparams.get(name)
        cfg.decoder_hparams[name] = {**(own if isinstance(own, dict) else {}), **hp}
    apply_overrides(cfg, {k: v for k, v in params.items() if k.startswith("train.")}, source)
    cfg.eval_split = split
    return cfg


def check_space(space: SearchSpace, base: RunConfig) -> None:
    """Every range's low and high end, and every choice, must make a valid config for
    ``base`` (declared ranges, decoder checks): ConfigError naming the space file otherwise."""
    for p in space.params:
        for v in p.corners():
            try:
                resolved_config(trial_config(base, {p.name: v}, "val",
                                             f"search space {space.source}: {p.name}"))
            except ConfigError:
                raise
            except Exception as exc:  # a decoder's constructor check (HyperparameterError)
                raise ConfigError(f"search space {space.source}: {p.name} = {v!r}: {exc}") from None


def trial_seed(seed: int, trial: int) -> int:
    """The sampler seed of trial number ``trial`` of a study seeded ``seed``: a hash of both,
    so a trial's parameters never depend on how many trials ran before in this process."""
    return int.from_bytes(hashlib.sha256(f"capbench-tune:{seed}:{trial}".encode()).digest()[:4],
                          "big")


def make_sampler(kind: str, seed: int, trial: int, budget: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws trial number ``trial`` of a study seeded ``seed``: Optuna's
    ``RandomSampler`` (``kind`` random) or ``TPESampler`` (tpe; random for the first half of
    a ``budget``, at most 10 trials), seeded with :func:`trial_seed`."""
    s = trial_seed(seed, trial)
    if kind == "tpe":  # random for the first half of the budget (at most 10), then TPE
        return optuna.samplers.TPESampler(seed=s, n_startup_trials=min(10, max(1, budget // 2)))
    return optuna.samplers.RandomSampler(seed=s)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (what records and messages show)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: said by open_study
        return url


def _without_password(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        return text
    return text.replace(str(password), "***") if password else text


def default_storage(results_dir: str | Path, study: str) -> str:
    """``sqlite:///<results_dir>/tuning/<study>.db`` (an absolute path)."""
    return f"sqlite:///{(Path(results_dir) / 'tuning' / f'{study}.db').resolve()}"


@dataclass
class TuneSettings:
    """One study: its ``study`` name, ``storage`` URL, ``sampler`` (random, tpe), ``seed``,
    ``budget`` (trials), ``prune`` (median pruner) and the ``space`` file's name or path."""

    study: str
    storage: str
    sampler: str = "random"
    seed: int = 0
    budget: int = 8
    prune: bool = False
    space: str = "default"

    def check(self) -> None:
        """ConfigError for a budget below 1, an unknown sampler, a seed outside 0 .. 2**32-1."""
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ConfigError(f"--trials/--tune {self.budget}: give at least 1 trial per cell")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {quote(self.sampler)}: choose {' or '.join(SAMPLERS)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed {self.seed}: give 0 to {2**32 - 1}")


def tuning_block(settings: TuneSettings, *, role: str, trial: int | None, split: str,
                 value: float | None, params: dict) -> dict:
    """A record's ``tuning`` block (the schema's ``tuning``): which study and trial, how it was
    searched, the objective (validation CIDEr-D) and its ``value``, the sampled ``params``."""
    return {"study": settings.study, "storage": mask_url(settings.storage),
            "sampler": settings.sampler, "seed": settings.seed,
            "pruner": "median" if settings.prune else None, "budget": settings.budget,
            "role": role, "trial": trial, "split": split, "objective": "CIDEr", "value": value,
            "params": params}


def open_study(settings: TuneSettings, space: SearchSpace, base: RunConfig) -> optuna.Study:
    """Create or load the study (Optuna RDB storage with heartbeats). A loaded study must have
    been made with the same sampler, seed, budget, space and base config.

    Raises:
        StorageError: the storage URL cannot be opened (the message names it, password
            masked, and says what to do).
        ConfigError: the study exists with other settings.
    """
    url = settings.storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # capbench prints each trial itself
    try:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=GRACE_S)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
                  if settings.prune else optuna.pruners.NopPruner())
        study = optuna.create_study(study_name=settings.study, storage=storage, pruner=pruner,
                                    direction="maximize", load_if_exists=True,
                                    sampler=make_sampler(settings.sampler, settings.seed, 0,
                                                     settings.budget))
    except Exception as exc:  # SQLAlchemy's and the driver's errors, named by the URL
        why = _without_password(str(exc).strip().splitlines()[0][:200] if str(exc).strip()
                                else "", url)
        raise StorageError(f"--storage {quote(mask_url(url))} cannot be opened "
                           f"({type(exc).__name__}: {why}); give an "
                           "SQLAlchemy URL such as sqlite:///path/study.db (its folder writable) "
                           "or postgresql://user:password@host/db with its driver installed, "
                           "or leave --storage out for <results-dir>/tuning/<study>.db") from None
    meta = {"sampler": settings.sampler, "seed": settings.seed, "budget": settings.budget,
            "prune": settings.prune, "space": space.to_dict(),
            "config_id": config_id(resolved_config(base))}
    old = study.user_attrs.get("capbench")
    if old is None:
        study.set_user_attr("capbench", meta)
    elif old != json.loads(json.dumps(meta)):
        diff = sorted(k for k in meta if old.get(k) != json.loads(json.dumps(meta[k])))
        raise ConfigError(f"study {quote(settings.study)} in {quote(mask_url(url))} was made with "
                          f"other {', '.join(diff)}; resume it with the same settings, or give "
                          "another --study name")
    return study


def _slot(t: optuna.trial.FrozenTrial) -> int | None:
    return t.user_attrs.get("trial")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark failed the running trials whose process is gone: on this host, a pid that no
    longer runs; elsewhere, no heartbeat for :data:`GRACE_S` seconds (Optuna's
    ``fail_stale_trials``). Returns the trial numbers marked."""
    host, marked = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _pid_alive(int(t.user_attrs.get("pid", -1))):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            marked.append(_slot(t))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return marked


def _done(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that is not run again: complete, pruned, or failed by its own configuration
    (diverged); a trial failed by an interruption or a dead process is run again."""
    return (t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "error" in t.user_attrs))


def _next_slot(study: optuna.Study, budget: int) -> int | None:
    """The lowest trial number with no trial done or running (None: all are taken)."""
    taken = {_slot(t) for t in study.get_trials(deepcopy=False)
             if _done(t) or t.state == TrialState.RUNNING}
    return next((k for k in range(budget) if k not in taken), None)


@dataclass
class TuneResult:
    """A study's outcome: its ``settings``, the ``trials`` done (number -> ``{"state",
    "value", "params", "run_id"}``), the number ``ran`` by this call, and the best trial's
    number (None when no trial completed)."""

    settings: TuneSettings
    trials: dict[int, dict] = field(default_factory=dict)
    ran: int = 0
    best: int | None = None

    @property
    def best_params(self) -> dict:
        """The best trial's parameters (dotted config keys)."""
        return self.trials[self.best]["params"] if self.best is not None else {}


def _summary(study: optuna.Study, settings: TuneSettings, ran: int) -> TuneResult:
    out = TuneResult(settings, ran=ran)
    for t in study.get_trials(deepcopy=False):
        if _done(t) and _slot(t) is not None and _slot(t) < settings.budget:
            out.trials[_slot(t)] = {"state": t.state.name.lower(), "value": t.value,
                                    "params": dict(t.params), "run_id": t.user_attrs.get("run_id")}
    complete = [(v["value"], -k) for k, v in out.trials.items() if v["state"] == "complete"]
    out.best = -max(complete)[1] if complete else None
    return out


@dataclass
class _Cell:
    """What every trial of one study shares: the base config, the dataset and its features."""

    base: RunConfig
    space: SearchSpace
    dataset: CaptionDataset
    prepared: tuple
    console: Any = None


def _objective(cell: _Cell, settings: TuneSettings, slot: int) -> Callable:
    """The function Optuna calls for trial number ``slot``: draw the parameters with the
    slot's own sampler, run the trial on val, write its ``tuning`` block, return val CIDEr-D."""

    def objective(trial: optuna.Trial) -> float:
        for k, v in (("trial", slot), ("host", socket.gethostname()), ("pid", os.getpid())):
            trial.set_user_attr(k, v)
        trial.study.sampler = make_sampler(settings.sampler, settings.seed, slot, settings.budget)
        params = {p.name: p.suggest(trial) for p in cell.space.params}
        cfg = trial_config(cell.base, params, "val", f"study {settings.study} trial {slot}")

        def report(entry: dict) -> None:
            if "val_CIDEr" in entry:
                trial.report(float(entry["val_CIDEr"]), entry["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {entry['epoch']}: val CIDEr-D "
                                             f"{entry['val_CIDEr']:.3f} below the median")

        try:
            with observe_epochs(report if settings.prune else lambda entry: None):
                record, _ = run_experiment(cfg, cell.console, dataset=cell.dataset,
                                           prepared=cell.prepared, resume=_unfinished(cfg))
        except (optuna.TrialPruned, TrainingDivergedError) as exc:
            _drop_state(cfg)
            if isinstance(exc, optuna.TrialPruned):
                raise
            trial.set_user_attr("error", str(exc))
            return math.nan  # failed by its configuration: done, not run again
        value = float(record.metrics["CIDEr"])
        update_record(record, tuning=tuning_block(settings, role="trial", trial=slot,
                                                  split="val", value=value, params=params))
        trial.set_user_attr("run_id", record.run_id)
        return value

    return objective


def _unfinished(cfg: RunConfig) -> bool:
    """Whether a killed run of ``cfg`` left a training state to continue (a re-run trial
    continues from its last completed epoch)."""
    return unfinished_state(cfg.results_dir, config_id(resolved_config(cfg)), cfg.seed) is not None


def _drop_state(cfg: RunConfig) -> None:
    """Remove the unfinished training state a stopped trial left (it is never resumed)."""
    state = unfinished_state(cfg.results_dir, config_id(resolved_config(cfg)), cfg.seed)
    if state is not None:
        state.unlink(missing_ok=True)
        state.with_suffix(".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other unfinished runs may still be there
            state.parent.rmdir()
            state.parent.parent.rmdir()


def tune_cell(cell: _Cell, settings: TuneSettings,
              on_trial: Callable[[int, dict], None] | None = None) -> TuneResult:
    """Run the trials of ``settings``' study that are not done yet (all ``budget`` of them
    for a new study), one at a time, each on the validation split; ``on_trial(number, info)``
    after each. Returns the study's :class:`TuneResult`.

    Raises:
        StorageError, ConfigError: as :func:`open_study` (before any trial).
        Exception: a trial's own error other than divergence (the trial is marked failed
            and runs again when the study is resumed).
    """
    study = open_study(settings, cell.space, cell.base)
    _fail_dead_trials(study)
    ran = 0
    while (slot := _next_slot(study, settings.budget)) is not None:
        study.optimize(_objective(cell, settings, slot), n_trials=1, catch=())
        ran += 1
        if on_trial:
            on_trial(slot, _summary(study, settings, ran).trials.get(slot, {}))
    return _summary(study, settings, ran)


def run_final(cell: _Cell, result: TuneResult, seeds: list[int],
              on_run: Callable[[int, str], None] | None = None) -> list[RunRecord]:
    """Re-run the study's best configuration once per seed, scored on test; each record gets
    a ``tuning`` block with role ``final`` (trial: the best trial's number, value: its
    validation CIDEr-D). A seed whose final record is already there is skipped. Returns the
    final records (none when no trial completed)."""
    if result.best is None:
        return []
    settings = result.settings
    block = tuning_block(settings, role="final", trial=result.best, split="test",
                         value=result.trials[result.best]["value"], params=result.best_params)
    cfg = trial_config(cell.base, result.best_params, "test", f"study {settings.study}")
    out = []
    for seed in seeds:
        cfg.seed = seed
        cid = config_id(resolved_config(cfg))
        found = [r for r in load_records(cfg.results_dir)[0]
                 if r.config_id == cid and r.seed == seed and r.dataset.split_fingerprint
                 == cell.dataset.fingerprint and (r.tuning or {}).get("study") == settings.study]
        if found:
            out.append(found[0])
            if on_run:
                on_run(seed, "done")
            continue
        record, _ = run_experiment(cfg, cell.console, dataset=cell.dataset,
                                   prepared=cell.prepared, resume=_unfinished(cfg))
        update_record(record, tuning=block)
        out.append(record)
        if on_run:
            on_run(seed, "ok")
    return out


@dataclass
class TunedCell:
    """One (decoder, encoder) cell to tune: its base config, space and study settings."""

    base: RunConfig
    space: SearchSpace
    settings: TuneSettings


def plan_tuning(base: RunConfig, archs: list[str], encoders: list[str], settings: TuneSettings,
                storage: str | None = None, study: str | None = None) -> list[TunedCell]:
    """The checked plan of every cell's study, before any trial: settings (budget, sampler,
    seed), each decoder's search space against the base config, and every storage opened.
    ``study`` names a single cell's study (``capbench tune --study``); by default a cell's
    study is ``<decoder>-<encoder>-<dataset>``. ``storage``: a URL for every study (None:
    one SQLite file per study under ``<results_dir>/tuning/``).

    Raises ConfigError, StorageError as :func:`load_space`, :meth:`TuneSettings.check`,
    :func:`check_space` and :func:`open_study`; DatasetError for the dataset."""
    settings.check()
    dataset = resolve_dataset(base.dataset)
    cells = []
    for enc in encoders:
        for arch in archs:
            cfg = copy.deepcopy(base)
            cfg.decoder, cfg.encoder = arch, enc
            resolved = resolved_config(cfg)
            space = load_space(settings.space, resolved["decoder"])
            check_space(space, cfg)
            name = study or f"{resolved['decoder']}-{resolved['encoder']}-{dataset.name}"
            s = dataclasses.replace(settings, study=name,
                                    storage=storage or default_storage(base.results_dir, name))
            open_study(s, space, cfg)  # a storage that cannot be opened fails here
            cells.append(TunedCell(cfg, space, s))
    return cells


def tune_matrix(cells: list[TunedCell], seeds: list[int], console=None,
                on_event: Callable[[str], None] | None = None
                ) -> list[tuple[TuneResult, list[RunRecord]]]:
    """Tune every planned cell (:func:`plan_tuning`) with its study, then re-run each best
    configuration over ``seeds`` on test (:func:`run_final`; none when ``seeds`` is empty);
    trials and final runs already done are skipped. Each encoder's features are extracted
    once. ``on_event(line)`` is told each trial and final run. Returns each cell's
    ``(TuneResult, final records)``."""
    if not cells:
        return []
    dataset = resolve_dataset(cells[0].base.dataset)
    device = select_device(cells[0].base.device)
    preflight(cells[0].base, dataset, resolved_config(cells[0].base))
    prepared: dict[str, tuple] = {}
    out = []
    say = on_event or (lambda line: None)
    for c in cells:
        key = c.base.encoder
        if key not in prepared:
            prepared[key] = prepare_features(c.base, dataset, device, console)
        cell = _Cell(c.base, c.space, dataset, prepared[key], console)
        name = c.settings.study
        result = tune_cell(cell, c.settings, lambda k, info, name=name: say(
            f"{name} trial {k}: {info.get('state', 'failed')} "
            f"{'' if info.get('value') is None else format(info['value'], '.4f')}"))
        say(f"{name}: {len(result.trials)}/{c.settings.budget} trials done, {result.ran} run now; "
            f"best trial {result.best} {result.best_params}")
        out.append((result, run_final(cell, result, seeds, lambda seed, status, name=name: say(
            f"{name} final seed {seed}: {status}"))))
    return out
