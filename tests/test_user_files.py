"""Files users write or edit (configs, datasets, predictions, references, run records,
checkpoint files): never a traceback, never read ambiguously. Each bad file ends in one
`error:` line naming the file and the field (exit 2); a bad run record is skipped with its
reason while the board still renders."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from benchmark.check import load_baseline
from benchmark.cli import app
from benchmark.errors import RecordError
from benchmark.userfiles import MAX_YAML_NODES, describe, quote

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _fails(args, *messages, code=2):
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output
    assert result.exit_code == code, (args, out, result.exception)
    assert "Traceback" not in out, out
    assert out.count("error:") == 1, out
    for m in messages:
        assert m in out.replace("\n", ""), (args, m, out)
    return out


def _blocked(tmp_path) -> Path:
    """A --results-dir that cannot be created: a run that gets past its dataset stops there."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "r"


def _alias_bomb(levels: int = 6, width: int = 10) -> str:
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ntrain: {{epochs: *l{levels - 1}}}\n"


@pytest.mark.parametrize("text,messages", [
    ("train:\n  lr: 0.1\n  epochs: 1\n  lr: 0.5\n",
     ["key 'lr' appears twice in one mapping (line 2 and line 4)", "keep one"]),
    ("decoder: &d {hidden_dim: *d}\n", ["an alias refers to the value that holds it (line 1)"]),
    (_alias_bomb(), [f"expands to more than {MAX_YAML_NODES} values through its aliases"]),
    ("train: " + "[" * 3000 + "]" * 3000 + "\n", ["nested deeper than 100 levels"]),
])
def test_configs_that_yaml_would_read_silently_or_explosively_are_refused(tmp_path, text, messages):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = _fails(["run", "--config", config, "--dataset", tmp_path / "none.json",
                  "--results-dir", tmp_path / "r"], str(config), *messages)
    assert len(out) < 2000  # the bomb's values are not printed (it was a 312 MB message)


def _dataset_text(tiny_shapes) -> str:
    return tiny_shapes.read_text()


