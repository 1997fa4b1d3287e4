"""Leaderboards from run records: one row per run, grouped by dataset + split fingerprint.

Runs on different split fingerprints are never ranked together. Within a group rows are
sorted by CIDEr-D. Scores are shown x100 in tables (as papers print them), with the
half-width of the bootstrap 95% CI when the record has one (``66.1 ±2.3``), and kept raw in
CSV/JSON (with ``<metric>_ci_low``/``_ci_high`` columns). :func:`aggregate_seeds` folds runs
that differ only in seed into mean ± std rows.

In a terminal (:func:`render_rich`) the board is compact by default (run, decoder, encoder,
BLEU-4, METEOR, CIDEr-D, tokens/s, uniq%), ``wide`` shows every column and ``columns`` picks
some. A number is never cut: when a table is wider than the console, whole columns are hidden
by a fixed priority (:data:`DROP_ORDER`) and the table's footer names them.

Several results folders (e.g. those the shards of ``capbench matrix --shard i/N`` wrote) form
one board: :func:`load_records_from` merges their records, counting a record found in two
folders once and refusing a run id whose records differ.

The ``vs blind`` p-values of a dataset/split table are one family: they are Holm-adjusted
over the table's rows (:func:`benchmark.stats.holm`), the raw ones kept beside them
(``vs_blind_p_raw``; ``raw p`` column with ``raw_p``). Tuning trials (records of ``capbench
tune`` with ``tuning.role == "trial"``, scored on the validation split) are not board rows:
the footer counts them, and :mod:`benchmark.evp` draws their expected-validation-performance
curves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import CapbenchError, RecordError, StorageError
from benchmark.evp import crossings, crossings_markdown, evp_curves, trial_records
from benchmark.fsutil import atomic_write_text, refuse_overwrite
from benchmark.gallery import AttentionStrips, write_gallery
from benchmark.image_use import SIGNIFICANCE
from benchmark.metrics import families, registered_metrics
from benchmark.records import RunRecord, load_records
from benchmark.stats import holm

METRIC_COLUMNS = list(registered_metrics())
#: metrics of the model-based families (CLIP-S, ...): shown by ``--wide``, and left out of a
#: group in which no row could compute them (no weights or no images)
WIDE_METRICS = tuple(m for fam in families() if fam.wide_only for m in fam.metrics)
THROUGHPUT_COLUMNS = {  # training tokens/s; images/s from pixels; decoder-only captions/s
    "train_tokens_per_s": "tok/s",
    "inference_images_per_s": "img/s",
    "decoder_captions_per_s": "cap/s",
}
SHORT = {"Bleu_1": "B@1", "Bleu_2": "B@2", "Bleu_3": "B@3", "Bleu_4": "B@4", "METEOR": "M",
         "ROUGE_L": "R-L", "CIDEr": "CIDEr-D", "SPICE": "S", **{m: m for m in WIDE_METRICS}}
#: markdown's key to every column (the terminal table keys only the columns it shows)
LEGEND = ("scores x100 (pycocoevalcap) ±95% bootstrap CI half-width or ±std over seeds; "
          "B = BLEU, M = METEOR, R-L = ROUGE-L, S = SPICE; weights pre(trained)/rand(om init); "
          "tok/s training tokens/s, img/s inference from pixels, cap/s decoder-only; uniq% "
          "distinct test captions, ✗ = collapsed (under 5%: nearly one caption for every image); "
          "vs blind = paired-bootstrap p of CIDEr-D against the strongest blind baseline, "
          "Holm-adjusted over the table's rows (each table's footer says over how many tests; "
          "raw p = unadjusted, --raw-p), ✗ = not significantly better (adjusted p >= 0.05 or "
          "lower); shuffle Δ = CIDEr-D lost when each test "
          "image gets another image's features (±95% CI half-width; ~0 = the image is ignored); "
          "tuned = encoder frozen or fine-tuned (last stage / all; shown when a group mixes "
          "them); obj = training objective (xe = cross-entropy, xe+scst = then self-critical; shown "
          "when a group mixes them); tokenizer = caption tokenizer (V = vocabulary size, mean "
          "tokens per train caption; shown when a group mixes them); point att / GC / ctr = "
          "pointing-game hits (%) of the words naming a shape or colour on shapes, for "
          "attention, Grad-CAM and the centre baseline (`capbench ground`; n/a = no "
          "attention); "
          "CLIP-S / RefCLIP-S = Hessel et al. 2021 with OpenAI's ViT-B/32, PAC-S / RefPAC-S = "
          "Sarto et al. 2023 (x100; n/a = no weights or images); "
          "baseline rows: most-freq / consensus = one caption for every image (blind), nn = "
          "nearest-neighbour captions of that encoder; run = MMDD-HHMMSS-tag of the run id")
#: the key to reference rows, added to a board's legend only where it has some
REFERENCE_LEGEND = ("reference rows: NAME (pretrained) = a pretrained captioner (Hugging Face, "
                    "`capbench eval --hf`) scored on the same split, not trained here (its "
                    "pretraining data may include COCO); encoder = its model id")
COLLAPSED_PCT = 5.0
#: decoder-column names of the baseline reference rows (short, so the compact view fits)
BASELINE_NAMES = {"most-frequent": "most-freq", "consensus": "consensus", "nn": "nn"}
IDENTITY = ["dataset", "split", "config_id", "arch", "encoder", "weights", "beam", "objective",
            "tokenizer_id", "tuned"]

#: the terminal table's default columns (display names; ``arch`` is headed "decoder" there);
#: ``vs blind`` and ``shuffle Δ`` are the first hidden when the terminal is narrow
COMPACT_COLUMNS = ("run", "arch", "encoder", "tuned", "obj", "tokenizer", "B@4", "M", "CIDEr-D",
                   "tok/s", "uniq%", "vs blind", "shuffle Δ", "point att")
#: the pointing-game columns (``capbench ground --save``), per heatmap method
POINTING_COLUMNS = {"point att": "attention", "point GC": "gradcam", "point ctr": "centre"}
#: columns left out of a group in which no record has them (records older than the feature,
#: runs never grounded; ``obj`` when every run is cross-entropy only)
OPTIONAL_COLUMNS = ("tuned", "obj", "tokenizer", "vs blind", "raw p", "shuffle Δ",
                    *POINTING_COLUMNS)
#: columns the terminal table shows whatever the width or the chosen columns
ALWAYS_SHOWN = ("run", "arch", "encoder", "CIDEr-D")
#: the order in which the terminal table hides columns that do not fit (first hidden first)
DROP_ORDER = (*reversed(WIDE_METRICS),
              "point ctr", "point GC", "point att", "shuffle Δ", "raw p", "vs blind", "params",
              "tokenizer", "obj", "tuned",
              "beam",
              "seed", "seeds", "B@2", "B@3", "cap/s", "B@1", "S", "img/s", "R-L", "weights",
              "uniq%", "M", "tok/s", "B@4")
#: terminal headers that differ from the display names (markdown keeps ``arch``)
RICH_HEADERS = {"arch": "decoder"}
#: the leaderboard (CSV/JSON) key behind each display column; ``render_rich(columns=...)``
#: takes either name, the terminal header (``decoder``) or a metric's long name (``BLEU-4``)
COLUMN_KEYS = {
    "run": "run_id", "arch": "arch", "encoder": "encoder", "weights": "weights", "seed": "seed",
    "beam": "beam", "obj": "objective", "tokenizer": "tokenizer", "tuned": "tuned",
    **{SHORT[m]: m for m in METRIC_COLUMNS},
    **{label: key for key, label in THROUGHPUT_COLUMNS.items()},
    "uniq%": "unique_pct", "params": "decoder_params", "vs blind": "vs_blind_p",
    "shuffle Δ": "shuffle_drop",
    **{label: f"pointing_{m}" for label, m in POINTING_COLUMNS.items()},
}
_MORE_NAMES = {"seed": ("seeds",), "R-L": ("ROUGE-L",),
               **{f"B@{n}": (f"BLEU-{n}",) for n in range(1, 5)}}
#: what each shown column means, for the terminal table's footer
_LEGEND_PARTS = {
    "weights": "weights pre(trained)/rand(om init)",
    "B@": "B@n = BLEU-n", "M": "M = METEOR", "R-L": "R-L = ROUGE-L", "S": "S = SPICE",
    "tok/s": "tok/s training tokens/s", "img/s": "img/s inference images/s from pixels",
    "cap/s": "cap/s decoder-only captions/s",
    "uniq%": "uniq% distinct test captions (low = one caption for every image)",
    "params": "params trainable decoder parameters",
    "vs blind": "vs blind p-value of CIDEr-D against the strongest blind baseline (Holm-"
                "adjusted over the table's rows), ✗ = not significantly better",
    "raw p": "raw p = vs blind's p-value before Holm's adjustment",
    "shuffle Δ": "shuffle Δ CIDEr-D lost with another image's features (~0: image ignored)",
    "run": "run = MMDD-HHMMSS-tag of the run id",
    "obj": "obj training objective: xe = cross-entropy, xe+scst = then self-critical",
    "tuned": "tuned: encoder frozen, or its last stage / all of it fine-tuned",
    "tokenizer": "tokenizer: kind (V = vocabulary size, mean tokens per train caption)",
    "point ": "point att/GC/ctr pointing-game hits % (shapes words) of attention, Grad-CAM, "
              "the centre baseline",
    "CLIP-S": "CLIP-S / RefCLIP-S: Hessel et al. 2021 (OpenAI ViT-B/32)",
    "PAC-S": "PAC-S / RefPAC-S: Sarto et al. 2023",
}

__all__ = ["leaderboard", "aggregate_seeds", "render_markdown", "render_rich", "render",
           "write_leaderboard_file", "load_board", "load_records_from", "resolve_columns", "ColumnError",
           "METRIC_COLUMNS", "COMPACT_COLUMNS", "ReportOptions", "ReportOutcome", "make_report"]


class ColumnError(CapbenchError, ValueError):
    """An unknown column name was asked of :func:`render_rich` (the message lists the valid
    ones). A ValueError, and a CapbenchError so the CLI prints it without a traceback."""


def _image_use_columns(r: RunRecord) -> dict:
    use = r.image_use or {}
    shuffle, vs = use.get("shuffle") or {}, use.get("vs_blind") or {}
    lo, hi = shuffle.get("drop_ci", [math.nan, math.nan])
    return {"vs_blind_p": vs.get("p", math.nan), "vs_blind_delta": vs.get("delta", math.nan),
            "vs_blind_better": vs.get("better"), "vs_blind_baseline": vs.get("baseline"),
            "shuffle_drop": shuffle.get("drop", math.nan), "shuffle_drop_ci_low": lo,
            "shuffle_drop_ci_high": hi, "shuffle_p": shuffle.get("p", math.nan)}


def _grounding_columns(r: RunRecord) -> dict:
    """Pointing-game fractions of the record's test-split grounding (NaN when never measured
    or when the decoder lacks the method; ``pointing_measured`` tells the two apart)."""
    g = r.grounding or {}
    if g.get("split") != "test":
        return {"pointing_measured": False,
                **{f"pointing_{m}": math.nan for m in POINTING_COLUMNS.values()}}
    return {"pointing_measured": True,
            **{f"pointing_{m}": g.get("pointing", {}).get(m) for m in POINTING_COLUMNS.values()}}


def _tokenizer_id(r: RunRecord) -> str:
    """``kind:vocabulary size``: what identifies a run's tokenizer (records older than the
    subword tokenizers, which lack the mean tokens per caption, share it with new ones)."""
    tok = (r.training or {}).get("tokenizer") or {}
    return f"{tok.get('kind', 'word')}:{tok.get('vocab_size', r.vocab_size)}"


def _tokenizer_cell(r: RunRecord) -> str:
    """``kind (V=size, tokens/caption)`` of the record's caption tokenizer (``word (V=n)``
    for records older than subword tokenizers)."""
    tok = (r.training or {}).get("tokenizer") or {"kind": "word", "vocab_size": r.vocab_size}
    mean = tok.get("mean_tokens_per_caption")
    return (f"{tok.get('kind', 'word')} (V={tok.get('vocab_size')}"
            + (f", {mean:.1f}/cap)" if mean is not None else ")"))


def _reference_label(r: RunRecord) -> str:
    """The decoder cell of a reference record (``capbench eval --hf``): ``BLIP (pretrained)``."""
    return f"{(r.reference_model or {}).get('family') or r.arch} (pretrained)"


def _tuned_label(r: RunRecord) -> str:
    """The decoder cell of a run: ``attn_lstm (tuned, N=8)`` for the re-run of a study's best
    configuration (``capbench matrix --tune``), else the decoder's name."""
    t = r.tuning or {}
    return f"{r.arch} (tuned, N={t.get('budget')})" if t.get("role") == "final" else r.arch


