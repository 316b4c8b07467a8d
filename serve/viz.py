"""Pictures for people: dense features as RGB, region outlines, and a contact sheet of search hits.

:func:`pca_rgb`, as in Zhang and Maire's hierarchical-grouping paper (Figure 2) and DINO's feature
visualisations: project every cell's feature on the top three principal directions of that image's features
and show them as colour, so that cells the backbone thinks alike look alike.

:func:`outline` and :func:`write_grid` draw regions (a query region, the segments a search found) as outlines
for the web app, ``densekit index search --grid`` and the demo's report. They take hits by their attributes
(``path``, ``mask``, ``score``, ``image_id``, as :class:`densekit.retrieval.segment_index.Hit` has them), so
this module stays on the ground floor. numpy at import time; OpenCV inside the functions (serve/ must import
without torch or cv2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError

QUERY_COLOUR = (255, 255, 0)  # yellow: the query region
HIT_COLOUR = (0, 255, 0)  # green: a segment found


class HitLike(Protocol):
    """What :func:`write_grid` reads of a search hit."""

    image_id: int
    path: str | None
    score: float
    mask: np.ndarray


def pca_rgb(feats: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """First three principal components of a feature map as an RGB picture.

    feats: (D, h, w) float features (any scale). size: (H, W) to resize to (nearest, so cells stay
    visible), or None for (h, w). Returns (H, W, 3) uint8. Each component is scaled by its own 1st and
    99th percentile, so one outlier cell cannot wash out the picture. The sign of each component is
    chosen so that its largest loading is positive, which makes the colours repeatable for one input.
    """
    if feats.ndim != 3:
        raise DensekitError(f"pca_rgb needs features of shape (D, h, w), got {tuple(feats.shape)}")
    d, h, w = feats.shape
    x = feats.reshape(d, h * w).T.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    # Economy SVD of the (cells, D) matrix: the right singular vectors are the principal directions.
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:3]
    if comps.shape[0] < 3:  # D < 3: pad with zero directions (grey channels)
        comps = np.concatenate([comps, np.zeros((3 - comps.shape[0], d))], axis=0)
    signs = np.sign(comps[np.arange(3), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    proj = x @ (comps * signs[:, None]).T  # (h*w, 3)
    lo = np.percentile(proj, 1, axis=0)
    hi = np.percentile(proj, 99, axis=0)
    scaled = (proj - lo) / np.maximum(hi - lo, 1e-12)
    rgb = (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(h, w, 3)
    if size is not None and (size[0], size[1]) != (h, w):
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.NEAREST))
    return rgb


def outline(
    image: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = HIT_COLOUR,
    thickness: int | None = None,
) -> np.ndarray:
    """A copy of the (H, W, 3) ``image`` with the outer outline of the (H, W) bool ``mask`` drawn on it.

    ``thickness`` defaults to 1/200 of the longer side (at least 2 pixels), so the line stays visible when
    the picture is shown smaller.
    """
    import cv2

    out = np.ascontiguousarray(image).copy()
    if thickness is None:
        thickness = max(2, round(max(out.shape[:2]) / 200))
    contours, _ = cv2.findContours(np.asarray(mask).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, colour, int(thickness))
    return out


def _tile(
    image: np.ndarray | None, mask: np.ndarray | None, colour: tuple[int, int, int], label: str, tile: int
) -> np.ndarray:
    """One ``tile`` x ``tile`` square: the image fitted in (outlined), dark grey when there is none, labelled."""
    import cv2

    out = np.full((tile, tile, 3), 40, np.uint8)
    if image is not None:
        h, w = image.shape[:2]
        # the line is drawn before the downscale: 2 pixels of the tile whatever the image's size
        img = image if mask is None else outline(image, mask, colour, max(2, round(max(h, w) / tile * 2)))
        s = tile / max(h, w)
        small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        y, x = (tile - small.shape[0]) // 2, (tile - small.shape[1]) // 2
        out[y : y + small.shape[0], x : x + small.shape[1]] = small
    cv2.putText(out, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def hits_sheet(
    query: np.ndarray, region: np.ndarray | None, hits: Sequence[HitLike], tile: int = 192, cols: int = 5
) -> np.ndarray:
    """(rows * tile, cols * tile, 3) uint8: the query with its region outlined (yellow), then each hit with
    its segment (green), ranked. A hit whose file is gone or no longer matches its mask is an empty tile."""
    from densekit.serve.imageio import read_image

    tiles = [_tile(query, region, QUERY_COLOUR, "query", tile)]
    for rank, h in enumerate(hits, 1):
        img = None
        if h.path is not None:
            try:
                img = read_image(h.path)
            except DensekitError:
                img = None  # the indexed file was moved or deleted since
        if img is not None and img.shape[:2] != h.mask.shape:
            img = None
        tiles.append(_tile(img, h.mask, HIT_COLOUR, f"#{rank} {h.score:.3f} id{h.image_id}", tile))
    while len(tiles) % cols:
        tiles.append(np.full((tile, tile, 3), 255, np.uint8))
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def write_grid(
    dest: str | os.PathLike[str],
    query: np.ndarray,
    region: np.ndarray | None,
    hits: Sequence[HitLike],
    tile: int = 192,
    cols: int = 5,
) -> None:
    """Write :func:`hits_sheet` as a PNG, atomically."""
    import cv2

    sheet = hits_sheet(query, region, hits, tile, cols)
    with atomic_path(dest, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
            raise DensekitError(f"could not write {dest}")
