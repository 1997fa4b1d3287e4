"""The interface every caption decoder implements, so one harness trains and decodes them all.

Conventions (all decoders):

* ``grid``: image features ``(B, N, grid_dim)``; ``pooled``: ``(B, pooled_dim)``.
* ``tokens``: teacher-forcing input ``(B, T)`` = ``<bos> w1 .. wn <pad> ..`` (int64);
  ``lengths``: ``(B,)`` number of valid input tokens (n + 1). The targets are the same
  sequence shifted left, ending in ``<eos>``; the harness builds them.
* :meth:`forward` returns :class:`DecoderOutput` with ``logits (B, T, V)``; positions at or
  beyond ``lengths`` hold unspecified values and must be masked by the loss.
* Decoding is incremental: :meth:`init_state` computes everything that does not change across
  time steps once (e.g. the attention projection of the grid); :meth:`step` consumes one token
  per sequence and returns ``logits (B, V)`` plus the new state. A state is a ``dict`` of
  tensors whose first dimension is the batch, so beam search can expand, reorder and shrink it
  with :meth:`select_state` and :meth:`keep_images` whatever the decoder; in beam search the
  :attr:`~CaptionDecoder.static_state` entries keep one row per image, the others get one per
  beam.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

State = dict[str, torch.Tensor]

__all__ = ["CaptionDecoder", "DecoderOutput", "State"]


class DecoderOutput(NamedTuple):
    """``logits (B, T, V)``; ``attention (B, T, N)`` soft-attention weights, or None."""

    logits: torch.Tensor
    attention: torch.Tensor | None = None


class CaptionDecoder(nn.Module):
    """Base class of the caption decoders (see the module docstring for shapes).

    Subclasses set ``attention_regularization`` > 0 when their loss adds the doubly stochastic
    attention penalty of Show, Attend and Tell (Xu et al. 2015, eq. 14).
    """

    attention_regularization: float = 0.0
    #: State entries that are constant for an image (e.g. its projected grid). Beam search
    #: keeps them at one row per image while every other entry has one row per beam (the K
    #: beams of an image adjacent), so a decoder with static entries must accept, in
    #: :meth:`step`, static rows that are shared by ``K = rows / static rows`` beams each.
    #: Copying them K times would only add memory traffic: beams never leave their image.
    static_state: tuple[str, ...] = ()

    def __init__(self, vocab_size: int, grid_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.grid_dim = grid_dim
        self.pooled_dim = pooled_dim

    def forward(
        self, grid: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> DecoderOutput:
        """Teacher forcing: the logits of every next word in one pass.

        Args:
            grid: image features ``(B, N, grid_dim)``, float.
            pooled: pooled image features ``(B, pooled_dim)``, float.
            tokens: input words ``(B, T)`` int64, ``<bos> w1 .. wn <pad> ..``.
            lengths: ``(B,)`` int64, valid input tokens per caption (n + 1), each <= T.

        Returns:
            :class:`DecoderOutput` with ``logits (B, T, V)`` (positions at or beyond
            ``lengths`` unspecified: the loss masks them) and, for soft attention,
            ``attention (B, T, N)`` whose rows sum to 1.

        Raises:
            NotImplementedError: a subclass that does not implement it.
        """
        raise NotImplementedError

    def init_state(self, grid: torch.Tensor, pooled: torch.Tensor) -> State:
        """The decoding state before the first word.

        Args:
            grid: image features ``(B, N, grid_dim)``, float.
            pooled: pooled image features ``(B, pooled_dim)``, float.

        Returns:
            A dict of tensors whose first dimension is B; the :attr:`static_state` entries
            hold what every step reuses (e.g. the grid projected for attention,
            ``(B, N, attention_dim)``), the others the recurrent state (e.g. LSTM ``h``/``c``
            ``(B, hidden_dim)``) or the words so far.

        Raises:
            NotImplementedError: a subclass that does not implement it.
        """
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoding step: consume the last word of each sequence.

        Args:
            tokens: ``(R,)`` int64, the last word of each row (R rows: B images in greedy
                decoding, or B x K beams in beam search, the K beams of an image adjacent).
            state: the state of those rows (:meth:`init_state`, or the previous step's,
                reordered by :meth:`select_state`); in beam search the
                :attr:`static_state` entries have one row per image, shared by the
                ``R / rows`` adjacent beams of that image.

        Returns:
            ``(logits, new state)``: unnormalised next-word scores ``(R, V)`` (float) and
            the state after this word, with R rows (static entries unchanged).

        Raises:
            NotImplementedError: a subclass that does not implement it.
        """
        raise NotImplementedError

    def select_state(self, state: State, index: torch.Tensor, *, within_image: bool = False) -> State:
        """Rows ``index`` (1-D int64) of every state tensor: beam expansion and reordering.

        With ``within_image`` (``index`` maps every row to a row of the same image, as beam
        expansion and beam reordering do) the :attr:`static_state` entries are passed through
        uncopied, at one row per image.
        """
        skip = self.static_state if within_image else ()
        return {k: v if k in skip else v.index_select(0, index) for k, v in state.items()}

    def keep_images(self, state: State, images: torch.Tensor, beams: int) -> State:
        """The state of ``images`` only: beam search drops the images whose beams all finished.

        ``images`` (1-D int64): positions, in the current state, of the images kept, each with
        its ``beams`` adjacent rows; :attr:`static_state` entries have one row per image.
        """
        rows = (images.unsqueeze(1) * beams + torch.arange(beams, device=images.device)).view(-1)
        return {k: v.index_select(0, images if k in self.static_state else rows)
                for k, v in state.items()}

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
