"""Caption metrics through pycocoevalcap, exactly as the COCO caption toolkit computes them.

:func:`score_captions` reproduces ``pycocoevalcap.eval.COCOEvalCap``: both sides pass through
the Stanford PTB tokenizer (lower-cased, punctuation removed), then BLEU-1..4 (corpus,
``closest`` reference length), METEOR 1.5, ROUGE-L, CIDEr-D and SPICE score them. Keys follow
pycocoevalcap: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``.

Two deviations, neither changing a number:

* the Java tools run in a temporary working folder, not inside pycocoevalcap's install
  folder, so scoring works from a read-only install;
* SPICE runs with the ``--add-opens`` flags Java 16+ needs, a per-run cache folder and a
  memory cap, when the Stanford CoreNLP 3.6.0 jars are found (``spice/lib`` or
  ``$CAPBENCH_CORENLP``). Otherwise SPICE is reported unavailable with the reason.

Without Java, the tokenizer falls back to a Python approximation of PTB tokenization (the
result says so under ``tokenizer``) and METEOR/SPICE are reported unavailable.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

ALL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
#: metrics scored per image (BLEU is corpus-level: its per-image n-gram counts are kept instead)
PER_IMAGE_METRICS = tuple(m for m in ALL_METRICS if not m.startswith("Bleu_"))
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

__all__ = ["ScoreResult", "score_captions", "ptb_tokenize", "java_version", "metric_status",
           "ALL_METRICS", "PER_IMAGE_METRICS"]


def _pkg_dir() -> Path:
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0])  # a namespace package: no __file__


@lru_cache(maxsize=1)
def java_version() -> str | None:
    """The ``java -version`` line, or None when no Java runtime is on PATH."""
    if not shutil.which("java"):
        return None
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = (out.stderr or out.stdout).strip().splitlines()
    return line[0] if line and out.returncode == 0 else None


def _java_major() -> int:
    m = re.search(r'"(\d+)(?:\.(\d+))?', java_version() or "")
    if not m:
        return 0
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def corenlp_dir() -> Path | None:
    """Folder holding the CoreNLP 3.6.0 jars SPICE needs, or None when they are absent."""
    for d in (os.environ.get("CAPBENCH_CORENLP"), _pkg_dir() / "spice" / "lib"):
        if d and all((Path(d) / j).is_file() for j in CORENLP_JARS):
            return Path(d)
    return None


def metric_status() -> dict[str, str | None]:
    """Per metric: None when it can run here, else the reason it cannot and the fix."""
    status: dict[str, str | None] = {m: None for m in ALL_METRICS}
    if java_version() is None:
        reason = "no Java runtime on PATH: install a JDK/JRE (e.g. apt-get install default-jre)"
        status["METEOR"] = reason
        status["SPICE"] = reason
    elif corenlp_dir() is None:
        status["SPICE"] = (
            "Stanford CoreNLP 3.6.0 jars not found (" + ", ".join(CORENLP_JARS) + "): put them in "
            f"{_pkg_dir() / 'spice' / 'lib'} or in a folder named by $CAPBENCH_CORENLP "
            "(from stanford-corenlp-full-2015-12-09.zip)"
        )
    return status


# ------------------------------------------------------------------------------ tokenizer
_PY_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?|n't|[^\sA-Za-z0-9]")


def _python_ptb(text: str) -> list[str]:
    return _PY_TOKEN.findall(text.lower())


def ptb_tokenize(captions: dict, *, use_java: bool | None = None) -> dict:
    """PTB-tokenize ``{image_id: [caption, ...]}`` and drop punctuation, as COCOEvalCap does.

    Runs Stanford's ``PTBTokenizer -preserveLines -lowerCase`` (the jar shipped in
    pycocoevalcap) in a temporary folder. ``use_java=False`` (or no Java) uses a Python
    approximation instead. Returns ``{image_id: [tokenized caption, ...]}`` in input order.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    ids = [k for k, v in captions.items() for _ in v]
    sentences = [c.replace("\n", " ") for v in captions.values() for c in v]
    if use_java is None:
        use_java = java_version() is not None
    if use_java:
        jar = _pkg_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
        with tempfile.TemporaryDirectory(prefix="capbench-ptb-") as tmp:
            src = Path(tmp) / "sentences.txt"
            src.write_bytes("\n".join(sentences).encode())
            cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                   "-preserveLines", "-lowerCase", src.name]
            out = subprocess.run(cmd, cwd=tmp, capture_output=True, check=True).stdout.decode()
        lines = out.split("\n")
        token_lists = [line.rstrip().split(" ") for line in lines[: len(sentences)]]
    else:
        token_lists = [_python_ptb(s) for s in sentences]
    result: dict = {k: [] for k in captions}
    for k, tokens in zip(ids, token_lists, strict=False):
        result[k].append(" ".join(w for w in tokens if w not in PUNCTUATIONS))
    return result


# ---------------------------------------------------------------------------------- SPICE
def _run_spice(gts: dict, res: dict, memory: str = "4G") -> tuple[float, list[float]]:
    """SPICE F-score (corpus mean and per image) with the jar of pycocoevalcap."""
    spice_dir = _pkg_dir() / "spice"
    lib = corenlp_dir()
    flags = []
    if _java_major() >= 16:  # SPICE's cache serialiser (fst) reflects into java.base
        flags = [f"--add-opens=java.base/{p}=ALL-UNNAMED"
                 for p in ("java.lang", "java.util", "java.math", "java.net", "java.text",
                           "java.util.concurrent", "java.io", "java.nio", "sun.nio.ch")]
    classpath = os.pathsep.join([str(spice_dir / "spice-1.0.jar"), str(lib / "*"),
                                 str(spice_dir / "lib" / "*")])
    with tempfile.TemporaryDirectory(prefix="capbench-spice-") as tmp:
        data = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in res]
        (Path(tmp) / "in.json").write_text(json.dumps(data))
        cmd = ["java", f"-Xmx{memory}", *flags, "-cp", classpath, "edu.anu.spice.SpiceScorer",
               "in.json", "-cache", "cache", "-out", "out.json", "-subset", "-silent"]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        results = json.loads((Path(tmp) / "out.json").read_text())
    by_id = {str(r["image_id"]): r["scores"]["All"]["f"] for r in results}
    per_image = [float("nan") if by_id[str(i)] == "NaN" else float(by_id[str(i)]) for i in res]
    return float(np.mean(per_image)), per_image


