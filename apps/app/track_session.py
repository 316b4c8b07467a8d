"""One browser session of the Track tab: its video, masks, clicks and propagator, and the tracking loop.

Tracking is a generator (:meth:`TrackSession.track`) that a Stop cancels between frames (``stop_event``)
and that pauses by itself at a scene cut (:mod:`.scene_cut`); editing refuses while it runs. Playing
(:meth:`TrackSession.play`) walks the frames at the video's rate and is stopped the same way. The model is
the engine's, shared behind its lock. Frames are numbered from 0 everywhere (slider, messages, API).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from densekit.apps.app.display import MAX_OBJECT_ID, display_scale, draw_clicks, fit_display, object_label
from densekit.apps.app.engine import DEFAULT_PRESET, Engine, shared_extractor
from densekit.apps.app.scene_cut import SceneCutDetector
from densekit.apps.app.selection import Click, FrameRegions, brush_region, fit_mask, frame_regions, select_region
from densekit.apps.app.video import LoadedVideo, load_video, write_masks_zip
from densekit.serve.errors import DensekitError


NO_VIDEO = "Load a video first."


@dataclass
class TrackUpdate:
    """One tracked frame: index, mask (H, W) uint8, propagation time of this frame, and progress."""

    index: int
    total: int
    mask: np.ndarray
    step_seconds: float
    frames_done: int
    elapsed: float
    display: Optional[np.ndarray] = None

    @property
    def fps(self) -> float:
        """Frames per second of this run so far (wall time, including what the consumer does per frame)."""
        return self.frames_done / self.elapsed if self.elapsed > 0 else 0.0


class TrackSession:
    """Everything one browser session of the Track tab holds: the video, masks, clicks, its propagator.

    Masks live in a (N, H, W) uint8 memory map beside the frames; ``has_mask[i]`` says whether frame ``i``
    holds a mask (edited by the user or tracked). Handlers that edit refuse while tracking runs.
    """

    def __init__(self) -> None:
        self.dir: Optional[Path] = None
        self.video: Optional[LoadedVideo] = None
        self.masks: Optional[np.ndarray] = None
        self.has_mask = np.zeros(0, bool)
        self.objects: list[int] = []
        self.current = 1
        self.clicks: dict[tuple[int, int], list[Click]] = {}
        self.bases: dict[tuple[int, int], np.ndarray] = {}
        self.annotations: Optional[Path] = None  # a sample's ground-truth folder
        self.stop_event = threading.Event()
        self.tracking = False
        self.playing = False
        self.cut_at: Optional[int] = None  # the frame a scene cut paused the last tracking run at
        self.load_requests = 0  # loads the user asked for (the page's default sample yields to them)
        self._load_lock = threading.Lock()
        self._click_lock = threading.Lock()
        self._version = 0  # counts mask edits: what the page shows is (video, frame, version)
        self.shown: Optional[tuple[int, int, int]] = None
        self._regions: Optional[tuple[tuple[int, int, int], FrameRegions]] = None
        self._propagator: Optional[tuple[Any, Any]] = None
        self._serial = 0
        self._downloads = 0

    def __deepcopy__(self, memo: dict) -> "TrackSession":
        # gr.State gives each browser session a deep copy of its initial value: that copy is a new, empty
        # session (a callable initial value would add a page-load event that can land after the user's
        # first load and replace the loaded session with an empty one)
        return type(self)()

    def close(self) -> None:
        """Delete the session's files (called when Gradio drops the session)."""
        self.stop_event.set()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------------

    def load(
        self,
        engine: Engine,
        path: Any,
        annotations: Optional[Path] = None,
        limit_size: bool = True,
        *,
        server_path: bool = False,
        default: bool = False,
    ) -> Optional[str]:
        """Load a video file or frames folder; returns a one-line description.

        ``server_path``: ``path`` was typed by the user (messages name it in full; an upload's temporary path
        is named by its file name only). ``default``: the sample the page loads when it opens, which gives
        way to any load the user asks for (then None is returned and nothing is loaded): loads run one at a
        time per session, and a page-load event must never replace the user's video.
        """
        if not default:
            self.load_requests += 1
        with self._load_lock:
            if default and (self.load_requests or self.video is not None):
                return None
            return self._load(engine, path, annotations, limit_size, server_path)

    def _load(self, engine: Engine, path: Any, annotations: Optional[Path], limit_size: bool, server_path: bool) -> str:
        if self.tracking or self.playing:
            raise DensekitError("Stop tracking (or playing) before loading another video.")
        if path is None or not str(path).strip():
            raise DensekitError("Choose a video file, a sample or a frames folder first.")
        p = Path(str(path).strip()).expanduser()
        if self.dir is None:
            self.dir = engine.new_dir("session")
        target = self.dir / f"video-{self._serial + 1}"
        target.mkdir()
        try:
            video = load_video(
                p,
                target,
                max_frames=engine.max_frames,
                max_side=engine.max_side,
                max_mb=engine.max_video_mb if limit_size else None,
                name=str(p) if server_path else None,
            )
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        old = self.dir / f"video-{self._serial}"
        self._serial += 1
        self.video = video
        n, (H, W) = len(video), video.size
        self.masks = np.lib.format.open_memmap(target / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, H, W))
        self.has_mask = np.zeros(n, bool)
        self.objects, self.current = [1], 1
        self.clicks.clear()
        self.bases.clear()
        self._regions = None
        self.annotations = annotations
        self.cut_at, self.shown = None, None
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        note = f" ({video.note})" if video.note else ""
        return f"Loaded {video.label}: {n} frames of {W}x{H} at {video.fps:g} fps{note}. Click an object to select it, then press Track."

    def require_video(self) -> LoadedVideo:
        if self.video is None or self.masks is None:
            raise DensekitError(NO_VIDEO)
        return self.video

    def check_frame(self, index: Any) -> int:
        video = self.require_video()
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise DensekitError(f"frame index must be a number, got {index!r}") from None
        if not 0 <= i < len(video):
            raise DensekitError(f"frame {i} is outside the video (0..{len(video) - 1})")
        return i

    def check_object(self, obj: Any) -> int:
        try:
            o = int(obj)
        except (TypeError, ValueError):
            raise DensekitError("Choose an object (or press New object) first.") from None
        if not 1 <= o <= MAX_OBJECT_ID:
            raise DensekitError(f"object ids are 1..{MAX_OBJECT_ID}, got {o}")
        if o not in self.objects:
            self.objects.append(o)
        self.current = o
        return o

    def _editable(self) -> None:
        self.require_video()
        if self.tracking:
            raise DensekitError("Stop tracking before editing masks.")
        if self.playing:  # an edit pauses playing, on the frame the click or upload was made on
            self.stop_event.set()

    # -- masks -------------------------------------------------------------------------------------------

    def mask(self, i: int) -> np.ndarray:
        """The (H, W) uint8 id mask of frame ``i`` (zeros when it has none)."""
        video = self.require_video()
        if not self.has_mask[i]:
            return np.zeros(video.size, np.uint8)
        return np.array(self.masks[i])  # type: ignore[index]

    def set_mask(self, i: int, mask: np.ndarray) -> None:
        """Replace frame ``i``'s whole mask."""
        self.masks[i] = mask  # type: ignore[index]
        self.has_mask[i] = bool(np.any(mask))
        self._version += 1

    def set_object(self, i: int, obj: int, region: np.ndarray) -> None:
        """Object ``obj`` covers exactly ``region`` (H, W) bool on frame ``i`` (taking those pixels from others)."""
        m = self.mask(i)
        m[m == obj] = 0
        m[region] = obj
        self.set_mask(i, m)

    def objects_in(self, i: int) -> list[int]:
        ids = np.unique(self.mask(i))
        return [int(v) for v in ids if v not in (0, 255)]

    def new_object(self) -> int:
        self.require_video()
        nxt = max(self.objects, default=0) + 1
        if nxt > MAX_OBJECT_ID:
            raise DensekitError(f"at most {MAX_OBJECT_ID} objects")
        self.objects.append(nxt)
        self.current = nxt
        return nxt

    def regions(self, engine: Engine, i: int, short_side: Optional[int]) -> FrameRegions:
        key = (self._serial, i, engine.side(short_side, self.video.size))  # type: ignore[union-attr]
        if self._regions is None or self._regions[0] != key:
            frame = self.video.frame(i)  # type: ignore[union-attr]
            self._regions = (key, frame_regions(frame, engine.features(frame, short_side)))
        return self._regions[1]

    def click(
        self,
        engine: Engine,
        i: Any,
        obj: Any,
        x: Any,
        y: Any,
        positive: bool = True,
        threshold: Optional[float] = None,
        short_side: Optional[int] = None,
    ) -> str:
        """Add a click at pixel (x, y) of frame ``i`` for object ``obj`` and recompute that object's mask.

        Clicks of one session run one at a time (the page queues a click made while the last is computed)."""
        with self._click_lock:
            return self._click(engine, i, obj, x, y, positive, threshold, short_side)

    def _click(
        self, engine: Engine, i: Any, obj: Any, x: Any, y: Any, positive: bool, threshold: Any, short_side: Any
    ) -> str:
        self._editable()
        i, obj = self.check_frame(i), self.check_object(obj)
        H, W = self.video.size  # type: ignore[union-attr]
        try:
            xf, yf = float(x), float(y)
        except (TypeError, ValueError):
            raise DensekitError(f"click coordinates must be numbers, got ({x!r}, {y!r})") from None
        if not (0 <= xf < W and 0 <= yf < H):
            raise DensekitError(f"click ({xf:g}, {yf:g}) is outside the {W}x{H} frame")
        key = (i, obj)
        base = self.bases.setdefault(key, self.mask(i) == obj)
        clicks = [*self.clicks.get(key, []), Click(xf, yf, bool(positive))]
        region = select_region(self.regions(engine, i, short_side), clicks, base=base, threshold=threshold)
        if not region.any():
            if not any(c.positive for c in clicks):
                raise DensekitError(
                    "The selection covers nothing: a negative click removes from an object, click it positively first."
                )
            raise DensekitError("The selection covers nothing: click inside the object, or lower the threshold.")
        self.clicks[key] = clicks
        self.set_object(i, obj, region)
        kind = "positive" if positive else "negative"
        return f"Frame {i}: {kind} click for {object_label(obj)}; it covers {int(region.sum())} pixels."

    def clear_object(self, i: Any, obj: Any) -> str:
        self._editable()
        i, obj = self.check_frame(i), self.check_object(obj)
        self.clicks.pop((i, obj), None)
        self.bases.pop((i, obj), None)
        self.set_object(i, obj, np.zeros(self.video.size, bool))  # type: ignore[union-attr]
        return f"Frame {i}: cleared {object_label(obj)}."

    def brush(self, i: Any, obj: Any, editor_value: Any, action: str = "Add") -> str:
        """Apply a brush drawing to object ``obj`` on frame ``i``: ``Add``, ``Erase`` or ``Replace``."""
        self._editable()
        i, obj = self.check_frame(i), self.check_object(obj)
        painted = brush_region(editor_value, self.video.size)  # type: ignore[union-attr]
        if not painted.any():
            raise DensekitError("The drawing is empty: paint over the object with the brush first.")
        current = self.mask(i) == obj
        action = (action or "Add").capitalize()
        if action == "Add":
            region = current | painted
        elif action == "Erase":
            region = current & ~painted
        elif action == "Replace":
            region = painted
        else:
            raise DensekitError(f"brush action must be Add, Erase or Replace, got {action!r}")
        self.set_object(i, obj, region)
        self.clicks.pop((i, obj), None)
        self.bases[(i, obj)] = region
        return f"Frame {i}: brush ({action.lower()}) for {object_label(obj)}; it covers {int(region.sum())} pixels."

    def upload_mask(self, i: Any, obj: Any, path: Any) -> str:
        """A mask PNG for frame ``i``: one object -> object ``obj``; several ids -> the frame's whole mask."""
        from densekit.serve.imageio import read_mask

        self._editable()
        i = self.check_frame(i)
        if path is None:
            raise DensekitError("Choose a mask file to upload.")
        p = Path(str(path))
        try:
            m = fit_mask(read_mask(p), self.video.size)  # type: ignore[union-attr]
        except DensekitError as exc:
            raise DensekitError(str(exc).replace(str(p), p.name)) from None
        m = np.where(m == 255, 0, m).astype(np.uint8)
        ids = [int(v) for v in np.unique(m) if v != 0]
        if not ids:
            raise DensekitError(f"The uploaded mask {p.name} covers nothing (it is all background).")
        if len(ids) == 1:
            obj = self.check_object(obj)
            self.set_object(i, obj, m > 0)
            self.bases[(i, obj)] = m > 0
            self.clicks.pop((i, obj), None)
            return f"Frame {i}: {object_label(obj)} set from {p.name}."
        self.set_mask(i, m)
        for k in [k for k in self.clicks if k[0] == i]:
            self.clicks.pop(k)
        for k in [k for k in self.bases if k[0] == i]:
            self.bases.pop(k)
        self.objects = sorted(set(self.objects) | set(ids))
        self.current = ids[0]
        return f"Frame {i}: mask of {len(ids)} objects ({', '.join(map(str, ids))}) from {p.name}."

    def use_annotation(self, i: Any) -> str:
        """Use a bundled sample's ground-truth mask of frame ``i``."""
        self._editable()
        i = self.check_frame(i)
        if self.annotations is None:
            raise DensekitError("Only bundled samples come with annotations: load a sample first.")
        p = self.annotations / f"{self.video.names[i]}.png"  # type: ignore[union-attr]
        if not p.is_file():
            raise DensekitError(f"the sample has no annotation for frame {i}")
        return self.upload_mask(i, self.current, p).replace(p.name, "the sample's annotation")

    # -- display -------------------------------------------------------------------------------------------

    def render(self, i: int, mask: Optional[np.ndarray] = None, clicks: bool = True) -> np.ndarray:
        """Frame ``i`` with its objects overlaid (and the clicks made on it), at the viewer's size (fit_display)."""
        from densekit.serve.imageio import overlay

        video = self.require_video()
        m = self.mask(i) if mask is None else mask
        img = overlay(video.frame(i), m, 0.5) if m.any() else video.frame(i)
        if clicks:
            img = draw_clicks(img, [c for (f, _), cs in self.clicks.items() if f == i for c in cs])
        return fit_display(img)

    def view(self, i: int) -> np.ndarray:
        """:meth:`render` of frame ``i`` for the page's viewer, remembered as what the viewer shows."""
        img = self.render(i)
        self.mark_shown(i)
        return img

    def mark_shown(self, i: int) -> None:
        """The viewer shows frame ``i`` as it is now (a tracked frame's overlay is its render)."""
        self.shown = (self._serial, i, self._version)

    def is_shown(self, i: int) -> bool:
        """Whether the viewer already shows frame ``i`` as it is now (the slider's release after its input
        events asks again for the frame they showed)."""
        return self.shown == (self._serial, i, self._version)

    def display_scale(self) -> float:
        """Displayed width / frame width (clicks on the shown image are divided by it)."""
        return display_scale(self.require_video().size)

    # -- tracking ------------------------------------------------------------------------------------------

    def propagator(self, engine: Engine, short_side: Optional[int] = None) -> Any:
        """This session's MaskPropagator at a processing short side (made on first use, shared model)."""
        from densekit.retrieval.propagation import MaskPropagator

        config = engine.config(short_side, self.require_video().size)
        if self._propagator is None or self._propagator[0] != config:
            self._propagator = (config, MaskPropagator(engine.extractor, config))
        return self._propagator[1]

    def track(
        self,
        engine: Engine,
        start: Any,
        short_side: Optional[int] = None,
        render: bool = True,
        propagator: Any = None,
        cuts: bool = True,
    ) -> Iterator[TrackUpdate]:
        """Propagate frame ``start``'s objects to the end of the video, one :class:`TrackUpdate` per frame.

        The propagator (this session's, or ``propagator``) is (re)started from ``start``'s mask, so a corrected
        frame becomes the reference; masks of later frames are replaced as they come (frames not reached after
        a stop hold no mask). The loop ends early when :attr:`stop_event` is set (checked before each frame),
        and, with ``cuts``, before a frame that begins another shot (:class:`SceneCutDetector`): that frame is
        then :attr:`cut_at`, where the user selects again and tracks on.
        ``render``: also draw each frame's overlay for display (``TrackUpdate.display``), as the page does.
        """
        video = self.require_video()
        i0 = self._check_trackable(start)
        prop = propagator if propagator is not None else self.propagator(engine, short_side)
        detector = SceneCutDetector() if cuts else None
        self.tracking, self.cut_at, self.shown = True, None, None
        self.stop_event.clear()
        try:
            first = video.frame(i0)
            prop.start(first, self.mask(i0))
            if detector is not None:
                detector.is_cut(first)
            self._forget_after(i0)
            t0 = time.perf_counter()
            n = len(video)
            for i in range(i0 + 1, n):
                if self.stop_event.is_set():
                    return
                frame = video.frame(i)
                if detector is not None and detector.is_cut(frame):
                    self.cut_at = i
                    return
                ts = time.perf_counter()
                m = prop.step(frame)
                step = time.perf_counter() - ts
                self.set_mask(i, m)
                disp = self.render(i, m, clicks=False) if render else None
                yield TrackUpdate(i, n, m, step, i - i0, time.perf_counter() - t0, disp)
        finally:
            self.tracking = False

    def _check_trackable(self, start: Any) -> int:
        """``start`` as a frame tracking can begin at, or the one-line reason it cannot."""
        i0 = self.check_frame(start)
        if self.tracking or self.playing:
            raise DensekitError("Tracking (or playing) is already running in this session: press Stop first.")
        if not self.objects_in(i0):
            raise DensekitError(f"Frame {i0} has no object: click on an object (or draw or upload a mask) first.")
        if i0 >= len(self.video) - 1:  # type: ignore[arg-type]
            raise DensekitError("This is the last frame: move the slider back to track from an earlier frame.")
        return i0

    def _forget_after(self, i0: int) -> None:
        """Tracking from ``i0`` replaces every later frame's mask: drop them and the clicks made on them."""
        self.has_mask[i0 + 1 :] = False
        for key in [k for k in self.clicks if k[0] > i0]:
            self.clicks.pop(key)
        for key in [k for k in self.bases if k[0] > i0]:
            self.bases.pop(key)

    def play(self, start: Any) -> Iterator[int]:
        """The frame indices from ``start`` (from 0 when ``start`` is the last frame) to the end, paced at the
        video's frame rate; ends early when :attr:`stop_event` is set (Stop)."""
        video = self.require_video()
        i0 = self.check_frame(start)
        if self.tracking or self.playing:
            raise DensekitError("Press Stop first: tracking (or playing) is running in this session.")
        i0 = 0 if i0 >= len(video) - 1 else i0
        self.playing = True
        self.stop_event.clear()
        try:
            t0 = time.perf_counter()
            for k, i in enumerate(range(i0, len(video))):
                if self.stop_event.is_set():
                    return
                yield i
                time.sleep(max(0.0, t0 + (k + 1) / max(video.fps, 1.0) - time.perf_counter()))
        finally:
            self.playing = False

    def stop(self) -> str:
        if not (self.tracking or self.playing):
            return "Nothing is being tracked or played."
        self.stop_event.set()
        return "Stopping after the current frame."

    # -- downloads -----------------------------------------------------------------------------------------

    def _download_path(self, filename: str) -> Path:
        self._downloads += 1
        d = self.dir / "downloads" / str(self._downloads)  # type: ignore[operator]
        old = self.dir / "downloads" / str(self._downloads - 2)  # type: ignore[operator]
        shutil.rmtree(old, ignore_errors=True)
        return d / filename

    def _stem(self) -> str:
        return Path(self.video.label).stem or "video"  # type: ignore[union-attr]

    def export_masks(self) -> Path:
        """Zip of one DAVIS palette PNG per frame (frames without a mask are all background)."""
        video = self.require_video()
        if not self.has_mask.any():
            raise DensekitError("Nothing to download yet: select an object (and track it) first.")
        dest = self._download_path(f"{self._stem()}-masks.zip")
        return write_masks_zip(dest, video.names, (self.mask(i) for i in range(len(video))))

    def export_video(self) -> Path:
        """The overlay mp4 of every frame with its mask (``write_overlay_video``)."""
        from densekit.serve.imageio import write_overlay_video

        video = self.require_video()
        if not self.has_mask.any():
            raise DensekitError("Nothing to download yet: select an object (and track it) first.")
        dest = self._download_path(f"{self._stem()}-overlay.mp4")
        n = len(video)
        write_overlay_video(dest, (video.frame(i) for i in range(n)), (self.mask(i) for i in range(n)), video.fps)
        return dest


