"""Scoring a backbone by label propagation on a DAVIS-format folder: the training-time evaluation hook
and the quality benchmark use it (the trainer receives it by injection; train/ does not import retrieval/).

It is :func:`densekit.retrieval.davis_protocol.score_davis` with a backbone module: the same protocol,
processing size and evaluator as ``densekit eval davis``, so training logs the J&F the command prints.
"""

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

    ``preset`` with ``short_side > 0`` is ``densekit eval davis --preset P --short-side S`` (the preset's
    short-side rule, :func:`densekit.retrieval.propagation.preset`); 0 keeps the preset's own size.
    Masks go to ``workdir`` (a temporary folder, removed, when None). RNG states are left untouched.

    Returns:
        ``{"J&F": ..., "J": ..., "F": ...}``.
    """
    from densekit.retrieval.davis_protocol import score_davis, select_sequences
    from densekit.retrieval.propagation import preset as make_preset
    from densekit.serve.extractor import FeatureExtractor

    seqs = select_sequences(root, split, list(sequences) if sequences else None)
    if max_sequences > 0:
        seqs = seqs[:max_sequences]
    cfg = make_preset(preset, **({"short_side": short_side} if short_side > 0 else {}))
    ext = FeatureExtractor(copy.deepcopy(backbone).eval(), device=device)  # type: ignore[arg-type]
    own = workdir is None
    out = Path(tempfile.mkdtemp(prefix="densekit-eval-")) if own else Path(workdir)  # type: ignore[arg-type]
    try:
        with torch.random.fork_rng(devices=[]):
            return score_davis(ext, root, cfg, out, sequences=seqs, split=split, workers=1).summary()
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


def check_eval_config(ev: Any) -> list[str]:
    """What :func:`davis_jf_for_config` will score, checked before training starts: the root, the split, the
    sequences and each one's first-frame annotation (the mask propagation starts from). Returns the sequences.

    Raises:
        DensekitError: in one line naming ``eval.davis`` and what is wrong.
    """
    from densekit.retrieval.davis_protocol import select_sequences
    from densekit.serve.davis import DavisRoot
    from densekit.serve.errors import DensekitError

    try:
        names = select_sequences(ev.davis, ev.split, ev.sequences)
        if ev.max_sequences:
            names = names[: ev.max_sequences]
        root = DavisRoot(ev.davis)
        for seq in names:
            root.first_mask(seq)
    except DensekitError as exc:
        raise DensekitError(f"eval.davis={ev.davis}: {exc} (the eval hook needs labelled sequences)") from None
    return names
