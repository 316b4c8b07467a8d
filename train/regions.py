"""Region hierarchies (ultrametric contour maps) from an edge map, for hierarchical-grouping pixel contrast.

Zhang and Maire ("Self-Supervised Visual Representation Learning from Hierarchical Grouping", NeurIPS 2020,
arXiv:2012.03044) turn a contour detector's output into a region tree (an ultrametric contour map, UCM:
Arbelaez, CVPR 2006; Arbelaez et al., TPAMI 2011) and sample pixel pairs from it. Their contour detector is
learned on BSDS; densekit has no such detector shipped, so the edge map here is a plain colour gradient
(Gaussian-smoothed Sobel magnitude, max over RGB, OpenCV) and the tree is higra's hierarchical watershed on
the 4-adjacency pixel graph (Najman, Cousty, Perret; higra: Perret et al., SoftwareX 2019). The tree is the
UCM: two pixels are in the same region of the partition at level ``t`` iff the altitude of their lowest common
ancestor (their *ultrametric distance*) is <= ``t``.

Altitudes are normalised to [0, 1] by the root altitude so that a level such as the paper's sigma_p = 0.8 means
"only the strongest 20 % of the contour range separates regions", as in a boundary-probability UCM. The default
watershed attribute is ``dynamics`` (a merge's altitude is the contrast of the shallower basin), the one whose
altitudes are contour strengths, i.e. closest to what a UCM from a contour detector holds.

Everything here is numpy/OpenCV/higra on CPU: it runs inside DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from densekit.serve.errors import DensekitError
from densekit.train.augment import cell_centres

Attribute = Literal["dynamics", "area", "volume"]
ATTRIBUTES: tuple[str, ...] = ("dynamics", "area", "volume")


def _higra() -> Any:
    try:
        import higra as hg
    except ImportError:
        raise DensekitError("the hiergroup objective needs the package higra (pip install higra)") from None
    return hg


def edge_map(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Colour gradient magnitude: Gaussian blur (``sigma`` px), Sobel x/y per RGB channel, max over channels.

    Args:
        image: (H, W, 3) uint8 RGB (or (H, W) grayscale).
    Returns:
        (H, W) float32 >= 0.
    """
    import cv2

    f = image.astype(np.float32) / 255.0
    if sigma > 0:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx * gx + gy * gy)
    return mag.max(axis=2) if mag.ndim == 3 else mag


@dataclass
class RegionHierarchy:
    """A region tree over the pixels of an (H, W) image, leaves = pixels in raster order.

    Attributes:
        tree: the higra ``Tree`` (leaves 0..H*W-1, then inner nodes, root last).
        altitudes: (num_nodes,) float64 in [0, 1]; leaves 0, root 1 (or all 0 for a flat image).
        shape: (H, W).
    """

    tree: Any
    altitudes: np.ndarray
    shape: tuple[int, int]

    def labels_at(self, level: float) -> np.ndarray:
        """(H, W) int32 region ids of the partition at ``level``: pixels whose ultrametric distance <= level share
        an id. Ids are 0..K-1."""
        hg = _higra()
        lab = hg.labelisation_horizontal_cut_from_threshold(self.tree, self.altitudes, float(level))
        _, ids = np.unique(np.asarray(lab).reshape(-1), return_inverse=True)
        return ids.reshape(self.shape).astype(np.int32)

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Ultrametric distance (altitude of the lowest common ancestor) between flat pixel indices ``a`` and
        ``b`` (same shape) -> float64 array of that shape."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        lca = self.tree.lowest_common_ancestor(a.reshape(-1), b.reshape(-1))
        return self.altitudes[np.asarray(lca)].reshape(a.shape)

    def top_merge_labels(self) -> np.ndarray:
        """(H, W) int32 0/1...: the partition just below the root, i.e. the regions the top merge joins."""
        below = self.altitudes[self.altitudes < self.altitudes[self.tree.root()]]
        level = float(below.max()) if below.size else 0.0
        return self.labels_at(level)


