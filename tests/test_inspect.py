"""Inspecting saved runs: caption files, eval --run, explain (attention / Grad-CAM), ground."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from benchmark.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def loaded(tiny_run):
    from benchmark.checkpoint import load_run

    results, record = tiny_run
    return load_run(record.run_id, results)


def _test_files(tiny_shapes, record):
    return [tiny_shapes.parent / "images" / p["filename"] for p in record.predictions]


# ------------------------------------------------------------------------------- caption
@pytest.mark.slow
def test_caption_reproduces_the_records_test_predictions(tiny_run, tiny_shapes):
    results, record = tiny_run
    files = _test_files(tiny_shapes, record)
    out = _invoke("caption", *files, "--run", record.run_id, "--results-dir", results,
                  "--format", "json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert [g["file_name"] for g in got] == [f.name for f in files]
    assert [g["caption"] for g in got] == [p["caption"] for p in record.predictions]
    assert got[0]["image_id"] == files[0].stem  # non-numeric stem stays a string


@pytest.mark.slow
def test_caption_with_latest_a_folder_and_a_glob(tiny_run, tiny_shapes, tmp_path):
    results, record = tiny_run
    files = _test_files(tiny_shapes, record)[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"{i + 7}.png")  # numeric stems -> integer image ids
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    out = _invoke("caption", folder, "--run", "latest", "--results-dir", results, "--format", "json")
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert [g["image_id"] for g in got] == [7, 8, 9]
    assert [g["caption"] for g in got] == [p["caption"] for p in record.predictions[:3]]
    by_glob = _invoke("caption", str(folder / "*.png"), "--run", record.run_id[-6:],
                      "--results-dir", results, "--format", "json")
    assert by_glob.exit_code == 0, by_glob.output
    assert json.loads(by_glob.stdout) == got


@pytest.mark.slow
def test_a_bad_file_is_named_and_skipped_and_the_exit_code_is_1(tiny_run, tiny_shapes, tmp_path):
    results, record = tiny_run
    good = _test_files(tiny_shapes, record)[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    out = _invoke("caption", good[0], bad, good[1], tmp_path / "missing.jpg", "--run",
                  record.run_id, "--results-dir", results, "--format", "json")
    assert out.exit_code == 1
    assert "broken.png" in out.stderr and "not an image" in out.stderr
    assert "missing.jpg" in out.stderr and "no such file" in out.stderr
    got = json.loads(out.stdout)
    assert [g["file_name"] for g in got] == [good[0].name, good[1].name]
    assert "Traceback" not in out.output


def test_unknown_run_and_latest_without_records_are_clear_errors(tmp_path, tiny_shapes):
    img = next((tiny_shapes.parent / "images").glob("*.png"))
    out = _invoke("caption", img, "--run", "nope", "--results-dir", tmp_path)
    assert out.exit_code == 2 and "no run record matches 'nope'" in out.stderr
    out = _invoke("caption", img, "--run", "latest", "--results-dir", tmp_path)
    assert out.exit_code == 2 and "no run record" in out.stderr


@pytest.mark.slow
def test_a_checkpoint_whose_encoder_differs_is_refused(tiny_run, tmp_path):
    from benchmark.checkpoint import CheckpointError, load_run

    results, record = tiny_run
    copy = tmp_path / "checkpoints" / record.run_id  # a moved checkpoint folder
    shutil.copytree(record.checkpoint, copy)
    ident = json.loads((copy / "encoder.json").read_text())
    (copy / "encoder.json").write_text(json.dumps({**ident, "weights": "random-init:seed=5"}))
    with pytest.raises(CheckpointError, match="weights: trained with 'random-init:seed=5'"):
        load_run(str(copy), results)
    (copy / "encoder.json").unlink()  # an older checkpoint: compared with the record instead
    assert load_run(str(copy), results).run_id == record.run_id
    anonymous = tmp_path / "ckpt"  # no encoder.json and no record: loads, with a warning
    shutil.copytree(copy, anonymous)
    with pytest.warns(UserWarning, match="cannot verify"):
        assert load_run(str(anonymous), tmp_path).run_id == "ckpt"
    (copy / "decoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete: decoder.safetensors missing"):
        load_run(str(copy), results)


# ------------------------------------------------------------------------------- eval --run
@pytest.mark.slow
def test_eval_run_on_the_same_test_split_reproduces_the_record(tiny_run, tiny_shapes, tmp_path):
    import jsonschema

    from benchmark.records import SCHEMA_PATH, load_record

    results, record = tiny_run
    out = _invoke("eval", "--run", record.run_id, "--dataset", tiny_shapes, "--results-dir",
                  results, "--format", "json")
    assert out.exit_code == 0, out.output
    info = json.loads(out.stdout)
    new = load_record(info["record"])
    jsonschema.validate(json.loads(open(info["record"]).read()), json.loads(SCHEMA_PATH.read_text()))
    assert new.evaluation == {"of": record.run_id, "split": "test",
                              "trained_on": record.dataset.name}
    assert new.config_id != record.config_id  # never folded with the trained run as a seed
    assert new.predictions == record.predictions
    for m in ("Bleu_4", "ROUGE_L", "CIDEr"):
        assert new.metrics[m] == pytest.approx(record.metrics[m], abs=1e-12)
    val = _invoke("eval", "--run", record.run_id, "--dataset", tiny_shapes, "--split", "val",
                  "--results-dir", results)
    assert val.exit_code == 0, val.output
    assert "run record:" in val.stdout
    for p in (results / "runs").glob("*.json"):  # keep the module's `latest` the trained run
        if p.stem != record.run_id:
            p.unlink()


def test_eval_needs_exactly_one_form(tiny_shapes):
    out = _invoke("eval", "preds.json", "--references", "coco-val2014", "--run", "x",
                  "--dataset", tiny_shapes)
    assert out.exit_code == 2 and "not both" in out.stderr
    out = _invoke("eval")
    assert out.exit_code == 2 and "--run RUN --dataset D" in out.stderr
    out = _invoke("eval", "--run", "x")
    assert out.exit_code == 2 and "needs both --run and --dataset" in out.stderr


# ------------------------------------------------------------------------------- explain
def _random_run(arch: str, loaded):
    """A LoadedRun with a freshly initialised decoder ``arch`` on the tiny run's encoder."""
    from architectures import create_decoder
    from benchmark.checkpoint import LoadedRun

    torch.manual_seed(0)
    enc = loaded.encoder
    dec = create_decoder(arch, len(loaded.tokenizer), enc.grid_dim, enc.pooled_dim,
                         {"embed_dim": 32, "hidden_dim": 64, "num_heads": 4, "num_layers": 2}).eval()
    return LoadedRun("random", loaded.folder, {**loaded.config, "decoder": arch}, enc, dec,
                     loaded.tokenizer, loaded.feature_stats, loaded.decode)


