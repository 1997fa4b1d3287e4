"""The terminal leaderboard reads whole in a normal terminal, and the plots' log axes read
as plain numbers (issue 13)."""

import io
import re

import matplotlib.pyplot as plt
import pytest
from rich.console import Console

from benchmark.plots import plot_quality_vs_throughput, quality_vs_throughput_figure
from benchmark.records import RunRecord
from benchmark.report import (
    COMPACT_COLUMNS,
    OPTIONAL_COLUMNS,
    aggregate_seeds,
    leaderboard,
    render_markdown,
    render_rich,
)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
LABELS = ("B@1", "B@2", "B@3", "B@4", "M", "R-L", "CIDEr-D", "S")
ALL_HEADERS = ["run", "decoder", "encoder", "weights", "seed", "beam", *LABELS,
               "tok/s", "img/s", "cap/s", "uniq%", "params"]
IDENTITY = ["run", "decoder", "encoder"]
COMPACT = ["run", "decoder", "encoder", "B@4", "M", "CIDEr-D", "tok/s", "uniq%"]

#: (run_id, arch, encoder, pretrained, scores {metric: (value, ci_low, ci_high) or None},
#:  tok/s, img/s, cap/s, uniq%, trainable decoder parameters)
RUNS = [
    ("20261121-063550-transformer-clip_vit_b32-s0-0f6d", "transformer", "clip_vit_b32", True,
     (0.812, 0.780, 0.843), (0.655, 0.611, 0.699), (0.513, 0.464, 0.561), (0.398, 0.349, 0.446),
     (0.301, 0.284, 0.318), (0.612, 0.590, 0.634), (1.829, 1.63, 2.03), (0.215, 0.201, 0.229),
     3732.4, 12.3, 98.2, 63.3, 2_345_678),
    ("20261121-063336-rnn-clip_vit_b32-s0-0ffa", "rnn", "clip_vit_b32", True,
     (0.766, 0.731, 0.801), (0.590, 0.545, 0.636), (0.447, 0.398, 0.497), (0.331, 0.284, 0.378),
     (0.285, 0.268, 0.303), (0.573, 0.551, 0.596), (1.617, 1.405, 1.820), (0.188, 0.171, 0.204),
     36660.6, 40.2, 3650.6, 80.0, 244_004),
    ("20261121-062424-attn_lstm-resnet50-s0-6943", "attn_lstm", "resnet50", False,
     (0.722, 0.688, 0.757), (0.541, 0.497, 0.585), (0.402, 0.356, 0.449), (0.293, 0.249, 0.337),
     (0.269, 0.251, 0.287), (0.550, 0.527, 0.573), (1.322, 1.115, 1.518), (0.171, 0.155, 0.188),
     2657.3, 8.9, 168.1, 71.1, 4_376_997),
    ("20261121-062908-lstm-vit_b16-s0-5880", "lstm", "vit_b16", True,
     (0.681, 0.644, 0.719), (0.497, 0.453, 0.541), (0.359, 0.314, 0.404), (0.252, 0.211, 0.293),
     (0.248, 0.231, 0.265), (0.521, 0.499, 0.544), (0.921, 0.725, 1.109), None,
     9974.4, 3.1, 1025.3, 1.1, 507_556),
]


def _record(run) -> RunRecord:
    run_id, arch, encoder, pretrained, *scores = run
    scores, (tok, img, cap, uniq, params) = scores[:8], scores[8:]
    metrics = {m: (s[0] if s else None) for m, s in zip(METRICS, scores, strict=True)}
    cis = {m: [s[1], s[2]] for m, s in zip(METRICS, scores, strict=True) if s}
    return RunRecord.from_dict({
        "run_id": run_id, "arch": arch, "encoder": encoder, "pretrained": pretrained, "seed": 0,
        "config_id": run_id, "config": {"decode": {"beam_size": 3}},
        "dataset": {"name": "coco-mini", "split_fingerprint": "74c912156e14"},
        "metrics": metrics, "confidence_intervals": cis,
        "throughput": {"train_tokens_per_s": tok, "inference_images_per_s": img,
                       "decoder_captions_per_s": cap},
        "diversity": {"unique_pct": uniq}, "parameters": {"decoder_trainable": params},
    })


def _expected(run) -> dict[str, str]:
    """Every cell of a run's row as it must read in full, computed here from the raw values."""
    run_id, arch, encoder, pretrained, *scores = run
    scores, (tok, img, cap, uniq, params) = scores[:8], scores[8:]
    parts = run_id.split("-")
    row = {"run": f"{parts[0][4:]}-{parts[1]}-{parts[-1]}", "decoder": arch, "encoder": encoder,
           "weights": "pre" if pretrained else "rand", "seed": "0", "beam": "3"}
    for label, s in zip(LABELS, scores, strict=True):
        row[label] = f"{100 * s[0]:.1f} ±{100 * (s[2] - s[1]) / 2:.1f}" if s else "n/a"
    row.update({"tok/s": f"{tok:,.0f}", "img/s": f"{img:,.0f}", "cap/s": f"{cap:,.0f}",
                "uniq%": f"{uniq:.0f}" + (" ✗" if uniq < 5 else ""), "params": f"{params / 1e6:.2f}M"})
    return row


