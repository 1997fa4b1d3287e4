"""One training loop for every decoder: cross-entropy (XE), then optionally SCST.

**XE**: teacher forcing with masked cross-entropy; AdamW, linear warmup then cosine decay,
global-norm gradient clipping, bf16 autocast on CUDA. For decoders with soft attention the
doubly stochastic penalty of Xu et al. 2015 (eq. 14) is added.

**SCST** (``train.scst_epochs``; Rennie et al. 2017, "Self-critical Sequence Training for
Image Captioning", CVPR): starting from the best XE weights, each training image gets
``scst_samples`` captions sampled from the model; each sample's reward is its CIDEr-D
against the image's references with document frequencies of the train references computed
once (:class:`benchmark.cider.CiderD`), and its baseline is the mean reward of the other
samples of the same image (the "new self-critical" baseline of Luo 2020, "A Better Variant
of Self-Critical Sequence Training", arXiv:2003.09971). The loss is
``-sum (r - b) log p(w_t) / tokens``. Dropout is off during SCST, so the log-probabilities
are exactly those of the policy that sampled (teacher-forcing the samples through
``forward``); a constant ``scst_lr`` with Adam, as in self-critical.pytorch. The sampled
captions are scored as the decoder writes them (lower-cased word tokens joined by spaces),
without the PTB tokenizer that validation and test scoring run: a Java call per step would
dominate the loop.

**Encoder fine-tuning** (a :class:`FineTune` argument; XE only): images are read through a
DataLoader with the encoder's training transform, each image once per epoch with all its
captions (as self-critical.pytorch's ``seq_per_img``), and the encoder's trainable part is
updated with its own learning rate; features are z-scored with the fixed statistics of the
frozen features. Validation re-encodes the val images with the current encoder.

**Validation** every ``val_every`` epochs (and at the end of each phase) by greedy decoding
scored with CIDEr-D (pycocoevalcap, PTB-tokenized references); the best weights over both
phases are kept. **Early stopping**: ``patience`` validations without a new best end the
phase. **Resume**: with a ``state_path``, the complete training state (weights, optimizer,
scheduler, data-order and sampling generators, the torch/numpy/python RNG states, best
weights, history, counters) is written atomically after every epoch, and
``resume=True`` continues from it: an interrupted run ends with exactly the weights of an
uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmark import distributed
from benchmark.cider import CiderD
from benchmark.config import TrainConfig
from benchmark.data import ImageRecord
from benchmark.decoding import DecodeConfig, SpecialTokens, forbid_tokens, sample_decode
from benchmark.device import synchronize
from benchmark.errors import CapbenchError, CapbenchWarning, StorageError, TrainingDivergedError
from benchmark.features import FeatureStats, FeatureStore, extract_features, storage_precision
from benchmark.fsutil import atomic_write, remove_stale_temps
from benchmark.inference import caption_features_all_ranks
from benchmark.metrics import cider_d
from benchmark.pixels import ImageFolderDataset, worker_batches
from benchmark.records import TrainingBlock
from benchmark.vocab import CaptionTokenizer

__all__ = ["TrainResult", "FineTune", "train_decoder", "caption_loss", "caption_pairs", "scst_loss",
           "sequence_log_probs", "new_self_critical_advantage", "TRAIN_STATE_VERSION",
           "TrainCallbacks", "TrainData", "StateFile", "CaptionTable", "StepContext", "GlobalBatch",
           "xe_step", "xe_optimizer", "scst_optimizer"]

#: version of the resumable training-state file (:func:`train_decoder` ``state_path``)
TRAIN_STATE_VERSION = 1


@dataclass
class TrainResult:
    """Outcome of :func:`train_decoder`. Throughput counts training steps only (no validation).

    ``tokens_per_s`` counts target tokens (words + ``<eos>``, no padding) per second of XE
    training; ``scst_captions_per_s`` sampled and scored captions per second of SCST.
    ``stopped_early``: phase -> epoch at which early stopping ended it. ``resumed_from``:
    the last completed epoch read from the state file (0 = a fresh start).
    """

    best_state: dict
    best_epoch: int
    best_val_cider: float
    history: list[dict] = field(default_factory=list)
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    steps: int = 0
    best_phase: str = "xe"
    stopped_early: dict[str, int] = field(default_factory=dict)
    scst_captions_per_s: float | None = None
    scst_seconds: float = 0.0
    resumed_from: int = 0
    best_encoder_state: dict = field(default_factory=dict)

    def record_block(self, *, scst: bool, encoder: dict, tokenizer: dict) -> TrainingBlock:
        """The run record's ``training`` block of this outcome; ``scst``: whether the run
        had SCST epochs (objective ``xe+scst``, with the SCST figures); ``encoder``/
        ``tokenizer``: the blocks of the same names (see
        :class:`~benchmark.records.TrainingBlock`)."""
        return TrainingBlock(
            objective="xe+scst" if scst else "xe", best_epoch=self.best_epoch,
            best_phase=self.best_phase, best_val_CIDEr=self.best_val_cider, history=self.history,
            steps=self.steps, train_seconds=self.train_seconds, stopped_early=self.stopped_early,
            resumed_from=self.resumed_from, encoder=encoder, tokenizer=tokenizer,
            scst_seconds=self.scst_seconds if scst else None,
            scst_captions_per_s=self.scst_captions_per_s if scst else None)


@dataclass
class FineTune:
    """What :func:`train_decoder` needs to fine-tune the encoder: the ``encoder`` (after
    ``set_trainable``), the z-score ``stats`` of the frozen features (or None), the encoder's
    learning rate, and the DataLoader's workers and extraction batch size."""

    encoder: torch.nn.Module
    stats: FeatureStats | None
    encoder_lr: float
    num_workers: int = 0
    batch_size: int = 32

    def normalize(self, grid: torch.Tensor, pooled: torch.Tensor):
        """Live features ``(B, N, D)``, ``(B, P)`` z-scored like the cached ones
        (:meth:`FeatureStats.normalize`)."""
        return self.stats.normalize(grid, pooled) if self.stats is not None else (grid, pooled)

    def store(self, images: list[ImageRecord], device) -> FeatureStore:
        """The images' features under the current encoder (eval transform): ``grid (N, L,
        D)`` and ``pooled (N, P)`` in CPU memory at the feature cache's precision, normalised
        with :attr:`stats` when read.

        Raises DatasetError when ``images`` is empty or an image cannot be read."""
        grid, pooled, _ = extract_features(self.encoder, images, batch_size=self.batch_size,
                                           device=device, num_workers=self.num_workers)
        return FeatureStore(storage_precision(grid), storage_precision(pooled),
                            [im.image_id for im in images], "fine-tuned", stats=self.stats)

    def store_all_ranks(self, images: list[ImageRecord], device) -> FeatureStore:
        """:meth:`store` with the encoding sharded over the ranks of a distributed run: rank
        ``r`` of ``W`` encodes images ``r, r+W, ...`` (as :func:`caption_features_all_ranks`
        decodes them) and every rank receives all the images' features, gathered in the
        order of ``images``: ``grid (N, L, D)``, ``pooled (N, P)``, on the CPU. A part that
        had to stay float32 (:func:`storage_precision`) makes the whole store float32. In a
        single process it is :meth:`store`.

        A collective: every rank calls it with the same ``images``. With fewer images than
        ranks, every rank encodes them all. Raises DatasetError for no images or an
        unreadable one; an error on one rank is raised on every rank
        (:func:`distributed.all_or_none`)."""
        world = distributed.world_size()
        if world == 1 or len(images) < world:  # one process, or fewer images than ranks:
            return self.store(images, device)  # every rank alike encodes them all
        part = distributed.all_or_none(lambda: self.store(distributed.share(images), device))
        parts = distributed.all_gather_object((part.grid, part.pooled))  # every rank has some
        out = []
        for k in (0, 1):  # grid, then pooled
            wide = torch.float32 if any(p[k].dtype == torch.float32 for p in parts) \
                else parts[0][k].dtype
            t = torch.empty((len(images), *parts[0][k].shape[1:]), dtype=wide)
            for r, p in enumerate(parts):
                t[r::world] = p[k]
            out.append(t)
        return FeatureStore(*out, [im.image_id for im in images], "fine-tuned", stats=self.stats)