def _features(run, path):
    return run.raw_features(run.encoder.transform(Image.open(path).convert("RGB")).unsqueeze(0))


@pytest.mark.slow
def test_attention_maps_are_distributions_for_attn_lstm_and_transformer(loaded, tiny_shapes):
    from benchmark.explain import attention_maps, transformer_cross_attention

    img = next((tiny_shapes.parent / "images").glob("*.png"))
    grid, pooled = _features(loaded, img)
    ids = [5, 6, 7, 8]
    for run in (loaded, _random_run("transformer", loaded)):
        for layer in (-1, 0):
            maps = attention_maps(run, grid, pooled, ids, layer=layer)
            assert maps.shape == (4, grid.shape[1])
            assert (maps >= 0).all()
            assert torch.allclose(maps.sum(1), torch.ones(4), atol=1e-5)
    # the transformer weights are the ones the layer really applies: weights @ V = its output
    run = _random_run("transformer", loaded)
    g, p = run.normalize(grid, pooled)
    tokens, lengths = torch.tensor([[1, *ids[:-1]]]), torch.tensor([4])
    layer = run.decoder.layers[-1]
    seen = {}
    h = layer.cross_out.register_forward_hook(lambda m, i, o: seen.__setitem__("c", i[0]))
    with torch.no_grad():
        w = transformer_cross_attention(run.decoder, g, p, tokens, lengths, -1)
    h.remove()
    _, v = layer.memory_kv(run.decoder.visual(g))
    assert torch.allclose(layer._merge(w @ v), seen["c"], atol=1e-5)


