"""What every session of one app shares: one model behind one lock, the propagation preset, limits, samples.

One extractor is loaded per process and model (:func:`shared_extractor`); :class:`LockedExtractor` lets one
call run at a time, so sessions queue on the model rather than slow each other down.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

from densekit.serve.errors import DensekitError


DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_SAMPLES_DIR = Path.home() / ".cache" / "densekit" / "app-samples"
DEFAULT_PRESET = "live"  # densekit.retrieval.propagation's preset for tracking as frames arrive on a CPU
RESOLUTIONS = (480, 360, 240)


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


_EXTRACTORS: dict[tuple[str, Optional[str], str], LockedExtractor] = {}
_EXTRACTORS_LOCK = threading.Lock()


def shared_extractor(model: Any = DEFAULT_MODEL, device: Optional[str] = None, backend: str = "auto"
                     ) -> LockedExtractor:
    """The process-wide extractor for ``model`` (name, checkpoint, .onnx, OpenVINO IR folder, .engine), loaded on
    first use. ``backend``: as FeatureExtractor's (``auto`` runs an .onnx with OpenVINO on a bf16 CPU).

    ``model`` may also be a ready extractor (anything with ``.meta`` and ``__call__(frame, size)``).
    """
    if isinstance(model, LockedExtractor):
        return model
    if hasattr(model, "meta") and callable(model):
        return LockedExtractor(model)
    key = (str(model), device, backend)
    with _EXTRACTORS_LOCK:
        if key not in _EXTRACTORS:
            from densekit.serve.extractor import FeatureExtractor

            _EXTRACTORS[key] = LockedExtractor(FeatureExtractor(str(model), device=device, backend=backend))
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
