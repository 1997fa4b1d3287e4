"""Leaderboards from run records: one row per run, grouped by dataset + split fingerprint.

Runs on different split fingerprints are never ranked together. Within a group rows are
sorted by CIDEr-D. Scores are shown x100 in tables (as papers print them), with the
half-width of the bootstrap 95% CI when the record has one (``66.1 ±2.3``), and kept raw in
CSV/JSON (with ``<metric>_ci_low``/``_ci_high`` columns). :func:`aggregate_seeds` folds runs
that differ only in seed into mean ± std rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from benchmark.fsutil import atomic_write_text
from benchmark.metrics import ALL_METRICS
from benchmark.records import RunRecord

METRIC_COLUMNS = list(ALL_METRICS)
THROUGHPUT_COLUMNS = {  # training tokens/s; images/s from pixels; decoder-only captions/s
    "train_tokens_per_s": "tok/s",
    "inference_images_per_s": "img/s",
    "decoder_captions_per_s": "cap/s",
}
SHORT = {"Bleu_1": "B@1", "Bleu_2": "B@2", "Bleu_3": "B@3", "Bleu_4": "B@4", "METEOR": "M",
         "ROUGE_L": "R-L", "CIDEr": "CIDEr-D", "SPICE": "S"}
LEGEND = ("scores x100 (pycocoevalcap) ±95% bootstrap CI half-width or ±std over seeds; "
          "B = BLEU, M = METEOR, R-L = ROUGE-L, S = SPICE; weights pre(trained)/rand(om init); "
          "tok/s training tokens/s, img/s inference from pixels, cap/s decoder-only; uniq% "
          "distinct test captions (low = one caption for every image); "
          "run = MMDD-HHMMSS-tag of the run id")
IDENTITY = ["dataset", "split", "config_id", "arch", "encoder", "weights", "beam"]

__all__ = ["leaderboard", "aggregate_seeds", "render_markdown", "render_rich", "render",
           "write_leaderboard_file", "METRIC_COLUMNS"]


def leaderboard(records: list[RunRecord]) -> pd.DataFrame:
    """A DataFrame with one row per record: identity, metrics (raw), CIs and throughput."""
    rows = []
    for r in records:
        row = {
            "dataset": r.dataset.name,
            "split": r.split_fingerprint,
            "run_id": r.run_id,
            "config_id": r.config_id or r.run_id,
            "arch": r.arch,
            "encoder": r.encoder,
            "weights": "pre" if r.pretrained else "rand",
            "seed": r.seed,
            "beam": r.beam_size,
        }
        for m in METRIC_COLUMNS:
            v = r.metrics.get(m)
            row[m] = float(v) if v is not None else math.nan
            lo, hi = r.confidence_intervals.get(m, [math.nan, math.nan])
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = lo, hi
        for key in THROUGHPUT_COLUMNS:
            v = r.throughput.get(key)
            row[key] = float(v) if v is not None else math.nan
        row["decoder_params"] = r.parameters.get("decoder_trainable")
        row["unique_pct"] = r.diversity.get("unique_pct", math.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values(["dataset", "split", "CIDEr"], ascending=[True, True, False],
                        na_position="last", kind="stable")
    return df.reset_index(drop=True)


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config (runs differing only in seed): mean, ``<metric>_std`` and ``n``."""
    if df.empty:
        return df
    value_cols = METRIC_COLUMNS + list(THROUGHPUT_COLUMNS) + ["decoder_params", "unique_pct"]
    g = df.groupby(IDENTITY, dropna=False, sort=False)
    mean = g[value_cols].mean()
    std = g[METRIC_COLUMNS].std(ddof=1).add_suffix("_std")
    out = mean.join(std)
    out["n"] = g.size()
    out["seeds"] = g["seed"].apply(lambda s: ",".join(str(x) for x in sorted(s)))
    out["run_id"] = g["run_id"].first()
    out = out.reset_index().sort_values(["dataset", "split", "CIDEr"],
                                        ascending=[True, True, False], kind="stable")
    return out.reset_index(drop=True)


def _cell(row, m: str) -> str:
    v = row[m]
    if pd.isna(v):
        return "n/a"
    if f"{m}_std" in row and not pd.isna(row[f"{m}_std"]):
        return f"{100 * v:.1f} ±{100 * row[f'{m}_std']:.1f}"
    lo, hi = row.get(f"{m}_ci_low", math.nan), row.get(f"{m}_ci_high", math.nan)
    if pd.isna(lo) or pd.isna(hi):
        return f"{100 * v:.1f}"
    return f"{100 * v:.1f} ±{100 * (hi - lo) / 2:.1f}"


def _display(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in df.iterrows():
        rid = r["run_id"]
        parts = rid.split("-")
        row = {"dataset": r["dataset"], "split": r["split"],
               "run": f"{parts[0][4:]}-{parts[1]}-{parts[-1]}" if len(parts) > 2 else rid,
               "arch": r["arch"], "encoder": r["encoder"], "weights": r["weights"]}
        if "n" in r:
            row["seeds"] = r["seeds"]
        else:
            row["seed"] = r["seed"]
        row["beam"] = r["beam"]
        for m in METRIC_COLUMNS:
            row[SHORT[m]] = _cell(r, m)
        for key, label in THROUGHPUT_COLUMNS.items():
            row[label] = "-" if pd.isna(r[key]) else f"{r[key]:,.0f}"
        u = r.get("unique_pct", math.nan)
        row["uniq%"] = "-" if pd.isna(u) else f"{u:.0f}"
        p = r["decoder_params"]
        row["params"] = "-" if p is None or pd.isna(p) else f"{p / 1e6:.2f}M"
        rows.append(row)
    return pd.DataFrame(rows)


def _groups(df: pd.DataFrame):
    for (name, split), g in df.groupby(["dataset", "split"], sort=True):
        yield f"{name} (split {split})", g.drop(columns=["dataset", "split"])


def render_markdown(df: pd.DataFrame) -> str:
    """Markdown: one table per dataset/split group."""
    if df.empty:
        return "_no runs_\n"
    parts = []
    for title, g in _groups(_display(df)):
        cols = list(g.columns)
        lines = [f"### {title}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in g.itertuples(False)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + f"\n\n{LEGEND[0].upper()}{LEGEND[1:]}.\n"


def render_rich(df: pd.DataFrame, console) -> None:
    """Print one rich table per dataset/split group."""
    from rich.table import Table

    if df.empty:
        console.print("no runs found")
        return
    for title, g in _groups(_display(df)):
        table = Table(title=title, caption=LEGEND)
        for c in g.columns:
            table.add_column(c, justify="right" if c in SHORT.values() else "left", no_wrap=True)
        for row in g.itertuples(False):
            table.add_row(*(str(v) for v in row))
        console.print(table)


def render(df: pd.DataFrame, fmt: str) -> str:
    """``markdown``, ``csv`` (raw scores) or ``json`` (raw scores) text."""
    if fmt == "markdown":
        return render_markdown(df)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(df.to_json(orient="records")), indent=1)
    raise ValueError(f"unknown format {fmt!r}")


def write_leaderboard_file(df: pd.DataFrame, results_dir: str | Path) -> Path:
    """Write ``<results_dir>/LEADERBOARD.md``: the markdown board of every run there."""
    path = Path(results_dir) / "LEADERBOARD.md"
    return atomic_write_text(path, "# capbench leaderboard\n\nMade by `capbench report` from the "
                             f"run records in `{results_dir}/runs`.\n\n" + render(df, "markdown"))
