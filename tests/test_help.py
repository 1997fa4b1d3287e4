"""`capbench --help` explains itself (issue 30): commands grouped in panels, first lines one
sentence, docstrings shown as flowing paragraphs, one example at the end of every command's
help, `--version`, and shell completion."""

import functools
import inspect
import re
from importlib.metadata import version

import pytest
import torch
import typer
from typer.testing import CliRunner

from benchmark.cli import app

PANELS = {
    "Train & compare": {"run", "report", "compare", "matrix", "tune", "list", "baseline"},
    "Inspect a model": {"caption", "explain", "ground"},
    "Score": {"eval"},
    "Data": {"data"},
    "Measure": {"bench", "gpu-table"},
    "Diagnose": {"doctor", "check"},
}


def _commands(command=None, path=()):
    """``(path, click command)`` of the root, every group and every command below it."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


@functools.cache  # each command's help is rendered once for the tests that read it
def _help(path, width=100) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(width)},
                                prog_name="capbench")
    assert result.exit_code == 0, result.output
    return result.output


COMMANDS = [p for p, _ in _commands()]


def test_the_top_level_commands_are_grouped_into_panels():
    out = _help(())
    found = {}
    panel = None
    for line in out.splitlines():
        if m := re.match(r"╭─ (.+?) ─", line):
            panel = m.group(1)
        elif m := re.match(r"│ ([a-z][a-z-]*) ", line):
            found.setdefault(panel, set()).add(m.group(1))
    found = {k: v for k, v in found.items() if k != "Options"}
    assert found == PANELS
    assert list(found) == list(PANELS)  # shown in this order
    top = {p[0] for p in COMMANDS if len(p) == 1}
    assert top == set().union(*PANELS.values())  # no command left outside a panel


@pytest.mark.parametrize("path", [p for p in COMMANDS if p], ids=" ".join)
def test_first_line_is_one_sentence_and_paragraphs_are_not_hard_wrapped(path):
    command = dict(_commands())[path]
    paragraphs = inspect.cleandoc(command.help).split("\n\n")
    first = paragraphs[0].replace("\n", " ")
    assert first.endswith(".") and first[0].isupper(), first
    assert not re.search(r"[.!?;] [A-Z]", first[:-1]), f"more than one sentence: {first}"
    out = _help(path, width=1000)
    # each paragraph of the docstring is one line of the help, whatever its line breaks
    lines = {line.strip() for line in out.splitlines()}
    for paragraph in paragraphs:
        text = " ".join(paragraph.split()).replace("`", "")
        assert text in lines, f"{text!r} is wrapped as written in the docstring"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "capbench")
def test_every_help_ends_with_one_example(path):
    lines = [line.strip() for line in _help(path, width=1000).splitlines() if line.strip()]
    assert lines[-1].startswith("Example: capbench "), lines[-1]
    assert sum(line.startswith("Example:") for line in lines) == 1
    example = lines[-1].removeprefix("Example: ").split(",")[0].split()
    # the example calls this very command (its words follow `capbench`)
    assert tuple(example[1:1 + len(path)]) == path


def test_version_names_capbench_torch_and_the_device():
    result = CliRunner().invoke(app, ["--version"], prog_name="capbench")
    assert result.exit_code == 0
    out = result.output
    assert f"capbench {version('capbench')}" in out
    assert f"torch {torch.__version__}" in out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert re.search(rf"^device {device}", out, re.M), out


def test_shell_completion_completes_commands_and_options(monkeypatch):
    # as Typer's own tests do: --show-completion takes the shell by name instead of detecting the
    # parent shell (shellingham), which fails where the tests run under no shell it can find
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="capbench")
    assert result.exit_code == 0 and "_capbench_completion" in result.output
    assert "--install-completion" in _help(())

    def complete(words: str) -> list[str]:
        env = {"_CAPBENCH_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        done = CliRunner().invoke(app, [], env=env, prog_name="capbench")
        assert done.exit_code == 0
        return done.output.split()

    assert complete("capbench re") == ["report"]
    assert complete("capbench bench de") == ["decoders"]
    assert "--wide" in complete("capbench report --wi")
