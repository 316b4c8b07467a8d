"""What every export's parity check measures, and on what: real photographs and one comparison.

:func:`densekit.export.onnx.verify_parity` (ONNX Runtime against PyTorch) and
:func:`densekit.export.trt.engine_parity` (TensorRT against ONNX Runtime) both use these, so their
printed figures mean the same thing; so does ``benchmarks/export.py``.
"""

from __future__ import annotations

import numpy as np


def real_images() -> list[np.ndarray]:
    """Three real RGB photographs shipped with scikit-image (no download)."""
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea()]


def compare(reference: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max |diff|, cosine of the flattened tensors, worst per-location cosine over D) of two (B, D, h, w)."""
    a, b = reference.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.abs(a - b).max())
    cos = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    valid = (na > 1e-6 * na.max()) & (nb > 1e-6 * nb.max())  # all-zero locations have no direction
    loc = (a * b).sum(axis=1)[valid] / (na[valid] * nb[valid])
    return max_abs, cos, float(loc.min()) if loc.size else 1.0
