"""Save and load :class:`~densekit.serve.backbones.DenseBackbone` checkpoints as safetensors.

A checkpoint is one ``.safetensors`` file: the state dict plus string metadata, where the key
``densekit`` holds :meth:`ModelMeta.to_json`. Loading rebuilds the architecture from ``meta.name`` and
``meta.arch`` (no shipped pretrained weights are read: the file overwrites them) and loads the state dict
strictly. safetensors never executes code, so a user file is never unpickled (no ``torch.load``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from densekit.serve.atomic import atomic_path
from densekit.serve.backbones import DenseBackbone, build_from_arch
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError, one_line

META_KEY = "densekit"


def save_checkpoint(
    model: DenseBackbone, path: str | os.PathLike[str], extra_meta: dict[str, Any] | None = None
) -> None:
    """Write ``model``'s weights and ``model.meta`` to ``path`` (atomically).

    ``extra_meta`` adds string metadata (non-string values are stored as JSON), e.g. training step or
    objective settings; the key ``densekit`` is reserved. Tensors are made contiguous and tensors that
    share storage are written once (``safetensors.torch.save_model`` handles both).
    """
    metadata = {META_KEY: model.meta.to_json()}
    for key, value in (extra_meta or {}).items():
        if key == META_KEY:
            raise DensekitError(f"extra_meta may not use the reserved key {META_KEY!r}")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=metadata)


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> tuple[ModelMeta, dict[str, str]]:
    """(meta, all string metadata) of a checkpoint without loading any weights."""
    path = Path(path)
    if not path.is_file():
        raise DensekitError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DensekitError(f"{path}: not a safetensors file ({one_line(exc)})") from None
    if META_KEY not in metadata:
        raise DensekitError(f"{path}: safetensors file without densekit metadata (not saved by densekit)")
    return ModelMeta.from_json(metadata[META_KEY]), metadata


def load_checkpoint(path: str | os.PathLike[str]) -> DenseBackbone:
    """Rebuild the backbone saved at ``path`` and load its weights strictly; returned in eval mode.

    The returned model's ``meta`` is the saved one (it may carry a training objective, other
    normalisation...), after checking that the rebuilt architecture has the same stride and dim.

    Raises:
        DensekitError: missing file, not safetensors, no densekit metadata, or weights that do not fit
            the architecture the metadata describes.
    """
    meta, _ = read_checkpoint_metadata(path)
    model = build_from_arch(meta.name, meta.arch, pretrained=False)
    if (model.meta.stride, model.meta.dim) != (meta.stride, meta.dim):
        raise DensekitError(
            f"{path}: metadata says stride {meta.stride} dim {meta.dim} but {meta.name} with arch {meta.arch} "
            f"builds stride {model.meta.stride} dim {model.meta.dim}"
        )
    try:
        load_model(model, str(path), strict=True)
    except (RuntimeError, SafetensorError, ValueError) as exc:
        raise DensekitError(f"{path}: weights do not match architecture {meta.name}: {one_line(exc)}") from None
    model.meta = meta
    return model.eval()