def _baseline_rows(records: list[RunRecord]) -> list[dict]:
    """Reference rows from the records' ``image_use.baselines``: each blind baseline once per
    dataset/split, and the nearest-neighbour baseline once per encoder."""
    rows, seen = [], set()
    for r in records:
        for kind, b in ((r.image_use or {}).get("baselines") or {}).items():
            encoder = b.get("encoder") if kind == "nn" else None
            # nn uses the frozen features: a fine-tuned run shares its base encoder's row
            base = r.encoder_weights.split("+finetuned-")[0]
            key = (r.dataset.name, r.split_fingerprint, kind, encoder, base if encoder else None)
            if key in seen:
                continue
            seen.add(key)
            row = {"dataset": r.dataset.name, "split": r.split_fingerprint, "kind": "baseline",
                   "run_id": f"baseline:{kind}" + (f":{encoder}" if encoder else ""),
                   "config_id": f"baseline:{kind}:{encoder}", "seed": None, "beam": None,
                   "objective": "-", "tokenizer": "-", "tokenizer_id": "-", "tuned": "-",
                   "arch": BASELINE_NAMES.get(kind, kind), "encoder": encoder or "-",
                   "weights": ("pre" if r.pretrained else "rand") if encoder else "-",
                   "decoder_params": None, "unique_pct": math.nan}
            for m in METRIC_COLUMNS:
                v = b["metrics"].get(m)
                row[m] = float(v) if v is not None else math.nan
                row[f"{m}_ci_low"] = row[f"{m}_ci_high"] = math.nan
            rows.append({**row, **{k: math.nan for k in THROUGHPUT_COLUMNS}})
    return rows