def build_hierarchy(image: np.ndarray, attribute: Attribute = "dynamics", sigma: float = 1.0) -> RegionHierarchy:
    """Region hierarchy of ``image``: edge map -> 4-adjacency graph (edge weight = mean of the two pixels' edge
    values) -> higra hierarchical watershed by ``attribute`` -> altitudes normalised by the root's.

    Args:
        image: (H, W, 3) uint8 RGB.
        attribute: ``dynamics`` (default), ``area`` or ``volume`` (higra ``watershed_hierarchy_by_*``).
        sigma: Gaussian smoothing of the edge map, in pixels.
    Returns:
        :class:`RegionHierarchy`.
    """
    hg = _higra()
    if attribute not in ATTRIBUTES:
        raise DensekitError(f"unknown watershed attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    edges = edge_map(image, sigma)
    shape = (int(edges.shape[0]), int(edges.shape[1]))
    graph = hg.get_4_adjacency_graph(shape)
    weights = hg.weight_graph(graph, edges, hg.WeightFunction.mean)
    fn = {"dynamics": hg.watershed_hierarchy_by_dynamics, "area": hg.watershed_hierarchy_by_area,
          "volume": hg.watershed_hierarchy_by_volume}[attribute]
    tree, altitudes = fn(graph, weights)
    altitudes = np.asarray(altitudes, dtype=np.float64)
    top = float(altitudes.max()) if altitudes.size else 0.0
    if top > 0:
        altitudes = altitudes / top
    return RegionHierarchy(tree=tree, altitudes=altitudes, shape=shape)


def ucm_image(hierarchy: RegionHierarchy) -> np.ndarray:
    """The ultrametric contour map as an (H, W) float32 image: each pixel holds the largest ultrametric distance
    to its right/bottom neighbour (0 inside regions, the contour's level on region boundaries). For inspection."""
    h, w = hierarchy.shape
    idx = np.arange(h * w).reshape(h, w)
    out = np.zeros((h, w), np.float32)
    if w > 1:
        out[:, :-1] = np.maximum(out[:, :-1], hierarchy.distance(idx[:, :-1], idx[:, 1:]))
    if h > 1:
        out[:-1, :] = np.maximum(out[:-1, :], hierarchy.distance(idx[:-1, :], idx[1:, :]))
    return out


# ----------------------------------------------------------------------------------------------------
# Pair sampling on view grids
# ----------------------------------------------------------------------------------------------------


def grid_labels(labels: np.ndarray, frame_hw: tuple[int, int], box: tuple[float, float, float, float],
                grid_hw: tuple[int, int]) -> np.ndarray:
    """Region id under the centre of every cell of a view's feature grid.

    Args:
        labels: (h0, w0) region ids of the frame (possibly computed on a downscaled copy of it).
        frame_hw: the frame's (H, W) in pixels (``box`` is in these coordinates).
        box: the view's crop (x_left, y_top, x_right, y_bottom); x_left > x_right for a flipped view.
        grid_hw: (h, w) of the view's feature grid (cells tile the view evenly).
    Returns:
        (h, w) int32 region ids.
    """
    H, W = frame_hw
    h0, w0 = labels.shape
    xs, ys = cell_centres(box, grid_hw)
    cols = np.clip(np.floor(xs * w0 / W).astype(np.int64), 0, w0 - 1)
    rows = np.clip(np.floor(ys * h0 / H).astype(np.int64), 0, h0 - 1)
    return labels[rows[:, None], cols[None, :]].astype(np.int32)


def sample_region_pairs(labels1: np.ndarray, labels2: np.ndarray, rng: np.random.Generator, regions: int = 7,
                        positives: int = 10, negatives: int = 5) -> dict[str, np.ndarray]:
    """Positive and negative cells across two views from the partition at sigma_p (our reading of Zhang and
    Maire's Eq. 2 and 3: a positive pair lies in one region of the partition at level sigma_p, i.e. its
    ultrametric distance is <= sigma_p; a negative lies in another region, distance > sigma_p).

    ``regions`` region ids present in both views are drawn uniformly (without replacement when there are
    enough, else with replacement); per region, ``positives`` anchors in view 1 and as many positives in view 2
    are drawn uniformly from the region's cells; per anchor, ``negatives`` cells of view 2 outside the region.

    Args:
        labels1, labels2: (h, w) region ids of the cells of view 1 and view 2 (see :func:`grid_labels`).
    Returns:
        ``anchor`` (R*P,) int64 flat cell index in view 1; ``positive`` (R*P,) int64 in view 2; ``negative``
        (R*P, N) int64 in view 2; ``valid`` (R*P,) float32 (0 where the views share no region);
        ``neg_valid`` (R*P, N) float32 (0 where view 2 holds a single region); ``region`` (R*P,) int64 ids
        (-1 when invalid). R = regions, P = positives, N = negatives.
    """
    n = regions * positives
    f1, f2 = labels1.reshape(-1), labels2.reshape(-1)
    out = {
        "anchor": np.zeros(n, np.int64), "positive": np.zeros(n, np.int64),
        "negative": np.zeros((n, negatives), np.int64), "valid": np.zeros(n, np.float32),
        "neg_valid": np.zeros((n, negatives), np.float32), "region": np.full(n, -1, np.int64),
    }
    common = np.intersect1d(np.unique(f1), np.unique(f2))
    if common.size == 0 or n == 0:
        return out
    chosen = rng.choice(common, size=regions, replace=common.size < regions)
    for r_i, r in enumerate(chosen):
        sl = slice(r_i * positives, (r_i + 1) * positives)
        in1 = np.flatnonzero(f1 == r)
        in2 = np.flatnonzero(f2 == r)
        out2 = np.flatnonzero(f2 != r)
        out["anchor"][sl] = rng.choice(in1, size=positives)
        out["positive"][sl] = rng.choice(in2, size=positives)
        out["valid"][sl] = 1.0
        out["region"][sl] = r
        if out2.size and negatives:
            out["negative"][sl] = rng.choice(out2, size=(positives, negatives))
            out["neg_valid"][sl] = 1.0
    return out
