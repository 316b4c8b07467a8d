"""Training data: frame pairs of one video ("pairs") or single images ("images"), sampled deterministically.

Sources (``--data PATH``, detected by :func:`scan_source`):

* a DAVIS root (``JPEGImages/480p/<seq>/``, :class:`densekit.serve.davis.DavisRoot`; optional split);
* a folder of video files (mp4/avi/webm/mov/mkv/m4v) or a single video file;
* a folder of frame folders (one sub-folder of jpg/png frames per video);
* a folder of images (for ``"images"``; for ``"pairs"`` it counts as ONE video whose frames are its images).
Folders are scanned recursively one level deep only where the layout above says so; hidden files are ignored.

Determinism and exact resume. The data position is the step count: the trainer asks for *global sample indices*
``g = step * global_batch + rank * local_batch + i`` (:class:`StepBatchSampler`), so 1 process with batch B and
2 processes with B/2 each see exactly the same samples. Sample ``g`` lives in epoch ``g // N`` at position
``g % N`` of a permutation of the N units drawn from ``(seed, epoch)``; a unit is a (video, anchor frame) for
"pairs" and an image (or one frame of a video) for "images". Everything random about a sample (the gap, the crop,
the objective's augmentation) comes from numpy Generators seeded by ``(seed, g)``, independent of worker count.

Frames are resized so they cover the training size (shorter-side scaling, aspect kept; ``cv2.INTER_AREA`` when
shrinking) and then cropped to exactly ``size`` (random or centre crop; the SAME crop for both frames of a pair,
so that pixel correspondences between the two frames stay those of the video) before the objective's transform.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from densekit.serve.errors import DensekitError
from densekit.serve.imageio import IMAGE_SUFFIXES, VIDEO_SUFFIXES

log = logging.getLogger(__name__)

#: Stream ids mixed into the per-sample seed: one stream for sampling (gap, crop), one for the objective.
_STREAM_SAMPLING = 0
_STREAM_TRANSFORM = 1


def sample_generator(seed: int, index: int, stream: int) -> np.random.Generator:
    """The numpy Generator of global sample ``index`` (``stream`` 0: sampling, 1: objective transform)."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order (permutation of ``range(n)``) in which units are visited in ``epoch``."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n)


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Video:
    """One video: either a list of frame files or a video file with ``length`` frames."""

    name: str
    length: int
    frames: tuple[str, ...] = ()  # frame files (folder videos)
    file: str | None = None  # a video file

    def read(self, index: int, cache: dict | None = None) -> np.ndarray:
        """Frame ``index`` as (H, W, 3) uint8 RGB."""
        if self.file is None:
            from densekit.serve.imageio import read_image

            return read_image(self.frames[index])
        return _read_video_frame(self.file, index, self.length, cache)


def _read_video_frame(path: str, index: int, length: int, cache: dict | None) -> np.ndarray:
    """Decode frame ``index`` of a video file (seek + read; the capture is cached per worker process)."""
    import cv2

    key = (os.getpid(), path)
    cap = cache.get(key) if cache is not None else None
    if cap is None:
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise DensekitError(f"cannot open video {path}")
        if cache is not None:
            cache[key] = cap
    cap.set(cv2.CAP_PROP_POS_FRAMES, int(index))
    ok, bgr = cap.read()
    if not ok or bgr is None:
        raise DensekitError(f"video {path}: cannot decode frame {index} of {length}; the file may be truncated")
    if bgr.ndim == 2:
        return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(bgr[..., :3], cv2.COLOR_BGR2RGB)