@pytest.mark.slow
def test_attention_of_a_decoder_without_it_suggests_gradcam(loaded, tiny_shapes):
    from benchmark.explain import ExplainError, attention_maps, gradcam_maps

    img = next((tiny_shapes.parent / "images").glob("*.png"))
    grid, pooled = _features(loaded, img)
    for arch in ("rnn", "lstm"):
        run = _random_run(arch, loaded)
        with pytest.raises(ExplainError, match="has no attention.*--method gradcam"):
            attention_maps(run, grid, pooled, [5, 6])
        maps = gradcam_maps(run, grid, pooled, [5, 6])  # via the ResNet's mean-pooled vector
        assert maps.shape == (2, grid.shape[1]) and (maps.sum(1) > 0).all()


@pytest.mark.slow
def test_batched_gradcam_equals_one_backward_pass_per_word(loaded, tiny_shapes):
    from benchmark.explain import gradcam_maps

    img = next((tiny_shapes.parent / "images").glob("*.png"))
    grid, pooled = _features(loaded, img)
    ids = loaded.caption_ids(grid, pooled)[0][:4]
    maps = gradcam_maps(loaded, grid, pooled, ids)
    st = loaded.feature_stats
    for t in range(len(ids)):  # Selvaraju et al. eq. 1-2 for word t alone, on the z-scored grid
        raw = grid.clone().requires_grad_(True)
        g, p = loaded.normalize(raw, raw.mean(1))
        g.retain_grad()
        tokens = torch.tensor([[loaded.tokenizer.bos_id, *ids[:-1]]])
        logp = torch.log_softmax(loaded.decoder(g, p, tokens, torch.tensor([len(ids)])).logits, -1)
        logp[0, t, ids[t]].backward()
        # the gradient reaching the z-scored grid directly and through the pooled mean
        dA = raw.grad * st.grid_std
        cam = torch.relu((dA.mean(1, keepdim=True) * g.detach()).sum(-1))[0]
        expect = cam / cam.sum() if cam.sum() > 0 else cam
        assert torch.allclose(maps[t], expect, atol=1e-5)


@pytest.mark.slow
def test_gradcam_of_a_word_changes_when_its_object_is_blanked(loaded, tiny_shapes):
    """Paint the box of the object a colour/shape word names with the background colour and
    teacher-force the same caption: the word's Grad-CAM map must change. The maps are
    distributions over the 7x7 grid, so their L1 distance is in [0, 2] (twice the mass that
    moved); the same input gives exactly 0 (checked) and float noise is ~1e-6, so 0.02 (1% of
    the mass moved) is a measurable change, 4 orders of magnitude above noise. The bar is
    low on purpose: this 2-epoch model barely reads the image (0.06 measured for it; the
    20-epoch demo model moves far more, see the issue report)."""
    from benchmark.explain import gradcam_maps
    from benchmark.grounding import load_objects, matching_objects
    from benchmark.shapes import BACKGROUNDS

    data = json.loads(tiny_shapes.read_text())
    backgrounds = {e["filename"]: e["background"] for e in data["images"]}
    checked = []
    for entry in load_objects(tiny_shapes, "test"):
        img = Image.open(entry["path"]).convert("RGB")
        grid, pooled = _features(loaded, entry["path"])
        ids = loaded.caption_ids(grid, pooled)[0]
        words = loaded.tokenizer.decode(ids)
        hits = [(t, w, matching_objects(w, entry["objects"])) for t, w in enumerate(words)]
        hits = [(t, w, objs) for t, w, objs in hits if len(objs) == 1]
        if not hits:
            continue
        t, word, (obj,) = hits[0]
        before = gradcam_maps(loaded, grid, pooled, ids)[t]
        assert torch.equal(before, gradcam_maps(loaded, grid, pooled, ids)[t])
        blank = img.copy()
        ImageDraw.Draw(blank).rectangle(obj["bbox"], fill=BACKGROUNDS[backgrounds[entry["filename"]]])
        g2, p2 = loaded.raw_features(loaded.encoder.transform(blank).unsqueeze(0))
        after = gradcam_maps(loaded, g2, p2, ids)[t]
        checked.append((word, float((before - after).abs().sum())))
    assert checked, "no test image has a caption word naming exactly one of its objects"
    assert all(diff > 0.02 for _, diff in checked), checked


