"""The documentation site (issue 30): it builds with ``mkdocs build --strict``, its CLI
reference is generated from the Typer app and lists every command and option, its API page
every name of ``benchmark.__all__``, and the README is a short front page linking into it."""

import inspect
import re
from html import unescape as html_unescape
from pathlib import Path

import pytest
import typer
import yaml

import benchmark
from benchmark.cli import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # one mkdocs build (about 10 s) shared by the module


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        for value in item.values():
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_nav_page_is_built(docs_site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    for page in ("tuning.md", "evp.md", "cluster.md", "cli.md", "api.md", "results.md"):
        assert page in pages
    for page in pages:
        html = docs_site / f"{page[:-3]}.html"  # use_directory_urls: false (opens from disk)
        assert html.is_file(), page


def test_the_cli_reference_lists_every_command_and_option(docs_site):
    html = (docs_site / "cli.html").read_text()
    text = html_unescape(re.sub(r"<[^>]+>", "", html))
    root = typer.main.get_command(app)
    for path, command in _commands(root):
        name = " ".join(("capbench", *path))
        assert name in text, name
        if path:  # its whole first line, in its group's command list too (not cut at 45 characters)
            line = command.help.strip().split("\n\n")[0].replace("\n", " ")
            assert text.count(line.replace("`", "")) >= 2, name  # its section and the list
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in text, f"{name}: {opt}"


def test_the_api_page_documents_the_front_door(docs_site):
    html = (docs_site / "api.html").read_text()
    for name in benchmark.__all__:
        module = benchmark._EXPORTS[name]
        assert f'id="{module}.{name}"' in html, name
    # each docstring's first words are there, not only the name, and no Sphinx role shows
    text = " ".join(html_unescape(re.sub(r"<[^>]+>", "", html)).split())
    assert not re.search(r":(mod|func|class|meth|attr):", text)
    for name in benchmark.__all__:
        doc = inspect.getdoc(getattr(benchmark, name)) or ""
        words = " ".join(re.sub(r":\w+:|`", "", doc).split()[:4])
        assert words and words in text, f"{name}: {words!r}"


def test_the_committed_boards_and_plots_are_on_the_results_page(docs_site):
    html = (docs_site / "results.html").read_text()
    for board in sorted((ROOT / "results").glob("*/LEADERBOARD.md")):
        first_row = next(line for line in board.read_text().splitlines()
                         if line.startswith("| ") and not line.startswith("| run "))
        run = first_row.split("|")[1].strip()
        assert run in html, f"{board}: row {run} missing"
        for png in (board.parent / "plots").glob("*.png"):
            src = f"results/{board.parent.name}/plots/{png.name}"
            assert f'src="{src}"' in html, src
            assert (docs_site / src).read_bytes() == png.read_bytes()


def test_the_readme_is_a_front_page_that_links_into_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert len(set(links)) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link
    for command in ("make demo", "make test", "make docs"):
        assert command in text
