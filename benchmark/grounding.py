"""Does a word's heatmap land on the object the word names? Pointing game and energy in box.

On the ``shapes`` dataset every image lists its objects with a bounding box
(``images[].objects[] = {shape, color, size, bbox: [x0, y0, x1, y1]}`` in image pixels,
inclusive, see :mod:`benchmark.shapes`). For every generated word that names the colour or
the shape (any synonym: ``disc`` -> circle, ``box``/``block`` -> square) of at least one
object in its image, and for every heatmap method (:mod:`benchmark.explain`):

* **pointing game** (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop",
  ECCV; the tolerance as in their protocol and TorchRay's ``PointingGame``): a hit when the
  map's maximum in image pixels (the centre of the arg-max grid cell mapped through the
  encoder's crop, where the bilinearly upsampled map peaks) lies within ``tolerance`` pixels
  (Euclidean distance to the box; default 15) of a box of the named object;
* **energy in box**: the share of the upsampled map's mass inside the box (the
  "energy-based pointing game" of Wang et al. 2020, Score-CAM).

When a word names several objects of the image (two red objects), the point counts as a hit
if it is near **any** of them, and the energy is the mass inside the **union** of their boxes.
Words naming nothing in the image (a wrong colour) are not scored; their number is reported
as ``unmatched_words``. A Grad-CAM map that is zero everywhere (no positive evidence after
the ReLU) counts as a miss with energy 0.

Baselines that never look at the model: **centre** points at the image centre, and its
energy is that of a centred isotropic Gaussian with sigma = a quarter of the shorter side (the
usual centre prior); **random** points at a uniformly drawn pixel (seeded), and its energy is
the boxes' share of the image area (the expected energy of a uniform map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmark.captioner import check_split
from benchmark.checkpoint import load_run
from benchmark.data import resolve_dataset
from benchmark.errors import ConfigError, DatasetError
from benchmark.explain import explain_image, open_image
from benchmark.records import update_record
from benchmark.shapes import COLORS, SYNONYMS
from benchmark.userfiles import field_type_problem, read_json

__all__ = ["SHAPE_WORDS", "COLOUR_WORDS", "point_hit", "box_mask", "energy_in_boxes",
           "centre_point", "centre_prior", "matching_objects", "GroundingResult",
           "ground_run", "ground_saved_run", "run_dataset_path", "load_objects", "BASELINES",
           "check_saved_dataset"]

COLOUR_WORDS = frozenset(COLORS)
#: word -> shape it names
SHAPE_WORDS = {w: shape for shape, words in SYNONYMS.items() for w in words}
BASELINES = ("centre", "random")


def matching_objects(word: str, objects: list[dict]) -> list[dict]:
    """Objects of an image whose colour or shape ``word`` names (``[]`` when none or when the
    word is neither a colour nor a shape word)."""
    if word in COLOUR_WORDS:
        return [o for o in objects if o["color"] == word]
    if word in SHAPE_WORDS:
        return [o for o in objects if o["shape"] == SHAPE_WORDS[word]]
    return []


def _box_distance(x: float, y: float, box) -> float:
    x0, y0, x1, y1 = box
    dx = max(x0 - x, 0.0, x - x1)
    dy = max(y0 - y, 0.0, y - y1)
    return math.hypot(dx, dy)


def point_hit(point: tuple[float, float], boxes: list, tolerance: float = 15.0) -> bool:
    """Pointing-game hit: ``point = (x, y)`` in image pixels lies within ``tolerance`` pixels
    (Euclidean distance; 0 inside) of at least one of ``boxes`` (``[x0, y0, x1, y1]``,
    inclusive pixel coordinates)."""
    return any(_box_distance(point[0], point[1], b) <= tolerance for b in boxes)


def box_mask(boxes: list, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` bool mask of the union of ``boxes`` (inclusive pixel bounds, clipped to the
    image) on an image of ``size = (W, H)``."""
    W, H = size
    mask = torch.zeros(H, W, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, int(y0)) : min(H, int(y1) + 1), max(0, int(x0)) : min(W, int(x1) + 1)] = True
    return mask


