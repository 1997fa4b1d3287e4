"""Caption tokenizers: word (unchanged), byte-level BPE and WordPiece trained on the train
split only, saved Hugging Face tokenizers, and runs that use them end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.data import load_karpathy
from benchmark.errors import ConfigError
from benchmark.tokenization import build_tokenizer, load_tokenizer, mean_tokens_per_caption
from benchmark.vocab import Vocabulary
from tests.conftest import captions_of

runner = CliRunner()


def _train_caps(path):
    return [list(t) for im in load_karpathy(path).split("train") for t in im.tokens]


def test_word_tokenizer_is_the_word_vocabulary(tiny_shapes):
    caps = _train_caps(tiny_shapes)
    tok = build_tokenizer("word", caps, min_count=2)
    assert isinstance(tok, Vocabulary) and tok.itos == Vocabulary.build(caps, 2).itos


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_subword_round_trip_and_specials(tiny_shapes, tmp_path, kind):
    caps = _train_caps(tiny_shapes)
    tok = build_tokenizer(kind, caps, vocab_size=300)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    for c in caps[:50]:
        ids = tok.encode(c, 100)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == c  # ids -> text -> the same words
        assert len(tok.pieces(ids)) == len(ids) - 2  # one label per generated token
    # an unseen word still decodes (BPE: from bytes) or becomes <unk> (WordPiece), never crashes
    out = tok.decode(tok.encode(["a", "zyzzyva"], 100))
    assert out[0] == "a" and len(out) == 2
    words = sum(map(len, caps)) / len(caps)
    assert words <= mean_tokens_per_caption(tok, caps) < 4 * words  # pieces of words, not fewer
    tok.save_to(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(caps[0], 100) == tok.encode(caps[0], 100)
    assert (tmp_path / "tokenizer.json").is_file()


def test_a_saved_tokenizer_path_loads_and_a_bad_one_is_a_clear_error(tiny_shapes, tmp_path):
    caps = _train_caps(tiny_shapes)
    build_tokenizer("wordpiece", caps, vocab_size=200).save_to(tmp_path / "wp")
    tok = build_tokenizer(str(tmp_path / "wp"), caps)
    assert tok.kind == str(tmp_path / "wp") and len(tok) <= 200
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="tokenizer.json"):
        build_tokenizer(str(tmp_path / "empty"), caps)
    out = runner.invoke(app, ["run", "--config", "tiny", "--dataset", str(tiny_shapes),
                              "--tokenizer", str(tmp_path / "nowhere"), "--results-dir",
                              str(tmp_path / "r")])
    assert out.exit_code != 0 and "Traceback" not in out.output
    assert "nowhere" in out.output and "tokenizer" in out.output
    assert not (tmp_path / "r" / "runs").exists() or not list((tmp_path / "r" / "runs").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_a_subword_run_learns_from_train_only_and_captions_reproduce(tiny_shapes, tmp_path, kind):
    """Val/test captions get a word no train caption has: it must not reach the tokenizer.
    The saved checkpoint's tokenizer captions the test images exactly as the record says."""
    from benchmark.config import load_config
    from benchmark.runner import run_experiment

    data = json.loads(tiny_shapes.read_text())
    for im in data["images"]:
        if im["split"] != "train":
            for s in im["sentences"]:
                s["raw"] += " xylophone"
                s["tokens"] = [*s["tokens"], "xylophone"]
    path = tiny_shapes.parent / f"leak-{kind}.json"
    path.write_text(json.dumps(data))
    cfg = load_config("tiny", {"dataset": str(path), "train.epochs": 2, "tokenizer": kind,
                               "tokenizer_vocab_size": 600, "results_dir": str(tmp_path)})
    record, _ = run_experiment(cfg)
    tok = load_tokenizer(record.checkpoint)
    vocab = tok.hf.get_vocab()
    assert not [t for t in vocab if "xylo" in t or "phone" in t]
    info = record.training["tokenizer"]
    assert info["kind"] == kind and info["vocab_size"] == len(tok) == record.vocab_size
    assert info["mean_tokens_per_caption"] >= 1
    got = captions_of(record, tiny_shapes.parent / "images", tmp_path)
    assert got == {p["filename"]: p["caption"] for p in record.predictions}


def test_a_bpe_vocabulary_without_room_for_merges_is_refused_before_any_work():
    from benchmark.config import load_config, resolved_config
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer_vocab_size = 200 with tokenizer bpe"):
        resolved_config(load_config("tiny", {"tokenizer": "bpe", "tokenizer_vocab_size": 200}))
    resolved_config(load_config("tiny", {"tokenizer": "wordpiece", "tokenizer_vocab_size": 200}))


def test_captions_cut_by_max_caption_len_are_reported(tiny_shapes):
    from benchmark.config import load_config
    from benchmark.data import load_karpathy
    from benchmark.errors import CapbenchWarning
    from benchmark.runner import _tokens_per_caption
    from benchmark.tokenization import build_tokenizer, caption_lengths

    train = load_karpathy(tiny_shapes).split("train")
    captions = [t for im in train for t in im.tokens]
    bpe = build_tokenizer("bpe", captions, vocab_size=300)
    longest = max(caption_lengths(bpe, captions))
    with pytest.warns(CapbenchWarning, match=r"% of the training captions are longer than "
                                             r"train.max_caption_len = 4 tokens of the bpe"):
        _tokens_per_caption(bpe, train, load_config("tiny", {"train.max_caption_len": 4}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean = _tokens_per_caption(bpe, train,
                                   load_config("tiny", {"train.max_caption_len": longest}))
    assert mean == mean_tokens_per_caption(bpe, captions)  # the record's figure