def caption_pairs(images: list[ImageRecord], store: FeatureStore):
    """One training sample per (image, reference caption): feature rows and token lists."""
    rows, caps = [], []
    for im, r in zip(images, store.row_ids(images).tolist(), strict=True):
        for toks in im.tokens:
            rows.append(r)
            caps.append(list(toks))
    return torch.tensor(rows), caps


def caption_loss(output, targets, pad_id: int, attention_reg: float = 0.0,
                 label_smoothing: float = 0.0, lengths=None,
                 global_counts: tuple[int, int] | None = None) -> torch.Tensor:
    """Masked cross-entropy over ``logits (B, T, V)`` vs ``targets (B, T)`` (mean per token).

    With ``attention_reg`` > 0 and soft attention ``(B, T, N)``, adds
    ``attention_reg * mean_{b,i} (1 - sum_t alpha_ti)^2`` (Xu et al. 2015, eq. 14, averaged
    over the N grid cells as in sgrvinod's tutorial so that its scale does not grow with N).
    ``global_counts``: ``(tokens, captions)`` of the whole global batch when this batch is
    one rank's part of it; the result is then this part's share of the global batch's loss
    (token sums over the global token count), so the shares of all ranks add up to it.
    """
    logits = output.logits
    if global_counts is None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=pad_id, label_smoothing=label_smoothing)
    else:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=pad_id, label_smoothing=label_smoothing,
                               reduction="sum") / global_counts[0]
    if attention_reg and output.attention is not None:
        mask = (targets != pad_id).unsqueeze(-1).to(output.attention.dtype)
        coverage = (output.attention * mask).sum(1)  # (B, N)
        penalty = (1.0 - coverage) ** 2
        loss = loss + attention_reg * (penalty.mean() if global_counts is None else
                                       penalty.sum() / (global_counts[1] * penalty.shape[1]))
    return loss