def leaderboard(records: list[RunRecord], *, baselines: bool = True) -> pd.DataFrame:
    """The leaderboard of run records, one row per record.

    Args:
        records: the run records (:func:`benchmark.records.load_records`).
        baselines: also give each dataset/split group the reference rows of its blind and
            nearest-neighbour baselines (``kind == "baseline"``). Records of pretrained
            captioners (``reference_model``, ``capbench eval --hf``) are reference rows
            (``kind == "reference"``, decoder ``BLIP (pretrained)``), whatever ``baselines``.

    Returns:
        A DataFrame: identity (run, decoder, encoder, dataset, split fingerprint, seed),
        metrics (raw, pycocoevalcap's scale), CIs, throughput (tokens/s, images/s,
        captions/s) and the image-use figures (``vs_blind_*``, ``shuffle_*``): ``vs_blind_p``
        Holm-adjusted over the dataset/split group's rows that have one (``vs_blind_tests``
        of them; ``vs_blind_better``: higher and adjusted p < 0.05), the raw p-value and
        verdict in ``vs_blind_p_raw`` / ``vs_blind_better_raw``. Tuning trials (validation
        scores, ``tuning.role == "trial"``) are left out; ``df.attrs["tuning_trials"]``
        counts them.
    """
    trials = trial_records(records)
    trial_ids = {id(t) for t in trials}
    records = [r for r in records if id(r) not in trial_ids]
    rows = []
    for r in records:
        row = {
            "dataset": r.dataset.name,
            "split": r.split_fingerprint,
            "run_id": r.run_id,
            "config_id": r.config_id or r.run_id,
            "arch": _tuned_label(r),
            "encoder": r.encoder,
            "weights": "pre" if r.pretrained else "rand",
            "seed": r.seed,
            "beam": r.beam_size,
            "objective": (r.training or {}).get("objective", "xe"),
            "tokenizer": _tokenizer_cell(r),
            "tokenizer_id": _tokenizer_id(r),
            "tuned": ((r.training or {}).get("encoder") or {}).get("trainable", "none"),
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
        if r.reference_model:  # a pretrained captioner (eval --hf): a reference row, never a cell
            row.update(arch=_reference_label(r), objective="-", tokenizer="-", tokenizer_id="-",
                       tuned="-")
        rows.append({**row, "kind": "reference" if r.reference_model else "run",
                     **_image_use_columns(r), **_grounding_columns(r)})
    if baselines:
        rows += _baseline_rows(records)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values(["dataset", "split", "CIDEr"], ascending=[True, True, False],
                            na_position="last", kind="stable").reset_index(drop=True)
        df = _holm_vs_blind(df)
    df.attrs["tuning_trials"] = len(trials)
    return df


def _holm_vs_blind(df: pd.DataFrame) -> pd.DataFrame:
    """``vs_blind_p`` Holm-adjusted within each dataset/split group (one table, one family),
    the raw values kept in ``vs_blind_p_raw`` and ``vs_blind_better_raw``; ``vs_blind_tests``:
    the family's size (rows with a p-value)."""
    df = df.assign(vs_blind_p_raw=df["vs_blind_p"], vs_blind_better_raw=df["vs_blind_better"],
                   vs_blind_tests=0)
    for _, idx in df.groupby(["dataset", "split"], sort=False).groups.items():
        raw = df.loc[idx, "vs_blind_p_raw"].astype(float).to_numpy()
        adjusted, _ = holm(raw)
        delta = df.loc[idx, "vs_blind_delta"].astype(float).to_numpy()
        tested = np.isfinite(raw)
        df.loc[idx, "vs_blind_p"] = adjusted
        df.loc[idx, "vs_blind_tests"] = int(tested.sum())
        # the same rule as the raw verdict (image_use: higher with p < 0.05), on the adjusted p
        significant = (adjusted < SIGNIFICANCE) & (delta > 0)
        better = pd.Series([bool(b) if t else None for b, t in zip(significant, tested, strict=True)],
                           index=idx, dtype=object)
        df["vs_blind_better"] = df["vs_blind_better"].astype(object)
        df.loc[idx, "vs_blind_better"] = better
    return df


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config (runs differing only in seed): mean, ``<metric>_std`` and ``n``."""
    if df.empty:
        return df
    value_cols = METRIC_COLUMNS + list(THROUGHPUT_COLUMNS) + ["decoder_params", "unique_pct"]
    value_cols += [c for c in ("shuffle_drop",) if c in df.columns]
    if "kind" in df.columns:
        g = df.groupby(["kind", *IDENTITY], dropna=False, sort=False)
    else:
        g = df.groupby(IDENTITY, dropna=False, sort=False)
    mean = g[value_cols].mean()
    std = g[METRIC_COLUMNS].std(ddof=1).add_suffix("_std")
    out = mean.join(std)
    out["n"] = g.size()
    out["seeds"] = g["seed"].apply(lambda s: ",".join(str(int(x)) for x in sorted(s.dropna())))
    out["run_id"] = g["run_id"].first()
    out = out.reset_index().sort_values(["dataset", "split", "CIDEr"],
                                        ascending=[True, True, False], kind="stable")
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)  # the count of tuning trials left out
    return out


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


def _display(df: pd.DataFrame, raw_p: bool = False) -> pd.DataFrame:
    """The board's display cells (text); the ``raw p`` column only with ``raw_p``."""
    rows = []
    for _, r in df.iterrows():
        rid = r["run_id"]
        parts = rid.split("-")
        run = f"{parts[0][4:]}-{parts[1]}-{parts[-1]}" if len(parts) > 2 else rid
        row = {"dataset": r["dataset"], "split": r["split"],
               "run": "baseline" if r.get("kind") == "baseline" else run,
               "arch": r["arch"], "encoder": r["encoder"], "weights": r["weights"]}
        if "n" in r:
            row["seeds"] = r["seeds"] or "-"
        else:
            row["seed"] = "-" if pd.isna(r["seed"]) else int(r["seed"])
        row["beam"] = "-" if pd.isna(r["beam"]) else int(r["beam"])
        row["obj"] = r.get("objective", "xe")
        tuned = r.get("tuned", "none")
        row["tuned"] = {"none": "frozen"}.get(tuned, tuned)
        tok = r.get("tokenizer")
        row["tokenizer"] = tok if isinstance(tok, str) else str(r.get("tokenizer_id", "word"))
        for m in METRIC_COLUMNS:
            row[SHORT[m]] = _cell(r, m)
        for key, label in THROUGHPUT_COLUMNS.items():
            row[label] = "-" if pd.isna(r[key]) else f"{r[key]:,.0f}"
        u = r.get("unique_pct", math.nan)
        row["uniq%"] = "-" if pd.isna(u) else f"{u:.0f}" + (" ✗" if u < COLLAPSED_PCT else "")
        p = r["decoder_params"]
        row["params"] = "-" if p is None or pd.isna(p) else f"{p / 1e6:.2f}M"
        pv = r.get("vs_blind_p", math.nan)
        row["vs blind"] = "-" if pd.isna(pv) else \
            ("" if r.get("vs_blind_better") else "✗ ") + f"{pv:.3f}"
        raw = r.get("vs_blind_p_raw", math.nan)
        row["raw p"] = "-" if pd.isna(raw) else \
            ("" if r.get("vs_blind_better_raw") else "✗ ") + f"{raw:.3f}"
        d, lo, hi = (r.get(k, math.nan) for k in ("shuffle_drop", "shuffle_drop_ci_low",
                                                   "shuffle_drop_ci_high"))
        row["shuffle Δ"] = "-" if pd.isna(d) else f"{100 * d:.1f}" + (
            "" if pd.isna(lo) or pd.isna(hi) else f" ±{100 * (hi - lo) / 2:.1f}")
        for label, m in POINTING_COLUMNS.items():
            v = r.get(f"pointing_{m}", math.nan)
            if v is None or pd.isna(v):  # measured without this method (no attention): n/a
                row[label] = "n/a" if r.get("pointing_measured") is True else "-"
            else:
                row[label] = f"{100 * v:.0f}"
        if not raw_p:
            del row["raw p"]
        rows.append(row)
    return pd.DataFrame(rows)


def _holm_notes(df: pd.DataFrame, raw_p: bool = False) -> dict[str, str]:
    """Per table title, what the ``vs blind`` column's adjustment was (none when no row of the
    table has a p-value)."""
    notes = {}
    if "vs_blind_tests" not in df.columns:
        return notes
    for (name, split), g in df.groupby(["dataset", "split"], sort=True):
        n = int(g["vs_blind_tests"].max())
        if n:
            notes[f"{name} (split {split})"] = (
                f"vs blind: Holm-adjusted over {n} test{'s' if n > 1 else ''} (the table's rows "
                "with a blind-baseline test); "
                + ("raw p = before the adjustment" if raw_p else "raw p-values with --raw-p"))
    return notes


def _trials_note(df: pd.DataFrame) -> str:
    """The footer's line on tuning trials left out of the board ("" when none)."""
    n = int(df.attrs.get("tuning_trials", 0) or 0)
    if not n:
        return ""
    return (f"{n} tuning trial{'s' if n > 1 else ''} not shown (scored on the validation split; "
            "their expected-validation-performance curves: capbench report --plot)")


def _groups(df: pd.DataFrame):
    """``(title, display rows)`` per dataset/split; optional columns that no row of the group
    has (records older than the figure) are left out rather than shown as all ``-``."""
    for (name, split), g in df.groupby(["dataset", "split"], sort=True):
        empty = [c for c in OPTIONAL_COLUMNS if c in g.columns and (g[c] == "-").all()]
        if "tuned" in g.columns and g["tuned"].isin(["frozen", "-"]).all():
            empty.append("tuned")  # every encoder frozen: nothing to tell
        if "obj" in g.columns and g["obj"].isin(["xe", "-"]).all():
            empty.append("obj")  # every row trained with cross-entropy only: nothing to tell
        if "tokenizer" in g.columns and g["tokenizer"].map(
                lambda t: t == "-" or str(t).startswith("word")).all():
            empty.append("tokenizer")  # word vocabularies only
        empty += [m for m in WIDE_METRICS if m in g.columns and g[m].isin(["n/a", "-"]).all()]
        yield f"{name} (split {split})", g.drop(columns=["dataset", "split", *empty])


def render_markdown(df: pd.DataFrame, raw_p: bool = False) -> str:
    """Markdown: one table per dataset/split group (with the raw ``vs blind`` p-values beside
    the Holm-adjusted ones when ``raw_p``), each followed by what its ``vs blind`` column was
    adjusted over; the footer counts the tuning trials left out."""
    trials = _trials_note(df)
    if df.empty:
        return "_no runs_\n" + (f"\n{trials}.\n" if trials else "")
    parts, holm_notes = [], _holm_notes(df, raw_p)
    for title, g in _groups(_display(df, raw_p)):
        cols = list(g.columns)
        lines = [f"### {title}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in g.itertuples(False)]
        if title in holm_notes and "vs blind" in cols:
            lines += ["", f"_{holm_notes[title]}._"]
        parts.append("\n".join(lines))
    refs = f" {REFERENCE_LEGEND[0].upper()}{REFERENCE_LEGEND[1:]}." if (
        df.get("kind", pd.Series(dtype=str)) == "reference").any() else ""
    trials = f" {trials[0].upper()}{trials[1:]}." if trials else ""
    return "\n\n".join(parts) + f"\n\n{LEGEND[0].upper()}{LEGEND[1:]}.{refs}{trials}\n"


def resolve_columns(names: list[str]) -> list[str]:
    """Display names for ``names``: display labels (``B@4``, ``CIDEr-D``, ``tok/s``), terminal
    headers (``decoder``) or raw keys (``Bleu_4``, ``CIDEr``, ``train_tokens_per_s``), any case.

    Raises :class:`ColumnError` (a ValueError) naming the valid names for an unknown one."""
    lookup = {}
    for label, key in COLUMN_KEYS.items():
        for name in (label, RICH_HEADERS.get(label, label), key, *_MORE_NAMES.get(label, ())):
            lookup[name.casefold()] = label
    out = []
    for name in names:
        label = lookup.get(name.strip().casefold())
        if label is None:
            labels = ", ".join(RICH_HEADERS.get(c, c) for c in COLUMN_KEYS)
            keys = ", ".join(k for c, k in COLUMN_KEYS.items() if k != RICH_HEADERS.get(c, c))
            raise ColumnError(f"unknown column {name!r}: choose from {labels} (or the "
                              f"leaderboard keys {keys}; any case)")
        if label not in out:
            out.append(label)
    return out


def _text(v) -> str:
    """A display cell as text: ``-`` for a missing value, whole floats without ``.0``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _legend(shown: list[str], aggregated: bool, baselines: bool = False,
            references: bool = False) -> str:
    """The footer's key to the columns in ``shown`` (and only those), and to the baseline
    rows when there are some."""
    spread = "±std over seeds" if aggregated else "±95% bootstrap CI half-width"
    parts = [f"scores x100 (pycocoevalcap) {spread}"]
    keys = ["B@" if c.startswith("B@") else "point " if c.startswith("point ") else c
            for c in shown]
    parts += [text for key, text in _LEGEND_PARTS.items() if key in keys]
    if baselines:
        parts.append("baseline rows: most-freq, consensus = one caption for every image (blind); "
                     "nn = nearest-neighbour captions from that encoder's features")
    if references:
        parts.append(REFERENCE_LEGEND)
    return "; ".join(parts)


def _rich_table(title: str, g: pd.DataFrame, shown: list[str], caption=None):
    """A rich Table of the ``shown`` columns of display rows ``g``.

    No outer edge and no padding at the table's edges (each column costs its width + 3, less
    3 for the table), so the compact view of a realistic board fits 100 columns. Cells fold
    rather than get an ellipsis, so a number is never cut; :func:`_fit_columns` picks the
    columns so that nothing needs to fold."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), caption=caption, caption_justify="left", show_edge=False,
                  pad_edge=False)  # Text: dataset names and run ids are never read as markup
    for c in shown:
        numeric = c in SHORT.values() or c in THROUGHPUT_COLUMNS.values() or \
            c in ("uniq%", "params", "vs blind", "raw p", "shuffle Δ")
        table.add_column(RICH_HEADERS.get(c, c), justify="right" if numeric else "left",
                         overflow="fold")
    for _, row in g.iterrows():
        table.add_row(*(Text(_text(row[c])) for c in shown))
    return table


