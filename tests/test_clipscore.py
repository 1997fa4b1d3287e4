"""CLIP-S / RefCLIP-S (Hessel et al., 2021) and PAC-S / RefPAC-S, offline: a random-initialised
open_clip ViT-B/32 saved to a file stands in for OpenAI's weights, and every number is checked
against the paper's definition computed here independently, in a few lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.data import load_karpathy
from benchmark.imagefile import open_rgb
from benchmark.metrics import MetricOptions, score_captions
from benchmark.metrics import clipscore as cs
from benchmark.records import load_record
from benchmark.report import leaderboard, render_markdown
from benchmark.stats import bootstrap_ci

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def shapes(tiny_shapes):
    """Predictions (each image's first caption, or another image's, so scores vary),
    references (the other four) and image files of 12 `shapes` images."""
    ims = [im for im in load_karpathy(tiny_shapes).images if im.split != "train"]
    preds = {im.image_id: ims[(k * 5) % len(ims)].captions[0] for k, im in enumerate(ims)}
    refs = {im.image_id: list(im.captions[1:]) for im in ims}
    return preds, refs, {im.image_id: im.path for im in ims}


@pytest.fixture(scope="module")
def weights(shapes, tmp_path_factory):
    """A random-init ViT-B/32 (QuickGELU, as OpenAI's) saved as a state dict. Its text
    projection is made orthogonal to the mean image embedding of the test images, so that
    image-caption cosines take both signs (a raw random CLIP gives every pair about -0.05,
    and the clamp at 0 would hide everything). Returns ``(file, model)``."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()
    pre = _paper_transform()
    with torch.no_grad():
        img = model.encode_image(torch.stack([pre(open_rgb(p)) for p in shapes[2].values()]))
        u = torch.nn.functional.normalize(img.mean(0), dim=0)
        model.text_projection -= (model.text_projection @ u)[:, None] * u[None]
    path = tmp_path_factory.mktemp("clip") / "vit-b-32-random.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _paper_transform():
    """clipscore.py's image transform, written out."""
    return T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@torch.no_grad()
def _paper_cosines(model, preds, refs, images):
    """Per image, cos(image, candidate) and the best cos(candidate, reference) (Hessel et al.,
    Sec. 3 and 4: prompted captions, L2-normalised embeddings)."""
    def text(captions):
        e = model.encode_text(open_clip.tokenize(["A photo depicts " + c for c in captions]))
        return e / e.norm(dim=1, keepdim=True)

    ids = list(preds)
    v = model.encode_image(torch.stack([_paper_transform()(Image.open(images[i]).convert("RGB"))
                                        for i in ids]))
    v = v / v.norm(dim=1, keepdim=True)
    c = text([preds[i] for i in ids])
    best = torch.stack([(text(refs[i]) @ c[k]).max() for k, i in enumerate(ids)])
    return (v * c).sum(1), best


def _paper_scores(cos, best, w):
    """CLIP-S = w * max(cos, 0); RefCLIP-S = harmonic mean of CLIP-S and the best reference
    cosine."""
    clip_s = w * torch.clamp(cos, min=0)
    return clip_s, 2 * clip_s * best / (clip_s + best)


def _options(weights, tmp_path, **kw):
    return MetricOptions(clip_weights=weights[0], cache_dir=tmp_path / "emb", **kw)


def test_per_image_clip_s_and_refclip_s_equal_the_papers_definition(shapes, weights, tmp_path):
    preds, refs, images = shapes
    res = score_captions(preds, refs, metrics=("CLIP-S", "RefCLIP-S"), images=images,
                         options=_options(weights, tmp_path))
    cos, best = _paper_cosines(weights[1], preds, refs, images)
    clip_s, ref_clip_s = _paper_scores(cos, best, 2.5)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp at 0 matters on this set
    np.testing.assert_allclose(res.per_image["CLIP-S"], clip_s.numpy(), atol=1e-6)
    np.testing.assert_allclose(res.per_image["RefCLIP-S"], ref_clip_s.numpy(), atol=1e-6)
    assert res.metrics["CLIP-S"] == pytest.approx(float(clip_s.double().mean()), abs=1e-6)
    assert res.metrics["RefCLIP-S"] == pytest.approx(float(ref_clip_s.double().mean()), abs=1e-6)
    assert "weights=vit-b-32-random.pt" in res.sources["CLIP-S"]
    # the same file as a PAC-S checkpoint: the same cosines with w = 2.0 instead of 2.5
    pac = score_captions(preds, refs, metrics=("PAC-S", "RefPAC-S"), images=images,
                         options=_options(weights, tmp_path, pacs_weights=weights[0]))
    pac_s, ref_pac_s = _paper_scores(cos, best, 2.0)
    np.testing.assert_allclose(pac.per_image["PAC-S"], pac_s.numpy(), atol=1e-6)
    np.testing.assert_allclose(pac.per_image["RefPAC-S"], ref_pac_s.numpy(), atol=1e-6)


def test_the_constants_of_the_definition():
    """w = 2.5 (CLIP-S) and 2.0 (PAC-S), the clamp at 0, the harmonic mean, the prompt."""
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    cand = torch.tensor([[0.6, 0.8], [-0.6, 0.8], [0.6, 0.8]])
    assert cs.clip_s(image, cand).tolist() == pytest.approx([2.5 * 0.6, 0.0, 2.5 * 1.0])
    assert cs.clip_s(image, cand, cs.PACS_W).tolist() == pytest.approx([1.2, 0.0, 2.0])
    assert cs.harmonic_mean(torch.tensor([1.5]), torch.tensor([0.5])).item() == pytest.approx(0.75)
    refs = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])] * 3
    assert cs.best_reference_cosine(cand, refs).tolist() == pytest.approx([0.8, 0.8, 0.8])
    assert (cs.CLIP_W, cs.PACS_W, cs.PROMPT) == (2.5, 2.0, "A photo depicts ")


