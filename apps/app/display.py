"""How the app shows things: object labels and colours, frames fitted to the page, clicks, PCA pictures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from densekit.apps.app.engine import Engine
    from densekit.apps.app.selection import Click


DISPLAY_MAX_SIDE = 960  # frames shown in the page are at most this wide/high (clicks are mapped back)
MAX_OBJECT_ID = 254  # 255 is DAVIS's void label
_COLOUR_NAMES = {1: "red", 2: "green", 3: "olive", 4: "navy", 5: "purple", 6: "teal", 7: "grey", 8: "brown"}


def object_label(obj: int) -> str:
    """Dropdown label of an object id: its number and DAVIS palette colour."""
    from densekit.serve.imageio import DAVIS_PALETTE

    name = _COLOUR_NAMES.get(obj) or "#{:02x}{:02x}{:02x}".format(*(int(c) for c in DAVIS_PALETTE[obj]))
    return f"object {obj} ({name})"


def downscale(image: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """``image`` shrunk (INTER_AREA) so its longer side is at most ``max_side``; never enlarged."""
    import cv2

    h, w = image.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def draw_clicks(image: np.ndarray, clicks: Iterable[Click]) -> np.ndarray:
    """Dots on ``image`` (in place) where the clicks were: green positive, red negative, black-rimmed."""
    import cv2

    r = max(3, round(min(image.shape[:2]) / 90))
    for c in clicks:
        centre = (int(round(c.x)), int(round(c.y)))
        colour = (0, 255, 0) if c.positive else (255, 0, 0)
        cv2.circle(image, centre, r + 1, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(image, centre, r, colour, -1, cv2.LINE_AA)
    return image


def pca_picture(engine: Engine, frame: np.ndarray, short_side: Optional[int] = None) -> np.ndarray:
    """The first three PCA components of ``frame``'s dense features as an RGB picture of the frame's size."""
    from densekit.serve.viz import pca_rgb

    return downscale(pca_rgb(engine.features(frame, short_side), size=frame.shape[:2]))
