"""Caption metrics, one file per family, behind one call: :func:`score_captions`.

* :mod:`benchmark.metrics.coco`: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE exactly as the
  COCO caption toolkit (pycocoevalcap) computes them;
* :mod:`benchmark.metrics.clipscore`: CLIP-S and RefCLIP-S (Hessel et al., 2021), PAC-S and
  RefPAC-S (Sarto et al., 2023), as their reference code computes them;
* :mod:`benchmark.metrics.bertscore`: BERTScore through its authors' ``bert-score`` package,
  when it is installed and a model is named (opt-in).

Each family registers itself in :mod:`benchmark.metrics.registry`. Adding a metric is one new
file here with its :func:`~benchmark.metrics.registry.register_family` call, and its import
below.
"""

from __future__ import annotations

from pathlib import Path

from benchmark.errors import CapbenchError
from benchmark.metrics import bertscore, clipscore, coco  # noqa: F401  (each registers its family)
from benchmark.metrics.coco import (
    ALL_METRICS,
    CORENLP_JARS,
    LINE_BREAKS,
    METEOR_STATS_KEY,
    METEOR_STATS_LENGTH,
    PER_IMAGE_METRICS,
    MeteorJar,
    _pkg_dir,
    cider_d,
    close_meteor_jar,
    java_tokenizer_available,
    java_version,
    meteor_jar,
    one_line,
    ptb_tokenize,
)
from benchmark.metrics.registry import (
    FAMILIES,
    MetricFamily,
    MetricOptions,
    ScoreResult,
    ScoringInput,
    default_metrics,
    families,
    family_of,
    mean_metrics,
    register_family,
    registered_metrics,
    use_weight_files,
)

__all__ = ["ScoreResult", "score_captions", "ptb_tokenize", "java_version", "metric_status",
           "java_tokenizer_available", "one_line", "LINE_BREAKS", "cider_d",
           "ALL_METRICS", "PER_IMAGE_METRICS", "MeteorJar", "meteor_jar", "close_meteor_jar",
           "METEOR_STATS_KEY", "METEOR_STATS_LENGTH", "CORENLP_JARS", "MetricOptions",
           "MetricFamily", "ScoringInput", "register_family", "FAMILIES", "families", "family_of",
           "registered_metrics", "mean_metrics", "default_metrics", "check_metric_names",
           "use_weight_files"]

_ = _pkg_dir  # pycocoevalcap's install folder, for callers that read its jars


def metric_status(options: MetricOptions | None = None) -> dict[str, str | None]:
    """Per registered metric: None when it can run here, else the reason it cannot and the
    fix (Java, jars, weights). Cheap: loads no model."""
    options = options or MetricOptions.from_env()
    out: dict[str, str | None] = {}
    for fam in families():
        out.update(fam.status(options))
    return out


def check_metric_names(names) -> tuple[str, ...]:
    """``names`` as a tuple, each a registered metric. Raises CapbenchError naming the
    unknown ones and the known ones."""
    names = tuple(names)
    unknown = [n for n in names if n not in registered_metrics()]
    if unknown:
        raise CapbenchError(f"unknown metric(s) {', '.join(unknown)}; known: "
                            f"{', '.join(registered_metrics())}")
    return names


def _unavailable(result: ScoreResult, names, reason: str) -> None:
    for name in names:
        result.metrics[name] = None
        result.unavailable[name] = reason


def _score_family(fam: MetricFamily, inp: ScoringInput, wanted: tuple[str, ...],
                  result: ScoreResult) -> None:
    """Add ``fam``'s ``wanted`` metrics to ``result``; a family that cannot run (its status, no
    image files, or an error while scoring) leaves them None with the reason."""
    reasons = {r for m, r in fam.status(inp.options).items() if m in wanted and r}
    if reasons:
        return _unavailable(result, wanted, "; ".join(sorted(reasons)))
    if fam.needs_images and inp.images is None:
        return _unavailable(result, wanted, "needs the image files: give the dataset's "
                            "dataset.json, or --images DIR holding them")
    if fam.needs_images and (missing := [i for i in inp.ids if i not in inp.images]):
        return _unavailable(result, wanted, f"no image file for {len(missing)} image ids, "
                            f"e.g. {missing[:3]}")
    if fam.needs_images and (absent := [str(inp.images[i]) for i in inp.ids
                                        if not Path(inp.images[i]).is_file()]):
        return _unavailable(result, wanted, f"{len(absent)} image files not found, e.g. "
                            f"{absent[0]}: pass --images DIR holding them")
    try:
        result.merge(fam.score(inp, wanted))
    except (CapbenchError, OSError, RuntimeError, ValueError) as exc:
        _unavailable(result, wanted, f"{fam.name} failed: {str(exc).splitlines()[0][:300]}")


def score_captions(predictions: dict, references: dict, *, metrics=None, per_image: bool = True,
                   images: dict | None = None, options: MetricOptions | None = None) -> ScoreResult:
    """Score ``{image_id: caption}`` against ``{image_id: [reference, ...]}`` with every
    registered metric (or those named in ``metrics``).

    Args:
        predictions: ``{image_id: caption}``; its order is the order of every per-image list.
        references: ``{image_id: [reference, ...]}``, for every predicted id.
        metrics: metric names (default :func:`default_metrics`: the COCO toolkit's, CLIP-S,
            RefCLIP-S, PAC-S, RefPAC-S, and BERTScore when ``options`` names its model).
        per_image: keep per-image scores (what bootstrap intervals resample).
        images: ``{image_id: image file}`` for the metrics that look at images (CLIP-S);
            None: those are reported unavailable ("needs the image files").
        options: weights and device of the model-based metrics (default
            :meth:`MetricOptions.from_env`).

    Returns:
        A :class:`ScoreResult`. The COCO metrics equal ``COCOEvalCap.evaluate()`` on the same
        captions; a metric that cannot run here is None with its reason in ``unavailable``.

    Raises:
        ValueError: a predicted image id has no references.
        CapbenchError: an unknown metric name.
    """
    options = options or MetricOptions.from_env()
    wanted = check_metric_names(default_metrics(options) if metrics is None else metrics)
    missing = [i for i in predictions if i not in references]
    if missing:
        raise ValueError(f"{len(missing)} predicted image ids have no references, e.g. {missing[:3]}")
    inp = ScoringInput(list(predictions), predictions, references, images, options, per_image)
    in_coco = tuple(m for m in wanted if m in coco.ALL_METRICS)
    result = (coco.score_captions(predictions, references, metrics=in_coco, per_image=per_image)
              if in_coco else ScoreResult(list(predictions), {}))
    for fam in families():
        if fam is not coco.COCO and (asked := tuple(m for m in fam.metrics if m in wanted)):
            _score_family(fam, inp, asked, result)
    return result