def _schedule(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ------------------------------------------------------------------------------------ SCST
def sequence_log_probs(decoder, grid, pooled, seqs: list[list[int]], *, bos_id: int,
                       eos_id: int, pad_id: int, max_len: int):
    """Teacher-force sampled captions through ``decoder.forward``: the log-probability of each
    emitted token (words, then ``<eos>`` unless the caption was cut at ``max_len``) under the
    same masking as sampling (``<pad>`` and ``<bos>`` never emitted), for SCST's policy gradient
    (Rennie et al. 2017).

    Args:
        decoder: the :class:`~architectures.decoders.base.CaptionDecoder` that sampled them.
        grid: image features ``(B, N, D)``.
        pooled: pooled image features ``(B, P)``.
        seqs: B sampled captions as word-id lists (without ``<bos>``/``<eos>``), each at most
            ``max_len`` long (at least one non-empty).
        bos_id: the tokenizer's ``<bos>`` id.
        eos_id: its ``<eos>`` id.
        pad_id: its ``<pad>`` id.
        max_len: the sampling's caption length limit (a caption that long ended without a
            sampled ``<eos>``).

    Returns:
        ``(token_logp, mask)``, both ``(B, L)`` with L = the longest caption + 1:
        log-probabilities in nats (float32, 0 where masked; differentiable) and the bool mask
        of emitted tokens.
    """
    B = len(seqs)
    L = max(len(s) for s in seqs) + 1
    dev = grid.device
    inputs = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), pad_id, dtype=torch.long)
    lengths = torch.empty(B, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        inputs[b, 0] = bos_id
        if n:
            inputs[b, 1 : n + 1] = torch.tensor(s)
            targets[b, :n] = torch.tensor(s)
        if n < max_len:  # sampled <eos>; at max_len it was forced, not sampled
            targets[b, n] = eos_id
        lengths[b] = n + 1
    inputs, targets = inputs.to(dev), targets.to(dev)
    logits = decoder(grid, pooled, inputs[:, : int(lengths.max())], lengths.to(dev)).logits
    logp = torch.log_softmax(forbid_tokens(logits.float(), pad_id, bos_id), -1)
    targets = targets[:, : logp.shape[1]]
    mask = targets != pad_id
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # <pad> is -inf here
    return torch.where(mask, token_logp, torch.zeros_like(token_logp)), mask


def new_self_critical_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards (B, K)`` of K >= 2 samples per image -> ``r - b`` where each sample's
    baseline ``b`` is the mean reward of the image's other K - 1 samples (Luo 2020).
    ValueError for K < 2."""
    K = rewards.shape[1]
    if K < 2:
        raise ValueError("the new self-critical baseline needs at least 2 samples per image")
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)
    return rewards - baseline


def scst_loss(token_logp: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor,
              global_tokens: int | None = None):
    """Policy-gradient loss ``-sum_{b,t} A_b log p(w_bt) / sum mask`` (self-critical.pytorch's
    normalisation by the number of tokens): ``token_logp``/``mask (B, L)``, ``advantage (B,)``.
    ``global_tokens``: the token count of the whole global batch when these rows are one
    rank's part of it; the result is then this part's share of the global batch's loss."""
    tokens = mask.sum().clamp(min=1) if global_tokens is None else max(1, global_tokens)
    return -(advantage.unsqueeze(1) * token_logp).sum() / tokens


# ------------------------------------------------------------------------------ the loop
class TrainCallbacks:
    """What :func:`train_decoder` reports while it trains (on every rank of a distributed
    run): subclass it and override the hooks you need; each does nothing here."""

    def on_epoch_start(self, epoch: int, phase: str, steps: int) -> None:
        """Epoch ``epoch`` (counted from 1 over both phases) of ``phase`` (``"xe"`` or
        ``"scst"``) starts; it takes ``steps`` optimizer steps."""

    def on_step(self, loss: float, tokens_per_s: float, reward: float | None = None) -> None:
        """An optimizer step ended: its batch ``loss``, the cross-entropy phase's target
        tokens per second of training so far, and in SCST the batch's mean sample
        ``reward`` (CIDEr-D; None in cross-entropy steps)."""

    def on_epoch_end(self, entry: dict) -> None:
        """An epoch ended; ``entry`` is its row of :attr:`TrainResult.history`: ``epoch``,
        ``phase``, ``loss``, SCST's mean sample ``reward``, ``lr``, ``val_CIDEr`` when it was
        validated, ``stopped_early`` when patience ran out."""


@dataclass
class TrainData:
    """What :func:`train_decoder` trains and validates on: the cached features ``store``, the
    train and val images, and ``{image_id: [PTB-tokenized reference, ...]}`` of the val
    split and (needed only for SCST's reward) of the train split."""

    store: FeatureStore
    train_images: list[ImageRecord]
    val_images: list[ImageRecord]
    val_references: dict
    train_references: dict | None = None


@dataclass
class StateFile:
    """Where :func:`train_decoder` keeps its resumable state (written after every epoch, by
    rank 0); with ``resume`` it is read first, and its saved ``meta`` must equal ``meta``."""

    path: str | Path
    resume: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class CaptionTable:
    """Teacher-forcing tensors of N captions (:meth:`CaptionTokenizer.batch`): ``inputs (N,
    T)`` (``<bos> w..``), ``targets (N, T)`` (``w.. <eos>``, ``<pad>`` elsewhere) and
    ``lengths (N,)`` (tokens fed per caption, on the CPU)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    def rows(self, idx: torch.Tensor, device: torch.device, full_length: bool = False):
        """Captions ``idx``: ``inputs``/``targets (B, T)`` on ``device``, cut to the batch's
        longest caption T (``full_length``: not cut, so that a compiled decoder sees one T
        and compiles once), and ``lengths (B,)`` on the CPU, as a :class:`CaptionTable`."""
        lengths = self.lengths[idx]
        T = self.inputs.shape[1] if full_length else int(lengths.max())
        return CaptionTable(self.inputs[idx, :T].to(device, non_blocking=True),
                            self.targets[idx, :T].to(device, non_blocking=True), lengths)


@dataclass
class _Loop:
    """Everything a resumed run needs beyond the weights (written after every epoch)."""

    epoch: int = 0
    phase: str = "xe"  # the optimizer's phase
    history: list = field(default_factory=list)
    best_state: dict = field(default_factory=dict)
    best_epoch: int = -1
    best_val: float = float("-inf")
    best_phase: str = "xe"
    best_encoder: dict = field(default_factory=dict)
    since_best: dict = field(default_factory=lambda: {"xe": 0, "scst": 0})
    stopped: dict = field(default_factory=dict)
    train_time: float = 0.0
    n_tokens: int = 0
    n_samples: int = 0
    scst_time: float = 0.0
    scst_captions: int = 0
    updates: int = 0  # optimizer steps taken, both phases


@dataclass
class StepContext:
    """What every training step needs. ``decoder``: the bare decoder (its parameters and
    weights); ``model``: what a cross-entropy step runs forward (the decoder, its
    DistributedDataParallel wrapper, or ``torch.compile`` of either); ``policy``: what SCST
    runs forward (the decoder or its DDP wrapper, never compiled; default the decoder).
    ``opt``/``sched``: the phase's optimizer and learning-rate scheduler (None in SCST);
    ``tokenizer``: the caption tokenizer (its special ids); ``autocast``: bf16 autocast on ``device``;
    ``finetune``: the encoder trained with the decoder (None for cached features);
    ``loop``: the run's counters and history (:class:`_Loop`)."""

    decoder: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    cfg: TrainConfig
    device: torch.device
    tokenizer: CaptionTokenizer
    autocast: bool = False
    callbacks: TrainCallbacks = field(default_factory=TrainCallbacks)
    loop: _Loop = field(default_factory=_Loop)
    policy: torch.nn.Module | None = None
    finetune: FineTune | None = None

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = self.decoder

    def clipped_parameters(self) -> list:
        """What gradient clipping sees: every parameter the optimizer updates when the
        encoder trains too, else the decoder's (in module order)."""
        if self.finetune is not None:
            return [p for g in self.opt.param_groups for p in g["params"]]
        return list(self.decoder.parameters())

    def amp(self):
        """The context of a step's forward: bf16 autocast on ``device`` when ``autocast``."""
        if self.autocast:
            return torch.autocast(self.device.type, torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class GlobalBatch:
    """A distributed step's global batch as one rank sees it: its target ``tokens`` and
    ``captions`` over all ranks, and whether this rank holds part of it (``present``; if not,
    it computes one stand-in caption with zero weight, as DDP needs every rank to)."""

    tokens: int
    captions: int
    present: bool


def xe_step(ctx: StepContext, grid: torch.Tensor, pooled: torch.Tensor, batch: CaptionTable,
            share: GlobalBatch | None = None) -> float:
    """One cross-entropy update, the step :func:`train_decoder` takes and ``capbench bench``
    times: ``ctx.model``'s teacher-forced forward on ``grid (B, N, D)``, ``pooled (B, P)`` and
    ``batch`` (under bf16 autocast when ``ctx.autocast``), the masked cross-entropy
    (:func:`caption_loss`, with the decoder's attention penalty and the config's label
    smoothing), backward, global-norm clipping to ``cfg.grad_clip``, the optimizer's and the
    scheduler's step. ``share``: this rank's part of a distributed step (None in one
    process). Returns the batch's loss (a distributed step's: the global batch's)."""
    with ctx.amp():
        out = ctx.model(grid, pooled, batch.inputs, batch.lengths.to(ctx.device))
    loss, value = _xe_loss(ctx, out, batch.targets, share)
    _update(ctx, loss)
    return float(loss.detach()) if value is None else value


def _xe_loss(ctx: StepContext, out, targets, share: GlobalBatch | None):
    """A cross-entropy step's loss to back-propagate and its value: in one process the batch
    loss and None; in a distributed run this rank's share of the global batch's loss (zero
    weight when the rank has no caption of it) times ``W``, since DDP averages the ranks'
    gradients, and the global batch's loss (one all-reduce)."""
    pad, reg = ctx.tokenizer.pad_id, ctx.decoder.attention_regularization
    if share is None:
        return caption_loss(out, targets, pad, reg, ctx.cfg.label_smoothing), None
    part = caption_loss(out, targets, pad, reg, ctx.cfg.label_smoothing,
                        global_counts=(share.tokens, share.captions))
    part = part * (1.0 if share.present else 0.0)
    return part * distributed.world_size(), float(distributed.all_reduce_sum(part.detach().clone()))


def _global_batch(ctx: StepContext, table: CaptionTable, whole, present: bool):
    """The :class:`GlobalBatch` of captions ``whole`` of ``table`` in a distributed run;
    None in one process."""
    if distributed.world_size() == 1:
        return None
    return GlobalBatch(int((table.targets[whole] != ctx.tokenizer.pad_id).sum()), len(whole), present)


def _update(ctx: StepContext, loss: torch.Tensor) -> None:
    """Backward, global-norm clipping, the optimizer's step and the scheduler's (if any)."""
    ctx.opt.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(ctx.clipped_parameters(), ctx.cfg.grad_clip)
    ctx.opt.step()
    if ctx.sched is not None:
        ctx.sched.step()


def _count_xe_step(ctx: StepContext, t0: float, lengths: torch.Tensor, value: float) -> float:
    """A cross-entropy step's bookkeeping (begun at ``t0``, captions of ``lengths``);
    reports it to the callbacks and returns ``value``, its loss."""
    loop = ctx.loop
    loop.updates += 1
    synchronize(ctx.device)
    loop.train_time += time.perf_counter() - t0
    loop.n_tokens += int(lengths.sum())
    loop.n_samples += len(lengths)
    ctx.callbacks.on_step(value, loop.n_tokens / max(loop.train_time, 1e-9))
    return value


def _rng_states(gens: dict[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *(float(x) for x in np_state[2:])],
            "python": random.getstate(),
            **{f"gen_{k}": g.get_state() for k, g in gens.items()}}


def _set_rng_states(states: dict, gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, g = states["python"]
    random.setstate((version, tuple(internal), g))
    for k, g in gens.items():
        g.set_state(states[f"gen_{k}"])


def _save_state(path: Path, ctx: StepContext, gens, meta: dict) -> None:
    """Write the training state atomically (:func:`write_train_state`)."""
    encoder = ctx.finetune.encoder if ctx.finetune is not None else None
    blob = {"version": TRAIN_STATE_VERSION, "meta": meta, "loop": dict(ctx.loop.__dict__),
            "decoder": ctx.decoder.state_dict(), "optimizer": ctx.opt.state_dict(),
            "encoder": encoder.trainable_state() if encoder is not None else {},
            "scheduler": ctx.sched.state_dict() if ctx.sched is not None else None,
            "rng": _rng_states(gens)}
    write_train_state(path, blob)


def _restore_state(path: Path, meta: dict, ctx: StepContext, gens, seed: int) -> None:
    """Continue from the state file ``path`` (:func:`load_train_state`): the loop's counters
    and history into ``ctx.loop``, the weights, the phase's optimizer and scheduler into
    ``ctx``, the generators ``gens`` and the global RNG states. Raises CapbenchError when the
    file belongs to another run (its ``meta``) or does not fit this model or device."""
    blob = load_train_state(path)
    if blob["meta"] != meta:
        raise CapbenchError(f"{path} belongs to another run ({blob['meta']}); delete it or "
                            "run without --resume")
    ctx.loop = _Loop(**blob["loop"])
    try:
        ctx.decoder.load_state_dict(blob["decoder"])
        if ctx.finetune is not None:
            ctx.finetune.encoder.load_state_dict(blob["encoder"], strict=False)
        if ctx.loop.phase == "scst":
            ctx.opt, ctx.sched = scst_optimizer(ctx.decoder, ctx.cfg, ctx.device)
        ctx.opt.load_state_dict(blob["optimizer"])
        if ctx.sched is not None and blob["scheduler"] is not None:
            ctx.sched.load_state_dict(blob["scheduler"])
        _set_rng_states(blob["rng"], gens)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CapbenchError(f"cannot continue from {path}: {exc}. Resume on the device the "
                            "run started on, or delete the file to start afresh") from exc
    if distributed.rank() > 0:  # the state holds rank 0's generators: own dropout masks
        torch.manual_seed(seed + 7919 * distributed.rank() + ctx.loop.epoch)


#: what torch.save's RuntimeError says when the disk fills or a write fails
_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter", "file write failed", "No space left")


def write_train_state(path: Path, blob: dict) -> None:
    """``torch.save(blob)`` to ``path`` through :func:`~benchmark.fsutil.atomic_write`: a temp
    file in the same folder, then one rename, so the previous epoch's state stays whole until
    the new one is; a temp left by a killed process is removed here on the next write
    (:func:`~benchmark.fsutil.remove_stale_temps`). Raises StorageError naming the folder
    when it cannot be written (a full disk: torch.save's "unexpected pos"), with no temp
    file left behind."""
    remove_stale_temps(path.parent)
    try:
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not any(s in str(exc) for s in _WRITE_FAILED):
            raise
        why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1][-160:]
        raise StorageError(f"cannot write the training state to the folder {path.parent} "
                           f"({why}); free space there, or pass --results-dir with a folder "
                           "that has room. Epochs saved before are kept: continue with "
                           "--resume") from exc


def load_train_state(path: Path) -> dict:
    """Read a training-state file (see :func:`train_decoder`); raises
    :class:`~benchmark.errors.CapbenchError` naming the file when it is unreadable (e.g.
    torn by a full disk) or of another version."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which, never a traceback
        raise CapbenchError(f"cannot read the training state {path}: {exc}. Delete it to start "
                            "the run afresh") from exc
    if not isinstance(blob, dict) or blob.get("version") != TRAIN_STATE_VERSION:
        raise CapbenchError(f"{path} is not a capbench training state of version "
                            f"{TRAIN_STATE_VERSION}; delete it to start the run afresh")
    return blob


def _validate(ctx: StepContext, data: TrainData) -> float:
    """Validation CIDEr-D of greedy captions of the val images (decoding sharded over the
    ranks); with a fine-tuned encoder the val images are encoded again, each rank those it
    decodes."""
    val_decode = DecodeConfig(beam_size=1, max_len=ctx.cfg.max_caption_len)
    mine = distributed.share(data.val_images)
    store, ft = data.store, ctx.finetune
    if ft is not None:  # the encoder changed: encode the val images again
        ft_store = distributed.all_or_none(lambda: ft.store(mine, ctx.device) if mine else None)
        store = store if ft_store is None else ft_store
    preds, _ = caption_features_all_ranks(ctx.decoder, store, data.val_images, ctx.tokenizer,
                                          val_decode, ctx.device)
    return cider_d(preds, data.val_references)


def _after_validation(ctx: StepContext, entry: dict, last_epoch: int) -> None:
    """After validating epoch ``entry``: on a new best ``val_CIDEr`` keep the weights (the
    decoder's and the fine-tuned encoder's, on the CPU); else count one more validation
    without a new best in the phase, and when ``cfg.patience`` of them ran out before the
    phase's ``last_epoch``, stop the phase (``entry["stopped_early"]``)."""
    loop, epoch, phase = ctx.loop, entry["epoch"], entry["phase"]
    if entry["val_CIDEr"] > loop.best_val:
        loop.best_val, loop.best_epoch, loop.best_phase = entry["val_CIDEr"], epoch, phase
        loop.best_state = copy.deepcopy({k: v.detach().cpu()
                                         for k, v in ctx.decoder.state_dict().items()})
        if ctx.finetune is not None:
            loop.best_encoder = ctx.finetune.encoder.trainable_state()
        loop.since_best[phase] = 0
        return
    loop.since_best[phase] += 1
    if ctx.cfg.patience and loop.since_best[phase] >= ctx.cfg.patience and epoch < last_epoch:
        loop.stopped[phase] = epoch
        entry["stopped_early"] = True


def fused_adam(device: torch.device) -> bool | None:
    """``fused`` for torch's Adam/AdamW: True on CPU and CUDA, where torch has a fused kernel
    that updates each parameter in one pass instead of about ten element-wise ``foreach``
    passes (the same update up to floating-point rounding); None (torch's default) elsewhere.
    A run resumed from a state saved before this setting keeps the saved optimizer's own
    ``fused`` value (``load_state_dict`` restores the parameter groups).
    """
    return True if torch.device(device).type in ("cpu", "cuda") else None


def xe_optimizer(decoder, cfg: TrainConfig, total_steps: int, device: torch.device,
                 finetune: FineTune | None = None):
    """The cross-entropy phase's AdamW (weight decay ``cfg.weight_decay`` on the weight
    matrices, none on biases, norms and embeddings; with ``finetune`` a third group of the
    encoder's trainable parameters at its own learning rate) and its scheduler: linear
    warmup over ``cfg.warmup_frac`` of ``total_steps``, then cosine decay to 0 (Loshchilov
    & Hutter 2019). Returns ``(optimizer, LambdaLR)``."""
    decay, no_decay = [], []
    for name, p in decoder.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if finetune is not None:  # the same schedule, scaled to the encoder's own rate
        groups.append({"params": [p for p in finetune.encoder.parameters() if p.requires_grad],
                       "weight_decay": cfg.weight_decay, "lr": finetune.encoder_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=fused_adam(device))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total_steps, cfg.warmup_frac))


def scst_optimizer(decoder, cfg: TrainConfig, device: torch.device):
    """SCST's Adam over the decoder's trainable parameters at the constant ``cfg.scst_lr``
    (as self-critical.pytorch); returns ``(optimizer, None)`` (no scheduler)."""
    return torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad],
                            lr=cfg.scst_lr, fused=fused_adam(device)), None


