"""The COCO caption toolkit's metrics through pycocoevalcap, exactly as it computes them.

:func:`score_captions` reproduces ``pycocoevalcap.eval.COCOEvalCap``: both sides pass through
the Stanford PTB tokenizer (lower-cased, punctuation removed), then BLEU-1..4 (corpus,
``closest`` reference length), METEOR 1.5, ROUGE-L, CIDEr-D and SPICE score them. Keys follow
pycocoevalcap: ``Bleu_1``..``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``.

Two deviations, neither changing a number:

* the PTB tokenizer and SPICE run in a temporary working folder, not inside
  pycocoevalcap's install folder, so scoring works from a read-only install (METEOR runs in
  its own folder, as pycocoevalcap starts it, and writes nothing there);
* SPICE runs with the ``--add-opens`` flags Java 16+ needs, a per-run cache folder and a
  memory cap, when the Stanford CoreNLP 3.6.0 jars are found (``spice/lib`` or
  ``$CAPBENCH_CORENLP``). Otherwise SPICE is reported unavailable with the reason.

Without Java, the tokenizer falls back to a Python approximation of PTB tokenization (the
result says so under ``tokenizer``) and METEOR/SPICE are reported unavailable.

METEOR runs through :class:`MeteorJar`, which drives pycocoevalcap's own ``Meteor`` (same
``meteor-1.5.jar``, same flags ``- - -stdio -l en -norm``, same ``SCORE``/``EVAL`` lines) and
also keeps each image's sufficient statistics, so that the corpus METEOR of any subset of
images (a bootstrap resample) can be scored by the jar (see :mod:`benchmark.stats`).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from benchmark.errors import ScoringError
from benchmark.metrics.registry import MetricFamily, ScoreResult, ScoringInput, register_family

ALL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
#: metrics scored per image (BLEU is corpus-level: its per-image n-gram counts are kept instead)
PER_IMAGE_METRICS = tuple(m for m in ALL_METRICS if not m.startswith("Bleu_"))
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

#: per-image METEOR 1.5 sufficient statistics in the ``per_image`` block (see MeteorJar)
METEOR_STATS_KEY = "METEOR_stats"
#: how many numbers one METEOR 1.5 statistics line holds (``MeteorStats.STATS_LENGTH``)
METEOR_STATS_LENGTH = 23

__all__ = ["ScoreResult", "score_captions", "ptb_tokenize", "java_version", "metric_status",
           "java_tokenizer_available", "one_line", "LINE_BREAKS",
           "ALL_METRICS", "PER_IMAGE_METRICS", "MeteorJar", "meteor_jar", "close_meteor_jar",
           "METEOR_STATS_KEY", "METEOR_STATS_LENGTH"]


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


#: what pycocoevalcap's METEOR 1.5 reads, under its ``meteor/`` folder
METEOR_FILES = ("meteor-1.5.jar", "data/paraphrase-en.gz")


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
        return status
    missing = [f for f in METEOR_FILES if not (_pkg_dir() / "meteor" / f).is_file()]
    if missing:  # a trimmed install (make gpu-bundle leaves out METEOR's jar and paraphrases)
        status["METEOR"] = (f"{', '.join(missing)} missing from {_pkg_dir() / 'meteor'}: "
                            "reinstall pycocoevalcap (pip install --force-reinstall pycocoevalcap)")
    if not (_pkg_dir() / "spice" / "spice-1.0.jar").is_file():
        status["SPICE"] = (f"spice-1.0.jar missing from {_pkg_dir() / 'spice'}: reinstall "
                           "pycocoevalcap (pip install --force-reinstall pycocoevalcap)")
    elif corenlp_dir() is None:
        status["SPICE"] = (
            "Stanford CoreNLP 3.6.0 jars not found (" + ", ".join(CORENLP_JARS) + "): put them in "
            f"{_pkg_dir() / 'spice' / 'lib'} or in a folder named by $CAPBENCH_CORENLP "
            "(from stanford-corenlp-full-2015-12-09.zip)"
        )
    return status


# ------------------------------------------------------------------------------ tokenizer
_PY_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?|n't|[^\sA-Za-z0-9]")


def java_tokenizer_available() -> bool:
    """Whether Stanford's PTB tokenizer can run: a Java runtime on PATH and pycocoevalcap's
    CoreNLP 3.4.1 jar in place (a trimmed install, such as the GPU bundle, lacks it)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import STANFORD_CORENLP_3_4_1_JAR

    return java_version() is not None and \
        (_pkg_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR).is_file()


def _python_ptb(text: str) -> list[str]:
    return _PY_TOKEN.findall(text.lower())


# Every character that ends a line for Python (``str.splitlines``) or for the Java side: the
# line readers (``\n``, ``\r``) and CoreNLP's PTBLexer, which also breaks lines at \v, \f,
# U+2028 and U+2029 (and reads U+0085 as "..."). One of them inside a caption would shift every
# later caption of ``-preserveLines`` output onto another image's line.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_ONE_LINE = str.maketrans(dict.fromkeys(LINE_BREAKS, " "))


