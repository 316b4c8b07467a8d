"""VICRegL objective: transform geometry, location matching, invariance, learning, anti-collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from densekit.serve.backbones import DenseBackbone, build_backbone
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.train.augment import cell_locations
from densekit.train.losses import nearest_matches
from densekit.train.objectives.vicregl import VICRegL


def images(n: int, size: int = 80, seed: int = 0) -> list[np.ndarray]:
    """Random rectangles on a random background: structure for the crops to share."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        for _ in range(5):
            y, x = rng.integers(0, size - 10, 2)
            h, w = rng.integers(8, size // 2, 2)
            img[y : y + h, x : x + w] = rng.integers(0, 255, 3)
        out.append(img)
    return out


def make_batch(obj: VICRegL, imgs: list[np.ndarray], seed: int) -> dict[str, torch.Tensor]:
    tf = obj.transform()
    return default_collate([tf([im], np.random.default_rng(seed * 1000 + i)) for i, im in enumerate(imgs)])


def tiny_backbone(seed: int = 0) -> DenseBackbone:
    """A real (small) stride-8 CNN DenseBackbone, so many optimiser steps fit in a test."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, 2, 1),
    )
    return DenseBackbone(body, ModelMeta(name="tiny", stride=8, dim=32))


def test_transform_shapes_and_boxes() -> None:
    obj = VICRegL(tiny_backbone(), mlp="16-16", maps_mlp="8-8", size=32)
    batch = make_batch(obj, images(3), seed=0)
    assert batch["view1"].shape == (3, 3, 32, 32) and batch["view2"].dtype == torch.float32
    assert batch["box1"].shape == (3, 4)
    boxes = torch.cat([batch["box1"], batch["box2"]])
    # boxes lie in the 80x80 frame and cover at least 40 % of it (scale 0.4..1)
    assert boxes.min() >= 0 and boxes.max() <= 80
    area = (boxes[:, 2] - boxes[:, 0]).abs() * (boxes[:, 3] - boxes[:, 1])
    assert (area >= 0.35 * 80 * 80).all()
    # default (size=0): the views take the frame's size rounded down to the input multiple
    full = VICRegL(tiny_backbone(), mlp="16-16", maps_mlp="8-8").transform()([images(1)[0]], np.random.default_rng(0))
    assert full["view1"].shape == (3, 80, 80)


def test_transform_view_is_the_box_content() -> None:
    """An un-augmented crop of a horizontal ramp: pixel values follow the box (and its flip)."""
    from densekit.train.augment import crop_resize

    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3))
    v = crop_resize(ramp, (16.0, 0.0, 48.0, 32.0), (32, 32))
    assert np.abs(v[0, :, 0].astype(int) - ramp[0, 16:48, 0]).max() <= 1
    vf = crop_resize(ramp, (48.0, 0.0, 16.0, 32.0), (32, 32))
    assert np.abs(vf[0, :, 0].astype(int) - ramp[0, 16:48, 0][::-1]).max() <= 1


def test_location_matching_pairs_the_right_cells() -> None:
    # view 1: the whole 64x64 frame; view 2: the same scale shifted by 2 cells right, 1 cell down (8 px cells)
    b1 = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    b2 = torch.tensor([[16.0, 8.0, 80.0, 72.0]])
    l1 = cell_locations(b1, (64, 64), (8, 8))
    l2 = cell_locations(b2, (64, 64), (8, 8))
    src, dst = nearest_matches(torch.cdist(l2, l1), k=20)
    i2, j2 = src[0] // 8, src[0] % 8
    i1, j1 = dst[0] // 8, dst[0] % 8
    assert ((i1 == i2 + 1) & (j1 == j2 + 2)).all()
    src, dst = nearest_matches(torch.cdist(l1, l2), k=20)
    assert ((dst[0] // 8 == src[0] // 8 - 1) & (dst[0] % 8 == src[0] % 8 - 2)).all()
    # flipped view 2 over the same place: cell j2 sees the column of cell 9 - j2 of view 1
    bf = torch.tensor([[80.0, 8.0, 16.0, 72.0]])
    lf = cell_locations(bf, (64, 64), (8, 8))
    src, dst = nearest_matches(torch.cdist(lf, l1), k=20)
    assert ((dst[0] % 8 == 9 - src[0] % 8) & (dst[0] // 8 == src[0] // 8 + 1)).all()


def test_invariance_is_zero_for_identical_views() -> None:
    obj = VICRegL(tiny_backbone(), mlp="16-16", maps_mlp="8-8", size=32).train()
    batch = make_batch(obj, images(4), seed=1)
    batch["view2"] = batch["view1"].clone()
    batch["box2"] = batch["box1"].clone()
    t = obj.terms(batch)
    for key in ("g_inv", "l_inv_loc", "l_inv_feat"):
        assert float(t[key].detach()) < 1e-8, key
    assert float(t["g_var"].detach()) > 0 and torch.isfinite(t["loss"].detach())
    # and clearly non-zero for two different augmented views
    t2 = {k: v.detach() for k, v in obj.terms(make_batch(obj, images(4), seed=1)).items()}
    assert float(t2["g_inv"]) > 1e-3 and float(t2["l_inv_loc"]) > 1e-3


def test_loss_finite_and_decreasing_resnet18() -> None:
    obj = VICRegL(build_backbone("resnet18"), mlp="64-64", maps_mlp="32-32", size=64).train()
    batch = make_batch(obj, images(4), seed=2)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = obj(batch)
        assert set(out) >= {"loss", "g_inv", "g_var", "g_cov", "l_inv_feat", "l_inv_loc", "l_var", "l_cov"}
        assert all(torch.isfinite(v) for v in out.values())
        assert not any(v.requires_grad for k, v in out.items() if k != "loss")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]


def _train_std(var_coeff: float, steps: int = 40) -> float:
    obj = VICRegL(tiny_backbone(), mlp="32-32", maps_mlp="16-16", var_coeff=var_coeff, size=32, num_matches=8)
    obj.train()
    imgs = images(8, size=40, seed=10)
    opt = torch.optim.SGD(obj.parameters(), lr=0.05, momentum=0.9)
    stds = []
    for step in range(steps):
        out = obj(make_batch(obj, imgs, seed=100 + step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        stds.append(float(out["emb_std"]))
    return float(np.mean(stds[-5:]))


def test_variance_term_prevents_collapse() -> None:
    """emb_std: mean per-dimension batch std of the global embedding (the variance hinge aims at 1; it starts
    near 0.35 here). Without the variance term, invariance (+ covariance) shrink it towards 0."""
    kept = _train_std(25.0)
    collapsed = _train_std(0.0)
    assert kept > 0.15
    assert collapsed < 0.25 * kept


def test_bad_settings_and_tiny_batch() -> None:
    with pytest.raises(DensekitError):
        VICRegL(tiny_backbone(), mlp="8192-x")
    with pytest.raises(DensekitError):
        VICRegL(tiny_backbone(), alpha=1.5)
    obj = VICRegL(tiny_backbone(), mlp="16-16", maps_mlp="8-8", size=32).train()
    with pytest.raises(DensekitError, match="batch of at least 2"):
        obj(make_batch(obj, images(1), seed=0))
