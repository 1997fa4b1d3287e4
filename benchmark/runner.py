"""The main job: dataset -> features -> decoder training -> captions -> metrics -> run record.

:func:`run_experiment` is a short sequence of stages; each stage is one function here or a
call into the module that owns the concept (features, train, inference, metrics, records).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from architectures import create_decoder, create_encoder, resolve_encoder_name
from architectures.factory import meta_device
from architectures.registry import get_entry
from benchmark import distributed
from benchmark.baselines import BLIND_KINDS, MAX_NN_K
from benchmark.checkpoint import Checkpoint, save_run
from benchmark.config import RunConfig, config_id, resolved_config
from benchmark.data import CaptionDataset, resolve_dataset
from benchmark.device import seed_everything, select_device
from benchmark.errors import BusyError, CapbenchWarning, ConfigError
from benchmark.features import FeatureStats, FeatureStore, default_num_workers, load_or_extract
from benchmark.fsutil import ensure_writable, exclusive_lock, remove_stale_temps
from benchmark.image_use import baseline_scores, image_use_report, shuffle_test
from benchmark.inference import caption_features_all_ranks, caption_pixels
from benchmark.metrics import MetricOptions, ptb_tokenize, score_captions
from benchmark.records import (
    RecordedModel,
    RunRecord,
    ScoredSplit,
    ThroughputBlock,
    TrainingBlock,
    make_record,
    new_run_id,
)
from benchmark.tokenization import build_tokenizer, caption_lengths
from benchmark.tracking import open_tracker
from benchmark.train import (
    FineTune,
    StateFile,
    TrainCallbacks,
    TrainData,
    TrainResult,
    train_decoder,
)
from benchmark.vocab import CaptionTokenizer

__all__ = ["prepare_features", "run_experiment", "run_seeds", "preflight",
           "check_run_settings", "check_launch", "launch_ranks",
           "run_baselines", "unfinished_state", "observe_epochs"]

#: called with each epoch's history row (see :func:`observe_epochs`); None: nobody watches
_EPOCH_OBSERVER: contextvars.ContextVar[Callable[[dict], None] | None] = contextvars.ContextVar(
    "capbench_epoch_observer", default=None)


@contextlib.contextmanager
def observe_epochs(observer: Callable[[dict], None]) -> Iterator[None]:
    """Within the block, every run calls ``observer(entry)`` after each training epoch with
    the epoch's history row (``epoch``, ``phase``, ``loss``, ``val_CIDEr`` when validated; see
    :meth:`benchmark.train.TrainCallbacks.on_epoch_end`). An exception it raises (e.g.
    ``optuna.TrialPruned``, :mod:`benchmark.tuning`'s pruning) stops the run without a record;
    its unfinished training state stays under ``<results_dir>/unfinished/``."""
    token = _EPOCH_OBSERVER.set(observer)
    try:
        yield
    finally:
        _EPOCH_OBSERVER.reset(token)


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=console is None)


def preflight(cfg: RunConfig, dataset: CaptionDataset, resolved: dict) -> None:
    """Before any image is read: the results folder must be writable with room for the
    checkpoint and the record (StorageError naming the folder otherwise), and temp folders
    of killed runs there are removed."""
    words = {w for im in dataset.split("train") for t in im.tokens for w in t}
    with meta_device():  # parameter count at the largest possible vocabulary
        dec = create_decoder(resolved["decoder"], max(len(words) + 4, cfg.tokenizer_vocab_size),
                             2048, 2048, resolved["decoder_hparams"])
    need = 4 * sum(p.numel() for p in dec.parameters()) + 4096 * len(dataset.images) + 2**20
    hint = "Pass --results-dir with a writable folder (or set results_dir in the config)."
    root = Path(cfg.results_dir)
    ensure_writable(root / "runs", what="results folder", hint=hint)
    ensure_writable(root / "checkpoints", need_bytes=need, what="checkpoint folder", hint=hint)
    if distributed.is_main():  # one cleaner: another machine's live temp files look dead here
        remove_stale_temps(root / "checkpoints")


def prepare_features(cfg: RunConfig, dataset: CaptionDataset, device, console=None):
    """Build the encoder and return ``(encoder, FeatureStore)`` for every image of the dataset
    (under ``torchrun``, once the caller has joined the process group, the ranks extract the
    store's shards between them)."""
    console = console if distributed.is_main() else None
    encoder = create_encoder(cfg.encoder, pretrained=cfg.pretrained and not cfg.weights,
                             weights=cfg.weights, init_seed=cfg.encoder_init_seed)
    with _progress(console) as prog:
        task = prog.add_task(f"features {encoder.name}", total=len(dataset.images), info="")
        store = load_or_extract(encoder, dataset.images, cache_dir=cfg.features.cache_dir,
                                batch_size=cfg.features.batch_size, device=device,
                                num_workers=cfg.features.num_workers,
                                progress=lambda n: prog.advance(task, n),
                                shard_size=cfg.features.shard_size,
                                image_decoder=cfg.features.image_decoder)
        prog.update(task, completed=len(dataset.images),
                    info="cache hit" if store.extraction_images_per_s is None
                    else f"{store.extraction_images_per_s:.1f} img/s")
    return encoder, store


@dataclass
class _Trained:
    """What the training stage hands to evaluation."""

    decoder: torch.nn.Module
    encoder: torch.nn.Module  # the run's own copy when fine-tuned, else the shared one
    encoder_trainable: int  # parameters of the encoder that training updated
    tokenizer: CaptionTokenizer
    store: FeatureStore  # holds the test split; only the test split when fine-tuned
    feature_stats: FeatureStats | None
    result: TrainResult
    encoder_identity: dict
    mean_tokens_per_caption: float  # under the run's tokenizer, train split

    def checkpoint(self, resolved: dict) -> Checkpoint:
        """What the run's checkpoint folder holds (its best weights)."""
        return Checkpoint(resolved, self.result.best_state, self.tokenizer, self.encoder_identity,
                          self.feature_stats, self.result.best_encoder_state)

    def record_block(self, cfg: RunConfig) -> TrainingBlock:
        """The record's ``training`` block: the training outcome's, with the encoder's and
        the tokenizer's settings."""
        fine_tuned = cfg.encoder_trainable != "none"
        encoder = {"trainable": cfg.encoder_trainable,
                   "trainable_parameters": self.encoder_trainable,
                   **({"encoder_lr": cfg.encoder_lr,
                       "grad_checkpointing": cfg.encoder_grad_checkpointing} if fine_tuned else {})}
        tokenizer = {"kind": self.tokenizer.kind, "vocab_size": len(self.tokenizer),
                     "mean_tokens_per_caption": self.mean_tokens_per_caption}
        return self.result.record_block(scst=bool(cfg.train.scst_epochs), encoder=encoder,
                                        tokenizer=tokenizer)


def _tokens_per_caption(tokenizer: CaptionTokenizer, train, cfg: RunConfig) -> float:
    """Mean tokens per training caption under the run's tokenizer (the record's figure), with
    a CapbenchWarning when more than 5% of the captions are longer than
    ``train.max_caption_len`` tokens (they are cut; subword tokenizers write more tokens a
    caption than words)."""
    import warnings


    lengths = caption_lengths(tokenizer, (t for im in train for t in im.tokens))
    cut = sum(n > cfg.train.max_caption_len for n in lengths)
    if lengths and cut > 0.05 * len(lengths):
        warnings.warn(f"{100 * cut / len(lengths):.0f}% of the training captions are longer than "
                      f"train.max_caption_len = {cfg.train.max_caption_len} tokens of the "
                      f"{tokenizer.kind} tokenizer (mean {sum(lengths) / len(lengths):.1f}) and are "
                      "cut; raise train.max_caption_len", CapbenchWarning, stacklevel=2)
    return sum(lengths) / max(1, len(lengths))


def unfinished_state(results_dir: str | Path, cid: str, seed: int) -> Path | None:
    """The newest resumable training state of config ``cid`` and ``seed`` under
    ``<results_dir>/unfinished/<cid>/`` (None when there is none)."""
    folder = Path(results_dir) / "unfinished" / cid
    found = sorted(folder.glob(f"*-s{seed}-*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def _state_path(results_dir: str | Path, cid: str, run_id: str) -> Path:
    return Path(results_dir) / "unfinished" / cid / f"{run_id}.pt"


def _run_lock(results_dir: str | Path, cid: str, run_id: str,
              resuming: bool) -> contextlib.ExitStack:
    """The lock of run ``run_id`` (``unfinished/<cid>/<run_id>.lock``, taken by rank 0), to be
    held from the moment its id is decided until its record is written and its training
    state removed: a second process continuing the same unfinished run gets BusyError
    instead of both training it and one writing over (or removing) the other's record.
    Under the lock, a resumed run must still have its state and no record yet (BusyError
    otherwise). Every rank raises when rank 0 cannot take it."""
    stack = contextlib.ExitStack()
    state = _state_path(results_dir, cid, run_id)

    def take():
        if not distributed.is_main():
            return
        stack.enter_context(_lock_of(state))
        try:
            if resuming:
                _check_resumable(results_dir, state)
        except BusyError:
            stack.close()
            raise

    distributed.all_or_none(take)
    return stack


def _lock_of(state: Path):
    """The lock (see :func:`~benchmark.fsutil.exclusive_lock`) of the run whose training
    state is ``state``."""
    return exclusive_lock(state.with_suffix(".lock"), what=f"continuing this run ({state.stem})",
                          hint=" Wait for it to end, or run without --resume to start afresh.")


def _check_resumable(results_dir: str | Path, state: Path) -> None:
    """BusyError when the unfinished run of ``state`` is finished: it has a record already
    (its process stopped before removing the state), or ``state`` is gone (another process
    finished it meanwhile)."""
    record = Path(results_dir) / "runs" / f"{state.stem}.json"
    if record.exists():
        raise BusyError(f"run {state.stem} is finished already (its record is {record}); delete "
                        f"its leftover training state {state} to resume another run")
    if not state.exists():
        raise BusyError(f"run {state.stem} was finished by another process while this one "
                        f"started (its record is {record}); nothing to resume")


def _check_not_busy(results_dir: str | Path, cid: str, seeds: list[int]) -> None:
    """BusyError when another process holds the lock of the unfinished run that ``--resume``
    would continue for one of ``seeds``, or that run is finished (an early check, before the
    features; :func:`_run_lock` decides). Rank 0 only."""
    for seed in seeds if distributed.is_main() else []:
        state = unfinished_state(results_dir, cid, seed)
        if state is not None:
            with _lock_of(state):
                _check_resumable(results_dir, state)


class _ProgressCallbacks(TrainCallbacks):
    """Training shown on the progress bar ``task`` of ``prog`` (``total`` epochs), and each
    epoch's figures logged to ``tracker`` (loss, lr, val CIDEr-D, SCST's reward, and the
    cross-entropy phase's tokens/s)."""

    def __init__(self, prog: Progress, task, total: int, tracker) -> None:
        self.prog, self.task, self.total, self.tracker = prog, task, total, tracker
        self.epoch, self.phase, self.val, self.tokens_per_s = 0, "xe", "-", None

    def on_epoch_start(self, epoch: int, phase: str, steps: int) -> None:
        self.epoch, self.phase = epoch, phase
        self.prog.update(self.task, completed=epoch - 1)

    def on_step(self, loss: float, tokens_per_s: float, reward: float | None = None) -> None:
        self.tokens_per_s = tokens_per_s
        rate = f"reward {reward:.3f}" if reward is not None else f"{tokens_per_s:.0f} tok/s"
        self.prog.update(self.task, info=f"epoch {self.epoch}/{self.total} {self.phase}  "
                         f"loss {loss:.3f}  {rate}  val CIDEr-D {self.val}")

    def on_epoch_end(self, entry: dict) -> None:
        if "val_CIDEr" in entry:
            self.val = f"{entry['val_CIDEr']:.3f}"
        self.prog.advance(self.task)
        names = {"loss": "train/loss", "lr": "train/lr", "val_CIDEr": "val/CIDEr-D",
                 "reward": "scst/reward"}
        values = {names[k]: float(v) for k, v in entry.items() if k in names}
        if entry["phase"] == "xe" and self.tokens_per_s is not None:
            values["train/tokens_per_s"] = float(self.tokens_per_s)
        self.tracker.log(values, entry["epoch"])
        if (observer := _EPOCH_OBSERVER.get()) is not None:
            observer(entry)


def _train_stage(cfg: RunConfig, resolved: dict, dataset: CaptionDataset, encoder,
                 store: FeatureStore, device, console, *, state_path: Path | None = None,
                 resume: bool = False, run_id: str = "run") -> _Trained:
    """Caption tokenizer and feature statistics from the train split, then the training loop
    (cross-entropy, then SCST when ``train.scst_epochs`` > 0), saving its state to
    ``state_path`` after each epoch and continuing from it with ``resume``."""
    seed_everything(cfg.seed)
    store = store.copy()  # this run's own normalisation; a shared (matrix) store stays raw
    train, val = dataset.split("train"), dataset.split("val")
    tokenizer = build_tokenizer(cfg.tokenizer, (t for im in train for t in im.tokens),
                            min_count=cfg.train.min_word_count,
                            vocab_size=cfg.tokenizer_vocab_size)
    mean_tokens = _tokens_per_caption(tokenizer, train, cfg)
    stats = store.standardize(store.row_ids(train)) if cfg.features.normalize else None
    decoder = create_decoder(resolved["decoder"], len(tokenizer), encoder.grid_dim, encoder.pooled_dim,
                             resolved["decoder_hparams"])
    val_refs = ptb_tokenize({im.image_id: list(im.captions) for im in val})
    train_refs = (ptb_tokenize({im.image_id: list(im.captions) for im in train})
                  if cfg.train.scst_epochs else None)
    finetune, n_trainable = None, 0
    workers = cfg.features.num_workers
    workers = default_num_workers() if workers is None else workers
    if cfg.encoder_trainable != "none":  # a copy: a matrix shares the frozen encoder
        encoder = copy.deepcopy(encoder)
        n_trainable = encoder.set_trainable(cfg.encoder_trainable)
        if cfg.encoder_grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        finetune = FineTune(encoder, stats, cfg.encoder_lr, workers, cfg.features.batch_size)
    if store.fits_on(device):  # the whole store in GPU memory: no reads during training
        store = store.to(device)
    with _progress(console) as prog:
        total = cfg.train.epochs + cfg.train.scst_epochs
        task = prog.add_task(f"train {resolved['decoder']}", total=total, info="")
        meta = {"config_id": config_id(resolved), "seed": cfg.seed,
                "split_fingerprint": dataset.fingerprint, "device": device.type}
        tracker = open_tracker(cfg.log if distributed.is_main() else "none", cfg.results_dir,
                               run_id, resolved)
        try:
            data = TrainData(store, train, val, val_refs, train_refs)
            state = StateFile(state_path, resume, meta) if state_path else None
            result = train_decoder(decoder, data, tokenizer, cfg.train, device, seed=cfg.seed,
                                   callbacks=_ProgressCallbacks(prog, task, total, tracker),
                                   state=state, finetune=finetune, num_workers=workers)
        finally:
            tracker.close()
    decoder.load_state_dict(result.best_state)
    if finetune is not None:  # the best encoder, and the test images' features under it,
        encoder.apply_finetuned(result.best_encoder_state, cfg.encoder_trainable)
        store = finetune.store_all_ranks(dataset.split(cfg.eval_split), device)  # what evaluation reads
    return _Trained(decoder, encoder, n_trainable, tokenizer, store, stats, result,
                    encoder.cache_identity(), mean_tokens)


def _image_use_stage(dataset: CaptionDataset, encoder_name: str, store: FeatureStore,
                     trained: _Trained, scores, decode_cfg, device) -> dict | None:
    """Shuffle test, blind and nearest-neighbour baselines, and the test against blind.

    Never costs the run: if this stage fails (e.g. a 1-image test split, which has no
    derangement, or memory), the record is written without it and a CapbenchWarning says why.
    """
    import warnings


    if len(dataset.split("test")) < 2:
        warnings.warn("the test split has one image: no image-shuffle test or blind comparison",
                      CapbenchWarning, stacklevel=2)
        return None
    try:
        real = {"image_ids": scores.image_ids, "CIDEr": scores.per_image["CIDEr"]}
        shuffle = shuffle_test(trained.decoder, trained.store, dataset.split("test"), trained.tokenizer,
                               decode_cfg, device, dataset.references("test"), real)
        return image_use_report(real, baseline_scores(dataset, store, encoder_name), shuffle)
    except (RuntimeError, ValueError, MemoryError, OSError) as exc:
        warnings.warn(f"image-use checks skipped ({type(exc).__name__}: {exc}); the run is "
                      "recorded without them", CapbenchWarning, stacklevel=2)
        return None


def check_run_settings(cfg: RunConfig) -> None:
    """``--compile`` for a decoder it does not suit: ConfigError, before any work."""
    why = get_entry("decoder", cfg.decoder).why_not("compile")
    if cfg.train.compile and why:
        raise ConfigError(f"--compile with {cfg.decoder}: {why}; train it without --compile")


def check_launch(cfg: RunConfig, nproc: int) -> None:
    """What ``capbench run --nproc`` cannot take, said once before any process starts: the
    config and run settings, the launch itself (:func:`benchmark.distributed.check_launch`)
    and what every rank would check first (dataset, results folder), not ``nproc`` times.
    Raises ConfigError, DatasetError or StorageError."""
    resolved = resolved_config(cfg)
    check_run_settings(cfg)
    distributed.check_launch(cfg.device, nproc, select_device)
    preflight(cfg, resolve_dataset(cfg.dataset), resolved)


def launch_ranks(cfg: RunConfig, nproc: int, argv: list[str],
                 log: Callable[[str], None]) -> int | None:
    """``capbench run --nproc N``: when ``nproc`` > 1 and this process was not itself started
    by torchrun, check the launch once (:func:`check_launch`) and run the command ``argv``
    (``sys.argv[1:]``) again as ``nproc`` processes (:func:`benchmark.distributed.relaunch`;
    ``log`` is told the command line and any failure). Returns their exit code, or None when
    this process should run the command itself (``nproc`` 1, or a rank under torchrun).
    Raises ConfigError, DatasetError or StorageError as :func:`check_launch` does."""
    if nproc <= 1 or distributed.launched_by_torchrun():
        return None
    check_launch(cfg, nproc)
    return distributed.relaunch(nproc, argv, log)


def run_experiment(cfg: RunConfig, console: Console | None = None, *,
                   dataset: CaptionDataset | None = None,
                   prepared: tuple | None = None, resume: bool = False) -> tuple[RunRecord, Path]:
    """Train and evaluate one (encoder, decoder) pair; write and return its run record.

    The training state is saved after every epoch under ``<results_dir>/unfinished/`` and
    removed once the record is written; with ``resume``, the newest unfinished run of the
    same config id and seed continues (keeping its run id) instead of a fresh start.
    While a process trains a run it holds the run's lock (``unfinished/<cid>/<run_id>.lock``,
    fcntl.flock, released by the kernel if the process dies): another process that would
    continue the same run stops at once with BusyError "another process (pid N) is continuing
    this run", before any work.
    Under ``torchrun`` every rank calls this; the ranks train with DistributedDataParallel
    and decode the test split between them, and rank 0 alone scores it and writes the record.

    Args:
        cfg: the run's config (:func:`~benchmark.config.load_config`).
        console: a rich Console for progress bars and notes (None: quiet).
        dataset: the resolved dataset, when a caller (the matrix) shares it.
        prepared: ``(encoder, FeatureStore)``, when a caller shares the extracted features.
        resume: continue the newest unfinished run of this config and seed.

    Returns:
        ``(record, path)``: the :class:`~benchmark.records.RunRecord` and the JSON file written;
        ``(None, None)`` on ranks other than 0 (so the type is ``tuple[RunRecord | None,
        Path | None]``).

    Raises:
        CapbenchError, ArchitectureError: subclasses for bad input (names, settings, dataset,
            results folder) before any work; BusyError as above; TrainingDivergedError when the
            loss becomes NaN or infinite.
    """
    t_start = time.perf_counter()
    resolved = resolved_config(cfg)  # canonical names and decoder hyperparameters, checked once
    device = select_device(cfg.device)
    distributed.init(device)
    check_run_settings(cfg)
    console = console if distributed.is_main() else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dataset = dataset or resolve_dataset(cfg.dataset)
    preflight(cfg, dataset, resolved)
    cid = config_id(resolved)
    run_id, resuming = _decide_run_id(cfg, resolved, cid, resume, console)
    with _run_lock(cfg.results_dir, cid, run_id, resuming):  # until the state is removed
        record, path = _train_and_record(cfg, resolved, dataset, prepared, device, console,
                                         cid=cid, run_id=run_id, resuming=resuming,
                                         t_start=t_start)
    if record is not None:  # the lock file is gone too: remove the folders left empty
        folder = _state_path(cfg.results_dir, cid, run_id).parent
        with contextlib.suppress(OSError):  # other unfinished runs are still there
            folder.rmdir()
            folder.parent.rmdir()
    return record, path


def _decide_run_id(cfg: RunConfig, resolved: dict, cid: str, resume: bool,
                   console: Console | None) -> tuple[str, bool]:
    """``(run id, resuming)``, decided by rank 0 for every rank alike: with ``resume``, the
    newest unfinished run of config ``cid`` and the seed continues under its id, else a new id.
    Says on ``console`` what is resumed, or that an unfinished run is left as it is."""
    previous = unfinished_state(cfg.results_dir, cid, cfg.seed)
    if previous is not None and not resume:
        if console is not None:
            console.print(f"[yellow]note:[/] an unfinished run of this config and seed is saved at "
                          f"{escape(str(previous))}; --resume continues it (this run starts afresh)",
                          highlight=False)
        previous = None
    elif console is not None:
        if previous is not None:
            console.print(f"resuming {previous.stem} from its last completed epoch "
                          f"({escape(str(previous))})",
                          highlight=False)
        elif resume:
            console.print(f"[yellow]note:[/] --resume: no unfinished run of this config and seed "
                          f"in {escape(str(Path(cfg.results_dir) / 'unfinished'))}; this run "
                          "starts afresh",
                          highlight=False)
    return distributed.broadcast_object(
        (previous.stem if previous else new_run_id(resolved["decoder"], resolved["encoder"],
                                                   cfg.seed), previous is not None))


def _train_and_record(cfg: RunConfig, resolved: dict, dataset: CaptionDataset, prepared,
                      device, console, *, cid: str, run_id: str, resuming: bool,
                      t_start: float) -> tuple[RunRecord | None, Path | None]:
    """The stages of :func:`run_experiment` once its run id is decided and locked: features,
    training (its state saved every epoch), test captions, scores, image use, then the record
    and checkpoint (:func:`~benchmark.checkpoint.save_run`), and the training state removed."""
    state_path = _state_path(cfg.results_dir, cid, run_id)
    encoder, store = prepared or prepare_features(cfg, dataset, device, console)
    trained = _train_stage(cfg, resolved, dataset, encoder, store, device, console,
                           state_path=state_path, resume=resuming, run_id=run_id)
    split = cfg.eval_split  # test; val for a tuning trial, which never reads the test split
    test = dataset.split(split)
    predictions, captions_per_s = caption_features_all_ranks(trained.decoder, trained.store,
                                                             test, trained.tokenizer, cfg.decode,
                                                             device)
    if not distributed.is_main():  # rank 0 scores, checks image use and writes the record
        return None, None
    scores = score_captions(predictions, dataset.references(split),
                            images=dataset.image_files(split),
                            options=MetricOptions.from_env(device=str(device)))
    image_use = (_image_use_stage(dataset, resolved["encoder"], store, trained, scores, cfg.decode,
                                  device) if split == "test" else None)
    throughput = _throughput_block(cfg, trained, store, test, captions_per_s, device)
    ckpt = Path(cfg.results_dir) / "checkpoints" / run_id
    record = make_record(
        run_id=run_id, config=resolved, scored=ScoredSplit(dataset, split, scores, predictions),
        model=RecordedModel(trained.encoder, trained.decoder, len(trained.tokenizer),
                            trained.encoder_trainable, str(ckpt)),
        training=trained.record_block(cfg), throughput=throughput, device=device,
        started=t_start, image_use=image_use)
    path = save_run(record, trained.checkpoint(resolved), Path(cfg.results_dir))
    state_path.unlink(missing_ok=True)  # finished: nothing left to resume
    return record, path


def _throughput_block(cfg: RunConfig, trained: _Trained, store: FeatureStore, test: list,
                      captions_per_s: float, device) -> ThroughputBlock:
    """The record's ``throughput``: training's rates, the ``test`` captions' ``captions_per_s``
    from cached features (``store``: the run's feature store), and end-to-end images/s from
    image files, measured here on the first ``features.throughput_images`` test images (all
    when 0)."""
    sample = test[: cfg.features.throughput_images] if cfg.features.throughput_images else test
    _, images_per_s = caption_pixels(trained.encoder, trained.decoder, sample, trained.tokenizer,
                                     cfg.decode,
                                     device, batch_size=cfg.features.batch_size,
                                     num_workers=cfg.features.num_workers,
                                     stats=trained.store.stats,
                                     image_decoder=cfg.features.image_decoder)
    return ThroughputBlock(
        train_samples_per_s=trained.result.samples_per_s,
        train_tokens_per_s=trained.result.tokens_per_s, inference_images_per_s=images_per_s,
        decoder_captions_per_s=captions_per_s,
        feature_extraction_images_per_s=store.extraction_images_per_s,
        feature_cache_hit=store.cache_hit, beam_size=cfg.decode.beam_size)


def run_baselines(cfg: RunConfig, kinds: list[str], *, split: str = "test", k: int = 5,
                  console: Console | None = None) -> tuple[CaptionDataset, str, dict]:
    """Score the baselines ``kinds`` (``most-frequent``, ``consensus``, ``nn``) of
    ``cfg.dataset`` on ``split``; ``nn`` uses ``cfg.encoder``'s cached pooled features.

    Returns ``(dataset, encoder name, {kind: {"detail", "metrics", "caption", ...}})``.
    Raises ConfigError for an unknown kind or ``k`` outside 1 to ``MAX_NN_K``.
    """
    bad = [x for x in kinds if x not in (*BLIND_KINDS, "nn")]
    if bad:
        raise ConfigError(f"--kind {bad[0]!r}: choose most-frequent, consensus, nn or all")
    if not 1 <= k <= MAX_NN_K:
        raise ConfigError(f"--k {k}: give 1 to {MAX_NN_K} (each test image compares every pair of "
                          "its neighbours' captions, so time grows with k squared; Devlin et al. "
                          "pool tens of neighbours)")
    if "nn" in kinds and split == "train":
        raise ConfigError("--split train with the nn baseline: every training image would be its "
                          "own nearest neighbour; score nn on val or test")
    dataset = resolve_dataset(cfg.dataset)

    encoder_name, store = resolve_encoder_name(cfg.encoder), None
    if "nn" in kinds:
        _, store = prepare_features(cfg, dataset, select_device(cfg.device), console)
    scores = baseline_scores(dataset, store, encoder_name, k=k, split=split,
                             kinds=tuple(x for x in kinds if x != "nn"))
    return dataset, encoder_name, scores


def run_seeds(cfg: RunConfig, seeds: list[int], console: Console | None = None, on_start=None,
              resume: bool = False):
    """Run ``cfg`` once per seed, extracting features once; yields ``(record, path)``.

    Names, hyperparameters and the dataset are checked before any feature is extracted.

    Args:
        cfg: the run's config; its ``seed`` is set to each seed in turn.
        seeds: the seeds, one run each.
        console: a rich Console for progress bars and notes (None: quiet).
        on_start: ``on_start(seed)`` is called before each run.
        resume: each seed continues its newest unfinished run (see :func:`run_experiment`).

    Yields:
        :func:`run_experiment`'s ``(record, path)`` per seed (``(None, None)`` on ranks other
        than 0).

    Raises:
        CapbenchError, ArchitectureError: as :func:`run_experiment` (checked before any
            feature is extracted); BusyError when another process continues one of the runs.
    """
    resolved = resolved_config(cfg)
    device = select_device(cfg.device)
    distributed.init(device)
    check_run_settings(cfg)
    dataset = resolve_dataset(cfg.dataset)
    preflight(cfg, dataset, resolved)
    if resume:  # a run another process continues stops here, before features are extracted
        distributed.all_or_none(lambda: _check_not_busy(cfg.results_dir, config_id(resolved),
                                                        seeds))
    prepared = prepare_features(cfg, dataset, device, console)
    for seed in seeds:
        cfg.seed = seed
        if on_start:
            on_start(seed)
        yield run_experiment(cfg, console, dataset=dataset, prepared=prepared, resume=resume)
