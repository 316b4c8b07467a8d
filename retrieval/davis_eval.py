"""Exact, fast DAVIS J&F evaluation (semi-supervised video object segmentation).

Reproduces the numbers of the official evaluator, ``davisvideochallenge/davis2017-evaluation``
(Pont-Tuset et al., "The 2017 DAVIS Challenge on Video Object Segmentation", 2017; metrics from
Perazzi et al., CVPR 2016), run with ``--task semi-supervised``. Conventions carried over from its
``davis2017/{davis,results,metrics,utils,evaluation}.py`` and ``evaluation_method.py``:

* GT: 255 (void) becomes 0 and is otherwise ignored (the semi-supervised task does not use void);
  ``num_objects`` = the largest id of the **first** GT frame; object k is ``gt == k`` (ids above
  ``num_objects`` in later frames belong to no object).
* The first and the last frame are not scored; result PNGs are read only for the others, as
  ``np.array(Image.open(p))`` indices. A result id above ``num_objects`` is fatal (the official
  exits); objects missing from the results score as empty masks.
* J (region similarity): |S & G| / |S | G|, and 1 when the union is empty.
* F (boundary F-measure): 1-px boundaries by ``seg2bmap`` (D. Martin's BSDS code, with its
  last-row/last-column rules); tolerance ``ceil(0.008 * ||(H, W)||)`` px (8 px at 480x854);
  boundaries dilated by ``cv2.dilate`` with ``skimage.morphology.disk(tolerance)``; precision
  and recall of the matched boundary pixels; the official edge cases for empty boundaries.
* Per object (``db_statistics``): mean, recall = fraction of frames > 0.5, decay = mean of the
  first of 4 temporal bins minus mean of the last (bin edges ``uint8(round(linspace(1, N, 5) +
  1e-10) - 1)``, the uint8 cast included).
* Global: every statistic is a mean over **objects** (not sequences); J&F-Mean = (mean J-Mean +
  mean F-Mean) / 2. Per-object rows are named ``<seq>_<k>``.

Speed comes from working on each object's bounding window instead of the whole frame (the
boundary map and its dilation are local, so the counts are unchanged, see :func:`_object_scores`),
and from running frames in a thread pool (PIL decoding and OpenCV release the GIL).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import read_mask

__all__ = [
    "BOUND_TH",
    "GLOBAL_COLUMNS",
    "PER_SEQUENCE_COLUMNS",
    "DavisEvalResult",
    "ObjectScores",
    "SequenceScores",
    "boundary_tolerance",
    "db_eval_boundary",
    "db_eval_iou",
    "db_statistics",
    "evaluate_davis",
    "evaluate_sequence",
    "f_measure",
    "format_table",
    "plot_per_sequence",
    "rich_tables",
    "seg2bmap",
    "write_csvs",
]

BOUND_TH = 0.008  # official ``bound_th``: boundary tolerance as a fraction of the image diagonal
VOID_ID = 255
GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
PER_SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")


# ------------------------------------------------------------------------------------------------
# Per-frame metrics on arrays
# ------------------------------------------------------------------------------------------------


def boundary_tolerance(shape: Sequence[int], bound_th: float = BOUND_TH) -> float:
    """Boundary tolerance in pixels for an ``(H, W)`` frame: ``bound_th`` itself when >= 1, else
    ``ceil(bound_th * ||(H, W)||)`` -- the official expression, evaluated the same way."""
    if bound_th >= 1:
        return float(bound_th)
    return float(np.ceil(bound_th * np.linalg.norm(tuple(shape[-2:]))))


_FOOTPRINTS: dict[float, np.ndarray] = {}


def _footprint(radius: float) -> np.ndarray:
    """``skimage.morphology.disk(radius)`` as uint8 (the official structuring element), cached."""
    fp = _FOOTPRINTS.get(radius)
    if fp is None:
        from skimage.morphology import disk

        fp = disk(radius).astype(np.uint8)
        _FOOTPRINTS[radius] = fp
    return fp


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-px boundary map of a binary mask (D. Martin's ``seg2bmap``, as in the official code).

    A pixel is on the boundary when it differs from its east, south or south-east neighbour;
    on the last row only east counts, on the last column only south, and the bottom-right pixel
    is never on the boundary (boundaries sit half a pixel towards the origin).

    Args:
        seg: (H, W) mask, any dtype (nonzero = foreground).
    Returns:
        (H, W) bool.
    """
    s = np.asarray(seg)
    if s.ndim != 2:
        raise ValueError(f"seg2bmap expects an (H, W) mask, got shape {s.shape}")
    s = s.astype(bool, copy=False)
    b = np.zeros(s.shape, dtype=bool)
    if s.shape[0] > 1 and s.shape[1] > 1:
        core = s[:-1, :-1]
        b[:-1, :-1] = (core != s[:-1, 1:]) | (core != s[1:, :-1]) | (core != s[1:, 1:])
    b[-1, :-1] = s[-1, :-1] != s[-1, 1:]
    b[:-1, -1] = s[:-1, -1] != s[1:, -1]
    return b