def one_line(caption: str) -> str:
    """``caption`` with every character of :data:`LINE_BREAKS` replaced by a space, as
    COCOEvalCap's ``PTBTokenizer`` replaces ``\n`` (its only one): the tokens are those of the
    caption with a space there, so a stray ``\r`` scores exactly as a space would."""
    return caption.translate(_ONE_LINE)


def _java_ptb(sentences: list[str]) -> list[list[str]]:
    """Stanford's ``PTBTokenizer -preserveLines -lowerCase`` over one caption a line, in a
    temporary folder. Raises ScoringError unless it returns exactly one line per caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import STANFORD_CORENLP_3_4_1_JAR

    jar = _pkg_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix=f"capbench-ptb-{os.getpid()}-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_bytes("\n".join(sentences).encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", src.name]
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, check=True).stdout.decode()
    lines = out.split("\n")
    if len(lines) != len(sentences):
        raise ScoringError(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} "
                           "captions, so its lines cannot be matched to images; nothing was "
                           "scored (a caption holds a line break capbench does not know?)")
    return [line.rstrip().split(" ") for line in lines]


def ptb_tokenize(captions: dict, *, use_java: bool | None = None) -> dict:
    """PTB-tokenize ``{image_id: [caption, ...]}`` and drop punctuation, as COCOEvalCap does.

    Every line-breaking character becomes a space first (:func:`one_line`), for both
    tokenizers. Runs Stanford's ``PTBTokenizer -preserveLines -lowerCase`` (the jar shipped in
    pycocoevalcap); ``use_java=False`` (or no Java) uses a Python approximation instead.
    Returns ``{image_id: [tokenized caption, ...]}`` in input order. Raises ScoringError when
    the tokenizer's output does not hold one line per caption.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    ids = [k for k, v in captions.items() for _ in v]
    sentences = [one_line(c) for v in captions.values() for c in v]
    if use_java is None:
        use_java = java_tokenizer_available()
    token_lists = _java_ptb(sentences) if use_java else [_python_ptb(s) for s in sentences]
    result: dict = {k: [] for k in captions}
    for k, tokens in zip(ids, token_lists, strict=True):
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
    with tempfile.TemporaryDirectory(prefix=f"capbench-spice-{os.getpid()}-") as tmp:
        data = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in res]
        (Path(tmp) / "in.json").write_text(json.dumps(data))
        cmd = ["java", f"-Xmx{memory}", *flags, "-cp", classpath, "edu.anu.spice.SpiceScorer",
               "in.json", "-cache", "cache", "-out", "out.json", "-subset", "-silent"]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        results = json.loads((Path(tmp) / "out.json").read_text())
    by_id = {str(r["image_id"]): r["scores"]["All"]["f"] for r in results}
    per_image = [float("nan") if by_id[str(i)] == "NaN" else float(by_id[str(i)]) for i in res]
    return float(np.mean(per_image)), per_image


