"""Image encoders: torchvision ResNet, timm ViT and open_clip CLIP image towers.

Every encoder maps a batch of preprocessed pixels ``(B, 3, H, W)`` to

* ``grid``: spatial/patch features ``(B, N, grid_dim)`` that attention decoders attend over, and
* ``pooled``: one global vector ``(B, pooled_dim)`` for decoders that see a single feature.

Each brings the preprocessing of its own library (torchvision's weight transforms, timm's
``resolve_model_data_config`` + ``create_transform``, open_clip's ``create_model_and_transforms``)
and is frozen by default. Pretrained weights load the library's standard way (its cache, or
the internet); ``weights=PATH`` loads a local checkpoint; ``pretrained=False`` gives a seeded
random initialisation, which is what offline machines and the tests use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from architectures.errors import ArchitectureError, EncoderWeightsError
from architectures.registry import get_entry, register_encoder

__all__ = ["ImageEncoder", "EncoderWeightsError", "load_local_weights",
           "grad_checkpointing_unsupported"]

_NO_CHECKPOINTING = ("torchvision's ResNet has no gradient checkpointing of its own, and "
                     "recomputing its batch-norm layers in train mode would update their "
                     "running statistics twice; fine-tune it without gradient checkpointing")


def grad_checkpointing_unsupported(name: str) -> str | None:
    """Why encoder ``name`` cannot fine-tune with gradient checkpointing (None when it can);
    cheap, nothing is built."""
    return get_entry("encoder", name).why_not("grad_checkpointing")


def _stable_repr(obj: object) -> str:
    """``repr`` without memory addresses, so that it can be part of a cache key."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(obj))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_local_weights(module: nn.Module, path: str | Path, *, strict: bool = False) -> None:
    """Load a ``.safetensors``/``.pt``/``.pth``/``.bin`` state dict from ``path`` into ``module``.

    Keys of a full classifier checkpoint that the feature extractor lacks (e.g. ``fc.*``) are
    ignored; missing feature-extractor keys raise :class:`EncoderWeightsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"weights file {path} does not exist (check --weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise EncoderWeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(
            f"weights file {path} holds a {type(state).__name__}, not a state dict "
            "(a mapping of parameter names to tensors): save it with "
            "torch.save(model.state_dict(), PATH) or safetensors")
    own = module.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise EncoderWeightsError(
                f"weights file {path} does not fit this encoder: {name} has shape "
                f"{tuple(tensor.shape)} in the file but {tuple(own[name].shape)} in the model "
                "(is it the checkpoint of another architecture?)")
    result = module.load_state_dict(state, strict=strict)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise EncoderWeightsError(
            f"weights file {path} does not fit this encoder: {len(result.missing_keys)} "
            f"parameters missing (e.g. {shown})"
        )


def _offline_error(name: str, wanted: str, exc: Exception) -> EncoderWeightsError:
    return EncoderWeightsError(
        f"could not load pretrained weights for encoder {name!r}: wanted {wanted} "
        f"({type(exc).__name__}: {exc}). Put the file in that cache, pass --weights PATH to a "
        "local copy, or run with --no-pretrained for a random initialisation."
    )


class ImageEncoder(nn.Module):
    """Base class: a frozen image backbone plus its preprocessing.

    Subclasses implement :meth:`forward_features`. Attributes: ``name``, ``grid_dim`` (D of the
    grid), ``grid_size`` (N tokens), ``pooled_dim``, ``transform`` (PIL image -> ``(3, H, W)``
    float tensor) and ``weights_id`` (what was loaded: pretrained tag, file digest or
    ``random-init:seed=S``), which with the transform forms the feature-cache key.
    """

    def __init__(
        self,
        name: str,
        transform: Callable,
        grid_dim: int,
        grid_size: int,
        pooled_dim: int,
        weights_id: str,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        self.name = name
        self.transform = transform
        self.grid_dim = grid_dim
        self.grid_size = grid_size
        self.pooled_dim = pooled_dim
        self.weights_id = weights_id
        self.frozen = frozen
        self.trainable = "none"
        self.finetuned = "none"  # which part a loaded fine-tuned state replaced

    def freeze(self) -> ImageEncoder:
        """Stop gradients through the backbone and put it in eval mode (default)."""
        self.frozen = True
        self.trainable = "none"
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def last_stage(self) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules (and loose parameters) of the last stage: what ``trainable="last"``
        unfreezes (ResNet: ``layer4``; ViT: the last block and the final norm; CLIP: the last
        residual block, ``ln_post`` and the projection)."""
        raise NotImplementedError

    def set_trainable(self, which: str) -> int:
        """Fine-tune ``none``, the ``last`` stage or ``all`` of the backbone; returns the number
        of trainable parameters. Frozen parts stay in eval mode (batch-norm statistics
        included) while training. ValueError for another value."""
        if which not in ("none", "last", "all"):
            raise ValueError(f"encoder trainable {which!r}: choose none, last or all")
        self.freeze()
        if which == "none":
            return 0
        modules, params = self.last_stage() if which == "last" else ([self], [])
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(True)
        for p in params:
            p.requires_grad_(True)
        self.frozen, self.trainable = False, which
        self._trainable_modules = modules
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the fine-tuned part (what a checkpoint must store on top
        of the base weights); empty for a frozen encoder."""
        if self.trainable == "none":
            return {}
        if self.trainable == "all":  # copies: .cpu() of a CPU tensor is the live tensor
            return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        names = {id(t) for m in self._trainable_modules for t in (*m.parameters(), *m.buffers())}
        names |= {id(p) for p in self.parameters() if p.requires_grad}
        named = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        return {k: v.detach().cpu().clone() for k, v in named.items() if id(v) in names}

    def apply_finetuned(self, state: dict[str, torch.Tensor], which: str) -> ImageEncoder:
        """Load a fine-tuned part (:meth:`trainable_state` of a fine-tuned copy) on top of the
        base weights, freeze, and give the encoder its own identity
        ``<base weights>+finetuned-<which>:<sha256 of the state>`` (so it never shares a
        feature-cache entry or a checkpoint check with the base). Raises RuntimeError when
        ``state`` names parameters this encoder lacks."""
        missing_in_model = set(state) - set(self.state_dict())
        if missing_in_model:
            raise RuntimeError(f"fine-tuned state has keys {sorted(missing_in_model)[:3]} that "
                               f"{self.name} lacks")
        self.load_state_dict(state, strict=False)
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
        base = self.weights_id.split("+finetuned-")[0]
        self.freeze()
        self.weights_id = f"{base}+finetuned-{which}:{h.hexdigest()[:16]}"
        self.finetuned = which
        return self

    def train_transform(self) -> Callable:
        """Training-time preprocessing from the backbone's own library (random resized crop,
        no horizontal flip: captions say left and right)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> ImageEncoder:
        """Frozen encoders stay in eval mode; with ``trainable="last"`` only the last stage
        trains (the frozen stages keep their batch-norm statistics)."""
        if self.frozen or not mode:
            return super().train(False)
        if self.trainable == "last":
            super().train(False)
            for m in self._trainable_modules:
                m.train(True)
            return self
        return super().train(True)

    def forward_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them (fine-tuning
        with less memory), through the backbone library's own switch. Raises
        ArchitectureError for a backbone that has none (see :func:`grad_checkpointing_unsupported`)."""
        raise ArchitectureError(f"{self.name}: its backbone library has no gradient checkpointing "
                                "switch; fine-tune it without gradient checkpointing")

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels (B, 3, H, W)`` -> ``(grid (B, N, grid_dim), pooled (B, pooled_dim))``."""
        if self.frozen:
            with torch.no_grad():
                return self.forward_features(pixels)
        return self.forward_features(pixels)

    def cache_identity(self) -> dict[str, str]:
        """The parts of the feature-cache key that this encoder determines."""
        return {
            "encoder": self.name,
            "weights": self.weights_id,
            "preprocessing": _stable_repr(self.transform),
        }

    def input_size(self) -> tuple[int, int, int]:
        """``(3, H, W)`` that :attr:`transform` produces (used by benchmarks on random pixels)."""
        from PIL import Image

        return tuple(self.transform(Image.new("RGB", (256, 256))).shape)