def _natural_width(table, console) -> int:
    """Columns ``table`` takes unconstrained: every column as wide as its header or longest
    cell, plus rich's padding and rules (measured by rich itself, not estimated)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(1 << 16), table).maximum


def _fit_columns(title: str, g: pd.DataFrame, wanted: list[str], console):
    """Hide columns of ``wanted`` in :data:`DROP_ORDER` until the table fits ``console.width``.

    Returns ``(shown, hidden)``. :data:`ALWAYS_SHOWN` columns are never hidden (if those
    alone do not fit, rich wraps their cells rather than cut them)."""
    shown, hidden = list(wanted), []
    droppable = [c for c in DROP_ORDER if c in shown and c not in ALWAYS_SHOWN]
    while droppable and _natural_width(_rich_table(title, g, shown), console) > console.width:
        col = droppable.pop(0)
        shown.remove(col)
        hidden.append(col)
    return shown, [c for c in wanted if c in hidden]


def render_rich(df: pd.DataFrame, console, columns: list[str] | None = None,
                wide: bool = False, raw_p: bool = False) -> None:
    """Print one rich table per dataset/split group, every number whole.

    By default the compact :data:`COMPACT_COLUMNS`; ``wide=True``: every column; ``columns``:
    these columns (names as :func:`resolve_columns` takes them) in the board's order, with
    the run, decoder, encoder and CIDEr-D (the ranking) always there. An unknown column name
    raises :class:`ColumnError` (a ValueError), even with ``wide``. Columns that do not fit
    ``console.width`` are hidden (:data:`DROP_ORDER`) and named in the table's footer, with
    a key to the columns shown, what the ``vs blind`` column was Holm-adjusted over, and how
    many tuning trials were left out. ``raw_p``: the raw ``vs blind`` p-values beside the
    adjusted ones (``raw p``)."""
    from rich.text import Text

    chosen = resolve_columns(columns) if columns is not None else None
    trials = _trials_note(df)
    if df.empty:
        console.print("no runs found" + (f"; {trials}" if trials else ""))
        return
    holm_notes = _holm_notes(df, raw_p)
    for title, g in _groups(_display(df, raw_p)):
        seed_col = "seeds" if "seeds" in g.columns else "seed"
        if wide:
            wanted = list(g.columns)
        else:
            pick = set(COMPACT_COLUMNS if chosen is None else chosen) | set(ALWAYS_SHOWN)
            if "seed" in pick:
                pick.add(seed_col)
            if raw_p:
                pick.add("raw p")
            wanted = [c for c in g.columns if c in pick]
        shown, hidden = _fit_columns(title, g, wanted, console)
        legend = _legend(shown, aggregated=seed_col == "seeds",
                         baselines=bool((g["run"] == "baseline").any()),
                         references=bool(g["arch"].astype(str).str.endswith(" (pretrained)").any())) + "."
        if title in holm_notes and "vs blind" in shown:
            legend += f" {holm_notes[title]}."
        if not wide and chosen is None:
            legend += " More columns: --wide or --columns (capbench report)."
        caption = Text(legend, style="dim")
        if hidden:
            names = ", ".join(RICH_HEADERS.get(c, c) for c in hidden)
            how = "--columns" if wide else "--wide / --columns"
            caption.append(f"\nhidden for width: {names} — widen the terminal, or use {how}.",
                           style="yellow")
        console.print(_rich_table(title, g, shown, caption))
    if trials:
        console.print(Text(f"{trials}.", style="dim"))


def render(df: pd.DataFrame, fmt: str, raw_p: bool = False) -> str:
    """``markdown``, ``csv`` (raw scores) or ``json`` (raw scores) text; ``raw_p``: markdown
    shows the raw ``vs blind`` p-values beside the Holm-adjusted ones (CSV/JSON always hold
    both, ``vs_blind_p`` and ``vs_blind_p_raw``)."""
    if fmt == "markdown":
        return render_markdown(df, raw_p)
    if fmt == "csv":  # convert_dtypes: integer columns stay integers beside baseline rows' blanks
        return df.convert_dtypes().to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(df.convert_dtypes().to_json(orient="records")), indent=1)
    raise ValueError(f"unknown format {fmt!r}")


def _folders(results_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """One folder or several as a list of paths (each named folder once, in the given order)."""
    if isinstance(results_dir, (str, Path)):
        return [Path(results_dir)]
    return list(dict.fromkeys(Path(d) for d in results_dir))


def _content(record: RunRecord) -> str:
    """The record's stored content, canonical (where it was read from left out)."""
    return json.dumps(record.to_dict(), sort_keys=True, default=str)


