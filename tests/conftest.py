"""Shared fixtures: an isolated cache, a small generated `shapes` set, the shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO_MINI = SHARED_DATA / "coco-mini" / "dataset.json"
COCO_DEMO = SHARED_DATA / "coco-caption-demo" / "captions_val2014_fakecap_results.json"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session writes features and datasets into its own cache folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A 40-image `shapes` set (28 train / 6 val / 6 test) in Karpathy format."""
    from benchmark.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), n_images=40, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tiny_shapes, tmp_path_factory):
    """The end-to-end run the tests share: ``capbench run`` of the tiny preset (attn_lstm on a
    random-init resnet18, greedy, 2 epochs) on the 40-image set. Returns ``(results folder,
    RunRecord)``. Tests may add files beside it (or a ``grounding`` block), never change the
    fields of its record that others read."""
    from typer.testing import CliRunner

    from benchmark.cli import app
    from benchmark.records import load_record

    results = tmp_path_factory.mktemp("tiny-run")
    out = CliRunner().invoke(app, ["run", "--config", "tiny", "--dataset", str(tiny_shapes),
                                   "--results-dir", str(results), "--epochs", "2"])
    assert out.exit_code == 0, out.output
    (path,) = (results / "runs").glob("*.json")
    return results, load_record(path)


@pytest.fixture(scope="session")
def coco_demo_cli() -> dict:
    """``capbench eval --format json`` of the official COCO caption demo file against COCO's
    val2014 references (scored once a session; skipped where shared data is absent)."""
    import json

    from typer.testing import CliRunner

    from benchmark.cli import app
    from benchmark.metrics import _pkg_dir

    if not COCO_DEMO.exists():
        pytest.skip(f"{COCO_DEMO} not found (shared data absent)")
    before = sorted(p.name for p in _pkg_dir().rglob("*"))
    result = CliRunner().invoke(app, ["eval", str(COCO_DEMO), "--references", "coco-val2014",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    # nothing was written inside pycocoevalcap's install folder (scoring works read-only)
    assert sorted(p.name for p in _pkg_dir().rglob("*")) == before
    return json.loads(result.output)


def needs(path: Path):
    """Skip cleanly where ../shared/data is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found (shared data absent)")


def captions_of(record, images: Path, results_dir: Path) -> dict[str, str]:
    """``capbench caption`` of a run's test images (files under ``images``) through its saved
    checkpoint: ``{file name: caption}``; fails the test when the command fails."""
    import json

    from typer.testing import CliRunner

    from benchmark.cli import app

    files = [str(images / p["filename"]) for p in record.predictions]
    out = CliRunner().invoke(app, ["caption", *files, "--run", record.run_id, "--results-dir",
                                   str(results_dir), "--format", "json"])
    assert out.exit_code == 0, out.output
    return {c["file_name"]: c["caption"] for c in json.loads(out.stdout)}


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> Path:
    """The documentation site, built once a session with ``mkdocs build --strict`` (as
    ``make docs`` builds it) into a temporary folder; fails on any warning."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=root, capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    return site
