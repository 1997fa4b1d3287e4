"""Show, Attend and Tell: an LSTM with soft (additive) attention over the image grid.

Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention" (ICML). Additive (Bahdanau et al. 2015) scores ``e_ti = w^T relu(W_a a_i + W_h h)``,
``alpha = softmax(e)``, context ``z = beta * sum_i alpha_i a_i`` with the gating scalar
``beta = sigmoid(f_beta(h))`` (sec. 4.2.1), initial ``h0, c0`` from MLPs of the mean grid
feature (sec. 3.1.2), and the doubly stochastic penalty ``lambda * sum_i (1 - sum_t
alpha_ti)^2`` added to the loss (eq. 14).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from architectures.decoders.base import CaptionDecoder, DecoderOutput, State
from architectures.registry import register_decoder

#: Elements of ``relu(W_a a + W_h h)`` formed at once on the CPU (4 MiB of float32). Scoring
#: images in blocks that stay in the cache, instead of forming the whole ``(B, N, A)`` tensor
#: (``(B, K, N, A)`` in beam search) each step, keeps this memory-bound term from writing and
#: reading back tens of megabytes of fresh memory per step (see the utilisation table in docs/results.md).
CPU_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(rows: int, per_row: int, device: torch.device) -> list[slice]:
    """Row ranges scored together: cache-sized blocks on the CPU, all rows elsewhere."""
    step = rows if device.type != "cpu" else max(1, CPU_BLOCK_ELEMENTS // max(per_row, 1))
    return [slice(s, s + step) for s in range(0, rows, step)] if step else []


def _additive_scores(grid_proj, hidden_proj, weight):
    """``relu(grid_proj + hidden_proj) @ weight`` in blocks of images, without autograd.

    ``grid_proj (B, N, A)``, ``hidden_proj (B * K, A)`` (K rows per image, e.g. its beams),
    ``weight (A,)`` -> ``(B * K, N)``.
    """
    B, N, A = grid_proj.shape
    K = hidden_proj.shape[0] // max(B, 1)
    out = grid_proj.new_empty(B, K, N)
    hidden_proj, weight = hidden_proj.view(B, K, A), weight.to(grid_proj.dtype).view(A, 1)
    for rows in _row_blocks(B, K * N * A, grid_proj.device):
        x = grid_proj[rows].unsqueeze(1) + hidden_proj[rows].unsqueeze(2)  # (b, K, N, A)
        torch.mm(x.relu_().view(-1, A), weight, out=out[rows].view(-1, 1))
    return out.view(B * K, N)


class AdditiveScores(torch.autograd.Function):
    """Additive attention scores ``e = relu(grid_proj + hidden_proj) @ weight`` (no bias).

    The same values and gradients as the plain expression, but computed in blocks of images
    on the CPU (see :data:`CPU_BLOCK_ELEMENTS`), and the backward pass recomputes each block's
    ``relu`` input instead of keeping one ``(B, N, A)`` activation per time step alive for the
    whole caption. ``grid_proj (B, N, A)``, ``hidden_proj (B * K, A)`` with the K rows of an
    image adjacent (K = 1 in training, the beam size in beam search), ``weight (A,)`` ->
    ``(B * K, N)``; the score layer's bias is added by the caller. Matrix products rather
    than broadcasts, so that FlopCounterMode counts what ``nn.Linear`` would.
    """

    @staticmethod
    def forward(ctx, grid_proj, hidden_proj, weight):
        grid_proj, hidden_proj = grid_proj.contiguous(), hidden_proj.contiguous()
        ctx.save_for_backward(grid_proj, hidden_proj, weight)
        return _additive_scores(grid_proj, hidden_proj, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grid_proj, hidden_proj, weight = ctx.saved_tensors
        B, N, A = grid_proj.shape
        K = hidden_proj.shape[0] // max(B, 1)
        grad = grad.contiguous().to(grid_proj.dtype).view(B, K, N)
        hidden, w = hidden_proj.view(B, K, A), weight.to(grid_proj.dtype).view(1, A)
        d_grid = torch.empty_like(grid_proj) if ctx.needs_input_grad[0] else None
        d_hidden = torch.empty_like(hidden)
        d_weight = grid_proj.new_zeros(A, 1)
        for rows in _row_blocks(B, K * N * A, grid_proj.device):
            x = grid_proj[rows].unsqueeze(1) + hidden[rows].unsqueeze(2)  # relu's input
            g_rows = grad[rows].reshape(-1, 1)  # (b * K * N, 1)
            g = torch.mm(g_rows, w).view(x.shape)  # gradient at relu's output
            g = torch.ops.aten.threshold_backward(g, x, 0)  # as autograd's relu: 0 where x <= 0
            if d_grid is not None:
                torch.sum(g, 1, out=d_grid[rows])
            torch.sum(g, 2, out=d_hidden[rows])
            d_weight = torch.addmm(d_weight, x.relu_().view(-1, A).t(), g_rows)
        return d_grid, d_hidden.view(B * K, A), d_weight.view(-1).to(weight.dtype)


class AdditiveAttention(nn.Module):
    """Bahdanau-style soft attention. ``grid_proj (B, N, A)`` is precomputed once per image."""

    def __init__(self, grid_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.grid_proj = nn.Linear(grid_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, grid, grid_proj, h):
        """Soft attention of ``h (B * K, H)`` over its image's grid: ``(context, alpha)``.

        ``grid (B, N, D)``, ``grid_proj (B, N, A)``; the K adjacent rows of ``h`` share an
        image (K = 1 in training, the beams in beam search). Returns ``context (B * K, D)``
        and ``alpha (B * K, N)``.
        """
        B, N, D = grid.shape
        K = h.shape[0] // max(B, 1)
        hidden_proj = self.hidden_proj(h).to(grid_proj.dtype)
        A = grid_proj.shape[2]
        if grid_proj.device.type == "cpu" and B * K * N * A > CPU_BLOCK_ELEMENTS:
            # several cache-sized blocks; uses score's parameters, not its forward (hooks)
            e = AdditiveScores.apply(grid_proj, hidden_proj, self.score.weight.view(-1))
            e = e + self.score.bias
        else:  # fits in one block (small models), or an accelerator: no cache to fit
            x = torch.relu(grid_proj.unsqueeze(1) + hidden_proj.view(B, K, 1, A))
            e = self.score(x).view(B * K, N)
        alpha = torch.softmax(e, dim=1)
        return torch.bmm(alpha.view(B, K, N), grid).view(B * K, D), alpha


_NO_COMPILE = ("its forward runs only the rows still inside their caption, a number that "
               "changes with every batch, so torch.compile would re-specialise and recompile "
               "the unrolled loop again and again")


@register_decoder("attn_lstm", aliases=("show_attend_tell", "sat"),
                  unsupported={"compile": _NO_COMPILE})
class ShowAttendTellDecoder(CaptionDecoder):
    """Soft-attention LSTM with gate beta and doubly stochastic regularisation (Xu et al. 2015)."""

    static_state = ("grid", "grid_proj")

    def __init__(
        self,
        vocab_size: int,
        grid_dim: int,
        pooled_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.5,
        attention_regularization: float = 1.0,
    ) -> None:
        super().__init__(vocab_size, grid_dim, pooled_dim)
        self.attention_regularization = attention_regularization
        self.num_layers = num_layers
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.attention = AdditiveAttention(grid_dim, hidden_dim, attention_dim)
        self.f_beta = nn.Linear(hidden_dim, grid_dim)
        self.init_h = nn.Linear(grid_dim, num_layers * hidden_dim)
        self.init_c = nn.Linear(grid_dim, num_layers * hidden_dim)
        self.cells = nn.ModuleList(
            nn.LSTMCell(embed_dim + grid_dim if i == 0 else hidden_dim, hidden_dim)
            for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, vocab_size)
        self.hidden_dim = hidden_dim

    def init_state(self, grid, pooled) -> State:
        mean = grid.mean(dim=1)
        shape = (grid.shape[0], self.num_layers, self.hidden_dim)
        return {
            "h": torch.tanh(self.init_h(mean)).view(shape),
            "c": torch.tanh(self.init_c(mean)).view(shape),
            "grid": grid,
            "grid_proj": self.attention.grid_proj(grid),  # once per image, not per step
        }

    def _cell(self, emb, state: State):
        """One time step for all rows of ``state``: returns (top hidden (B, H), alpha, h, c)."""
        h, c = state["h"], state["c"]
        context, alpha = self.attention(state["grid"], state["grid_proj"], h[:, -1])
        context = torch.sigmoid(self.f_beta(h[:, -1])) * context
        x = torch.cat([emb, context], dim=1)
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            hi, ci = cell(x, (h[:, i], c[:, i]))
            hs.append(hi)
            cs.append(ci)
            x = self.dropout(hi) if i + 1 < self.num_layers else hi
        return x, alpha, torch.stack(hs, 1), torch.stack(cs, 1)

    def forward(self, grid, pooled, tokens, lengths) -> DecoderOutput:
        # Sort by length so that step t only runs the rows still inside their caption: padded
        # positions cost no compute (as in sgrvinod's Show-Attend-Tell tutorial). Rows that
        # finished never come back, so the state simply shrinks to the first bt rows (every
        # entry, static ones included: in training each image has one row, K = 1).
        lengths, order = lengths.sort(descending=True)
        grid, tokens = grid[order], tokens[order]
        B, T = tokens.shape
        state = self.init_state(grid, pooled[order])
        emb = self.dropout(self.embed(tokens))
        hidden = grid.new_zeros(B, T, self.hidden_dim)
        alphas = grid.new_zeros(B, T, grid.shape[1])
        counts = (lengths.unsqueeze(0) > torch.arange(T, device=lengths.device)[:, None]).sum(1)
        for t, bt in enumerate(counts.tolist()):
            if bt == 0:
                break
            if bt < state["h"].shape[0]:
                state = {k: v[:bt] for k, v in state.items()}
            out, alpha, state["h"], state["c"] = self._cell(emb[:bt, t], state)
            hidden[:bt, t] = out
            alphas[:bt, t] = alpha
        logits = self.fc(self.dropout(hidden))  # one vocabulary projection for all steps
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B, device=order.device)
        return DecoderOutput(logits[inverse], alphas[inverse])

    def step(self, tokens, state):
        out, alpha, h, c = self._cell(self.embed(tokens), state)
        new = dict(state, h=h, c=c, alpha=alpha)
        return self.fc(out), new
