"""CLIP-S and RefCLIP-S (Hessel et al., EMNLP 2021), and PAC-S and RefPAC-S (Sarto et al.,
CVPR 2023), computed as their reference code computes them.

Our own code, because no maintained package computes the paper's metric: ``torchmetrics``'
``CLIPScore`` reports ``100 * cos`` without the prompt, clamps after averaging and defaults to
ViT-L/14, so its numbers are not comparable with published CLIP-S. The reference is
``clipscore.py`` of jmhessel/clipscore (and ``evaluation/pac_score/pac_score.py`` plus
``compute_metrics.py`` of aimagelab/pacscore, the same computation). Per image:

* the image: OpenAI's CLIP ViT-B/32 (QuickGELU), bicubic resize of the short side to 224,
  centre crop 224, CLIP's mean and std (open_clip's own eval transform for these weights);
* the texts: :data:`PROMPT` before each caption, CLIP's BPE tokenizer, truncated to
  :data:`CONTEXT_LENGTH` tokens with the end token kept last (``clip.tokenize(...,
  truncate=True)``; open_clip's tokenizer does the same);
* embeddings L2-normalised; ``CLIP-S = w * max(cos(image, candidate), 0)`` with
  :data:`CLIP_W` = 2.5 (PAC-S: :data:`PACS_W` = 2.0 and the PAC-S checkpoint);
* ``RefCLIP-S`` = the harmonic mean ``2ab / (a + b)`` of that CLIP-S (``a``) and the largest
  cosine between the candidate and its references (``b``, not clamped), references carrying
  the prompt too.

The corpus score is the mean over images. Two deviations, neither changing a number for RGB or
greyscale images (all of COCO and Flickr): images are decoded to RGB before the resize (the
reference converts after the crop; a palette image can differ), and the model runs in fp32 on
every device (the reference runs fp16 on CUDA, which moves the fourth digit).
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from benchmark.errors import CapbenchError
from benchmark.imagefile import open_rgb
from benchmark.metrics.registry import MetricFamily, MetricOptions, ScoreResult, ScoringInput, register_family
from benchmark.paths import cache_root
from benchmark.tokenization import hub_offline_reason

#: the prompt both papers put before every caption and reference
PROMPT = "A photo depicts "
#: CLIP's text context: longer token sequences are cut, keeping the end token last
CONTEXT_LENGTH = 77
#: CLIP-S's rescaling weight w (Hessel et al., Sec. 3)
CLIP_W = 2.5
#: PAC-S's weight w (aimagelab/pacscore ``compute_metrics.py``)
PACS_W = 2.0
#: open_clip's name of OpenAI's ViT-B/32 architecture (QuickGELU activations)
MODEL_NAME = "ViT-B-32-quickgelu"
#: where open_clip's ``pretrained="openai"`` weights come from on the Hugging Face hub
OPENAI_HUB_REPO = "timm/vit_base_patch32_clip_224.openai"
OPENAI_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: keys of OpenAI's state dicts that are settings, not tensors of the model
_SETTING_KEYS = ("input_resolution", "context_length", "vocab_size")

__all__ = ["PROMPT", "CONTEXT_LENGTH", "CLIP_W", "PACS_W", "MODEL_NAME", "MetricUnavailable",
           "ClipModel", "clip_s", "best_reference_cosine", "harmonic_mean", "tokenize",
           "load_clip", "image_embeddings", "text_embeddings", "score_clip_family"]


class MetricUnavailable(CapbenchError):
    """A model-based metric cannot run here; the message says why and what to do."""


# ------------------------------------------------------------------------------ formulas
def clip_s(image: torch.Tensor, candidate: torch.Tensor, w: float = CLIP_W) -> torch.Tensor:
    """Per-image CLIP-S ``w * max(cos, 0)`` of L2-normalised embeddings ``image (N, D)`` and
    ``candidate (N, D)`` -> ``(N,)``; ``w`` 2.5 for CLIP-S, 2.0 for PAC-S."""
    return w * torch.clamp((image * candidate).sum(dim=1), min=0)


def best_reference_cosine(candidate: torch.Tensor, references: list[torch.Tensor]) -> torch.Tensor:
    """Per image, the largest cosine between the normalised ``candidate (N, D)`` and its
    normalised references ``references[i] (k_i, D)`` -> ``(N,)`` (not clamped, as in the
    reference code)."""
    return torch.stack([(refs @ cand).max() for cand, refs in zip(candidate, references,
                                                                    strict=True)])


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2ab / (a + b)`` elementwise: RefCLIP-S from CLIP-S ``a (N,)`` and the best reference
    cosine ``b (N,)`` (NaN where both are 0, as in the reference code)."""
    return 2 * a * b / (a + b)