def tracking_loop(
    extractor: Any,
    frames: Sequence[np.ndarray],
    first_mask: np.ndarray,
    config: Any = None,
    *,
    workdir: Optional[Path] = None,
    render: bool = True,
) -> Iterator[TrackUpdate]:
    """The app's per-frame tracking loop (:meth:`TrackSession.track`) on in-memory frames, for benchmarks.

    ``extractor``: a model name/path or a ready extractor; ``config``: a PropagationConfig or preset name
    (default: the app's preset). Frames are stored and read back as the app does, masks kept in the session's
    memory map and each frame's overlay rendered for display (``render``).
    """
    from densekit.retrieval.propagation import MaskPropagator, PropagationConfig, preset

    cfg = config if isinstance(config, PropagationConfig) else preset(config or DEFAULT_PRESET)
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="densekit-app-loop-")) if own_dir else Path(workdir)
    try:
        engine = Engine(shared_extractor(extractor), model_label="benchmark", workdir=root)
        session = TrackSession()
        session.dir = engine.new_dir("session")
        video = LoadedVideo.from_frames(frames, session.dir)
        session.video = video
        session.masks = np.lib.format.open_memmap(
            session.dir / "masks.npy", mode="w+", dtype=np.uint8, shape=(len(video), *video.size)
        )
        session.has_mask = np.zeros(len(video), bool)
        session.set_mask(0, np.asarray(first_mask, np.uint8))
        yield from session.track(engine, 0, render=render, propagator=MaskPropagator(engine.extractor, cfg))
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
