"""Pictures of dense features for people: the first three principal components as RGB.

As in Zhang and Maire's hierarchical-grouping paper (Figure 2) and DINO's feature visualisations: project
every cell's feature on the top three principal directions of that image's features and show them as
colour, so that cells the backbone thinks alike look alike. numpy only (serve/ must import without torch).
"""

from __future__ import annotations

import numpy as np

from densekit.serve.errors import DensekitError


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