EXPECTED = {e["run"]: e for e in map(_expected, RUNS)}


@pytest.fixture(scope="module")
def board():
    return leaderboard([_record(r) for r in RUNS])


def _render(df, width: int, **kwargs) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    render_rich(df, console, **kwargs)
    return console.export_text()


def _parse(text: str):
    """(headers, rows as {header: cell}, footer text) of one rendered table."""
    lines = text.splitlines()
    headers = [h.strip() for h in next(ln for ln in lines if "┃" in ln).split("┃")]
    body = [i for i, ln in enumerate(lines) if "│" in ln]
    rows = [dict(zip(headers, (c.strip() for c in lines[i].split("│")), strict=True))
            for i in body]
    footer = " ".join(ln.strip() for ln in lines[body[-1] + 1:])
    return headers, rows, footer


def _hidden(footer: str) -> list[str]:
    m = re.search(r"hidden for width: (.*?) — ", footer)
    return m.group(1).split(", ") if m else []


def _check_whole(text: str, width: int) -> tuple[list[str], list[str], str]:
    """Assert nothing is cut and every shown cell reads in full; return headers, hidden, footer."""
    assert "…" not in text
    assert max(len(ln) for ln in text.splitlines()) <= width
    headers, rows, footer = _parse(text)
    assert headers[:3] == IDENTITY and "CIDEr-D" in headers
    assert {r["run"] for r in rows} == set(EXPECTED)
    for row in rows:
        for header, cell in row.items():
            assert cell == EXPECTED[row["run"]][header], (header, cell)
    return headers, _hidden(footer), footer


def test_the_expected_cells_are_the_familiar_numbers():
    first = EXPECTED["1121-063550-0f6d"]
    assert first["CIDEr-D"] == "182.9 ±20.0" and first["tok/s"] == "3,732"
    assert first["uniq%"] == "63" and first["params"] == "2.35M"
    assert EXPECTED["1121-063336-0ffa"]["tok/s"] == "36,661"


@pytest.mark.parametrize("width", [80, 100, 120, 200])
@pytest.mark.parametrize("view", [{}, {"wide": True}, {"columns": ["B@1", "CIDEr-D", "img/s"]}])
def test_every_number_is_whole_and_the_table_fits(board, width, view):
    headers, hidden, footer = _check_whole(_render(board, width, **view), width)
    requested = (ALL_HEADERS if view.get("wide") else
                 IDENTITY + ["B@1", "CIDEr-D", "img/s"] if "columns" in view else COMPACT)
    assert [h for h in requested if h not in hidden] == headers  # in the board's order
    assert set(hidden) <= set(requested) - {"run", "decoder", "encoder", "CIDEr-D"}
    if hidden:
        assert "widen the terminal" in footer and "--columns" in footer


@pytest.mark.parametrize("width", [100, 120, 200])
def test_the_compact_default_fits_100_columns_with_nothing_hidden(board, width):
    # without image-use figures in the records, the compact view is exactly these columns
    assert [{"arch": "decoder"}.get(c, c) for c in COMPACT_COLUMNS
            if c not in OPTIONAL_COLUMNS] == COMPACT
    text = _render(board, width)
    headers, hidden, footer = _check_whole(text, width)
    assert headers == COMPACT and hidden == [] and "hidden for width" not in text
    assert max(len(ln) for ln in text.splitlines()) <= 100
    assert "M = METEOR" in footer and "--wide" in footer  # a key to what is shown, and more


def test_at_80_columns_the_footer_names_what_it_hides(board):
    headers, hidden, footer = _check_whole(_render(board, 80), 80)
    assert hidden and set(headers) | set(hidden) == set(COMPACT)
    assert "CIDEr-D" in headers and "hidden for width:" in footer and "--wide" in footer
    if "M" in hidden:  # the key describes only the columns shown
        assert "METEOR" not in footer.split("hidden for width")[0]


def test_wide_at_200_shows_every_metric(board):
    headers, hidden, footer = _check_whole(_render(board, 200, wide=True), 200)
    assert [h for h in headers if h in LABELS] == list(LABELS)
    assert set(headers) | set(hidden) == set(ALL_HEADERS)
    assert "R-L = ROUGE-L" in footer and "S = SPICE" in footer


@pytest.mark.parametrize("names", [["B@1", "CIDEr-D"], ["cider-d", "b@1"], ["Bleu_1", "CIDEr"],
                                   ["BLEU-1"]])
def test_chosen_columns_show_exactly_those_metrics(board, names):
    headers, hidden, footer = _check_whole(_render(board, 120, columns=names), 120)
    assert headers == IDENTITY + ["B@1", "CIDEr-D"] and hidden == []
    assert "B@n = BLEU-n" in footer and "METEOR" not in footer and "tok/s" not in footer


def test_chosen_columns_take_identity_and_throughput_keys(board):
    headers, _, _ = _check_whole(_render(board, 200, columns=["weights", "decoder", "TOK/S",
                                                              "unique_pct", "decoder_params"]), 200)
    assert headers == IDENTITY + ["weights", "CIDEr-D", "tok/s", "uniq%", "params"]


