"""A video held by a session (decoded once into a memory map) and the masks download (a zip of DAVIS PNGs)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError


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
    path: Path,
    dest: Path,
    *,
    max_frames: int,
    max_side: int,
    max_mb: Optional[float] = None,
    name: Optional[str] = None,
) -> LoadedVideo:
    """Decode a video file or a frames folder into ``dest/frames.npy``.

    A file over ``max_mb`` megabytes is refused; only the first ``max_frames`` frames are kept; frames whose
    longer side exceeds ``max_side`` are downscaled (INTER_AREA). ``name``: how messages call ``path``
    (default its file name: an upload's temporary path means nothing to the user; a path the user typed is
    given in full, so they see which one was read).
    """
    import cv2

    from densekit.serve.imageio import open_video

    path = Path(path)
    name = name or path.name
    try:
        if not path.exists():
            raise DensekitError(f"No folder or video file at {name} (a path on the server running the app).")
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
    return LoadedVideo(store, list(src.names[:n]), float(src.fps), path.name, "; ".join(notes))


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
