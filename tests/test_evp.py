"""Expected validation performance (Dodge et al. 2019; Tang et al. 2020) and Holm's
correction of the board's ``vs blind`` column and of ``capbench compare`` (issue 28)."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

import benchmark.report as report_module
from benchmark.cli import app
from benchmark.evp import crossings, evp_curves, expected_max
from benchmark.records import RunRecord
from benchmark.report import leaderboard, render_markdown
from benchmark.stats import compare_to_first, holm

#: trial scores with ties (three 0.5s, two 0.1s)
TIED = [0.3, 0.5, 0.1, 0.5, 0.9, 0.1, 0.5]


def _moments(maxima) -> tuple[float, float]:
    m = np.asarray(maxima, dtype=float)
    return float(m.mean()), float(m.var())


def test_the_unbiased_estimator_is_the_mean_max_over_all_size_k_subsets():
    mean, var = expected_max(TIED)  # the default estimator
    n = len(TIED)
    for k in range(1, n + 1):
        brute = _moments([max(s) for s in itertools.combinations(TIED, k)])
        assert mean[k - 1] == pytest.approx(brute[0], abs=1e-12), k
        assert var[k - 1] == pytest.approx(brute[1], abs=1e-12), k
    assert mean[0] == pytest.approx(np.mean(TIED)) and mean[-1] == max(TIED) and var[-1] == 0


def test_dodges_estimator_is_the_mean_max_over_all_ordered_draws_with_replacement():
    values = TIED[:5]  # 5^5 = 3,125 ordered draws at k = 5
    mean, var = expected_max(values, "dodge")
    unbiased, _ = expected_max(values, "unbiased")
    for k in range(1, len(values) + 1):
        brute = _moments([max(d) for d in itertools.product(values, repeat=k)])
        assert mean[k - 1] == pytest.approx(brute[0], abs=1e-12), k
        assert var[k - 1] == pytest.approx(brute[1], abs=1e-12), k
    # drawing with replacement repeats trials: below the unbiased curve from k = 2 on
    assert mean[0] == pytest.approx(unbiased[0])
    assert np.all(mean[1:] < unbiased[1:]) and mean[-1] < max(values)


def test_bad_trial_scores_are_refused():
    with pytest.raises(ValueError, match="no trial scores"):
        expected_max([])
    with pytest.raises(ValueError, match="finite"):
        expected_max([0.1, float("nan")])
    with pytest.raises(ValueError, match="unknown estimator"):
        expected_max([0.1], "median")


def test_holm_is_statsmodels_holm():
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    adjusted, reject = holm(p)
    rej, adj, _, _ = multipletests(p, alpha=0.05, method="holm")
    np.testing.assert_allclose(adjusted, adj)
    np.testing.assert_array_equal(reject, rej)
    # by hand: sorted 0.005*5, 0.01*4, 0.03*3, max(0.04*2, 0.09), 0.2*1
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, 0.025, 0.2])
    adjusted, reject = holm([0.01, float("nan"), 0.04])  # a row without a test is no test
    np.testing.assert_allclose(adjusted[[0, 2]], multipletests([0.01, 0.04], method="holm")[1])
    assert np.isnan(adjusted[1]) and not reject[1]


def _record(run_id, arch, cider, *, p=None, delta=0.2, dataset="shapes", tuning=None):
    data = {"run_id": run_id, "arch": arch, "encoder": "resnet18", "seed": 0,
            "dataset": {"name": dataset, "split_fingerprint": "abc123"},
            "metrics": {"CIDEr": cider}}
    if p is not None:
        data["image_use"] = {"shuffle": None, "baselines": {}, "vs_blind": {
            "baseline": "consensus", "delta": delta, "ci": [0.0, 0.1], "p": p,
            "better": bool(delta > 0 and p < 0.05)}}
    if tuning is not None:
        data["tuning"] = tuning
    r = RunRecord.from_dict(data)
    if tuning is not None and getattr(r, "tuning", None) is None:
        r.tuning = tuning  # until RunRecord reads `tuning` (capbench tune's branch)
    return r, data


#: (arch, vs-blind p, delta): one family of four tests on shapes
BOARD = [("lstm", 0.01, 0.3), ("rnn", 0.04, 0.2), ("transformer", 0.03, 0.25),
         ("attn_lstm", 0.20, -0.1)]


def _trial(study, arch, trial, value):
    tuning = {"study": study, "role": "trial", "trial": trial, "split": "val",
              "objective": "CIDEr", "value": value, "params": {"lr": 1e-3}}
    return _record(f"20261203-0000{trial:02d}-{arch}-t{trial}", arch, value, tuning=tuning)


def test_the_boards_vs_blind_column_is_holm_adjusted_over_its_table():
    recs = [_record(f"20261203-00000{i}-{a}-resnet18-s0-aaa{i}", a, 1.0 - i / 10, p=p,
                    delta=d)[0] for i, (a, p, d) in enumerate(BOARD)]
    recs.append(_record("20261203-000009-lstm-resnet18-s0-bbbb", "lstm", 0.5, p=0.02,
                        dataset="coco-mini")[0])  # another table: its own family of one
    recs += [_trial("s1", "lstm", t, 0.1 * t)[0] for t in range(3)]  # not board rows
    board = leaderboard(recs, baselines=False)
    assert len(board) == 5 and board.attrs["tuning_trials"] == 3
    shapes = board[board["dataset"] == "shapes"].set_index("arch")
    raw = [p for _, p, _ in BOARD]
    expected = multipletests(raw, method="holm")[1]
    np.testing.assert_allclose(shapes.loc[[a for a, _, _ in BOARD], "vs_blind_p"], expected)
    np.testing.assert_allclose(shapes.loc[[a for a, _, _ in BOARD], "vs_blind_p_raw"], raw)
    assert (shapes["vs_blind_tests"] == 4).all()
    # rnn: raw p 0.04 < 0.05 was "better"; Holm-adjusted 0.09 is not
    assert shapes.loc["rnn", "vs_blind_better_raw"] and not shapes.loc["rnn", "vs_blind_better"]
    assert shapes.loc["lstm", "vs_blind_better"]  # 0.04 adjusted
    coco = board[board["dataset"] == "coco-mini"].iloc[0]
    assert coco["vs_blind_p"] == pytest.approx(0.02) and coco["vs_blind_tests"] == 1

    md = render_markdown(board)
    rnn_row = next(ln for ln in md.splitlines() if "| rnn |" in ln)
    assert rnn_row.endswith("| ✗ 0.090 |") and "| raw p |" not in md
    assert "_vs blind: Holm-adjusted over 4 tests" in md
    assert "_vs blind: Holm-adjusted over 1 test " in md
    assert "3 tuning trials not shown" in md
    raw_md = render_markdown(board, raw_p=True)
    rnn_row = next(ln for ln in raw_md.splitlines() if "| rnn |" in ln)
    assert rnn_row.endswith("| ✗ 0.090 | 0.040 |")  # adjusted, then raw beside it
    assert "| vs blind | raw p |" in raw_md and "raw p = before the adjustment" in raw_md


def _constructed_trials():
    """A: high variance (best of many wins), B: flat 0.5, C: flat 0.2, with unbiased EVP
    A = 0.3, 0.5, 0.7, 0.9 and B = 0.5: A below at k=1, tied at k=2, ahead from k=3."""
    out = []
    for t, v in enumerate([0.1, 0.9, 0.1, 0.1]):
        out.append(_trial("study-a", "transformer", t, v))
    for t in range(4):
        out.append(_trial("study-b", "lstm", 10 + t, 0.5))
        out.append(_trial("study-c", "rnn", 20 + t, 0.2))
    return out


def test_the_crossing_table_names_the_budget_where_the_ranking_changes():
    curves = evp_curves([r for r, _ in _constructed_trials()])
    by_arch = {c.arch: c for c in curves}
    assert sorted(by_arch) == ["lstm", "rnn", "transformer"]
    np.testing.assert_allclose(by_arch["transformer"].mean, [0.3, 0.5, 0.7, 0.9])
    np.testing.assert_allclose(by_arch["lstm"].sd, 0, atol=1e-12)
    rows = crossings(curves)
    assert [(r["k"], r["above"], r["below"]) for r in rows] == \
        [(3, "transformer / resnet18", "lstm / resnet18")]
    assert rows[0]["above_value"] == pytest.approx(0.7) and rows[0]["below_value"] == pytest.approx(0.5)


def test_report_plot_draws_the_evp_curves_and_writes_the_crossing_table(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    for _, data in _constructed_trials():
        (runs / f"{data['run_id']}.json").write_text(json.dumps(data))
    _, final = _record("20261203-010000-lstm-resnet18-s0-ffff", "lstm", 0.8, p=0.01)
    (runs / f"{final['run_id']}.json").write_text(json.dumps(final))
    real = report_module.load_records_from

    def with_tuning(folders):  # until RunRecord reads `tuning` (capbench tune's branch)
        records, problems = real(folders)
        for r in records:
            data = json.loads(Path(r.path).read_text())
            if getattr(r, "tuning", None) is None and "tuning" in data:
                r.tuning = data["tuning"]
        return records, problems

    monkeypatch.setattr(report_module, "load_records_from", with_tuning)
    plots = tmp_path / "plots"
    out = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path), "--plot", str(plots),
                                   "--format", "markdown"])
    assert out.exit_code == 0, out.output
    png = plots / "shapes-abc123-evp.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    said = " ".join(out.output.split())
    assert f"wrote {png}" in said and f"wrote {plots / 'evp-crossings.md'}" in said
    assert "k=3 shapes (abc123): transformer / resnet18 (70.0) overtakes lstm / resnet18 (50.0)" in said
    assert "12 tuning trials not shown" in said
    board_rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 1203-")]
    assert len(board_rows) == 1  # the final run only: no trial is a board row
    md = (tmp_path / "LEADERBOARD.md").read_text()
    assert "### Expected validation performance" in md
    assert "| shapes (abc123) | 3 | transformer / resnet18 | lstm / resnet18 | 70.0 | 50.0 |" in md
    assert (plots / "evp-crossings.md").read_text() in md
    # a folder of trials only (a study under way): no board rows, but the curves and the count
    (runs / f"{final['run_id']}.json").unlink()
    (tmp_path / "LEADERBOARD.md").unlink()
    out = CliRunner().invoke(app, ["report", "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "no runs found; 12 tuning trials not shown" in said and "overtakes" in said
    assert "### Expected validation performance" in (tmp_path / "LEADERBOARD.md").read_text()


def _per_image_record(run_id, scores):
    data = {"run_id": run_id, "arch": "lstm", "encoder": "resnet18", "seed": 0,
            "dataset": {"name": "shapes", "split_fingerprint": "abc123"},
            "metrics": {"CIDEr": float(np.mean(scores))},
            "per_image": {"image_ids": list(range(len(scores))), "CIDEr": list(scores)}}
    return RunRecord.from_dict(data), data


def test_compare_of_three_runs_holm_adjusts_each_metric_over_the_comparisons(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 30)
    recs = [_per_image_record(f"run-{name}", base + shift + rng.normal(0, 0.2, 30))
            for name, shift in (("a", 0.0), ("b", 0.08), ("c", 0.02))]
    results = compare_to_first([r for r, _ in recs], n_resamples=300)
    raw = [res["CIDEr"]["p_raw"] for res in results]
    np.testing.assert_allclose([res["CIDEr"]["p"] for res in results],
                               multipletests(raw, method="holm")[1])
    assert all(res["CIDEr"]["tests"] == 2 for res in results)
    (tmp_path / "runs").mkdir()
    for _, data in recs:
        (tmp_path / "runs" / f"{data['run_id']}.json").write_text(json.dumps(data))
    out = CliRunner().invoke(app, ["compare", "run-a", "run-b", "run-c", "--results-dir",
                                   str(tmp_path), "--resamples", "300", "--raw-p"])
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "B - A" in said and "C - A" in said and "raw p" in said
    assert "p: Holm-adjusted per metric over 2 tests" in said
    for res in results:  # the same resamples (seed 0): the printed p-values are these
        assert f"{res['CIDEr']['p']:.3f} │ {res['CIDEr']['p_raw']:.3f}" in said
    one = CliRunner().invoke(app, ["compare", "run-a", "--results-dir", str(tmp_path)])
    assert one.exit_code == 2 and "two runs or more" in one.output