# --------------------------------------------------------------------------- torchvision ResNet
class TorchvisionResNet(ImageEncoder):
    """torchvision ResNet without its classifier: the last stage's 7x7 grid and its mean.

    He et al. 2016, "Deep Residual Learning for Image Recognition".
    """

    def __init__(self, arch: str, pretrained: bool, weights: str | None, init_seed: int):
        import torchvision

        enum = torchvision.models.get_model_weights(arch).DEFAULT
        torch.manual_seed(init_seed)
        net = torchvision.models.get_model(arch, weights=None)
        if weights:
            load_local_weights(net, weights)
            weights_id = f"file:{_file_digest(Path(weights))}"
        elif pretrained:
            try:
                state = enum.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:  # offline, proxy, corrupt cache
                cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
                raise _offline_error(arch, f"{enum.url} (cached as {cache})", exc) from exc
            net.load_state_dict(state)
            weights_id = f"torchvision:{enum}"
        else:
            weights_id = f"random-init:seed={init_seed}"
        dim = net.fc.in_features
        super().__init__(arch, enum.transforms(), dim, 49, dim, weights_id)
        self.body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool + fc
        self.freeze()

    def last_stage(self):
        return [self.body[-1]], []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise ArchitectureError(f"{self.name}: {_NO_CHECKPOINTING}")

    def train_transform(self):
        """torchvision's classification training recipe without the flip:
        ``RandomResizedCrop`` to the eval crop size, then the eval normalisation."""
        from torchvision import transforms as T

        ev = self.transform
        return T.Compose([T.RandomResizedCrop(ev.crop_size[0], interpolation=ev.interpolation),
                          T.PILToTensor(), T.ConvertImageDtype(torch.float),
                          T.Normalize(ev.mean, ev.std)])

    def forward_features(self, pixels):
        fmap = self.body(pixels)  # (B, D, h, w)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return grid, grid.mean(dim=1)


