"""Click -> mask: dense-feature similarity against a frame-border background, refined by a GrabCut band.

numpy, SciPy, scikit-image and OpenCV only (no Gradio, no model): :func:`select` takes a frame's
:class:`FrameRegions` (the frame and its features), so it is unit-tested on synthetic features
(tests/test_app_selection.py) and measured on DAVIS first frames (benchmarks/click_iou.py).

Methods (``method=``), one-click mean IoU on davis2016-val12 first frames (benchmarks/click_iou.py):

* ``"grabcut"`` (default): feature cells are foreground when they are more like the cells under the
  positive clicks than like any frame-border cell (objects rarely fill the frame's border; most of the
  gain over the old method comes from this background model); a second pass takes the first region's
  core as foreground examples and sampled cells far outside it as background; the connected part under
  the clicks is then refined by OpenCV's GrabCut (Rother et al., SIGGRAPH 2004) in a band around its
  edge (colour models snap the coarse 8-px cells to the object's outline).
* ``"superpixels"``: the earlier method: SLIC superpixels with pooled features, an Otsu threshold on
  the similarity to the clicked superpixels, the connected parts under the clicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

import numpy as np

from densekit.serve.errors import DensekitError


WORK_MAX_SIDE = 640  # superpixels for click selection are computed at most at this size
GRABCUT_MAX_SIDE = 427  # GrabCut refines at most at this size (about 0.2 s a click on one core at 480p)
METHODS = ("grabcut", "superpixels")
DEFAULT_METHOD = "grabcut"
WIDE_AREA = 0.40  # a selection over this fraction of the frame gets a hint (it has likely taken the scene)
_CLICK_CELLS = 1  # foreground examples: the (2r+1)^2 feature cells around a positive click...
_MAX_CLICK_CELLS = 2  # ...r growing with how deep the click sits in the first region
_BAND_CELLS = 3.0  # GrabCut decides within this many feature cells of the coarse region's edge
_FAR_SAMPLE = 0.1  # share of the cells far outside the first region taken as background examples (0.3: 0.662, 0: 0.587)


@dataclass(frozen=True)
class Click:
    """A click at pixel (x = column, y = row) of a frame; ``positive`` adds, negative removes."""

    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True)
class Selection:
    """The result of clicks: ``mask`` (H, W) bool and ``area``, the fraction of the frame it covers."""

    mask: np.ndarray
    area: float


@dataclass
class FrameRegions:
    """One frame prepared for clicks: its work-size picture and dense features, superpixels on demand.

    work: (Hs, Ws, 3) uint8 RGB, the frame resized so its longer side is <= ``max_side``.
    feats: (D, h, w) float32 unit-norm features of the frame.
    frame_size: (H, W) of the frame the clicks refer to.
    labels: (Hs, Ws) int32 SLIC superpixel ids; descriptors: (n, D) float32, each the L2-normalised mean
    feature over its superpixel (both computed on first use: only the ``"superpixels"`` method needs them).
    """

    work: np.ndarray
    feats: np.ndarray
    frame_size: tuple[int, int]
    n_segments: int = 400
    compactness: float = 10.0
    cache: dict = field(default_factory=dict, repr=False)  # clicks -> work-size mask, for the next click

    @cached_property
    def _superpixels(self) -> tuple[np.ndarray, np.ndarray]:
        from scipy import sparse
        from skimage.segmentation import slic

        labels = slic(
            self.work, n_segments=self.n_segments, compactness=self.compactness, start_label=0, channel_axis=-1
        ).astype(np.int64)
        D, h, w = self.feats.shape
        hs, ws = labels.shape
        cells = ((np.arange(hs) * h // hs)[:, None] * w + (np.arange(ws) * w // ws)[None, :]).ravel()
        n = int(labels.max()) + 1
        pool = sparse.coo_matrix((np.ones(cells.size, np.float32), (labels.ravel(), cells)), shape=(n, h * w))
        desc = np.asarray(pool.tocsr() @ self.feats.reshape(D, h * w).T, dtype=np.float32)
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        return labels.astype(np.int32), desc

    @property
    def labels(self) -> np.ndarray:
        return self._superpixels[0]

    @property
    def descriptors(self) -> np.ndarray:
        return self._superpixels[1]

    def at(self, click: Click) -> tuple[int, int]:
        """(row, col) of a click on the work grid."""
        return _grid(click, self.frame_size, self.work.shape[:2])

    def cell(self, click: Click) -> tuple[int, int]:
        """(row, col) of a click on the feature grid."""
        return _grid(click, self.frame_size, self.feats.shape[1:])


def _grid(click: Click, size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    (H, W), (h, w) = size, grid
    return min(max(int(click.y * h / H), 0), h - 1), min(max(int(click.x * w / W), 0), w - 1)


def frame_regions(
    frame: np.ndarray,
    feats: np.ndarray,
    *,
    n_segments: int = 400,
    compactness: float = 10.0,
    max_side: int = WORK_MAX_SIDE,
) -> FrameRegions:
    """``frame`` (H, W, 3) uint8 with its ``feats`` (D, h, w), ready for :func:`select`.

    The superpixels (SLIC, Achanta et al., TPAMI 2012; scikit-image) are made at ``max_side`` when the
    ``"superpixels"`` method first asks for them: each superpixel's descriptor is the area-weighted mean of
    the feature cells its pixels fall in, so it follows image edges and is less noisy than one cell.
    """
    import cv2

    if frame.ndim != 3 or frame.shape[2] != 3 or feats.ndim != 3:
        raise DensekitError(f"need an (H, W, 3) frame and (D, h, w) features, got {frame.shape} and {feats.shape}")
    H, W = frame.shape[:2]
    s = min(1.0, max_side / max(H, W))
    work = (
        frame
        if s >= 1.0
        else cv2.resize(frame, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
    )
    f = np.asarray(feats, np.float32)
    return FrameRegions(np.ascontiguousarray(work), f, (H, W), n_segments, compactness)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    finite = values[np.isfinite(values)]
    if finite.size < 2 or float(finite.max() - finite.min()) < 1e-6:
        return float(finite.min()) if finite.size else 0.0
    return float(threshold_otsu(finite))


def _parts_under(keep: np.ndarray, points: Sequence[tuple[int, int]]) -> np.ndarray:
    """Connected parts (4-neighbourhood) of the (Hs, Ws) bool ``keep`` that contain one of ``points``."""
    from scipy import ndimage

    lab, _ = ndimage.label(keep)
    ids = {int(lab[r, c]) for r, c in points if lab[r, c] > 0}
    return np.isin(lab, list(ids)) if ids else np.zeros_like(keep)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    H, W = size
    if mask.shape == (H, W):
        return mask.astype(bool)
    return cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)


def _superpixel_select(
    regions: FrameRegions, clicks: Sequence[Click], out: np.ndarray, threshold: Optional[float]
) -> np.ndarray:
    """The ``"superpixels"`` method: ``out`` (H, W) bool changed by ``clicks`` (see :func:`select`)."""
    labels, desc = regions.labels, regions.descriptors
    n = desc.shape[0]
    pos = [regions.at(c) for c in clicks if c.positive]
    neg = [regions.at(c) for c in clicks if not c.positive]
    pos_sp = np.array([labels[r, c] for r, c in pos], dtype=np.int64)
    neg_sp = np.array([labels[r, c] for r, c in neg], dtype=np.int64)
    ps = (desc @ desc[pos_sp].T).max(1) if pos_sp.size else np.full(n, -np.inf, np.float32)
    ns = (desc @ desc[neg_sp].T).max(1) if neg_sp.size else np.full(n, -np.inf, np.float32)

    def side(score: np.ndarray, other: np.ndarray, own: np.ndarray, against: np.ndarray, points: list) -> np.ndarray:
        keep = (score >= (threshold if threshold is not None else _otsu(score))) & (score >= other)
        keep[against] = False
        keep[own] = True
        return _resize_mask(_parts_under(keep[labels], points), regions.frame_size)

    if pos_sp.size:
        out |= side(ps, ns, pos_sp, neg_sp, pos)
    if neg_sp.size:
        out &= ~side(ns, np.nextafter(ps, np.inf), neg_sp, pos_sp, neg)
    return out


def _squares(shape: tuple[int, int], points: Sequence[tuple[int, int]], radius: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    for r, c in points:
        m[max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1] = True
    return m


def _margin(feats: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(h, w) best cosine similarity to the ``fg`` cells minus best to the ``bg`` cells (both (h, w) bool)."""
    D = feats.shape[0]
    F = feats.reshape(D, -1)
    worst = np.full(F.shape[1], -1.0, np.float32)
    a = (F[:, fg.ravel()].T @ F).max(0) if fg.any() else worst
    b = (F[:, bg.ravel()].T @ F).max(0) if bg.any() else worst
    return (a - b).reshape(feats.shape[1:])