def load_records_from(results_dirs: str | Path | Sequence[str | Path]):
    """``(records, problems)`` of every record under ``<folder>/runs`` of one folder or
    several (in the given order; a folder named twice is read once).

    A run id met in two folders counts once when both records hold the same content (a
    folder copied twice, a shared file system); records of one folder are kept as they are.
    Raises RecordError when a folder does not exist, is a file, or is itself a ``runs/``
    folder (naming it and its parent), and when one run id has records of different content
    in two folders (naming both files)."""
    folders = _folders(results_dirs)
    if not folders:
        raise RecordError("no --results-dir given")
    for folder in folders:
        if folder.is_file():
            raise RecordError(f"--results-dir {folder} is a file, not a folder; pass the folder "
                              "that holds runs/ (runs are written to <results-dir>/runs/)")
        if not folder.is_dir():
            raise RecordError(f"--results-dir {folder} does not exist (runs are written to "
                              "<results-dir>/runs/)")
        if folder.name == "runs" and not (folder / "runs").is_dir() and any(folder.glob("*.json")):
            raise RecordError(f"--results-dir {folder} holds the run records themselves; pass "
                              f"its parent folder, --results-dir {folder.parent} (records are "
                              "read from <results-dir>/runs/)")
    records, problems = [], []
    seen: dict[str, tuple[Path, RunRecord]] = {}
    for folder in folders:
        found, trouble = load_records(folder)
        problems += trouble
        for r in found:
            first = seen.get(r.run_id)
            if first is None or first[0] == folder:
                seen.setdefault(r.run_id, (folder, r))
                records.append(r)
            elif _content(first[1]) != _content(r):
                raise RecordError(f"run {r.run_id} has two different records: {first[1].path} and "
                                  f"{r.path}; keep one of them (or pass only one of their folders)")
    return records, problems


