"""Pretrained Hugging Face captioners as reference rows (issue 27): ``capbench eval --hf``.

Tiny random BLIP, GIT and VisionEncoderDecoder (ViT + GPT-2) models, built here from small
configurations like those of transformers' own tests (``tests/models/{blip,git,
vision_encoder_decoder}``), saved with ``save_pretrained`` and run end to end offline on the
40-image shapes set. Each record validates against the schema, shows on the board as a
reference row, and holds the captions that calling the model's ``generate`` directly gives.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.errors import ConfigError
from benchmark.hf_captioners import FAMILIES, decoding_for
from benchmark.records import SCHEMA_PATH, load_records

WORDS = ("a picture of photo red green blue yellow circle square triangle small large big the on "
         "left right top bottom and in with").split()
#: the settings of every eval below: few tokens (CPU time), at least 2 new ones (non-empty
#: captions); BLIP's lengths count its prompt ([BOS] a picture of), as LAVIS's do
FLAGS = ["--device", "cpu", "--batch-size", "4"]
LENGTHS = {"blip": ["--max-len", "9", "--min-len", "6"], "git": ["--max-len", "6", "--min-len", "2"],
           "ved": ["--max-len", "6", "--min-len", "2"]}
FAMILY_NAMES = ("blip", "git", "ved")


def _tokenizer(folder):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *WORDS]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def _layers(**extra) -> dict:
    """A 2-layer, 32-wide transformer with large random weights (varied captions)."""
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                initializer_range=0.5, **extra)


def _save_blip(folder):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _tokenizer(folder / "vocab")
    text = _layers(vocab_size=len(tok), max_position_embeddings=64, bos_token_id=2,
                   sep_token_id=3, pad_token_id=0, eos_token_id=3)
    cfg = BlipConfig(vision_config=_layers(image_size=32, patch_size=8), text_config=text,
                     projection_dim=32, initializer_range=0.5)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)


def _save_git(folder):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = _tokenizer(folder / "vocab")
    cfg = GitConfig(vision_config=_layers(image_size=32, patch_size=8), vocab_size=len(tok),
                    max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                    **_layers())
    GitForCausalLM(cfg).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)


def _save_ved(folder):
    """ViT + GPT-2, as nlpconnect/vit-gpt2-image-captioning (image processor and tokenizer,
    no processor config)."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tok = _tokenizer(folder / "vocab")
    enc = ViTConfig(image_size=32, patch_size=8, **_layers())
    dec = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=2, eos_token_id=3, add_cross_attention=True, is_decoder=True,
                     initializer_range=0.5)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    VisionEncoderDecoderModel(config=cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.fixture(scope="module")
def offline():
    """No network for the module: the hub is off, as in this project's CI."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield mp


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict:
    """``{family: folder}`` of the three tiny random captioners (seeded)."""
    root = tmp_path_factory.mktemp("hf-models")
    out = {}
    for name, save in (("blip", _save_blip), ("git", _save_git), ("ved", _save_ved)):
        torch.manual_seed(0)
        save(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def hf_runs(offline, hf_models, tiny_shapes, tmp_path_factory):
    """``capbench eval --hf FOLDER --dataset tiny_shapes`` of each model, offline: ``(results
    folder, {family: record}, {family: the command's JSON})``."""
    results = tmp_path_factory.mktemp("hf-results")
    runner, records, shown = CliRunner(), {}, {}
    for name, folder in hf_models.items():
        out = runner.invoke(app, ["eval", "--hf", str(folder), "--dataset", str(tiny_shapes),
                                  "--results-dir", str(results), "--format", "json", *FLAGS,
                                  *LENGTHS[name]])
        assert out.exit_code == 0, out.output
        shown[name] = json.loads(out.stdout)
    by_path = {r.path: r for r in load_records(results)[0]}
    for name in hf_models:
        records[name] = by_path[shown[name]["record"]]
    return results, records, shown


def _direct_captions(folder, record) -> list[str]:
    """The record's test images captioned by calling the model's ``generate`` directly with the
    record's settings (its generate arguments and prompt), in one batch, outside capbench."""
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        BlipForConditionalGeneration,
        GitForCausalLM,
        VisionEncoderDecoderModel,
    )

    cls = {"blip": BlipForConditionalGeneration, "git": GitForCausalLM,
           "vision-encoder-decoder": VisionEncoderDecoderModel}[record.reference_model["model_type"]]
    model = cls.from_pretrained(folder).eval()
    decoding = record.reference_model["decoding"]
    pictures = [Image.open(f"{folder_of(record)}/{p['filename']}").convert("RGB")
                for p in record.predictions]
    if cls is VisionEncoderDecoderModel:
        tok = AutoTokenizer.from_pretrained(folder)
        inputs = {"pixel_values": AutoImageProcessor.from_pretrained(folder)(
            images=pictures, return_tensors="pt")["pixel_values"]}
    else:
        proc = AutoProcessor.from_pretrained(folder)
        tok = proc.tokenizer
        text = {"text": [decoding["prompt"]] * len(pictures)} if decoding["prompt"] else {}
        inputs = dict(proc(images=pictures, return_tensors="pt", **text))
    with torch.inference_mode():
        out = model.generate(**inputs, **decoding["generate_kwargs"])
    texts = [" ".join(t.split()) for t in tok.batch_decode(out, skip_special_tokens=True)]
    prompt = (decoding["prompt"] or "").strip()
    return [t[len(prompt):].strip() if prompt and t.startswith(prompt) else t for t in texts]


def folder_of(record):
    """The folder of the record's dataset images (the shapes set's ``images/``)."""
    from benchmark.data import load_karpathy

    ds = load_karpathy(record.dataset.path)
    return ds.split("test")[0].path.parent


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_record_validates_and_says_it_is_a_reference(hf_runs, hf_models, name):
    """The record validates against the schema; its reference_model names the model, its class,
    its parameter count and the decoding used; nothing is claimed as trained here."""
    import jsonschema

    _, records, shown = hf_runs
    r = records[name]
    data = json.loads(open(r.path).read())
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))
    ref = data["reference_model"]
    cls = {"blip": "BlipForConditionalGeneration", "git": "GitForCausalLM",
           "ved": "VisionEncoderDecoderModel"}[name]
    assert ref["class"] == cls and ref["model_id"] == str(hf_models[name])
    assert ref["pretrained_elsewhere"] is True and "COCO" in ref["note"]
    assert ref["revision"] is None and ref["dtype"] == "float32"  # a local folder, on the CPU
    assert ref["parameters"] == data["parameters"]["total"] > 0
    assert data["training"] == {} and data["config"]["train"]["epochs"] == 0
    assert data["arch"] == f"hf:{ref['model_type']}" and data["pretrained"] is True
    kwargs = ref["decoding"]["generate_kwargs"]
    if name == "blip":  # LAVIS's beam 3 and prompt, the flags' lengths
        assert kwargs == {"num_beams": 3, "max_length": 9, "min_length": 6}
        assert ref["decoding"]["prompt"] == "a picture of "
        assert "LAVIS" in ref["decoding"]["source"] and "--max-len" in ref["decoding"]["source"]
    else:  # the model's generation_config, the flags' lengths in new tokens
        assert kwargs == {"max_new_tokens": 6, "min_new_tokens": 2}
    assert data["throughput"]["inference_images_per_s"] > 0
    assert len(data["predictions"]) == data["dataset"]["sizes"]["test"] == 6
    assert sum(bool(p["caption"]) for p in data["predictions"]) >= 4  # random models: words,
    # and now and then only special tokens (an empty caption, scored as such)
    assert data["image_use"]["shuffle"] is None and "better" in data["image_use"]["vs_blind"]
    assert shown[name]["reference_model"] == ref


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_captions_equal_calling_generate_directly(hf_runs, hf_models, name):
    """capbench's captions are what the model's own generate gives with the same settings."""
    _, records, _ = hf_runs
    r = records[name]
    assert [p["caption"] for p in r.predictions] == _direct_captions(hf_models[name], r)