def check_finite_loss(entry: dict, cfg: TrainConfig, finetuning: bool = False) -> None:
    """Stop a run whose epoch loss (or SCST reward) in ``entry`` is NaN or infinite: its
    weights are broken, every later caption would be empty and its record all zeros.

    Raises :class:`TrainingDivergedError` naming the epoch, the phase and the settings that
    most likely caused it (the phase's learning rate, gradient clipping, warmup). Nothing is
    recorded; the training state of the last finite epoch is kept."""
    bad = {k: entry[k] for k in ("loss", "reward") if k in entry and not math.isfinite(entry[k])}
    if not bad:
        return
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    if entry["phase"] == "scst":
        likely = f"train.scst_lr = {cfg.scst_lr:g} (lower it)"
    else:
        likely = (f"train.lr = {cfg.lr:g} (lower it), train.grad_clip = {cfg.grad_clip:g} (0 is "
                  f"off) or train.warmup_frac = {cfg.warmup_frac:g}")
        if finetuning:
            likely += " or encoder_lr"
    raise TrainingDivergedError(f"training diverged: epoch {entry['epoch']} ({entry['phase']}) "
                                f"ended with {what}; the run is stopped and no record is "
                                f"written. Most likely {likely}")


def _check_inputs(n_pairs: int, cfg: TrainConfig, data: TrainData,
                  finetune: FineTune | None) -> None:
    """ValueError for a train split without captions, SCST without train references, or
    SCST with a fine-tuned encoder."""
    if n_pairs == 0:
        raise ValueError("the train split has no captions")
    if cfg.scst_epochs and not data.train_references:
        raise ValueError("SCST needs the train split's references (train_references)")
    if cfg.scst_epochs and finetune is not None:
        raise ValueError("SCST trains the decoder on frozen features; fine-tune with XE only")


