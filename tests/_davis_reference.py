"""A deliberately plain second reference for the DAVIS J&F semantics (tests and benchmarks only).

This is a literal, slow, per-frame restatement -- in our own words -- of what the official
``davisvideochallenge/davis2017-evaluation`` code (``davis2017/{davis,results,metrics,utils,
evaluation}.py`` and ``evaluation_method.py``, read at commit 30b698a and the notes for HEAD
ac7c43f) computes for the *semi-supervised* task. It keeps the official order of operations and
its cost structure (whole-frame float64 stacks, one-hot object stacks, full-frame boundary maps and
full-frame dilations, one object and one frame at a time, a single process), so the benchmark can
use it as the stand-in for the official evaluator. It shares no code with
``densekit.retrieval.davis_eval``.

Semantics restated:

* GT: every annotation PNG of the sequence (sorted names), read with ``np.array(Image.open(p))``
  into a float64 stack; value 255 (void) becomes 0. ``num_objects = int(max(first GT frame))``;
  object k's GT mask is ``stack == k`` (ids above num_objects in later frames belong to no object).
* Semi-supervised: the first and the last frame are dropped; results are read only for the rest.
* Results: float64 stack of the result PNG indices; ``n = int(max)``; n > num_objects is fatal
  (the official prints a message and exits); n < num_objects pads with empty object masks.
* J (``db_eval_iou``, void unused in semi-supervised): |S & G| / |S | G|, 1 when the union is 0.
* F (``f_measure``): tolerance ``ceil(0.008 * ||(H, W)||)`` px; boundaries by seg2bmap; each
  boundary dilated by ``cv2.dilate`` with ``skimage.morphology.disk(tolerance)``; precision =
  |pred_b & dil(gt_b)| / |pred_b|, recall = |gt_b & dil(pred_b)| / |gt_b|; no pred boundary and
  some GT boundary -> P=1, R=0; the reverse -> P=0, R=1; neither -> P=R=1; F = 2PR/(P+R), 0 if
  P+R = 0.
* Per object over its evaluated frames (``db_statistics``): mean = nanmean, recall = nanmean(v >
  0.5), decay from 4 bins with edges ``uint8(round(linspace(1, N, 5) + 1e-10) - 1)``, bin i =
  ``v[e_i : e_{i+1} + 1]``, decay = nanmean(bin 0) - nanmean(bin 3).
* Global: each of J/F mean/recall/decay is the mean over all objects of all sequences;
  J&F-Mean = (mean J-Mean + mean F-Mean) / 2.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage.morphology import disk

BOUND_TH = 0.008  # official default bound_th of db_eval_boundary


def plain_seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-px boundary map of a binary (H, W) mask, official seg2bmap semantics, per-pixel loops.

    Pixel (y, x) is on the boundary when it differs from its east, south or south-east neighbour
    (outside the image counts as 0); on the last row only the east neighbour is compared, on the
    last column only the south neighbour, and the bottom-right pixel is never a boundary. Only for
    small test images: O(H*W) Python.
    """
    seg = np.asarray(seg).astype(bool)
    h, w = seg.shape
    out = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            v = bool(seg[y, x])
            east = bool(seg[y, x + 1]) if x + 1 < w else False
            south = bool(seg[y + 1, x]) if y + 1 < h else False
            south_east = bool(seg[y + 1, x + 1]) if (y + 1 < h and x + 1 < w) else False
            if y == h - 1 and x == w - 1:
                out[y, x] = False
            elif y == h - 1:
                out[y, x] = v != east
            elif x == w - 1:
                out[y, x] = v != south
            else:
                out[y, x] = (v != east) or (v != south) or (v != south_east)
    return out


