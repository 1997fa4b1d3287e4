"""Expected validation performance: the expected best validation score after k trials.

Dodge et al. (EMNLP 2019, "Show Your Work: Improved Reporting of Experimental Results")
report, for a random hyperparameter search of N trials, the expected maximum validation score
when only k = 1..N of them had been run: rankings of architectures flip with the tuning
budget, and this curve shows where. Tang et al. (2020, "Showing Your Work Doesn't Always
Work") show that Dodge et al.'s estimator, which draws the k trials *with* replacement from
the N observed, is biased (it underestimates, most at k = N, where it is below the observed
maximum), and give the unbiased one, the mean of the maximum over every size-k subset of
the N trials drawn *without* replacement. That one is the default here.

* :func:`expected_max`: the curve and its variance for one set of trial scores, either
  estimator (``"unbiased"`` or ``"dodge"``).
* :func:`evp_curves`: one curve per architecture (decoder, encoder and study) from the trial
  records of ``capbench tune`` (records with ``tuning.role == "trial"``; their ``tuning.value``
  is the trial's validation CIDEr-D).
* :func:`crossings`: the budgets k at which two architectures' curves change order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ESTIMATORS", "expected_max", "EVPCurve", "trial_records", "evp_curves", "crossings",
           "crossings_markdown"]

#: the estimators :func:`expected_max` knows (the first is the default)
ESTIMATORS = ("unbiased", "dodge")


def _weights(n: int, k: int, estimator: str) -> np.ndarray:
    """P(the maximum of k draws is the i-th smallest of n), i = 1..n, shape ``(n,)``, in
    float64 (binomials from a table of log-factorials, so N in the thousands costs
    milliseconds)."""
    i = np.arange(1, n + 1, dtype=np.float64)
    if estimator == "unbiased":  # without replacement: C(i-1, k-1) / C(n, k), 0 for i < k
        logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])  # log m!
        m = np.arange(k, n + 1)  # i = m: C(m-1, k-1) = (m-1)! / ((k-1)! (m-k)!)
        log_num = logfact[m - 1] - logfact[k - 1] - logfact[m - k]
        log_den = logfact[n] - logfact[k] - logfact[n - k]
        w = np.zeros(n)
        w[k - 1:] = np.exp(log_num - log_den)
        return w
    if estimator == "dodge":  # with replacement: (i/n)^k - ((i-1)/n)^k
        return (i / n) ** k - ((i - 1) / n) ** k
    raise ValueError(f"unknown estimator {estimator!r}: choose from {', '.join(ESTIMATORS)}")


def expected_max(values: Iterable[float], estimator: str = "unbiased") -> tuple[np.ndarray, np.ndarray]:
    """The expected maximum of k trials' scores, and its variance, for k = 1..N.

    ``values``: the N observed trial scores (any order, ties allowed; any unit, e.g. CIDEr-D).
    With v_(1) <= ... <= v_(N) sorted and w_i(k) the probability that the best of k trials is
    v_(i), the curve is E_k = sum_i v_(i) w_i(k) and its variance sum_i v_(i)^2 w_i(k) - E_k^2
    (the variance of the best score among k trials, the band Dodge et al. draw as ±1 sd):

    * ``"unbiased"`` (default): w_i(k) = C(i-1, k-1) / C(N, k), the k trials a random subset of
      the N without replacement, so E_k is the mean of the maximum over all C(N, k) subsets:
      an unbiased estimate of the expected best of k fresh trials (Tang et al. 2020, "Showing
      Your Work Doesn't Always Work", their unbiased estimator). E_N is the observed maximum and its
      variance 0.
    * ``"dodge"``: w_i(k) = (i/N)^k - ((i-1)/N)^k, the k trials drawn with replacement from the
      empirical distribution (Dodge et al. 2019, "Show Your Work", their expected maximum); biased
      low for k > 1 (Tang et al. 2020).

    Returns ``(mean, variance)``, two float arrays of shape ``(N,)``, entry k-1 for budget k.
    The weights are float64 (relative error about 1e-13 against the exact fractions).
    Raises ValueError for no values, a NaN or infinite value, or an unknown estimator.
    """
    v = np.sort(np.asarray(list(values), dtype=np.float64))
    if v.size == 0:
        raise ValueError("no trial scores: the expected maximum needs at least one")
    if not np.all(np.isfinite(v)):
        raise ValueError("trial scores must be finite numbers (a NaN or infinite score was given)")
    n = v.size
    mean, var = np.empty(n), np.empty(n)
    for k in range(1, n + 1):
        w = _weights(n, k, estimator)
        mean[k - 1] = float(w @ v)
        var[k - 1] = max(0.0, float(w @ (v - mean[k - 1]) ** 2))  # = sum w v^2 - E^2, stabler
    return mean, var


@dataclass(frozen=True)
class EVPCurve:
    """One architecture's expected-validation-performance curve (one study = one cell).

    ``values``: its trial scores (validation CIDEr-D, pycocoevalcap's scale) in trial order;
    ``mean``/``sd``: expected best score after k = 1..N trials and its standard deviation
    (:func:`expected_max` with ``estimator``)."""

    dataset: str
    split: str
    arch: str
    encoder: str
    study: str
    values: tuple[float, ...]
    mean: tuple[float, ...]
    sd: tuple[float, ...]
    estimator: str = "unbiased"

    @property
    def label(self) -> str:
        """``decoder / encoder``, the architecture's name in plots and tables."""
        return f"{self.arch} / {self.encoder}"

    @property
    def n(self) -> int:
        """N, the number of trials."""
        return len(self.values)


def _tuning(record) -> dict:
    """The record's ``tuning`` block (``capbench tune``), or {} for other records."""
    t = getattr(record, "tuning", None)
    return t if isinstance(t, dict) else {}


def trial_records(records: Iterable) -> list:
    """The records that are tuning trials (``tuning.role == "trial"``), scored on validation."""
    return [r for r in records if _tuning(r).get("role") == "trial"]


def _trial_value(record) -> float | None:
    """A trial's validation CIDEr-D: ``tuning.value``, else its ``metrics["CIDEr"]``; None
    when it has neither (a failed trial)."""
    v = _tuning(record).get("value")
    if v is None:
        v = (record.metrics or {}).get("CIDEr")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def evp_curves(records: Iterable, estimator: str = "unbiased") -> list[EVPCurve]:
    """One :class:`EVPCurve` per (dataset, split, decoder, encoder, study) of the trial
    records among ``records`` (others are ignored), sorted by dataset, split and label.

    Each trial's score is its ``tuning.value`` (validation CIDEr-D; ``metrics["CIDEr"]`` when
    absent); a trial without a score (failed) is left out, and so is a record met twice (same
    study and trial number). Raises ValueError for an unknown estimator."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: choose from {', '.join(ESTIMATORS)}")
    groups: dict[tuple, dict] = {}
    for r in trial_records(records):
        t, v = _tuning(r), _trial_value(r)
        if v is None:
            continue
        key = (r.dataset.name, r.split_fingerprint, r.arch, r.encoder, str(t.get("study", "")))
        trials = groups.setdefault(key, {})
        trials.setdefault(t.get("trial", r.run_id), v)
    curves = []
    for key in sorted(groups):
        trials = groups[key]
        # trial numbers in order (a record without one, by run id, after them)
        order = sorted(trials, key=lambda t: (not isinstance(t, int), t if isinstance(t, int) else 0, str(t)))
        values = [trials[t] for t in order]
        mean, var = expected_max(values, estimator)
        curves.append(EVPCurve(*key, values=tuple(values), mean=tuple(mean.tolist()),
                               sd=tuple(np.sqrt(var).tolist()), estimator=estimator))
    return curves


def crossings(curves: Sequence[EVPCurve]) -> list[dict]:
    """The budgets at which two curves of the same dataset/split change order.

    For every pair of curves, over k = 1..min(N_a, N_b): a row each time the one with the
    higher expected maximum changes, ``{"dataset", "split", "k", "above", "below",
    "above_value", "below_value"}`` (labels and expected maxima at k; ``above`` is the one
    ahead from budget k on). Equal values at some k keep the earlier order (a tie is not a
    crossing until the other curve is strictly ahead). Rows sorted by dataset, split, k."""
    rows = []
    for i, a in enumerate(curves):
        for b in curves[i + 1:]:
            if (a.dataset, a.split) != (b.dataset, b.split):
                continue
            sign = 0
            for k in range(1, min(a.n, b.n) + 1):
                d = a.mean[k - 1] - b.mean[k - 1]
                s = (d > 0) - (d < 0)
                if s and sign and s != sign:
                    hi, lo = (a, b) if s > 0 else (b, a)
                    rows.append({"dataset": a.dataset, "split": a.split, "k": k,
                                 "above": hi.label, "below": lo.label,
                                 "above_value": hi.mean[k - 1], "below_value": lo.mean[k - 1]})
                sign = s or sign
    return sorted(rows, key=lambda r: (r["dataset"], r["split"], r["k"], r["above"]))


def crossings_markdown(curves: Sequence[EVPCurve], rows: Sequence[dict]) -> str:
    """Markdown: each architecture's trials and expected best validation CIDEr-D (x100) at
    k = 1 and k = N, then the crossing table of :func:`crossings` (or a line saying the
    ranking never changes with the budget)."""
    if not curves:
        return ""
    est = {"unbiased": "unbiased estimator (Tang et al. 2020)",
           "dodge": "Dodge et al. 2019's estimator"}[curves[0].estimator]
    lines = ["### Expected validation performance", "",
             f"Expected best validation CIDEr-D (x100, ±1 sd) after k random-search trials, {est}.",
             "", "| dataset (split) | architecture | study | N | k = 1 | k = N |",
             "|---|---|---|---|---|---|"]
    for c in curves:
        lines.append(f"| {c.dataset} ({c.split}) | {c.label} | {c.study} | {c.n} | "
                     f"{100 * c.mean[0]:.1f} ±{100 * c.sd[0]:.1f} | {100 * c.mean[-1]:.1f} |")
    lines += ["", "Budgets at which the ranking changes (from budget k on, *above* is ahead):", ""]
    if not rows:
        lines.append("_no crossings: no two curves change order at any budget k_")
    else:
        lines += ["| dataset (split) | k | above | below | above (x100) | below (x100) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} ({r['split']}) | {r['k']} | {r['above']} | {r['below']} | "
                  f"{100 * r['above_value']:.1f} | {100 * r['below_value']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"
