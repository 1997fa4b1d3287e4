"""Leaderboards from run records: one row per run, grouped by dataset + split fingerprint.

Runs on different split fingerprints are never ranked together. Within a group rows are
sorted by CIDEr-D. Scores are shown x100 in tables (as papers print them) and kept raw in
CSV/JSON.
"""

from __future__ import annotations

import json
import math

import pandas as pd

METRIC_COLUMNS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
THROUGHPUT_COLUMNS = {  # training tokens/s; images/s from pixels; decoder-only captions/s
    "train_tokens_per_s": "tok/s",
    "inference_images_per_s": "img/s",
    "decoder_captions_per_s": "cap/s",
}

__all__ = ["leaderboard", "render_markdown", "render_rich", "render", "METRIC_COLUMNS"]


def leaderboard(records: list[dict]) -> pd.DataFrame:
    """A DataFrame with one row per record: identity, metrics (raw) and throughput columns."""
    rows = []
    for r in records:
        ds = r.get("dataset", {})
        tp = r.get("throughput", {})
        row = {
            "dataset": ds.get("name"),
            "split": ds.get("split_fingerprint"),
            "run_id": r["run_id"],
            "arch": r.get("arch"),
            "encoder": r.get("encoder"),
            "weights": "pre" if r.get("pretrained") else "rand",
            "seed": r.get("seed"),
            "beam": r.get("config", {}).get("decode", {}).get("beam_size"),
        }
        for m in METRIC_COLUMNS:
            v = r.get("metrics", {}).get(m)
            row[m] = float(v) if v is not None else math.nan
        for key in THROUGHPUT_COLUMNS:
            v = tp.get(key)
            row[key] = float(v) if v is not None else math.nan
        row["decoder_params"] = r.get("parameters", {}).get("decoder_trainable")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values(["dataset", "split", "CIDEr"], ascending=[True, True, False],
                        na_position="last", kind="stable")
    return df.reset_index(drop=True)


SHORT = {"Bleu_1": "B@1", "Bleu_2": "B@2", "Bleu_3": "B@3", "Bleu_4": "B@4", "METEOR": "M",
         "ROUGE_L": "R-L", "CIDEr": "CIDEr-D", "SPICE": "S"}


def _display(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["run_id"] = out["run_id"].map(lambda r: r.split("-")[0][4:] + "-" + r.split("-")[1]
                                      + "-" + r.rsplit("-", 1)[-1])
    out = out.rename(columns={"run_id": "run"})
    for m in METRIC_COLUMNS:
        out[SHORT[m]] = out.pop(m).map(lambda v: "n/a" if pd.isna(v) else f"{100 * v:.1f}")
    for key, label in THROUGHPUT_COLUMNS.items():
        out[label] = out.pop(key).map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}")
    out["params"] = out.pop("decoder_params").map(
        lambda v: "-" if v is None or pd.isna(v) else f"{v / 1e6:.2f}M")
    return out


def _groups(df: pd.DataFrame):
    for (name, split), g in df.groupby(["dataset", "split"], sort=True):
        yield f"{name} (split {split})", g.drop(columns=["dataset", "split"])


def render_markdown(df: pd.DataFrame) -> str:
    """Markdown: one table per dataset/split group, scores x100."""
    if df.empty:
        return "_no runs_\n"
    parts = []
    for title, g in _groups(_display(df)):
        cols = list(g.columns)
        lines = [f"### {title}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in g.itertuples(False)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n\nScores x100 (pycocoevalcap): B = BLEU, M = METEOR, "
                                   "R-L = ROUGE-L, S = SPICE; weights pre(trained) or rand(om "
                                   "init); tok/s = training tokens/s, img/s = inference images/s "
                                   "from pixels, cap/s = decoder-only captions/s; run = "
                                   "MMDD-HHMMSS-tag of the run id.\n")


def render_rich(df: pd.DataFrame, console) -> None:
    """Print one rich table per dataset/split group."""
    from rich.table import Table

    if df.empty:
        console.print("no runs found")
        return
    for title, g in _groups(_display(df)):
        table = Table(title=title, caption="scores x100; B = BLEU, M = METEOR, R-L = ROUGE-L, "
                      "S = SPICE; weights pre(trained)/rand(om init); tok/s training tokens/s, img/s "
                      "inference from pixels, cap/s decoder-only; run = MMDD-HHMMSS-tag")
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
