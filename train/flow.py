"""Optical flow for video objectives: estimation on CPU (OpenCV, or torchvision RAFT with local weights) and
torch warping helpers (warp by flow, warp validity, forward-backward occlusion).

Conventions (shared by every function here):

* A flow field ``f`` from image ``a`` to image ``b`` is in pixels, channel 0 = x (columns), channel 1 = y (rows),
  and means ``a(p) ~ b(p + f(p))``: numpy ``(H, W, 2)`` float32 as OpenCV returns it, torch ``(B, 2, H, W)``.
* Pixel centres sit at integer coordinates; normalised coordinates follow ``grid_sample(align_corners=False)``:
  ``u = (2 x + 1) / W - 1``.

Flow estimation runs in DataLoader workers (the objective's transform), never in ``forward``: OpenCV's DIS
(Kroeger et al., "Fast Optical Flow using Dense Inverse Search", ECCV 2016) or Farneback (SCIA 2003) work offline
on CPU. PooDLe (Wang et al., ICLR 2025) uses RAFT (Teed & Deng, ECCV 2020); torchvision's RAFT is used here only
when its weights are already in the torch hub cache: densekit never downloads weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError

FLOW_METHODS = ("auto", "dis", "farneback", "raft_small", "raft_large")

# PooDLe configs/exp/poodle.yaml (occlusion_masking: alpha1 0.1, alpha2 0.5); the test itself is UnFlow's
# (Meister et al., AAAI 2018): occluded where |f + b(p + f)|^2 > alpha1 (|f|^2 + |b(p + f)|^2) + alpha2.
OCC_ALPHA1 = 0.1
OCC_ALPHA2 = 0.5


# ----------------------------------------------------------------------------------------------------------------
# estimation (numpy / OpenCV, CPU)


def raft_weights_path(variant: str = "raft_small") -> Path | None:
    """The local torchvision RAFT weights file for ``variant`` if it is in the torch hub cache, else None."""
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

    weights = {"raft_small": Raft_Small_Weights.DEFAULT, "raft_large": Raft_Large_Weights.DEFAULT}[variant]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return path if path.is_file() else None


def resolve_flow_method(method: str) -> str:
    """Map ``auto`` to a concrete method: RAFT (small, then large) when local weights exist, else OpenCV DIS.

    Raises:
        DensekitError: unknown method, or a RAFT variant asked for explicitly without local weights.
    """
    if method not in FLOW_METHODS:
        raise DensekitError(f"unknown flow method {method!r}; valid: {', '.join(FLOW_METHODS)}")
    if method == "auto":
        for variant in ("raft_small", "raft_large"):
            if raft_weights_path(variant) is not None:
                return variant
        return "dis"
    if method.startswith("raft") and raft_weights_path(method) is None:
        raise DensekitError(
            f"flow method {method!r} needs torchvision's {method} weights in {torch.hub.get_dir()}/checkpoints "
            "(densekit never downloads them); use flow=dis or flow=farneback"
        )
    return method


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img


def opencv_flow(img_a: np.ndarray, img_b: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow from ``img_a`` to ``img_b`` with OpenCV.

    Args:
        img_a, img_b: (H, W, 3) uint8 RGB (or (H, W) uint8 gray), same size.
        method: ``dis`` (DIS, MEDIUM preset) or ``farneback``.
    Returns:
        (H, W, 2) float32 flow, ``img_a(p) ~ img_b(p + f(p))``.
    """
    ga, gb = _gray(img_a), _gray(img_b)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(ga, gb, None)
    elif method == "farneback":
        # OpenCV's documented example parameters (samples/python/opt_flow.py): pyr 0.5, 3 levels, win 15.
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    else:
        raise DensekitError(f"opencv_flow supports dis and farneback, not {method!r}")
    return np.ascontiguousarray(flow, dtype=np.float32)


