"""Click -> mask: superpixels with pooled dense features, a similarity threshold, the parts under the clicks.

numpy, SciPy, scikit-image and OpenCV only (no Gradio, no model): :func:`click_mask` takes a frame and its
features, so it is unit-tested on synthetic features (tests/test_app_selection.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from densekit.serve.errors import DensekitError


WORK_MAX_SIDE = 640  # superpixels for click selection are computed at most at this size


@dataclass(frozen=True)
class Click:
    """A click at pixel (x = column, y = row) of a frame; ``positive`` adds, negative removes."""

    x: float
    y: float
    positive: bool = True


@dataclass
class FrameRegions:
    """Superpixels of one frame with their mean dense feature.

    labels: (Hs, Ws) int superpixel ids at the work resolution (longer side <= ``WORK_MAX_SIDE``).
    descriptors: (n, D) float32, each the L2-normalised mean feature over its superpixel.
    frame_size: (H, W) of the frame the clicks refer to.
    """

    labels: np.ndarray
    descriptors: np.ndarray
    frame_size: tuple[int, int]

    def at(self, click: Click) -> tuple[int, int]:
        """(row, col) of a click on the work grid."""
        H, W = self.frame_size
        hs, ws = self.labels.shape
        return min(max(int(click.y * hs / H), 0), hs - 1), min(max(int(click.x * ws / W), 0), ws - 1)


def frame_regions(
    frame: np.ndarray,
    feats: np.ndarray,
    *,
    n_segments: int = 400,
    compactness: float = 10.0,
    max_side: int = WORK_MAX_SIDE,
) -> FrameRegions:
    """SLIC superpixels (Achanta et al., TPAMI 2012; scikit-image) of ``frame`` with pooled ``feats`` (D, h, w).

    Each superpixel's descriptor is the area-weighted mean of the feature cells its pixels fall in, so a
    superpixel follows image edges while its descriptor is less noisy than one feature cell.
    """
    import cv2
    from scipy import sparse
    from skimage.segmentation import slic

    H, W = frame.shape[:2]
    s = min(1.0, max_side / max(H, W))
    work = (
        frame
        if s >= 1.0
        else cv2.resize(frame, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
    )
    labels = slic(work, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1).astype(np.int64)
    D, h, w = feats.shape
    hs, ws = labels.shape
    rows = (np.arange(hs) * h // hs)[:, None]
    cols = (np.arange(ws) * w // ws)[None, :]
    cells = (rows * w + cols).ravel()
    n = int(labels.max()) + 1
    pool = sparse.coo_matrix((np.ones(cells.size, np.float32), (labels.ravel(), cells)), shape=(n, h * w)).tocsr()
    desc = np.asarray(pool @ feats.reshape(D, h * w).T, dtype=np.float32)
    desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    return FrameRegions(labels.astype(np.int32), desc, (H, W))


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


def select_region(
    regions: FrameRegions,
    clicks: Sequence[Click],
    base: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
) -> np.ndarray:
    """The (H, W) bool region an object covers after ``clicks`` (positive and negative), starting from ``base``.

    Positive side: each superpixel scores its best cosine similarity to the superpixels under positive
    clicks; superpixels scoring at least the threshold (Otsu's over all superpixels when ``threshold`` is
    None or 0) and not closer to a negative click are kept, and of those the connected parts under the
    positive clicks are added. Negative side: the same with the roles swapped, subtracted. A clicked
    superpixel always belongs to its own side. ``base`` (H, W) bool is the object's mask before the clicks
    (its mask on this frame, e.g. a propagated one being corrected).
    """
    import cv2

    H, W = regions.frame_size
    labels, desc = regions.labels, regions.descriptors
    n = desc.shape[0]
    pos = [regions.at(c) for c in clicks if c.positive]
    neg = [regions.at(c) for c in clicks if not c.positive]
    pos_sp = np.array([labels[r, c] for r, c in pos], dtype=np.int64)
    neg_sp = np.array([labels[r, c] for r, c in neg], dtype=np.int64)
    ps = (desc @ desc[pos_sp].T).max(1) if pos_sp.size else np.full(n, -np.inf, np.float32)
    ns = (desc @ desc[neg_sp].T).max(1) if neg_sp.size else np.full(n, -np.inf, np.float32)
    thr = float(threshold) if threshold else None
    out = np.zeros((H, W), bool) if base is None else np.asarray(base, bool).copy()
    if out.shape != (H, W):
        raise DensekitError(f"base mask is {out.shape[1]}x{out.shape[0]}, the frame is {W}x{H}")

    def side(score: np.ndarray, other: np.ndarray, own: np.ndarray, against: np.ndarray, points: list) -> np.ndarray:
        keep = (score >= (thr if thr is not None else _otsu(score))) & (score >= other)
        keep[against] = False
        keep[own] = True
        grown = _parts_under(keep[labels], points).astype(np.uint8)
        return cv2.resize(grown, (W, H), interpolation=cv2.INTER_NEAREST).astype(bool)

    if pos_sp.size:
        out |= side(ps, ns, pos_sp, neg_sp, pos)
    if neg_sp.size:
        out &= ~side(ns, np.nextafter(ps, np.inf), neg_sp, pos_sp, neg)
    return out


def click_mask(
    frame: np.ndarray,
    feats: np.ndarray,
    clicks: Sequence[Click],
    base: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
) -> np.ndarray:
    """Clicks on ``frame`` (H, W, 3) uint8 with its features (D, h, w) -> the object's (H, W) bool mask.

    :func:`frame_regions` then :func:`select_region` (the app caches the regions of the shown frame).
    """
    return select_region(frame_regions(frame, feats), clicks, base=base, threshold=threshold)


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
