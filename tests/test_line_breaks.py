"""A line-break character inside a caption must not shift any score (issue 24, class 1).

The Java PTB tokenizer reads one caption a line: a stray ``\\r`` used to move every later
caption onto another image's references (the COCO demo's CIDEr fell from 0.600 to 0.058).
"""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.errors import ScoringError
from benchmark.metrics import LINE_BREAKS, java_tokenizer_available, ptb_tokenize, score_captions
from benchmark.metrics import coco as metrics
from tests.conftest import COCO_DEMO, needs

needs_java = pytest.mark.skipif(not java_tokenizer_available(), reason="no Java PTB tokenizer")

#: every character Python's str.splitlines ends a line at, found by trying them all
PYTHON_BREAKS = {chr(c) for c in range(sys.maxunicode + 1) if len(f"a{chr(c)}b".splitlines()) > 1}
#: Java's BufferedReader ends lines at \n and \r; CoreNLP's PTBLexer also at these
JAVA_BREAKS = {"\n", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029"}
BREAKS = sorted(PYTHON_BREAKS | JAVA_BREAKS) + ["\r\n"]


def test_every_line_break_of_python_and_java_is_normalised():
    assert PYTHON_BREAKS | JAVA_BREAKS == set(LINE_BREAKS)


def _broken(captions: dict) -> dict:
    """The same captions with a different line break in place of each one's first space."""
    return {k: [c.replace(" ", BREAKS[(i + j) % len(BREAKS)], 1) for j, c in enumerate(v)]
            for i, (k, v) in enumerate(captions.items())}


CAPTIONS = {i: [f"a man riding horse number {i}", f"Two dogs play, {i} times."]
            for i in range(len(BREAKS) + 2)}


@pytest.mark.parametrize("use_java", [
    pytest.param(True, marks=needs_java), False], ids=["java", "python-fallback"])
def test_a_line_break_tokenizes_as_a_space(use_java):
    broken = _broken(CAPTIONS)
    assert sum(any(b in c for b in LINE_BREAKS) for v in broken.values() for c in v) == 2 * len(CAPTIONS)
    clean = ptb_tokenize(CAPTIONS, use_java=use_java)
    assert ptb_tokenize(broken, use_java=use_java) == clean
    assert clean[3] == ["a man riding horse number 3", "two dogs play 3 times"]


@needs_java
def test_a_tokenizer_that_returns_other_lines_than_captions_is_refused(monkeypatch):
    real = subprocess.run

    def drop_a_line(cmd, **kw):
        out = real(cmd, **kw)
        out.stdout = out.stdout.split(b"\n", 1)[1]
        return out

    monkeypatch.setattr(metrics.subprocess, "run", drop_a_line)
    with pytest.raises(ScoringError, match="returned 3 lines for 4 captions"):
        ptb_tokenize({1: ["a", "b"], 2: ["c", "d"]}, use_java=True)


def test_scores_with_the_python_fallback_are_unchanged(monkeypatch):
    monkeypatch.setattr(metrics, "java_tokenizer_available", lambda: False)
    preds = {k: v[0] for k, v in CAPTIONS.items()}
    refs = {k: [CAPTIONS[(k + 1) % len(CAPTIONS)][1], v[0], v[1]] for k, v in CAPTIONS.items()}
    broken_preds = {k: v[0] for k, v in _broken(CAPTIONS).items()}
    broken_refs = _broken(refs)
    wanted = ("Bleu_4", "ROUGE_L", "CIDEr")
    clean = score_captions(preds, refs, metrics=wanted)
    broken = score_captions(broken_preds, broken_refs, metrics=wanted)
    assert broken.tokenizer == "python-approximation"
    assert broken.metrics == clean.metrics and broken.per_image == clean.per_image


@pytest.mark.slow
@needs(COCO_DEMO)
@needs_java
def test_the_coco_demo_with_line_breaks_scores_as_the_clean_file(tmp_path, coco_demo_cli):
    preds = json.loads(COCO_DEMO.read_text())
    for i, ch in enumerate(BREAKS):  # one kind of line break in each of the first captions
        preds[i]["caption"] = preds[i]["caption"].replace(" ", ch, 1)
    path = tmp_path / "demo-with-line-breaks.json"
    path.write_text(json.dumps(preds))
    result = CliRunner().invoke(app, ["eval", str(path), "--references", "coco-val2014",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert round(coco_demo_cli["metrics"]["CIDEr"], 3) == 0.600
    assert out["metrics"] == coco_demo_cli["metrics"]
    assert out["confidence_intervals"] == coco_demo_cli["confidence_intervals"]