@register_encoder("resnet50", aliases=("resnet",),
                  unsupported={"grad_checkpointing": _NO_CHECKPOINTING})
def resnet50(pretrained: bool = True, weights: str | None = None, init_seed: int = 0):
    """torchvision ResNet-50: 7x7x2048 grid + mean-pooled 2048-d vector."""
    return TorchvisionResNet("resnet50", pretrained, weights, init_seed)


@register_encoder("resnet18", ci_friendly=True,
                  unsupported={"grad_checkpointing": _NO_CHECKPOINTING})
def resnet18(pretrained: bool = True, weights: str | None = None, init_seed: int = 0):
    """torchvision ResNet-18 (small, CI): 7x7x512 grid + mean-pooled 512-d vector."""
    return TorchvisionResNet("resnet18", pretrained, weights, init_seed)


# --------------------------------------------------------------------------------- timm ViT
class TimmViT(ImageEncoder):
    """timm Vision Transformer: patch tokens as the grid, the (normed) CLS token as pooled.

    Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words".
    """

    def __init__(self, arch: str, pretrained: bool, weights: str | None, init_seed: int):
        import timm
        from timm.data import create_transform, resolve_model_data_config

        torch.manual_seed(init_seed)
        if pretrained and not weights:
            try:
                net = timm.create_model(arch, pretrained=True, num_classes=0)
            except Exception as exc:
                cfg = timm.models.get_pretrained_cfg(arch)
                wanted = f"Hugging Face hub repo {getattr(cfg, 'hf_hub_id', None) or arch}"
                raise _offline_error(arch, wanted + " (in HF_HOME's hub cache)", exc) from exc
            weights_id = f"timm:{net.pretrained_cfg.get('hf_hub_id') or arch}"
        else:
            net = timm.create_model(arch, pretrained=False, num_classes=0)
            if weights:
                load_local_weights(net, weights)
                weights_id = f"file:{_file_digest(Path(weights))}"
            else:
                weights_id = f"random-init:seed={init_seed}"
        transform = create_transform(**resolve_model_data_config(net), is_training=False)
        n_prefix = getattr(net, "num_prefix_tokens", 1)
        grid_size = net.patch_embed.num_patches
        super().__init__(arch, transform, net.embed_dim, grid_size, net.embed_dim, weights_id)
        self.net = net
        self.num_prefix_tokens = n_prefix
        self._data_config = resolve_model_data_config(net)
        self.freeze()

    def last_stage(self):
        return [self.net.blocks[-1], self.net.norm], []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)  # timm's own per-block checkpointing

    def train_transform(self):
        """timm's training transform (``is_training=True``) with ``hflip=0`` and no colour
        jitter (captions name colours)."""
        from timm.data import create_transform

        return create_transform(**self._data_config, is_training=True, hflip=0.0,
                                color_jitter=0.0)

    def forward_features(self, pixels):
        tokens = self.net.forward_features(pixels)  # (B, prefix + N, D), final norm applied
        return tokens[:, self.num_prefix_tokens :], tokens[:, 0]