@pytest.mark.slow
def test_explain_writes_one_png_per_image(tiny_run, tiny_shapes, tmp_path):
    results, record = tiny_run
    img = _test_files(tiny_shapes, record)[0]
    for method in ("attention", "gradcam"):
        out = _invoke("explain", img, "--run", record.run_id, "--results-dir", results,
                      "--method", method, "--out", tmp_path)
        assert out.exit_code == 0, out.output
        png = tmp_path / f"{img.stem}-{method}.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    out = _invoke("explain", img, "--run", record.run_id, "--results-dir", results,
                  "--method", "saliency", "--out", tmp_path)
    assert out.exit_code == 2 and "choose attention or gradcam" in out.stderr
    out = _invoke("explain", tmp_path / "nope.png", "--run", record.run_id, "--results-dir", results)
    assert out.exit_code == 2 and "nope.png does not exist" in out.stderr


@pytest.mark.slow
def test_upsampling_follows_the_encoders_crop(loaded):
    from benchmark.explain import Explanation, crop_geometry, upsample_map

    x0, x1, y0, y1 = crop_geometry(loaded.encoder.transform, (128, 128))
    # ResNet: resize to 256, centre crop 224 -> the central 112 px of a 128 px image
    assert (x0, x1, y0, y1) == pytest.approx((8, 120, 8, 120), abs=0.6)
    m = torch.zeros(1, 7, 7)
    m[0, 0, 6] = 1.0  # top-right cell
    up = upsample_map(m, (x0, x1, y0, y1), (128, 128))[0]
    assert up[16, 112] == pytest.approx(1.0, abs=0.05)  # the cell's centre: (8 + 16 * 6.5, 8 + 16 * 0.5)
    assert up[64, 64] == 0 and up[:, :7].sum() == 0 and up[:7].sum() == 0  # far away; outside the crop
    ex = Explanation(Image.new("RGB", (128, 128)), [5], ["red"], (7, 7), {"gradcam": m.view(1, 49)},
                     (x0, x1, y0, y1))
    (peak,) = ex.peaks("gradcam")
    assert peak == pytest.approx((111.5, 15.5), abs=0.6)  # pixel (112, 16) spans [112, 113)


# ------------------------------------------------------------------------------- grounding
def test_pointing_game_on_a_synthetic_map_that_peaks_inside_the_box():
    from benchmark.grounding import argmax_point, energy_in_boxes, point_hit

    boxes = [[10, 20, 40, 50], [70, 5, 90, 30], [30, 80, 60, 110]]
    hits = []
    for box in boxes:
        m = torch.zeros(128, 128)
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        m[cy, cx] = 1.0
        m[box[1] : box[3] + 1, box[0] : box[2] + 1] += 0.01
        hits.append(point_hit(argmax_point(m), [box], tolerance=15))
        assert energy_in_boxes(m, [box]) == pytest.approx(1.0)
        assert not point_hit((box[2] + 16, box[3]), [box], tolerance=15)  # 16 px right: miss
        assert point_hit((box[2] + 15, box[3]), [box], tolerance=15)
    assert sum(hits) / len(hits) == 1.0


def test_centre_baseline_matches_a_count_by_hand(tmp_path):
    """Three images of 100 x 100 px, centre (49.5, 49.5). By hand, with tolerance 10:
    a: red box [40, 40, 60, 60] holds the centre -> hit; b: red box [0, 0, 20, 20] is ~41 px
    away -> miss; c: blue box [55, 45, 70, 55] is 5.5 px right of the centre -> hit.
    So 2 of 3 words hit."""
    from benchmark.grounding import centre_point, matching_objects, point_hit

    images = [[{"color": "red", "shape": "square", "bbox": [40, 40, 60, 60]}],
              [{"color": "red", "shape": "circle", "bbox": [0, 0, 20, 20]}],
              [{"color": "blue", "shape": "circle", "bbox": [55, 45, 70, 55]}]]
    words = ["red", "red", "blue"]
    cp = centre_point((100, 100))
    assert cp == (49.5, 49.5)
    hits = [point_hit(cp, [o["bbox"] for o in matching_objects(w, objs)], tolerance=10)
            for w, objs in zip(words, images, strict=True)]
    assert hits == [True, False, True]
    assert matching_objects("disc", images[1]) == images[1]  # synonyms name the shape
    assert matching_objects("small", images[0]) == []  # sizes are not scored


