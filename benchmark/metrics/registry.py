"""The metric registry: every metric family capbench scores, what each needs and how it says
it cannot run.

A *family* is a set of metrics computed together from one model or toolkit (the COCO caption
toolkit's BLEU/METEOR/ROUGE-L/CIDEr-D/SPICE; CLIP-S and RefCLIP-S from one CLIP). Each lives in
its own file in :mod:`benchmark.metrics` and registers itself with :func:`register_family`,
as a decoder registers in :mod:`architectures.registry`. Each family returns a corpus score
per metric and, for metrics whose corpus score is the mean over images
(:attr:`MetricFamily.mean_of_images`), the per-image scores; the bootstrap intervals, paired
tests, ``compare``, the board and ``capbench eval`` cover every such metric through those
lists without special cases (see :mod:`benchmark.stats`).

A family that cannot run here (no Java, no weights, no image files) reports each of its
metrics as None with the reason in ``unavailable``; it never fails the run that asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.errors import ConfigError

__all__ = ["ScoreResult", "MetricOptions", "ScoringInput", "MetricFamily", "register_family",
           "FAMILIES", "families", "use_weight_files", "WEIGHT_VARS", "BERTSCORE_VAR", "family_of",
           "registered_metrics", "mean_metrics", "default_metrics"]


@dataclass
class ScoreResult:
    """Corpus scores, per-image scores and what could not be computed.

    ``metrics``: name -> score (pycocoevalcap's scale: BLEU/METEOR/ROUGE-L/SPICE in [0, 1],
    CIDEr in [0, 10]; CLIP-S in [0, 2.5]; RefCLIP-S in [0, 2.5]), None when unavailable.
    ``per_image``: name -> list aligned with ``image_ids`` (every metric of
    :func:`mean_metrics`), and ``METEOR_stats``: per image the jar's 23 METEOR sufficient
    statistics (see :class:`benchmark.metrics.coco.MeteorJar`), enough to rescore corpus METEOR
    on any subset (bootstrap). ``bleu_stats``: per image ``[hyp_len, closest_ref_len,
    correct_1..4, total_1..4]``, enough to recompute corpus BLEU on any subset (bootstrap).
    ``unavailable``: name -> reason. ``sources``: name -> the package, model and weights a
    model-based score came from (as BERTScore's hash names them).
    """

    image_ids: list
    metrics: dict[str, float | None]
    per_image: dict[str, list[float]] = field(default_factory=dict)
    bleu_stats: list[list[int]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb-java"
    sources: dict[str, str] = field(default_factory=dict)

    def per_image_block(self) -> dict:
        """The run record's ``per_image`` block: ``image_ids``, per-image scores,
        ``METEOR_stats`` and ``bleu_stats`` (what :func:`benchmark.stats.bootstrap_ci`
        resamples)."""
        return {"image_ids": self.image_ids, **self.per_image, "bleu_stats": self.bleu_stats}

    def merge(self, other: ScoreResult) -> None:
        """Add another family's ``metrics``, ``per_image``, ``unavailable`` and ``sources``
        (same ``image_ids``)."""
        self.metrics.update(other.metrics)
        self.per_image.update(other.per_image)
        self.unavailable.update(other.unavailable)
        self.sources.update(other.sources)


def _path_from_env(var: str) -> Path | None:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class MetricOptions:
    """Settings of the model-based metrics.

    ``clip_weights``: a local file of OpenAI's ViT-B/32 weights for CLIP-S (its ``ViT-B-32.pt``
    or a state dict in that layout; None: open_clip's ``pretrained="openai"`` from its cache or
    the internet); ``pacs_weights``: the PAC-S checkpoint (aimagelab/pacscore's
    ``clip_ViT-B-32.pth``); ``device``: where the metric models run (``cpu``/``cuda``);
    ``cache_dir``: where image embeddings are kept (None: ``<cache root>/metric-embeddings``);
    ``bertscore_model``: a hub name or local folder for BERTScore (None: BERTScore is off).
    """

    clip_weights: Path | None = None
    pacs_weights: Path | None = None
    device: str = "cpu"
    cache_dir: Path | None = None
    bertscore_model: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> MetricOptions:
        """Options from ``$CAPBENCH_CLIP_WEIGHTS`` and ``$CAPBENCH_PACS_WEIGHTS`` (what
        ``--clip-weights``/``--pacs-weights`` set, so torchrun workers and matrix cells see
        them too), with ``overrides`` (None values ignored) on top."""
        base: dict = {key: _path_from_env(var) for key, var in WEIGHT_VARS.items()}
        base["bertscore_model"] = os.environ.get(BERTSCORE_VAR, "").strip() or None
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


#: the environment variables that carry the weight files to every process of a run
WEIGHT_VARS = {"clip_weights": "CAPBENCH_CLIP_WEIGHTS", "pacs_weights": "CAPBENCH_PACS_WEIGHTS"}
#: the environment variable naming BERTScore's model (a hub name or a folder)
BERTSCORE_VAR = "CAPBENCH_BERTSCORE_MODEL"


def use_weight_files(bertscore_model: str | None = None, **files: Path | None) -> None:
    """Point the model-based metrics at local weight files (``clip_weights=``,
    ``pacs_weights=``; None: leave as is) and name BERTScore's model (``bertscore_model``: a
    hub name or a folder; turns BERTScore on) for this process and the ones it starts (torchrun
    workers, matrix cells): sets :data:`WEIGHT_VARS` and :data:`BERTSCORE_VAR`. Raises
    ConfigError naming the flag when a weights file does not exist, before any work."""
    if bertscore_model:
        local = Path(bertscore_model).expanduser()
        os.environ[BERTSCORE_VAR] = str(local.resolve()) if local.exists() else bertscore_model
    for key, path in files.items():
        if path is None:
            continue
        flag = "--" + key.replace("_", "-")
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"{flag} {path}: no such file (give the weights file itself)")
        os.environ[WEIGHT_VARS[key]] = str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class ScoringInput:
    """What a family scores: ``ids`` (the order of every per-image list), ``predictions``
    ``{id: caption}``, ``references`` ``{id: [caption, ...]}``, ``images`` ``{id: image file}``
    (None when the caller has no image files), ``options``, and ``per_image``: whether to
    keep per-image scores."""

    ids: list
    predictions: dict
    references: dict
    images: dict | None
    options: MetricOptions
    per_image: bool = True


@dataclass(frozen=True)
class MetricFamily:
    """One registered family of metrics.

    ``name``: short id (``coco``, ``clip``); ``metrics``: the record keys it writes, in board
    order; ``score(inp, wanted) -> ScoreResult`` computes the ``wanted`` subset of them for a
    :class:`ScoringInput`; ``status(options) -> {metric: None | reason}`` says, without heavy
    work, which of them cannot run here and what to do; ``needs_images``/``needs_references``/
    ``needs_java`` declare its inputs; ``weights`` says in words which weights it loads and
    from where; ``mean_of_images``: metrics whose corpus score is the mean of per-image scores
    (resampled as means by the bootstrap); ``default``: scored when no metric list is given;
    ``wide_only``: shown by ``capbench report --wide`` only; ``order``: the family's place
    on the board and in records (lower first); ``enabled(options)``: for an opt-in family
    (``default`` False), whether the options turn it on (e.g. a BERTScore model is named).
    """

    name: str
    metrics: tuple[str, ...]
    score: Callable[[ScoringInput, tuple[str, ...]], ScoreResult]
    status: Callable[[MetricOptions], dict[str, str | None]]
    needs_images: bool = False
    needs_references: bool = True
    needs_java: bool = False
    weights: str = ""
    mean_of_images: tuple[str, ...] = ()
    default: bool = True
    wide_only: bool = False
    order: int = 100
    enabled: Callable[[MetricOptions], bool] | None = None


#: every registered family, by name (see :func:`families` for board order)
FAMILIES: dict[str, MetricFamily] = {}


def families() -> list[MetricFamily]:
    """The registered families in board order (``order``, then name)."""
    return sorted(FAMILIES.values(), key=lambda f: (f.order, f.name))


def register_family(family: MetricFamily) -> MetricFamily:
    """Add ``family`` to :data:`FAMILIES`. Raises ValueError when its name, or one of its
    metric names, is taken already."""
    if family.name in FAMILIES:
        raise ValueError(f"metric family {family.name!r} is registered already")
    taken = set(family.metrics) & set(registered_metrics())
    if taken:
        raise ValueError(f"metrics {sorted(taken)} are registered already")
    FAMILIES[family.name] = family
    return family


def family_of(metric: str) -> MetricFamily:
    """The family that computes ``metric``. Raises KeyError naming the known metrics."""
    for fam in families():
        if metric in fam.metrics:
            return fam
    raise KeyError(f"unknown metric {metric!r}; known: {', '.join(registered_metrics())}")


def registered_metrics() -> tuple[str, ...]:
    """Every registered metric name, family by family."""
    return tuple(m for fam in families() for m in fam.metrics)


def mean_metrics() -> tuple[str, ...]:
    """Metrics whose corpus score is the mean of their per-image scores."""
    return tuple(m for fam in families() for m in fam.mean_of_images)


def default_metrics(options: MetricOptions | None = None) -> tuple[str, ...]:
    """What :func:`benchmark.metrics.score_captions` scores when no list is given: the
    default families, and the opt-in ones ``options`` turn on."""
    def on(fam: MetricFamily) -> bool:
        return fam.default or bool(options and fam.enabled and fam.enabled(options))
    return tuple(m for fam in families() if on(fam) for m in fam.metrics)