def _coarse_score(
    feats: np.ndarray, pos: list[tuple[int, int]], neg: list[tuple[int, int]], prior: Optional[np.ndarray]
) -> np.ndarray:
    """(h, w) float: > 0 where a feature cell looks like the object (see the module docstring).

    pos, neg: feature-grid cells of the clicks; prior: (h, w) bool, the object before the last click
    (None for a first click: then a first pass against the border alone makes it).
    """
    from scipy import ndimage

    h, w = feats.shape[1:]
    border = np.ones((h, w), bool)
    border[1:-1, 1:-1] = False
    own = _squares((h, w), pos, _CLICK_CELLS)
    against = _squares((h, w), neg, _CLICK_CELLS) | (border & ~own)
    if prior is None:
        first = _parts_under((_margin(feats, own, against) > 0) | own, pos)
        depth = ndimage.distance_transform_edt(np.pad(first, 1))[1:-1, 1:-1]
        for r, c in pos:  # a click deep inside a large region: take more examples around it
            k = int(min(_MAX_CLICK_CELLS, max(_CLICK_CELLS, 0.5 * depth[r, c])))
            own |= _squares((h, w), [(r, c)], k)
        against &= ~own
        prior = _parts_under((_margin(feats, own, against) > 0) | own, pos)
    core = ndimage.binary_erosion(prior) | own
    far = ~ndimage.binary_dilation(prior | own, iterations=2)
    sample = np.random.default_rng(0).random((h, w)) < _FAR_SAMPLE  # fixed seed: the same clicks, the same mask
    core &= ~_squares((h, w), neg, _CLICK_CELLS)
    return _margin(feats, core, against | (far & sample))


