"""Frames in, L2-normalised dense features out, whatever runs the network.

:class:`FeatureExtractor` does the preprocessing that :class:`~densekit.serve.contract.ModelMeta`
prescribes (resize to a multiple of ``input_multiple``, /255, (x - mean) / std, NCHW float32), hands
the batch to a *backend* and L2-normalises the result over D. A backend is any object with
``run(batch: np.ndarray (B, 3, H, W) float32) -> np.ndarray (B, D, H/s, W/s)``; only the torch backend
exists so far (ONNX Runtime / TensorRT backends plug in at :func:`open_backend`).

Importing this module does not import torch: the torch backend imports it when it is created.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError

if TYPE_CHECKING:
    from densekit.serve.backbones import DenseBackbone

EPS = 1e-12


class Backend(Protocol):
    """Runs a dense network on a preprocessed batch."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, D, H/s, W/s) float32 (not normalised)."""
        ...


class TorchBackend:
    """Runs a :class:`DenseBackbone` with torch under ``inference_mode``.

    The model is moved to ``device``; it runs in eval mode and is put back into training mode
    afterwards if it was training (so an extractor can be used on a model that is being trained).
    """

    def __init__(self, model: DenseBackbone, device: str = "cpu") -> None:
        self.device = resolve_torch_device(device)
        self.model = model.to(self.device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
                out = self.model(x)
        finally:
            self.model.train(was_training)
        return out.float().cpu().numpy()


def resolve_torch_device(device: str) -> Any:
    """``'cpu'`` or ``'cuda'``/``'cuda:N'`` as a ``torch.device``; DensekitError if unusable (no fallback)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DensekitError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DensekitError(f"unsupported device {device!r}: use 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise DensekitError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DensekitError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def open_backend(
    model: str | os.PathLike[str] | DenseBackbone, device: str = "cpu", seed: int = 0
) -> tuple[ModelMeta, Backend]:
    """(meta, backend) for a backbone name, checkpoint path or :class:`DenseBackbone`."""
    from densekit.serve.backbones import DenseBackbone, load_backbone

    if not isinstance(model, DenseBackbone):
        if not isinstance(model, (str, Path)):
            kind = type(model).__name__
            raise DensekitError(f"model must be a backbone name, a checkpoint path or a DenseBackbone, not {kind}")
        model = load_backbone(model, seed=seed)
    return model.meta, TorchBackend(model, device)


def target_size(hw: tuple[int, int], size: tuple[int, int] | None, multiple: int) -> tuple[int, int]:
    """The (H, W) a frame of size ``hw`` is resized to: ``size`` (or ``hw``) rounded down to ``multiple``."""
    h, w = (int(size[0]), int(size[1])) if size is not None else (int(hw[0]), int(hw[1]))
    th, tw = h // multiple * multiple, w // multiple * multiple
    if th <= 0 or tw <= 0:
        raise DensekitError(f"size {h}x{w} is smaller than this model's input multiple {multiple}")
    return th, tw


def preprocess(frames: Sequence[np.ndarray], meta: ModelMeta, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB frames -> (B, 3, h, w) float32 normalised with ``meta``.

    Each frame is resized to :func:`target_size` (cv2 INTER_AREA when shrinking, which averages instead
    of aliasing; INTER_LINEAR otherwise). All frames must end up the same size.
    """
    mean = np.asarray(meta.mean, dtype=np.float32)
    scale = 1.0 / (255.0 * np.asarray(meta.std, dtype=np.float32))
    out: list[np.ndarray] = []
    for frame in frames:
        check_frame(frame)
        th, tw = target_size(frame.shape[:2], size, meta.input_multiple)
        if (th, tw) != frame.shape[:2]:
            shrink = th <= frame.shape[0] and tw <= frame.shape[1]
            frame = cv2.resize(frame, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out.append(((frame.astype(np.float32) - 255.0 * mean) * scale).transpose(2, 0, 1))
    if not out:
        raise DensekitError("no frames given")
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise DensekitError(f"frames resize to different sizes {sorted(s[1:] for s in shapes)}; pass size=(H, W)")
    return np.ascontiguousarray(np.stack(out))


def check_frame(frame: Any) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        desc = f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise DensekitError(f"a frame must be an (H, W, 3) uint8 RGB array, got {desc}")


def l2_normalise(feats: np.ndarray, axis: int = 1) -> np.ndarray:
    """Unit L2 norm along ``axis`` (all-zero vectors stay zero), float32."""
    feats = np.asarray(feats, dtype=np.float32)
    norm = np.sqrt((feats * feats).sum(axis=axis, keepdims=True))
    return feats / np.maximum(norm, EPS)


class FeatureExtractor:
    """Dense, L2-normalised features for RGB frames.

    Args:
        model: a backbone name (``resnet18``, ``timm:vit_small_patch16_224``...), a ``.safetensors``
            checkpoint path, or a :class:`DenseBackbone`.
        device: ``'cpu'`` (default) or ``'cuda[:N]'``; an unavailable device raises DensekitError.
        seed: seed for randomly initialised named backbones.

    ``extractor(frame, size=None)``: (H, W, 3) uint8 RGB -> (D, h, w) float32 with h = H'/s, w = W'/s,
    where (H', W') is ``size`` or the frame size, rounded down to ``meta.input_multiple``.
    """

    def __init__(self, model: str | os.PathLike[str] | DenseBackbone, device: str = "cpu", seed: int = 0) -> None:
        self.meta, self.backend = open_backend(model, device=device, seed=seed)
        self.device = device

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        return self.batch([frame], size=size)[0]

    def batch(self, frames: Iterable[np.ndarray] | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """(B, H, W, 3) uint8 frames (a list or a 4-D array) -> (B, D, h, w) float32, unit norm over D."""
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        batch = preprocess(list(frames), self.meta, size)
        feats = self.backend.run(batch)
        return l2_normalise(feats, axis=1)