def _distribute(decoder, finetune: FineTune | None, device: torch.device, seed: int):
    """The decoder and the fine-tuned encoder (or None) as the steps run them forward: in one
    process themselves; in a distributed run their DistributedDataParallel wrappers
    (:func:`_ddp_encoder`), and every rank past 0 re-seeds torch's global generator for its
    own dropout masks (DDP gave every rank rank 0's weights)."""
    encoder = finetune.encoder if finetune is not None else None
    if distributed.world_size() == 1:
        return decoder, encoder
    ids = [device.index] if device.type == "cuda" else None
    # every decoder uses every parameter (tested): no find_unused_parameters traversal
    ddp = DistributedDataParallel(decoder, device_ids=ids)
    if finetune is not None:
        encoder = _ddp_encoder(encoder, device)
    if distributed.rank() > 0:
        torch.manual_seed(seed + 7919 * distributed.rank())
    return ddp, encoder


def _steps_per_epoch(cfg: TrainConfig, train_images: list[ImageRecord], n_pairs: int,
                     finetune: FineTune | None) -> int:
    """Cross-entropy steps per epoch: ``batch_size`` caption pairs a step on cached
    features; when fine-tuning, one step per :func:`_images_per_step` images (all their
    captions)."""
    if finetune is None:
        return math.ceil(n_pairs / cfg.batch_size)
    n_images = sum(1 for im in train_images if im.tokens)
    return math.ceil(n_images / _images_per_step(cfg.batch_size, n_images, n_pairs))


