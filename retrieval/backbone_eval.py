"""Scoring a backbone by label propagation on a DAVIS-format folder: the training-time evaluation hook
and the quality benchmark use it (the trainer receives it by injection; train/ does not import retrieval/)."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def davis_jf(
    backbone: nn.Module,
    root: str | os.PathLike[str],
    *,
    sequences: Iterable[str] | None = None,
    split: str | None = None,
    max_sequences: int = 0,
    preset: str = "crw",
    short_side: int = 0,
    device: str = "cpu",
    workdir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """J&F of label propagation with ``backbone``'s features on a DAVIS-format folder.

    Frames (and the first mask, nearest) are optionally resized so the shorter side is ``short_side`` (CPU
    budget), propagated with :class:`densekit.retrieval.propagation.MaskPropagator` (``preset``), and the
    predicted masks resized back (nearest) to the annotation size before the official evaluator
    (:func:`densekit.retrieval.davis_eval.evaluate_davis`) scores them. RNG states are left untouched.

    Returns:
        ``{"J&F": ..., "J": ..., "F": ...}``.
    """
    import cv2

    from densekit.retrieval.davis_eval import evaluate_davis
    from densekit.retrieval.propagation import MaskPropagator, preset as make_preset
    from densekit.serve.davis import DavisRoot
    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import read_image, write_mask

    davis = DavisRoot(root)
    seqs = list(sequences) if sequences else davis.sequences(split)
    if max_sequences > 0:
        seqs = seqs[:max_sequences]
    model = copy.deepcopy(backbone).eval()
    ext = FeatureExtractor(model, device=device)  # type: ignore[arg-type]
    overrides = {"short_side": short_side} if (short_side > 0 and preset == "dino") else {}
    cfg = make_preset(preset, **overrides)
    own = workdir is None
    out = Path(tempfile.mkdtemp(prefix="densekit-eval-")) if own else Path(workdir)  # type: ignore[arg-type]
    try:
        with torch.random.fork_rng(devices=[]):
            for seq in seqs:
                frames = [read_image(p) for p in davis.frame_paths(seq)]
                first = davis.first_mask(seq)
                H, W = first.shape
                if short_side > 0 and min(H, W) != short_side:
                    s = short_side / min(H, W)
                    size = (max(1, round(W * s)), max(1, round(H * s)))
                    frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
                    first = cv2.resize(first, size, interpolation=cv2.INTER_NEAREST)
                prop = MaskPropagator(ext, cfg)
                names = davis.frame_names(seq)
                (out / seq).mkdir(parents=True, exist_ok=True)
                for name, mask in zip(names, prop.stream(frames, first)):
                    if mask.shape != (H, W):
                        mask = cv2.resize(mask, (W, H), interpolation=cv2.INTER_NEAREST)
                    write_mask(out / seq / f"{name}.png", mask)
        res = evaluate_davis(root, out, sequences=seqs, workers=1)
        row = res.global_row
        return {"J&F": row["J&F-Mean"], "J": row["J-Mean"], "F": row["F-Mean"]}
    finally:
        if own:
            shutil.rmtree(out, ignore_errors=True)


def davis_jf_for_config(backbone: nn.Module, ev: Any, device: str) -> dict[str, float]:
    """:func:`davis_jf` driven by a training config's ``eval`` section (the Trainer's evaluator)."""
    return davis_jf(
        backbone,
        ev.davis,
        sequences=ev.sequences,
        split=ev.split,
        max_sequences=ev.max_sequences,
        preset=ev.preset,
        short_side=ev.short_side,
        device=device,
    )