def _copy_dataset(tiny_shapes, tmp_path, text: str) -> Path:
    """``text`` as a dataset.json beside a link to the tiny set's images."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "images").symlink_to(tiny_shapes.parent / "images")
    (folder / "dataset.json").write_bytes(text.encode("utf-8"))
    return folder / "dataset.json"


def _edited(tiny_shapes, edit) -> str:
    data = json.loads(tiny_shapes.read_text())
    edit(data["images"][0])
    return json.dumps(data, indent=1)


@pytest.mark.parametrize("edit,message", [
    (lambda e: e.update(filepath=3), "images[0]: field 'filepath' must be a string, got integer 3"),
    (lambda e: e["sentences"][0].update(tokens="a red circle"),
     "images[0].sentences[0].tokens (image shapes_00000.png): must be a list of words (strings), "
     "got string 'a red circle'"),
    (lambda e: e["sentences"][0].update(tokens=["a", 7]),
     "images[0].sentences[0].tokens (image shapes_00000.png): must be a list of words (strings), "
     "got integer 7"),
    (lambda e: (e["sentences"][0].pop("tokens"), e["sentences"][0].update(raw=3)),
     "images[0].sentences[0].raw (image shapes_00000.png): a caption must be a string, got integer 3"),
    (lambda e: e.update(imgid=[1]),
     "images[0]: field 'imgid' (the image id) must be an integer or a string, got list [1]"),
    (lambda e: e.update(split=3), "images[0]: field 'split' must be a string, got integer 3"),
])
def test_dataset_fields_of_the_wrong_type_are_named(tiny_shapes, tmp_path, edit, message):
    path = _copy_dataset(tiny_shapes, tmp_path, _edited(tiny_shapes, edit))
    _fails(["run", "--config", "tiny", "--dataset", path, "--results-dir", _blocked(tmp_path)],
           str(path), message)


def test_a_dataset_key_given_twice_is_refused(tiny_shapes, tmp_path):
    text = _dataset_text(tiny_shapes).replace('"split": "train"', '"split": "train", "split": "test"', 1)
    path = _copy_dataset(tiny_shapes, tmp_path, text)
    _fails(["run", "--config", "tiny", "--dataset", path, "--results-dir", _blocked(tmp_path)],
           str(path), "the dataset gives key 'split' twice in one object", "keep one")


def test_a_byte_order_mark_is_read_as_utf8(tiny_shapes, tmp_path):
    """Windows editors write one: the dataset reads (the run stops later, at --results-dir)."""
    path = _copy_dataset(tiny_shapes, tmp_path, "\ufeff" + _dataset_text(tiny_shapes))
    _fails(["run", "--config", "tiny", "--dataset", path, "--results-dir", _blocked(tmp_path)],
           "results folder")
    preds, refs = tmp_path / "p.json", tmp_path / "refs.json"
    preds.write_text("\ufeff" + json.dumps([{"image_id": 99, "caption": "a dog"}]), encoding="utf-8")
    refs.write_text("\ufeff" + json.dumps({"images": [{"id": 1}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "a cat"}]}), encoding="utf-8")
    _fails(["eval", preds, "--references", refs], "1 predicted image id(s) are not in the references")


def _refs(tmp_path, caption="a cat on a mat") -> Path:
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"id": 1, "image_id": 1, "caption": caption}]}))
    return refs


@pytest.mark.parametrize("text,messages", [
    ('[{"image_id": 1, "caption": 3}]', ["entry [0] (image_id 1): caption must be a string, got integer 3"]),
    ('[{"image_id": 1, "caption": "a cat", "caption": "a dog"}]',
     ["the predictions gives key 'caption' twice in one object"]),
    ('[{"image_id": [1, 2], "caption": "a cat"}]', ["entry [0] has image_id list [1, 2]"]),
    ("[" * 5000 + "]" * 5000, ["the predictions is nested deeper than 100 levels"]),
])
def test_predictions_files_of_the_wrong_shape_are_named(tmp_path, text, messages):
    preds = tmp_path / "p.json"
    preds.write_text(text)
    _fails(["eval", preds, "--references", _refs(tmp_path)], str(preds), *messages)


@pytest.mark.parametrize("annotation,message", [
    ('{"id": 1, "image_id": 1, "caption": 3}',
     "annotations[0].caption (image_id 1) must be a string, got integer 3"),
    ('{"id": 1, "image_id": 1, "image_id": 2, "caption": "a cat"}',
     "the references gives key 'image_id' twice in one object"),
])
def test_references_of_the_wrong_shape_are_named(tmp_path, annotation, message):
    refs = tmp_path / "refs.json"
    refs.write_text('{"images": [{"id": 1}], "annotations": [' + annotation + "]}")
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image_id": 1, "caption": "a cat"}]))
    _fails(["eval", preds, "--references", refs], str(refs), message)


def _coco_2017(tmp_path) -> tuple[list[Path], Path]:
    """COCO 2017 caption files of 16 one-pixel images, two captions each."""
    from PIL import Image

    captions = []
    for subset, ids in (("train2017", range(100, 110)), ("val2017", range(200, 206))):
        for i in ids:
            (tmp_path / "coco" / subset).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(tmp_path / "coco" / subset / f"{i:012d}.png")
        ann = {"images": [{"id": i, "file_name": f"{i:012d}.png"} for i in ids],
               "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"a red square {k}"}
                               for i in ids for k in range(2)]}
        captions.append(tmp_path / f"captions_{subset}.json")
        captions[-1].write_text(json.dumps(ann))
    return captions, tmp_path / "coco"


def test_caption_files_name_a_wrong_type_and_refuse_a_key_given_twice(tmp_path):
    (train, val), images = _coco_2017(tmp_path)
    ann = json.loads(train.read_text())
    ann["annotations"][0]["caption"] = 3
    train.write_text(json.dumps(ann))
    args = ["data", "coco", "--captions", train, "--captions", val, "--images", images]
    result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "a.json"]])
    assert "Traceback" not in result.output and result.exit_code == 0, result.output
    assert "annotations[0]: caption must be a string, got integer 3" in result.output
    assert len(json.loads((tmp_path / "a.json").read_text())["images"]) == 16
    val.write_text(val.read_text().replace('"caption": ', '"caption": "x", "caption": ', 1))
    _fails([*args, "--out", tmp_path / "b.json"], str(val), "gives key 'caption' twice")
    assert not (tmp_path / "b.json").exists()


def _results_with(tmp_path, edits: dict) -> tuple[Path, Path]:
    """A results folder with a committed record and one edited copy per ``edits`` entry."""
    src = sorted((ROOT / "results" / "shapes" / "runs").glob("*.json"))[0]
    runs = tmp_path / "runs"
    runs.mkdir()
    good = runs / src.name
    good.write_text(src.read_text())
    for name, edit in edits.items():
        (runs / f"{name}.json").write_text(edit(src.read_text()))
    return tmp_path, good


def _set_cider(text: str, value: str) -> str:
    return re.sub(r'("CIDEr": )[0-9.e-]+', rf"\g<1>{value}", text, count=1)


def test_hand_edited_records_are_skipped_with_the_reason_and_the_board_renders(tmp_path):
    results, good = _results_with(tmp_path, {
        "high": lambda t: _set_cider(t, '"high"'),
        "twice": lambda t: t.replace('"metrics": {', '"metrics": {"CIDEr": 1.0, ', 1),
        "deep": lambda t: t.replace('"environment": {', '"environment": {"x": ' + "[" * 300
                                    + "]" * 300 + ", ", 1),
        "seed": lambda t: re.sub(r'\n "seed": \d+,', '\n "seed": "zero",', t, count=1),
    })
    result = runner.invoke(app, ["report", "--results-dir", str(results), "--format", "csv"])
    out = result.output.replace("\n", "")
    assert result.exit_code == 0 and "Traceback" not in out, result.output
    assert f"{results / 'runs' / 'high.json'}: field 'metrics.CIDEr' must be a number or null, got " \
           "string 'high'" in out
    assert f"{results / 'runs' / 'twice.json'}: the run record gives key 'CIDEr' twice" in out
    assert f"{results / 'runs' / 'deep.json'}: the run record is nested deeper than 100 levels" in out
    assert "seed.json: field 'seed' must be an integer or null, got string 'zero'" in out
    assert out.count("skipped:") == 4
    assert good.stem in out  # the good record is still on the board
    csv_rows = [line for line in result.stdout.splitlines() if good.stem in line]
    assert len(csv_rows) == 1


def test_a_record_named_directly_with_a_wrong_type_is_one_clear_error(tmp_path):
    results, good = _results_with(tmp_path, {})
    good.write_text(_set_cider(good.read_text(), "[1, 2]"))
    _fails(["compare", good.stem, good.stem, "--results-dir", results], str(good),
           "field 'metrics.CIDEr' must be a number or null, got list [1, 2]")


def test_a_baseline_with_a_wrong_type_names_the_field(tmp_path):
    data = json.loads((ROOT / "results" / "baselines" / "tiny.json").read_text())
    cell = next(iter(data["cells"]))
    data["cells"][cell]["metrics"]["CIDEr"] = "high"
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=re.escape(
            f"field 'cells.{cell}.metrics.CIDEr' must be a number or null, got string 'high'")):
        load_baseline(path)


def test_a_huge_value_quoted_in_an_error_is_cut(tmp_path):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image_id": "x" * 1_000_000, "caption": "a cat"}]))
    out = _fails(["eval", preds, "--references", _refs(tmp_path)], "not in the references")
    assert len(out) < 1000


def test_quoted_values_stay_short_whatever_their_size():
    huge = [[["x" * 10_000] * 1000] * 1000] * 1000  # a billion strings, shared: repr() never ends
    assert len(quote(huge)) <= 80 and len(quote("x" * 10**8)) <= 80 and "..." in quote("x" * 100)
    assert describe(3) == "integer 3" and describe(None) == "null" and describe(True) == "boolean True"


# ----------------------------------------------------------------------------- checkpoint files


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes, tmp_path_factory) -> Path:
    """A checkpoint folder as a tiny-preset run writes it, with an untrained decoder (what is
    tested is reading its files, not its captions): no training, about a second."""
    from architectures import create_decoder, create_encoder
    from benchmark.config import load_config, resolved_config
    from benchmark.data import load_karpathy
    from benchmark.vocab import Vocabulary

    resolved = resolved_config(load_config("tiny", {"dataset": str(tiny_shapes)}))
    encoder = create_encoder(resolved["encoder"], pretrained=False, init_seed=0)
    ds = load_karpathy(tiny_shapes)
    vocab = Vocabulary.build((t for im in ds.split("train") for t in im.tokens), min_count=1)
    decoder = create_decoder(resolved["decoder"], len(vocab), encoder.grid_dim, encoder.pooled_dim,
                             resolved["decoder_hparams"])
    folder = tmp_path_factory.mktemp("checkpoints") / "20261122-000000-tiny-s0-0000"
    folder.mkdir()
    (folder / "encoder.json").write_text(json.dumps(encoder.cache_identity()))
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()},
              str(folder / "decoder.safetensors"))
    save_file({f"{part}_{stat}": torch.full((dim,), float(stat == "std"))
               for part, dim in (("grid", encoder.grid_dim), ("pooled", encoder.pooled_dim))
               for stat in ("mean", "std")}, str(folder / "feature_stats.safetensors"))
    vocab.save_to(folder)
    (folder / "config.json").write_text(json.dumps(resolved))
    return folder


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_stats(folder: Path, edit) -> None:
    stats = load_file(str(folder / "feature_stats.safetensors"))
    edit(stats)
    save_file(stats, str(folder / "feature_stats.safetensors"))


def test_the_unedited_checkpoint_captions(checkpoint, tiny_shapes):
    image = next((tiny_shapes.parent / "images").glob("*.png"))
    result = runner.invoke(app, ["caption", str(image), "--run", str(checkpoint), "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["file_name"] == image.name, \
        result.output


@pytest.mark.parametrize("edit,message", [
    (lambda f: _edit_config(f, lambda c: c.update(encoder_init_seed="zero")),
     "config.json: field 'encoder_init_seed' must be an integer, got string 'zero'"),
    (lambda f: _edit_config(f, lambda c: c.update(features=[])),
     "config.json: field 'features' must be an object or null, got list []"),
    (lambda f: _edit_config(f, lambda c: c["decode"].update(beam_size="3")),
     "config.json: decode.beam_size: expected an integer, got '3'"),
    (lambda f: (f / "config.json").write_text('{"arch": "rnn", "arch": "lstm"}'),
     "config.json: the checkpoint config gives key 'arch' twice"),
    (lambda f: _edit_stats(f, lambda s: s.pop("pooled_std")),
     "feature_stats.safetensors: 'pooled_std' should be a float vector of 512 values (the "
     "resnet18 features), got missing"),
    (lambda f: _edit_stats(f, lambda s: s.update(grid_mean=s["grid_mean"][:1].to(torch.int64))),
     "'grid_mean' should be a float vector of 512 values (the resnet18 features), got int64 of "
     "shape (1,)"),
    (lambda f: (f / "vocab.json").write_text('{"itos": ["<pad>", 3]}'),
     "vocab.json: 'itos' must be the list of words (strings): field '[1]' must be a string, got "
     "integer 3"),
])
def test_hand_edited_checkpoint_files_name_the_file_and_field(checkpoint, tiny_shapes, tmp_path,
                                                              edit, message):
    folder = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, folder)
    edit(folder)
    image = next((tiny_shapes.parent / "images").glob("*.png"))
    _fails(["caption", image, "--run", folder], str(folder), message)