def _images_in(folder: Path) -> list[Path]:
    from densekit.serve.imageio import natural_key

    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _videos_in(folder: Path) -> list[Path]:
    from densekit.serve.imageio import natural_key

    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _check_image_headers(paths: Sequence[Path]) -> None:
    """Open every image's header (cheap: no decoding) so unreadable files fail before training starts."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - header only
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise DensekitError(f"unreadable image {p}: {reason}") from None


def _video_from_file(path: Path) -> Video:
    from densekit.serve.imageio import open_video

    src = open_video(path)  # DensekitError for empty/corrupt files
    return Video(name=path.stem, length=len(src), file=str(path))


def _video_from_frames(name: str, frames: list[Path]) -> Video:
    _check_image_headers(frames)
    return Video(name=name, length=len(frames), frames=tuple(str(p) for p in frames))


def scan_source(path: str | os.PathLike[str], kind: str = "auto", split: str | None = None) -> list[Video]:
    """Find the videos under ``path``; a folder of plain images is returned as ONE video named after it.

    Args:
        path: DAVIS root, folder of video files, folder of frame folders, folder of images, or a video file.
        kind: ``"auto"`` (detect), ``"davis"``, ``"videos"`` (video files), ``"frames"`` (frame folders) or
            ``"images"`` (a folder of images).
        split: DAVIS split name (``ImageSets``), DAVIS roots only; None = every sequence.

    Raises:
        DensekitError: missing path, empty folder, unreadable image headers, undecodable videos, unknown kind.
    """
    root = Path(path)
    kinds = ("auto", "davis", "videos", "frames", "images")
    if kind not in kinds:
        raise DensekitError(f"unknown data.kind {kind!r}; choose one of {', '.join(kinds)}")
    if not root.exists():
        raise DensekitError(f"training data not found: {root}")
    if root.is_file():
        if root.suffix.lower() in VIDEO_SUFFIXES:
            return [_video_from_file(root)]
        raise DensekitError(f"{root} is a file but not a video ({'/'.join(s[1:] for s in VIDEO_SUFFIXES)})")
    if kind == "davis" or (kind == "auto" and (root / "JPEGImages").is_dir()):
        from densekit.serve.davis import DavisRoot

        davis = DavisRoot(root)
        seqs = davis.sequences(split)
        if not seqs:
            raise DensekitError(f"DAVIS root {root} has no sequences" + (f" in split {split!r}" if split else ""))
        return [_video_from_frames(s, davis.frame_paths(s)) for s in seqs]
    if split is not None:
        raise DensekitError(f"data.split={split!r} applies to DAVIS roots only, and {root} is not one")
    files = _videos_in(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images = _images_in(root)
    videos: list[Video] = []
    if kind in ("auto", "videos"):
        videos += [_video_from_file(p) for p in files]
    if kind in ("auto", "frames"):
        for d in subdirs:
            frames = _images_in(d)
            if frames:
                videos.append(_video_from_frames(d.name, frames))
            elif kind == "frames":
                raise DensekitError(f"frame folder {d} has no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    if kind in ("auto", "images") and images and not videos:
        videos.append(_video_from_frames(root.name or "images", images))
    if not videos:
        raise DensekitError(
            f"no training data in {root}: expected images, video files or folders of frames"
            + (f" (data.kind={kind})" if kind != "auto" else "")
        )
    return videos


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def cover_resize_crop(
    frames: Sequence[np.ndarray], size: tuple[int, int], rng: np.random.Generator | None, scale: float = 1.0
) -> list[np.ndarray]:
    """Resize frames (all the same size) so they cover ``size`` * ``scale``, then crop ``size``; same crop for all.

    Args:
        frames: (H, W, 3) uint8 frames of one size.
        size: (h, w) output size.
        rng: picks the crop offset; None = centre crop.
        scale: >= 1 leaves room for the random crop to move (1 = cover exactly along the shorter axis).
    Returns:
        list of (h, w, 3) uint8 frames.
    """
    import cv2

    h, w = size
    H, W = frames[0].shape[:2]
    for f in frames[1:]:
        if f.shape[:2] != (H, W):
            raise DensekitError(f"frames of one video differ in size: {W}x{H} and {f.shape[1]}x{f.shape[0]}")
    s = max(h / H, w / W) * max(scale, 1.0)
    nh, nw = max(h, int(round(H * s))), max(w, int(round(W * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    if (nh, nw) != (H, W):
        frames = [cv2.resize(f, (nw, nh), interpolation=interp) for f in frames]
    if rng is None:
        y0, x0 = (nh - h) // 2, (nw - w) // 2
    else:
        y0 = int(rng.integers(0, nh - h + 1))
        x0 = int(rng.integers(0, nw - w + 1))
    return [np.ascontiguousarray(f[y0 : y0 + h, x0 : x0 + w]) for f in frames]


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------

Transform = Callable[[list[np.ndarray], np.random.Generator], dict[str, np.ndarray]]


class _BaseDataset:
    """Map-style dataset indexed by GLOBAL sample index (any non-negative int; epochs wrap around)."""

    def __init__(
        self,
        videos: list[Video],
        transform: Transform | None,
        *,
        seed: int,
        size: tuple[int, int],
        crop: str = "random",
        crop_scale: float = 1.0,
    ) -> None:
        if crop not in ("random", "center"):
            raise DensekitError(f"data.crop must be random or center, got {crop!r}")
        if len(size) != 2 or min(size) < 1:
            raise DensekitError(f"data.size must be [height, width] > 0, got {list(size)}")
        self.videos = videos
        self.transform = transform
        self.seed = int(seed)
        self.size = (int(size[0]), int(size[1]))
        self.crop = crop
        self.crop_scale = float(crop_scale)
        self._cache: dict = {}
        self._perm_epoch = -1
        self._perm = np.zeros(0, np.int64)

    # Units: subclasses define ``num_units`` and ``unit_frames(unit, rng) -> list of (video, frame)``.
    num_units: int = 0

    def unit_frames(self, unit: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Units per epoch (indices beyond wrap into later epochs)."""
        return self.num_units

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, unit) of global sample ``index``."""
        epoch, pos = divmod(int(index), self.num_units)
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.seed, epoch, self.num_units)
            self._perm_epoch = epoch
        return epoch, int(self._perm[pos])

    def raw(self, index: int) -> list[np.ndarray]:
        """The resized/cropped uint8 frames of global sample ``index`` (before the objective transform)."""
        _, unit = self.locate(index)
        rng = sample_generator(self.seed, index, _STREAM_SAMPLING)
        picks = self.unit_frames(unit, rng)
        frames = [self.videos[v].read(t, self._cache) for v, t in picks]
        return cover_resize_crop(frames, self.size, rng if self.crop == "random" else None, self.crop_scale)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        frames = self.raw(index)
        if self.transform is None:
            return {"frames": np.stack(frames)}
        return self.transform(frames, sample_generator(self.seed, index, _STREAM_TRANSFORM))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}  # VideoCaptures do not pickle; each worker opens its own
        return state


class PairDataset(_BaseDataset):
    """Frame pairs ``[t, t + d]`` of one video, ``d`` uniform in ``[gap_min, min(gap_max, len - 1 - t)]``.

    A unit is an anchor (video, t) with ``t + gap_min < len``: every anchor frame is visited once per epoch.

    Raises:
        DensekitError: bad gap range; a video shorter than ``gap_min + 1`` frames (unless ``skip_short``, which
            drops such videos with a warning; an error remains if none is left).
    """

    def __init__(self, videos: list[Video], transform: Transform | None, *, seed: int, size: tuple[int, int],
                 gap_min: int = 1, gap_max: int = 10, crop: str = "random", crop_scale: float = 1.0,
                 skip_short: bool = False) -> None:
        if gap_min < 0 or gap_max < gap_min:
            raise DensekitError(f"need 0 <= data.gap_min <= data.gap_max, got gap_min={gap_min} gap_max={gap_max}")
        short = [v for v in videos if v.length <= gap_min]
        if short and not skip_short:
            v = short[0]
            raise DensekitError(
                f"video {v.name!r} has {v.length} frame(s), too short for data.gap_min={gap_min} "
                f"({len(short)} such video(s)); lower data.gap_min or set data.skip_short=true"
            )
        if short:
            log.warning("skipping %d video(s) shorter than gap_min+1=%d frames", len(short), gap_min + 1)
            videos = [v for v in videos if v.length > gap_min]
            if not videos:
                raise DensekitError(f"every video is shorter than data.gap_min+1={gap_min + 1} frames")
        super().__init__(videos, transform, seed=seed, size=size, crop=crop, crop_scale=crop_scale)
        self.gap_min, self.gap_max = int(gap_min), int(gap_max)
        counts = np.array([v.length - self.gap_min for v in videos], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_units = int(self._offsets[-1])

    def unit_frames(self, unit: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        v = int(np.searchsorted(self._offsets, unit, side="right") - 1)
        t = unit - int(self._offsets[v])
        hi = min(self.gap_max, self.videos[v].length - 1 - t)
        d = int(rng.integers(self.gap_min, hi + 1))
        return [(v, t), (v, t + d)]


class ImageDataset(_BaseDataset):
    """Single images: every image of a folder, or every frame of every video (``frame_step`` subsamples)."""

    def __init__(self, videos: list[Video], transform: Transform | None, *, seed: int, size: tuple[int, int],
                 crop: str = "random", crop_scale: float = 1.0, frame_step: int = 1) -> None:
        if frame_step < 1:
            raise DensekitError(f"data.frame_step must be >= 1, got {frame_step}")
        super().__init__(videos, transform, seed=seed, size=size, crop=crop, crop_scale=crop_scale)
        self.frame_step = int(frame_step)
        counts = np.array([(v.length + frame_step - 1) // frame_step for v in videos], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_units = int(self._offsets[-1])
        if self.num_units == 0:
            raise DensekitError("no images to train on")

    def unit_frames(self, unit: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        v = int(np.searchsorted(self._offsets, unit, side="right") - 1)
        return [(v, (unit - int(self._offsets[v])) * self.frame_step)]


def build_dataset(
    path: str | os.PathLike[str],
    data: str,
    transform: Transform | None,
    *,
    seed: int,
    size: tuple[int, int],
    kind: str = "auto",
    split: str | None = None,
    gap_min: int = 1,
    gap_max: int = 10,
    crop: str = "random",
    crop_scale: float = 1.0,
    frame_step: int = 1,
    skip_short: bool = False,
) -> PairDataset | ImageDataset:
    """Scan ``path`` and build the dataset an objective with ``data`` ("pairs" | "images") needs."""
    videos = scan_source(path, kind=kind, split=split)
    if data == "pairs":
        return PairDataset(videos, transform, seed=seed, size=size, gap_min=gap_min, gap_max=gap_max,
                           crop=crop, crop_scale=crop_scale, skip_short=skip_short)
    if data == "images":
        return ImageDataset(videos, transform, seed=seed, size=size, crop=crop, crop_scale=crop_scale,
                            frame_step=frame_step)
    raise DensekitError(f"objective data kind must be 'pairs' or 'images', got {data!r}")


# ----------------------------------------------------------------------------------------------------
# Sampler and loader
# ----------------------------------------------------------------------------------------------------


class StepBatchSampler:
    """Yields, for each step in ``[start_step, max_steps)``, this rank's global sample indices.

    Step ``s`` on rank ``r`` gets ``[s*G + r*L, s*G + (r+1)*L)`` with ``G = global_batch = world * L``: the data
    position is the step count, and the union over ranks equals the single-process batch.
    """

    def __init__(self, start_step: int, max_steps: int, global_batch: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise DensekitError(f"batch_size {global_batch} is not divisible by the {world} processes")
        self.start_step, self.max_steps = int(start_step), int(max_steps)
        self.global_batch, self.rank, self.world = int(global_batch), int(rank), int(world)
        self.local = self.global_batch // self.world

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start_step, self.max_steps):
            base = s * self.global_batch + self.rank * self.local
            yield list(range(base, base + self.local))


def make_loader(dataset: _BaseDataset, sampler: StepBatchSampler, num_workers: int = 0, seed: int = 0,
                pin_memory: bool = False, collate: Callable[[list[dict[str, np.ndarray]]], dict] | None = None
                ):  # noqa: ANN201 - torch DataLoader
    """A DataLoader over ``sampler``'s batches.

    ``collate`` (an objective's :meth:`~densekit.train.objective.Objective.collate`, e.g. the packing of
    :mod:`densekit.train.packing`) turns the step's list of samples into the batch; None keeps torch's default
    collate (stacks arrays into tensors). It runs in the workers, so it must be picklable and deterministic.
    The loader gets its own ``torch.Generator`` so creating the iterator does not consume the global torch RNG
    (that would make a resumed run's RNG stream differ from an uninterrupted one).
    """
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=sampler,
        num_workers=int(num_workers),
        generator=gen,
        pin_memory=pin_memory,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