def test_an_unknown_column_names_the_valid_ones(board):
    with pytest.raises(ValueError, match=r"unknown column 'bleu4'.*B@4.*CIDEr-D.*tok/s.*Bleu_4"):
        _render(board, 100, columns=["CIDEr-D", "bleu4"])
    with pytest.raises(ValueError, match="unknown column"):
        _render(board.iloc[:0], 100, columns=["nope"])


def test_below_the_minimum_width_cells_wrap_but_nothing_is_cut(board):
    text = _render(board, 50)
    assert "…" not in text and max(len(ln) for ln in text.splitlines()) <= 50
    words = text.split()
    for row in EXPECTED.values():
        assert all(w in words for w in row["CIDEr-D"].split())


def test_aggregated_rows_show_seeds_and_std(board):
    text = _render(aggregate_seeds(board), 120, columns=["seed", "B@4"])
    headers, _, footer = _parse(text)
    assert headers == IDENTITY + ["seeds", "B@4", "CIDEr-D"]
    assert "std over seeds" in footer and "…" not in text


def test_markdown_keeps_every_column(board):
    md = render_markdown(board)
    header = next(ln for ln in md.splitlines() if ln.startswith("| run"))
    assert [h.strip() for h in header.strip("|").split("|")] == [
        "run", "arch", "encoder", "weights", "seed", "beam", *LABELS, "tok/s", "img/s", "cap/s",
        "uniq%", "params"]
    assert "| 182.9 ±20.0 |" in md and "| 3,732 |" in md


def test_the_log_axis_reads_as_plain_numbers(board, tmp_path):
    assert board["inference_images_per_s"].min() == 3.1
    assert board["inference_images_per_s"].max() == 40.2
    fig = quality_vs_throughput_figure(board, "coco-mini")
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        labels = {t.get_text() for t in ax.xaxis.get_ticklabels(which="both")
                  if t.get_text() and lo <= t.get_position()[0] <= hi}
    finally:
        plt.close(fig)
    assert not any("10^" in t or "$" in t or "×" in t or "e+" in t for t in labels), labels
    assert {"4", "6", "10", "20", "40"} <= labels, labels
    path = plot_quality_vs_throughput(board, "coco-mini", tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_throughputs_get_thousands_separators(board):
    fig = quality_vs_throughput_figure(board, "coco-mini", speed="train_tokens_per_s")
    try:
        fig.canvas.draw()
        labels = {t.get_text() for t in fig.axes[0].xaxis.get_ticklabels(which="both")}
    finally:
        plt.close(fig)
    assert "10,000" in labels and not any("10^" in t or "$" in t for t in labels), labels


def test_pointing_columns_say_na_for_a_decoder_without_attention_and_dash_when_unmeasured():
    from benchmark.records import RunRecord
    from benchmark.report import leaderboard, render_markdown

    def rec(run_id, arch, grounding):
        return RunRecord.from_dict({
            "run_id": run_id, "arch": arch, "encoder": "resnet50",
            "dataset": {"name": "shapes", "split_fingerprint": "abc"},
            "metrics": {"CIDEr": 1.0}, **({"grounding": grounding} if grounding else {})})

    g = {"split": "test", "pointing": {"attention": None, "gradcam": 0.42, "centre": 0.1,
                                       "random": 0.2}}
    board = leaderboard([rec("20261122-000000-lstm-resnet50-s0-aaaa", "lstm", g),
                         rec("20261122-000001-rnn-resnet50-s0-bbbb", "rnn", None)],
                        baselines=False)
    rows = [ln for ln in render_markdown(board).splitlines() if ln.startswith("| 1122-")]
    lstm = next(r for r in rows if "| lstm |" in r)
    rnn = next(r for r in rows if "| rnn |" in r)
    assert "| n/a | 42 | 10 |" in lstm  # point att / GC / ctr
    assert rnn.rstrip().endswith("| - | - | - |")


def test_a_fine_tuned_run_shares_its_base_encoders_nn_baseline_row():
    from benchmark.records import RunRecord
    from benchmark.report import leaderboard

    use = {"baselines": {"nn": {"encoder": "clip_vit_b32", "detail": "k=5",
                                "metrics": {"CIDEr": 2.0}}}}

    def rec(run_id, weights, trainable):
        return RunRecord.from_dict({
            "run_id": run_id, "arch": "lstm", "encoder": "clip_vit_b32",
            "encoder_weights": weights, "dataset": {"name": "shapes", "split_fingerprint": "abc"},
            "metrics": {"CIDEr": 1.0}, "image_use": use,
            "training": {"encoder": {"trainable": trainable}}})

    board = leaderboard([rec("20261122-000000-lstm-c-s0-aaaa", "random-init:seed=0", "none"),
                         rec("20261122-000001-lstm-c-s0-bbbb",
                             "random-init:seed=0+finetuned-last:0123456789abcdef", "last")])
    assert (board["kind"] == "baseline").sum() == 1
    assert sorted(board.loc[board["kind"] == "run", "tuned"]) == ["last", "none"]