def load_board(results_dir: str | Path | Sequence[str | Path], aggregate: bool = False):
    """``(board, per-run board, problems)`` for the records under ``<results_dir>/runs``, or
    under each of several folders merged (:func:`load_records_from`): ``board`` is
    seed-aggregated when ``aggregate``; ``problems`` names each unreadable record and why.
    Raises RecordError when a folder does not exist or two folders disagree on a run."""
    records, problems = load_records_from(results_dir)
    runs = leaderboard(records)
    return (aggregate_seeds(runs) if aggregate else runs), runs, problems


def write_leaderboard_file(df: pd.DataFrame, results_dir: str | Path,
                           sources: Sequence[str | Path] | None = None, extra: str = "",
                           raw_p: bool = False) -> Path:
    """Write ``<results_dir>/LEADERBOARD.md``: the markdown board of every run there, or of
    the runs of the folders ``sources`` when the board merges several, then ``extra``
    markdown (the expected-validation-performance section when there are tuning trials)."""
    path = Path(results_dir) / "LEADERBOARD.md"
    folders = _folders(sources) if sources else [Path(results_dir)]
    where = ", ".join(f"`{folder}/runs`" for folder in folders)
    return atomic_write_text(path, "# capbench leaderboard\n\nMade by `capbench report` from the "
                             f"run records in {where}.\n\n" + render(df, "markdown", raw_p)
                             + (f"\n{extra}" if extra else ""))


