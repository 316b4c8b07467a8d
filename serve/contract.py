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

from densekit.serve.meta_schema import CONTRACT_CHARS, CONTRACT_DEPTH, check_contract, loads_bounded

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
    def from_json(cls, text: str | bytes) -> ModelMeta:
        """Parse and check a contract (:mod:`densekit.serve.meta_schema`); DensekitError (one line) otherwise."""
        raw = loads_bounded(text, "model metadata", max_depth=CONTRACT_DEPTH, max_chars=CONTRACT_CHARS)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelMeta:
        """A contract from parsed JSON, every field checked for type and range (:func:`check_contract`)."""
        return cls(**check_contract(raw))
