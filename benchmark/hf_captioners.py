"""Pretrained Hugging Face captioners scored on capbench's splits as reference rows.

``capbench eval --hf MODEL_ID_OR_FOLDER --dataset D`` captions split ``test`` (or
``--split``) of D with a captioner from ``transformers`` (BLIP, BLIP-2, GIT, Florence-2,
PaliGemma, ``VisionEncoderDecoderModel`` such as ViT-GPT2, or any
``AutoModelForImageTextToText``), scores the captions with capbench's scorer exactly as
:func:`benchmark.captioner.evaluate_run` does, and writes a normal run record
(:func:`benchmark.records.make_record`) whose ``reference_model`` block says that the model was
pretrained elsewhere: it was not trained on this split under capbench's budget, and its
pretraining data may include COCO. The board shows such records as reference rows
(``kind == "reference"``), never ranked or aggregated as trained cells.

Decoding follows the authors' evaluation settings as LAVIS's configs state them
(``lavis/projects/blip/eval/caption_coco_eval.yaml``: BLIP beam 3, length 5-20, prompt
"a picture of "; ``lavis/projects/blip2/eval/caption_coco_opt2.7b_eval.yaml``: BLIP-2 beam 5,
length 8-30, prompt "a photo of"); other families use the model's own ``generation_config``.
``--beam-size``/``--max-len``/``--min-len``/``--prompt`` override any of them, and the record
keeps the exact ``generate`` arguments used.

``transformers`` is imported inside the functions that need it: it is heavy (seconds), and the
CLI and the board import this module's names without loading a model.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from benchmark.captioner import check_split
from benchmark.data import resolve_dataset
from benchmark.device import select_device, synchronize
from benchmark.errors import CapbenchError, ConfigError, DatasetError
from benchmark.image_use import baseline_scores, vs_blind
from benchmark.imagefile import open_rgb
from benchmark.metrics import MetricOptions, score_captions
from benchmark.records import (
    RecordedModel,
    ScoredSplit,
    ThroughputBlock,
    load_records,
    make_record,
    new_run_id,
    write_record,
)
from benchmark.tokenization import hub_offline_reason

__all__ = ["Family", "FAMILIES", "Decoding", "HFCaptioner", "HFEvalOptions", "load_captioner",
           "ReferenceOutcome", "run_references",
           "decoding_for", "caption_images", "evaluate_hf", "strip_prompt",
           "SUPPORTED_CLASSES", "PRETRAINED_NOTE"]

#: what every reference record says about where its model comes from
PRETRAINED_NOTE = ("pretrained outside capbench: not trained on this split under capbench's "
                   "budget; its pretraining data may include COCO (and so this split's images)")


@dataclass(frozen=True)
class Family:
    """A captioner family: ``label`` on the board (``BLIP`` -> ``BLIP (pretrained)``), the
    ``transformers`` class that runs it, the text ``prompt`` its authors caption with (None:
    none), its default ``generate`` arguments (empty: the model's ``generation_config``) and
    where those come from (``source``). ``length_keys``: the ``generate`` arguments that
    ``--max-len``/``--min-len`` set (BLIP and BLIP-2: ``max_length``/``min_length`` as LAVIS
    passes them; others: new tokens)."""

    label: str
    model_class: str
    prompt: str | None = None
    defaults: dict = field(default_factory=dict)
    source: str = "the model's generation_config"
    length_keys: tuple[str, str] = ("max_new_tokens", "min_new_tokens")
    separate_processor: bool = False


_LAVIS = "LAVIS lavis/projects/{}/eval/{}.yaml"
#: by the config's ``model_type``
FAMILIES: dict[str, Family] = {
    "blip": Family("BLIP", "BlipForConditionalGeneration", "a picture of ",
                   {"num_beams": 3, "max_length": 20, "min_length": 5},
                   _LAVIS.format("blip", "caption_coco_eval"), ("max_length", "min_length")),
    "blip-2": Family("BLIP-2", "Blip2ForConditionalGeneration", "a photo of",
                     {"num_beams": 5, "max_length": 30, "min_length": 8},
                     _LAVIS.format("blip2", "caption_coco_opt2.7b_eval"),
                     ("max_length", "min_length")),
    "git": Family("GIT", "GitForCausalLM"),
    "florence2": Family("Florence-2", "Florence2ForConditionalGeneration", "<CAPTION>"),
    "paligemma": Family("PaliGemma", "PaliGemmaForConditionalGeneration", "caption en"),
    "vision-encoder-decoder": Family("VisionEncoderDecoder", "VisionEncoderDecoderModel",
                                     separate_processor=True),
}
#: what ``--hf`` accepts, for the error naming them
SUPPORTED_CLASSES = (*(f.model_class for f in FAMILIES.values()),
                     "AutoModelForImageTextToText (any other image-text-to-text model)")


@dataclass
class Decoding:
    """How captions are generated: ``generate_kwargs`` passed to ``model.generate`` as they
    are (beams, lengths in tokens), the text ``prompt`` (None: none) and ``source``: where the
    settings come from (the family's defaults, the model's generation_config, flags)."""

    generate_kwargs: dict
    prompt: str | None
    source: str

    def to_dict(self) -> dict:
        """The record's ``reference_model.decoding``."""
        return {"generate_kwargs": dict(self.generate_kwargs), "prompt": self.prompt,
                "source": self.source}


def decoding_for(family: Family, *, beam_size: int | None = None, max_len: int | None = None,
                 min_len: int | None = None, prompt: str | None = None) -> Decoding:
    """The family's default decoding with the flags given (None: not given) on top.

    Raises ConfigError for a beam size below 1, lengths below 1 or a minimum above the
    maximum."""
    kwargs = dict(family.defaults)
    flags = []
    for name, value, key in (("--beam-size", beam_size, "num_beams"),
                             ("--max-len", max_len, family.length_keys[0]),
                             ("--min-len", min_len, family.length_keys[1])):
        if value is None:
            continue
        if value < (0 if name == "--min-len" else 1):
            raise ConfigError(f"{name} {value}: must be at least {0 if name == '--min-len' else 1}")
        kwargs[key] = value
        flags.append(name)
    lo, hi = kwargs.get(family.length_keys[1]), kwargs.get(family.length_keys[0])
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"--min-len {lo} is above --max-len {hi}")
    if prompt is not None:
        flags.append("--prompt")
    source = family.source + (f", overridden by {', '.join(flags)}" if flags else "")
    return Decoding(kwargs, family.prompt if prompt is None else (prompt or None), source)