@dataclass(frozen=True)
class ReportOptions:
    """What ``capbench report`` is asked for: the folders whose records form the board (the
    first gets ``LEADERBOARD.md``), ``format`` (table, markdown, csv, json), ``output`` (a
    file instead of the terminal), seed ``aggregate``-ion, ``plot`` and ``gallery`` folders
    (None: none written), ``columns`` (names as typed, None: the default ones),
    ``gallery_images`` (the N worst per group), ``gallery_strips`` (attention strips) and
    ``raw_p`` (the raw ``vs blind`` p-values beside the Holm-adjusted ones)."""

    results_dirs: Sequence[Path]
    format: str = "table"
    output: Path | None = None
    aggregate: bool = False
    plot: Path | None = None
    leaderboard_file: bool = True
    columns: list[str] | None = None
    gallery: Path | None = None
    gallery_images: int | None = None
    gallery_strips: bool = True
    raw_p: bool = False


@dataclass(frozen=True)
class ReportOutcome:
    """What ``capbench report`` shows: the ``board``; ``text`` when it is not a terminal table
    (the rendered board, already written to ``output`` when one was given)."""

    board: pd.DataFrame
    text: str | None = None
    output: Path | None = None


Note = Callable[..., None]
"""``note(kind, **fields)``: a step's message for the caller to show. Kinds: ``skipped``
(problem), ``wrote`` (path), ``crossings`` (rows of :func:`benchmark.evp.crossings`,
n_curves), ``leaderboard_unwritten`` (path, why), ``gallery`` (pages,
index), ``strips`` (count, seconds), ``no_strips`` (run_id, why), ``no_gallery`` (where),
``no_runs`` (readable, where)."""