# ------------------------------------------------------------------------------ the model
@dataclass
class ClipModel:
    """A loaded CLIP: ``model`` (open_clip ``CLIP``, eval mode, fp32), its eval image
    ``preprocess`` (PIL image -> ``(3, 224, 224)`` float tensor), ``tokenizer`` (open_clip's,
    77-token context), ``device`` and ``source`` (package, architecture and weights, for the
    record)."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    device: str
    source: str


def _cached_openai_file() -> str | None:
    from huggingface_hub import try_to_load_from_cache  # a dependency of open_clip

    for name in OPENAI_HUB_FILES:
        hit = try_to_load_from_cache(OPENAI_HUB_REPO, name)
        if isinstance(hit, str):
            return hit
    return None


def weights_problem(path: Path | None, flag: str) -> str | None:
    """Why CLIP weights cannot be had, without loading them: ``path`` (from ``flag``) is not a
    file, or (``path`` None) OpenAI's weights are neither in the Hugging Face cache nor
    downloadable now. None when they can."""
    if path is not None:
        return None if Path(path).is_file() else f"{flag} {path}: no such file"
    if _cached_openai_file():
        return None
    why = hub_offline_reason()
    if why is None:
        return None
    return (f"OpenAI's ViT-B/32 weights (open_clip {MODEL_NAME!r}, pretrained='openai': "
            f"hf-hub {OPENAI_HUB_REPO}/{OPENAI_HUB_FILES[1]}) are not in the Hugging Face cache "
            f"and cannot be downloaded ({why}): pass {flag} PATH to a local copy (OpenAI's "
            "ViT-B-32.pt or a state dict in its layout)")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's ``ViT-B-32.pt``): a zip holding
    ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _state_dict(path: Path) -> dict:
    """The tensors of a local weights file: OpenAI's TorchScript archive, a state dict, or a
    checkpoint holding one under ``state_dict`` (pacscore's), ``module.`` prefixes removed."""
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch.jit.load is deprecated, and the only reader
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise MetricUnavailable(f"{path}: holds no state dict of CLIP weights")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in _SETTING_KEYS}


def load_clip(path: Path | None, device: str = "cpu", flag: str = "--clip-weights") -> ClipModel:
    """OpenAI's CLIP ViT-B/32 in fp32 on ``device``: from the local weights file ``path``
    (loaded into open_clip's ``ViT-B-32-quickgelu``, strictly), or with ``path`` None
    open_clip's ``pretrained="openai"`` (its cache, else a download). The last two models
    loaded are kept.

    Raises MetricUnavailable naming the file and ``flag`` when the weights cannot be had or
    do not fit the architecture."""
    if why := weights_problem(path, flag):
        raise MetricUnavailable(why)
    return _load(Path(path).resolve() if path else None, device)


@lru_cache(maxsize=2)
def _load(path: Path | None, device: str) -> ClipModel:
    import open_clip  # heavy: imported only when a CLIP metric is scored

    try:
        if path is None:
            model = open_clip.create_model(MODEL_NAME, pretrained="openai")
            source = f"open_clip {open_clip.__version__} {MODEL_NAME} pretrained=openai"
        else:
            model = open_clip.create_model(MODEL_NAME)
            model.load_state_dict(_state_dict(Path(path)))
            source = f"open_clip {open_clip.__version__} {MODEL_NAME} weights={Path(path).name}"
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        where = path or f"hf-hub {OPENAI_HUB_REPO}"
        raise MetricUnavailable(f"{where}: cannot load CLIP ViT-B/32 weights "
                                f"({str(exc).splitlines()[0][:300]})") from exc
    preprocess = open_clip.image_transform(
        224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
        interpolation="bicubic", resize_mode="shortest")
    tokenizer = open_clip.get_tokenizer(MODEL_NAME, context_length=CONTEXT_LENGTH)
    return ClipModel(model.float().eval().to(device), preprocess, tokenizer, device, source)


# -------------------------------------------------------------------------- embeddings
def tokenize(clip: ClipModel, texts: list[str]) -> torch.Tensor:
    """:data:`PROMPT` + each text as CLIP token ids ``(N, 77)`` (long): start token, BPE ids,
    end token, zero padding; a longer text is cut to 77 with the end token last."""
    return clip.tokenizer([PROMPT + t for t in texts])


