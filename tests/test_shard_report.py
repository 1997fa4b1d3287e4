"""A matrix split across machines (``capbench matrix --shard i/N``) and one leaderboard from
several results folders (``capbench report --results-dir A --results-dir B``), issue 11.

The CLI matrix tests replace feature extraction and training by fakes that write a small
record per cell (a real cell takes seconds): what is tested is which cells a shard runs."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark import matrix as matrix_mod
from benchmark.cli import app
from benchmark.config import config_id, load_config, resolved_config
from benchmark.errors import ConfigError, RecordError
from benchmark.matrix import Shard, parse_shard, plan_cells, shard_cells
from benchmark.records import RunRecord, write_record
from benchmark.report import load_records_from

runner = CliRunner()
ARCHS = ["rnn", "lstm", "attn_lstm", "transformer"]
ENCODERS = ["resnet18", "vit_tiny", "resnet50"]


def _key(cell) -> tuple:
    return (cell.encoder, cell.arch, cell.variant, cell.seed)


def _plan(archs=ARCHS, encoders=ENCODERS, seeds=(0, 1), variants=None):
    return plan_cells(load_config("tiny"), list(archs), list(encoders), list(seeds), variants)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 30])
def test_shards_split_the_plan_into_disjoint_parts_that_cover_it(count):
    cells = _plan(variants={"xe": {}, "scst": {"train.scst_epochs": 1}})
    parts = [[_key(c) for c in shard_cells(cells, Shard(i, count))] for i in range(1, count + 1)]
    mine = [k for part in parts for k in part]
    assert sorted(mine) == sorted(_key(c) for c in cells)  # every cell once: disjoint and whole
    assert len(mine) == len(set(mine)) == len(cells) == 4 * 3 * 2 * 2
    for part in parts:  # each shard runs its cells in plan order
        order = [_key(c) for c in cells]
        assert [order.index(k) for k in part] == sorted(order.index(k) for k in part)
    units = {(e, a, v) for e, a, v, _ in mine}  # a config's seeds share one shard
    for unit in units:
        assert sum(any(k[:3] == unit for k in part) for part in parts) == 1
    sizes = [len({k[:3] for k in part}) for part in parts]  # balanced to one unit
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(units) == 24
    again = _plan(variants={"xe": {}, "scst": {"train.scst_epochs": 1}})
    assert parts == [[_key(c) for c in shard_cells(again, Shard(i, count))]
                     for i in range(1, count + 1)]


def test_shards_depend_only_on_the_plan_names():
    cells = _plan()
    split = [{_key(c) for c in shard_cells(cells, Shard(i, 3))} for i in (1, 2, 3)]
    # 3 encoders x 4 decoders in 3 shards: each shard holds one encoder's decoders
    assert [{k[0] for k in part} for part in split] == [{"resnet18"}, {"resnet50"}, {"vit_tiny"}]
    # other list order, an alias (resnet = resnet50), other seed order: the same split
    shuffled = _plan(archs=ARCHS[::-1], encoders=["vit_tiny", "resnet", "resnet18"], seeds=(1, 0))
    assert [{_key(c) for c in shard_cells(shuffled, Shard(i, 3))} for i in (1, 2, 3)] == split
    more_seeds = _plan(seeds=(0, 1, 2))  # a new seed joins its config's shard
    assert [{k[:3] for k in (_key(c) for c in shard_cells(more_seeds, Shard(i, 3)))}
            for i in (1, 2, 3)] == [{k[:3] for k in part} for part in split]
    assert shard_cells(cells, None) == cells


@pytest.mark.parametrize("text,index,count", [("1/3", 1, 3), ("3/3", 3, 3), (" 2 / 4 ", 2, 4),
                                              ("1/1", 1, 1)])
def test_parse_shard(text, index, count):
    assert parse_shard(text) == Shard(index, count) and str(parse_shard(text)) == f"{index}/{count}"


@pytest.mark.parametrize("text,message", [
    ("0/2", "no shard 0; shards are numbered 1 to 2"), ("3/2", "no shard 3"),
    ("-1/2", "no shard -1"), ("a/b", "give i/N"), ("1/0", "must be at least 1"),
    ("2", "give i/N"), ("1/2/3", "give i/N"), ("", "give i/N"), ("1.5/2", "give i/N"),
])
def test_parse_shard_rejects_bad_values(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_shard(text)


@pytest.fixture
def fake_cells(monkeypatch):
    """Cells that 'run' in milliseconds: each writes a small record and is listed in the
    returned list as (encoder, decoder, seed)."""
    ran = []

    def prepare(cfg, dataset, device, console=None):
        return ("features of", cfg.encoder)

    def run(cfg, console=None, *, dataset, prepared, resume):
        assert prepared == ("features of", cfg.encoder) and resume
        ran.append((cfg.encoder, cfg.decoder, cfg.seed))
        record = _record(f"20261122-000000-{cfg.decoder}-{cfg.encoder}-s{cfg.seed}-0000", cfg.decoder,
                         cfg.encoder, 0.5, seed=cfg.seed, fingerprint=dataset.fingerprint,
                         config=config_id(resolved_config(cfg)))
        return record, write_record(record, cfg.results_dir)

    monkeypatch.setattr(matrix_mod, "prepare_features", prepare)
    monkeypatch.setattr(matrix_mod, "run_experiment", run)
    return ran


def _matrix(tiny_shapes, results: Path, *extra: str):
    return runner.invoke(app, ["matrix", "--config", "tiny", "--dataset", str(tiny_shapes),
                               "--archs", "rnn,lstm,transformer", "--encoders", "resnet18,vit_tiny",
                               "--seeds", "0,1", "--results-dir", str(results), *extra])


def test_matrix_shard_runs_only_its_cells_and_report_merges_the_shards(tiny_shapes, tmp_path,
                                                                          fake_cells):
    cells = plan_cells(load_config("tiny"), ["rnn", "lstm", "transformer"],
                       ["resnet18", "vit_tiny"], [0, 1])
    folders, seen = [], []
    for i in (1, 2, 3):
        fake_cells.clear()
        folder = tmp_path / f"shard{i}"
        out = _matrix(tiny_shapes, folder, "--shard", f"{i}/3")
        assert out.exit_code == 0, out.output
        expected = [(c.encoder, c.arch, c.seed) for c in shard_cells(cells, Shard(i, 3))]
        assert fake_cells == expected and len(expected) == 4  # 6 configs x 2 seeds in 3 shards
        assert f"matrix shard {i}/3: 4 of 12 cells, 4 run, 0 already done, 0 failed" in out.output
        assert "matrix 4/4 " in out.output and "matrix 5/" not in out.output
        assert len(list((folder / "runs").glob("*.json"))) == 4
        folders.append(folder)
        seen += fake_cells
    assert sorted(seen) == sorted((c.encoder, c.arch, c.seed) for c in cells)

    fake_cells.clear()  # a shard run again finds its own records and runs nothing
    out = _matrix(tiny_shapes, folders[1], "--shard", "2/3")
    assert out.exit_code == 0 and fake_cells == []
    assert "matrix shard 2/3: 4 of 12 cells, 0 run, 4 already done" in out.output

    args = ["report", "--format", "json", "--no-leaderboard-file"]
    for folder in folders:
        args += ["--results-dir", str(folder)]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    board = [r for r in json.loads(out.stdout) if r["kind"] == "run"]
    assert sorted((r["encoder"], r["arch"], r["seed"]) for r in board) == sorted(seen)


def test_matrix_without_shard_runs_every_cell(tiny_shapes, tmp_path, fake_cells):
    out = _matrix(tiny_shapes, tmp_path / "all")
    assert out.exit_code == 0, out.output
    assert len(fake_cells) == 12 and "matrix: 12 cells, 12 run, 0 already done" in out.output
    assert "shard" not in out.output


@pytest.mark.parametrize("value", ["0/2", "3/2", "a/b", "1/0"])
def test_matrix_bad_shard_fails_before_any_work(tiny_shapes, tmp_path, fake_cells, value):
    out = _matrix(tiny_shapes, tmp_path / "r", "--shard", value)
    assert out.exit_code == 2 and out.output.startswith(f"error: --shard {value!r}")
    assert "Traceback" not in out.output and "matrix shard" not in out.output
    assert fake_cells == [] and not (tmp_path / "r").exists()


def _record(run_id: str, arch: str, encoder: str, cider: float, *, seed: int = 0,
            fingerprint: str = "abc", config: str | None = None) -> RunRecord:
    return RunRecord.from_dict({
        "run_id": run_id, "arch": arch, "encoder": encoder, "seed": seed,
        "config_id": config or f"{arch}-{encoder}",
        "metrics": {"Bleu_1": 0.5, "Bleu_4": 0.2, "METEOR": 0.2, "ROUGE_L": 0.4, "CIDEr": cider},
        "throughput": {"train_tokens_per_s": 1000.0, "decoder_captions_per_s": 100.0,
                       "inference_images_per_s": 10.0},
        "dataset": {"name": "shapes", "split_fingerprint": fingerprint}})


def _folder(root: Path, *records: RunRecord) -> Path:
    for r in records:
        write_record(r, root)
    return root


A1 = _record("20261122-010101-rnn-resnet18-s0-aaaa", "rnn", "resnet18", 0.9)
A2 = _record("20261122-010102-lstm-resnet18-s0-bbbb", "lstm", "resnet18", 0.7)
B1 = _record("20261122-010103-transformer-vit_tiny-s0-cccc", "transformer", "vit_tiny", 1.1)


def _report(*args) -> tuple[int, str]:
    out = runner.invoke(app, ["report", *map(str, args)])
    return out.exit_code, out.output


def test_report_merges_folders_into_one_board(tmp_path):
    a = _folder(tmp_path / "a", A1, A2)
    b = _folder(tmp_path / "b", B1, A1)  # A1 copied into both folders: counted once
    code, text = _report("--results-dir", a, "--results-dir", b, "--format", "json")
    assert code == 0, text
    board = [r for r in json.loads(text) if r["kind"] == "run"]
    assert [r["run_id"] for r in board] == [B1.run_id, A1.run_id, A2.run_id]  # by CIDEr-D
    md = (a / "LEADERBOARD.md").read_text()  # the merged board goes to the first folder only
    assert f"`{a}/runs`, `{b}/runs`" in md and B1.arch in md and not (b / "LEADERBOARD.md").exists()
    records, problems = load_records_from([a, b, a])  # a folder named twice is read once
    assert [r.run_id for r in records] == [A1.run_id, A2.run_id, B1.run_id] and problems == []


def test_report_of_one_folder_is_unchanged(tmp_path, monkeypatch):
    a = _folder(tmp_path / "a", A1, A2)
    code, text = _report("--results-dir", a, "--format", "csv")
    assert code == 0 and text.splitlines()[1].startswith(f"shapes,abc,{A1.run_id},")
    assert len(text.splitlines()) == 3  # the header and two runs
    md = (a / "LEADERBOARD.md").read_text()
    assert f"from the run records in `{a}/runs`.\n" in md
    monkeypatch.chdir(tmp_path)  # no --results-dir: results/, as before
    _folder(tmp_path / "results", B1)
    code, text = _report("--format", "csv")
    assert code == 0 and B1.run_id in text and A1.run_id not in text
    assert "`results/runs`" in (tmp_path / "results" / "LEADERBOARD.md").read_text()


def test_report_refuses_one_run_id_with_two_different_records(tmp_path):
    a = _folder(tmp_path / "a", A1, A2)
    changed = _record(A1.run_id, "rnn", "resnet18", 0.8)  # same run id, another score
    b = _folder(tmp_path / "b", changed)
    code, text = _report("--results-dir", a, "--results-dir", b, "--no-leaderboard-file")
    flat = " ".join(text.split())  # the terminal may wrap the message
    assert code == 2 and f"run {A1.run_id} has two different records" in flat
    assert str(a / "runs" / f"{A1.run_id}.json") in flat and str(b / "runs" / f"{A1.run_id}.json") in flat
    assert "Traceback" not in text
    with pytest.raises(RecordError, match="two different records"):
        load_records_from([a, b])


def test_report_names_a_missing_folder_among_several(tmp_path):
    a = _folder(tmp_path / "a", A1)
    code, text = _report("--results-dir", a, "--results-dir", tmp_path / "nowhere")
    assert code == 2 and f"--results-dir {tmp_path / 'nowhere'} does not exist" in " ".join(text.split())
    (tmp_path / "a-file").write_text("")
    code, text = _report("--results-dir", a, "--results-dir", tmp_path / "a-file")
    assert code == 2 and f"--results-dir {tmp_path / 'a-file'} is a file, not a folder" in \
        " ".join(text.split())
    # the runs/ folder itself: the records are there, the board is one level up
    code, text = _report("--results-dir", a / "runs")
    assert code == 2 and (f"--results-dir {a / 'runs'} holds the run records themselves; pass "
                          f"its parent folder, --results-dir {a}") in " ".join(text.split())
    assert not (a / "LEADERBOARD.md").exists()  # nothing written before the error
    (tmp_path / "empty").mkdir()
    out = runner.invoke(app, ["report", "--results-dir", str(tmp_path / "empty")])
    assert out.exit_code == 0 and f"no runs found in {tmp_path / 'empty' / 'runs'}" in \
        " ".join(out.output.split())


def test_a_shard_without_cells_runs_nothing_and_leaves_an_empty_folder(tiny_shapes, tmp_path,
                                                                         fake_cells):
    out = runner.invoke(app, ["matrix", "--config", "tiny", "--dataset", str(tiny_shapes),
                              "--archs", "rnn", "--encoders", "resnet18", "--shard", "1/2",
                              "--results-dir", str(tmp_path / "s1")])
    assert out.exit_code == 0, out.output
    assert fake_cells == [] and "matrix shard 1/2: 0 of 1 cells, 0 run" in out.output
    assert ("nothing to run on this shard: the matrix has 1 (encoder, decoder, variant) unit(s), "
            "each run whole (all its seeds) by one shard, so only shard(s) 2 of 2 get cells") \
        in " ".join(out.output.split())
    assert (tmp_path / "s1" / "runs").is_dir()  # so a report over every shard folder finds it
    code, text = _report("--results-dir", tmp_path / "s1", "--format", "csv")
    assert code == 0