def make_report(options: ReportOptions, note: Note) -> ReportOutcome:
    """``capbench report``: load the board of ``options.results_dirs`` (a folder named twice
    counts once), then write the plots, ``<first folder>/LEADERBOARD.md``, the gallery and the
    ``output`` file that ``options`` ask for, telling ``note`` (see :data:`Note`) what was
    skipped and written. Returns the board and, unless it is shown as a terminal table, its
    rendered text. Raises ConfigError for an ``output`` that is a run record or dataset file or
    an unknown column (before anything is written), RecordError as :func:`load_records_from`,
    and StorageError when the plots or the output file cannot be written (a failing
    ``LEADERBOARD.md`` is only noted)."""
    folders = list(dict.fromkeys(options.results_dirs or [Path("results")]))
    home = folders[0]  # LEADERBOARD.md goes here (checkpoints are found beside each record)
    if options.output is not None:
        refuse_overwrite(options.output, "--output")  # a run record or dataset file is never replaced
    if options.columns is not None:
        resolve_columns(options.columns)  # an unknown name fails before plots/LEADERBOARD.md are written
    df, runs, problems = load_board(folders, options.aggregate)
    for p in problems:
        note("skipped", problem=p)
    if options.plot is not None and not runs.empty:
        _write_plots(runs, folders, options.plot, note)
    evp_text = _evp(folders, options.plot, note) if runs.attrs.get("tuning_trials") else ""
    if options.leaderboard_file and (not df.empty or evp_text):
        try:
            write_leaderboard_file(df, home, folders, evp_text, options.raw_p)
        except OSError as exc:
            note("leaderboard_unwritten", path=home / "LEADERBOARD.md", why=exc.strerror or exc)
    if options.gallery is not None:
        _write_gallery(folders, options, note)
    if df.empty and not runs.attrs.get("tuning_trials"):
        note("no_runs", readable=bool(problems), where=", ".join(str(f / "runs") for f in folders))
    if options.format == "table" and options.output is None:
        return ReportOutcome(df)
    text = render(df, "markdown" if options.format == "table" else options.format, options.raw_p)
    if options.output:
        try:
            atomic_write_text(options.output, text)
        except OSError as exc:
            raise StorageError(f"cannot write --output {options.output}: {exc.strerror or exc}") from exc
    return ReportOutcome(df, text, options.output)


def _write_plots(runs: pd.DataFrame, folders: list[Path], plot: Path, note: Note) -> None:
    """The board's plots and the trained runs' curves into ``plot``; StorageError if unwritable."""
    from benchmark.plots import write_plots, write_training_curves  # lazy: matplotlib is heavy

    try:
        trained = [r for r in load_records_from(folders)[0] if r.evaluation is None]  # not eval --run copies
        for p in [*write_plots(runs, plot), *write_training_curves(trained, plot)]:
            note("wrote", path=p)
    except OSError as exc:
        raise StorageError(f"cannot write the plots to --plot {plot}: {exc.strerror or exc}") from exc


def _evp(folders: list[Path], plot: Path | None, note: Note) -> str:
    """The tuning trials' expected-validation-performance curves (:mod:`benchmark.evp`): their
    crossing table told to ``note``, and with ``plot`` the EVP plot and the table's markdown
    (``evp-crossings.md``) written there. Returns the markdown section for LEADERBOARD.md."""
    from benchmark.plots import write_evp_plots  # lazy: matplotlib is heavy

    curves = evp_curves(load_records_from(folders)[0])
    if not curves:
        return ""
    rows = crossings(curves)
    text = crossings_markdown(curves, rows)
    note("crossings", rows=rows, n_curves=len(curves))
    if plot is not None:
        try:
            for p in write_evp_plots(curves, plot):
                note("wrote", path=p)
            note("wrote", path=atomic_write_text(plot / "evp-crossings.md", text))
        except OSError as exc:
            raise StorageError(f"cannot write the plots to --plot {plot}: {exc.strerror or exc}") from exc
    return text


def _write_gallery(folders: list[Path], options: ReportOptions, note: Note) -> None:
    """The HTML gallery of the folders' records into ``options.gallery``."""
    records, _ = load_records_from(folders)  # problems were already noted
    if not records:
        note("no_gallery", where=", ".join(str(f / "runs") for f in folders))
        return
    strips = AttentionStrips(folders[0]) if options.gallery_strips else None
    pages = write_gallery(records, options.gallery, max_images=options.gallery_images,
                          strip_maker=strips)
    note("gallery", pages=len(pages) - 1, index=options.gallery / "index.html")
    if strips is not None:
        note("strips", count=strips.count, seconds=strips.seconds)
        for run_id, why in strips.problems.items():
            note("no_strips", run_id=run_id, why=why)
