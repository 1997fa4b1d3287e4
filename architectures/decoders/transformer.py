"""Transformer caption decoder: masked self-attention over words, cross-attention over the grid.

Vaswani et al. 2017, "Attention Is All You Need" (decoder stack, sinusoidal positions), in
the pre-norm arrangement (Xiong et al. 2020), as used for captioning over projected grid
tokens (e.g. xmodaler's Transformer baseline). Incremental decoding caches each layer's
self-attention keys/values and computes the cross-attention keys/values of the image once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from architectures.decoders.base import CaptionDecoder, DecoderOutput, State
from architectures.registry import register_decoder


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Sinusoidal position encodings ``(length, dim)`` (Vaswani et al. 2017, sec. 3.5), always
    computed on the CPU: the model's ``.to(device)`` moves them (and under a meta-device
    context, as :func:`~architectures.factory.validate_decoder` builds, the ops' meta
    decompositions would import torch._dynamo, seconds of start-up)."""
    cpu = torch.device("cpu")
    pos = torch.arange(length, dtype=torch.float32, device=cpu).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=cpu)
                     * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=cpu)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer with explicit key/value tensors so that they can be cached."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"embed_dim {d_model} is not divisible by num_heads {num_heads}")
        self.h = num_heads
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.self_qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)
        self.cross_q = nn.Linear(d_model, d_model)
        self.cross_kv = nn.Linear(d_model, 2 * d_model)
        self.cross_out = nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x):  # (B, L, D) -> (B, h, L, D/h)
        B, L, D = x.shape
        return x.view(B, L, self.h, D // self.h).transpose(1, 2)

    def _merge(self, x):  # (B, h, L, d) -> (B, L, h*d)
        B, h, L, d = x.shape
        return x.transpose(1, 2).reshape(B, L, h * d)

    def memory_kv(self, memory):
        """Cross-attention keys and values ``(B, h, N, d)`` of the image tokens."""
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x, mem_k, mem_v, past_k=None, past_v=None, pad_mask=None):
        """``x (B, L, D)``; returns ``(y, k, v)`` with this call's self-attention keys/values.

        ``mem_k``/``mem_v (B / K, h, N, d)``: the image's cross-attention keys/values, shared by
        the K adjacent rows of ``x`` that are beams of one image (K = 1 outside beam search).
        With ``past_k``/``past_v`` (incremental decoding, L = 1) the new key/value is appended.
        Without them, a causal mask is applied (teacher forcing over the whole sequence).
        """
        # attention dropout follows the dropout module, so that switching the Dropout modules
        # to eval (as SCST sampling does, benchmark.train._without_dropout) turns it off too
        p = self.dropout.p if self.dropout.training else 0.0
        q, k, v = self.self_qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past_k is not None:
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
            if pad_mask is not None:  # (B, L) True = real token
                mask = mask & pad_mask[:, None, None, :]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.dropout(self.self_out(self._merge(a)))
        cq = self._heads(self.cross_q(self.norm2(x)))  # (B, h, L, d)
        K = cq.shape[0] // max(mem_k.shape[0], 1)
        if K > 1:  # beam search (L = 1): the K beams of an image query its memory together
            if cq.shape[2] != 1:
                raise ValueError(f"{K} rows per image need one query position, not {cq.shape[2]}")
            Bm, h, d = mem_k.shape[0], cq.shape[1], cq.shape[3]
            c = F.scaled_dot_product_attention(cq.view(Bm, K, h, d).transpose(1, 2),
                                               mem_k, mem_v, dropout_p=p)  # (Bm, h, K, d)
            c = c.transpose(1, 2).reshape(Bm * K, 1, h * d)
        else:
            c = self._merge(F.scaled_dot_product_attention(cq, mem_k, mem_v, dropout_p=p))
        x = x + self.dropout(self.cross_out(c))
        x = x + self.dropout(self.ffn(self.norm3(x)))
        return x, k, v


@register_decoder("transformer")
class TransformerDecoder(CaptionDecoder):
    """Transformer decoder: causal self-attention + cross-attention over grid (Vaswani 2017)."""

    def __init__(
        self,
        vocab_size: int,
        grid_dim: int,
        pooled_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 1024,
        num_layers: int = 2,
        num_heads: int = 8,
        dropout: float = 0.1,
        max_len: int = 64,
    ) -> None:
        super().__init__(vocab_size, grid_dim, pooled_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.visual = nn.Sequential(nn.Linear(grid_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.register_buffer("positions", sinusoidal_positions(max_len, embed_dim), False)
        self.layers = nn.ModuleList(
            DecoderLayer(embed_dim, num_heads, hidden_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, vocab_size)
        self.scale = math.sqrt(embed_dim)
        self.max_len = max_len
        self.static_state = tuple(f"mem_{kv}{i}" for i in range(num_layers) for kv in "kv")

    def _embed(self, tokens, start: int | torch.Tensor = 0):
        T = tokens.shape[1]
        if isinstance(start, int):
            if start + T > self.max_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_len {self.max_len}")
            pos = self.positions[start : start + T].unsqueeze(0)
        else:  # per-row step index (B,)
            pos = self.positions[start].unsqueeze(1)
        return self.dropout(self.embed(tokens) * self.scale + pos)

    def forward(self, grid, pooled, tokens, lengths) -> DecoderOutput:
        memory = self.visual(grid)
        T = tokens.shape[1]
        pad_mask = torch.arange(T, device=tokens.device)[None] < lengths[:, None]
        x = self._embed(tokens)
        for layer in self.layers:
            mk, mv = layer.memory_kv(memory)
            x, _, _ = layer(x, mk, mv, pad_mask=pad_mask)
        return DecoderOutput(self.fc(self.norm(x)))

    def init_state(self, grid, pooled) -> State:
        memory = self.visual(grid)
        B = grid.shape[0]
        state: State = {"step": torch.zeros(B, dtype=torch.long, device=grid.device)}
        for i, layer in enumerate(self.layers):
            mk, mv = layer.memory_kv(memory)  # once per image, reused at every step
            state[f"mem_k{i}"], state[f"mem_v{i}"] = mk, mv
            empty = mk.new_zeros(B, mk.shape[1], 0, mk.shape[3])
            state[f"k{i}"], state[f"v{i}"] = empty, empty
        return state

    def step(self, tokens, state):
        x = self._embed(tokens.unsqueeze(1), state["step"])
        new = dict(state)
        for i, layer in enumerate(self.layers):
            x, k, v = layer(
                x, state[f"mem_k{i}"], state[f"mem_v{i}"], state[f"k{i}"], state[f"v{i}"]
            )
            new[f"k{i}"], new[f"v{i}"] = k, v
        new["step"] = state["step"] + 1
        return self.fc(self.norm(x[:, 0])), new