@torch.no_grad()
def text_embeddings(clip: ClipModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings ``(N, 512)`` (fp32, CPU) of the prompted ``texts``."""
    out = [clip.model.encode_text(tokenize(clip, texts[i:i + batch_size]).to(clip.device))
           for i in range(0, len(texts), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out).float().cpu(), dim=1)


def _files_key(clip: ClipModel, paths: list[Path]) -> str:
    """A digest of the model's source and each file's path, size and modification time."""
    h = hashlib.sha256(clip.source.encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"\0{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def _encode_images(clip: ClipModel, paths: list[Path], batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([clip.preprocess(open_rgb(p)) for p in paths[i:i + batch_size]])
        out.append(clip.model.encode_image(pixels.to(clip.device)).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def image_embeddings(clip: ClipModel, paths: list[Path], cache_dir: Path | None = None,
                     batch_size: int = 64) -> torch.Tensor:
    """L2-normalised image embeddings ``(N, 512)`` of the image files ``paths``, encoded once
    per (image set, model) and kept under ``cache_dir`` (default
    ``<cache root>/metric-embeddings``; a changed file or other weights make a new entry).

    Raises DatasetError naming an image file that cannot be read."""
    folder = Path(cache_dir) if cache_dir else cache_root() / "metric-embeddings"
    entry = folder / f"clip-{_files_key(clip, paths)}.npy"
    if entry.is_file():
        cached = np.load(entry)
        if cached.shape[0] == len(paths):
            return torch.from_numpy(cached)
    emb = _encode_images(clip, paths, batch_size)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(".tmp.npy")
        np.save(tmp, emb.numpy())
        tmp.replace(entry)
    except OSError:
        pass  # a read-only cache costs time, never the score
    return emb


# ------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class _Variant:
    """CLIP-S/RefCLIP-S or PAC-S/RefPAC-S: the record keys, the weight w, which option holds the
    weights file and its flag."""

    plain: str
    ref: str
    w: float
    option: str
    flag: str


CLIP_VARIANT = _Variant("CLIP-S", "RefCLIP-S", CLIP_W, "clip_weights", "--clip-weights")
PACS_VARIANT = _Variant("PAC-S", "RefPAC-S", PACS_W, "pacs_weights", "--pacs-weights")


def score_clip_family(inp: ScoringInput, wanted: tuple[str, ...], variant: _Variant) -> ScoreResult:
    """CLIP-S and RefCLIP-S (or PAC-S and RefPAC-S) of ``inp`` as the module docstring defines
    them; per-image lists aligned with ``inp.ids``. Raises MetricUnavailable (weights) and
    DatasetError (an unreadable image); :func:`benchmark.metrics.score_captions` turns both into
    an unavailable metric."""
    clip = load_clip(getattr(inp.options, variant.option), inp.options.device, variant.flag)
    paths = [Path(inp.images[i]) for i in inp.ids]
    image = image_embeddings(clip, paths, inp.options.cache_dir)
    cand = text_embeddings(clip, [inp.predictions[i] for i in inp.ids])
    per = {variant.plain: clip_s(image, cand, variant.w)}
    if variant.ref in wanted:
        refs = [list(inp.references[i]) for i in inp.ids]
        flat = text_embeddings(clip, [r for rs in refs for r in rs])
        bounds = np.cumsum([0] + [len(rs) for rs in refs])
        best = best_reference_cosine(cand, [flat[a:b] for a, b in pairwise(bounds)])
        per[variant.ref] = harmonic_mean(per[variant.plain], best)
    out = ScoreResult(list(inp.ids), {})
    for name, values in per.items():
        if name in wanted:
            out.metrics[name] = float(values.double().mean())
            out.sources[name] = clip.source
            if inp.per_image:
                out.per_image[name] = [float(v) for v in values.double()]
    return out


def _status(variant: _Variant):
    def status(options: MetricOptions) -> dict[str, str | None]:
        path = getattr(options, variant.option)
        if variant is PACS_VARIANT and path is None:
            why = ("no PAC-S checkpoint: pass --pacs-weights PATH to aimagelab/pacscore's "
                   "checkpoints/clip_ViT-B-32.pth (or set $CAPBENCH_PACS_WEIGHTS)")
        else:
            why = weights_problem(path, variant.flag)
        return {variant.plain: why, variant.ref: why}
    return status


def _family(name: str, variant: _Variant, weights: str, order: int) -> MetricFamily:
    return MetricFamily(
        name=name, metrics=(variant.plain, variant.ref),
        score=lambda inp, wanted: score_clip_family(inp, wanted, variant),
        status=_status(variant), needs_images=True, weights=weights,
        mean_of_images=(variant.plain, variant.ref), wide_only=True, order=order)


CLIP = register_family(_family(
    "clip", CLIP_VARIANT, f"OpenAI CLIP ViT-B/32: --clip-weights PATH, else open_clip's "
    f"pretrained='openai' (hf-hub {OPENAI_HUB_REPO})", 10))
PACS = register_family(_family(
    "pacs", PACS_VARIANT, "the PAC-S checkpoint of aimagelab/pacscore (clip_ViT-B-32.pth): "
    "--pacs-weights PATH", 20))

