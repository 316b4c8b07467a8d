"""Image, mask and video I/O with DAVIS conventions.

Conventions (DAVIS, Pont-Tuset et al. 2017, and the official ``davis2017-evaluation`` code):

* Frames are ``(H, W, 3)`` uint8 RGB.
* Masks are ``(H, W)`` uint8 object ids: 0 is background, 1..N are objects, 255 is void (kept as is).
  On disk they are indexed ('P'-mode) PNGs with the PASCAL-VOC colormap, the palette of DAVIS-2017
  annotations; the evaluation code reads them with ``np.array(Image.open(p))`` and uses the indices.
* DAVIS-2016 masks are grayscale 0/255 (some with an alpha channel); they are read as 0/1.

Videos come either as a folder of frames or as a video file decoded by OpenCV; both stream frames
one at a time so a long video never sits in memory whole.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError

__all__ = [
    "DAVIS_PALETTE",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "VideoSource",
    "natural_key",
    "open_video",
    "overlay",
    "read_image",
    "read_mask",
    "write_mask",
    "write_overlay_video",
]

# Every still-image suffix densekit reads (frame folders, calibration and index folders, training images);
# Pillow decodes them all.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".avi", ".webm", ".mov", ".mkv")
DEFAULT_FOLDER_FPS = 24.0

# Containers that store a per-stream frame count in an index (mp4/mov 'stts', avi 'idx1'); OpenCV's
# CAP_PROP_FRAME_COUNT for the others (Matroska/WebM) is an estimate from duration * fps.
_INDEXED_CONTAINERS = (".mp4", ".m4v", ".mov", ".avi")


def _voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL-VOC colormap (Everingham et al., VOCdevkit ``labelcolormap.m``), also DAVIS-2017's.

    The bits of the index are interleaved into the high bits of R, G, B: bit 0 -> R bit 7,
    bit 1 -> G bit 7, bit 2 -> B bit 7, bit 3 -> R bit 6, and so on. Index 1 = (128, 0, 0),
    2 = (0, 128, 0), 255 = (224, 224, 192) (the VOC void colour). All 256 colours are distinct.
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


DAVIS_PALETTE: np.ndarray = _voc_colormap(256)
DAVIS_PALETTE.setflags(write=False)

# RGB packed into one int -> palette index, for reading colour (RGB) masks.
_PALETTE_KEYS = (
    DAVIS_PALETTE[:, 0].astype(np.int64) << 16 | DAVIS_PALETTE[:, 1].astype(np.int64) << 8 | DAVIS_PALETTE[:, 2]
)
_KEY_ORDER = np.argsort(_PALETTE_KEYS)
_SORTED_KEYS = _PALETTE_KEYS[_KEY_ORDER]


def _cv2():  # noqa: ANN202 - the cv2 module
    """Import OpenCV with FFmpeg's own stderr logging off (unless the user set a level).

    FFmpeg prints lines like ``moov atom not found`` for files we already report as one-line
    DensekitErrors; ``OPENCV_FFMPEG_LOGLEVEL`` is read when the FFmpeg backend first initialises.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    return cv2