class FlowEstimator:
    """Picklable flow estimator for DataLoader workers: ``(img_a, img_b) -> (H, W, 2)`` float32.

    ``method`` must already be resolved (:func:`resolve_flow_method`). A RAFT model is built lazily in the
    worker from the local weights and is not pickled.
    """

    def __init__(self, method: str) -> None:
        if method not in FLOW_METHODS or method == "auto":
            raise DensekitError(f"FlowEstimator needs a resolved flow method, got {method!r}")
        self.method = method
        self._raft: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method, "_raft": None}

    def pair(self, img_a: np.ndarray, img_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward (a -> b) and backward (b -> a) flows, each (H, W, 2) float32."""
        if self.method in ("dis", "farneback"):
            return opencv_flow(img_a, img_b, self.method), opencv_flow(img_b, img_a, self.method)
        fwd, bwd = self._raft_flows(img_a, img_b)
        return fwd, bwd

    @torch.no_grad()
    def _raft_flows(self, img_a: np.ndarray, img_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._raft is None:
            from torchvision.models import optical_flow as of

            path = raft_weights_path(self.method)
            if path is None:
                raise DensekitError(f"{self.method} weights disappeared from {torch.hub.get_dir()}")
            ctor = of.raft_small if self.method == "raft_small" else of.raft_large
            model = ctor(weights=None)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self._raft = model.eval()
        h, w = img_a.shape[:2]
        if h % 8 or w % 8:
            raise DensekitError(f"RAFT needs sizes that are multiples of 8, got {h}x{w}")
        # torchvision's RAFT transforms: [0, 1] -> [-1, 1]
        a = torch.from_numpy(img_a).permute(2, 0, 1).float().div(127.5).sub(1.0)
        b = torch.from_numpy(img_b).permute(2, 0, 1).float().div(127.5).sub(1.0)
        flows = self._raft(torch.stack([a, b]), torch.stack([b, a]), num_flow_updates=12)[-1]
        out = flows.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)
        return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# warping (torch)


def pixel_grid(b: int, h: int, w: int, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 2, H, W) pixel coordinates (x, y) of every pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack([xs, ys]).unsqueeze(0).expand(b, 2, h, w)


def flow_to_normalized(flow: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) flow in pixels -> (B, H, W, 2) normalised sampling positions p + f(p) for ``grid_sample``."""
    b, _, h, w = flow.shape
    pts = pixel_grid(b, h, w, flow.device, flow.dtype) + flow
    x = (2.0 * pts[:, 0] + 1.0) / w - 1.0
    y = (2.0 * pts[:, 1] + 1.0) / h - 1.0
    return torch.stack([x, y], dim=-1)


def warp(x: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Backward-warp ``x`` (frame b content) into frame a with the a -> b flow.

    Args:
        x: (B, C, H, W) defined on frame b.
        flow: (B, 2, H, W) flow a -> b in pixels.
    Returns:
        (B, C, H, W): out(p) = x(p + f(p)) (bilinear; zeros outside).
    """
    return F.grid_sample(x, flow_to_normalized(flow), mode=mode, padding_mode="zeros", align_corners=False)


def valid_mask(flow: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where p + f(p) lands inside the image (pixel-centre extent, as grid_sample sees it)."""
    g = flow_to_normalized(flow)
    inside = (g.abs() <= 1.0).all(dim=-1)
    return inside.unsqueeze(1).to(flow.dtype)


def occlusion_mask(fwd: torch.Tensor, bwd: torch.Tensor, alpha1: float = OCC_ALPHA1,
                   alpha2: float = OCC_ALPHA2) -> torch.Tensor:
    """Forward-backward consistency mask (UnFlow; PooDLe's ``compute_occlusion_mask`` convention).

    Args:
        fwd: (B, 2, H, W) flow a -> b; bwd: (B, 2, H, W) flow b -> a (pixels).
    Returns:
        (B, 1, H, W) float: 1 = visible in both frames (consistent), 0 = occluded / inconsistent. Pixels whose
        target lies outside frame b read zero backward flow and are flagged when the forward flow is large.
    """
    bwd_at_target = warp(bwd, fwd)
    diff = (fwd + bwd_at_target).pow(2).sum(dim=1, keepdim=True)
    mag = (fwd.pow(2) + bwd_at_target.pow(2)).sum(dim=1, keepdim=True)
    return (diff <= alpha1 * mag + alpha2).to(fwd.dtype)


def affine_to_normalized(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """A 2x3 pixel-coordinate affine map (OpenCV convention) -> the same map in normalised coordinates.

    ``m`` maps pixel p of the original to pixel ``m p`` of the transformed image (``cv2.warpAffine(img, m)``).
    The result ``theta`` (2, 3) float32 maps normalised coordinates alike: ``torch.affine_grid(theta)`` over the
    original frame gives where each original position sits in the transformed image.
    """
    n = np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])
    m3 = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return (n @ m3 @ np.linalg.inv(n))[:2].astype(np.float32)


def apply_affine(theta: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Apply (B, 2, 3) normalised affine maps to (B, H, W, 2) normalised points -> (B, H, W, 2)."""
    return torch.einsum("bij,bhwj->bhwi", theta[:, :, :2], grid) + theta[:, None, None, :, 2]


def identity_grid(b: int, h: int, w: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, H, W, 2) normalised coordinates of every pixel centre (align_corners=False)."""
    return flow_to_normalized(torch.zeros(b, 2, h, w, device=device, dtype=dtype))


def inside(grid: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) normalised points -> (B, 1, H, W) float, 1 where the point lies in the image."""
    return (grid.abs() <= 1.0).all(dim=-1).unsqueeze(1).to(grid.dtype)
