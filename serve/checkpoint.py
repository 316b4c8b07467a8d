"""Save and load :class:`~densekit.serve.backbones.DenseBackbone` checkpoints as safetensors.

A checkpoint is one ``.safetensors`` file: the state dict plus string metadata, where the key
``densekit`` holds :meth:`ModelMeta.to_json`. Loading rebuilds the architecture from ``meta.name`` and
``meta.arch`` (no shipped pretrained weights are read: the file overwrites them) and loads the state dict
strictly. safetensors never executes code, so a user file is never unpickled (no ``torch.load``).

safetensors has no checksum of its own, so every densekit safetensors file (checkpoints here, the training state
of :mod:`densekit.train.trainer`) carries one in its metadata under ``densekit_sha256``: the SHA-256 of its
tensor index, its other metadata and its tensor bytes (:func:`safetensors_digest`). Loading checks it, so a
flipped bit or a truncated copy is one clear line, not weights that are silently wrong; a file written before
the checksum existed has none and loads as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from densekit.serve.atomic import atomic_path
from densekit.serve.backbones import DenseBackbone, build_from_arch
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError, one_line
from densekit.serve.meta_schema import loads_bounded

META_KEY = "densekit"
DIGEST_KEY = "densekit_sha256"
_PENDING = "0" * 64  # the digest's place while the file is written: same length, so it is patched in place
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def save_checkpoint(
    model: DenseBackbone, path: str | os.PathLike[str], extra_meta: dict[str, Any] | None = None
) -> None:
    """Write ``model``'s weights and ``model.meta`` to ``path`` (atomically).

    ``extra_meta`` adds string metadata (non-string values are stored as JSON), e.g. training step or
    objective settings; the keys ``densekit`` and ``densekit_sha256`` are reserved. Tensors are made contiguous and tensors that
    share storage are written once (``safetensors.torch.save_model`` handles both).
    """
    metadata = {META_KEY: model.meta.to_json()}
    for key, value in (extra_meta or {}).items():
        if key in (META_KEY, DIGEST_KEY):
            raise DensekitError(f"extra_meta may not use the reserved key {key!r}")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    with atomic_path(path) as tmp:
        write_with_digest(tmp, metadata, lambda md: save_model(model, str(tmp), metadata=md))


def _read_header(fh: Any, path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, parsed header) of the safetensors file open in ``fh``, positioned at its tensor bytes."""
    head = fh.read(8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < size <= _MAX_HEADER:
        raise DensekitError(f"{path}: not a safetensors file (header length {size})")
    header = loads_bounded(fh.read(size), f"{path}: the safetensors header", max_depth=4)
    if not isinstance(header, dict):
        raise DensekitError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return size, header


def safetensors_digest(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(the SHA-256 of ``path``'s contents, the one stored in its metadata or None).

    Hashed: the tensor index (names, dtypes, shapes, offsets) and the metadata other than the digest itself, as
    canonical JSON, then every tensor byte; read in 1 MiB pieces.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        _, header = _read_header(fh, path)
        meta = header.pop("__metadata__", None) or {}
        stored = meta.pop(DIGEST_KEY, None) if isinstance(meta, dict) else None
        h = hashlib.sha256(b"densekit-safetensors-sha256/1\n")
        h.update(json.dumps([header, meta], sort_keys=True, separators=(",", ":")).encode("utf-8"))
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), stored if isinstance(stored, str) else None


def write_with_digest(path: Path, metadata: dict[str, str], write: Callable[[dict[str, str]], None]) -> None:
    """``write(metadata)`` writes a safetensors file at ``path``; this adds its digest to the metadata.

    The file is written with a placeholder of the digest's length, hashed, and the placeholder overwritten in
    place (one write of the tensors); a safetensors version that lays the header out otherwise gets a second write.
    """
    write({**metadata, DIGEST_KEY: _PENDING})
    digest, _ = safetensors_digest(path)
    needle = f'"{DIGEST_KEY}":"{_PENDING}"'.encode("ascii")
    with open(path, "r+b") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = fh.read(size)
        if header.count(needle) == 1:
            fh.seek(8 + header.index(needle) + len(needle) - 1 - len(_PENDING))
            fh.write(digest.encode("ascii"))
            return
    write({**metadata, DIGEST_KEY: digest})


def verify_digest(path: str | os.PathLike[str], what: str = "checkpoint") -> bool:
    """Check ``path`` against the digest in its metadata: True if it matches, False if it has none (a file from
    before densekit wrote one); DensekitError (one line) if it differs."""
    try:
        actual, stored = safetensors_digest(path)
    except (OSError, struct.error) as exc:
        raise DensekitError(f"{path}: unreadable {what} ({one_line(exc)})") from None
    if stored is None:
        return False
    if stored != actual:
        raise DensekitError(
            f"{path}: corrupt {what}: its contents do not match the SHA-256 it was saved with "
            f"({stored[:12]}... saved, {actual[:12]}... now; a changed bit or a damaged copy)"
        )
    return True


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
    try:
        return ModelMeta.from_json(metadata[META_KEY]), metadata
    except DensekitError as exc:
        raise DensekitError(f"{path}: broken densekit metadata: {exc}") from None


def load_checkpoint(path: str | os.PathLike[str]) -> DenseBackbone:
    """Rebuild the backbone saved at ``path`` and load its weights strictly; returned in eval mode.

    The returned model's ``meta`` is the saved one (it may carry a training objective, other
    normalisation...), after checking that the rebuilt architecture has the same stride and dim.

    Raises:
        DensekitError: missing file, not safetensors, no densekit metadata or one that breaks the contract's
            schema, contents that do not match their checksum, or weights that do not fit the architecture the
            metadata describes.
    """
    meta, _ = read_checkpoint_metadata(path)
    verify_digest(path)
    try:
        model = build_from_arch(meta.name, meta.arch, pretrained=False)
    except (RuntimeError, AssertionError, OverflowError, IndexError, ZeroDivisionError, NotImplementedError) as exc:
        # the arch comes from the file: a value the family's constructor cannot take is bad input, not a bug
        raise DensekitError(f"{path}: cannot build {meta.name!r} from its arch {meta.arch}: {one_line(exc)}") from None
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
