"""The semi-supervised DAVIS protocol, written once: propagate every sequence's first mask through its
frames into a results folder, then score the folder with the official J&F.

:func:`score_davis` is what ``densekit eval davis``, the trainer's ``eval.davis`` hook
(:mod:`densekit.retrieval.backbone_eval`), ``densekit demo`` and the benchmarks call, so one checkpoint,
preset and DAVIS root give one J&F whichever of them asks. The processing size is decided by the
propagation config alone (:func:`densekit.retrieval.propagation.processing_size`, inside
:class:`~densekit.retrieval.propagation.MaskPropagator`): frames are read at their native size, the
propagator resizes them for the network and returns masks at the native size, and those are what the
evaluator scores. Nobody resizes frames or masks around it.

:func:`propagate_to_dir` is the inner loop (one video into one folder of palette PNGs), shared with
``densekit track``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.retrieval.davis_eval import DavisEvalResult, evaluate_davis, write_csvs
from densekit.retrieval.propagation import (
    FeatureExtractorLike,
    MaskPropagator,
    PropagationConfig,
    preset,
    processing_size,
)
from densekit.serve.errors import DensekitError

__all__ = ["DavisScore", "progress_callback", "propagate_to_dir", "score_davis", "select_sequences"]

#: ``on_frame(sequence, frames_done, frames_in_sequence)``, called after each mask is written
OnFrame = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DavisScore:
    """What :func:`score_davis` returns.

    Attributes:
        result: the evaluator's tables (global row, per-object rows, per-sequence means).
        out_dir: the results folder: ``<seq>/<frame>.png`` masks and the two official CSVs.
        csvs: paths of ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv``.
        config: the propagation config every sequence ran with.
        processing_sizes: per sequence, the (H, W) its frames were resized to for the network.
        frames: frames propagated in all (first frames included).
        track_seconds: wall seconds of the propagation (reading frames and writing masks included).
    """

    result: DavisEvalResult
    out_dir: Path
    csvs: tuple[Path, Path]
    config: PropagationConfig
    processing_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    frames: int = 0
    track_seconds: float = 0.0

    @property
    def sequences(self) -> list[str]:
        return list(self.result.sequences)

    @property
    def jf(self) -> float:
        """J&F-Mean of the official global row."""
        return self.result.global_row["J&F-Mean"]

    def summary(self) -> dict[str, float]:
        """``{"J&F", "J", "F"}`` means of the global row (what training logs)."""
        row = self.result.global_row
        return {"J&F": row["J&F-Mean"], "J": row["J-Mean"], "F": row["F-Mean"]}


def select_sequences(root: str | os.PathLike[str], split: str | None = None,
                     sequences: Iterable[str] | None = None) -> list[str]:
    """The sequences to score: ``sequences`` (each checked to be in ``split``), else all of ``split``
    (every sequence folder when ``split`` is None).

    Raises:
        DensekitError: a requested sequence is not in the split, or nothing is left to score.
    """
    from densekit.serve.davis import DavisRoot

    names = DavisRoot(root).sequences(split)
    if sequences is not None:
        wanted = list(sequences)
        unknown = [s for s in wanted if s not in names]
        if unknown:
            where = f"split {split!r}" if split else str(root)
            raise DensekitError(f"sequence(s) not in {where}: {', '.join(unknown)}")
        names = wanted
    if not names:
        raise DensekitError(f"no sequences in {root}" + (f" for split {split!r}" if split else ""))
    return names


def propagate_to_dir(
    propagator: MaskPropagator,
    frames: Iterable[np.ndarray],
    first_mask: np.ndarray,
    out_dir: str | os.PathLike[str],
    names: Iterable[str],
    on_mask: Callable[[int, np.ndarray], None] | None = None,
) -> int:
    """Propagate ``first_mask`` through ``frames`` and write ``out_dir/<name>.png`` (palette) per frame.

    Masks are written as they come (atomically), so an interrupted run keeps what it finished.
    ``on_mask(frames_done, mask)`` is called after each write. Returns the number of masks written.
    """
    from densekit.serve.imageio import write_mask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, mask in zip(names, propagator.stream(frames, first_mask)):
        write_mask(out / f"{name}.png", mask)
        n += 1
        if on_mask is not None:
            on_mask(n, mask)
    return n


def score_davis(
    extractor: FeatureExtractorLike,
    root: str | os.PathLike[str],
    config: PropagationConfig | str,
    out_dir: str | os.PathLike[str],
    sequences: Iterable[str] | None = None,
    on_frame: OnFrame | None = None,
    *,
    split: str | None = None,
    workers: int | None = None,
) -> DavisScore:
    """Propagate every sequence of a DAVIS root into ``out_dir`` and score it with the official J&F.

    Args:
        extractor: a :class:`densekit.serve.extractor.FeatureExtractor` (or anything with its protocol).
        root: a DAVIS-2016 or -2017 folder (:class:`densekit.serve.davis.DavisRoot`).
        config: a propagation config or preset name; it alone decides the processing size.
        out_dir: results folder (created): one folder of masks per sequence, and the CSVs.
        sequences: the sequences to score (default: all of ``split``); see :func:`select_sequences`.
        on_frame: ``on_frame(sequence, frames_done, frames_in_sequence)`` after each frame (progress).
        split: the ImageSets split (None: every sequence folder); it also names the CSVs (``all``
            when None).
        workers: evaluator threads (None: one per CPU); the scores do not depend on it.

    Raises:
        DensekitError: unknown sequences, unreadable frames or masks, a bad config.
    """
    from densekit.serve.davis import DavisRoot
    from densekit.serve.imageio import read_image

    cfg = preset(config) if isinstance(config, str) else config
    davis = DavisRoot(root)
    names = select_sequences(root, split, sequences)
    out = Path(out_dir)
    multiple = int(getattr(extractor.meta, "input_multiple", 1) or 1)
    sizes: dict[str, tuple[int, int]] = {}
    frames = 0
    t0 = time.perf_counter()
    for seq in names:
        paths = davis.frame_paths(seq)
        first = davis.first_mask(seq)
        sizes[seq] = processing_size(first.shape[0], first.shape[1], cfg, multiple)
        total = len(paths)
        report = None
        if on_frame is not None:
            on_frame(seq, 0, total)  # the bar (and its clock) starts before the first frame
            report = lambda done, _mask, seq=seq, total=total: on_frame(seq, done, total)  # noqa: E731
        frames += propagate_to_dir(MaskPropagator(extractor, cfg), (read_image(p) for p in paths), first,
                                   out / seq, davis.frame_names(seq), report)
    track_s = time.perf_counter() - t0
    result = evaluate_davis(root, out, split=split, sequences=names, workers=workers)
    csvs = write_csvs(result, out, split or "all")
    return DavisScore(result=result, out_dir=out, csvs=csvs, config=cfg, processing_sizes=sizes,
                      frames=frames, track_seconds=track_s)


def progress_callback(progress: Any, prefix: str = "") -> OnFrame:
    """An ``on_frame`` for :func:`score_davis` that shows one bar per sequence, with its frames per second,
    on a rich ``Progress`` made with a ``rate`` field (``densekit.apps.progress``)."""
    tasks: dict[str, tuple[Any, float]] = {}

    def on_frame(seq: str, done: int, total: int) -> None:
        if seq not in tasks:
            tasks[seq] = (progress.add_task(f"{prefix}{seq}", total=total, rate=""), time.perf_counter())
        task, t0 = tasks[seq]
        elapsed = time.perf_counter() - t0
        progress.update(task, completed=done, rate=f"{done / elapsed:.1f} fps" if elapsed > 0 else "")

    return on_frame
