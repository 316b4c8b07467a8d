"""One browser session of the Webcam tab: a captured frame, its objects, and per-frame propagation.

:func:`webcam_step` drops a frame that arrives while the session's previous one is still being processed
(the session lock is tried, not waited for), so a slow model lowers the frame rate instead of queueing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from densekit.apps.app.display import MAX_OBJECT_ID, draw_clicks, object_label
from densekit.apps.app.engine import Engine
from densekit.apps.app.selection import Click, FrameRegions, frame_regions, select_region
from densekit.serve.errors import DensekitError


class WebcamSession:
    """One browser session's webcam tracking: the captured frame, its objects, the propagator."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_frame: Optional[np.ndarray] = None
        self.captured: Optional[np.ndarray] = None
        self.mask: Optional[np.ndarray] = None
        self.clicks: dict[int, list[Click]] = {}
        self.objects: list[int] = [1]
        self.regions: Optional[FrameRegions] = None
        self.propagator: Any = None
        self.tracking = False
        self.frames = 0

    def __deepcopy__(self, memo: dict) -> "WebcamSession":
        # a new, empty session per browser session (see TrackSession.__deepcopy__)
        return type(self)()

    def capture(self) -> np.ndarray:
        if self.last_frame is None:
            raise DensekitError(
                "No webcam frame yet: start the webcam (allow camera access in the browser) and try again."
            )
        self.captured = self.last_frame.copy()
        self.mask = np.zeros(self.captured.shape[:2], np.uint8)
        self.clicks.clear()
        self.regions = None
        self.tracking = False
        return self.captured

    def click(
        self, engine: Engine, obj: Any, x: Any, y: Any, positive: bool = True, short_side: Optional[int] = None
    ) -> str:
        if self.captured is None or self.mask is None:
            raise DensekitError("Capture a webcam frame first, then click the objects on it.")
        try:
            o, xf, yf = int(obj), float(x), float(y)
        except (TypeError, ValueError):
            raise DensekitError("click needs an object id and numeric coordinates") from None
        H, W = self.captured.shape[:2]
        if not (0 <= xf < W and 0 <= yf < H):
            raise DensekitError(f"click ({xf:g}, {yf:g}) is outside the {W}x{H} frame")
        if not 1 <= o <= MAX_OBJECT_ID:
            raise DensekitError(f"object ids are 1..{MAX_OBJECT_ID}, got {o}")
        if self.regions is None:
            self.regions = frame_regions(self.captured, engine.features(self.captured, short_side))
        clicks = [*self.clicks.get(o, []), Click(xf, yf, bool(positive))]
        region = select_region(self.regions, clicks)
        if not region.any():
            raise DensekitError("The selection covers nothing: click inside the object first.")
        self.clicks[o] = clicks
        self.mask[self.mask == o] = 0
        self.mask[region] = o
        if o not in self.objects:
            self.objects.append(o)
        return f"{object_label(o)} covers {int(region.sum())} pixels of the captured frame."

    def view(self) -> Optional[np.ndarray]:
        from densekit.serve.imageio import overlay

        if self.captured is None:
            return None
        img = (
            overlay(self.captured, self.mask, 0.5)
            if self.mask is not None and self.mask.any()
            else self.captured.copy()
        )
        return draw_clicks(img, [c for cs in self.clicks.values() for c in cs])

    def new_object(self) -> int:
        nxt = max(self.objects, default=0) + 1
        if nxt > MAX_OBJECT_ID:
            raise DensekitError(f"at most {MAX_OBJECT_ID} objects")
        self.objects.append(nxt)
        return nxt

    def start(self, engine: Engine, short_side: Optional[int] = None) -> str:
        from densekit.retrieval.propagation import MaskPropagator

        if self.captured is None or self.mask is None or not self.mask.any():
            raise DensekitError("Capture a frame and click at least one object before tracking.")
        with self.lock:
            config = engine.config(short_side, self.captured.shape[:2])
            self.propagator = MaskPropagator(engine.extractor, config)
            self.propagator.start(self.captured, self.mask)
            self.tracking = True
            self.frames = 0
        return "Tracking the webcam stream."

    def stop(self) -> str:
        with self.lock:
            self.tracking = False
        return "Webcam tracking stopped."


@dataclass
class WebcamResult:
    """What one streamed frame gave: the picture to show, the handler's latency, a status line.

    ``mask``: the (H, W) uint8 id mask when tracking. ``dropped``: the frame arrived while the previous one
    was still being processed and was skipped.
    """

    display: Optional[np.ndarray]
    latency_ms: float
    status: str
    dropped: bool = False
    mask: Optional[np.ndarray] = None


def webcam_step(session: WebcamSession, frame: Optional[np.ndarray]) -> WebcamResult:
    """Process one webcam frame: remember it, and propagate the captured objects into it when tracking."""
    import cv2

    from densekit.serve.imageio import overlay

    t0 = time.perf_counter()
    if frame is None:
        return WebcamResult(
            None, 0.0, "No webcam frame received: allow camera access in the browser and start the webcam."
        )
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)
    if not session.lock.acquire(blocking=False):
        return WebcamResult(None, 0.0, "", dropped=True)
    try:
        session.last_frame = arr
        if not session.tracking or session.propagator is None or session.captured is None:
            msg = "Live. Capture a frame, click the objects on it, then press Start tracking."
            return WebcamResult(arr, (time.perf_counter() - t0) * 1e3, msg)
        H, W = session.captured.shape[:2]
        if arr.shape[:2] != (H, W):
            arr = cv2.resize(arr, (W, H), interpolation=cv2.INTER_AREA)
        mask = session.propagator.step(arr)
        session.frames += 1
        shown = overlay(arr, mask, 0.5)
        ms = (time.perf_counter() - t0) * 1e3
        status = f"Tracking {len(session.propagator.object_ids)} object(s), frame {session.frames}."
        return WebcamResult(shown, ms, status, mask=mask)
    except DensekitError as exc:
        session.tracking = False
        return WebcamResult(arr, (time.perf_counter() - t0) * 1e3, f"Tracking stopped: {exc}")
    finally:
        session.lock.release()
