"""Hierarchical-grouping pixel contrast: hypercolumn head, sampling counts, cross-image negatives, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

pytest.importorskip("higra")

from densekit.serve.backbones import build_backbone  # noqa: E402
from densekit.serve.errors import DensekitError  # noqa: E402
from densekit.train.objectives.hiergroup import HierGroupContrast  # noqa: E402


@pytest.fixture(scope="module")
def objective() -> HierGroupContrast:
    return HierGroupContrast(build_backbone("resnet18"), size=64, cns=3).train()


def rectangles(n: int, size: int = 80, seed: int = 0) -> list[np.ndarray]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        for _ in range(4):
            y, x = rng.integers(0, size - 16, 2)
            h, w = rng.integers(16, size // 2, 2)
            img[y : y + h, x : x + w] = rng.integers(0, 255, 3)
        out.append(img)
    return out


def make_batch(obj: HierGroupContrast, imgs: list[np.ndarray], seed: int) -> dict[str, torch.Tensor]:
    tf = obj.transform()
    return default_collate([tf([im], np.random.default_rng(seed * 100 + i)) for i, im in enumerate(imgs)])


def test_hypercolumn_head_is_32d_at_stride_4(objective: HierGroupContrast) -> None:
    x = torch.randn(2, 3, 64, 96)
    z = objective.embed(x)
    assert z.shape == (2, 32, 16, 24)
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 16, 24), atol=1e-5)
    # layer1 (s4), layer2 (s8) and layer3 (s8) of the dense ResNet-18 feed the hypercolumn: 64 + 128 + 256
    assert objective.head.mlp.in_dim == 64 + 128 + 256


def test_hypercolumn_with_decoder_backbone_uses_every_stage() -> None:
    obj = HierGroupContrast(build_backbone("resnet18", decoder=True), size=64)
    assert obj.head.mlp.in_dim == 64 + 128 + 256 + 512 + 256  # layer1..4 + decoder
    z = obj.embed(torch.randn(1, 3, 64, 64))
    assert z.shape == (1, 32, 16, 16)
    z.sum().backward()
    unused = [n for n, p in obj.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


@pytest.mark.parametrize("name,channels", [("timm:resnet18", 64 + 128 + 256 + 512), ("efficientnet_lite0", 24 + 40 + 80)])
def test_hypercolumn_from_the_stage_api_of_other_families(name: str, channels: int) -> None:
    """Any body with several stages at stride >= 4 gives hypercolumns (stride-2 stages are left out)."""
    obj = HierGroupContrast(build_backbone(name), size=64)
    assert obj.head.mlp.in_dim == channels
    assert obj.embed(torch.randn(1, 3, 64, 64)).shape == (1, 32, 16, 16)


def test_single_stage_backbone_is_refused_in_one_line() -> None:
    with pytest.raises(DensekitError) as err:
        HierGroupContrast(build_backbone("pixels"))
    msg = str(err.value)
    assert "\n" not in msg and "hypercolumn" in msg and "pixels" in msg


def test_batch_counts_and_shapes(objective: HierGroupContrast) -> None:
    batch = make_batch(objective, rectangles(2), seed=0)
    assert batch["view1"].shape == (2, 3, 64, 64)
    assert batch["anchor"].shape == (2, 70) and batch["positive"].shape == (2, 70)
    assert batch["negative"].shape == (2, 70, 5) and batch["cross_idx"].shape == (2, 70, 3)
    assert batch["labels1"].shape == (2, 16, 16)
    # positives share the anchor's region id at sigma_p, negatives do not
    l1, l2 = batch["labels1"].flatten(1), batch["labels2"].flatten(1)
    a = l1.gather(1, batch["anchor"])
    assert (l2.gather(1, batch["positive"]) == a)[batch["valid"] > 0].all()
    neg = l2.gather(1, batch["negative"].flatten(1)).view(2, 70, 5)
    assert (neg != a[..., None])[batch["neg_valid"] > 0].all()
    assert (batch["neg_valid"] > 0).any()


def test_cross_image_negatives_come_from_the_other_image(objective: HierGroupContrast) -> None:
    batch = make_batch(objective, rectangles(2), seed=1)
    batch["valid"][1] = 0  # only image 0's anchors count
    batch["neg_valid"][:] = 0  # no in-image negatives: only cross-image ones can reach image 1
    v2 = batch["view2"].clone().requires_grad_(True)
    batch["view2"] = v2
    objective.eval()  # BatchNorm in eval mode: no batch coupling through statistics
    try:
        objective(batch)["loss"].backward()
    finally:
        objective.train()
    assert v2.grad[1].abs().sum() > 0
    v2.grad = None
    batch_no_cross = dict(batch)
    obj0 = HierGroupContrast(objective.backbone, size=64, cns=0)
    obj0.eval()
    obj0(batch_no_cross)["loss"].backward()
    assert v2.grad is None or v2.grad[1].abs().sum() == 0


def test_loss_finite_and_decreasing() -> None:
    obj = HierGroupContrast(build_backbone("resnet18"), size=64).train()
    batch = make_batch(obj, rectangles(4, seed=5), seed=2)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        out = obj(batch)
        assert all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]
    assert float(out["pos_sim"]) > float(out["neg_sim"])