def _train_result(loop: _Loop, resumed_from: int, cfg: TrainConfig) -> TrainResult:
    """The :class:`TrainResult` of a finished loop."""
    result = TrainResult(loop.best_state, loop.best_epoch, loop.best_val, loop.history,
                         best_phase=loop.best_phase, stopped_early=dict(loop.stopped),
                         resumed_from=resumed_from, best_encoder_state=loop.best_encoder)
    result.train_seconds = loop.train_time
    result.samples_per_s = loop.n_samples / max(loop.train_time, 1e-9)
    result.tokens_per_s = loop.n_tokens / max(loop.train_time, 1e-9)
    result.steps = loop.updates
    if cfg.scst_epochs:
        result.scst_seconds = loop.scst_time
        result.scst_captions_per_s = loop.scst_captions / max(loop.scst_time, 1e-9)
    return result


def train_decoder(decoder, data: TrainData, tokenizer: CaptionTokenizer, cfg: TrainConfig,
                  device: torch.device, *, seed: int = 0, callbacks: TrainCallbacks | None = None,
                  state: StateFile | None = None, finetune: FineTune | None = None,
                  num_workers: int = 0) -> TrainResult:
    """Train ``decoder`` on ``data`` (XE, then ``cfg.scst_epochs`` of SCST); return the best
    weights by validation CIDEr-D (see the module docstring).

    **Several processes** (under ``torchrun``, :mod:`benchmark.distributed`): the decoder is
    wrapped in DistributedDataParallel, ``cfg.batch_size`` is the global batch (of caption
    pairs in XE, of images in SCST), split over the ranks (see :func:`_xe_epoch` and
    :func:`_scst_epoch`), validation decoding is sharded and gathered, and only rank 0 writes
    the state file. The per-epoch losses (and SCST's rewards) equal a single process's with
    the same batch up to float rounding (in XE with dropout off: each rank draws its own
    dropout masks, from the global generator re-seeded per rank; SCST runs without dropout).

    Args:
        decoder: the :class:`~architectures.decoders.base.CaptionDecoder` to train (on
            ``device``).
        data: the cached features (grid ``(N, D)``, pooled ``(P,)`` a row), the train and val
            images and their references (:class:`TrainData`).
        tokenizer: the caption tokenizer (:class:`~benchmark.vocab.CaptionTokenizer`).
        cfg: epochs, batch size, learning rate and schedule, clipping, SCST and early stopping
            (:class:`~benchmark.config.TrainConfig`).
        device: where training runs.
        seed: seeds the data order, dropout and SCST's sampling.
        callbacks: told of every epoch's start and end and of every step
            (:class:`TrainCallbacks`); the epochs' entries form ``history``.
        state: where the resumable state goes after each epoch, read first when resuming
            (:class:`StateFile`); None: not saved.
        finetune: train the encoder too, reading images past the feature cache
            (:class:`FineTune`); None: frozen features.
        num_workers: DataLoader processes reading features ahead.

    Returns:
        :class:`TrainResult`: the best weights, epoch and validation CIDEr-D, the per-epoch
        history, and the training throughput (tokens/s, samples/s; seconds).

    Raises:
        ValueError: the train split has no captions, SCST has no train references or is
            combined with fine-tuning.
        CapbenchError: an unreadable or mismatched state file.
        TrainingDivergedError: the loss became NaN or infinite.
    """
    callbacks = callbacks or TrainCallbacks()
    decoder.to(device)
    rows, caps = caption_pairs(data.train_images, data.store)
    _check_inputs(len(rows), cfg, data, finetune)
    if finetune is not None:
        finetune.encoder.to(device)
    policy, encoder_model = _distribute(decoder, finetune, device, seed)
    model = torch.compile(policy, dynamic=True) if cfg.compile and finetune is None else policy
    # Encode every training caption once; a batch is then a row gather, not Python work.
    table = CaptionTable(*tokenizer.batch(caps, cfg.max_caption_len))
    gens = {"order": torch.Generator().manual_seed(seed),
            "sample": torch.Generator(device=device).manual_seed(seed + 1)}
    steps_per_epoch = _steps_per_epoch(cfg, data.train_images, len(rows), finetune)
    phases = ["xe"] * cfg.epochs + ["scst"] * cfg.scst_epochs
    last_of_phase = {ph: max(i + 1 for i, p in enumerate(phases) if p == ph) for ph in set(phases)}
    ctx = StepContext(decoder, model, *xe_optimizer(decoder, cfg, steps_per_epoch * cfg.epochs,
                                                    device, finetune),
                      cfg, device, tokenizer, autocast=device.type == "cuda", callbacks=callbacks,
                      policy=policy, finetune=finetune)
    meta = dict(state.meta) if state is not None else {}
    path = Path(state.path) if state is not None and state.path else None
    if state is not None and state.resume and path is not None and path.is_file():
        _restore_state(path, meta, ctx, gens, seed)
    resumed_from = ctx.loop.epoch

    image_rows = data.store.row_ids(data.train_images)
    image_ids = [im.image_id for im in data.train_images]
    cider = CiderD(data.train_references) if cfg.scst_epochs else None
    for epoch in range(ctx.loop.epoch + 1, len(phases) + 1):
        phase = phases[epoch - 1]
        if phase in ctx.loop.stopped:
            ctx.loop.epoch = epoch
            continue
        if phase == "scst" and ctx.loop.phase != "scst":  # SCST starts from the best XE weights
            if ctx.loop.best_state:
                decoder.load_state_dict(ctx.loop.best_state)
            ctx.opt, ctx.sched = scst_optimizer(decoder, cfg, device)
            ctx.loop.phase = "scst"
        callbacks.on_epoch_start(epoch, phase, steps_per_epoch if phase == "xe"
                                 else math.ceil(len(image_ids) / cfg.batch_size))
        entry = {"epoch": epoch, "phase": phase}
        if phase == "xe" and finetune is not None:
            entry["loss"] = _xe_epoch_finetune(ctx, encoder_model, data.train_images, table,
                                               gens["order"])
        elif phase == "xe":
            entry["loss"] = _xe_epoch(ctx, data.store, rows, table, gens["order"], num_workers)
        else:
            entry["loss"], entry["reward"] = _scst_epoch(ctx, data.store, image_rows, image_ids,
                                                         cider, gens)
        check_finite_loss(entry, cfg, finetune is not None)
        entry["lr"] = (ctx.opt.param_groups[0]["lr"] if ctx.sched is None
                       else ctx.sched.get_last_lr()[0])
        if epoch % cfg.val_every == 0 or epoch == last_of_phase[phase]:
            entry["val_CIDEr"] = _validate(ctx, data)
            _after_validation(ctx, entry, last_of_phase[phase])
        ctx.loop.history.append(entry)
        ctx.loop.epoch = epoch
        if path is not None and distributed.is_main():
            _save_state(path, ctx, gens, meta)
        callbacks.on_epoch_end(entry)
    return _train_result(ctx.loop, resumed_from, cfg)


