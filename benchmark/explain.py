"""Where a captioning model looks: per-word heatmaps by soft attention or Grad-CAM.

Two methods give, for every word of a generated caption, a map over the encoder's grid
``(N = h x w)`` normalised to sum 1:

* ``attention``: the model's own attention weights while it emits the word. ``attn_lstm``:
  the soft-attention ``alpha`` of Show, Attend and Tell (Xu et al. 2015, eq. 4-5), read by
  teacher-forcing the generated caption through ``forward`` (the same cell as ``step``, so the
  same weights). ``transformer``: the cross-attention weights ``softmax(q k^T / sqrt(d))`` of
  one layer (default the last), averaged over heads, computed from that layer's own query and
  key projections (Vaswani et al. 2017). ``rnn``/``lstm`` attend to nothing: an error says so.
* ``gradcam``: Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep
  Networks via Gradient-based Localization", ICCV, eq. 1-2) on the encoder's last spatial
  feature map ``A`` (ResNet: the last stage ``(C, h, w)``; ViT/CLIP: the last block's patch
  tokens on the patch grid; both are the encoder's ``grid`` output), z-scored with the run's
  train statistics as the decoder reads it (see :func:`gradcam_maps` for why). For word
  ``t`` with log-probability ``y_t``: ``w_k = mean_ij dy_t/dA^k_ij``, map
  ``= ReLU(sum_k w_k A^k)``. The live encoder runs on the pixels, and the caption is
  teacher-forced through ``forward``.

Maps are drawn over the original image: a grid cell covers the part of the image that the
encoder's preprocessing (resize + centre crop) turned into that cell, found by pushing
coordinate ramps through the transform (:func:`crop_geometry`), so it is right for any
encoder and image size; what the crop cut away gets zero. The figure follows the layout of
sgrvinod's "a PyTorch Tutorial to Image Captioning" ``visualize_att``: the image, then one
panel per word, the word as its title.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from architectures.encoders import TorchvisionResNet
from benchmark.checkpoint import LoadedRun, load_run
from benchmark.errors import CapbenchError, DatasetError, StorageError
from benchmark.imagefile import open_rgb

METHODS = ("attention", "gradcam")

__all__ = ["METHODS", "ExplainError", "Explanation", "crop_geometry", "upsample_map",
           "attention_maps", "transformer_cross_attention", "gradcam_maps", "explain_image",
           "render_explanation", "render_strip", "open_image", "check_method",
           "SavedExplanation", "explain_saved_run"]


class ExplainError(CapbenchError):
    """A heatmap cannot be computed for this run and method (the message says why and what
    to use instead)."""


def check_method(method: str) -> None:
    """Raises ExplainError unless ``method`` is one of :data:`METHODS` (``attention``,
    ``gradcam``); the message names ``--method`` as ``capbench explain`` takes it."""
    if method not in METHODS:
        raise ExplainError(f"--method {method!r}: choose {' or '.join(METHODS)}")


def open_image(path: str | Path) -> Image.Image:
    """The 8-bit RGB image at ``path``; raises DatasetError naming the file when it is
    missing, not a regular file, or not an image Pillow can read
    (:func:`benchmark.imagefile.open_rgb`)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DatasetError(f"image {path} does not exist")
    return open_rgb(path)