@dataclass
class HFCaptioner:
    """A loaded captioner: ``model`` (eval mode, on ``device`` in ``dtype``), ``processor``
    (images -> ``pixel_values``, with the prompt's ``input_ids`` when there is one),
    ``tokenizer`` (ids -> text), its ``family`` and ``model_type``, the ``model_id`` asked for
    and the hub ``revision`` (commit hash; None for a local folder)."""

    model_id: str
    revision: str | None
    model_type: str
    family: Family
    model: object
    processor: object
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @property
    def parameters(self) -> int:
        """Every parameter of the model."""
        return sum(p.numel() for p in self.model.parameters())

    def inputs(self, images: list, decoding: Decoding) -> dict:
        """``generate``'s tensors for PIL ``images`` (on the model's device; pixels in its dtype)."""
        if decoding.prompt is None:
            batch = self.processor(images=images, return_tensors="pt")
        else:
            batch = self.processor(images=images, text=[decoding.prompt] * len(images),
                                   return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def captions(self, images: list, decoding: Decoding) -> list[str]:
        """Captions of PIL ``images``: processor -> ``generate`` -> decode, with the prompt (its
        tokens, or its text as LAVIS strips it) removed from each caption."""
        inputs = self.inputs(images, decoding)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **decoding.generate_kwargs)
        return strip_prompt(out, inputs.get("input_ids"), self.tokenizer, decoding.prompt)

    def reference_block(self, decoding: Decoding) -> dict:
        """The record's ``reference_model`` block."""
        return {"model_id": self.model_id, "revision": self.revision,
                "model_type": self.model_type, "family": self.family.label,
                "class": type(self.model).__name__, "parameters": self.parameters,
                "dtype": str(self.dtype).removeprefix("torch."),
                "decoding": decoding.to_dict(), "pretrained_elsewhere": True,
                "note": PRETRAINED_NOTE}


def strip_prompt(out: torch.Tensor, input_ids: torch.Tensor | None, tokenizer,
                 prompt: str | None) -> list[str]:
    """Decode ``generate``'s ``out`` (batch, length) without special tokens: the prompt's
    tokens are cut when the output starts with them (decoder-only models echo their input),
    and a caption still starting with the prompt's text loses it (LAVIS:
    ``output[len(prompt):]``)."""
    if input_ids is not None and out.shape[1] >= input_ids.shape[1] and \
            bool((out[:, :input_ids.shape[1]] == input_ids.to(out.device)).all()):
        out = out[:, input_ids.shape[1]:]
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    lead = (prompt or "").strip()
    if lead and not lead.startswith("<"):  # a task token (<CAPTION>) is never in the text
        texts = [t.strip()[len(lead):] if t.strip().lower().startswith(lead.lower()) else t
                 for t in texts]
    return [" ".join(t.split()) for t in texts]


