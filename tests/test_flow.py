"""densekit.train.flow: OpenCV flow recovers known motion, warping, occlusion and affine conventions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from densekit.serve.errors import DensekitError
from densekit.train.flow import (FlowEstimator, affine_to_normalized, occlusion_mask, opencv_flow, raft_weights_path,
                                 resolve_flow_method, valid_mask, warp)

DX, DY = 5, -3  # a(p) = b(p + (DX, DY))


def shifted_pair(dx: int = DX, dy: int = DY, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Two crops of a real photo (scikit-image's astronaut) such that a(p) = b(p + (dx, dy))."""
    img = skdata.astronaut()
    y0, x0 = 150, 180
    a = img[y0 : y0 + size, x0 : x0 + size]
    b = img[y0 - dy : y0 - dy + size, x0 - dx : x0 - dx + size]
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def to_t(flow_hw2: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(flow_hw2).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("method,tol,frac", [("dis", 0.25, 0.9), ("farneback", 0.5, 0.6)])
def test_opencv_flow_recovers_shift(method: str, tol: float, frac: float) -> None:
    a, b = shifted_pair()
    flow = opencv_flow(a, b, method)
    assert flow.shape == (128, 128, 2) and flow.dtype == np.float32
    inner = flow[16:-16, 16:-16].reshape(-1, 2)
    med = np.median(inner, axis=0)
    assert abs(med[0] - DX) < tol and abs(med[1] - DY) < tol, med
    # most interior pixels, not just the median, follow the shift
    err = np.linalg.norm(inner - np.array([DX, DY]), axis=1)
    assert (err < 1.0).mean() > frac


def test_estimator_pair_is_forward_and_backward() -> None:
    a, b = shifted_pair()
    fwd, bwd = FlowEstimator("dis").pair(a, b)
    assert np.median(fwd[16:-16, 16:-16, 0]) == pytest.approx(DX, abs=0.25)
    assert np.median(bwd[16:-16, 16:-16, 0]) == pytest.approx(-DX, abs=0.25)
    assert np.median(bwd[16:-16, 16:-16, 1]) == pytest.approx(-DY, abs=0.25)


def test_warp_with_exact_flow_reconstructs_frame() -> None:
    a, b = shifted_pair()
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float()
    flow = torch.zeros(1, 2, 128, 128)
    flow[:, 0], flow[:, 1] = DX, DY
    back = warp(tb, flow)
    m = valid_mask(flow)
    assert torch.allclose(back * m, ta * m, atol=1e-3)
    # the strip whose target leaves frame b is invalid: x + DX >= 128 -> last DX columns, y + DY < 0 -> first rows
    assert m[0, 0, :, -DX:].sum() == 0 and m[0, 0, : -DY, :].sum() == 0
    assert m[0, 0, -DY:, :-DX].min() == 1


def test_occlusion_mask_flags_covered_and_disoccluded_regions() -> None:
    """A 20 px square moves right by 8 px over a static background (exact flows)."""
    h, w, x0, s, d = 64, 64, 20, 20, 8
    fwd = torch.zeros(1, 2, h, w)
    bwd = torch.zeros(1, 2, h, w)
    fwd[:, 0, 20:40, x0 : x0 + s] = d  # frame 0 square at x in [20, 40)
    bwd[:, 0, 20:40, x0 + d : x0 + s + d] = -d  # frame 1 square at x in [28, 48)
    occ01 = occlusion_mask(fwd, bwd)[0, 0]
    occ10 = occlusion_mask(bwd, fwd)[0, 0]
    # frame 0 background at x in [40, 48) gets covered by the square in frame 1
    assert occ01[20:40, 40:48].sum() == 0
    # frame 1 background at x in [20, 28) was hidden behind the square in frame 0 (disoccluded)
    assert occ10[20:40, 20:28].sum() == 0
    # everything else is consistent
    keep01 = torch.ones(h, w, dtype=torch.bool)
    keep01[20:40, 40:48] = False
    keep10 = torch.ones(h, w, dtype=torch.bool)
    keep10[20:40, 20:28] = False
    assert occ01[keep01].min() == 1 and occ10[keep10].min() == 1


def test_occlusion_mask_flags_disoccluded_border_with_opencv_flow() -> None:
    """Frame b shows new content along its border (the camera moved); checked from b to a with DIS flow."""
    a, b = shifted_pair(dx=6, dy=0)
    fwd, bwd = FlowEstimator("dis").pair(a, b)
    f_ba, f_ab = to_t(bwd), to_t(fwd)
    keep = occlusion_mask(f_ba, f_ab)[0, 0]
    # b(q) = a(q - 6): b's first 6 columns show content that is not in a; the forward-backward check alone
    # flags them (their backward flow leaves frame a, where the forward flow reads as zero)
    assert keep[8:-8, :6].mean() < 0.2
    assert keep[8:-8, 12:-12].mean() > 0.95
    assert valid_mask(f_ba)[0, 0, 8:-8, :5].mean() < 0.2


def test_affine_to_normalized_matches_opencv() -> None:
    img = skdata.astronaut()[100:164, 200:280].astype(np.float32)  # 64 x 80, not square on purpose
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 7.0, 1.05)
    m = (np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]]))[:2]  # + flip
    view = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR)
    theta = torch.from_numpy(affine_to_normalized(m, h, w))[None]
    grid = F.affine_grid(theta, [1, 3, h, w], align_corners=False)
    back = F.grid_sample(torch.from_numpy(view).permute(2, 0, 1)[None], grid, align_corners=False)[0]
    orig = torch.from_numpy(img).permute(2, 0, 1)
    # un-augmenting the view recovers the original away from the border (bilinear twice: a few grey levels)
    err = (back - orig).abs()[:, 12:-12, 12:-12]
    assert err.mean() < 6.0
    assert (back - orig.flip(-1)).abs()[:, 12:-12, 12:-12].mean() > 4 * err.mean()


def test_flow_method_resolution() -> None:
    with pytest.raises(DensekitError):
        resolve_flow_method("pwc")
    assert resolve_flow_method("farneback") == "farneback"
    auto = resolve_flow_method("auto")
    if raft_weights_path("raft_small") is None and raft_weights_path("raft_large") is None:
        assert auto == "dis"
        with pytest.raises(DensekitError, match="never downloads"):
            resolve_flow_method("raft_small")
    else:
        assert auto.startswith("raft")
