"""Vanilla (Elman, tanh) RNN decoder whose hidden state is initialised from the image.

The pooled image feature is projected to the initial hidden state of every layer, in the
spirit of Karpathy & Fei-Fei 2015 ("Deep Visual-Semantic Alignments"), where the image
conditions the RNN only through its first state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from architectures.decoders.base import CaptionDecoder, DecoderOutput, State
from architectures.registry import register_decoder


@register_decoder("rnn")
class RNNDecoder(CaptionDecoder):
    """Vanilla RNN; the image feature initialises the hidden state (Karpathy & Fei-Fei 2015)."""

    cell = nn.RNN

    def __init__(
        self,
        vocab_size: int,
        grid_dim: int,
        pooled_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.3,
    ) -> None:
        super().__init__(vocab_size, grid_dim, pooled_dim)
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.init_h = nn.Linear(pooled_dim, num_layers * hidden_dim)
        inter = dropout if num_layers > 1 else 0.0
        self.rnn = self.cell(embed_dim, hidden_dim, num_layers, batch_first=True, dropout=inter)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def _initial_hidden(self, pooled: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.init_h(pooled))  # (B, L*H)
        return h.view(-1, self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()

    def _run(self, emb, lengths, hidden):
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed, hidden)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
        return out

    def forward(self, grid, pooled, tokens, lengths) -> DecoderOutput:
        emb = self.dropout(self.embed(tokens))
        out = self._run(emb, lengths, self._initial_hidden(pooled))
        return DecoderOutput(self.fc(self.dropout(out)))

    def init_state(self, grid, pooled) -> State:
        return {"h": self._initial_hidden(pooled).transpose(0, 1)}  # batch-first (B, L, H)

    def step(self, tokens, state):
        emb = self.embed(tokens).unsqueeze(1)
        out, h = self.rnn(emb, state["h"].transpose(0, 1).contiguous())
        return self.fc(out[:, 0]), {"h": h.transpose(0, 1)}