def test_captions_are_prompted_and_cut_to_77_tokens(weights):
    clip = cs.load_clip(weights[0])
    ids = cs.tokenize(clip, ["a red circle"])
    assert torch.equal(ids, open_clip.tokenize(["A photo depicts a red circle"]))
    long = " ".join(["red circle"] * 60)
    tokens = cs.tokenize(clip, [long, long + " and a blue square"])
    assert tokens.shape == (2, cs.CONTEXT_LENGTH) == (2, 77)
    assert (tokens[:, -1] == clip.tokenizer.eot_token_id).all()  # the end token is kept last
    assert torch.equal(tokens[0], tokens[1])  # words past the cut change nothing
    emb = cs.text_embeddings(clip, [long, long + " and a blue square"])
    assert torch.equal(emb[0], emb[1])


def test_image_embeddings_are_encoded_once_per_image_set(shapes, weights, tmp_path, monkeypatch):
    preds, refs, images = shapes
    first = score_captions(preds, refs, metrics=("CLIP-S",), images=images,
                           options=_options(weights, tmp_path))
    assert len(list((tmp_path / "emb").glob("clip-*.npy"))) == 1

    def no_encoding(*a, **k):
        raise AssertionError("images encoded again")

    monkeypatch.setattr(cs, "_encode_images", no_encoding)
    again = score_captions(preds, refs, metrics=("CLIP-S",), images=images,
                           options=_options(weights, tmp_path))
    assert again.per_image["CLIP-S"] == first.per_image["CLIP-S"]


def test_without_weights_or_images_the_metric_says_why(shapes, tmp_path, monkeypatch):
    preds, refs, images = shapes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    res = score_captions(preds, refs, metrics=("CIDEr", "CLIP-S", "RefCLIP-S"), images=images)
    assert res.metrics["CLIP-S"] is None and res.metrics["RefCLIP-S"] is None
    assert res.metrics["CIDEr"] > 0  # the other metrics are scored as before
    why = res.unavailable["CLIP-S"]
    assert "HF_HUB_OFFLINE" in why and "--clip-weights" in why and "vit_base_patch32" in why
    bad = tmp_path / "not-weights.pt"
    bad.write_text("hello")
    res = score_captions(preds, refs, metrics=("CLIP-S",), images=images,
                         options=MetricOptions(clip_weights=bad))
    assert res.metrics["CLIP-S"] is None and str(bad) in res.unavailable["CLIP-S"]
    res = score_captions(preds, refs, metrics=("CLIP-S",), options=MetricOptions(clip_weights=bad))
    assert "needs the image files" in res.unavailable["CLIP-S"]


def test_a_run_without_weights_completes_and_its_record_says_why(tiny_run):
    _, record = tiny_run
    assert record.metrics["CLIP-S"] is None and record.metrics["PAC-S"] is None
    assert "--clip-weights" in record.metrics_unavailable["CLIP-S"]
    assert "--pacs-weights" in record.metrics_unavailable["RefPAC-S"]
    assert record.metrics["CIDEr"] is not None


def test_eval_and_eval_run_carry_clip_s_with_intervals(shapes, weights, tiny_run, tiny_shapes,
                                                       tmp_path, monkeypatch):
    monkeypatch.delenv("CAPBENCH_CLIP_WEIGHTS", raising=False)  # --clip-weights sets it: undone
    preds, _, _ = shapes
    val = {im.image_id for im in load_karpathy(tiny_shapes).split("val")}
    p = tmp_path / "preds.json"
    p.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds.items() if i in val]))
    runner = CliRunner()
    out = runner.invoke(app, ["eval", str(p), "--references", str(tiny_shapes),
                              "--split", "val", "--clip-weights", str(weights[0]), "--format",
                              "json"])
    assert out.exit_code == 0, out.output
    ev = json.loads(out.output)
    for m in ("CLIP-S", "RefCLIP-S"):
        lo, hi = ev["confidence_intervals"][m]
        assert lo <= ev["metrics"][m] <= hi and lo < hi
    assert "PAC-S" in ev["unavailable"]

    results, record = tiny_run  # eval --run writes a record: into a copy, not the shared folder
    results = Path(shutil.copytree(results, tmp_path / "results"))
    out = runner.invoke(app, ["eval", "--run", record.run_id, "--dataset", str(tiny_shapes),
                              "--results-dir", str(results), "--clip-weights", str(weights[0]),
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    saved = json.loads(open(got["record"]).read())
    lo, hi = saved["confidence_intervals"]["CLIP-S"]
    assert lo <= saved["metrics"]["CLIP-S"] <= hi
    assert len(saved["per_image"]["RefCLIP-S"]) == len(saved["per_image"]["image_ids"])
    assert saved["metric_sources"]["CLIP-S"].startswith("open_clip ")
    cis = bootstrap_ci(saved["per_image"])
    assert cis["CLIP-S"] == pytest.approx(saved["confidence_intervals"]["CLIP-S"])
    board = leaderboard([load_record(got["record"]), record], baselines=False)
    assert board["CLIP-S"].tolist()[0] == pytest.approx(saved["metrics"]["CLIP-S"])
    assert "| CLIP-S | RefCLIP-S |" in render_markdown(board)  # the board's wide columns


def test_a_missing_weights_file_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPBENCH_CLIP_WEIGHTS", raising=False)
    out = CliRunner().invoke(app, ["eval", "x.json", "--references", "coco-val2014",
                                   "--clip-weights", str(tmp_path / "nope.pt")])
    assert out.exit_code == 2
    assert "--clip-weights" in out.output and "nope.pt: no such file" in out.output
