"""The densekit web app (Gradio 6): track objects through a video or the webcam, search segments, look at features.

``densekit app`` (apps/cmd_app.py) or :func:`build_app` then ``demo.launch()``. One model is loaded per process
(:func:`shared_extractor`) and shared by every browser session behind a lock; everything a session does lives
in its own :class:`TrackSession` / :class:`WebcamSession` held in ``gr.State``, so sessions never mix.

Tabs (element ids are the contract with the browser test, spec/APP.md):

* **Track**: load a video (upload, a bundled sample sequence made by ``make_sample``, or a frames folder /
  video file on the server); pick objects on any frame by positive/negative clicks (:func:`click_mask`:
  cosine similarity of superpixel-pooled features to the clicked superpixels, an Otsu threshold over
  superpixels, and the connected parts under the clicks), by brush (``gr.ImageEditor``) or by uploading a
  mask; several objects, each its DAVIS colour. Tracking (:meth:`TrackSession.track`) is a generator: the
  overlay updates frame by frame with frames per second; Stop ends it after the current frame; correcting a
  mask on any frame and pressing Track again restarts the propagator from that frame (``reset_mask``
  semantics: the corrected frame becomes the reference). Downloads: a zip of DAVIS palette PNGs (one per
  frame, named like the frames) and the overlay mp4, both written atomically.
* **Webcam**: ``gr.Image(sources=["webcam"]).stream(...)``; capture a frame, click objects on it, start
  tracking: every streamed frame is propagated (:func:`webcam_step`), latency shown. Frames that arrive while
  the previous one is still being processed are dropped.
* **Search**: with ``--index DIR`` (or an index built from a folder in the app), click a region of an image:
  gallery of the nearest indexed segments, outlined, with scores.
* **Features**: the first three PCA components of the dense features of any frame as RGB (``pca_rgb``).

API endpoints (``gradio_client.Client(url).predict(..., api_name="/<name>")``; session state is kept per
client; frame/pixel coordinates are in the loaded video's pixels, after the ``max_side`` downscale):

=====================  ==========================================================  ===================================
api_name               inputs                                                      outputs
=====================  ==========================================================  ===================================
load_sample            sample name                                                 status, slider, frame, objects, ...
load_video             video file                                                  as load_sample
load_frames            frames folder (or video file) path on the server            as load_sample
sample_annotation      frame index (uses the sample's annotation of that frame)    status, frame, objects
show_frame             frame index                                                 frame, brush background, status
click                  frame, object id, "Positive"/"Negative", threshold (0 =     frame, status
                       auto), processing short side, x, y
new_object             -                                                           objects dropdown, status
clear_object           frame, object id                                            frame, status
use_brush              frame, object id, ImageEditor value, "Add"/"Erase"/"Replace" frame, status
upload_mask            frame, object id, mask PNG                                  frame, objects, status
track (generator)      start frame, processing short side                          overlay, fps text, status, slider,
                                                                                   frame
stop                   -                                                           status
download_masks         -                                                           zip file, status
download_video         -                                                           mp4 file, status
pca, pca_frame         frame index, processing short side                          PCA picture, status
build_index            index folder, images folder                                 index folder, status
search                 index folder, image, k, x, y                                gallery, query picture, status
webcam_frame (stream)  webcam frame, processing short side                         overlay, latency, status
webcam_capture         -                                                           captured frame, status
webcam_click           "Positive"/"Negative", object id, processing short side,    captured frame, status
                       x, y
webcam_new_object      -                                                           objects dropdown, status
webcam_track           processing short side                                       status
webcam_stop            -                                                           status
=====================  ==========================================================  ===================================

``click_select`` and ``search_select`` / ``webcam_select`` are the same as ``click`` / ``search`` /
``webcam_click`` driven by the image's ``.select`` event (undocumented endpoints: their coordinates come from
``gr.SelectData``, which a client cannot send).

For benchmarks and tests the pieces are importable without Gradio: :func:`click_mask` (click -> mask),
:class:`TrackSession` with :meth:`TrackSession.track` (the per-frame loop the app runs, yielding
:class:`TrackUpdate`), :func:`tracking_loop` (that loop on in-memory frames with any extractor and config),
:func:`webcam_step`, :func:`write_masks_zip`.

Security: the frames-folder box and the Search tab read paths on the server; the app binds to 127.0.0.1 by
default and has no authentication.
"""

# No ``from __future__ import annotations`` here: Gradio finds ``gr.SelectData`` / ``gr.Progress`` parameters
# through typing.get_type_hints, which cannot resolve string annotations naming a locally imported module.

import atexit
import io
import logging
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError, one_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_SAMPLES_DIR = Path.home() / ".cache" / "densekit" / "app-samples"
DISPLAY_MAX_SIDE = 960  # frames shown in the page are at most this wide/high (clicks are mapped back)
WORK_MAX_SIDE = 640  # superpixels for click selection are computed at most at this size
MAX_OBJECT_ID = 254  # 255 is DAVIS's void label
DEFAULT_PRESET = "live"  # densekit.retrieval.propagation's preset for tracking as frames arrive on a CPU
RESOLUTIONS = (480, 360, 240)
NO_VIDEO = "Load a video first."
_COLOUR_NAMES = {1: "red", 2: "green", 3: "olive", 4: "navy", 5: "purple", 6: "teal", 7: "grey", 8: "brown"}


def object_label(obj: int) -> str:
    """Dropdown label of an object id: its number and DAVIS palette colour."""
    from densekit.serve.imageio import DAVIS_PALETTE

    name = _COLOUR_NAMES.get(obj) or "#{:02x}{:02x}{:02x}".format(*(int(c) for c in DAVIS_PALETTE[obj]))
    return f"object {obj} ({name})"


# ----------------------------------------------------------------------------------------------------
# the shared model