# ---------------------------------------------------------------------------- geometry
def crop_geometry(transform, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the encoder input sits on an image of ``size = (W, H)`` pixels.

    Returns ``(x0, x1, y0, y1)`` in image pixels (continuous; pixel ``i`` spans ``[i, i+1)``):
    the left/right/top/bottom edges of the region that ``transform`` (e.g. resize 256 +
    centre crop 224) maps onto its output. Found by transforming a black, a white and a
    coordinate-ramp image and fitting the output's ramp values linearly (interior pixels), so
    it needs no knowledge of the transform's type.
    """
    W, H = size
    black = transform(Image.new("RGB", (W, H), (0, 0, 0))).float()
    white = transform(Image.new("RGB", (W, H), (255, 255, 255))).float()
    xs = torch.tensor([round(255 * (i + 0.5) / W) for i in range(W)], dtype=torch.uint8)
    ys = torch.tensor([round(255 * (j + 0.5) / H) for j in range(H)], dtype=torch.uint8)
    ramp = torch.zeros(H, W, 3, dtype=torch.uint8)
    ramp[..., 0] = xs[None, :]
    ramp[..., 1] = ys[:, None]
    out = transform(Image.fromarray(ramp.numpy(), "RGB")).float()
    frac = (out - black) / (white - black)  # value / 255 of the source pixel, (3, h, w)
    edges = []
    for channel, other_dim, extent in ((0, 0, W), (1, 1, H)):
        prof = frac[channel].mean(dim=other_dim)  # x: average over rows; y: over columns
        n = prof.numel()
        u = torch.arange(n, dtype=torch.float64) + 0.5
        keep = slice(2, n - 2) if n > 8 else slice(0, n)
        x = prof.double()[keep] * extent
        A = torch.stack([torch.ones_like(u[keep]), u[keep]], 1)
        a, b = torch.linalg.lstsq(A, x.unsqueeze(1)).solution.squeeze(1).tolist()
        edges.append((a, a + b * n))
    (x0, x1), (y0, y1) = edges
    return x0, x1, y0, y1


def grid_shape(n: int) -> tuple[int, int]:
    """``(h, w)`` of a square grid of ``n`` tokens (49 -> 7x7, 196 -> 14x14); ExplainError
    when ``n`` is not a square."""
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise ExplainError(f"the encoder's grid has {n} tokens, not a square patch grid; heatmaps "
                           "need an h x w grid")
    return s, s


def upsample_map(maps: torch.Tensor, geometry: tuple[float, float, float, float],
                 size: tuple[int, int]) -> torch.Tensor:
    """Grid maps ``(T, h, w)`` -> image maps ``(T, H, W)`` for an image of ``size = (W, H)``.

    Bilinear over the region ``geometry`` (see :func:`crop_geometry`) that the grid covers,
    zero outside it. Values keep the grid's scale (no renormalisation).
    """
    W, H = size
    x0, x1, y0, y1 = geometry
    xs = (torch.arange(W, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    ys = (torch.arange(H, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    sample = torch.stack([gx, gy], -1).unsqueeze(0).expand(maps.shape[0], H, W, 2)
    up = F.grid_sample(maps.float().unsqueeze(1), sample, mode="bilinear",
                       padding_mode="border", align_corners=False).squeeze(1)
    inside = (gx.abs() <= 1) & (gy.abs() <= 1)
    return up * inside


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Rows of ``maps (T, N)`` scaled to sum 1; an all-zero row stays zero."""
    s = maps.sum(-1, keepdim=True)
    return torch.where(s > 0, maps / s.clamp_min(1e-30), torch.zeros_like(maps))


# ---------------------------------------------------------------------------- attention
def _teacher_tokens(ids: list[int], bos_id: int, rows: int = 1):
    """Inputs ``<bos> w1 .. w_{T-1}`` ``(rows, T)`` and lengths ``(rows,)`` that make the
    decoder predict ``w1 .. wT`` at positions ``0 .. T-1``."""
    tokens = torch.tensor([[bos_id, *ids[:-1]]], dtype=torch.long).expand(rows, -1).contiguous()
    return tokens, torch.full((rows,), len(ids), dtype=torch.long)


def transformer_cross_attention(decoder, grid: torch.Tensor, pooled: torch.Tensor,
                                tokens: torch.Tensor, lengths: torch.Tensor,
                                layer: int = -1) -> torch.Tensor:
    """Per-head cross-attention weights ``(B, heads, T, N)`` of transformer layer ``layer``
    for teacher-forced ``tokens (B, T)`` over the normalised ``grid (B, N, D)``.

    The layer's query is captured with a forward hook on its ``cross_q`` projection during an
    ordinary ``forward``; the keys are ``layer.memory_kv`` of the projected grid; weights are
    ``softmax(q k^T / sqrt(d_head))``, what ``F.scaled_dot_product_attention`` applies inside
    the layer (dropout is off in eval mode). The decoder is not modified.
    """
    layers = decoder.layers
    if not -len(layers) <= layer < len(layers):
        raise ExplainError(f"--layer {layer}: the transformer has {len(layers)} layers "
                           f"(use 0..{len(layers) - 1}, or -1 for the last)")
    target = layers[layer]
    seen = {}
    hook = target.cross_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    try:
        decoder(grid, pooled, tokens, lengths)
    finally:
        hook.remove()
    q = target._heads(seen["q"])  # (B, h, T, d)
    k, _ = target.memory_kv(decoder.visual(grid))  # (B, h, N, d)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


@torch.no_grad()
def attention_maps(run: LoadedRun, grid: torch.Tensor, pooled: torch.Tensor, ids: list[int],
                   layer: int = -1) -> torch.Tensor:
    """Attention maps ``(T, N)`` (each row sums to 1) of the caption ``ids`` (T words) over
    raw features ``grid (1, N, D)``, ``pooled (1, P)``.

    Raises ExplainError for decoders without attention over the grid (``rnn``, ``lstm``),
    suggesting Grad-CAM, and for a ``layer`` the transformer lacks.
    """
    if not ids:
        return torch.zeros(0, grid.shape[1])
    g, p = run.normalize(grid.to(run.device), pooled.to(run.device))
    tokens, lengths = _teacher_tokens(ids, run.tokenizer.bos_id)
    tokens, lengths = tokens.to(run.device), lengths.to(run.device)
    dec = run.decoder
    if hasattr(dec, "layers") and all(hasattr(x, "cross_q") for x in dec.layers):
        maps = transformer_cross_attention(dec, g, p, tokens, lengths, layer)[0].mean(0)
    else:
        out = dec(g, p, tokens, lengths)
        if out.attention is None:
            raise ExplainError(f"decoder {run.arch} has no attention over the image: it sees one "
                               "pooled vector. Use --method gradcam")
        maps = out.attention[0]
    return maps[: len(ids)].float().cpu()


# ---------------------------------------------------------------------------- Grad-CAM
def gradcam_maps(run: LoadedRun, grid: torch.Tensor, pooled: torch.Tensor,
                 ids: list[int]) -> torch.Tensor:
    """Grad-CAM maps ``(T, N)`` (rows normalised to sum 1; a row whose ReLU map is all zero
    stays zero) for each word of the caption ``ids`` over raw encoder features ``grid (1, N,
    D)``, ``pooled (1, P)``.

    The feature map ``A`` is the encoder's grid as the decoder reads it: z-scored per channel
    with the run's train statistics, ``A_k = (grid_k - mu_k) / sigma_k`` (the raw grid when the
    run did not normalise). Grad-CAM is not invariant to a per-channel offset: on the raw grid
    of a random-init ResNet (channel means far from 0, std ~20) ``sum_k w_k A^k`` is dominated
    by the position-independent ``sum_k w_k mu_k`` and comes out one sign everywhere, which the
    ReLU turns into a blank or a flat map. ``dy/dA_k = sigma_k dy/dgrid_k``, so this is the
    paper's formula applied to the decoder's input.

    One backward pass: the image is repeated T times and row t's objective is the
    log-probability of word t, so row t's gradient is word t's. For ResNet the pooled vector
    is the grid's mean and is recomputed from ``A`` (pooled-only decoders get their gradient
    through it); for ViT/CLIP it is the CLS token, which does not depend on the final patch
    tokens. Raises ExplainError when no word has any gradient w.r.t. ``A`` (a pooled-only
    decoder on a ViT/CLIP encoder).
    """
    T = len(ids)
    if T == 0:
        return torch.zeros(0, grid.shape[1])
    # clones: features made under inference_mode cannot enter an autograd graph
    grid, pooled = grid.to(run.device).float().clone(), pooled.to(run.device).float().clone()
    g0, p0 = run.normalize(grid, pooled)
    A = g0.expand(T, -1, -1).clone().requires_grad_(True)
    st = run.feature_stats
    with torch.enable_grad():
        if isinstance(run.encoder, TorchvisionResNet):
            raw = st.invert_grid(A) if st is not None else A
            _, p = run.normalize(raw, raw.mean(dim=1))
        else:
            p = p0.expand(T, -1)
        tokens, lengths = _teacher_tokens(ids, run.tokenizer.bos_id, rows=T)
        logits = run.decoder(A, p, tokens.to(run.device), lengths.to(run.device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (T, T, V)
        rows = torch.arange(T, device=logp.device)
        objective = logp[rows, rows, torch.tensor(ids, device=logp.device)].sum()
        (grad,) = torch.autograd.grad(objective, A, allow_unused=True)
    if grad is None or not bool(grad.abs().sum() > 0):
        raise ExplainError(f"Grad-CAM is undefined here: the {run.arch} decoder's output does not "
                           f"depend on {run.encoder.name}'s final patch tokens (it reads only the "
                           "CLS/pooled vector). Use a ResNet encoder or an attention decoder")
    weights = grad.mean(dim=1, keepdim=True)  # (T, 1, D): w_k = spatial mean of dy/dA^k
    cam = torch.relu((weights * A.detach()).sum(-1))  # (T, N)
    return _normalise(cam).cpu()


# ---------------------------------------------------------------------------- both
@dataclass
class Explanation:
    """Per-word heatmaps of one image.

    ``image``: the RGB image; ``ids``/``words``: the generated caption (T words);
    ``grid_hw``: ``(h, w)`` of the encoder grid; ``maps``: method -> ``(T, N)`` rows summing to
    1 (Grad-CAM rows may be all zero); ``geometry``: :func:`crop_geometry` of the image;
    ``seconds``: method -> seconds spent computing its maps.
    """

    image: Image.Image
    ids: list[int]
    words: list[str]
    grid_hw: tuple[int, int]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    geometry: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return " ".join(self.words)

    def peaks(self, method: str) -> list[tuple[float, float] | None]:
        """Per word, the image point ``(x, y)`` (pixels) of its map's maximum: the centre of
        the arg-max grid cell, mapped through :attr:`geometry` (None for an all-zero map).

        This is where the bilinear upsampling (:meth:`upsampled`) peaks; taking the cell
        centre avoids the flat plateau that border cells have in the upsampled map."""
        h, w = self.grid_hw
        x0, x1, y0, y1 = self.geometry
        out = []
        for row in self.maps[method]:
            if not bool(row.max() > 0):
                out.append(None)
                continue
            i, j = divmod(int(row.argmax()), w)
            out.append((x0 + (x1 - x0) * (j + 0.5) / w - 0.5, y0 + (y1 - y0) * (i + 0.5) / h - 0.5))
        return out

    def upsampled(self, method: str) -> torch.Tensor:
        """``(T, H, W)`` maps of ``method`` over the image's pixels (see :func:`upsample_map`)."""
        h, w = self.grid_hw
        m = self.maps[method]
        return upsample_map(m.view(-1, h, w), self.geometry, self.image.size)


def explain_image(run: LoadedRun, image: Image.Image, methods=("attention",), *, layer: int = -1,
                  ids: list[int] | None = None, unavailable: dict | None = None) -> Explanation:
    """Caption ``image`` (an RGB PIL image) with the run's decoding settings (or use the given
    caption ``ids``) and compute each method's per-word maps.

    Raises ExplainError for an unknown method, an attention method on a decoder without
    attention, or Grad-CAM without gradient (see :func:`gradcam_maps`). With an
    ``unavailable`` dict, a method that raises ExplainError is skipped instead and its reason
    stored there (method -> message).
    """
    for m in methods:
        check_method(m)
    pixels = run.preprocess(image).unsqueeze(0)
    grid, pooled = run.raw_features(pixels)
    if ids is None:
        ids = run.caption_ids(grid, pooled)[0]
    ex = Explanation(image, list(ids), run.tokenizer.pieces(ids), grid_shape(grid.shape[1]),
                     geometry=crop_geometry(run.encoder.transform, image.size))
    for m in methods:
        t0 = time.perf_counter()
        fn = gradcam_maps if m == "gradcam" else (
            lambda *a: attention_maps(*a, layer=layer))
        try:
            ex.maps[m] = fn(run, grid, pooled, ex.ids)
        except ExplainError as exc:
            if unavailable is None:
                raise
            unavailable[m] = str(exc)
            continue
        ex.seconds[m] = time.perf_counter() - t0
    return ex


def render_explanation(ex: Explanation, method: str, path: str | Path, *, title: str = "",
                       columns: int = 5) -> Path:
    """Write a PNG: the image, then one panel per word with its ``method`` heatmap upsampled to
    the image and overlaid (sgrvinod's ``visualize_att`` layout; the word as each panel's
    title). Each panel's map is scaled to its own maximum; image parts the encoder's crop
    never saw are left uncovered. Matplotlib's Agg backend; returns
    ``path``. Raises OSError when ``path`` cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    maps = ex.upsampled(method).numpy()
    h, w = ex.grid_hw
    outside = upsample_map(torch.ones(1, h, w), ex.geometry, ex.image.size)[0].numpy() <= 0
    n = 1 + len(ex.words)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + 0.5), squeeze=False)
    img = np.asarray(ex.image)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=11)
    for i, word in enumerate(ex.words, start=1):
        ax = axes.flat[i]
        ax.imshow(img)
        m = maps[i - 1]
        peak = m.max()
        shown = np.ma.masked_where(outside, m / peak if peak > 0 else m)  # the crop cut it away
        ax.imshow(shown, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(word, fontsize=12)
    fig.suptitle(title or f"{method}: {ex.caption}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class SavedExplanation:
    """What ``capbench explain`` made: the loaded ``run``, its :class:`Explanation`, the PNG
    written at ``path``, and ``seconds`` (wall seconds of captioning, the maps and the figure,
    after the model was loaded)."""

    run: LoadedRun
    explanation: Explanation
    path: Path
    seconds: float


def explain_saved_run(image: Path, run: str, results_dir: Path, method: str = "attention", *,
                      out: Path = Path("explain"), layer: int = -1, beam_size: int | None = None,
                      max_len: int | None = None,
                      encoder_weights: Path | None = None) -> SavedExplanation:
    """``capbench explain``: caption the file ``image`` with a saved run and write one PNG of
    ``method``'s per-word maps (:func:`render_explanation`) as ``out/<image stem>-<method>.png``.

    Args:
        image: the image file.
        run: a run id, a unique prefix/suffix of one, a checkpoint folder, or ``latest``.
        results_dir: the folder holding ``runs/`` and ``checkpoints/``.
        method: ``attention`` (attn_lstm, transformer) or ``gradcam`` (any decoder).
        out: the folder for the PNG.
        layer: the transformer's cross-attention layer (-1 = last).
        beam_size: overrides the run's beam size.
        max_len: overrides the run's maximum caption length (words).
        encoder_weights: the encoder weights file, if it moved since training.

    Returns:
        :class:`SavedExplanation`: the loaded run, the :class:`Explanation` (per-word maps
        ``(T, N)``), the PNG's path and the seconds taken after loading the model.

    Raises:
        ExplainError: ``method`` is not one of :data:`METHODS` (checked before anything is
            read), or it cannot explain this run (:func:`explain_image`).
        DatasetError: ``image`` is missing or unreadable (:func:`open_image`).
        RecordError, CheckpointError, ConfigError: as :func:`benchmark.checkpoint.load_run`.
        StorageError: the PNG cannot be written under ``out``.
    """
    check_method(method)
    picture = open_image(image)
    loaded = load_run(run, results_dir, beam_size=beam_size, max_len=max_len,
                      encoder_weights=str(encoder_weights) if encoder_weights else None)
    t0 = time.perf_counter()
    ex = explain_image(loaded, picture, [method], layer=layer)
    path = out / f"{image.stem}-{method}.png"
    try:
        render_explanation(ex, method, path, title=f"{method} ({loaded.arch} on "
                           f"{loaded.encoder.name}): {ex.caption}")
    except OSError as exc:
        raise StorageError(f"cannot write {path} (--out {out}): {exc.strerror or exc}") from exc
    return SavedExplanation(loaded, ex, path, time.perf_counter() - t0)


def render_strip(ex: Explanation, method: str = "attention", *, panel: int = 64,
                 max_words: int = 16) -> Image.Image:
    """A compact strip for a gallery row: one ``panel``-pixel square per word (at most
    ``max_words``), the image with the word's ``method`` heatmap overlaid (jet colormap, each
    map scaled to its own maximum, alpha 0.5; what the encoder's crop cut away left
    uncovered) and the word written under it. Returns an RGB PIL image of height
    ``panel + 14`` pixels; KeyError when ``ex`` has no maps for ``method``."""
    import matplotlib
    import numpy as np
    from PIL import ImageDraw

    words = ex.words[:max_words]
    maps = ex.maps[method][: len(words)]
    h, w = ex.grid_hw
    small = ex.image.convert("RGB").resize((panel, panel), Image.BILINEAR)
    base = np.asarray(small, dtype=np.float32) / 255.0
    # the maps over the image, then shrunk to the panel (the crop's geometry is in image pixels)
    up = upsample_map(maps.view(-1, h, w), ex.geometry, ex.image.size)
    inside = upsample_map(torch.ones(1, h, w), ex.geometry, ex.image.size) > 0
    up = F.interpolate(up.unsqueeze(1), size=(panel, panel), mode="bilinear",
                       align_corners=False).squeeze(1)
    inside = F.interpolate(inside.float().unsqueeze(1), size=(panel, panel),
                           mode="nearest").squeeze(1)[0].numpy() > 0
    cmap = matplotlib.colormaps["jet"]
    label = 14
    strip = Image.new("RGB", (max(1, len(words)) * panel, panel + label), "white")
    draw = ImageDraw.Draw(strip)
    for i, word in enumerate(words):
        m = up[i].numpy()
        peak = m.max()
        heat = cmap(m / peak if peak > 0 else m)[..., :3]
        alpha = np.where(inside, 0.5, 0.0)[..., None]
        mixed = (base * (1 - alpha) + heat * alpha) * 255
        strip.paste(Image.fromarray(mixed.clip(0, 255).astype(np.uint8)), (i * panel, 0))
        text = word if draw.textlength(word) <= panel - 2 else word[: max(1, panel // 7)] + "."
        draw.text((i * panel + panel / 2, panel + 1), text, fill="black", anchor="ma")
    return strip
