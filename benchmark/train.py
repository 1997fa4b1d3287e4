"""One training loop for every decoder: teacher forcing with masked cross-entropy.

AdamW, linear warmup then cosine decay, global-norm gradient clipping, bf16 autocast on
CUDA, validation every ``val_every`` epochs by greedy decoding scored with CIDEr-D
(pycocoevalcap, PTB-tokenized references) and the best-scoring weights kept. For decoders
with soft attention the doubly stochastic penalty of Xu et al. 2015 (eq. 14) is added.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmark.config import TrainConfig
from benchmark.data import ImageRecord
from benchmark.decoding import DecodeConfig
from benchmark.device import synchronize
from benchmark.features import FeatureStore
from benchmark.inference import caption_features
from benchmark.metrics import cider_d
from benchmark.vocab import Vocabulary

__all__ = ["TrainResult", "train_decoder", "caption_loss", "caption_pairs"]


@dataclass
class TrainResult:
    """Outcome of :func:`train_decoder`. Throughput counts training steps only (no validation).

    ``tokens_per_s`` counts target tokens (words + ``<eos>``, no padding) per second.
    """

    best_state: dict
    best_epoch: int
    best_val_cider: float
    history: list[dict] = field(default_factory=list)
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    steps: int = 0


def caption_pairs(images: list[ImageRecord], store: FeatureStore):
    """One training sample per (image, reference caption): feature rows and token lists."""
    rows, caps = [], []
    for im, r in zip(images, store.row_ids(images).tolist(), strict=True):
        for toks in im.tokens:
            rows.append(r)
            caps.append(list(toks))
    return torch.tensor(rows), caps


def caption_loss(output, targets, pad_id: int, attention_reg: float = 0.0,
                 label_smoothing: float = 0.0, lengths=None) -> torch.Tensor:
    """Masked cross-entropy over ``logits (B, T, V)`` vs ``targets (B, T)`` (mean per token).

    With ``attention_reg`` > 0 and soft attention ``(B, T, N)``, adds
    ``attention_reg * mean_{b,i} (1 - sum_t alpha_ti)^2`` (Xu et al. 2015, eq. 14, averaged
    over the N grid cells as in sgrvinod's tutorial so that its scale does not grow with N).
    """
    logits = output.logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=pad_id, label_smoothing=label_smoothing)
    if attention_reg and output.attention is not None:
        mask = (targets != pad_id).unsqueeze(-1).to(output.attention.dtype)
        coverage = (output.attention * mask).sum(1)  # (B, N)
        loss = loss + attention_reg * ((1.0 - coverage) ** 2).mean()
    return loss


def _schedule(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_decoder(decoder, store: FeatureStore, train_images: list[ImageRecord],
                  val_images: list[ImageRecord], val_references: dict, vocab: Vocabulary,
                  cfg: TrainConfig, device: torch.device, *, seed: int = 0,
                  callback: Callable[..., None] | None = None) -> TrainResult:
    """Train ``decoder`` on cached features; return the best weights by validation CIDEr-D.

    ``val_references``: ``{image_id: [PTB-tokenized reference, ...]}``. ``callback(event,
    **info)`` receives ``epoch_start`` (epoch, steps), ``step`` (loss, tokens_per_s) and
    ``epoch_end`` (epoch, loss, val_cider).
    """
    cb = callback or (lambda *a, **k: None)
    decoder.to(device)
    rows, caps = caption_pairs(train_images, store)
    if len(rows) == 0:
        raise ValueError("the train split has no captions")
    # Encode every training caption once; a batch is then a row gather, not Python work.
    all_inputs, all_targets, all_lengths = vocab.batch(caps, cfg.max_caption_len)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay, no_decay = [], []
    for name, p in decoder.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_frac))
    use_amp = device.type == "cuda"
    val_decode = DecodeConfig(beam_size=1, max_len=cfg.max_caption_len)
    result = TrainResult({}, -1, float("-inf"))
    train_time, n_tokens, n_samples = 0.0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        decoder.train()
        perm = torch.randperm(len(rows), generator=gen)
        cb("epoch_start", epoch=epoch, steps=steps_per_epoch)
        epoch_loss, epoch_batches = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            synchronize(device)
            t0 = time.perf_counter()
            grid, pooled = store.rows(rows[idx], device)
            lengths = all_lengths[idx]
            T = int(lengths.max())
            inputs = all_inputs[idx, :T].to(device, non_blocking=True)
            targets = all_targets[idx, :T].to(device, non_blocking=True)
            with torch.autocast("cuda", torch.bfloat16, enabled=use_amp):
                out = decoder(grid, pooled, inputs, lengths.to(device))
            loss = caption_loss(out, targets, vocab.pad_id, decoder.attention_regularization,
                                cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            synchronize(device)
            train_time += time.perf_counter() - t0
            n_tokens += int(lengths.sum())
            n_samples += len(idx)
            epoch_loss += float(loss.detach())
            epoch_batches += 1
            cb("step", loss=float(loss.detach()), tokens_per_s=n_tokens / max(train_time, 1e-9))
        entry = {"epoch": epoch, "loss": epoch_loss / max(1, epoch_batches),
                 "lr": sched.get_last_lr()[0]}
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            preds, _ = caption_features(decoder, store, val_images, vocab, val_decode, device)
            entry["val_CIDEr"] = cider_d(preds, val_references)
            if entry["val_CIDEr"] > result.best_val_cider:
                result.best_val_cider = entry["val_CIDEr"]
                result.best_epoch = epoch
                result.best_state = copy.deepcopy({k: v.detach().cpu()
                                                   for k, v in decoder.state_dict().items()})
        result.history.append(entry)
        cb("epoch_end", **entry)
    result.train_seconds = train_time
    result.samples_per_s = n_samples / max(train_time, 1e-9)
    result.tokens_per_s = n_tokens / max(train_time, 1e-9)
    result.steps = total
    return result