def _counts_ratio(num: int, den: int) -> float:
    # numpy's int64 / float division in float64, as the official ``np.sum(x) / float(n)``.
    return float(np.float64(num) / np.float64(den))


def _f_from_counts(n_fg: int, n_gt: int, fg_match: int, gt_match: int) -> float:
    """Official boundary F from the four counts, same edge cases and float order."""
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = _counts_ratio(fg_match, n_fg)
        recall = _counts_ratio(gt_match, n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _bbox(mask_u8: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) inclusive box of the nonzero pixels, None when empty."""
    x, y, w, h = cv2.boundingRect(mask_u8)
    if w == 0 or h == 0:
        return None
    return y, x, y + h - 1, x + w - 1


def _object_scores(gm: np.ndarray, pm: np.ndarray, footprint: np.ndarray) -> tuple[float, float]:
    """J and F of one object in one frame.

    gm, pm: (H, W) bool GT and predicted masks of the object (C-contiguous).

    Both metrics are computed inside the union of the two masks' bounding boxes grown by one
    pixel (clipped to the frame). That window gives exactly the official full-frame numbers:
    * every pixel of S & G and S | G lies inside it;
    * seg2bmap only looks east/south/south-east, so boundary pixels lie in the boxes or in the row
      /column just above/left of them (hence the 1-px margin), and the window's own last row and
      column are either the frame's (same special rules) or all-background (boundary 0 under both
      the interior and the last-row/column rules);
    * the dilated maps are only read at boundary pixels, and every boundary pixel that can reach
      them lies in the window; ``cv2.dilate``'s default border adds nothing, so dilating inside
      the window equals dilating the frame and cropping.
    """
    gbox = _bbox(gm.view(np.uint8))
    pbox = _bbox(pm.view(np.uint8))
    if gbox is None and pbox is None:
        return 1.0, 1.0  # empty union -> J = 1; no boundaries at all -> P = R = 1 -> F = 1
    boxes = [b for b in (gbox, pbox) if b is not None]
    h, w = gm.shape
    y0 = max(min(b[0] for b in boxes) - 1, 0)
    x0 = max(min(b[1] for b in boxes) - 1, 0)
    y1 = min(max(b[2] for b in boxes) + 2, h)
    x1 = min(max(b[3] for b in boxes) + 2, w)
    g = gm[y0:y1, x0:x1]
    p = pm[y0:y1, x0:x1]

    inter = int(np.count_nonzero(g & p))
    union = int(np.count_nonzero(g)) + int(np.count_nonzero(p)) - inter  # > 0: a mask is non-empty
    j = float(np.int64(inter) / np.int64(union))  # numpy int64 true division, as the official

    gb = seg2bmap(g)
    pb = seg2bmap(p)
    n_gt = int(np.count_nonzero(gb))
    n_fg = int(np.count_nonzero(pb))
    fg_match = gt_match = 0
    if n_gt > 0 and n_fg > 0:
        g_dil = cv2.dilate(gb.view(np.uint8), footprint)
        p_dil = cv2.dilate(pb.view(np.uint8), footprint)
        fg_match = int(np.count_nonzero(pb & g_dil.view(bool)))
        gt_match = int(np.count_nonzero(gb & p_dil.view(bool)))
    return j, _f_from_counts(n_fg, n_gt, fg_match, gt_match)


def _frame_scores(gt: np.ndarray, pred: np.ndarray, num_objects: int, footprint: np.ndarray) -> np.ndarray:
    """(2, num_objects) float64 [J; F] of one frame; gt/pred are (H, W) uint8 ids (gt already
    cleaned: void and ids above num_objects set to 0)."""
    out = np.empty((2, num_objects), dtype=np.float64)
    for k in range(1, num_objects + 1):
        out[0, k - 1], out[1, k - 1] = _object_scores(gt == k, pred == k, footprint)
    return out


def f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of one (H, W) binary prediction against one (H, W) binary GT mask
    (official argument order: prediction first)."""
    pm = np.ascontiguousarray(np.asarray(foreground_mask).astype(bool))
    gm = np.ascontiguousarray(np.asarray(gt_mask).astype(bool))
    if pm.shape != gm.shape or pm.ndim != 2:
        raise ValueError(f"f_measure needs two (H, W) masks of one shape, got {pm.shape} and {gm.shape}")
    return _object_scores(gm, pm, _footprint(boundary_tolerance(gm.shape, bound_th)))[1]


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, bound_th: float = BOUND_TH) -> float | np.ndarray:
    """Boundary F of binary masks: (H, W) -> float, (T, H, W) -> (T,) float64 per frame."""
    a = np.asarray(annotation)
    s = np.asarray(segmentation)
    if a.shape != s.shape:
        raise ValueError(f"annotation {a.shape} and segmentation {s.shape} shapes differ")
    if a.ndim == 2:
        return f_measure(s, a, bound_th)
    if a.ndim == 3:
        return np.array([f_measure(s[t], a[t], bound_th) for t in range(a.shape[0])], dtype=np.float64)
    raise ValueError(f"db_eval_boundary supports (H, W) or (T, H, W) masks, got {a.ndim} dimensions")


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray) -> float | np.ndarray:
    """Region similarity J of binary masks: (H, W) -> float, (..., H, W) -> per-frame float64
    array; 1 where both masks are empty."""
    a = np.asarray(annotation).astype(bool)
    s = np.asarray(segmentation).astype(bool)
    if a.shape != s.shape:
        raise ValueError(f"annotation {a.shape} and segmentation {s.shape} shapes differ")
    inter = np.sum(a & s, axis=(-2, -1))
    union = np.sum(a | s, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inter / union
    if np.ndim(j) == 0:
        return 1.0 if union == 0 else float(j)
    j[union == 0] = 1.0
    return j


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame J or F values (official ``db_statistics``).

    Recall is the fraction of frames above 0.5. Decay splits the frames into 4 overlapping bins
    with edges ``round(linspace(1, N, 5) + 1e-10) - 1`` cast to uint8 -- like the official code,
    so the edges wrap for sequences longer than 256 scored frames -- and returns mean(bin 0) -
    mean(bin 3).
    """
    v = np.asarray(per_frame_values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(v)
        recall = np.nanmean(v > 0.5)
        edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.uint8)
        first = v[edges[0] : edges[1] + 1]
        last = v[edges[3] : edges[4] + 1]
        decay = np.nanmean(first) - np.nanmean(last)
    return float(mean), float(recall), float(decay)


# ------------------------------------------------------------------------------------------------
# Sequences
# ------------------------------------------------------------------------------------------------


class SequenceScores(NamedTuple):
    """Per-object, per-scored-frame values of one sequence: ``j`` and ``f`` are
    (num_objects, T - 2) float64 (frames 1..T-2; object k+1 on row k)."""

    j: np.ndarray
    f: np.ndarray


def _num_objects(first: np.ndarray) -> int:
    """Official ``num_objects``: the largest id of the first GT frame once void (255) is 0."""
    return int(np.where(first == VOID_ID, 0, first).max(initial=0))


def _clean_gt_frame(g: np.ndarray, num_objects: int) -> np.ndarray:
    """Void and ids above ``num_objects`` -> 0 (they belong to no scored object)."""
    if g.size and int(g.max()) > num_objects:
        g = np.where(g > num_objects, 0, g).astype(np.uint8)
    return np.ascontiguousarray(g)


def _clean_gt(gt: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """(T, H, W) GT ids -> (cleaned uint8 stack, num_objects)."""
    g = np.asarray(gt)
    if g.ndim != 3:
        raise DensekitError(f"{what}: ground truth must be (T, H, W) ids, got shape {g.shape}")
    if g.dtype != np.uint8:
        if g.size and (g.min() < 0 or g.max() > 255):
            raise DensekitError(f"{what}: ground-truth ids must lie in 0..255")
        g = g.astype(np.uint8)
    if g.shape[0] < 3:
        raise DensekitError(
            f"{what}: {g.shape[0]} annotated frames; DAVIS scoring skips the first and the last, so at least 3 are needed"
        )
    num_objects = _num_objects(g[0])
    return np.stack([_clean_gt_frame(f, num_objects) for f in g]), num_objects


def _check_pred_frame(pred: np.ndarray, num_objects: int, where: str) -> None:
    top = int(pred.max()) if pred.size else 0
    if top > num_objects:
        hint = " (binary 0/255 masks must be saved as ids 0/1)" if top == 255 else ""
        raise DensekitError(
            f"{where} contains object id {top} but the first ground-truth frame has only {num_objects} "
            f"object(s){hint}"
        )


def evaluate_sequence(
    gt: np.ndarray, pred: np.ndarray, *, bound_th: float = BOUND_TH, workers: int | None = 1
) -> SequenceScores:
    """Score one sequence given as arrays.

    Args:
        gt: (T, H, W) uint8 GT ids (255 = void); T >= 3.
        pred: (T, H, W) uint8 predicted ids; frames 0 and T-1 are ignored.
        bound_th: boundary tolerance (fraction of the diagonal, or pixels when >= 1).
        workers: threads over frames (1 = in this thread; None = one per CPU).
    Returns:
        SequenceScores with (num_objects, T - 2) J and F.
    Raises:
        DensekitError: shapes differ, fewer than 3 frames, or a scored predicted frame holds an id
            above the first GT frame's largest id.
    """
    g, num_objects = _clean_gt(gt, "sequence")
    p = np.asarray(pred)
    if p.shape != g.shape:
        raise DensekitError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    if p.dtype == bool:
        p = p.astype(np.uint8)
    elif p.dtype != np.uint8:
        if p[1:-1].size and (p[1:-1].min() < 0 or p[1:-1].max() > 255):
            raise DensekitError(f"predicted ids must lie in 0..{num_objects}, got up to {int(p[1:-1].max())}")
        p = p.astype(np.uint8)
    for t in range(1, g.shape[0] - 1):
        _check_pred_frame(p[t], num_objects, f"predicted frame {t}")
    fp = _footprint(boundary_tolerance(g.shape, bound_th))
    frames = range(1, g.shape[0] - 1)

    def one(t: int) -> np.ndarray:
        return _frame_scores(g[t], np.ascontiguousarray(p[t]), num_objects, fp)

    n_workers = _resolve_workers(workers)
    if n_workers <= 1:
        per_frame = [one(t) for t in frames]
    else:
        with ThreadPoolExecutor(n_workers) as ex:
            per_frame = list(ex.map(one, frames))
    stacked = np.stack(per_frame, axis=-1) if per_frame else np.zeros((2, num_objects, 0))
    return SequenceScores(j=np.ascontiguousarray(stacked[0]), f=np.ascontiguousarray(stacked[1]))


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    return max(1, int(workers))


# ------------------------------------------------------------------------------------------------
# Whole dataset
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectScores:
    """One object of one sequence: its per-frame values and official statistics."""

    sequence: str
    object_id: int
    j: np.ndarray = field(repr=False)  # (T - 2,) float64
    f: np.ndarray = field(repr=False)  # (T - 2,) float64
    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float

    @property
    def name(self) -> str:
        """Official per-object row name ``<seq>_<k>``."""
        return f"{self.sequence}_{self.object_id}"

    @classmethod
    def from_values(cls, sequence: str, object_id: int, j: np.ndarray, f: np.ndarray) -> ObjectScores:
        jm, jr, jd = db_statistics(j)
        fm, fr, fd = db_statistics(f)
        return cls(sequence, object_id, j, f, jm, jr, jd, fm, fr, fd)


@dataclass(frozen=True)
class DavisEvalResult:
    """Result of :func:`evaluate_davis`: per-object scores in sequence order, plus timings."""

    objects: tuple[ObjectScores, ...]
    sequences: tuple[str, ...]
    split: str | None = None
    seconds: float = 0.0

    @property
    def global_row(self) -> dict[str, float]:
        """The official global row: each statistic averaged over all objects."""
        objs = self.objects

        def mean(attr: str) -> float:
            return float(np.mean([getattr(o, attr) for o in objs]))

        jm, fm = mean("j_mean"), mean("f_mean")
        return {
            "J&F-Mean": (jm + fm) / 2.0,
            "J-Mean": jm,
            "J-Recall": mean("j_recall"),
            "J-Decay": mean("j_decay"),
            "F-Mean": fm,
            "F-Recall": mean("f_recall"),
            "F-Decay": mean("f_decay"),
        }

    @property
    def per_sequence_rows(self) -> list[tuple[str, float, float]]:
        """Official per-sequence CSV rows: one per object, ``(<seq>_<k>, J-Mean, F-Mean)``."""
        return [(o.name, o.j_mean, o.f_mean) for o in self.objects]

    def sequence_means(self) -> list[tuple[str, float, float]]:
        """``(sequence, J, F)``: each sequence's object means averaged over its objects (for plots)."""
        rows = []
        for seq in self.sequences:
            objs = [o for o in self.objects if o.sequence == seq]
            if objs:
                rows.append((seq, float(np.mean([o.j_mean for o in objs])), float(np.mean([o.f_mean for o in objs]))))
        return rows


def _read_result_frame(path: Path, shape: tuple[int, int], num_objects: int, seq: str, name: str) -> np.ndarray:
    """A result PNG as (H, W) uint8 ids, read like the official (``np.array(Image.open(p))``)."""
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except FileNotFoundError:
        raise DensekitError(f"missing result frame {path} (sequence {seq!r}, frame {name})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DensekitError(f"cannot read result frame {path}: {msg}") from None
    if arr.ndim != 2:
        raise DensekitError(
            f"result frame {path} has shape {arr.shape}: save object ids as an indexed or grayscale PNG"
        )
    if arr.shape != shape:
        raise DensekitError(
            f"result frame {path} is {arr.shape[1]}x{arr.shape[0]} but the ground truth is {shape[1]}x{shape[0]}"
        )
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DensekitError(
                f"result frame {path} contains object id {int(arr.max())} but the first ground-truth frame of "
                f"{seq!r} has only {num_objects} object(s)"
            )
        arr = arr.astype(np.uint8)
    _check_pred_frame(arr, num_objects, f"result frame {path}")
    return np.ascontiguousarray(arr)


def evaluate_davis(
    root: str | os.PathLike[str],
    results_dir: str | os.PathLike[str],
    split: str | None = None,
    sequences: Iterable[str] | None = None,
    workers: int | None = None,
    *,
    bound_th: float = BOUND_TH,
) -> DavisEvalResult:
    """Official semi-supervised DAVIS J&F of ``results_dir/<seq>/<frame>.png`` against ``root``.

    Args:
        root: a DAVIS-2016 or -2017 folder (see ``densekit.serve.davis.DavisRoot``; 2016 0/255
            masks count as object 1).
        results_dir: one folder per sequence with a PNG of ids per GT frame name (the first and
            last frames may be missing: they are not scored).
        split: the ImageSets split to score (None: every sequence).
        sequences: explicit sequence names (overrides ``split``).
        workers: threads (None: one per CPU; 1: no pool).
        bound_th: boundary tolerance (official 0.008 of the diagonal).
    Raises:
        DensekitError: missing/odd result frames, size mismatch, a result id above the sequence's
            number of objects, no objects to score.
    """
    from densekit.serve.davis import DavisRoot

    t0 = time.perf_counter()
    davis = DavisRoot(root)
    seqs = list(sequences) if sequences is not None else list(davis.sequences(split))
    if not seqs:
        raise DensekitError(f"no sequences to evaluate in {root}" + (f" (split {split!r})" if split else ""))
    res_root = Path(results_dir)
    if not res_root.is_dir():
        raise DensekitError(f"results folder {res_root} not found")
    for seq in seqs:
        if not (res_root / seq).is_dir():
            raise DensekitError(f"results for sequence {seq!r} not found: no folder {res_root / seq}")

    n_workers = _resolve_workers(workers)

    def head(seq: str) -> tuple[list[Path], int, tuple[int, int]]:
        # Layout and the first frame's ids through DavisRoot (0/255 DAVIS-2016 masks -> id 1).
        annos = davis.annotation_paths(seq)
        n_frames = len(davis.frame_paths(seq))
        if len(annos) != n_frames:
            raise DensekitError(
                f"sequence {seq!r}: {n_frames - len(annos)} of {n_frames} frames have no annotation; "
                "ground truth needs one per frame"
            )
        if len(annos) < 3:
            raise DensekitError(
                f"sequence {seq!r}: {len(annos)} annotated frames; DAVIS scoring skips the first and the last, "
                "so at least 3 are needed"
            )
        first = davis.first_mask(seq)
        return annos, _num_objects(first), first.shape

    def score(seq: str, anno: Path, n_obj: int, shape: tuple[int, int], fp: np.ndarray) -> np.ndarray:
        # GT frame read with the same reader DavisRoot.read_gt uses, one frame at a time so that
        # frames decode in parallel and no sequence sits in memory whole.
        gt = read_mask(anno)
        if gt.shape != shape:
            raise DensekitError(
                f"sequence {seq!r}: {anno.name} is {gt.shape[1]}x{gt.shape[0]}, the first annotation is {shape[1]}x{shape[0]}"
            )
        gt = _clean_gt_frame(gt, n_obj)
        pred = _read_result_frame(res_root / seq / f"{anno.stem}.png", shape, n_obj, seq, anno.stem)
        return _frame_scores(gt, pred, n_obj, fp)

    per_seq: dict[str, tuple[int, list[np.ndarray]]] = {}
    if n_workers <= 1:
        for seq in seqs:
            annos, n_obj, shape = head(seq)
            fp = _footprint(boundary_tolerance(shape, bound_th))
            per_seq[seq] = (n_obj, [score(seq, a, n_obj, shape, fp) for a in annos[1:-1]])
    else:
        ex = ThreadPoolExecutor(n_workers)
        try:
            heads = [ex.submit(head, seq) for seq in seqs]
            jobs: list[tuple[str, int, list[Future[np.ndarray]]]] = []
            for seq, hf in zip(seqs, heads):
                annos, n_obj, shape = hf.result()
                fp = _footprint(boundary_tolerance(shape, bound_th))
                jobs.append((seq, n_obj, [ex.submit(score, seq, a, n_obj, shape, fp) for a in annos[1:-1]]))
            for seq, n_obj, futs in jobs:
                per_seq[seq] = (n_obj, [fu.result() for fu in futs])
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    objects: list[ObjectScores] = []
    for seq in seqs:
        n_obj, frames = per_seq[seq]
        stacked = np.stack(frames, axis=-1)  # (2, N, T-2)
        for k in range(n_obj):
            objects.append(ObjectScores.from_values(seq, k + 1, stacked[0, k].copy(), stacked[1, k].copy()))
    if not objects:
        raise DensekitError("no objects to evaluate: every first ground-truth frame is empty")
    return DavisEvalResult(tuple(objects), tuple(seqs), split, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------
# Output: CSVs, plot, tables
# ------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    # pandas ``to_csv(float_format="%.3f")`` as in the official evaluation_method.py; NaN -> ''.
    return "" if math.isnan(x) else "%.3f" % x


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([_fmt(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def write_csvs(result: DavisEvalResult, out_dir: str | os.PathLike[str], split: str | None = None) -> tuple[Path, Path]:
    """Write ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` (official
    names, columns and ``%.3f`` format) into ``out_dir``, atomically. ``split`` defaults to the
    result's split, else ``"all"``. Returns the two paths."""
    split = split or result.split or "all"
    out = Path(out_dir)
    g_path = out / f"global_results-{split}.csv"
    s_path = out / f"per-sequence_results-{split}.csv"
    g = result.global_row
    write_text_atomic(g_path, _csv_text(GLOBAL_COLUMNS, [[float(g[c]) for c in GLOBAL_COLUMNS]]))
    write_text_atomic(s_path, _csv_text(PER_SEQUENCE_COLUMNS, [[n, float(j), float(f)] for n, j, f in result.per_sequence_rows]))
    return g_path, s_path


def plot_per_sequence(result: DavisEvalResult, png_path: str | os.PathLike[str]) -> Path:
    """Bar chart of J-Mean and F-Mean per sequence (object means averaged within the sequence)
    with J&F as a marker, written atomically as PNG. Uses matplotlib's Agg canvas directly (no
    pyplot state, safe in threads and without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.sequence_means()
    names = [r[0] for r in rows]
    j = np.array([r[1] for r in rows])
    f = np.array([r[2] for r in rows])
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2.0), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x - 0.2, j, width=0.4, label="J (region)", color="#4C72B0")
    ax.bar(x + 0.2, f, width=0.4, label="F (boundary)", color="#DD8452")
    ax.plot(x, (j + f) / 2.0, "kD", markersize=5, label="J&F")
    g = result.global_row["J&F-Mean"]
    ax.axhline(g, color="0.4", linestyle="--", linewidth=1, label=f"global J&F {g:.3f}")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"DAVIS J&F per sequence ({len(result.objects)} objects)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    dest = Path(png_path)
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return dest


def format_table(result: DavisEvalResult, per_sequence: bool = True) -> str:
    """Plain-text tables: the global row, then (optionally) one row per object, official names."""
    g = result.global_row
    widths = [max(len(c), 8) for c in GLOBAL_COLUMNS]
    lines = ["  ".join(c.rjust(w) for c, w in zip(GLOBAL_COLUMNS, widths))]
    lines.append("  ".join(f"{g[c]:.3f}".rjust(w) for c, w in zip(GLOBAL_COLUMNS, widths)))
    if per_sequence:
        nw = max([len("Sequence")] + [len(o.name) for o in result.objects])
        lines.append("")
        lines.append(f"{'Sequence'.ljust(nw)}  {'J-Mean':>7}  {'F-Mean':>7}")
        for name, j, f in result.per_sequence_rows:
            lines.append(f"{name.ljust(nw)}  {j:7.3f}  {f:7.3f}")
    return "\n".join(lines)


def rich_tables(result: DavisEvalResult, per_sequence: bool = True) -> list[object]:
    """The same tables as :func:`format_table`, as ``rich.table.Table`` objects for the CLI."""
    from rich.table import Table

    g = result.global_row
    tg = Table(title=f"DAVIS semi-supervised ({len(result.sequences)} sequences, {len(result.objects)} objects)")
    for c in GLOBAL_COLUMNS:
        tg.add_column(c, justify="right")
    tg.add_row(*[f"{g[c]:.3f}" for c in GLOBAL_COLUMNS])
    tables: list[object] = [tg]
    if per_sequence:
        ts = Table(title="Per object")
        for c in PER_SEQUENCE_COLUMNS:
            ts.add_column(c, justify="left" if c == "Sequence" else "right")
        for name, j, f in result.per_sequence_rows:
            ts.add_row(name, f"{j:.3f}", f"{f:.3f}")
        tables.append(ts)
    return tables
