"""Scene cuts: where one shot of a video ends and another begins, from a jump of the colour histogram.

Tracking across a cut propagates the last shot's masks onto unrelated pixels (the mask breaks into noise and
goes on), so the Track tab pauses at a cut and asks for a new selection. Two consecutive frames of one shot
share most of their colours even under fast motion; frames of two shots rarely do. The measure is the
Bhattacharyya distance (``cv2.compareHist``) of the frames' HSV histograms, 0 for the same colours and 1 for
disjoint ones. Frames are shrunk first: the histogram does not need the pixels, and it keeps the check at a
fraction of a millisecond per frame.

Threshold (:data:`CUT_DISTANCE` 0.4), measured: on the 12 DAVIS-2016 validation videos
(``../shared/data/davis2016-val12``: fast motion, moving cameras) the largest distance between consecutive
frames is 0.26 (drift-straight) and the smallest between the last frame of one video and the first of another
0.44 (median 0.82); ``../shared/data/videos/bikes.mp4`` has five cuts, at 0.48 to 0.92, and nothing else over
0.23; the embedded sample's videos (``make_sample``) stay under 0.17 within a video.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

CUT_DISTANCE = 0.4  # Bhattacharyya distance of consecutive frames' histograms above which a new shot begins
_BINS = (12, 8, 8)  # hue, saturation, value: value keeps grey videos (no hue) apart
_SMALL_SIDE = 96  # frames are shrunk to this longer side before the histogram is taken


def colour_histogram(frame: np.ndarray) -> np.ndarray:
    """The normalised HSV histogram of an (H, W, 3) uint8 RGB frame: (12, 8, 8) float32 summing to 1."""
    import cv2

    h, w = frame.shape[:2]
    s = min(1.0, _SMALL_SIDE / max(h, w))
    if s < 1.0:
        frame = cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    small = frame
    hsv = cv2.cvtColor(np.ascontiguousarray(small, dtype=np.uint8), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(_BINS), [0, 180, 0, 256, 0, 256])
    return (hist / max(float(hist.sum()), 1.0)).astype(np.float32)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya distance of two :func:`colour_histogram` results: 0 same colours .. 1 disjoint."""
    import cv2

    return float(cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA))


def frame_distance(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`histogram_distance` of two (H, W, 3) uint8 RGB frames."""
    return histogram_distance(colour_histogram(a), colour_histogram(b))


class SceneCutDetector:
    """Fed the frames of a video in order, says which one begins a new shot.

    ``threshold``: the :func:`histogram_distance` above which a frame is a cut (default :data:`CUT_DISTANCE`).
    """

    def __init__(self, threshold: float = CUT_DISTANCE) -> None:
        if not 0.0 < threshold <= 1.0:
            from densekit.serve.errors import DensekitError

            raise DensekitError(f"a scene-cut threshold is a distance in (0, 1], got {threshold!r}")
        self.threshold = threshold
        self._last: Optional[np.ndarray] = None
        self.distance = 0.0  # of the last frame fed to the one before it

    def is_cut(self, frame: np.ndarray) -> bool:
        """Whether ``frame`` (H, W, 3) uint8 RGB begins another shot than the frame fed before it."""
        hist = colour_histogram(frame)
        self.distance = 0.0 if self._last is None else histogram_distance(self._last, hist)
        self._last = hist
        return self.distance > self.threshold