# -------------------------------------------------------------------------------- scoring
@dataclass
class ScoreResult:
    """Corpus scores, per-image scores and what could not be computed.

    ``metrics``: name -> score in [0, 1] (CIDEr in [0, 10]), None when unavailable.
    ``per_image``: name -> list aligned with ``image_ids`` (METEOR, ROUGE_L, CIDEr, SPICE).
    ``bleu_stats``: per image ``[hyp_len, closest_ref_len, correct_1..4, total_1..4]``, enough
    to recompute corpus BLEU on any subset (bootstrap). ``unavailable``: name -> reason.
    """

    image_ids: list
    metrics: dict[str, float | None]
    per_image: dict[str, list[float]] = field(default_factory=dict)
    bleu_stats: list[list[int]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb-java"

    def per_image_block(self) -> dict:
        """The run record's ``per_image`` block: ``image_ids``, per-image scores and
        ``bleu_stats`` (what :func:`benchmark.stats.bootstrap_ci` resamples)."""
        return {"image_ids": self.image_ids, **self.per_image, "bleu_stats": self.bleu_stats}


def _bleu_stats(bleu_scorer) -> list[list[int]]:
    """Per image ``[hyp_len, closest ref_len, correct_1..4, guess_1..4]`` (BLEU's 'closest')."""
    out = []
    for comps in bleu_scorer.ctest:
        test = comps["testlen"]
        ref = min((abs(r - test), r) for r in comps["reflen"])[1]
        out.append([test, ref, *comps["correct"], *comps["guess"]])
    return out


def score_captions(predictions: dict, references: dict, *, metrics=ALL_METRICS,
                   per_image: bool = True) -> ScoreResult:
    """Score ``{image_id: caption}`` against ``{image_id: [reference, ...]}``.

    Every prediction id must have references (ValueError otherwise). Scores equal
    ``COCOEvalCap.evaluate()`` on the same captions. Unavailable metrics (no Java, no CoreNLP
    jars) are None in ``metrics`` with the reason in ``unavailable``; nothing is invented.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [i for i in predictions if i not in references]
    if missing:
        raise ValueError(f"{len(missing)} predicted image ids have no references, e.g. {missing[:3]}")
    ids = list(predictions)
    status = metric_status()
    use_java = java_version() is not None
    gts = ptb_tokenize({i: list(references[i]) for i in ids}, use_java=use_java)
    res = ptb_tokenize({i: [predictions[i]] for i in ids}, use_java=use_java)
    out = ScoreResult(ids, {}, tokenizer="ptb-java" if use_java else "python-approximation")
    wanted = set(metrics)
    quiet = contextlib.redirect_stdout(io.StringIO())
    if wanted & {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"}:
        scorer = Bleu(4)
        with quiet:
            scores, _ = scorer.compute_score(gts, res)
        for n, s in enumerate(scores, 1):
            if f"Bleu_{n}" in wanted:
                out.metrics[f"Bleu_{n}"] = float(s)
        if per_image:
            from pycocoevalcap.bleu.bleu_scorer import BleuScorer

            bs = BleuScorer(n=4)
            for i in ids:
                bs += (res[i][0], gts[i])
            out.bleu_stats = _bleu_stats(bs)
    simple = {"ROUGE_L": Rouge, "CIDEr": Cider}
    for name, cls in simple.items():
        if name in wanted:
            score, each = cls().compute_score(gts, res)
            out.metrics[name] = float(score)
            if per_image:
                out.per_image[name] = [float(x) for x in each]
    if "METEOR" in wanted:
        if status["METEOR"]:
            out.metrics["METEOR"] = None
            out.unavailable["METEOR"] = status["METEOR"]
        else:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            try:
                score, each = meteor.compute_score(gts, res)
            finally:
                with contextlib.suppress(Exception):
                    meteor.close()
            out.metrics["METEOR"] = float(score)
            if per_image:
                out.per_image["METEOR"] = [float(x) for x in each]
    if "SPICE" in wanted:
        if status["SPICE"]:
            out.metrics["SPICE"] = None
            out.unavailable["SPICE"] = status["SPICE"]
        else:
            try:
                score, each = _run_spice(gts, res)
                out.metrics["SPICE"] = score
                if per_image:
                    out.per_image["SPICE"] = each
            except (subprocess.CalledProcessError, OSError, KeyError, ValueError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                out.metrics["SPICE"] = None
                out.unavailable["SPICE"] = f"SPICE failed: {exc} {detail.decode()[-300:]}".strip()
    return out


def cider_d(predictions: dict, references_tokenized: dict) -> float:
    """CIDEr-D of ``{id: caption}`` against already PTB-tokenized references (validation)."""
    from pycocoevalcap.cider.cider import Cider

    res = ptb_tokenize({i: [c] for i, c in predictions.items()})
    gts = {i: references_tokenized[i] for i in predictions}
    return float(Cider().compute_score(gts, res)[0])
