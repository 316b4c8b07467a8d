"""How the app shows things: object labels and colours, frames fitted to the page, clicks, PCA pictures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from densekit.apps.app.engine import Engine
    from densekit.apps.app.selection import Click


DISPLAY_MAX_SIDE = 960  # frames shown in the page are at most this wide/high (clicks are mapped back)
DISPLAY_MIN_SIDE = 640  # ... and small videos are enlarged to this longer side, to fill the Track tab's viewer
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


def display_scale(size: tuple[int, int]) -> float:
    """Shown size / frame size of a frame of ``size`` (H, W) in the Track tab's viewer: frames whose longer
    side is over DISPLAY_MAX_SIDE are shrunk to it, those under DISPLAY_MIN_SIDE enlarged to it."""
    longest = max(size)
    return min(DISPLAY_MAX_SIDE / longest, max(1.0, DISPLAY_MIN_SIDE / longest))


def fit_display(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W[, C]) resized by :func:`display_scale` (INTER_AREA to shrink, INTER_LINEAR to enlarge)."""
    import cv2

    h, w = image.shape[:2]
    s = display_scale((h, w))
    if s == 1.0:
        return image
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1.0 else cv2.INTER_LINEAR)


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


_PRESET_WORDS = {
    "live": "the fast tracking setting (made for live use)",
    "dino": "the accurate tracking setting (DINO's, slower)",
    "crw": "the long-memory tracking setting (CRW's, slowest)",
}


def device_words(provider: str) -> str:
    """Where the model runs, in plain words: ``'torch:cpu'`` -> ``'on the CPU'``, CUDA/TensorRT -> the GPU."""
    p = provider.lower()
    if "tensorrt" in p or "cuda" in p or "gpu" in p:
        return "on the GPU"
    if "openvino" in p:
        return "on the CPU (OpenVINO)"
    return "on the CPU"


def model_words(label: str) -> str:
    """A model name as people write it: ``efficientnet_lite0`` -> ``EfficientNet-Lite0``; files by their name."""
    from pathlib import Path

    known = {"efficientnet_lite0": "EfficientNet-Lite0", "mobilenetv3": "MobileNetV3", "resnet": "ResNet", "vit": "ViT"}
    stem = Path(label).name
    for key, words in known.items():
        if stem.lower().startswith(key):
            return words + stem[len(key):].replace("_", " ")
    return stem


def header_markdown(model_label: str, provider: str, preset: str) -> str:
    """The app's header: what it does and what it runs, without jargon (the exact names stay in the API)."""
    setting = _PRESET_WORDS.get(preset, f"the {preset!r} tracking setting")
    return (
        "**densekit** · click an object in a video and it is followed through the frames · "
        f"{model_words(model_label)} image features {device_words(provider)}, {setting}"
    )


def hint_picture(width: int = 640, height: int = 360) -> np.ndarray:
    """The viewer's picture before a video is loaded: the three steps, light text on dark grey, (H, W, 3)."""
    import cv2

    img = np.full((height, width, 3), 48, np.uint8)
    lines = ["1  Load a video (side column)", "2  Click the object to follow", "3  Press Track"]
    for k, line in enumerate(lines):
        y = height // 2 - 50 + 50 * k
        cv2.putText(img, line, (40, y), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (230, 230, 230), 2, cv2.LINE_AA)
    return img
