"""The README's demo section stays true: it states configs/demo.yaml, and its terminal capture
is of that run, at 100 columns, with every number whole."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _demo_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### What the demo does and what it scores")
    return text[start:text.index("## Everyday use", start)]


def test_the_demo_section_states_the_demo_config():
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    section = _demo_section()
    d = cfg["decoder_hparams"]
    assert (f"`{cfg['decoder']}` (embed {d['embed_dim']}, hidden {d['hidden_dim']}, attention "
            f"{d['attention_dim']}), trained for {cfg['train']['epochs']}\nepochs") in section
    assert f"Beam size {cfg['decode']['beam_size']}." in section
    assert {"resnet50": "ResNet-50"}[cfg["encoder"]] in section
    epochs = {int(n) for n in re.findall(r"(\d+)\s+epochs", section.replace("\n", " "))}
    assert epochs == {cfg["train"]["epochs"]}  # one epoch count, the preset's


def test_the_capture_is_the_demo_run_at_100_columns():
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    section = _demo_section()
    capture = section.split("```text\n", 1)[1].split("```", 1)[0]
    lines = capture.splitlines()
    assert lines and max(len(line) for line in lines) <= 100
    assert "…" not in capture
    rows = [line for line in lines if f"│ {cfg['decoder']}" in line]
    assert len(rows) == 1 and cfg["encoder"] in rows[0]
    assert re.search(r"\d+\.\d ±\d+\.\d", rows[0])  # CIDEr-D with its CI, whole
    assert "consensus" in capture and "baseline" in capture and "CIDEr-D" in capture


def test_the_from_python_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):text.index("## Full-size datasets")]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (From Python)", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "attn_lstm" in out and "CIDEr" in out and "shapes_00000.png" in out
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 1