def _xe_epoch(ctx: StepContext, store: FeatureStore, rows: torch.Tensor, table: CaptionTable,
              order: torch.Generator, num_workers: int = 0) -> float:
    """One teacher-forced cross-entropy epoch over the caption pairs (feature ``rows`` of
    ``store``, captions of ``table``), in the order drawn from ``order``; returns the mean
    batch loss.

    In a distributed run each global batch of ``batch_size`` caption pairs is split over the
    ranks (rank ``r`` of ``W`` takes pairs ``r, r+W, ...`` of it, as a DistributedSampler
    does), each rank's loss is its share of the global batch's loss times ``W`` (DDP averages
    gradients), so every step equals the single-process step on the whole batch.
    ``num_workers``: DataLoader processes that read the features ahead
    (:meth:`FeatureStore.batches`).
    """
    ctx.decoder.train()
    perm = torch.randperm(len(rows), generator=order)
    world, rank = distributed.world_size(), distributed.rank()
    bs = ctx.cfg.batch_size
    steps = [perm[s * bs : (s + 1) * bs] for s in range(math.ceil(len(rows) / bs))]
    # a rank without a pair in a short last batch computes one with zero weight (DDP needs it)
    mine = [g[rank::world] if len(g) > rank else g[:1] for g in steps]
    features = iter(store.batches([rows[i] for i in mine], ctx.device, num_workers))
    epoch_loss = 0.0
    for whole, idx in zip(steps, mine, strict=True):
        synchronize(ctx.device)
        t0 = time.perf_counter()
        grid, pooled = next(features)
        batch = table.rows(idx, ctx.device, full_length=ctx.cfg.compile)
        value = xe_step(ctx, grid, pooled, batch,
                        _global_batch(ctx, table, whole, len(whole) > rank))
        epoch_loss += _count_xe_step(ctx, t0, table.lengths[whole], value)
    return epoch_loss / max(1, len(steps))


def _ddp_encoder(encoder, device: torch.device):
    """The fine-tuned encoder wrapped in DistributedDataParallel. On CUDA its batch norms
    become SyncBatchNorm (statistics over the global batch, as in one process); the CPU has
    no SyncBatchNorm, so there a trainable batch norm normalises with each rank's own images
    and the run differs from one process's (a CapbenchWarning says so). (A rank without an
    image in a short last step encodes one with zero loss weight; SyncBatchNorm still counts
    it in that step's statistics.)"""
    import warnings

    from torch.nn.modules.batchnorm import _BatchNorm


    trainable_bn = any(isinstance(m, _BatchNorm) and any(p.requires_grad for p in m.parameters())
                       for m in encoder.modules())
    if trainable_bn and device.type == "cuda":
        encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    elif trainable_bn and distributed.is_main():
        warnings.warn("fine-tuning a batch-norm encoder on several CPU processes: each process "
                      "normalises with the batch statistics of its own images (SyncBatchNorm "
                      "needs CUDA), so the run differs from a single process's",
                      CapbenchWarning, stacklevel=3)
    # CLIP's projection trains but feeds only the pooled vector, which the transformer and
    # attn_lstm decoders do not read: let DDP look for parameters without a gradient
    return DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda"
                                   else None, find_unused_parameters=True)


def _images_per_step(batch_size: int, n_images: int, n_pairs: int) -> int:
    """Images per fine-tuning step so that a step holds about ``batch_size`` captions."""
    return max(1, round(batch_size * n_images / max(1, n_pairs)))


def _xe_epoch_finetune(ctx: StepContext, encoder, train_images: list[ImageRecord],
                       table: CaptionTable, order: torch.Generator) -> float:
    """One cross-entropy epoch through the live encoder (``ctx.finetune``; ``encoder``: what
    runs it forward, its DistributedDataParallel wrapper in a distributed run): each
    training image once (training transform, shuffled), with all its captions of ``table``;
    about ``batch_size`` captions a step.

    Each image's random crop is seeded from the epoch's seed and the image's place in the
    epoch (:class:`ImageFolderDataset`), so it does not depend on the DataLoader's workers or
    on the number of processes. In a distributed run each step's images are split over the
    ranks (rank ``r`` of ``W`` takes images ``r, r+W, ...`` of the step, with all their
    captions) and each rank's loss is its share of the step's loss times ``W``, as in
    :func:`_xe_epoch`.
    """
    from torch.utils.data import DataLoader


    ft, device = ctx.finetune, ctx.device
    # caption_pairs lists each image's captions contiguously, in train_images order
    imgs, pairs, start = [], [], 0
    for im in train_images:
        if im.tokens:
            imgs.append(im)
            pairs.append(torch.arange(start, start + len(im.tokens)))
        start += len(im.tokens)
    ipb = _images_per_step(ctx.cfg.batch_size, len(imgs), start)
    perm = torch.randperm(len(imgs), generator=order).tolist()
    crop_seed = int(torch.randint(2**62, (1,), generator=order))  # this epoch's crops
    world, rank = distributed.world_size(), distributed.rank()
    steps = [range(b, min(b + ipb, len(imgs))) for b in range(0, len(imgs), ipb)]
    # places in the epoch of this rank's images, per step; a rank with none takes one (weight 0)
    mine = [list(st[rank::world]) or [st[0]] for st in steps]
    places = [q for m in mine for q in m]
    ds = ImageFolderDataset([imgs[perm[q]] for q in places], ft.encoder.train_transform(),
                            seeds=[crop_seed + q for q in places])
    batches, n = [], 0
    for m in mine:
        batches.append(list(range(n, n + len(m))))
        n += len(m)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=ft.num_workers,
                        pin_memory=device.type == "cuda")
    ctx.decoder.train()
    ft.encoder.train()
    epoch_loss = 0.0
    for st, m, pixels in zip(steps, mine, worker_batches(loader), strict=True):
        synchronize(device)
        t0 = time.perf_counter()
        idx = torch.cat([pairs[perm[q]] for q in m])
        whole = torch.cat([pairs[perm[q]] for q in st])
        counts = torch.tensor([len(pairs[perm[q]]) for q in m], device=device)
        with ctx.amp():
            grid, pooled = ft.normalize(*encoder(pixels.to(device, non_blocking=True)))
            grid, pooled = grid.repeat_interleave(counts, 0), pooled.repeat_interleave(counts, 0)
        value = xe_step(ctx, grid.float(), pooled.float(), table.rows(idx, device),
                        _global_batch(ctx, table, whole, len(st) > rank))
        epoch_loss += _count_xe_step(ctx, t0, table.lengths[whole], value)
    return epoch_loss / max(1, len(steps))