def test_board_shows_reference_rows_never_as_cells(hf_runs, tmp_path):
    """On the board each model is a reference row (``BLIP (pretrained)``), beside the blind
    baselines, with the key to reference rows; plots draw them as labelled levels."""
    from benchmark.plots import quality_vs_throughput_figure, write_plots
    from benchmark.report import aggregate_seeds, leaderboard, render_markdown

    results, records, _ = hf_runs
    board = leaderboard(list(records.values()))
    refs = board[board["kind"] == "reference"]
    assert sorted(refs["arch"]) == ["BLIP (pretrained)", "GIT (pretrained)",
                                    "VisionEncoderDecoder (pretrained)"]
    assert (board["kind"] == "run").sum() == 0 and (board["kind"] == "baseline").sum() == 2
    agg = aggregate_seeds(board)
    assert sorted(agg[agg["kind"] == "reference"]["arch"]) == sorted(refs["arch"])
    text = render_markdown(board)
    assert "BLIP (pretrained)" in text and "Reference rows: NAME (pretrained)" in text
    fig = quality_vs_throughput_figure(board, "t")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(lab.startswith("BLIP (pretrained)") for lab in labels)
    assert len(write_plots(board, tmp_path / "plots")) == 2
    out = CliRunner().invoke(app, ["report", "--results-dir", str(results), "--format", "markdown",
                                   "--no-leaderboard-file"])
    assert out.exit_code == 0 and "GIT (pretrained)" in out.stdout, out.output


