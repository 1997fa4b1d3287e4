"""MkDocs build hook: the pages that are generated from the code, and the committed results.

* ``cli.md``: the CLI reference, written by Typer's own ``typer benchmark.cli utils docs``
  from the Typer app, so it lists every command and option as ``--help`` does.
* ``api.md``: one mkdocstrings entry per name of the front door, ``benchmark.__all__``.
* The docstrings' Sphinx roles (``:func:`name```) show as the code they name.
* ``results/**``: the committed plots and figures are served from where they are (``results/``
  at the repository root, outside ``docs/``) instead of copies; the boards' markdown is
  included by pymdownx.snippets.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
CLI_INTRO = """\
Generated from the Typer app by Typer's own `typer benchmark.cli utils docs` at every build,
so it cannot drift from `capbench --help`. Every command's `--help` shows the same text,
grouped into panels, with one example at its end.

"""
API_INTRO = """\
# Python API

Everything the CLI does is a function of the `benchmark` package. These are the names of its
front door, `benchmark.__all__` (`from benchmark import run_experiment, ...`); each is imported
on first use, so `import benchmark` does not load PyTorch. The models come from
`architectures` (`create_encoder`, `create_decoder`, `list_decoders`). Generated from the
docstrings by mkdocstrings.

"""


def cli_reference() -> str:
    """The CLI reference page: ``typer benchmark.cli utils docs`` (Markdown on stdout)."""
    done = subprocess.run(
        [sys.executable, "-m", "typer", "benchmark.cli", "utils", "docs", "--name", "capbench",
         "--title", "CLI reference"],
        cwd=ROOT, capture_output=True, text=True, check=False, env=None)
    if done.returncode != 0:
        raise RuntimeError(f"typer utils docs failed:\n{done.stderr}")
    head, _, rest = done.stdout.partition("\n\n")  # '# CLI reference', then the intro
    return f"{head}\n\n{CLI_INTRO}{_whole_first_lines(rest)}"


def _whole_first_lines(markdown: str) -> str:
    """The command lists' entries with each command's whole first line: Typer's docs cut
    them at 45 characters (click's short help), mid-sentence."""
    sys.path.insert(0, str(ROOT))
    import typer

    from benchmark.cli import app

    first = {}

    def walk(command):
        for name, sub in getattr(command, "commands", {}).items():
            first[name] = (sub.help or "").strip().split("\n\n")[0].replace("\n", " ")
            walk(sub)

    walk(typer.main.get_command(app))
    return re.sub(r"^\* `([\w-]+)`: .*$",
                  lambda m: f"* `{m.group(1)}`: {first.get(m.group(1)) or m.group(0)}"
                  if m.group(1) in first else m.group(0), markdown, flags=re.M)


def api_reference() -> str:
    """The API page: a mkdocstrings block per exported name, in the front door's order."""
    sys.path.insert(0, str(ROOT))
    import benchmark

    blocks = [f"::: {benchmark._EXPORTS[name]}.{name}\n" for name in benchmark.__all__]
    return API_INTRO + "\n".join(blocks)


def on_files(files: Files, config) -> Files:
    """Add the generated pages and the committed results' images to the site."""
    files.append(File.generated(config, "cli.md", content=cli_reference()))
    files.append(File.generated(config, "api.md", content=api_reference()))
    for path in sorted((ROOT / "results").rglob("*.png")):
        if "runs" not in path.relative_to(ROOT).parts:
            files.append(File(str(path.relative_to(ROOT)), src_dir=str(ROOT),
                              dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


#: a Sphinx cross-reference role in front of the code span mkdocstrings made of its target
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj|const):(?=<code>)")


def on_page_content(html: str, page, config, files) -> str:
    """Drop the Sphinx role names (``:func:``) that the docstrings carry before a name."""
    return _SPHINX_ROLE.sub("", html)
