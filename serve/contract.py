"""The model contract: what every exported or saved densekit model carries beside its weights.

A dense backbone maps a normalised ``(B, 3, H, W)`` batch to ``(B, D, H/s, W/s)`` features. Whoever
runs it (torch, ONNX Runtime, TensorRT) needs to know how to preprocess a frame and what comes out;
that is this metadata. It travels as JSON (safetensors metadata, ONNX ``metadata_props``, a sidecar
next to a TensorRT engine), so serving never needs to import the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from densekit.serve.errors import DensekitError

__version__ = "0.1.0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to preprocess for and interpret a dense backbone.

    Attributes:
        name: backbone name as given on the command line (``resnet18``, ``timm:vit_small_patch16_224``).
        stride: output stride s; features are ``(D, H/s, W/s)``.
        dim: feature dimension D.
        mean, std: per-channel normalisation applied to RGB in [0, 1].
        input_multiple: H and W must be multiples of this (usually the stride, or the patch size).
        objective: the training objective that produced the weights, or ``"none"``.
        version: densekit version that wrote the metadata.
        arch: keyword arguments that rebuild the architecture (``family``, decoder on/off, timm model name, and
            for ``timm:`` backbones built with extra timm keywords their ``kwargs``: depth, patch size...).
    """

    name: str
    stride: int
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_multiple: int = 8
    objective: str = "none"
    version: str = __version__
    arch: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise DensekitError(f"model metadata is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelMeta:
        if not isinstance(raw, dict):
            raise DensekitError("model metadata must be a JSON object")
        missing = [k for k in ("name", "stride", "dim") if k not in raw]
        if missing:
            raise DensekitError(f"model metadata lacks {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in raw.items() if k in known}
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        kwargs["stride"] = int(kwargs["stride"])
        kwargs["dim"] = int(kwargs["dim"])
        if "input_multiple" in kwargs:
            kwargs["input_multiple"] = int(kwargs["input_multiple"])
        return cls(**kwargs)