def shifted_seg2bmap(seg: np.ndarray) -> np.ndarray:
    """The same boundary map as :func:`plain_seg2bmap`, with whole-frame shifted copies (fast enough
    for 480p frames, like the official code)."""
    s = np.asarray(seg).astype(bool)
    east = np.zeros_like(s)
    south = np.zeros_like(s)
    south_east = np.zeros_like(s)
    east[:, :-1] = s[:, 1:]
    south[:-1, :] = s[1:, :]
    south_east[:-1, :-1] = s[1:, 1:]
    b = (s ^ east) | (s ^ south) | (s ^ south_east)
    b[-1, :] = s[-1, :] ^ east[-1, :]
    b[:, -1] = s[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def plain_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Region similarity J of two (H, W) binary masks; 1.0 when both are empty."""
    g = np.asarray(gt).astype(bool)
    p = np.asarray(pred).astype(bool)
    inter = np.sum(p & g)
    union = np.sum(p | g)
    if np.isclose(union, 0):
        return 1.0
    return float(inter / union)


def plain_f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of two (H, W) binary masks, whole-frame operations, official order."""
    p = np.asarray(pred).astype(bool)
    g = np.asarray(gt).astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(p.shape))
    pred_b = shifted_seg2bmap(p)
    gt_b = shifted_seg2bmap(g)
    footprint = disk(bound_pix).astype(np.uint8)
    pred_dil = cv2.dilate(pred_b.astype(np.uint8), footprint)
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), footprint)
    gt_match = gt_b * pred_dil
    pred_match = pred_b * gt_dil
    n_pred = np.sum(pred_b)
    n_gt = np.sum(gt_b)
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.sum(pred_match) / float(n_pred)
        recall = np.sum(gt_match) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def plain_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame values, official db_statistics semantics."""
    v = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(v)
        recall = np.nanmean(v > 0.5)
        # The official casts the bin edges to uint8 (they wrap past 255 evaluated frames).
        edges = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.uint8)
        bins = [v[edges[i] : edges[i + 1] + 1] for i in range(4)]
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(recall), float(decay)


class FatalOfficialExit(Exception):
    """Where the official evaluator prints a message and calls sys.exit()."""


def plain_evaluate_stacks(gt_stack: np.ndarray, res_stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-evaluated-frame J and F.

    gt_stack: (T, H, W) float64 GT ids of every frame (255 already turned into 0);
    res_stack: (T-2, H, W) float64 result ids of frames 1..T-2.
    Returns (J, F), each (num_objects, T-2) float64.
    """
    num_objects = int(np.max(gt_stack[0]))
    gt_eval = gt_stack[1:-1]
    gt_onehot = np.ones((num_objects, *gt_eval.shape)) * np.arange(1, num_objects + 1)[:, None, None, None]
    gt_onehot = gt_onehot == gt_eval[None]
    n_res = int(np.max(res_stack)) if res_stack.size else 0
    res_onehot = np.ones((n_res, *res_stack.shape)) * np.arange(1, n_res + 1)[:, None, None, None]
    res_onehot = res_onehot == res_stack[None]
    if n_res > num_objects:
        raise FatalOfficialExit("an index higher than the number of objects in the sequence")
    if n_res < num_objects:
        pad = np.zeros((num_objects - n_res, *res_onehot.shape[1:]), dtype=bool)
        res_onehot = np.concatenate([res_onehot, pad], axis=0)
    n_frames = gt_eval.shape[0]
    j = np.zeros((num_objects, n_frames))
    f = np.zeros((num_objects, n_frames))
    for k in range(num_objects):
        for t in range(n_frames):
            j[k, t] = plain_iou(gt_onehot[k, t], res_onehot[k, t])
        for t in range(n_frames):
            f[k, t] = plain_f_measure(res_onehot[k, t], gt_onehot[k, t])
    return j, f


