"""Show and Tell: an LSTM that reads the image embedding as its first input, then the words.

Vinyals et al. 2015, "Show and Tell: A Neural Image Caption Generator" (CVPR), eq. 10-12:
``x_{-1} = W_e CNN(I)``, ``x_t = W_s S_t``; the image is seen only at t = -1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from architectures.decoders.base import CaptionDecoder, DecoderOutput, State
from architectures.registry import register_decoder


@register_decoder("lstm", aliases=("show_tell",))
class ShowTellDecoder(CaptionDecoder):
    """Show and Tell LSTM: pooled image feature as the first input (Vinyals et al. 2015)."""

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
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.image_embed = nn.Linear(pooled_dim, embed_dim)
        inter = dropout if num_layers > 1 else 0.0
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True, dropout=inter)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def forward(self, grid, pooled, tokens, lengths) -> DecoderOutput:
        img = self.image_embed(pooled).unsqueeze(1)  # (B, 1, E)
        emb = torch.cat([img, self.embed(tokens)], dim=1)  # image at t = -1, then words
        emb = self.dropout(emb)
        packed = pack_padded_sequence(emb, (lengths + 1).cpu(), True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
        return DecoderOutput(self.fc(self.dropout(out[:, 1:])))

    def init_state(self, grid, pooled) -> State:
        _, (h, c) = self.lstm(self.image_embed(pooled).unsqueeze(1))
        return {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}  # (B, L, H)

    def step(self, tokens, state):
        hc = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        out, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), hc)
        return self.fc(out[:, 0]), {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}