def energy_in_boxes(heatmap: torch.Tensor, boxes: list) -> float:
    """Share of ``heatmap (H, W)`` (non-negative) mass inside the union of ``boxes``; 0 for an
    all-zero map. In [0, 1]."""
    total = float(heatmap.sum())
    if total <= 0:
        return 0.0
    mask = box_mask(boxes, (heatmap.shape[1], heatmap.shape[0]))
    return float(heatmap[mask].sum()) / total


def argmax_point(heatmap: torch.Tensor) -> tuple[int, int] | None:
    """``(x, y)`` pixel of the maximum of ``heatmap (H, W)`` (first in row-major order on
    ties), or None for a map without positive value."""
    if not bool(heatmap.max() > 0):
        return None
    i = int(heatmap.flatten().argmax())
    return i % heatmap.shape[1], i // heatmap.shape[1]


def centre_point(size: tuple[int, int]) -> tuple[float, float]:
    """The centre ``((W - 1) / 2, (H - 1) / 2)`` of an image of ``size = (W, H)`` in the pixel
    coordinates of :func:`point_hit`."""
    return (size[0] - 1) / 2, (size[1] - 1) / 2


def centre_prior(size: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` centred isotropic Gaussian, sigma = min(W, H) / 4, summing to 1."""
    W, H = size
    cx, cy = centre_point(size)
    sigma = min(W, H) / 4
    y = torch.arange(H, dtype=torch.float32)[:, None]
    x = torch.arange(W, dtype=torch.float32)[None, :]
    g = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return g / g.sum()


@dataclass
class _Tally:
    hits: int = 0
    energy: float = 0.0
    n: int = 0

    def add(self, hit: bool, energy: float) -> None:
        self.hits += int(hit)
        self.energy += energy
        self.n += 1

    @property
    def pointing(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def mean_energy(self) -> float | None:
        return self.energy / self.n if self.n else None


@dataclass
class GroundingResult:
    """Grounding of one run on one split.

    ``pointing``/``energy_in_box``: method or baseline -> fraction in [0, 1] over the scored
    words (None for a method the decoder lacks, e.g. attention of ``rnn``); ``words``: scored
    words; ``unmatched_words``: colour/shape words naming nothing in their image;
    ``by_kind``: the same figures for colour words and shape words separately;
    ``details``: one dict per scored word (image, position, word, boxes, per method the point,
    hit and energy); ``methods_unavailable``: method -> reason.
    """

    run_id: str
    split: str
    images: int
    tolerance: float
    words: int = 0
    unmatched_words: int = 0
    pointing: dict[str, float | None] = field(default_factory=dict)
    energy_in_box: dict[str, float | None] = field(default_factory=dict)
    by_kind: dict[str, dict] = field(default_factory=dict)
    methods_unavailable: dict[str, str] = field(default_factory=dict)
    details: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self, details: bool = False) -> dict:
        """The JSON form (per-word ``details`` only when asked)."""
        out = {"run_id": self.run_id, "split": self.split, "images": self.images,
               "tolerance_px": self.tolerance, "words": self.words,
               "unmatched_words": self.unmatched_words, "pointing": self.pointing,
               "energy_in_box": self.energy_in_box, "by_kind": self.by_kind,
               "methods_unavailable": self.methods_unavailable, "seconds": self.seconds}
        if details:
            out["details"] = self.details
        return out

    def table_rows(self) -> list[tuple[str, float | None, float | None, float | None, float | None]]:
        """One row per method then baseline (``baseline: centre``, ...): its name, pointing
        game, energy in box, and pointing game of colour words and of shape words (fractions
        in [0, 1]; None where the method is unavailable)."""
        return [(m if m not in BASELINES else f"baseline: {m}", self.pointing[m],
                 self.energy_in_box[m], self.by_kind["colour"]["pointing"][m],
                 self.by_kind["shape"]["pointing"][m])
                for m in ("attention", "gradcam", *BASELINES)]

    def record_block(self, *, seed: int, layer: int) -> dict:
        """The run record's ``grounding`` field: :meth:`to_json` without the run id and the
        per-word details, plus the random baseline's ``seed`` and the transformer ``layer``."""
        out = self.to_json()
        out.pop("run_id")
        return {**out, "random_seed": seed, "layer": layer}


_NUM = (int, float)
#: JSON types of the dataset fields grounding reads (see benchmark.userfiles.field_type_problem)
OBJECT_TYPES = (("images.*", (dict,)), ("images.*.filename", (str,)),
                ("images.*.filepath", (str,)), ("images.*.split", (str,)),
                ("images.*.cocoid", (*_NUM, str)), ("images.*.imgid", (*_NUM, str)),
                ("images.*.objects", (list,)), ("images.*.objects.*", (dict,)),
                ("images.*.objects.*.bbox", (list,)), ("images.*.objects.*.bbox.*", _NUM),
                ("images.*.objects.*.shape", (str,)), ("images.*.objects.*.color", (str,)))


def load_objects(path: str | Path, split: str = "test") -> list[dict]:
    """Entries ``{"path", "image_id", "filename", "objects"}`` of ``split`` in a shapes
    ``dataset.json``. Raises DatasetError naming the file when it is unreadable or has no
    ``objects`` with ``bbox`` (only the shapes set has boxes)."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    data = read_json(path, "dataset", DatasetError, walk=False)  # fields checked below
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path}: expected a Karpathy dataset.json with an 'images' list")
    if why := field_type_problem(data, OBJECT_TYPES):
        raise DatasetError(f"{path}: {why}")
    out = []
    for i, e in enumerate(images):
        if e.get("split") != split:
            continue
        if "filename" not in e:
            raise DatasetError(f"{path}: images[{i}]: missing field 'filename'")
        objs = e.get("objects")
        if not objs or not all(isinstance(o, dict) and len(o.get("bbox", [])) == 4 for o in objs):
            raise DatasetError(f"{path}: images[{i}] has no 'objects' with 'bbox'; grounding needs "
                               "object boxes, which only the shapes dataset has (`capbench data "
                               "shapes`)")
        out.append({"path": path.parent / e.get("filepath", "") / e["filename"],
                    "image_id": e.get("cocoid", e.get("imgid", i)), "filename": e["filename"],
                    "objects": objs})
    if not out:
        raise DatasetError(f"{path}: split {split!r} has no images")
    return out


