"""Decoding strategies over any :class:`~architectures.decoders.base.CaptionDecoder`.

All strategies run every image of a batch (and every beam) together on the device through
the decoder's incremental ``step``; beam search drops the images whose beams have all
finished. ``<pad>`` and ``<bos>`` are never generated; a sequence
that has not emitted ``<eos>`` after ``max_len`` words is closed there (no crash, OpenNMT-py
style). Outputs are word-id lists without ``<bos>``/``<eos>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DecodeConfig", "SpecialTokens", "greedy_decode", "beam_search", "sample_decode", "decode",
           "forbid_tokens"]


@dataclass
class DecodeConfig:
    """Decoding settings recorded with every run.

    ``beam_size`` 1 is greedy. ``length_penalty`` is GNMT's alpha (Wu et al. 2016):
    beams are ranked by ``logprob / ((5 + len) / 6) ** alpha``; 0 ranks by raw log-probability.
    ``strategy`` "sample" draws with ``temperature``, ``top_k`` and ``top_p`` (nucleus,
    Holtzman et al. 2020) instead. ``suppress_unk`` never emits ``<unk>`` (as most captioning
    codebases do: an ``<unk>`` in a caption only scores as junk tokens). ``batch_size``: images
    decoded together. Each field's ``metadata`` declares its allowed range, which the config
    loader checks (:func:`benchmark.config.check_ranges`).
    """

    beam_size: int = field(default=1, metadata={"min": 1, "max": 256})
    max_len: int = field(default=20, metadata={"min": 1, "max": 1024})
    length_penalty: float = field(default=0.0, metadata={"min": 0.0, "max": 100.0})
    strategy: str = field(default="beam", metadata={"choices": ("beam", "sample")})
    temperature: float = field(default=1.0, metadata={"min_exclusive": 0.0})
    top_k: int = field(default=0, metadata={"min": 0, "max": 1_000_000})
    top_p: float = field(default=1.0, metadata={"min_exclusive": 0.0, "max": 1.0})
    suppress_unk: bool = True
    batch_size: int = field(default=64, metadata={"min": 1, "max": 65_536})


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special ids as decoding uses them: every caption starts from ``bos`` and
    ends at ``eos``; ``pad`` and ``bos`` are never generated, nor ``unk`` unless it is None."""

    bos: int = 1
    eos: int = 2
    pad: int = 0
    unk: int | None = None

    @classmethod
    def of(cls, tokenizer, *, suppress_unk: bool = True) -> SpecialTokens:
        """The ids of a :class:`~benchmark.vocab.CaptionTokenizer` (``unk`` only when
        ``suppress_unk``, as :attr:`DecodeConfig.suppress_unk` asks)."""
        return cls(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                   tokenizer.unk_id if suppress_unk else None)


def forbid_tokens(logp: torch.Tensor, pad_id: int, bos_id: int, unk_id: int | None = None) -> torch.Tensor:
    """Tokens never generated: ``<pad>``, ``<bos>`` and (if given) ``<unk>``."""
    for i in (pad_id, bos_id) if unk_id is None else (pad_id, bos_id, unk_id):
        logp[..., i] = float("-inf")
    return logp


def _autoregressive(decoder, grid, pooled, pick, *, special: SpecialTokens, max_len: int):
    """Shared loop of greedy decoding and sampling: ``pick(logits (B, V)) -> tokens (B,)``.

    ``<pad>``/``<bos>`` logits are set to -inf before ``pick``; finished rows keep emitting
    ``<eos>``; every row is closed with ``<eos>`` after ``max_len`` words.
    """
    B, eos_id = grid.shape[0], special.eos
    state = decoder.init_state(grid, pooled)
    tokens = torch.full((B,), special.bos, dtype=torch.long, device=grid.device)
    done = torch.zeros(B, dtype=torch.bool, device=grid.device)
    out = []
    for t in range(max_len + 1):
        logits, state = decoder.step(tokens, state)
        if t == max_len:
            tokens = torch.full_like(tokens, eos_id)
        else:
            tokens = pick(forbid_tokens(logits.float(), special.pad, special.bos, special.unk))
        tokens = torch.where(done, torch.full_like(tokens, eos_id), tokens)
        out.append(tokens)
        done |= tokens == eos_id
        if bool(done.all()):
            break
    seqs = torch.stack(out, 1).tolist()
    return [s[: s.index(eos_id)] if eos_id in s else s for s in seqs]


