"""Leaderboard plots (matplotlib, PNG): quality vs throughput with its Pareto front, and
per-metric bars per encoder and decoder. One figure set per dataset + split fingerprint.
Also the tuning trials' expected-validation-performance curves (:func:`write_evp_plots`)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

__all__ = ["pareto_front", "plot_quality_vs_throughput", "quality_vs_throughput_figure",
           "plot_metric_bars", "write_plots", "PlainLogFormatter", "evp_figure", "write_evp_plots"]

BAR_METRICS = [("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"),
               ("CIDEr", "CIDEr-D")]


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points not dominated in (higher x, higher y), sorted by x."""
    idx = []
    for i in range(len(x)):
        dominated = np.any((x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i])))
        if not dominated:
            idx.append(i)
    return np.array(sorted(idx, key=lambda i: x[i]), dtype=int)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def plain_number(x: float) -> str:
    """A tick value as people write it: ``4``, ``20``, ``1,000``, ``0.5``."""
    return f"{x:,.0f}" if abs(x) >= 1 else f"{x:g}"


class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (``4``, ``6``, ``10``, ``1,000``) rather than
    matplotlib's ``4x10^0``; which ticks get a label is matplotlib's choice, as before
    (every decade, and 2, 4, 6 within a decade or so)."""

    def __call__(self, x, pos=None):
        """The label of the tick at ``x`` (empty for an unlabelled minor tick)."""
        return plain_number(x) if super().__call__(x, pos) else ""


def _use_plain_log_labels(axis) -> None:
    """Plain-number labels on the major and minor ticks of a log-scale ``axis``."""
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _split_baselines(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(run rows, reference rows)`` of a leaderboard DataFrame: the baselines and the
    pretrained captioners (``kind`` ``baseline`` / ``reference``) are reference rows."""
    if "kind" not in df.columns:
        return df, df.iloc[0:0]
    refs = df["kind"].isin(["baseline", "reference"])
    return df[~refs], df[refs]