@contextlib.contextmanager
def _without_dropout(decoder):
    """Training mode with every dropout off: the policy that samples is the one whose
    log-probabilities are differentiated, and cuDNN's RNN backward (which refuses eval mode)
    still runs on CUDA."""
    decoder.train()
    rnn_dropout = {}
    for m in decoder.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
        elif isinstance(m, torch.nn.RNNBase):
            rnn_dropout[m], m.dropout = m.dropout, 0.0
    try:
        yield decoder
    finally:
        for m, p in rnn_dropout.items():
            m.dropout = p


def _scst_epoch(ctx: StepContext, store: FeatureStore, image_rows: torch.Tensor,
                image_ids: list, cider, gens: dict[str, torch.Generator]) -> tuple[float, float]:
    """One SCST epoch over the training images (feature ``image_rows`` of ``store``; rewards
    by ``cider``, a :class:`~benchmark.cider.CiderD` of their references by ``image_ids``):
    ``batch_size`` images a step in the order drawn from ``gens["order"]``, each with
    ``scst_samples`` captions sampled with ``gens["sample"]``; returns the mean batch loss and
    the mean reward (CIDEr-D of the samples).

    In a distributed run each global batch of images is split over the ranks as in
    :func:`_xe_epoch` (rank ``r`` takes images ``r, r+W, ...``), and ``ctx.policy`` is the
    decoder's DDP wrapper. Every rank draws the sampling noise of the whole global batch and
    decodes its images with their columns of it (:func:`sample_decode`), so the samples,
    rewards, loss and update equal one process's on the whole batch.
    """
    with _without_dropout(ctx.decoder):
        return _scst_steps(ctx, store, image_rows, image_ids, cider, gens)


def _scst_steps(ctx: StepContext, store: FeatureStore, image_rows: torch.Tensor,
                image_ids: list, cider, gens: dict[str, torch.Generator]) -> tuple[float, float]:
    cfg, device, tokenizer, loop = ctx.cfg, ctx.device, ctx.tokenizer, ctx.loop
    K, T = cfg.scst_samples, cfg.max_caption_len
    world, rank = distributed.world_size(), distributed.rank()
    perm = torch.randperm(len(image_ids), generator=gens["order"])
    epoch_loss, batches, reward_sum, n_samples = 0.0, 0, 0.0, 0
    for s in range(math.ceil(len(image_ids) / cfg.batch_size)):
        whole = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
        synchronize(device)
        t0 = time.perf_counter()
        # the whole batch's noise, (T, images, K); this rank's images are r, r+W, ...
        noise = torch.rand(T, len(whole), K, generator=gens["sample"], device=device)
        weight = 1.0 if len(whole) > rank else 0.0  # a rank without an image takes one, unweighted
        pos = torch.arange(rank, len(whole), world) if weight else torch.tensor([0])
        idx = whole[pos]
        grid, pooled = store.rows(image_rows[idx], device)
        grid, pooled = grid.repeat_interleave(K, 0), pooled.repeat_interleave(K, 0)
        seqs = sample_decode(ctx.decoder, grid, pooled, max_len=T,
                             special=SpecialTokens.of(tokenizer, suppress_unk=False),
                             noise=noise[:, pos.to(device)].reshape(T, -1))
        texts = [" ".join(tokenizer.decode(q)) for q in seqs]
        ids = [image_ids[i] for i in idx.tolist() for _ in range(K)]
        scores = cider.score_pairs(texts, ids)  # float64, summed as such for the record
        rewards = torch.from_numpy(scores).float().view(-1, K)
        advantage = new_self_critical_advantage(rewards).view(-1).to(device)
        token_logp, mask = sequence_log_probs(ctx.policy, grid, pooled, seqs, bos_id=tokenizer.bos_id,
                                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                              max_len=T)
        if world == 1:
            loss = scst_loss(token_logp, mask, advantage)
            value, batch_reward = float(loss.detach()), float(scores.sum())
        else:  # the whole batch's token count, policy-gradient sum and reward sum, at once
            pg_sum = scst_loss(token_logp, mask, advantage, global_tokens=1)  # un-normalised
            mine = torch.tensor([float(mask.sum()), float(pg_sum.detach()), float(scores.sum())],
                                dtype=torch.float64, device=device)  # nccl: device tensors
            tokens, total, batch_reward = distributed.all_reduce_sum(mine * weight).tolist()
            value = total / max(1.0, tokens)
            # this rank's share of the batch loss, times W: DDP averages the ranks' gradients
            loss = pg_sum * (weight * world / max(1.0, tokens))
        _update(ctx, loss)  # SCST has no scheduler
        loop.updates += 1
        synchronize(device)
        loop.scst_time += time.perf_counter() - t0
        loop.scst_captions += len(whole) * K
        epoch_loss += value
        batches += 1
        reward_sum += batch_reward
        n_samples += len(whole) * K
        ctx.callbacks.on_step(value, loop.n_tokens / max(loop.train_time, 1e-9),
                              reward=batch_reward / (len(whole) * K))
    return epoch_loss / max(1, batches), reward_sum / max(1, n_samples)