def test_compare_and_gallery_accept_reference_rows(hf_runs, tmp_path):
    """``compare`` tests two reference rows on their per-image scores; the gallery shows their
    captions (no attention strip, and no complaint about it)."""
    results, records, _ = hf_runs
    runner = CliRunner()
    out = runner.invoke(app, ["compare", records["blip"].run_id, records["git"].run_id,
                              "--results-dir", str(results), "--resamples", "200"])
    assert out.exit_code == 0, out.output
    assert "CIDEr" in out.output
    out = runner.invoke(app, ["report", "--results-dir", str(results), "--gallery",
                              str(tmp_path / "g"), "--no-leaderboard-file", "--format", "csv"])
    assert out.exit_code == 0, out.output
    assert "no attention strips" not in out.output
    page = "".join(p.read_text() for p in (tmp_path / "g").glob("*.html") if p.name != "index.html")
    assert "BLIP (pretrained)" in page
    assert records["blip"].predictions[0]["caption"] in page


def test_caption_explain_and_eval_run_say_why_not(hf_runs, tiny_shapes):
    """A reference row has no capbench checkpoint: caption, explain and eval --run say so."""
    results, records, _ = hf_runs
    rid = records["git"].run_id
    image = str(folder_of(records["git"]) / records["git"].predictions[0]["filename"])
    runner = CliRunner()
    for args in (["caption", image, "--run", rid], ["explain", image, "--run", rid],
                 ["eval", "--run", rid, "--dataset", str(tiny_shapes)]):
        out = runner.invoke(app, [*args, "--results-dir", str(results)])
        assert out.exit_code == 2, out.output
        assert "is a reference row" in out.output and "eval --hf" in out.output
        assert "Traceback" not in out.output


def _error(args) -> str:
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    assert out.output.count("error:") == 1 and "Traceback" not in out.output
    return " ".join(out.output.split())