@pytest.mark.slow
def test_ground_reports_fractions_for_every_method(tiny_run):
    results, record = tiny_run
    out = _invoke("ground", "--run", record.run_id, "--results-dir", results, "--format", "json",
                  "--details")
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert set(res["pointing"]) == set(res["energy_in_box"]) == {"attention", "gradcam", "centre",
                                                                  "random"}
    if res["words"]:
        for block in (res["pointing"], res["energy_in_box"]):
            assert all(v is None or 0 <= v <= 1 for v in block.values())
    assert len(res["details"]) == res["words"]
    table = _invoke("ground", "--run", record.run_id, "--results-dir", results)
    assert table.exit_code == 0 and "pointing game" in table.stdout


@pytest.mark.slow
def test_ground_saves_into_the_record_and_the_leaderboard_shows_it(tiny_run, tmp_path):
    import jsonschema

    from benchmark.records import SCHEMA_PATH, load_record
    from benchmark.report import leaderboard, render_markdown

    results, record = tiny_run
    path = results / "runs" / f"{record.run_id}.json"
    before = path.read_text()
    out = _invoke("ground", "--run", record.run_id, "--results-dir", results, "--format", "json",
                  "--tolerance", "5", "--no-save")
    assert out.exit_code == 0, out.output
    assert path.read_text() == before  # --no-save leaves the record alone
    before = {k: v for k, v in json.loads(before).items() if k != "grounding"}
    out = _invoke("ground", "--run", record.run_id, "--results-dir", results, "--format", "json",
                  "--tolerance", "5")
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))
    g = data["grounding"]
    assert g["pointing"] == res["pointing"] and g["words"] == res["words"]
    assert g["tolerance_px"] == 5 and g["split"] == "test" and g["random_seed"] == 0
    assert {k: v for k, v in data.items() if k != "grounding"} == before  # nothing else changed
    board = leaderboard([load_record(path)])
    run_row = board[board["kind"] == "run"].iloc[0]
    assert run_row["pointing_attention"] == res["pointing"]["attention"]
    md = render_markdown(board)
    assert "point att" in md and "point ctr" in md
    att = res["pointing"]["attention"]
    assert f"| {100 * att:.0f} |" in md


@pytest.mark.slow
def test_gallery_draws_an_attention_strip_per_word(tiny_run, tmp_path):
    import re

    results, record = tiny_run
    out = _invoke("report", "--results-dir", results, "--no-leaderboard-file", "--gallery",
                  tmp_path / "g", "--gallery-images", 3)
    assert out.exit_code == 0, out.output
    assert "3 attention strip(s)" in out.output
    page = next(p for p in (tmp_path / "g").glob("*.html") if p.name != "index.html")
    html = page.read_text(encoding="utf-8")
    strips = re.findall(r'<img class="strip" src="([^"]+)"', html)
    assert len(strips) == 3
    captions = {p["caption"] for p in record.predictions}
    for src in strips:
        with Image.open(page.parent / src) as im:
            words, rest = divmod(im.size[0], 64)
            assert rest == 0 and im.size[1] == 64 + 14
        assert any(min(len(c.split()), 16) == words for c in captions)  # at most 16 panels


@pytest.mark.slow
def test_ground_refuses_to_save_figures_of_another_dataset(tiny_run, tmp_path):
    from benchmark.shapes import generate_shapes

    results, record = tiny_run
    path = results / "runs" / f"{record.run_id}.json"
    before = path.read_text()
    other = generate_shapes(tmp_path / "other", 20, seed=7)
    out = _invoke("ground", "--run", record.run_id, "--results-dir", results, "--dataset", other)
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert f"--dataset {other} is not the dataset run {record.run_id} was trained on" in out.output
    assert "--no-save" in out.output
    assert path.read_text() == before  # nothing saved
    out = _invoke("ground", "--run", record.run_id, "--results-dir", results, "--dataset", other,
                  "--format", "json", "--no-save")
    assert out.exit_code == 0, out.output  # looking at another set without saving is fine
    assert json.loads(out.stdout)["images"] == 3
    assert path.read_text() == before