def plain_evaluate_sequence(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) GT ids and (T, H, W) predicted ids -> (J, F), each (num_objects, T-2)."""
    gt_stack = np.asarray(gt).astype(np.float64)
    gt_stack[gt_stack == 255] = 0
    res_stack = np.asarray(pred)[1:-1].astype(np.float64)
    return plain_evaluate_stacks(gt_stack, res_stack)


def plain_evaluate_folders(
    annotations: Path, results: Path, sequences: list[str], binary_gt: bool = False
) -> dict[str, object]:
    """Read PNGs like the official evaluator and score every sequence.

    annotations/<seq>/*.png: GT (DAVIS-2017 palette ids, or 0/255 DAVIS-2016 masks when
    ``binary_gt``: those are turned into id 1 first, the densekit convention, because the official
    code would read them as void and score nothing). results/<seq>/<frame>.png: predicted ids.
    Returns {"global": {column: value}, "objects": {"<seq>_<k>": (JM, JR, JD, FM, FR, FD)},
    "frames": {"<seq>_<k>": (J frames, F frames)}}.
    """
    stats: dict[str, list[float]] = {key: [] for key in ("JM", "JR", "JD", "FM", "FR", "FD")}
    objects: dict[str, tuple[float, ...]] = {}
    frames: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for seq in sequences:
        paths = sorted((Path(annotations) / seq).glob("*.png"))
        first = np.array(Image.open(paths[0]))
        gt_stack = np.zeros((len(paths), *first.shape))
        names = []
        for i, p in enumerate(paths):
            gt_stack[i] = np.array(Image.open(p))
            if binary_gt:
                gt_stack[i][gt_stack[i] == 255] = 1
            else:
                gt_stack[i][gt_stack[i] == 255] = 0
            names.append(p.stem)
        eval_names = names[1:-1]
        res_first = np.array(Image.open(Path(results) / seq / f"{eval_names[0]}.png"))
        res_stack = np.zeros((len(eval_names), *res_first.shape))
        for i, name in enumerate(eval_names):
            res_stack[i] = np.array(Image.open(Path(results) / seq / f"{name}.png"))
        j, f = plain_evaluate_stacks(gt_stack, res_stack)
        for k in range(j.shape[0]):
            jm, jr, jd = plain_statistics(j[k])
            fm, fr, fd = plain_statistics(f[k])
            for key, val in zip(("JM", "JR", "JD", "FM", "FR", "FD"), (jm, jr, jd, fm, fr, fd)):
                stats[key].append(val)
            objects[f"{seq}_{k + 1}"] = (jm, jr, jd, fm, fr, fd)
            frames[f"{seq}_{k + 1}"] = (j[k], f[k])
    glob = {
        "J&F-Mean": (np.mean(stats["JM"]) + np.mean(stats["FM"])) / 2.0,
        "J-Mean": np.mean(stats["JM"]),
        "J-Recall": np.mean(stats["JR"]),
        "J-Decay": np.mean(stats["JD"]),
        "F-Mean": np.mean(stats["FM"]),
        "F-Recall": np.mean(stats["FR"]),
        "F-Decay": np.mean(stats["FD"]),
    }
    return {"global": {k: float(v) for k, v in glob.items()}, "objects": objects, "frames": frames}


# ------------------------------------------------------------------------------------------------
# Synthetic data shared by tests and the benchmark (not part of the reference semantics)
# ------------------------------------------------------------------------------------------------


def blobby_sequence(
    rng: np.random.Generator, frames: int, height: int, width: int, objects: int, *, always_present: bool = False
) -> np.ndarray:
    """(T, H, W) uint8 ids of smooth random blobs drifting across the frame (later ids occlude
    earlier ones). Blobs may leave the frame, touch its border, vanish for a few frames (unless
    ``always_present``), and some are tiny."""
    out = np.zeros((frames, height, width), np.uint8)
    for k in range(1, objects + 1):
        size = int(rng.choice([3, 6, max(4, min(height, width) // 3)]))
        noise = rng.random((size * 2 + 1, size * 2 + 1)).astype(np.float32)
        blob = cv2.GaussianBlur(noise, (0, 0), max(size / 3.0, 0.8))
        blob = blob > np.quantile(blob, 0.45)
        blob[size, size] = True
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        vy, vx = rng.normal(0, 2.0, 2)
        for t in range(frames):
            if not always_present and t > 0 and rng.random() < 0.1:
                continue
            y = int(round(cy + vy * t)) - size
            x = int(round(cx + vx * t)) - size
            if always_present:
                y = min(max(y, -size), height - size - 1)
                x = min(max(x, -size), width - size - 1)
            ys, xs = np.nonzero(blob)
            ys, xs = ys + y, xs + x
            keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            out[t, ys[keep], xs[keep]] = k
    return out


def perturb(rng: np.random.Generator, gt: np.ndarray, num_objects: int, *, drop: bool = True) -> np.ndarray:
    """A plausible prediction from GT ids: shifted, eroded or dilated, objects dropped (when
    ``drop``), a few ids swapped, a small false-positive blob. Ids stay within 0..num_objects."""
    gt = np.where(gt == 255, 0, gt).astype(np.uint8)
    gt[gt > num_objects] = 0
    pred = np.zeros_like(gt)
    kernel = np.ones((3, 3), np.uint8)
    for t in range(gt.shape[0]):
        m = gt[t]
        m = np.roll(m, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
        op = rng.integers(3)
        if op == 1:
            m = cv2.erode(m, kernel)
        elif op == 2:
            m = cv2.dilate(m, kernel)
        if drop and num_objects and rng.random() < 0.15:
            m = np.where(m == rng.integers(1, num_objects + 1), 0, m).astype(np.uint8)
        if num_objects > 1 and rng.random() < 0.1:
            a, b = rng.choice(np.arange(1, num_objects + 1), 2, replace=False)
            m = np.where(m == a, b, np.where(m == b, a, m)).astype(np.uint8)
        if num_objects and rng.random() < 0.2:
            y, x = int(rng.integers(0, m.shape[0])), int(rng.integers(0, m.shape[1]))
            m = m.copy()
            m[y : y + 4, x : x + 4] = rng.integers(1, num_objects + 1)
        pred[t] = m
    return pred


def save_ids_png(path: Path, ids: np.ndarray) -> None:
    """(H, W) uint8 ids as an indexed PNG (grey-ramp palette; only the indices matter)."""
    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def make_davis2017_root(
    root: Path, sequences: dict[str, np.ndarray], *, split: str = "val", jpeg_quality: int = 30
) -> Path:
    """Write a minimal DAVIS-2017 folder: black JPEG frames, indexed-PNG annotations, and
    ImageSets/2017/<split>.txt. ``sequences`` maps names to (T, H, W) uint8 GT ids."""
    for name, gt in sequences.items():
        black = np.zeros((*gt.shape[1:], 3), np.uint8)
        for t in range(gt.shape[0]):
            jp = root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
            jp.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(black).save(jp, quality=jpeg_quality)
            save_ids_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", gt[t])
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in sequences))
    return root


def write_results(results: Path, sequences: dict[str, np.ndarray], names: dict[str, list[str]] | None = None) -> Path:
    """Write predicted (T, H, W) ids as results/<seq>/<frame>.png."""
    for seq, pred in sequences.items():
        stems = names[seq] if names else [f"{t:05d}" for t in range(pred.shape[0])]
        for t in range(pred.shape[0]):
            save_ids_png(Path(results) / seq / f"{stems[t]}.png", pred[t])
    return Path(results)
