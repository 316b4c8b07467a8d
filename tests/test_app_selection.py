"""Click -> mask (densekit.apps.app.selection) without Gradio or a model: synthetic frames and features."""

from __future__ import annotations

import numpy as np
import pytest

from densekit.apps.app.selection import Click, brush_region, click_mask, fit_mask, frame_regions, select_region
from densekit.serve.errors import DensekitError

H, W, STRIDE = 120, 160, 8
LEFT = (slice(32, 72), slice(24, 64))  # two objects of the same kind, apart
RIGHT = (slice(32, 72), slice(104, 144))


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A frame with two red squares on a noisy grey-blue ground, and (D, h, w) features in which square
    cells point one way and ground cells another (plus noise). -> frame, feats, left mask, right mask."""
    rng = np.random.default_rng(seed)
    frame = np.clip(rng.normal((90, 100, 130), 6, (H, W, 3)), 0, 255).astype(np.uint8)
    left, right = np.zeros((H, W), bool), np.zeros((H, W), bool)
    left[LEFT], right[RIGHT] = True, True
    frame[left | right] = (210, 30, 30)
    h, w, d = H // STRIDE, W // STRIDE, 8
    cell_object = (left | right).reshape(h, STRIDE, w, STRIDE).mean(axis=(1, 3)) >= 0.5
    feats = rng.normal(0, 0.15, (d, h, w))
    feats[0] += cell_object
    feats[1] += ~cell_object
    feats /= np.linalg.norm(feats, axis=0, keepdims=True)
    return frame, feats.astype(np.float32), left, right


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_click_selects_the_connected_object_under_it_only() -> None:
    frame, feats, left, right = _scene()
    mask = click_mask(frame, feats, [Click(40, 50)])
    assert mask.shape == (H, W) and mask.dtype == bool
    # the right square is as similar but not connected to the click: it stays out
    assert _iou(mask, left) > 0.85 and (mask & right).sum() == 0
    both = click_mask(frame, feats, [Click(40, 50), Click(120, 50)])
    assert _iou(both, left | right) > 0.85


def test_negative_click_removes_from_the_base_and_needs_no_positive() -> None:
    frame, feats, left, right = _scene(1)
    regions = frame_regions(frame, feats)
    base = left | right
    out = select_region(regions, [Click(120, 50, positive=False)], base=base)
    assert _iou(out, left) > 0.85 and (out & right).sum() < 0.1 * right.sum()
    assert not select_region(regions, [Click(120, 50, positive=False)]).any()  # nothing to remove from
    with pytest.raises(DensekitError, match="base mask"):
        select_region(regions, [Click(1, 1)], base=np.zeros((10, 10), bool))


def test_a_threshold_above_every_similarity_keeps_only_the_clicked_superpixel() -> None:
    frame, feats, left, _ = _scene(2)
    regions = frame_regions(frame, feats)
    auto = select_region(regions, [Click(40, 50)])
    strict = select_region(regions, [Click(40, 50)], threshold=1.01)
    clicked = regions.labels == regions.labels[regions.at(Click(40, 50))]
    assert strict.sum() < auto.sum() / 4 and strict[50, 40]
    assert strict.sum() == pytest.approx(clicked.sum() * (H / regions.labels.shape[0]) ** 2, rel=0.05)


def test_frame_regions_pool_features_per_superpixel() -> None:
    frame, feats, left, _ = _scene(3)
    regions = frame_regions(frame, feats, max_side=80)  # work grid at half size
    assert regions.labels.shape == (60, 80) and regions.frame_size == (H, W)
    n = int(regions.labels.max()) + 1
    assert regions.descriptors.shape == (n, feats.shape[0])
    assert np.allclose(np.linalg.norm(regions.descriptors, axis=1), 1, atol=1e-5)
    inside = regions.labels[regions.at(Click(40, 50))]
    assert regions.descriptors[inside, 0] > regions.descriptors[inside, 1]  # an object superpixel
    assert regions.at(Click(W - 0.5, H - 0.5)) == (59, 79) and regions.at(Click(-5, -5)) == (0, 0)


def test_brush_region_reads_any_layer_at_any_size() -> None:
    assert not brush_region(None, (4, 6)).any() and not brush_region({"layers": []}, (4, 6)).any()
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:4, :6, 3] = 255  # painted, at twice the frame's size
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[3, 5] = (255, 0, 0)
    got = brush_region({"layers": [rgba, None, rgb]}, (4, 6))
    want = np.zeros((4, 6), bool)
    want[:2, :3] = True
    want[3, 5] = True
    assert np.array_equal(got, want)


def test_fit_mask_resizes_same_aspect_and_refuses_another() -> None:
    m = np.zeros((4, 6), np.uint8)
    m[:2, :3] = 2
    big = fit_mask(m, (8, 12))
    assert big.shape == (8, 12) and set(np.unique(big)) == {0, 2} and (big[:4, :6] == 2).all()
    assert fit_mask(m, (4, 6)) is m
    with pytest.raises(DensekitError, match="is 6x4 but the video is 6x6"):
        fit_mask(m, (6, 6))