def _fetch_hint(model_id: str) -> str:
    return (f"fetch it where there is internet with `huggingface-cli download {model_id}` (it "
            "goes to the Hugging Face cache, $HF_HOME or ~/.cache/huggingface, and is found "
            "there offline), or pass a folder saved with save_pretrained: --hf FOLDER")


def _locate(spec: str) -> tuple[str, bool]:
    """``(what to load, offline)``: a local folder as it is, else a hub id; ``offline`` when the
    id must come from the cache. Raises ConfigError for a folder without config.json, an id
    the hub cannot name, and an id neither cached nor reachable."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--hf {spec}: folder has no config.json; a model folder is what "
                              "save_pretrained writes (config.json, weights, processor files)")
        return str(path), False
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ConfigError(f"--hf {spec}: no such folder (a hub id looks like "
                          "Salesforce/blip-image-captioning-base)")
    try:
        cached = try_to_load_from_cache(spec, "config.json")
    except HFValidationError as exc:
        raise ConfigError(f"--hf {spec!r} is neither a folder nor a valid Hugging Face model id "
                          f"({exc})") from exc
    if isinstance(cached, str):
        return spec, True
    if why := hub_offline_reason():
        raise ConfigError(f"model {spec} is not in the Hugging Face cache and the hub cannot be "
                          f"used ({why}); {_fetch_hint(spec)}")
    return spec, False


def _family_of(config, spec: str) -> tuple[str, Family]:
    """``(model_type, family)`` of a model config; the generic image-text-to-text family for
    any other model ``AutoModelForImageTextToText`` runs. Raises ConfigError naming the
    supported classes for a model that is not a captioner."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in FAMILIES:
        return model_type, FAMILIES[model_type]
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return model_type, Family(model_type, "AutoModelForImageTextToText")
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    raise ConfigError(f"--hf {spec}: model type {model_type!r} ({archs}) is not an image "
                      f"captioner capbench can run; supported: {', '.join(SUPPORTED_CLASSES)}")