@torch.inference_mode()
def greedy_decode(decoder, grid, pooled, *, max_len=20, special: SpecialTokens = SpecialTokens()):
    """Arg-max decoding: ``grid (B, N, D)``, ``pooled (B, P)`` -> B lists of word ids."""
    return _autoregressive(decoder, grid, pooled, lambda logits: logits.argmax(-1),
                           special=special, max_len=max_len)


@torch.inference_mode()
def beam_search(decoder, grid, pooled, *, beam_size=3, max_len=20, length_penalty=0.0,
                special: SpecialTokens = SpecialTokens(), return_scores=False):
    """Batched beam search: the B images x K beams still searching advance in one ``step`` call
    per word.

    Each image's beams only compete among themselves, so an image's result does not depend on
    the batch it is decoded in. Finished beams keep their score; the best finished beam per
    image is chosen with the length penalty. An image whose K beams have all finished is done:
    once such images are a quarter of the rows, they leave the batch
    (:meth:`~architectures.decoders.base.CaptionDecoder.keep_images`) and later steps no longer
    compute them.

    Args:
        decoder: a :class:`~architectures.decoders.base.CaptionDecoder` in eval mode.
        grid: image features ``(B, N, grid_dim)``.
        pooled: pooled image features ``(B, pooled_dim)``.
        beam_size: K, beams per image (1 is greedy).
        max_len: most words per caption (``<eos>`` not counted).
        length_penalty: GNMT's alpha (Wu et al. 2016): a finished beam is ranked by its summed
            log-probability / ``((5 + length) / 6) ** alpha``; 0 ranks by the sum.
        special: the tokenizer's ``bos``/``eos``/``pad``/``unk`` ids (:class:`SpecialTokens`).
        return_scores: also return each caption's summed log-probability (nats).

    Returns:
        B lists of word ids (without ``<bos>``/``<eos>``), or with ``return_scores``
        ``(ids, scores)`` with B floats.

    Raises:
        ValueError: ``beam_size`` < 1.
    """
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    B, K, dev = grid.shape[0], beam_size, grid.device
    bos_id, eos_id, pad_id, unk_id = special.bos, special.eos, special.pad, special.unk
    state = decoder.init_state(grid, pooled)
    # K rows per image; the decoder's static entries (e.g. the grid) stay at one per image
    state = decoder.select_state(state, torch.arange(B, device=dev).repeat_interleave(K),
                                 within_image=True)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand from the first only
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=dev)
    seqs = torch.empty(B, K, 0, dtype=torch.long, device=dev)
    finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, K, device=dev)
    images = torch.arange(B, device=dev)  # batch positions of the images still searching
    out: list[list[int] | None] = [None] * B
    out_scores: list[float | None] = [None] * B
    any_finished = False  # whether some beam of an image still searching has ended

    def close(rows: torch.Tensor) -> None:
        """Record the best finished beam of the images at ``rows`` (length penalty applied)."""
        ranked = scores[rows]
        if length_penalty:
            ranked = ranked / ((5.0 + lengths[rows]) / 6.0) ** length_penalty
        best = ranked.argmax(1)
        for b, s, v in zip(images[rows].tolist(), seqs[rows, best].tolist(),
                           scores[rows, best].tolist(), strict=True):
            out[b], out_scores[b] = (s[: s.index(eos_id)] if eos_id in s else s), v

    for t in range(max_len + 1):
        n = images.shape[0]
        logits, state = decoder.step(tokens, state)
        V = logits.shape[-1]
        # (n, K, V) log-probabilities, then edited in place: one tensor of this size per step
        logp = forbid_tokens(torch.log_softmax(logits.float(), -1), pad_id, bos_id, unk_id).view(n, K, V)
        if t == max_len:  # close every open beam
            eos = logp[..., eos_id].clone()
            logp.fill_(float("-inf"))
            logp[..., eos_id] = eos
        if any_finished:
            # a finished beam extends only by <eos> at no cost, so it stays a single candidate
            logp.masked_fill_(finished.unsqueeze(-1), float("-inf"))
            logp[..., eos_id] = torch.where(finished, torch.zeros_like(scores), logp[..., eos_id])
        cand = logp.add_(scores.unsqueeze(-1)).view(n, K * V)
        scores, flat = cand.topk(K, dim=1)
        beam, word = flat // V, flat % V
        finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~finished).float()
        seqs = torch.cat([seqs.gather(1, beam.unsqueeze(-1).expand(-1, -1, seqs.shape[2])),
                          word.unsqueeze(-1)], dim=2)
        finished = finished | (word == eos_id)
        base = (torch.arange(n, device=dev) * K).unsqueeze(1)
        state = decoder.select_state(state, (base + beam).view(-1), within_image=True)
        tokens = word.view(-1)
        per_image = finished.sum(1)
        done = per_image == K  # images whose K beams all ended: their result is final
        n_done, n_finished = torch.stack((done.sum(), per_image.sum())).tolist()  # one sync
        if n_done == n or t == max_len:  # (at max_len a beam still at -inf may stay open)
            close(torch.arange(n, device=dev))
            break
        any_finished = n_finished > 0
        if 4 * n_done >= n:  # stop computing them once they are a quarter of the rows
            close(done.nonzero().squeeze(1))
            keep = (~done).nonzero().squeeze(1)
            state = decoder.keep_images(state, keep, K)
            scores, finished, lengths = scores[keep], finished[keep], lengths[keep]
            seqs, images, tokens = seqs[keep], images[keep], tokens.view(n, K)[keep].view(-1)
            any_finished = n_finished > K * n_done
    assert all(s is not None for s in out_scores)  # every image was closed
    if return_scores:
        return out, out_scores
    return out