@register_encoder("vit_b16", aliases=("vit",))
def vit_b16(pretrained: bool = True, weights: str | None = None, init_seed: int = 0):
    """timm vit_base_patch16_224: 14x14x768 patch grid + 768-d CLS token."""
    return TimmViT("vit_base_patch16_224", pretrained, weights, init_seed)


@register_encoder("vit_tiny", ci_friendly=True)
def vit_tiny(pretrained: bool = True, weights: str | None = None, init_seed: int = 0):
    """timm vit_tiny_patch16_224 (small, CI): 14x14x192 patch grid + 192-d CLS token."""
    return TimmViT("vit_tiny_patch16_224", pretrained, weights, init_seed)


# ------------------------------------------------------------------------------ open_clip
class OpenCLIPVisual(ImageEncoder):
    """open_clip image tower: patch tokens as the grid, the projected image embedding as pooled.

    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
    """

    def __init__(self, arch: str, tag: str, pretrained: bool, weights: str | None, seed: int):
        import open_clip

        torch.manual_seed(seed)
        source = weights or (tag if pretrained else None)
        try:
            model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=source)
        except Exception as exc:
            if weights:
                raise EncoderWeightsError(f"cannot load {weights} into {arch}: {exc}") from exc
            raise _offline_error(
                arch, f"open_clip pretrained tag {tag!r} (in the HF hub cache)", exc
            ) from exc
        if weights:
            weights_id = f"file:{_file_digest(Path(weights))}"
        else:
            weights_id = f"open_clip:{tag}" if pretrained else f"random-init:seed={seed}"
        visual = model.visual
        visual.output_tokens = True
        grid_size = visual.grid_size[0] * visual.grid_size[1]
        width = visual.transformer.width
        pooled_dim = visual.output_dim
        super().__init__(f"clip_{arch}", preprocess, width, grid_size, pooled_dim, weights_id)
        self.visual = visual
        self._preprocess_train = preprocess_train
        self.freeze()

    def last_stage(self):
        v = self.visual
        return [v.transformer.resblocks[-1], v.ln_post], [v.proj] if v.proj is not None else []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)  # open_clip's own per-block checkpointing

    def train_transform(self):
        """open_clip's own training preprocess (random resized crop; it has no flip)."""
        return self._preprocess_train

    def forward_features(self, pixels):
        pooled, tokens = self.visual(pixels)  # (B, E), (B, N, width)
        return tokens, pooled


@register_encoder("clip_vit_b32", aliases=("clip",))
def clip_vit_b32(pretrained: bool = True, weights: str | None = None, init_seed: int = 0):
    """open_clip ViT-B-32 image tower (openai): 7x7x768 patch tokens + 512-d embedding."""
    return OpenCLIPVisual("ViT-B-32", "openai", pretrained, weights, init_seed)