def test_bad_models_and_offline_give_clear_errors(offline, tiny_shapes, tmp_path):
    """Not a captioner: the supported classes are named. Offline without the model: the model
    and how to fetch it. A folder without config.json, a malformed id, mixed forms."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(tmp_path / "bert")
    ds = ["--dataset", str(tiny_shapes), "--results-dir", str(tmp_path / "r")]
    msg = _error(["eval", "--hf", str(tmp_path / "bert"), *ds])
    assert "'bert'" in msg and "not an image captioner" in msg
    assert "BlipForConditionalGeneration" in msg and "AutoModelForImageTextToText" in msg
    offline.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    msg = _error(["eval", "--hf", "Salesforce/blip-image-captioning-base", *ds])
    assert "Salesforce/blip-image-captioning-base is not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg
    assert "huggingface-cli download Salesforce/blip-image-captioning-base" in msg
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(["eval", "--hf", str(tmp_path / "empty"), *ds])
    assert "nor a valid Hugging Face model id" in _error(["eval", "--hf", "bad id!", *ds])
    assert "no such folder" in _error(["eval", "--hf", "./missing/folder", *ds])
    assert "not both" in _error(["eval", "--hf", "x", "--run", "y", *ds])
    assert "needs both --hf and --dataset" in _error(["eval", "--hf", "x"])
    assert "not both" in _error(["eval", "p.json", "--references", "r.json", "--hf", "x"])
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


def test_family_defaults_follow_lavis_and_flags_override():
    """BLIP: beam 3, length 5-20, prompt 'a picture of '; BLIP-2: beam 5, 8-30; others: their
    generation_config (no arguments); flags win and the source says so."""
    blip = decoding_for(FAMILIES["blip"])
    assert blip.generate_kwargs == {"num_beams": 3, "max_length": 20, "min_length": 5}
    assert blip.prompt == "a picture of " and "caption_coco" in blip.source
    blip2 = decoding_for(FAMILIES["blip-2"])
    assert blip2.generate_kwargs == {"num_beams": 5, "max_length": 30, "min_length": 8}
    assert decoding_for(FAMILIES["git"]).generate_kwargs == {}
    assert decoding_for(FAMILIES["florence2"]).prompt == "<CAPTION>"
    assert decoding_for(FAMILIES["paligemma"]).prompt == "caption en"
    d = decoding_for(FAMILIES["blip"], beam_size=1, max_len=12, prompt="")
    assert d.generate_kwargs == {"num_beams": 1, "max_length": 12, "min_length": 5}
    assert d.prompt is None and re.search(r"overridden by --beam-size, --max-len, --prompt", d.source)
    with pytest.raises(ConfigError, match="above --max-len"):
        decoding_for(FAMILIES["blip"], max_len=4)
    with pytest.raises(ConfigError, match="--beam-size 0"):
        decoding_for(FAMILIES["git"], beam_size=0)


def test_matrix_references_run_once_and_failures_do_not_stop_the_others(hf_runs, hf_models,
                                                                        tiny_shapes, tmp_path):
    """A matrix config's ``references:`` list is read; each is scored once (already recorded:
    ``done``; not on a later shard); one that cannot be loaded fails alone."""
    from benchmark.hf_captioners import run_references
    from benchmark.matrix import matrix_plan

    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"matrix:\n  archs: [lstm]\n  encoders: [resnet50]\n  references: "
                   f"[{hf_models['blip']}, {hf_models['git']}]\n")
    plan = matrix_plan(str(cfg), None, None, None, 0)
    assert plan.references == [str(hf_models["blip"]), str(hf_models["git"])]
    results, records, _ = hf_runs
    seen = []
    out = run_references([*plan.references, str(tmp_path / "missing")], str(tiny_shapes),
                         device="cpu", results_dir=results, on_reference=seen.append)
    assert [o.status for o in out] == ["done", "done", "failed"] and seen == out
    assert out[0].record.run_id == records["blip"].run_id and "no such folder" in out[2].error
    assert run_references(plan.references, str(tiny_shapes), results_dir=results,
                          first_shard=False) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("matrix:\n  references: []\n")
    with pytest.raises(ConfigError, match="references: give a non-empty list"):
        matrix_plan(str(bad), None, None, None, 0)
