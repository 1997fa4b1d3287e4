"""BERTScore (Zhang et al., ICLR 2020) through its authors' package, ``bert-score``: opt-in.

Scored only when a model is named (``--bertscore-model NAME_OR_FOLDER`` or
``$CAPBENCH_BERTSCORE_MODEL``; ``roberta-large`` is the authors' choice for English) and the
package is installed (``pip install bert-score``). Each candidate is scored against all of its
references and the best F1 is kept (the package's multi-reference rule), with the authors'
baseline rescaling (``rescale_with_baseline``, ``lang="en"``) wherever the package ships a
baseline for the model; a local folder or a model without one is scored unrescaled. The
record names the exact setting by the package's own hash (model, layer, idf, version,
rescaling), as the authors ask papers to report it. The corpus score is the mean F1.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from benchmark.metrics.registry import MetricFamily, MetricOptions, ScoreResult, ScoringInput, register_family

NAME = "BERTScore"

__all__ = ["NAME", "BERTSCORE", "scorer_for"]


def _status(options: MetricOptions) -> dict[str, str | None]:
    if importlib.util.find_spec("bert_score") is None:
        return {NAME: "the bert-score package is not installed: pip install bert-score"}
    return {NAME: None}


def scorer_for(model: str, device: str = "cpu"):
    """A ``bert_score.BERTScorer`` for ``model`` (a hub name or a local folder): the layer the
    package recommends for known models, else the model's last layer; rescaled with the
    package's English baseline when it has one for this model.

    Raises OSError/ValueError (from transformers) when the model cannot be loaded."""
    import bert_score  # optional and heavy: imported only when BERTScore is asked for
    from bert_score.utils import model2layers

    known = model in model2layers
    if known:
        layers = model2layers[model]
    else:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model).num_hidden_layers
    baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{model}.tsv"
    return bert_score.BERTScorer(model_type=model, num_layers=layers, lang="en",
                                 rescale_with_baseline=known and baseline.is_file(), device=device)


def _score(inp: ScoringInput, wanted: tuple[str, ...]) -> ScoreResult:
    scorer = scorer_for(str(inp.options.bertscore_model), inp.options.device)
    cands = [inp.predictions[i] for i in inp.ids]
    refs = [list(inp.references[i]) for i in inp.ids]
    _, _, f1 = scorer.score(cands, refs)
    per = [float(x) for x in f1.double()]
    out = ScoreResult(list(inp.ids), {NAME: sum(per) / len(per)},
                      sources={NAME: f"bert-score {scorer.hash}"})
    if inp.per_image:
        out.per_image[NAME] = per
    return out


BERTSCORE = register_family(MetricFamily(
    name="bertscore", metrics=(NAME,), score=_score, status=_status,
    weights="a BERT-family model: --bertscore-model NAME_OR_FOLDER (roberta-large for English)",
    mean_of_images=(NAME,), default=False, wide_only=True, order=30,
    enabled=lambda options: options.bertscore_model is not None))