def check_saved_dataset(run, dataset_path: str | Path) -> None:
    """Refuse to save figures of ``dataset_path`` into ``run``'s record unless it is the
    dataset the run was trained and scored on (the same split fingerprint): figures of another
    set would be recorded as the run's own. Raises DatasetError naming both fingerprints."""
    if run.record is None:
        return
    got = resolve_dataset(str(dataset_path)).fingerprint
    if got != run.record.split_fingerprint:
        raise DatasetError(f"--dataset {dataset_path} is not the dataset run {run.run_id} was "
                           f"trained on (split fingerprint {got}, the run's is "
                           f"{run.record.split_fingerprint}): its figures would be saved for "
                           "images the run never saw; pass --no-save to only print them, or "
                           "give the run's own dataset")


def run_dataset_path(run) -> str:
    """The dataset.json ``run`` (a LoadedRun) was trained on: its record's path while that
    file exists, else its config's dataset spec resolved."""
    if run.record is not None and run.record.dataset.path and Path(run.record.dataset.path).is_file():
        return run.record.dataset.path
    return str(resolve_dataset(run.config["dataset"]).source)


def ground_saved_run(run: str, results_dir: str | Path, split: str = "test",
                     dataset: str | None = None, *, tolerance: float = 15.0, seed: int = 0,
                     layer: int = -1, save: bool = True):
    """``capbench ground``: load the saved run ``run`` (id, prefix/suffix, folder or 'latest'
    under ``results_dir``), :func:`ground_run` it on ``dataset`` (default: the run's own,
    :func:`run_dataset_path`) and, when ``save``, write the figures into the run's record
    (field ``grounding``). Returns ``(loaded run, GroundingResult, path of the updated record
    or None when not saved or the checkpoint has no record)``. Raises ConfigError for a
    ``tolerance`` (pixels) that is negative, infinite or NaN, CapbenchError for a split other
    than train/val/test, DatasetError (:func:`check_saved_dataset`) when saving figures of a
    dataset the run was not trained on; all before any work."""
    if not 0 <= tolerance < float("inf"):  # NaN fails both
        raise ConfigError(f"--tolerance {tolerance}: give a finite number of pixels >= 0")
    check_split(split)
    loaded = load_run(run, results_dir)
    path = dataset or run_dataset_path(loaded)
    if save:
        check_saved_dataset(loaded, path)
    res = ground_run(loaded, path, split, tolerance=tolerance, seed=seed, layer=layer)
    saved = None
    if save and loaded.record is not None and loaded.record.path:
        saved = update_record(loaded.record, grounding=res.record_block(seed=seed, layer=layer))
    return loaded, res, saved