def _load_processor(where: str, family: Family, offline: bool):
    """``(processor, tokenizer)``: AutoProcessor, or for a VisionEncoderDecoder model (whose
    folder often has no processor config) its image processor and tokenizer joined."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if family.separate_processor:
        image_processor = AutoImageProcessor.from_pretrained(where, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline)

        def processor(images, text=None, return_tensors="pt"):  # no prompt: pixels only
            return image_processor(images=images, return_tensors=return_tensors)

        return processor, tokenizer
    proc = AutoProcessor.from_pretrained(where, local_files_only=offline)
    tokenizer = getattr(proc, "tokenizer", None)
    if tokenizer is None or not callable(proc):
        raise ConfigError(f"--hf {where}: its processor ({type(proc).__name__}) does not take "
                          "images and text; a captioner's folder has a processor config")
    return proc, tokenizer


def load_captioner(spec: str, device: torch.device) -> HFCaptioner:
    """Load the captioner ``spec`` (a hub id, from the cache or the internet, or a local folder)
    on ``device``: bf16 on CUDA, float32 elsewhere; eval mode.

    Raises ConfigError: the model is neither a folder nor reachable (offline and not cached:
    the message names the model and how to fetch it), is not a captioner (the message names
    the supported classes), or its files cannot be loaded."""
    import transformers
    from transformers import AutoConfig

    where, offline = _locate(spec)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=offline)
    except OSError as exc:  # no such repository, or gated: the hub's message
        raise ConfigError(f"--hf {spec}: cannot load its config ({_first_line(exc)}); "
                          f"{_fetch_hint(spec)}") from exc
    except ValueError as exc:  # a model type this transformers does not know
        raise ConfigError(f"--hf {spec}: {_first_line(exc)}; supported: "
                          f"{', '.join(SUPPORTED_CLASSES)}") from exc
    model_type, family = _family_of(config, spec)
    cls = getattr(transformers, family.model_class)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = cls.from_pretrained(where, local_files_only=offline, dtype=dtype)
        processor, tokenizer = _load_processor(where, family, offline)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf {spec}: cannot load {family.model_class} and its processor "
                          f"({_first_line(exc)})") from exc
    revision = getattr(config, "_commit_hash", None)
    return HFCaptioner(spec, revision if not Path(where).is_dir() else None, model_type, family,
                       model.to(device).eval(), processor, tokenizer, device, dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def caption_images(captioner: HFCaptioner, images: list, decoding: Decoding, *,
                   batch_size: int = 16) -> tuple[dict, float]:
    """``({image_id: caption}, images/s)`` of a split's ``images``
    (:class:`~benchmark.data.ImageRecord`), in batches of ``batch_size``, timed end to end from
    the files (open -> processor -> generate -> decode; model loading and one untimed warm-up
    image excluded), as trained runs' ``inference_images_per_s`` is. Raises DatasetError naming
    an unreadable file."""
    out: dict = {}
    if images:  # one untimed image first: lazy initialisation is not throughput
        captioner.captions([open_rgb(images[0].path)], decoding)
    synchronize(captioner.device)
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        pictures = [open_rgb(im.path) for im in batch]
        for im, caption in zip(batch, captioner.captions(pictures, decoding), strict=True):
            out[im.image_id] = caption
    synchronize(captioner.device)
    return out, len(images) / max(time.perf_counter() - t0, 1e-9)


@dataclass
class HFEvalOptions:
    """``capbench eval --hf``'s settings: the decoding overrides (None: the family's default),
    the prompt (None: the family's; ``""``: none), images per ``generate`` call, the device
    (``auto``: as capbench chooses it) and where the record goes."""

    beam_size: int | None = None
    max_len: int | None = None
    min_len: int | None = None
    prompt: str | None = None
    batch_size: int = 16
    device: str = "auto"
    results_dir: str | Path = "results"


class _Part:
    """The vision or text part of a captioner as :func:`benchmark.records.parameter_counts`
    reads a model part (``parameters()``, ``num_parameters()``) and ``weights_id``."""

    def __init__(self, params: list, weights_id: str = ""):
        self._params, self.weights_id = params, weights_id

    def parameters(self):
        return iter(self._params)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._params)


#: vision parameters by name: vision_model / vision_tower (BLIP, BLIP-2, Florence-2, PaliGemma),
#: image_encoder (GIT), a VisionEncoderDecoder's encoder
_VISION = re.compile(r"vision|image_encoder|^encoder\.")


def _parts(captioner: HFCaptioner) -> tuple[_Part, _Part]:
    """``(vision part, text part)`` by parameter name (vision_model, vision_tower,
    image_encoder, a VisionEncoderDecoder's encoder); the weights id is ``hf:<id>@<revision>``."""
    vision, text = [], []
    for name, p in captioner.model.named_parameters():
        (vision if _VISION.search(name) else text).append(p)
    weights = f"hf:{captioner.model_id}@{captioner.revision or 'local'}"
    return _Part(vision, weights), _Part(text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_")[-60:] or "model"


def _config(captioner: HFCaptioner, decoding: Decoding, dataset_spec: str, split: str,
            batch_size: int) -> dict:
    """The record's ``config``: the run config's keys (the schema asks for them), with the
    model as its encoder, ``hf:<model_type>`` as its decoder, no training (``epochs`` 0) and the
    decoding as generated."""
    kw = decoding.generate_kwargs
    return {"encoder": captioner.model_id, "decoder": f"hf:{captioner.model_type}",
            "decoder_hparams": {}, "dataset": dataset_spec, "seed": 0,
            "train": {"epochs": 0, "batch_size": None, "lr": None},
            "decode": {"beam_size": int(kw.get("num_beams", 1)),
                       "max_len": kw.get("max_length", kw.get("max_new_tokens")),
                       "min_len": kw.get("min_length", kw.get("min_new_tokens")),
                       "strategy": "beam" if kw.get("num_beams", 1) > 1 else "greedy",
                       "prompt": decoding.prompt},
            "features": {"batch_size": batch_size}, "evaluation_split": split,
            "reference": True}


def evaluate_hf(spec: str, dataset_spec: str, split: str = "test",
                options: HFEvalOptions | None = None):
    """``capbench eval --hf MODEL --dataset D``: caption split ``split`` of D with a pretrained
    captioner, score it and write a reference record.

    Scores come from :func:`benchmark.metrics.score_captions` with the split's image files (as
    :func:`benchmark.captioner.evaluate_run` scores a saved run), the paired test against the
    strongest blind baseline from :mod:`benchmark.image_use`, and the record from
    :func:`benchmark.records.make_record` with its ``reference_model`` block
    (:meth:`HFCaptioner.reference_block`).

    Args:
        spec: a Hugging Face model id or a folder saved with ``save_pretrained``.
        dataset_spec: ``shapes``, ``shapes:N`` or a Karpathy dataset.json.
        split: ``train``, ``val`` or ``test``.
        options: decoding overrides, batch size, device and results folder
            (:class:`HFEvalOptions`).

    Returns:
        ``(captioner, record, path)``.

    Raises:
        ConfigError: the model cannot be loaded or is not a captioner (:func:`load_captioner`),
            bad decoding flags or device.
        DatasetError: a bad dataset, an empty split or an unreadable image.
    """
    opts = options or HFEvalOptions()
    check_split(split)
    device = select_device(opts.device)
    ds = resolve_dataset(dataset_spec)
    images = ds.split(split)
    if not images:
        raise DatasetError(f"{dataset_spec}: split {split!r} has no images")
    captioner = load_captioner(spec, device)
    decoding = decoding_for(captioner.family, beam_size=opts.beam_size, max_len=opts.max_len,
                            min_len=opts.min_len, prompt=opts.prompt)
    t0 = time.perf_counter()
    predictions, images_per_s = caption_images(captioner, images, decoding,
                                               batch_size=max(1, opts.batch_size))
    scores = score_captions(predictions, ds.references(split), images=ds.image_files(split),
                            options=MetricOptions.from_env(device=str(device)))
    baselines = baseline_scores(ds, split=split)
    blind = vs_blind({"image_ids": scores.image_ids, "CIDEr": scores.per_image["CIDEr"]}, baselines)
    vision, text = _parts(captioner)
    cfg = _config(captioner, decoding, dataset_spec, split, opts.batch_size)
    record = make_record(
        run_id=new_run_id(f"hf-{_slug(captioner.model_type)}", _slug(spec), 0), config=cfg,
        scored=ScoredSplit(ds, split, scores, predictions),
        model=RecordedModel(vision, text, len(captioner.tokenizer),
                            reference=captioner.reference_block(decoding)), training=None,
        throughput=ThroughputBlock(None, None, images_per_s, None, None, False,
                                   cfg["decode"]["beam_size"]),
        device=device, started=t0,
        image_use={"shuffle": None, "vs_blind": blind,
                   "baselines": {k: {x: v for x, v in b.items() if x != "per_image"}
                                 for k, b in baselines.items()}})
    return captioner, record, write_record(record, opts.results_dir)


@dataclass
class ReferenceOutcome:
    """What became of one of a matrix's ``references``: ``status`` ``ok`` (scored now),
    ``done`` (its record was already in the results folder) or ``failed`` (``error`` says why,
    e.g. offline without the weights); ``record`` unless it failed."""

    model: str
    status: str
    record: object = None
    error: str = ""
    seconds: float = 0.0


def run_references(models: list[str], dataset_spec: str, *, device: str = "auto",
                   results_dir: str | Path = "results", first_shard: bool = True,
                   on_reference=None) -> list[ReferenceOutcome]:
    """Score a matrix's ``references`` (hub ids or folders) on its dataset's test split with the
    families' default decoding (:func:`evaluate_hf`), once: a model whose reference record of
    this split is already in ``results_dir`` is ``done``. On a shard other than the first
    (``first_shard`` False) nothing runs, so a sharded matrix scores each reference once. A
    model that cannot be scored (a CapbenchError: offline, not a captioner) is ``failed`` and
    the others still run; ``on_reference(outcome)`` is called after each."""
    if not models or not first_shard:
        return []
    fingerprint = resolve_dataset(dataset_spec).fingerprint
    have = {(r.reference_model.get("model_id"), r.split_fingerprint): r
            for r in load_records(results_dir)[0] if r.reference_model}
    out = []
    for model in models:
        t0 = time.perf_counter()
        if (model, fingerprint) in have:
            outcome = ReferenceOutcome(model, "done", have[(model, fingerprint)])
        else:
            try:
                _, record, _ = evaluate_hf(model, dataset_spec, "test", HFEvalOptions(
                    device=device, results_dir=results_dir))
                outcome = ReferenceOutcome(model, "ok", record)
            except CapbenchError as exc:
                outcome = ReferenceOutcome(model, "failed", error=str(exc))
        outcome.seconds = time.perf_counter() - t0
        out.append(outcome)
        if on_reference:
            on_reference(outcome)
    return out
