"""The demo section stays true, in the README and in docs/getting-started.md (issue 30 moved
the rest of the README there): it states configs/demo.yaml, and its terminal capture is of
that run, at 100 columns, with every number whole; the Python example of the docs runs."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### What the demo does and what it scores"
#: where the demo section is, and the heading that follows it
PLACES = {"README.md": "## Everyday use", "docs/getting-started.md": "## Everyday use"}


def _demo_section(where: str) -> str:
    text = (ROOT / where).read_text()
    start = text.index(HEADING)
    return text[start:text.index(PLACES[where], start)]


def _capture(section: str) -> str:
    return section.split("```text\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("where", PLACES)
def test_the_demo_section_states_the_demo_config(where):
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    section = _demo_section(where)
    d = cfg["decoder_hparams"]
    assert (f"`{cfg['decoder']}` (embed {d['embed_dim']}, hidden {d['hidden_dim']}, attention "
            f"{d['attention_dim']}), trained for {cfg['train']['epochs']}\nepochs") in section
    assert f"Beam size {cfg['decode']['beam_size']}." in section
    assert {"resnet50": "ResNet-50"}[cfg["encoder"]] in section
    epochs = {int(n) for n in re.findall(r"(\d+)\s+epochs", section.replace("\n", " "))}
    assert epochs == {cfg["train"]["epochs"]}  # one epoch count, the preset's


@pytest.mark.parametrize("where", PLACES)
def test_the_capture_is_the_demo_run_at_100_columns(where):
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    capture = _capture(_demo_section(where))
    lines = capture.splitlines()
    assert lines and max(len(line) for line in lines) <= 100
    assert "…" not in capture
    rows = [line for line in lines if f"│ {cfg['decoder']}" in line]
    assert len(rows) == 1 and cfg["encoder"] in rows[0]
    assert re.search(r"\d+\.\d ±\d+\.\d", rows[0])  # CIDEr-D with its CI, whole
    assert "consensus" in capture and "baseline" in capture and "CIDEr-D" in capture


def test_the_readme_and_the_docs_show_the_same_capture_and_figures():
    readme, docs = (_demo_section(w) for w in PLACES)
    assert _capture(readme) == _capture(docs)
    # the README's summary quotes the docs' measured shuffle cost, which has its command there
    cost = re.search(r"costs it ([\d.]+) CIDEr-D points", (ROOT / "README.md").read_text())
    assert cost and f"costs it {cost.group(1)} points" in docs.replace("\n", " ")


def test_the_from_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "getting-started.md").read_text()
    section = text[text.index("## From Python"):text.index("## Tests")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/getting-started.md (From Python)", "exec"), {})  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "attn_lstm" in out and "CIDEr" in out and "shapes_00000.png" in out
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 1
