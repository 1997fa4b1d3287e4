"""Facts for ``capbench doctor``: cache folders and pretrained weights already on disk."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape

from benchmark.errors import ConfigError
from benchmark.paths import cache_root

__all__ = ["cache_report", "cache_root_problem", "local_weights", "doctor_rows", "version_text"]


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total


def _hf_hub_dir() -> Path:
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", Path(hf_home) / "hub"))


def _torch_hub_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_root_problem(root: Path) -> str | None:
    """Why capbench cannot keep its caches under ``root`` (``None`` when it can): it, or the
    nearest part of it that exists, is not a folder, or that folder is not writable."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "it" if existing == root else f"{existing}"
        return (f"{what} is a file, not a folder; set CAPBENCH_CACHE to a folder (or unset it "
                "for the default)")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable; set CAPBENCH_CACHE to a writable folder"
    return None


def cache_report() -> dict[str, tuple[Path, int]]:
    """``{name: (folder, bytes)}`` for capbench's feature/dataset caches and the model hubs."""
    root = cache_root()
    return {name: (p, _size(p) if p.exists() else 0) for name, p in {
        "features": root / "features", "datasets": root / "datasets",
        "metric embeddings": root / "metric-embeddings", "torch hub": _torch_hub_dir(),
        "hugging face hub": _hf_hub_dir()}.items()}


def local_weights() -> list[str]:
    """Weights already cached: torchvision checkpoints and timm/open_clip hub snapshots."""
    found = []
    tv = _torch_hub_dir()
    if tv.is_dir():
        found += [f"torchvision: {p.name}" for p in sorted(tv.glob("*.pth"))]
    hub = _hf_hub_dir()
    if hub.is_dir():
        found += [f"hf hub: {p.name.removeprefix('models--').replace('--', '/')}"
                  for p in sorted(hub.glob("models--*"))
                  if any(s in p.name.lower() for s in ("timm", "clip", "vit"))]
    return found


def doctor_rows() -> list[tuple[str, str]]:
    """``(item, status)`` rows of ``capbench doctor``: versions, devices, Java metrics, the
    device image decoder, caches and local weights (rich markup in the status)."""
    import platform

    import torch

    # lazy, as torch above: they import torch, and `import benchmark.doctor` stays without it
    from benchmark.metrics import java_tokenizer_available, java_version, metric_status

    rows = [("python", platform.python_version()),
            ("torch", f"{torch.__version__} (threads {torch.get_num_threads()})")]
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    rows.append(("cuda", ", ".join(cuda) if cuda else "not available"))
    mps = getattr(torch.backends, "mps", None)
    rows.append(("mps", "available" if mps and mps.is_available() else "not available"))
    rows.append(("java", java_version()
                 or "[red]not found[/] (METEOR, SPICE and the PTB tokenizer need it)"))
    if java_version() and not java_tokenizer_available():
        rows.append(("ptb tokenizer", "[yellow]Python approximation[/]: pycocoevalcap's CoreNLP "
                                      "jar is missing (reinstall pycocoevalcap)"))
    try:
        from benchmark.pixels import jpeg_decoder  # lazy: torch and torchvision, as above

        rows.append(("image_decoder: torchvision", f"[green]ok[/] ({jpeg_decoder()[0]} decode_jpeg)"))
    except ConfigError as exc:
        rows.append(("image_decoder: torchvision", f"[yellow]unavailable[/]: {escape(str(exc))}"))
    for m, why in metric_status().items():  # every registered metric, cheaply (no model load)
        rows.append((f"metric {m}", "[green]ok[/]" if why is None
                     else f"[yellow]unavailable[/]: {escape(str(why))}"))
    root = cache_root()
    why = cache_root_problem(root)
    rows.append(("cache root", escape(str(root)) + (f" [red]unusable[/]: {escape(why)}" if why else "")))
    for name, (path, size) in cache_report().items():
        if why and name in ("features", "datasets"):
            rows.append((f"cache {name}", f"[red]unusable[/] ({escape(str(path))}: see cache root)"))
        else:
            rows.append((f"cache {name}", f"{escape(str(path))} ({size / 2**20:.1f} MiB)"))
    weights = local_weights()
    rows.append(("local weights", escape("\n".join(weights)) if weights
                 else "none found (use --no-pretrained offline)"))
    return rows


def version_text() -> str:
    """``capbench --version``: capbench's, Python's and torch's versions and the device that
    ``--device auto`` would pick (a GPU's name with its CUDA and cuDNN versions, MPS, or the
    CPU with torch's thread count)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch  # lazy, as in doctor_rows: `import benchmark.doctor` stays without torch

    try:
        own = version("capbench")
    except PackageNotFoundError:  # run from a checkout that was never installed
        own = "unknown (not installed)"
    if torch.cuda.is_available():
        cudnn = torch.backends.cudnn.version()
        device = (f"cuda: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU(s), "
                  f"CUDA {torch.version.cuda}, cuDNN {cudnn})")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    return (f"capbench {own}\npython {platform.python_version()}\ntorch {torch.__version__}\n"
            f"device {device}")