class LockedExtractor:
    """A feature extractor shared by every session; one call runs at a time.

    The torch backend switches the module between train/eval mode around each call, which is not safe from
    two threads, and on a small CPU two concurrent forward passes only slow each other down.
    """

    def __init__(self, extractor: Any) -> None:
        self.inner = extractor
        self.meta = extractor.meta
        self.provider = str(getattr(extractor, "provider", "?"))
        self.fixed_hw = getattr(extractor, "fixed_hw", None)
        self.lock = threading.Lock()

    def __call__(self, frame: np.ndarray, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (D, h, w) float32 unit-norm features (see FeatureExtractor)."""
        with self.lock:
            return self.inner(frame, size=size)

    def batch(self, frames: Any, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        with self.lock:
            return self.inner.batch(frames, size=size)


_EXTRACTORS: dict[tuple[str, Optional[str]], LockedExtractor] = {}
_EXTRACTORS_LOCK = threading.Lock()


def shared_extractor(model: Any = DEFAULT_MODEL, device: Optional[str] = None) -> LockedExtractor:
    """The process-wide extractor for ``model`` (name, checkpoint, .onnx, .engine), loaded on first use.

    ``model`` may also be a ready extractor (anything with ``.meta`` and ``__call__(frame, size)``).
    """
    if isinstance(model, LockedExtractor):
        return model
    if hasattr(model, "meta") and callable(model):
        return LockedExtractor(model)
    key = (str(model), device)
    with _EXTRACTORS_LOCK:
        if key not in _EXTRACTORS:
            from densekit.serve.extractor import FeatureExtractor

            _EXTRACTORS[key] = LockedExtractor(FeatureExtractor(str(model), device=device))
        return _EXTRACTORS[key]


class Engine:
    """What every session of one app shares: the model, the propagation preset, limits, samples, temp space."""

    def __init__(
        self,
        extractor: LockedExtractor,
        *,
        model_label: str,
        preset: Optional[str] = None,
        short_side: Optional[int] = None,
        max_video_mb: float = 200,
        max_frames: int = 600,
        max_side: int = 1280,
        index: Optional[Path] = None,
        samples_dir: Optional[Path] = None,
        workdir: Optional[Path] = None,
    ) -> None:
        from densekit.retrieval.propagation import PRESETS

        self.extractor = extractor
        self.model_label = model_label
        self.preset = preset or DEFAULT_PRESET
        if self.preset not in PRESETS:
            raise DensekitError(f"unknown propagation preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        self.short_side = int(short_side or (base.short_side if base.resize == "dino" else 480))
        if max_video_mb <= 0 or max_frames < 2 or max_side < 64:
            raise DensekitError("max_video_mb must be > 0, max_frames >= 2 and max_side >= 64")
        self.max_video_mb = float(max_video_mb)
        self.max_frames = int(max_frames)
        self.max_side = int(max_side)
        self.index = Path(index) if index else None
        self.samples_dir = Path(samples_dir) if samples_dir else None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="densekit-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if workdir is None:
            atexit.register(shutil.rmtree, self.workdir, True)
        self._index_extractors: dict[str, Any] = {}
        self._lock = threading.Lock()

    def resolutions(self) -> list[int]:
        """Processing short sides offered in the page (the default first)."""
        return [self.short_side] + [r for r in RESOLUTIONS if r != self.short_side]

    def side(self, short_side: Optional[int] = None, size: Optional[tuple[int, int]] = None) -> int:
        """The processing short side: ``short_side`` if given, else the app's default capped at the frames'
        own shorter side ``min(size)`` (no upsampling of small videos: on a CPU it costs the square of the
        factor in time)."""
        if short_side:
            return int(short_side)
        return min(self.short_side, min(size)) if size else self.short_side

    def config(self, short_side: Optional[int] = None, size: Optional[tuple[int, int]] = None) -> Any:
        """The propagation config at a processing short side (frames are resized so their shorter side is it);
        see :meth:`side` for ``short_side=None``."""
        from densekit.retrieval.propagation import preset

        side = self.side(short_side, size)
        if side < 16:
            raise DensekitError(f"processing short side must be >= 16, got {side}")
        return preset(self.preset, short_side=side, resize="dino")

    def features(self, frame: np.ndarray, short_side: Optional[int] = None) -> np.ndarray:
        """(D, h, w) features of ``frame`` at the size tracking uses for it."""
        from densekit.retrieval.propagation import processing_size

        if self.extractor.fixed_hw is not None:
            return self.extractor(frame)
        size = processing_size(
            frame.shape[0],
            frame.shape[1],
            self.config(short_side, frame.shape[:2]),
            int(self.extractor.meta.input_multiple),
        )
        return self.extractor(frame, size=size)

    def new_dir(self, prefix: str) -> Path:
        d = self.workdir / f"{prefix}-{uuid.uuid4().hex[:12]}"
        d.mkdir(parents=True)
        return d

    # -- bundled samples -------------------------------------------------------------------------------

    def sample_root(self) -> Optional[Path]:
        """The sample dataset folder, made on first use (``make_sample`` defaults), or None if disabled."""
        if self.samples_dir is None:
            return None
        import json

        meta = self.samples_dir / "sample.json"
        try:
            complete = bool(json.loads(meta.read_text(encoding="utf-8")).get("complete"))
        except (OSError, ValueError):
            complete = False
        if not complete:
            from densekit.serve.sample import make_sample

            with self._lock:
                make_sample(self.samples_dir)
        return self.samples_dir

    def sample_names(self) -> list[str]:
        from densekit.serve.davis import DavisRoot

        root = self.sample_root()
        return DavisRoot(root).sequences() if root is not None else []

    # -- segment index ---------------------------------------------------------------------------------

    def index_root(self, index_dir: Any) -> Path:
        """The folder of an existing segment index, or DensekitError saying there is none."""
        from densekit.retrieval.segment_index import DB_NAME

        if not index_dir or not str(index_dir).strip():
            raise DensekitError("No index: give an index folder (or build one from an images folder).")
        root = Path(str(index_dir).strip()).expanduser()
        if not (root / DB_NAME).is_file():
            raise DensekitError(f"no segment index at {root} (build one from an images folder first)")
        return root

    def open_index(self, index_dir: Any) -> Any:
        """Open a segment index with the app's model, or with the index's own model when it was built with another."""
        from densekit.retrieval.segment_index import SegmentIndex

        root = self.index_root(index_dir)
        key = str(root.resolve())
        if key in self._index_extractors:
            return SegmentIndex.open(root, self._index_extractors[key])
        try:
            return SegmentIndex.open(root, self.extractor)
        except DensekitError as exc:
            if "was built with model" not in str(exc):
                raise
        idx = SegmentIndex.open(root)  # the model stored in the index, loaded once and kept
        with self._lock:
            self._index_extractors[key] = LockedExtractor(idx.extractor)
        idx.extractor = self._index_extractors[key]
        return idx


# ----------------------------------------------------------------------------------------------------
# click -> mask


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


# ----------------------------------------------------------------------------------------------------
# video held by a session


class LoadedVideo:
    """Decoded frames of a video on disk (a ``.npy`` memory map), so any frame is at hand without decoding.

    frames: (N, H, W, 3) uint8; names: N frame names (file stems, or 00000... for video files);
    fps; label (what was loaded); note (what was changed on load: truncation, resize).
    """

    def __init__(self, frames: np.ndarray, names: list[str], fps: float, label: str, note: str = "") -> None:
        self.frames = frames
        self.names = names
        self.fps = fps
        self.label = label
        self.note = note

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as an ordinary (H, W, 3) uint8 array."""
        return np.array(self.frames[i])

    @classmethod
    def from_frames(
        cls, frames: Sequence[np.ndarray], dest: Path, names: Optional[Sequence[str]] = None, fps: float = 24.0
    ) -> "LoadedVideo":
        """Frames already in memory (benchmarks, tests)."""
        store = np.lib.format.open_memmap(
            dest / "frames.npy", mode="w+", dtype=np.uint8, shape=(len(frames), *frames[0].shape)
        )
        for i, f in enumerate(frames):
            store[i] = f
        return cls(store, list(names) if names else [f"{i:05d}" for i in range(len(frames))], fps, "frames")


def load_video(
    path: Path, dest: Path, *, max_frames: int, max_side: int, max_mb: Optional[float] = None
) -> LoadedVideo:
    """Decode a video file or a frames folder into ``dest/frames.npy``.

    A file over ``max_mb`` megabytes is refused; only the first ``max_frames`` frames are kept; frames whose
    longer side exceeds ``max_side`` are downscaled (INTER_AREA). Messages name the file, not its temp path.
    """
    import cv2

    from densekit.serve.imageio import open_video

    path = Path(path)
    name = path.name
    try:
        if max_mb is not None and path.is_file():
            mb = path.stat().st_size / 2**20
            if mb > max_mb:
                raise DensekitError(f"{name} is {mb:.1f} MB, over this app's video size limit of {max_mb:g} MB")
        src = open_video(path)
        n = min(len(src), max_frames)
        if n < 1:
            raise DensekitError(f"{name} has no frames")
        H, W = src.size
        s = min(1.0, max_side / max(H, W))
        h, w = (H, W) if s >= 1.0 else (max(1, round(H * s)), max(1, round(W * s)))
        store = np.lib.format.open_memmap(dest / "frames.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
        count = 0
        for frame in src:
            if count >= n:
                break
            store[count] = frame if s >= 1.0 else cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            count += 1
        store.flush()
    except DensekitError as exc:
        raise DensekitError(str(exc).replace(str(path), name)) from None
    notes = []
    if len(src) > n:
        notes.append(f"first {n} of {len(src)} frames (limit {max_frames})")
    if s < 1.0:
        notes.append(f"frames resized from {W}x{H} to {w}x{h}")
    return LoadedVideo(store, list(src.names[:n]), float(src.fps), name, "; ".join(notes))


def write_masks_zip(dest: Path, names: Sequence[str], masks: Iterable[np.ndarray]) -> Path:
    """A zip of ``<name>.png`` DAVIS palette masks (indexed PNG, ids as indices), written atomically."""
    from PIL import Image

    from densekit.serve.imageio import DAVIS_PALETTE

    palette = DAVIS_PALETTE.tobytes()
    with atomic_path(dest) as tmp:
        # PNG data is already deflated: storing avoids compressing it twice
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, mask in zip(names, masks, strict=True):
                im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
                im.putpalette(palette)
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                zf.writestr(f"{name}.png", buf.getvalue())
    return Path(dest)


def _downscale(image: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _draw_clicks(image: np.ndarray, clicks: Iterable[Click]) -> np.ndarray:
    import cv2

    r = max(3, round(min(image.shape[:2]) / 90))
    for c in clicks:
        centre = (int(round(c.x)), int(round(c.y)))
        colour = (0, 255, 0) if c.positive else (255, 0, 0)
        cv2.circle(image, centre, r + 1, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(image, centre, r, colour, -1, cv2.LINE_AA)
    return image


# ----------------------------------------------------------------------------------------------------
# per-session state: Track tab


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
        self._regions: Optional[tuple[tuple[int, int, int], FrameRegions]] = None
        self._propagator: Optional[tuple[Any, Any]] = None
        self._serial = 0
        self._downloads = 0

    def __deepcopy__(self, memo: dict) -> "TrackSession":
        # gr.State deep-copies a fresh session's initial value; the object is made per session already.
        return self

    def close(self) -> None:
        """Delete the session's files (called when Gradio drops the session)."""
        self.stop_event.set()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------------

    def load(self, engine: Engine, path: Any, annotations: Optional[Path] = None, limit_size: bool = True) -> str:
        """Load a video file or frames folder; returns a one-line description."""
        if self.tracking:
            raise DensekitError("Stop tracking before loading another video.")
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
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        note = f" ({video.note})" if video.note else ""
        return f"Loaded {video.label}: {n} frames of {W}x{H} at {video.fps:g} fps{note}. Click an object to select it."

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
        """Add a click at pixel (x, y) of frame ``i`` for object ``obj`` and recompute that object's mask."""
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
        """Frame ``i`` with its objects overlaid (and the clicks made on it), at most DISPLAY_MAX_SIDE."""
        from densekit.serve.imageio import overlay

        video = self.require_video()
        m = self.mask(i) if mask is None else mask
        img = overlay(video.frame(i), m, 0.5) if m.any() else video.frame(i)
        if clicks:
            img = _draw_clicks(img, [c for (f, _), cs in self.clicks.items() if f == i for c in cs])
        return _downscale(img)

    def display_scale(self) -> float:
        """Displayed width / frame width (clicks on the shown image are divided by it)."""
        H, W = self.require_video().size
        return min(1.0, DISPLAY_MAX_SIDE / max(H, W))

    # -- tracking ------------------------------------------------------------------------------------------

    def propagator(self, engine: Engine, short_side: Optional[int] = None) -> Any:
        """This session's MaskPropagator at a processing short side (made on first use, shared model)."""
        from densekit.retrieval.propagation import MaskPropagator

        config = engine.config(short_side, self.require_video().size)
        if self._propagator is None or self._propagator[0] != config:
            self._propagator = (config, MaskPropagator(engine.extractor, config))
        return self._propagator[1]

    def track(
        self, engine: Engine, start: Any, short_side: Optional[int] = None, render: bool = True, propagator: Any = None
    ) -> Iterator[TrackUpdate]:
        """Propagate frame ``start``'s objects to the end of the video, one :class:`TrackUpdate` per frame.

        The propagator (this session's, or ``propagator``) is (re)started from ``start``'s mask, so a corrected
        frame becomes the reference; masks of later frames are replaced as they come (frames not reached after
        a stop hold no mask). The loop ends early when :attr:`stop_event` is set (checked before each frame).
        ``render``: also draw each frame's overlay for display (``TrackUpdate.display``), as the page does.
        """
        video = self.require_video()
        i0 = self.check_frame(start)
        if self.tracking:
            raise DensekitError("Tracking is already running in this session.")
        if not self.objects_in(i0):
            raise DensekitError(f"Frame {i0} has no object: click on an object (or draw or upload a mask) first.")
        n = len(video)
        if i0 >= n - 1:
            raise DensekitError("This is the last frame: move the slider back to track from an earlier frame.")
        prop = propagator if propagator is not None else self.propagator(engine, short_side)
        self.tracking = True
        self.stop_event.clear()
        try:
            prop.start(video.frame(i0), self.mask(i0))
            self.has_mask[i0 + 1 :] = False
            for key in [k for k in self.clicks if k[0] > i0]:
                self.clicks.pop(key)
            for key in [k for k in self.bases if k[0] > i0]:
                self.bases.pop(key)
            t0 = time.perf_counter()
            for i in range(i0 + 1, n):
                if self.stop_event.is_set():
                    return
                ts = time.perf_counter()
                m = prop.step(video.frame(i))
                step = time.perf_counter() - ts
                self.set_mask(i, m)
                disp = self.render(i, m, clicks=False) if render else None
                yield TrackUpdate(i, n, m, step, i - i0, time.perf_counter() - t0, disp)
        finally:
            self.tracking = False

    def stop(self) -> str:
        if not self.tracking:
            return "Nothing is being tracked."
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


# ----------------------------------------------------------------------------------------------------
# per-session state: Webcam tab


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
        return self

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
        return _draw_clicks(img, [c for cs in self.clicks.values() for c in cs])

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


# ----------------------------------------------------------------------------------------------------
# search and features


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """``image`` with the outline of the (H, W) bool ``mask`` drawn on it (a copy)."""
    import cv2

    out = np.ascontiguousarray(image).copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, colour, max(2, round(max(out.shape[:2]) / 200)))
    return out


def search_point(
    engine: Engine, index_dir: Any, image: Any, x: Any, y: Any, k: int = 8
) -> tuple[list[tuple[np.ndarray, str]], np.ndarray, str]:
    """Segments nearest to the query image's segment under (x, y): (gallery items, query picture, status)."""
    from densekit.serve.imageio import read_image

    engine.index_root(index_dir)  # no index: say so before anything else
    if image is None:
        raise DensekitError("Choose a query image first.")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DensekitError("the query must be an RGB image")
    arr = np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)
    H, W = arr.shape[:2]
    try:
        pt = (float(x), float(y))
    except (TypeError, ValueError):
        raise DensekitError("Click a region of the query image.") from None
    if not (0 <= pt[0] < W and 0 <= pt[1] < H):
        raise DensekitError(f"point ({pt[0]:g}, {pt[1]:g}) is outside the {W}x{H} image")
    k = max(1, int(k))
    idx = engine.open_index(index_dir)
    try:
        found = idx.query_region(arr, point=pt, k=k)
        hits, region = found.hits, found.mask
        n_images = len(idx)
    finally:
        idx.close()
    items: list[tuple[np.ndarray, str]] = []
    for rank, h in enumerate(hits, 1):
        name = Path(h.path).name if h.path else f"image {h.image_id}"
        try:
            img = read_image(h.path) if h.path else None
        except DensekitError:
            img = None  # moved or deleted since it was indexed
        if img is None or img.shape[:2] != h.mask.shape:
            img = np.full((*h.mask.shape, 3), 40, np.uint8)
        items.append((_downscale(outline(img, h.mask), 320), f"#{rank} score {h.score:.3f} · {name}"))
    query = _downscale(outline(arr, region, (255, 255, 0)), DISPLAY_MAX_SIDE)
    status = f"{len(hits)} nearest segments among {n_images} indexed images (query region outlined in yellow)."
    return items, query, status


def build_index(engine: Engine, images_dir: Any, index_dir: Any = None, progress: Any = None) -> tuple[str, str]:
    """Index every image under ``images_dir`` into ``index_dir`` (new, or resumed); returns (index_dir, status)."""
    from densekit.retrieval.segment_index import DB_NAME, SegmentIndex, list_images

    if not images_dir or not str(images_dir).strip():
        raise DensekitError("Give the images folder to index.")
    files = list_images(Path(str(images_dir).strip()).expanduser())
    root = (
        Path(str(index_dir).strip()).expanduser() if index_dir and str(index_dir).strip() else engine.new_dir("index")
    )
    if (root / DB_NAME).is_file():
        idx = engine.open_index(root)
    else:
        idx = SegmentIndex.create(root, engine.extractor)
    try:
        done = [0]

        def tick(_name: str, _added: bool) -> None:
            done[0] += 1
            if progress is not None:
                progress((done[0], len(files)), desc="indexing")

        report = idx.add_images(files, progress=tick)
        total, segments = len(idx), idx.n_segments
    finally:
        idx.close()
    skipped = [r for _, r in report.skipped if r != "already indexed"]
    status = (
        f"Index {root}: added {len(report.added)} images ({report.segments} segments), {len(skipped)} skipped; "
        f"{total} images, {segments} segments in all. Click a region of a query image to search."
    )
    return str(root), status


def pca_picture(engine: Engine, frame: np.ndarray, short_side: Optional[int] = None) -> np.ndarray:
    """The first three PCA components of ``frame``'s dense features as an RGB picture of the frame's size."""
    from densekit.serve.viz import pca_rgb

    return _downscale(pca_rgb(engine.features(frame, short_side), size=frame.shape[:2]))


# ----------------------------------------------------------------------------------------------------
# the Gradio app


def _short_side(value: Any) -> Optional[int]:
    """A processing-size dropdown value: 0 or empty means automatic (None)."""
    try:
        return int(value) or None if value not in (None, "") else None
    except (TypeError, ValueError):
        raise DensekitError(f"processing size must be a number, got {value!r}") from None


def _threshold(value: Any) -> Optional[float]:
    try:
        t = float(value or 0)
    except (TypeError, ValueError):
        raise DensekitError(f"threshold must be a number, got {value!r}") from None
    return t if t > 0 else None



_WEBCAM_PROBE_JS = """
async () => {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "This browser gives the page no camera (a secure context, https or localhost, is needed).";
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({video: true});
    stream.getTracks().forEach((t) => t.stop());
    return "Camera ready: start the webcam, capture a frame, click the objects on it, then start tracking.";
  } catch (err) {
    if (err && (err.name === "NotAllowedError" || err.name === "SecurityError")) {
      return "Webcam access was denied: allow the camera for this site in the browser's settings and reload.";
    }
    return "No webcam available (" + (err && err.name ? err.name : "unknown error") + "): connect one and reload.";
  }
}
"""

def build_app(
    model: Any = DEFAULT_MODEL,
    index: Optional[Any] = None,
    *,
    max_video_mb: float = 200,
    max_frames: int = 600,
    preset: Optional[str] = None,
    samples_dir: Optional[Path] = DEFAULT_SAMPLES_DIR,
    short_side: Optional[int] = None,
    max_side: int = 1280,
    device: Optional[str] = None,
    concurrency: int = 4,
) -> Any:
    """The app as a ``gr.Blocks`` (not launched). See the module docstring for tabs and endpoints.

    model: backbone name, checkpoint, .onnx or .engine (loaded once per process), or an extractor object.
    index: a segment index folder for the Search tab. samples_dir: where the bundled sample sequences are
    made on first use (None: no samples). preset: propagation preset (default "live");
    short_side: default processing short side. max_video_mb / max_frames / max_side: limits on
    loaded videos. concurrency: events of one kind running at once across sessions (the model itself runs
    one call at a time).
    """
    import gradio as gr

    extractor = shared_extractor(model, device)
    label = model if isinstance(model, (str, Path)) else getattr(extractor.meta, "name", "model")
    engine = Engine(
        extractor,
        model_label=str(label),
        preset=preset,
        short_side=short_side,
        max_video_mb=max_video_mb,
        max_frames=max_frames,
        max_side=max_side,
        index=Path(index) if index else None,
        samples_dir=samples_dir,
    )
    if engine.index is not None:
        engine.open_index(engine.index).close()  # a bad --index fails now, in one line
    samples = engine.sample_names()
    resolutions = engine.resolutions()

    def warn(exc: BaseException) -> str:
        if isinstance(exc, DensekitError):
            msg = one_line(exc)
        else:  # a bug must not end the session: say so in the page, keep the traceback in the log
            log.exception("app handler failed")
            msg = f"Internal error ({type(exc).__name__}): {one_line(exc)}"
        gr.Warning(msg)
        return f"⚠️ {msg}"

    def object_choices(objects: Sequence[int], value: int) -> Any:
        return gr.update(choices=[(object_label(o), o) for o in sorted(objects)], value=value)

    def _close(session: Any) -> None:
        if isinstance(session, TrackSession):
            session.close()

    intro = (
        f"**densekit** · model `{engine.model_label}` (stride {extractor.meta.stride}, {extractor.provider}) · "
        f"preset `{engine.preset}`"
    )
    with gr.Blocks(title="densekit", delete_cache=(1800, 3600)) as demo:
        tstate = gr.State(TrackSession, delete_callback=_close)
        wstate = gr.State(WebcamSession)
        gr.Markdown(intro)
        with gr.Tabs():
            # ---------------------------------------------------------------------------------- Track
            with gr.Tab("Track", elem_id="tab-track"):
                with gr.Row():
                    with gr.Column(scale=1):
                        sample_dd = gr.Dropdown(
                            choices=samples,
                            value=samples[0] if samples else None,
                            label="Sample sequence",
                            elem_id="sample-dropdown",
                        )
                        with gr.Row():
                            load_sample_btn = gr.Button("Load sample", elem_id="load-sample-btn")
                            sample_gt_btn = gr.Button("Use sample annotation", elem_id="sample-gt-btn", size="sm")
                    with gr.Column(scale=1):
                        video_upload = gr.File(
                            label="Upload a video (mp4, avi, webm, mov, mkv)", type="filepath", elem_id="video-upload"
                        )
                    with gr.Column(scale=1):
                        frames_dir = gr.Textbox(label="Frames folder or video file on the server", elem_id="frames-dir")
                        load_dir_btn = gr.Button("Load folder", elem_id="load-dir-btn")
                status_md = gr.Markdown("Load a video: a sample, an upload or a frames folder.", elem_id="status-md")
                frame_slider = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="frame-slider")
                with gr.Row():
                    with gr.Column(scale=3):
                        frame_image = gr.Image(
                            label="Frame: click an object to select it",
                            interactive=False,
                            format="jpeg",
                            elem_id="frame-image",
                            buttons=["fullscreen"],
                        )
                    with gr.Column(scale=1):
                        click_mode = gr.Radio(
                            ["Positive", "Negative"], value="Positive", label="Click", elem_id="click-mode"
                        )
                        object_dd = gr.Dropdown(
                            choices=[(object_label(1), 1)], value=1, label="Object", elem_id="object-dropdown"
                        )
                        new_object_btn = gr.Button("New object", elem_id="new-object-btn")
                        clear_object_btn = gr.Button(
                            "Clear object on this frame", elem_id="clear-object-btn", size="sm"
                        )
                        threshold = gr.Slider(
                            0.0,
                            1.0,
                            value=0.0,
                            step=0.01,
                            label="Similarity threshold (0 = automatic)",
                            elem_id="click-threshold",
                        )
                        resolution_dd = gr.Dropdown(
                            choices=[(f"auto (video size, at most {resolutions[0]}p)", 0)]
                            + [(f"{r}p", r) for r in resolutions],
                            value=0,
                            label="Processing size (shorter side)",
                            elem_id="resolution-dropdown",
                        )
                with gr.Row():
                    with gr.Column(scale=3):
                        brush_editor = gr.ImageEditor(
                            label="Brush: paint the current object",
                            type="numpy",
                            image_mode="RGBA",
                            transforms=(),
                            layers=False,
                            brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"),
                            format="png",
                            elem_id="brush-editor",
                        )
                    with gr.Column(scale=1):
                        brush_action = gr.Radio(
                            ["Add", "Erase", "Replace"], value="Add", label="Brush applies as", elem_id="brush-action"
                        )
                        use_brush_btn = gr.Button("Apply drawing", elem_id="use-brush-btn")
                        mask_upload = gr.File(
                            label="Upload a mask PNG for this frame", type="filepath", elem_id="mask-upload"
                        )
                with gr.Row():
                    track_btn = gr.Button("Track from this frame", variant="primary", elem_id="track-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                fps_text = gr.Markdown("", elem_id="fps-text")
                overlay_image = gr.Image(
                    label="Tracking (live)", interactive=False, format="jpeg", elem_id="overlay-image"
                )
                with gr.Row():
                    with gr.Column():
                        download_masks_btn = gr.Button("Download masks (zip of PNGs)", elem_id="download-masks-btn")
                        masks_file = gr.File(label="Masks", interactive=False, elem_id="masks-file")
                    with gr.Column():
                        download_video_btn = gr.Button("Download overlay video (mp4)", elem_id="download-video-btn")
                        video_file = gr.File(label="Overlay video", interactive=False, elem_id="video-file")
                # API-only inputs: clients send click coordinates here (the page uses frame-image's .select)
                click_x = gr.Number(visible=False, elem_id="click-x")
                click_y = gr.Number(visible=False, elem_id="click-y")
                click_btn = gr.Button(visible=False, elem_id="click-btn")

            # ---------------------------------------------------------------------------------- Webcam
            with gr.Tab("Webcam", elem_id="tab-webcam") as webcam_tab:
                webcam_status = gr.Markdown(
                    "Start the webcam (the browser asks for permission; if it is denied, allow the camera in the "
                    "site settings and reload), capture a frame, click the objects on it, then start tracking.",
                    elem_id="webcam-status",
                )
                with gr.Row():
                    webcam_in = gr.Image(
                        sources=["webcam"], streaming=True, type="numpy", label="Webcam", elem_id="webcam-input",
                        # Gradio asks for 1920x1440 by default; the model runs at <= 480p anyway.
                        webcam_options=gr.WebcamOptions(
                            constraints={"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}
                        ),
                    )
                    webcam_out = gr.Image(label="Tracked", interactive=False, format="jpeg", elem_id="webcam-output")
                # Gradio 6 swallows a denied camera permission and the page stays silent: ask once
                # ourselves when the tab opens and say what happened.
                webcam_tab.select(None, None, [webcam_status], js=_WEBCAM_PROBE_JS)
                webcam_latency = gr.Markdown("", elem_id="webcam-latency")
                with gr.Row():
                    with gr.Column(scale=3):
                        webcam_capture = gr.Image(
                            label="Captured frame: click objects",
                            interactive=False,
                            format="jpeg",
                            elem_id="webcam-capture",
                        )
                    with gr.Column(scale=1):
                        webcam_capture_btn = gr.Button("Capture frame", elem_id="webcam-capture-btn")
                        webcam_mode = gr.Radio(
                            ["Positive", "Negative"], value="Positive", label="Click", elem_id="webcam-click-mode"
                        )
                        webcam_object = gr.Dropdown(
                            choices=[(object_label(1), 1)], value=1, label="Object", elem_id="webcam-object"
                        )
                        webcam_new_object_btn = gr.Button("New object", elem_id="webcam-new-object-btn")
                        webcam_res = gr.Dropdown(
                            choices=[(f"{r}p", r) for r in sorted(set(resolutions) | {240})],
                            value=240,
                            label="Processing size",
                            elem_id="webcam-resolution",
                        )
                        webcam_track_btn = gr.Button("Start tracking", variant="primary", elem_id="webcam-track-btn")
                        webcam_stop_btn = gr.Button("Stop tracking", elem_id="webcam-stop-btn")
                webcam_x = gr.Number(visible=False, elem_id="webcam-x")
                webcam_y = gr.Number(visible=False, elem_id="webcam-y")
                webcam_click_btn = gr.Button(visible=False, elem_id="webcam-click-btn")

            # ---------------------------------------------------------------------------------- Search
            with gr.Tab("Search", elem_id="tab-search"):
                search_status = gr.Markdown(
                    "Give an index folder (or build one from a folder of images), choose a query image and "
                    "click a region.",
                    elem_id="search-status",
                )
                with gr.Row():
                    index_dir = gr.Textbox(value=str(engine.index or ""), label="Index folder", elem_id="index-dir")
                    images_dir = gr.Textbox(label="Images folder to index", elem_id="images-dir")
                    build_index_btn = gr.Button("Build / update index", elem_id="build-index-btn")
                with gr.Row():
                    search_image = gr.Image(
                        label="Query image: click a region",
                        type="numpy",
                        sources=["upload", "clipboard"],
                        elem_id="search-image",
                    )
                    search_query = gr.Image(
                        label="Query region", interactive=False, format="jpeg", elem_id="search-query"
                    )
                search_k = gr.Slider(1, 24, value=8, step=1, label="Hits", elem_id="search-k")
                search_gallery = gr.Gallery(
                    label="Nearest segments", columns=4, format="jpeg", elem_id="search-gallery"
                )
                search_x = gr.Number(visible=False, elem_id="search-x")
                search_y = gr.Number(visible=False, elem_id="search-y")
                search_btn = gr.Button(visible=False, elem_id="search-btn")

            # ---------------------------------------------------------------------------------- Features
            with gr.Tab("Features", elem_id="tab-features"):
                pca_status = gr.Markdown(
                    "The first three principal components of the dense features of a frame of the loaded "
                    "video, as RGB.",
                    elem_id="pca-status",
                )
                pca_frame_slider = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="pca-frame-slider")
                pca_btn = gr.Button("Show features", elem_id="pca-btn")
                pca_image = gr.Image(label="PCA of the features", interactive=False, format="jpeg", elem_id="pca-image")

        # -------------------------------------------------------------------------------- Track events
        view_outputs = [
            status_md,
            frame_slider,
            frame_image,
            object_dd,
            brush_editor,
            pca_frame_slider,
            overlay_image,
            fps_text,
            masks_file,
            video_file,
        ]

        def loaded(session: TrackSession, message: str) -> dict:
            n = len(session.video)  # type: ignore[arg-type]
            first = session.render(0)
            return {
                status_md: message,
                frame_slider: gr.update(minimum=0, maximum=max(n - 1, 1), value=0),
                pca_frame_slider: gr.update(minimum=0, maximum=max(n - 1, 1), value=0),
                frame_image: first,
                brush_editor: {"background": first, "layers": [], "composite": first},
                object_dd: object_choices(session.objects, session.current),
                overlay_image: None,
                fps_text: "",
                masks_file: None,
                video_file: None,
            }

        def on_load_sample(session: TrackSession, name: Any) -> dict:
            try:
                root = engine.sample_root()
                if root is None or not name or str(name) not in samples:
                    raise DensekitError("Choose one of the bundled samples.")
                frames = root / "JPEGImages" / "480p" / str(name)
                msg = session.load(
                    engine, frames, annotations=root / "Annotations" / "480p" / str(name), limit_size=False
                )
                return loaded(session, msg)
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_load_video(session: TrackSession, path: Any) -> dict:
            try:
                if path is None:
                    raise DensekitError("Choose a video file to upload.")
                return loaded(session, session.load(engine, path))
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_load_frames(session: TrackSession, folder: Any) -> dict:
            try:
                return loaded(session, session.load(engine, folder, limit_size=False))
            except Exception as exc:
                return {status_md: warn(exc)}

        edit_outputs = [frame_image, status_md, object_dd]

        def edited(session: TrackSession, i: int, message: str) -> dict:
            return {
                frame_image: session.render(i),
                status_md: message,
                object_dd: object_choices(session.objects, session.current),
            }

        def on_show_frame(session: TrackSession, i: Any) -> dict:
            try:
                i = session.check_frame(i)
                img = session.render(i)
                ids = session.objects_in(i)
                what = f"objects {', '.join(map(str, ids))}" if ids else "no object"
                return {
                    frame_image: img,
                    brush_editor: {"background": img, "layers": [], "composite": img},
                    status_md: f"Frame {i}: {what}.",
                }
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_click(session: TrackSession, i: Any, obj: Any, mode: Any, thr: Any, side: Any, x: Any, y: Any) -> dict:
            try:
                msg = session.click(engine, i, obj, x, y, mode != "Negative", _threshold(thr), _short_side(side))
                return edited(session, int(i), msg)
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_click_select(
            session: TrackSession, i: Any, obj: Any, mode: Any, thr: Any, side: Any, evt: gr.SelectData
        ) -> dict:
            try:
                if session.video is None:
                    raise DensekitError(NO_VIDEO)
                s = session.display_scale()
                x, y = evt.index[0] / s, evt.index[1] / s
            except Exception as exc:
                return {status_md: warn(exc)}
            return on_click(session, i, obj, mode, thr, side, x, y)

        def on_new_object(session: TrackSession) -> dict:
            try:
                o = session.new_object()
                return {
                    object_dd: object_choices(session.objects, o),
                    status_md: f"New {object_label(o)}: click it on the frame.",
                }
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_clear_object(session: TrackSession, i: Any, obj: Any) -> dict:
            try:
                return edited(session, int(i), session.clear_object(i, obj))
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_brush(session: TrackSession, i: Any, obj: Any, editor: Any, action: Any) -> dict:
            try:
                msg = session.brush(i, obj, editor, action or "Add")
                out = edited(session, int(i), msg)
                img = out[frame_image]
                out[brush_editor] = {"background": img, "layers": [], "composite": img}
                return out
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_mask_upload(session: TrackSession, i: Any, obj: Any, path: Any) -> dict:
            try:
                return edited(session, int(i), session.upload_mask(i, obj, path))
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_sample_annotation(session: TrackSession, i: Any) -> dict:
            try:
                return edited(session, int(i), session.use_annotation(i))
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_track(session: TrackSession, start: Any, side: Any) -> Iterator[dict]:
            last = None
            updates: Optional[Iterator[TrackUpdate]] = None
            try:
                updates = session.track(engine, start, _short_side(side))
                yield {status_md: f"Tracking from frame {start}...", fps_text: ""}
                for u in updates:
                    last = u
                    yield {
                        overlay_image: u.display,
                        fps_text: f"{u.fps:.1f} fps · frame {u.index + 1}/{u.total} · "
                        f"{u.step_seconds * 1e3:.0f} ms model + propagation",
                    }
            except Exception as exc:
                yield {status_md: warn(exc)}
                return
            finally:
                if updates is not None:
                    updates.close()  # a cancelled event must still end the session's tracking state
            if last is None:
                yield {status_md: "Stopped before the first frame."}
                return
            end = "Stopped" if last.index < last.total - 1 else "Done"
            img = session.render(last.index)
            yield {
                status_md: f"{end} at frame {last.index} ({last.frames_done} frames at {last.fps:.1f} fps). "
                "Correct any frame and track again from it, or download the results.",
                frame_slider: gr.update(value=last.index),
                frame_image: img,
                # The brush paints on the frame the slider now shows, not the one tracking started from.
                brush_editor: {"background": img, "layers": [], "composite": img},
            }

        def on_stop(session: TrackSession) -> dict:
            return {status_md: session.stop()}

        def on_download_masks(session: TrackSession) -> dict:
            try:
                path = session.export_masks()
                n = len(session.require_video())
                return {masks_file: str(path), status_md: f"Masks of {n} frames: {path.name}."}
            except Exception as exc:
                return {status_md: warn(exc)}

        def on_download_video(session: TrackSession) -> dict:
            try:
                path = session.export_video()
                return {video_file: str(path), status_md: f"Overlay video: {path.name}."}
            except Exception as exc:
                return {status_md: warn(exc)}

        load_sample_btn.click(on_load_sample, [tstate, sample_dd], view_outputs, api_name="load_sample")
        video_upload.upload(on_load_video, [tstate, video_upload], view_outputs, api_name="load_video")
        load_dir_btn.click(on_load_frames, [tstate, frames_dir], view_outputs, api_name="load_frames")
        sample_gt_btn.click(on_sample_annotation, [tstate, frame_slider], edit_outputs, api_name="sample_annotation")
        frame_slider.release(
            on_show_frame, [tstate, frame_slider], [frame_image, brush_editor, status_md], api_name="show_frame"
        )
        click_inputs = [tstate, frame_slider, object_dd, click_mode, threshold, resolution_dd]
        click_btn.click(on_click, [*click_inputs, click_x, click_y], edit_outputs, api_name="click")
        frame_image.select(
            on_click_select, click_inputs, edit_outputs, api_name="click_select", api_visibility="undocumented"
        )
        new_object_btn.click(on_new_object, [tstate], [object_dd, status_md], api_name="new_object")
        clear_object_btn.click(
            on_clear_object, [tstate, frame_slider, object_dd], edit_outputs, api_name="clear_object"
        )
        use_brush_btn.click(
            on_brush,
            [tstate, frame_slider, object_dd, brush_editor, brush_action],
            [*edit_outputs, brush_editor],
            api_name="use_brush",
        )
        mask_upload.upload(
            on_mask_upload, [tstate, frame_slider, object_dd, mask_upload], edit_outputs, api_name="upload_mask"
        )
        track_btn.click(
            on_track,
            [tstate, frame_slider, resolution_dd],
            [overlay_image, fps_text, status_md, frame_slider, frame_image, brush_editor],
            api_name="track",
            show_progress="hidden",
        )
        stop_btn.click(on_stop, [tstate], [status_md], api_name="stop", concurrency_limit=None, show_progress="hidden")
        download_masks_btn.click(on_download_masks, [tstate], [masks_file, status_md], api_name="download_masks")
        download_video_btn.click(on_download_video, [tstate], [video_file, status_md], api_name="download_video")

        # ------------------------------------------------------------------------------- Webcam events
        def on_webcam_frame(session: WebcamSession, frame: Any) -> dict:
            try:
                r = webcam_step(session, frame)
            except Exception as exc:
                return {webcam_status: warn(exc)}
            if r.dropped:
                return {}
            out = {webcam_out: r.display, webcam_latency: f"{r.latency_ms:.0f} ms per frame"}
            if r.status:
                out[webcam_status] = r.status
            return out

        def on_webcam_capture(session: WebcamSession) -> dict:
            try:
                session.capture()
                return {webcam_capture: session.view(), webcam_status: "Captured: click the objects to track on it."}
            except Exception as exc:
                return {webcam_status: warn(exc)}

        def on_webcam_click(session: WebcamSession, mode: Any, obj: Any, side: Any, x: Any, y: Any) -> dict:
            try:
                msg = session.click(engine, obj, x, y, mode != "Negative", _short_side(side))
                return {webcam_capture: session.view(), webcam_status: msg}
            except Exception as exc:
                return {webcam_status: warn(exc)}

        def on_webcam_select(session: WebcamSession, mode: Any, obj: Any, side: Any, evt: gr.SelectData) -> dict:
            return on_webcam_click(session, mode, obj, side, evt.index[0], evt.index[1])

        def on_webcam_new_object(session: WebcamSession) -> dict:
            try:
                o = session.new_object()
                return {webcam_object: object_choices(session.objects, o), webcam_status: f"New {object_label(o)}."}
            except Exception as exc:
                return {webcam_status: warn(exc)}

        def on_webcam_track(session: WebcamSession, side: Any) -> dict:
            try:
                return {webcam_status: session.start(engine, _short_side(side))}
            except Exception as exc:
                return {webcam_status: warn(exc)}

        def on_webcam_stop(session: WebcamSession) -> dict:
            return {webcam_status: session.stop()}

        webcam_in.stream(
            on_webcam_frame,
            [wstate, webcam_in],
            [webcam_out, webcam_latency, webcam_status],
            api_name="webcam_frame",
            stream_every=0.1,
            time_limit=600,
            concurrency_limit=concurrency,
            show_progress="hidden",
        )
        webcam_capture_btn.click(
            on_webcam_capture, [wstate], [webcam_capture, webcam_status], api_name="webcam_capture"
        )
        webcam_click_btn.click(
            on_webcam_click,
            [wstate, webcam_mode, webcam_object, webcam_res, webcam_x, webcam_y],
            [webcam_capture, webcam_status],
            api_name="webcam_click",
        )
        webcam_capture.select(
            on_webcam_select,
            [wstate, webcam_mode, webcam_object, webcam_res],
            [webcam_capture, webcam_status],
            api_name="webcam_select",
            api_visibility="undocumented",
        )
        webcam_new_object_btn.click(
            on_webcam_new_object, [wstate], [webcam_object, webcam_status], api_name="webcam_new_object"
        )
        webcam_track_btn.click(on_webcam_track, [wstate, webcam_res], [webcam_status], api_name="webcam_track")
        webcam_stop_btn.click(on_webcam_stop, [wstate], [webcam_status], api_name="webcam_stop", concurrency_limit=None)

        # ------------------------------------------------------------------------------- Search events
        def on_build_index(
            index_folder: Any,
            images_folder: Any,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects the tracker through this default
        ) -> dict:
            try:
                root, msg = build_index(engine, images_folder, index_folder, progress)
                return {index_dir: root, search_status: msg}
            except Exception as exc:
                return {search_status: warn(exc)}

        def on_search(index_folder: Any, image: Any, k: Any, x: Any, y: Any) -> dict:
            try:
                items, query, msg = search_point(engine, index_folder, image, x, y, int(k or 8))
                return {search_gallery: items, search_query: query, search_status: msg}
            except Exception as exc:
                return {search_status: warn(exc)}

        def on_search_select(index_folder: Any, image: Any, k: Any, evt: gr.SelectData) -> dict:
            return on_search(index_folder, image, k, evt.index[0], evt.index[1])

        build_index_btn.click(
            on_build_index, [index_dir, images_dir], [index_dir, search_status], api_name="build_index"
        )
        search_btn.click(
            on_search,
            [index_dir, search_image, search_k, search_x, search_y],
            [search_gallery, search_query, search_status],
            api_name="search",
        )
        search_image.select(
            on_search_select,
            [index_dir, search_image, search_k],
            [search_gallery, search_query, search_status],
            api_name="search_select",
            api_visibility="undocumented",
        )

        # ----------------------------------------------------------------------------- Features events
        def on_pca(session: TrackSession, i: Any, side: Any) -> dict:
            try:
                i = session.check_frame(i)
                pic = pca_picture(engine, session.video.frame(i), _short_side(side))  # type: ignore[union-attr]
                return {
                    pca_image: pic,
                    pca_status: f"Frame {i}: first three PCA components of {engine.model_label}'s features.",
                }
            except Exception as exc:
                return {pca_status: warn(exc)}

        pca_btn.click(on_pca, [tstate, pca_frame_slider, resolution_dd], [pca_image, pca_status], api_name="pca")
        pca_frame_slider.release(
            on_pca, [tstate, pca_frame_slider, resolution_dd], [pca_image, pca_status], api_name="pca_frame"
        )

    for fn in demo.fns.values():
        # gr.State(callable) adds a page-load event named after the callable; it is plumbing, not API
        if fn.fn in (TrackSession, WebcamSession):
            fn.api_visibility = "undocumented"
    demo.queue(default_concurrency_limit=concurrency)
    demo.engine = engine  # for tests and benchmarks: the shared model and settings
    return demo


def launch_kwargs(max_video_mb: float) -> dict[str, Any]:
    """``demo.launch`` settings the CLI uses: uploads are bounded a little above the video limit, so a video
    just over it gets the app's own message while a huge upload is refused by the server."""
    return {"max_file_size": f"{int(max_video_mb * 1.5) + 1}mb", "footer_links": ["api", "gradio"]}