def natural_key(name: str) -> list[object]:
    """Sort key that orders ``frame2`` before ``frame10`` (digit runs compare as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _open_pil(path: str | os.PathLike[str], what: str) -> Image.Image:
    """Open and fully decode an image, turning every failure into one-line DensekitError."""
    p = Path(path)
    if not p.exists():
        raise DensekitError(f"{what} not found: {p}")
    if p.is_dir():
        raise DensekitError(f"{what} is a folder, not an image file: {p}")
    im = None
    try:
        im = Image.open(p)
        im.load()  # decode now: a truncated file fails here, not later in np.asarray
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if im is not None:
            im.close()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DensekitError(f"cannot read {what} {p}: {reason}") from None
    return im


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """Map an integer/float single-channel array of unknown depth to uint8 (16-bit -> high byte)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        # PIL 'F' images: assume [0, 1] when they look normalised, else [0, 255].
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    if a.max(initial=0) > 255:  # 16-bit data (PIL reads 16-bit PNGs as 'I;16' or 'I')
        return np.clip((a + 128) // 257, 0, 255).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB.

    Grayscale becomes RGB by repetition; 16-bit images are scaled to 8 bits; palette images are
    expanded. RGBA/LA images are read by *dropping* the alpha channel (no compositing onto a
    background colour), so the stored colour of transparent pixels is what you get. EXIF orientation
    is not applied, so pixels line up with masks the way DAVIS tooling (plain ``Image.open``) sees them.

    Raises:
        DensekitError: the file is missing or cannot be decoded.
    """
    with _open_pil(path, "image") as im:
        return _image_to_rgb(im, path)


def _image_to_rgb(im: Image.Image, path: str | os.PathLike[str]) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        g = _to_8bit(np.asarray(im))
        arr = np.repeat(g[:, :, None], 3, axis=2)
    elif mode in ("RGBA", "RGBX", "RGBa"):
        arr = np.asarray(im)[:, :, :3]
    elif mode in ("LA", "La"):
        g = np.asarray(im)[:, :, 0]
        arr = np.repeat(g[:, :, None], 3, axis=2)
    elif mode in ("PA", "P"):
        arr = np.asarray(im.convert("RGBA"))[:, :, :3]
    else:  # L, 1, CMYK, YCbCr, LAB, HSV...
        arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DensekitError(f"cannot read image {path}: unexpected mode {mode}")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _colour_mask_to_ids(rgb: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Map each RGB colour of a colour-coded mask to its DAVIS_PALETTE index."""
    keys = rgb[:, :, 0].astype(np.int64) << 16 | rgb[:, :, 1].astype(np.int64) << 8 | rgb[:, :, 2]
    uniq, inv = np.unique(keys, return_inverse=True)
    pos = np.clip(np.searchsorted(_SORTED_KEYS, uniq), 0, len(_SORTED_KEYS) - 1)
    found = _SORTED_KEYS[pos] == uniq
    if not found.all():
        k = int(uniq[~found][0])
        colour = ((k >> 16) & 255, (k >> 8) & 255, k & 255)
        raise DensekitError(
            f"mask {path}: colour {colour} is not in the DAVIS palette "
            f"({int((~found).sum())} unknown colour(s)); save masks as indexed PNGs or with palette colours"
        )
    ids = _KEY_ORDER[pos].astype(np.uint8)
    return ids[inv.reshape(keys.shape)]


def _gray_ids(g: np.ndarray, full: int) -> np.ndarray:
    """Grayscale mask values -> ids: a binary {0, full} mask (DAVIS-2016) becomes {0, 1}."""
    # Two counts decide "binary" at a fraction of np.unique's cost (which sorts a 480p frame in ~4 ms);
    # the evaluator reads every ground-truth frame through here.
    is_full = g == full
    n_full = int(np.count_nonzero(is_full))
    if n_full and n_full == int(np.count_nonzero(g)):
        return is_full.view(np.uint8) if is_full.dtype == np.bool_ else is_full.astype(np.uint8)
    top = int(g.max(initial=0))
    if top > 255:
        raise DensekitError(f"mask values go up to {top}; object ids must be 0..255")
    return g.astype(np.uint8)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a mask as ``(H, W)`` uint8 object ids.

    * palette ('P') PNG -> the indices (DAVIS-2017; 255 = void stays 255);
    * 'L' / 'LA' (alpha ignored) with values in {0, 255} -> {0, 1} (DAVIS-2016 binary masks);
      other grayscale values -> used as ids as they are;
    * 'I' / 'I;16' -> like 'L' (a {0, 65535} or {0, 255} mask -> {0, 1});
    * '1' (bilevel) -> {0, 1};
    * RGB / RGBA colour masks -> each colour mapped to its DAVIS_PALETTE index (an RGB file with equal
      channels is treated as grayscale); in RGBA, fully transparent pixels are background (0).

    Raises:
        DensekitError: missing/undecodable file, a colour not in the palette, or ids above 255.
    """
    with _open_pil(path, "mask") as im:
        return _mask_to_ids(im, path)


def _mask_to_ids(im: Image.Image, path: str | os.PathLike[str]) -> np.ndarray:
    mode = im.mode
    try:
        if mode == "P":
            return np.ascontiguousarray(np.asarray(im), dtype=np.uint8)
        if mode == "PA":
            return np.ascontiguousarray(np.asarray(im.getchannel(0)), dtype=np.uint8)
        if mode == "1":
            return np.asarray(im, dtype=np.uint8)
        if mode in ("L", "LA", "La"):
            g = np.asarray(im.getchannel(0)) if mode != "L" else np.asarray(im)
            return _gray_ids(g, 255)
        if mode.startswith("I"):
            g = np.asarray(im).astype(np.int64)
            full = 65535 if g.max(initial=0) > 255 else 255
            return _gray_ids(g, full)
        if mode in ("RGB", "RGBA", "RGBX"):
            arr = np.asarray(im)
            rgb = arr[:, :, :3]
            if (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all():
                ids = _gray_ids(rgb[:, :, 0], 255)
            else:
                ids = _colour_mask_to_ids(rgb, path)
            if mode == "RGBA":
                ids = np.where(arr[:, :, 3] == 0, 0, ids).astype(np.uint8)
            return np.ascontiguousarray(ids)
    except DensekitError as exc:
        msg = str(exc)
        raise DensekitError(msg if str(path) in msg else f"mask {path}: {msg}") from None
    raise DensekitError(f"mask {path}: unsupported image mode {mode}")


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write ``(H, W)`` ids as an indexed PNG with DAVIS_PALETTE (atomically), as DAVIS-2017 does.

    Raises:
        DensekitError: the array is not 2-D or holds values outside 0..255.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise DensekitError(f"mask must be (H, W), got shape {m.shape}")
    if m.dtype == np.bool_:
        m = m.astype(np.uint8)
    if not np.issubdtype(m.dtype, np.integer):
        raise DensekitError(f"mask must hold integer ids, got dtype {m.dtype}")
    if m.size and (int(m.min()) < 0 or int(m.max()) > 255):
        raise DensekitError(f"mask ids must be in 0..255, got {int(m.min())}..{int(m.max())}")
    im = Image.fromarray(np.ascontiguousarray(m, dtype=np.uint8), mode="L")
    im.putpalette(DAVIS_PALETTE.tobytes())  # 'L' + palette -> 'P' with the same indices
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", optimize=False)


# ----------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------


class VideoSource:
    """A video as a stream of ``(H, W, 3)`` uint8 RGB frames.

    Attributes:
        path: the folder or file.
        names: frame stems (folder: file stems in natural order; file: ``'00000'``, ``'00001'``...).
        fps: frames per second (container value for files; the given default for folders).
        size: ``(H, W)`` of every frame.
        is_folder: whether frames come from a folder of images.
        frame_paths: the image files (folders only; empty for video files).

    Iterating decodes one frame at a time; the object can be iterated several times.
    """

    def __init__(
        self,
        path: Path,
        names: list[str],
        fps: float,
        size: tuple[int, int],
        frame_paths: list[Path] | None = None,
    ) -> None:
        self.path = path
        self.names = names
        self.fps = fps
        self.size = size
        self.frame_paths = frame_paths or []
        self.is_folder = frame_paths is not None

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        kind = "folder" if self.is_folder else "file"
        return f"VideoSource({str(self.path)!r}, {kind}, frames={len(self)}, size={self.size}, fps={self.fps:g})"

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.is_folder:
            yield from self._iter_folder()
        else:
            yield from self._iter_file()

    def _iter_folder(self) -> Iterator[np.ndarray]:
        for p in self.frame_paths:
            frame = read_image(p)
            if frame.shape[:2] != self.size:
                raise DensekitError(
                    f"frame {p.name} is {frame.shape[1]}x{frame.shape[0]}, the first frame is "
                    f"{self.size[1]}x{self.size[0]}; all frames of a video must have one size"
                )
            yield frame

    def _iter_file(self) -> Iterator[np.ndarray]:
        cv2 = _cv2()
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise DensekitError(f"cannot open video {self.path}")
            n = len(self)
            for i in range(n):
                ok, bgr = cap.read()
                if not ok or bgr is None:
                    raise DensekitError(
                        f"video {self.path} ended after {i} of {n} frames; the file may be truncated"
                    )
                yield _bgr_to_rgb(bgr)
        finally:
            cap.release()


def _bgr_to_rgb(bgr: np.ndarray) -> np.ndarray:
    import cv2

    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    if bgr.shape[2] == 4:
        return cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open_folder(path: Path, fps: float) -> VideoSource:
    files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise DensekitError(f"no frames ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in folder {path}")
    files.sort(key=lambda p: natural_key(p.name))
    names = [p.stem for p in files]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DensekitError(f"folder {path} has two frames named {dup!r} (different extensions)")
    with _open_pil(files[0], "frame") as first:
        w, h = first.size
    return VideoSource(path, names, float(fps), (h, w), frame_paths=files)


def _count_by_decoding(path: Path) -> int:
    """Count the frames a decoder actually delivers (``grab`` skips the colour conversion)."""
    cv2 = _cv2()

    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def _open_file(path: Path, fps_default: float, exact_count: bool | None) -> VideoSource:
    cv2 = _cv2()

    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise DensekitError(
            f"{path} is neither a folder of frames nor a video file ({'/'.join(s[1:] for s in VIDEO_SUFFIXES)})"
        )
    if path.stat().st_size == 0:
        raise DensekitError(f"video {path} is empty (0 bytes)")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise DensekitError(f"cannot open video {path}: not a video OpenCV can decode")
        ok, bgr = cap.read()
        if not ok or bgr is None:
            raise DensekitError(f"video {path} has no decodable frames")
        h, w = bgr.shape[:2]
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        reported = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        cap.release()
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = float(fps_default)
    reported_n = int(reported) if math.isfinite(reported) and reported > 0 else 0
    if exact_count is None:
        exact_count = reported_n <= 0 or path.suffix.lower() not in _INDEXED_CONTAINERS
    n = _count_by_decoding(path) if exact_count else reported_n
    if n <= 0:
        raise DensekitError(f"video {path} has no decodable frames")
    return VideoSource(path, [f"{i:05d}" for i in range(n)], fps, (h, w), frame_paths=None)


def open_video(
    path: str | os.PathLike[str],
    fps: float = DEFAULT_FOLDER_FPS,
    exact_count: bool | None = None,
) -> VideoSource:
    """Open a folder of frames or a video file as a :class:`VideoSource`.

    Args:
        path: a folder of jpg/jpeg/png/bmp/webp frames (natural sort order, so ``2.jpg`` comes before
            ``10.jpg``) or a video file (mp4/m4v/avi/webm/mov/mkv) that OpenCV can decode.
        fps: frame rate reported for folders, and for files whose container has none.
        exact_count: count video frames by decoding them all. ``None`` (default) decodes only when the
            container's count is missing or is an estimate (WebM/MKV); mp4/mov/avi indexes are trusted.

    Raises:
        DensekitError: missing path, empty folder, a file that is not a decodable video, zero frames.
    """
    p = Path(path)
    if not p.exists():
        raise DensekitError(f"video not found: {p}")
    if p.is_dir():
        return _open_folder(p, fps)
    return _open_file(p, fps, exact_count)


# ----------------------------------------------------------------------------------------------------
# Visualisation
# ----------------------------------------------------------------------------------------------------


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend DAVIS_PALETTE colours over object pixels and draw each object's contour.

    Args:
        frame: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8 ids; 0 is left untouched, every other id (255 void too) is coloured.
        alpha: weight of the object colour in the blend (0 = frame only, 1 = flat colour).

    Returns:
        ``(H, W, 3)`` uint8 RGB; contours (object colour, full strength) keep neighbouring objects
        and thin parts readable.
    """
    import cv2

    f = np.asarray(frame)
    m = np.asarray(mask)
    if f.ndim != 3 or f.shape[2] != 3:
        raise DensekitError(f"frame must be (H, W, 3), got shape {f.shape}")
    if m.shape != f.shape[:2]:
        raise DensekitError(f"mask shape {m.shape} does not match frame size {f.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise DensekitError(f"overlay alpha must be in [0, 1], got {alpha}")
    f = f.astype(np.uint8, copy=False)
    m = m.astype(np.uint8, copy=False)
    colours = DAVIS_PALETTE[m].astype(np.float32)
    blend = (1.0 - alpha) * f.astype(np.float32) + alpha * colours
    out = np.where((m > 0)[:, :, None], np.clip(blend + 0.5, 0, 255).astype(np.uint8), f)
    out = np.ascontiguousarray(out)
    thickness = max(1, round(min(m.shape) / 240))
    for obj in np.unique(m):
        if obj == 0:
            continue
        contours, _ = cv2.findContours((m == obj).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        colour = tuple(int(c) for c in DAVIS_PALETTE[obj])
        cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def write_overlay_video(
    path: str | os.PathLike[str],
    frames: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    fps: float,
    alpha: float = 0.5,
) -> None:
    """Write frames with their masks overlaid (:func:`overlay`) as an mp4 (MPEG-4 'mp4v'), atomically.

    Frames and masks are consumed as streams, one pair at a time. 'mp4v' is used because it is
    available in opencv-python-headless without an external H.264 encoder.

    Raises:
        DensekitError: no frames, frames and masks of different counts or sizes, a bad fps, or the
            writer cannot be opened.
    """
    cv2 = _cv2()

    if not math.isfinite(fps) or fps <= 0:
        raise DensekitError(f"fps must be positive, got {fps}")
    mask_iter = iter(masks)
    n = 0
    writer = None
    size: tuple[int, int] | None = None
    with atomic_path(path) as tmp:
        try:
            for frame in frames:
                try:
                    mask = next(mask_iter)
                except StopIteration:
                    raise DensekitError(f"fewer masks than frames (ran out at frame {n})") from None
                vis = overlay(frame, mask, alpha)
                if writer is None:
                    size = vis.shape[:2]
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (size[1], size[0]))
                    if not writer.isOpened():
                        raise DensekitError(f"cannot open a video writer for {path}")
                elif vis.shape[:2] != size:
                    raise DensekitError(f"frame {n} is {vis.shape[1]}x{vis.shape[0]}, the first is {size[1]}x{size[0]}")
                writer.write(cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
                n += 1
            if n == 0:
                raise DensekitError("no frames to write")
            if next(mask_iter, None) is not None:
                raise DensekitError(f"more masks than frames ({n} frames)")
        finally:
            if writer is not None:
                writer.release()
