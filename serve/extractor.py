"""Frames in, L2-normalised dense features out, whatever runs the network.

:class:`FeatureExtractor` does the preprocessing that :class:`~densekit.serve.contract.ModelMeta`
prescribes (resize to a multiple of ``input_multiple``, /255, (x - mean) / std, NCHW float32), hands
the batch to a *backend* and L2-normalises the result over D. Turning the model argument (a name, a
``.safetensors`` checkpoint, an ``.onnx`` file, an OpenVINO IR, a TensorRT engine or a DenseBackbone) into a
backend is :func:`densekit.serve.loader.open_backend`'s job; the backends live there:

``torch``        a :class:`DenseBackbone` (name or ``.safetensors`` checkpoint) run eagerly.
``onnxruntime``  an ``.onnx`` file; providers are tried TensorRT, then CUDA, then CPU, and the one that
                 really runs is read back from ``session.get_providers()``.
``openvino``     an ``.onnx`` file or an IR folder from ``densekit export openvino``, on OpenVINO's CPU plugin
                 (:mod:`densekit.serve.openvino_backend`; ``auto`` picks it for ``.onnx`` on a bf16 CPU).
``tensorrt``     a plan file built by ``densekit export trt`` with its JSON sidecar.

Importing this module does not import torch, and the ONNX Runtime path never does: an exported model
serves on a machine with only numpy, OpenCV and onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError

# the backends moved to the loader; these names stay importable from here for export/, benchmarks and tests
from densekit.serve.loader import (
    BACKENDS,
    Backend,
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    backend_for,
    import_tensorrt,
    open_backend,
    ort_providers,
    require_cuda_for_tensorrt,
    resolve_torch_device,
)

if TYPE_CHECKING:
    from densekit.serve.backbones import DenseBackbone

__all__ = [
    "BACKENDS", "Backend", "FeatureExtractor", "OnnxRuntimeBackend", "TensorRTBackend", "TorchBackend",
    "backend_for", "check_frame", "import_tensorrt", "l2_normalise", "open_backend", "ort_providers",
    "preprocess", "preprocess_each", "require_cuda_for_tensorrt", "resolve_torch_device", "target_size",
]

EPS = 1e-12


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
    out = preprocess_each(frames, meta, size)
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise DensekitError(f"frames resize to different sizes {sorted(s[1:] for s in shapes)}; pass size=(H, W)")
    return np.ascontiguousarray(np.stack(out))


def preprocess_each(frames: Sequence[np.ndarray], meta: ModelMeta, size: tuple[int, int] | None = None
                    ) -> list[np.ndarray]:
    """As :func:`preprocess`, one (3, h_i, w_i) float32 array per frame, sizes free (what packing takes)."""
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
    return out


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
    """Dense, L2-normalised features for RGB frames, whatever runs the network.

    Args:
        model: a backbone name (``resnet18``, ``timm:vit_small_patch16_224``...), a ``.safetensors``
            checkpoint, an ``.onnx`` file, a TensorRT ``.engine``/``.plan`` (with its ``.json``
            sidecar), or a :class:`DenseBackbone`.
        device: None (default: the backend's natural choice), ``'cpu'``, ``'cuda[:N]'`` or ``'auto'``.
            torch: None/``'auto'`` is the CPU, an unavailable device raises DensekitError. ONNX Runtime:
            None/``'auto'`` tries TensorRT, CUDA, then CPU; ``'cuda'`` refuses to end up on the CPU;
            ``'cpu'`` is CPU only. TensorRT: always CUDA.
        seed: seed for randomly initialised named backbones.
        backend: ``'auto'`` (from the model: ``.onnx`` -> onnxruntime, or openvino on a CPU whose OpenVINO
            runs bf16; an IR folder/``.xml`` -> openvino; ``.engine``/``.plan`` -> tensorrt; otherwise torch),
            or one of ``'torch'``, ``'onnxruntime'``, ``'openvino'``, ``'tensorrt'``.
        mean, std, stride: the contract of an ONNX file exported by someone else (no densekit
            metadata); all three are needed for such a file.
        threads: ONNX Runtime intra-op threads / OpenVINO inference threads (None: their default).

    Attributes:
        meta: the model contract. backend: the backend object (``.name`` is its kind).
        backend_name: ``'torch'``, ``'onnxruntime'``, ``'openvino'`` or ``'tensorrt'``.
        provider: what really runs it, e.g. ``'torch:cpu'``, ``'CPUExecutionProvider'``,
            ``'CUDAExecutionProvider'``, ``'openvino:CPU:bf16'``, ``'TensorRT 10.16.1.11 (fp16)'``.

    ``extractor(frame, size=None)``: (H, W, 3) uint8 RGB -> (D, h, w) float32 with h = H'/s, w = W'/s,
    where (H', W') is ``size`` or the frame size, rounded down to ``meta.input_multiple``. A model with a
    static input size (``export onnx --static``) gets every frame resized to that size.
    ``extractor.batch(frames, pack=True)``: frames of different sizes in one packed forward (timm ViTs, torch).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | DenseBackbone,
        device: str | None = None,
        seed: int = 0,
        backend: str = "auto",
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stride: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.meta, self.backend = open_backend(
            model, device=device, seed=seed, backend=backend, mean=mean, std=std, stride=stride, threads=threads
        )
        self.backend_name: str = getattr(self.backend, "name", "torch")
        self.provider: str = str(getattr(self.backend, "provider", device))
        # where it really runs, for logs and /info: never the request when the library fell back
        if self.backend_name == "onnxruntime":
            self.device = "cpu" if self.provider == "CPUExecutionProvider" else "cuda"
        else:
            self.device = str(getattr(self.backend, "device", device))
        self.fixed_hw: tuple[int, int] | None = getattr(self.backend, "fixed_hw", None)

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        return self.batch([frame], size=size)[0]

    def batch(self, frames: Iterable[np.ndarray] | np.ndarray, size: tuple[int, int] | None = None, *,
              pack: bool = False, seq_len: int | None = None) -> np.ndarray | list[np.ndarray]:
        """(B, H, W, 3) uint8 frames (a list or a 4-D array) -> (B, D, h, w) float32, unit norm over D.

        ``pack=True``: frames of any sizes (each resized only to its multiple, or to ``size``) run in one packed
        forward (NaViT-style, :mod:`densekit.serve.packing`) and a list of (D, h_i, w_i) maps comes back, each
        equal to that frame run alone; ``seq_len`` is the length of the packed sequences in tokens (None: the
        longest frame's; first-fit puts the smaller frames together). Packing needs a timm ViT on the torch
        backend.
        """
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if self.fixed_hw is not None:
            if size is not None and tuple(size) != tuple(self.fixed_hw):
                raise DensekitError(f"this model has a static input size {self.fixed_hw}; size={tuple(size)} is not it")
            size = self.fixed_hw
        if pack:
            return self._packed(list(frames), size, seq_len)
        each = preprocess_each(list(frames), self.meta, size)
        if len({x.shape for x in each}) > 1:
            why = self._pack_refusal()
            hint = "pass pack=True (one packed forward) or size=(H, W)" if why is None else f"pass size=(H, W) ({why})"
            raise DensekitError(f"frames resize to different sizes {sorted({x.shape[1:] for x in each})}; {hint}")
        feats = self.backend.run(np.ascontiguousarray(np.stack(each)))
        return l2_normalise(feats, axis=1)

    def _pack_refusal(self) -> str | None:
        """Why this extractor cannot pack (None: it can): packing needs a timm ViT on the torch backend."""
        if self.backend_name != "torch":
            return f"packing needs the torch backend, not {self.backend_name}"
        from densekit.serve.backbones import TimmViTDense

        if not isinstance(getattr(self.backend.model, "body", None), TimmViTDense):
            return f"packing needs a timm ViT backbone and {self.meta.name} is not one (CNNs and pixels cannot pack)"
        return None

    def _packed(self, frames: list[np.ndarray], size: tuple[int, int] | None, seq_len: int | None
                ) -> list[np.ndarray]:
        from densekit.serve.packing import packed_features

        why = self._pack_refusal()
        if why is not None:
            raise DensekitError(f"cannot pack these frames: {why}; resize them to one size with size=(H, W)")
        model = self.backend.model
        was_training = model.training
        model.eval()
        try:
            feats = packed_features(model, preprocess_each(frames, self.meta, size), seq_len, self.backend.device)
        finally:
            model.train(was_training)
        return [l2_normalise(f, axis=0) for f in feats]