# --------------------------------------------------------------------------------- METEOR
def _stats_number(x: float) -> str:
    """A statistic as the jar reads it back (``Scanner.nextDouble``): integers without '.0'."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


class MeteorJar:
    """A running METEOR 1.5 jar that also hands out each image's sufficient statistics.

    It wraps pycocoevalcap's ``Meteor`` (not modified): the same ``meteor-1.5.jar``, started
    with the same command (``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm``) in
    the same folder, fed the same ``SCORE ||| refs ||| hyp`` and ``EVAL ||| stats ...`` lines,
    so :meth:`score` returns exactly what ``Meteor.compute_score`` returns, plus the
    statistics. Raises RuntimeError when the jar stops answering (its stderr is quoted).
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()

    @property
    def alive(self) -> bool:
        """Whether the jar process is still running."""
        return self._meteor.meteor_p.poll() is None

    def _readline(self) -> float:
        line = self._meteor.meteor_p.stdout.readline()
        try:
            return float(line.strip())
        except ValueError:
            err = b""
            if not self.alive:
                with contextlib.suppress(Exception):
                    err = self._meteor.meteor_p.stderr.read() or b""
            raise RuntimeError(f"METEOR jar gave {line[:80]!r} instead of a score"
                               f"{': ' + err.decode(errors='replace')[-500:] if err else ''}") from None

    def _eval(self, lines: list[str]) -> tuple[list[float], float]:
        """Send ``EVAL ||| s_1 ||| ... ||| s_n``; return the n segment scores and the aggregate."""
        p = self._meteor.meteor_p
        p.stdin.write(("EVAL" + "".join(" ||| " + x for x in lines) + "\n").encode())
        p.stdin.flush()
        each = [self._readline() for _ in lines]
        return each, self._readline()

    def score(self, gts: dict, res: dict) -> tuple[float, list[float], list[list[float]]]:
        """``Meteor.compute_score(gts, res)`` plus the statistics of every image.

        ``gts``: ``{id: [tokenized reference, ...]}``; ``res``: ``{id: [tokenized caption]}``
        with the same keys (ValueError otherwise). Returns the corpus score (the jar's
        aggregate over all images), per-image scores and per-image statistics: 23 numbers
        each, as the jar prints them for ``SCORE`` (``MeteorStats.toString``: test/ref
        length, test/ref function words, per module (exact, stem, synonym, paraphrase) test/ref
        content/function matches, chunks, test/ref word matches), in ``gts`` order.
        """
        if gts.keys() != res.keys():
            raise ValueError("METEOR: predictions and references must have the same image ids")
        with self._meteor.lock:
            lines = []
            for i in gts:
                if len(res[i]) != 1:
                    raise ValueError(f"METEOR: image {i!r} needs exactly one caption")
                lines.append(self._meteor._stat(res[i][0], gts[i]))
            each, score = self._eval(lines)
        stats = [[float(x) for x in line.split()] for line in lines]
        return score, each, [[int(x) if x.is_integer() else x for x in row] for row in stats]

    def aggregate(self, stats) -> float:
        """The jar's own corpus METEOR of per-image statistics ``(M, 23)`` (rows as
        :meth:`score` returns them, repeats allowed): ``EVAL`` with one segment per row, the
        aggregate line that ``Meteor.compute_score`` returns as its score."""
        rows = np.asarray(stats, dtype=np.float64).reshape(-1, METEOR_STATS_LENGTH)
        with self._meteor.lock:
            return self._eval([" ".join(map(_stats_number, r)) for r in rows])[1]

    def eval_stats(self, stats, batch: int = 2000) -> np.ndarray:
        """The jar's METEOR score of each row of ``stats`` ``(R, 23)`` -> ``(R,)``.

        Each row is scored as one segment (``EVAL ||| row``), which is how the jar scores
        its own aggregate: rows that are sums of per-image statistics (chunks of
        perfectly matched images left out, see :func:`benchmark.stats.meteor_aggregable`)
        give the corpus METEOR of those images. ``batch`` rows go in one ``EVAL`` line.
        """
        rows = np.asarray(stats, dtype=np.float64).reshape(-1, METEOR_STATS_LENGTH)
        out = np.empty(len(rows))
        with self._meteor.lock:
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                each, _ = self._eval([" ".join(map(_stats_number, r)) for r in chunk])
                out[start:start + len(chunk)] = each
        return out

    def close(self) -> None:
        """Stop the jar (idempotent)."""
        p = self._meteor.meteor_p
        with self._meteor.lock:
            with contextlib.suppress(Exception):
                p.stdin.close()
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


_JAR: MeteorJar | None = None
_JAR_LOCK = threading.Lock()
_JAR_USERS = 0
_JAR_TIMER: threading.Timer | None = None
#: seconds an unused shared METEOR jar (about 1 GB of memory) is kept before it is stopped
METEOR_IDLE_S = 120.0


def close_meteor_jar() -> None:
    """Stop the shared METEOR jar now unless it is in use (it restarts when needed)."""
    global _JAR
    with _JAR_LOCK:
        if _JAR is not None and _JAR_USERS == 0:
            _JAR.close()
            _JAR = None


@contextlib.contextmanager
def meteor_jar():
    """The shared :class:`MeteorJar` of this process, started on first use (about 5 s: it
    loads its paraphrase tables) and stopped after :data:`METEOR_IDLE_S` idle seconds, so
    that scoring and the bootstrap that follows share one start. Needs Java."""
    global _JAR, _JAR_USERS, _JAR_TIMER
    with _JAR_LOCK:
        if _JAR_TIMER is not None:
            _JAR_TIMER.cancel()
            _JAR_TIMER = None
        if _JAR is None or not _JAR.alive:
            if _JAR is not None:
                _JAR.close()
            _JAR = MeteorJar()
        _JAR_USERS += 1
        jar = _JAR
    try:
        yield jar
    finally:
        with _JAR_LOCK:
            _JAR_USERS -= 1
            if _JAR_USERS == 0:
                _JAR_TIMER = threading.Timer(METEOR_IDLE_S, close_meteor_jar)
                _JAR_TIMER.daemon = True
                _JAR_TIMER.start()


atexit.register(close_meteor_jar)


# -------------------------------------------------------------------------------- scoring
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
    """Score ``{image_id: caption}`` against ``{image_id: [reference, ...]}`` with the COCO
    caption toolkit's metrics (this family's part of :func:`benchmark.metrics.score_captions`).

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
    use_java = java_tokenizer_available()
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
            with meteor_jar() as jar:
                score, each, stats = jar.score(gts, res)
            out.metrics["METEOR"] = float(score)
            if per_image:
                out.per_image["METEOR"] = [float(x) for x in each]
                out.per_image[METEOR_STATS_KEY] = stats
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


def _score_family(inp: ScoringInput, wanted: tuple[str, ...]) -> ScoreResult:
    return score_captions(inp.predictions, inp.references, metrics=wanted,
                          per_image=inp.per_image)


COCO = register_family(MetricFamily(
    name="coco", metrics=ALL_METRICS, score=_score_family, status=lambda _options: metric_status(),
    needs_java=True, weights="none (n-gram statistics; METEOR's paraphrase table ships with "
    "pycocoevalcap)", mean_of_images=PER_IMAGE_METRICS, order=0))