def quality_vs_throughput_figure(df: pd.DataFrame, title: str,
                                 speed: str = "inference_images_per_s"):
    """The figure of :func:`plot_quality_vs_throughput` (the caller closes it). Baseline rows
    (``kind == "baseline"``) have no throughput: they are drawn as horizontal lines, and so
    are pretrained captioners (``kind == "reference"``, labelled with their model id), which
    were not trained under the board's budget."""
    runs, refs = _split_baselines(df)
    d = runs.dropna(subset=["CIDEr", speed])
    fig, ax = plt.subplots(figsize=(9, 5))
    styles = {"most-freq": ":", "consensus": "-.", "nn": "--"}
    for _, r in refs.dropna(subset=["CIDEr"]).iterrows():
        if r.get("kind") == "reference":  # a pretrained captioner (capbench eval --hf)
            ax.axhline(100 * r["CIDEr"], color="tab:green", linestyle="-", linewidth=1, zorder=1,
                       label=f"{r['arch']} {r['encoder']}: {100 * r['CIDEr']:.1f}")
            continue
        name = f"blind: {r['arch']}" if r["arch"] != "nn" else f"nn ({r['encoder']})"
        ax.axhline(100 * r["CIDEr"], color="dimgrey" if r["arch"] != "nn" else "tab:red",
                   linestyle=styles.get(r["arch"], ":"), linewidth=1, zorder=1,
                   label=f"{name}: {100 * r['CIDEr']:.1f}")
    encoders = sorted(d["encoder"].unique())
    archs = sorted(d["arch"].unique())
    markers = dict(zip(archs, "osD^vP*X", strict=False))
    colours = dict(zip(encoders, plt.cm.tab10.colors, strict=False))
    for _, r in d.iterrows():
        ax.scatter(r[speed], 100 * r["CIDEr"], marker=markers[r["arch"]],
                   color=colours[r["encoder"]], s=60, edgecolor="black", linewidth=0.5, zorder=3)
    if len(d):
        x, y = d[speed].to_numpy(), 100 * d["CIDEr"].to_numpy()
        front = pareto_front(x, y)
        ax.plot(x[front], y[front], "--", color="grey", zorder=2, label="Pareto front")
    for a in archs:
        ax.scatter([], [], marker=markers[a], color="white", edgecolor="black", label=a)
    for e in encoders:
        ax.scatter([], [], marker="s", color=colours[e], label=e)
    ax.set_xscale("log")
    _use_plain_log_labels(ax.xaxis)
    label = {"inference_images_per_s": "inference images/s (from pixels, log scale)",
             "train_tokens_per_s": "training tokens/s (log scale)"}.get(speed, speed)
    ax.set_xlabel(label)
    ax.set_ylabel("CIDEr-D (x100)")
    ax.set_title(f"Quality vs throughput: {title}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def plot_quality_vs_throughput(df: pd.DataFrame, title: str, path: Path,
                               speed: str = "inference_images_per_s") -> Path:
    """CIDEr-D (x100) vs a throughput column (log scale, plain-number ticks), one marker per
    run, Pareto front; written to ``path`` (PNG)."""
    fig = quality_vs_throughput_figure(df, title, speed)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_metric_bars(df: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per metric: bars per decoder, one colour per encoder (best run per pair)."""
    df, _ = _split_baselines(df)
    best = df.sort_values("CIDEr", ascending=False).drop_duplicates(["arch", "encoder"])
    archs, encoders = sorted(best["arch"].unique()), sorted(best["encoder"].unique())
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(4 * len(BAR_METRICS), 4), sharey=False)
    width = 0.8 / max(1, len(encoders))
    for ax, (col, name) in zip(axes, BAR_METRICS, strict=True):
        for j, enc in enumerate(encoders):
            vals = []
            for a in archs:
                row = best[(best["arch"] == a) & (best["encoder"] == enc)]
                vals.append(100 * row[col].iloc[0] if len(row) else np.nan)
            ax.bar(np.arange(len(archs)) + j * width, vals, width, label=enc)
        ax.set_xticks(np.arange(len(archs)) + width * (len(encoders) - 1) / 2)
        ax.set_xticklabels(archs, rotation=20)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("score (x100)")
    if encoders:  # a group of reference rows only has no bars
        axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(df: pd.DataFrame, folder: str | Path) -> list[Path]:
    """Both plots for every dataset/split group of a leaderboard DataFrame; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for (name, split), g in df.groupby(["dataset", "split"], sort=True):
        title = f"{name} (split {split})"
        stem = _slug(f"{name}-{split}")
        out.append(plot_quality_vs_throughput(g, title, folder / f"{stem}-quality-vs-throughput.png"))
        out.append(plot_metric_bars(g, title, folder / f"{stem}-metrics.png"))
    return out


def training_curves_figure(records, title: str):
    """A figure of training loss and validation CIDEr-D (x100) per epoch, one line per run
    (labelled ``decoder / encoder``), from the records' ``training.history``; SCST epochs are
    marked with squares. None when no record has a history."""
    runs = [r for r in records if (r.training or {}).get("history")]
    if not runs:
        return None
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in sorted(runs, key=lambda r: (r.arch, r.encoder, r.run_id)):
        hist = r.training["history"]
        obj = (r.training or {}).get("objective", "xe")
        label = f"{r.arch} / {r.encoder}" + ("" if obj == "xe" else f" ({obj})")
        xe = [h for h in hist if h.get("phase", "xe") == "xe"]
        line, = ax_loss.plot([h["epoch"] for h in xe], [h["loss"] for h in xe], marker="o",
                             ms=3, label=label)
        val = [h for h in hist if "val_CIDEr" in h]
        ax_val.plot([h["epoch"] for h in val], [100 * h["val_CIDEr"] for h in val], marker="o",
                    ms=3, color=line.get_color(), label=label)
        scst = [h for h in val if h.get("phase") == "scst"]
        if scst:
            ax_val.plot([h["epoch"] for h in scst], [100 * h["val_CIDEr"] for h in scst], "s",
                        ms=5, color=line.get_color())
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="loss")
    ax_val.set(xlabel="epoch", ylabel="validation CIDEr-D (greedy, x100)",
               title="validation CIDEr-D (squares: SCST epochs)")
    ax_val.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(records, title: str, path: Path) -> Path | None:
    """:func:`training_curves_figure` saved as a PNG at ``path`` (None: no history)."""
    fig = training_curves_figure(records, title)
    if fig is None:
        return None
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_training_curves(records, folder: str | Path) -> list[Path]:
    """One training-curve PNG per dataset/split group of run records; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict = {}
    for r in records:
        groups.setdefault((r.dataset.name, r.split_fingerprint), []).append(r)
    out = []
    for (name, split), runs in sorted(groups.items()):
        p = plot_training_curves(runs, f"{name} (split {split})",
                                 folder / f"{_slug(f'{name}-{split}')}-training.png")
        if p is not None:
            out.append(p)
    return out


def evp_figure(curves, title: str):
    """The expected-validation-performance figure of :class:`benchmark.evp.EVPCurve` s: the
    expected best validation CIDEr-D (x100) after k = 1..N trials, one line per architecture
    (``decoder / encoder``, its study named when a cell has several), with a ±1 sd band
    (Dodge et al. 2019, "Show Your Work"). The caller closes it."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    labels = [c.label for c in curves]
    for c in curves:
        k = np.arange(1, c.n + 1)
        mean, sd = 100 * np.asarray(c.mean), 100 * np.asarray(c.sd)
        label = c.label + (f" ({c.study})" if labels.count(c.label) > 1 else "") + f", N={c.n}"
        line, = ax.plot(k, mean, marker="o", ms=3, label=label)
        ax.fill_between(k, mean - sd, mean + sd, color=line.get_color(), alpha=0.15, linewidth=0)
    est = {"unbiased": "unbiased estimator, Tang et al. 2020",
           "dodge": "Dodge et al. 2019's estimator"}.get(curves[0].estimator if curves else "", "")
    ax.set(xlabel="trials k (hyperparameter assignments tried)",
           ylabel="expected best validation CIDEr-D (x100)",
           title=f"Expected validation performance ({est}; band ±1 sd)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_evp_plots(curves, folder: str | Path) -> list[Path]:
    """One ``<dataset>-<split>-evp.png`` (:func:`evp_figure`) per dataset/split group of the
    curves into ``folder``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict = {}
    for c in curves:
        groups.setdefault((c.dataset, c.split), []).append(c)
    out = []
    for (name, split), group in sorted(groups.items()):
        fig = evp_figure(group, f"{name} (split {split})")
        path = folder / f"{_slug(f'{name}-{split}')}-evp.png"
        try:
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        out.append(path)
    return out