def _grabcut_band(
    work: np.ndarray, coarse: np.ndarray, points: list[tuple[int, int, bool]], band: int
) -> np.ndarray:
    """GrabCut of ``work`` (Hs, Ws, 3) RGB within ``band`` px of the edge of ``coarse`` (Hs, Ws) bool.

    Inside the band the colour models decide; deeper inside is sure foreground, farther out sure background;
    ``points`` (row, col, positive) are sure of their side. Only the box around the band is cut (speed).
    """
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    c8 = coarse.astype(np.uint8)
    m = np.full(coarse.shape, cv2.GC_BGD, np.uint8)
    m[cv2.dilate(c8, k).astype(bool)] = cv2.GC_PR_BGD
    m[coarse] = cv2.GC_PR_FGD
    m[cv2.erode(c8, k).astype(bool)] = cv2.GC_FGD
    for r, c, positive in points:
        cv2.circle(m, (c, r), max(2, band // 2), int(cv2.GC_FGD if positive else cv2.GC_BGD), -1)
    ys, xs = np.nonzero(m != cv2.GC_BGD)
    if ys.size == 0:
        return coarse
    pad = 2 * band
    y0, y1 = max(0, ys.min() - pad), min(m.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(m.shape[1], xs.max() + pad + 1)
    sub = np.ascontiguousarray(m[y0:y1, x0:x1])
    unsure = (sub == cv2.GC_PR_FGD) | (sub == cv2.GC_PR_BGD)
    sure_fg, sure_bg = (sub == cv2.GC_FGD).any(), (sub == cv2.GC_BGD).any()
    if unsure.any() and sure_fg and sure_bg:  # GrabCut needs samples of both sides for its colour models
        bgr = np.ascontiguousarray(work[y0:y1, x0:x1, ::-1])
        cv2.setRNGSeed(0)  # GrabCut seeds its colour models by k-means on OpenCV's global RNG: same clicks, same mask
        cv2.grabCut(bgr, sub, None, np.zeros((1, 65)), np.zeros((1, 65)), 2, cv2.GC_INIT_WITH_MASK)
        m[y0:y1, x0:x1] = sub
    return (m == cv2.GC_FGD) | (m == cv2.GC_PR_FGD)


def _grabcut_select(regions: FrameRegions, clicks: Sequence[Click], base: np.ndarray) -> np.ndarray:
    """The ``"grabcut"`` method at the GrabCut work size: (Hg, Wg) bool (see :func:`select`).

    The result of all clicks but the last is the prior of the last one (cached per click list), so a further
    click corrects the object it was made on rather than starting again.
    """
    import cv2

    key = (tuple(clicks), base.tobytes() if base.any() else b"")
    if key in regions.cache:
        return regions.cache[key]
    feats, (H, W) = regions.feats, regions.frame_size
    h, w = feats.shape[1:]
    s = min(1.0, GRABCUT_MAX_SIDE / max(H, W))
    gh, gw = max(1, round(H * s)), max(1, round(W * s))
    work = regions.work if regions.work.shape[:2] == (gh, gw) else cv2.resize(regions.work, (gw, gh), interpolation=cv2.INTER_AREA)
    prev = _grabcut_select(regions, clicks[:-1], base) if len(clicks) > 1 else _resize_mask(base, (gh, gw))
    pos = [regions.cell(c) for c in clicks if c.positive]
    neg = [regions.cell(c) for c in clicks if not c.positive]
    prior = _resize_mask(prev, (h, w)) if prev.any() else None
    if prior is not None and neg:  # the part of the prior a negative click is on, where it is more like it
        gone = _parts_under(prior & (_margin(feats, _squares((h, w), neg, 0), _squares((h, w), pos, 0)) > 0), neg)
        prior &= ~gone
        if not pos:  # nothing to grow from: the prior less what the negative clicks took
            out = prev & ~_resize_mask(gone, (gh, gw))
            regions.cache[key] = out
            return out
        prior = prior if prior.any() else None
    score = _coarse_score(feats, pos, neg, prior)
    fine = cv2.resize(score.astype(np.float32), (gw, gh), interpolation=cv2.INTER_LINEAR) > 0
    points = [(*_grid(c, (H, W), (gh, gw)), c.positive) for c in clicks]
    for r, c, positive in points:
        fine[r, c] = positive
    anchors = [(r, c) for r, c, p in points if p]
    coarse = _parts_under(fine, anchors)
    out = _parts_under(_grabcut_band(work, coarse, points, max(2, int(round(_BAND_CELLS * gw / w)))), anchors)
    if len(regions.cache) > 64:
        regions.cache.clear()
    regions.cache[key] = out
    return out


def select(
    regions: FrameRegions,
    clicks: Sequence[Click],
    base: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
    method: str = DEFAULT_METHOD,
) -> Selection:
    """The region an object covers after ``clicks`` (positive and negative), starting from ``base``.

    ``base`` (H, W) bool is the object's mask before the clicks (its mask on this frame, e.g. a propagated
    one being corrected). ``method``: see the module docstring. A fixed similarity ``threshold`` (the app's
    slider; None or 0 = automatic) applies to the superpixel similarity, so it selects that method.
    -> :class:`Selection` (mask (H, W) bool, area fraction).
    """
    H, W = regions.frame_size
    out = np.zeros((H, W), bool) if base is None else np.asarray(base, bool).copy()
    if out.shape != (H, W):
        raise DensekitError(f"base mask is {out.shape[1]}x{out.shape[0]}, the frame is {W}x{H}")
    if method not in METHODS:
        raise DensekitError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    if threshold or method == "superpixels":
        out = _superpixel_select(regions, clicks, out, float(threshold) if threshold else None)
    elif clicks:
        out = _resize_mask(_grabcut_select(regions, list(clicks), out), (H, W))
    return Selection(out, float(out.mean()) if out.size else 0.0)


def select_region(
    regions: FrameRegions,
    clicks: Sequence[Click],
    base: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
    method: str = DEFAULT_METHOD,
) -> np.ndarray:
    """:func:`select`'s (H, W) bool mask only."""
    return select(regions, clicks, base=base, threshold=threshold, method=method).mask


def click_mask(
    frame: np.ndarray,
    feats: np.ndarray,
    clicks: Sequence[Click],
    base: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
    method: str = DEFAULT_METHOD,
) -> np.ndarray:
    """Clicks on ``frame`` (H, W, 3) uint8 with its features (D, h, w) -> the object's (H, W) bool mask.

    :func:`frame_regions` then :func:`select_region` (the app caches the regions of the shown frame).
    """
    return select_region(frame_regions(frame, feats), clicks, base=base, threshold=threshold, method=method)


def area_note(area: float) -> str:
    """The words the app adds after a click: the share of the frame the object covers, and a hint when
    that share is over ``WIDE_AREA`` (one click then has most likely taken the background too)."""
    note = f" It covers {100 * area:.0f} % of the frame."
    if area > WIDE_AREA:
        note += " That is most of the frame: click Negative on what does not belong, or click nearer the object's middle."
    return note


def brush_region(editor_value: Any, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool area painted in a ``gr.ImageEditor`` value (any layer's non-transparent pixels)."""
    import cv2

    H, W = size
    out = np.zeros((H, W), bool)
    layers = (editor_value or {}).get("layers") if isinstance(editor_value, dict) else None
    for layer in layers or []:
        if layer is None:
            continue
        arr = np.asarray(layer)
        if arr.ndim == 3 and arr.shape[2] == 4:
            painted = arr[:, :, 3] > 0
        elif arr.ndim == 3:
            painted = arr.any(axis=2)
        else:
            painted = arr > 0
        if painted.shape != (H, W):
            painted = cv2.resize(painted.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)
        out |= painted
    return out


def fit_mask(mask: np.ndarray, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A (h, w) id mask resized (nearest) to ``size`` when the aspect ratios agree; else DensekitError."""
    import cv2

    H, W = size
    h, w = mask.shape[:2]
    if (h, w) == (H, W):
        return mask
    if abs(h / w - H / W) > 0.01 * (H / W):
        raise DensekitError(f"the {what} is {w}x{h} but the video is {W}x{H}")
    return cv2.resize(mask.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