@torch.inference_mode()
def sample_decode(decoder, grid, pooled, *, temperature=1.0, top_k=0, top_p=1.0, max_len=20,
                  special: SpecialTokens = SpecialTokens(),
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None):
    """Ancestral sampling with temperature, top-k and nucleus (top-p) filtering.

    Each row draws its token at step t by inverse transform sampling from one uniform number,
    ``noise[t, row]``; by default ``noise`` is drawn at once from ``generator``. So a row's
    caption depends on its own numbers only, not on the batch it was decoded in: a distributed
    SCST step draws the global batch's noise on every rank and each rank decodes its rows with
    their columns, as one process would (Holtzman et al. 2020 for top-p).

    Args:
        decoder: a :class:`~architectures.decoders.base.CaptionDecoder`.
        grid: image features ``(B, N, D)``.
        pooled: pooled image features ``(B, P)``.
        temperature: the logits are divided by it (at least 1e-6); 1 samples the model's
            distribution.
        top_k: keep only the k most likely words at each step (0: all).
        top_p: keep the smallest set of most likely words whose probability reaches p (1: all).
        max_len: most words per caption.
        special: the tokenizer's special ids (:class:`SpecialTokens`).
        generator: the random generator ``noise`` is drawn from when not given.
        noise: ``(max_len, B)`` uniform numbers in [0, 1), one per step and row.

    Returns:
        B lists of word ids (without ``<bos>``/``<eos>``).

    Raises:
        ValueError: ``noise`` of another shape than ``(max_len, B)``.
    """
    B = grid.shape[0]
    if noise is None:
        noise = torch.rand(max_len, B, generator=generator, device=grid.device)
    elif tuple(noise.shape) != (max_len, B):
        raise ValueError(f"noise of shape {tuple(noise.shape)}; expected (max_len, B) = "
                         f"({max_len}, {B})")
    step = iter(noise.to(grid.device))

    def pick(logits):
        logits = logits / max(temperature, 1e-6)
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, idx = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses p
            logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
        cdf = logits.softmax(-1).cumsum(-1)
        total = cdf[:, -1:]
        # x < total, so the first token whose cumulative probability exceeds x has probability
        # > 0 (a filtered token never: u * total may round up to total, hence the minimum)
        x = torch.minimum(next(step).unsqueeze(1) * total, torch.nextafter(total, total.new_zeros(())))
        return torch.searchsorted(cdf, x, right=True).squeeze(1)

    return _autoregressive(decoder, grid, pooled, pick, special=special, max_len=max_len)


def decode(decoder, grid, pooled, cfg: DecodeConfig, tokenizer, *, generator=None):
    """Dispatch on ``cfg``: greedy (beam 1), beam search, or sampling, with ``tokenizer``'s
    special ids (:meth:`SpecialTokens.of`; ``<unk>`` suppressed as ``cfg.suppress_unk`` says)."""
    ids = dict(special=SpecialTokens.of(tokenizer, suppress_unk=cfg.suppress_unk),
               max_len=cfg.max_len)
    if cfg.strategy == "sample":
        return sample_decode(decoder, grid, pooled, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, **ids)
    if cfg.strategy != "beam":
        raise ValueError(f"unknown decoding strategy {cfg.strategy!r} (beam or sample)")
    if cfg.beam_size == 1:
        return greedy_decode(decoder, grid, pooled, **ids)
    return beam_search(decoder, grid, pooled, beam_size=cfg.beam_size,
                       length_penalty=cfg.length_penalty, **ids)