def ground_run(run, dataset_path: str | Path, split: str = "test", *, tolerance: float = 15.0,
               seed: int = 0, layer: int = -1, progress=None) -> GroundingResult:
    """Pointing game and energy in box of ``run`` (a :class:`~benchmark.checkpoint.LoadedRun`)
    on the ``split`` images of the shapes ``dataset_path``, for attention (when the decoder
    has it), Grad-CAM and the centre and random baselines (see the module docstring).

    Captions are generated with the run's decoding settings from the live encoder (they equal
    the run's test predictions). ``progress(n)`` is called per image. Raises DatasetError for
    a dataset without boxes.
    """
    import time


    t0 = time.perf_counter()
    entries = load_objects(dataset_path, split)
    rng = np.random.default_rng(seed)
    methods = ["attention", "gradcam"]
    result = GroundingResult(run.run_id, split, len(entries), tolerance)
    tallies = {k: {m: _Tally() for m in (*methods, *BASELINES)} for k in ("all", "colour", "shape")}
    for e in entries:
        image = open_image(e["path"])
        ex = explain_image(run, image, [m for m in methods if m not in result.methods_unavailable],
                           layer=layer, unavailable=result.methods_unavailable)
        usable = list(ex.maps)
        ups = {m: ex.upsampled(m) for m in usable}
        peaks = {m: ex.peaks(m) for m in usable}
        W, H = image.size
        prior = centre_prior((W, H))
        for t, word in enumerate(ex.words):
            objs = matching_objects(word, e["objects"])
            if not objs:
                result.unmatched_words += int(word in COLOUR_WORDS or word in SHAPE_WORDS)
                continue
            boxes = [o["bbox"] for o in objs]
            kind = "colour" if word in COLOUR_WORDS else "shape"
            row = {"image_id": e["image_id"], "filename": e["filename"], "position": t,
                   "word": word, "kind": kind, "caption": ex.caption, "boxes": boxes}
            scored = {}
            for m in usable:
                pt = peaks[m][t]
                scored[m] = (pt, pt is not None and point_hit(pt, boxes, tolerance),
                             energy_in_boxes(ups[m][t], boxes))
            cp = centre_point((W, H))
            scored["centre"] = (cp, point_hit(cp, boxes, tolerance), energy_in_boxes(prior, boxes))
            rp = (int(rng.integers(W)), int(rng.integers(H)))
            area = float(box_mask(boxes, (W, H)).sum()) / (W * H)
            scored["random"] = (rp, point_hit(rp, boxes, tolerance), area)
            for m, (pt, hit, energy) in scored.items():
                tallies["all"][m].add(hit, energy)
                tallies[kind][m].add(hit, energy)
                row[m] = {"point": list(pt) if pt is not None else None, "hit": hit,
                          "energy": energy}
            result.details.append(row)
        if progress:
            progress(1)
    result.words = tallies["all"]["centre"].n
    for m, t in tallies["all"].items():
        ok = m not in result.methods_unavailable
        result.pointing[m] = t.pointing if ok else None
        result.energy_in_box[m] = t.mean_energy if ok else None
    for kind in ("colour", "shape"):
        result.by_kind[kind] = {
            "words": tallies[kind]["centre"].n,
            "pointing": {m: (t.pointing if m not in result.methods_unavailable else None)
                         for m, t in tallies[kind].items()},
            "energy_in_box": {m: (t.mean_energy if m not in result.methods_unavailable else None)
                              for m, t in tallies[kind].items()}}
    result.seconds = time.perf_counter() - t0
    return result
