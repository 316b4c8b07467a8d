"""Calibration images for int8 exports: the ``--calib DIR`` folder, preprocessed batches, an ORT reader.

Shared by ONNX Runtime's CPU int8 (:mod:`densekit.export.onnx`) and TensorRT's int8 builds
(:mod:`densekit.export.trt`: the TensorRT 10 entropy calibrator and the TensorRT 11 Q/DQ quantizer), so
both see the same images, preprocessed by the serving code at the size they will run at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import IMAGE_SUFFIXES

MAX_CALIBRATION_IMAGES = 512  # min-max and entropy ranges settle long before this; reading more only costs time


def list_calibration_images(calib: str | os.PathLike[str] | None) -> list[Path]:
    """Image files of ``--calib DIR`` (sorted, at most :data:`MAX_CALIBRATION_IMAGES`); DensekitError if none."""
    if calib is None:
        return []
    folder = Path(calib)
    if not folder.is_dir():
        raise DensekitError(f"--calib {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DensekitError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:MAX_CALIBRATION_IMAGES]


def calibration_batches(files: list[Path], meta: ModelMeta, opt: list[int]) -> list[np.ndarray]:
    """Preprocessed (B, 3, H, W) float32 batches at the shape ``opt`` = [B, 3, H, W]."""
    from densekit.serve.extractor import preprocess
    from densekit.serve.imageio import read_image

    b, _, h, w = opt
    frames = [read_image(p) for p in files]
    return [preprocess(frames[i : i + b], meta, (h, w)) for i in range(0, len(frames) - b + 1, b)] or [
        preprocess(frames[:1], meta, (h, w))
    ]


def calibration_reader(model: Path, batches: list[np.ndarray]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` feeding ``batches`` to ``model``'s input, once each."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    return Reader()
