"""DetCon: masks follow the views, unmatched regions get no gradient, DetCon-S negatives span images, training runs
and resumes exactly on a ResNet and on a ViT, too many masks for the grid is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from densekit.serve.backbones import build_backbone
from densekit.serve.errors import DensekitError
from densekit.train.objectives.detcon import DetCon, majority_labels, mask_pool

SMALL = {"hidden_dim": 32, "proj_dim": 16}


def two_colour_frame(h: int = 64, w: int = 96, split: int = 40) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:, :split] = (220, 40, 30)
    img[:, split:] = (20, 60, 210)
    return img


def test_majority_vote_pools_a_known_mask_through_crop_and_flip() -> None:
    """80 x 80 frame, view 40 x 40 (2 frame pixels per view pixel), stride 8 -> 5 x 5 cells of 16 frame pixels.

    The mask holds id 1 from frame column ``edge`` on. Cell column 2 covers frame x in [32, 48): its view pixels
    read x = 33, 35, ..., 47. edge 39 -> 5 of 8 pixels (62.5 %) are 1: the cell is 1; edge 41 -> 4 of 8, a tie:
    the smaller id, 0."""
    for edge, col2 in ((39, 1), (41, 0)):
        labels = np.zeros((80, 80), np.int32)
        labels[:, edge:] = 1
        grid = majority_labels(labels, (80, 80), (0.0, 0.0, 80.0, 80.0), (40, 40), 8)
        assert grid.shape == (5, 5)
        assert (grid[:, :2] == 0).all() and (grid[:, 3:] == 1).all() and (grid[:, 2] == col2).all()
        flipped = majority_labels(labels, (80, 80), (80.0, 0.0, 0.0, 80.0), (40, 40), 8)
        assert np.array_equal(flipped, grid[:, ::-1])
    # a crop of the right half, flipped: cell (i, j) reads frame x in [80 - 8 (j + 1), 80 - 8 j)
    labels = np.arange(80)[None, :].repeat(80, 0) // 8  # id = frame column // 8
    crop = majority_labels(labels, (80, 80), (80.0, 0.0, 40.0, 40.0), (40, 40), 8)
    assert np.array_equal(crop[0], [9, 8, 7, 6, 5]) and (crop == crop[0]).all()

    # pooled feature = mean of the mask's cells
    feats = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cells = torch.zeros(2, 4, 4, dtype=torch.long)
    cells[:, :, 1:] = 7
    pooled = mask_pool(feats, cells, torch.tensor([[7, 0], [0, 0]]))
    assert torch.allclose(pooled[0, 0], feats[0, :, :, 1:].mean(dim=(1, 2)))
    assert torch.allclose(pooled[1, 1], feats[1, :, :, 0].mean(dim=1))


def test_transform_masks_follow_each_views_crop_and_flip() -> None:
    """FH finds the two colour halves; each view's cells are the true halves carried through that view's box."""
    obj = DetCon(build_backbone("resnet18"), size=64, num_masks=8, fh_min_size=50, **SMALL)
    tf = obj.transform()
    img = two_colour_frame()
    truth = (np.arange(96) >= 40)[None, :].repeat(64, 0).astype(np.int32)
    flips = 0
    for seed in range(6):
        s = tf([img], np.random.default_rng(seed))
        for k in (1, 2):
            box = tuple(float(v) for v in s[f"box{k}"])
            flips += box[0] > box[2]
            cells = s[f"cells{k}"]
            assert cells.shape == (8, 8)
            ref = majority_labels(truth, (64, 96), box, (64, 64), 8)
            # FH may number the halves either way: the map must be one of the two labellings of the truth
            left = cells[ref == 0]
            assert np.unique(left).size <= 1 and not np.isin(cells[ref == 1], left).any()
            assert np.isin(s[f"ids{k}"], np.unique(cells)).all() and s[f"ids{k}"].shape == (8,)
    assert flips > 0


def _grid_batch(b: int = 2, side: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Views for a stride-8 backbone (4 x 4 cells). Image 0: view 1 has ids 0 (left) and 1 (right), view 2 only
    id 0, so id 1 is unmatched; the other images share ids 0 and 1 in both views."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.zeros(b, 4, 4, dtype=torch.long)
    cells[:, :, 2:] = 1
    cells2 = cells.clone()
    cells2[0] = 0
    ids = torch.tensor([0, 1, 0, 1, 1, 0]).repeat(b, 1)
    ids2 = ids.clone()
    ids2[0] = 0
    return {"view1": torch.randn(b, 3, side, side, generator=g), "view2": torch.randn(b, 3, side, side, generator=g),
            "cells1": cells, "cells2": cells2, "ids1": ids, "ids2": ids2}


def test_unmatched_region_gets_exactly_zero_gradient() -> None:
    torch.manual_seed(0)
    obj = DetCon(build_backbone("resnet18"), variant="b", num_masks=6, size=32, **SMALL).train()
    preds: list[torch.Tensor] = []

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        out.retain_grad()
        preds.append(out)

    obj.predictor.register_forward_hook(keep)
    batch = _grid_batch()
    out = obj(batch)
    out["loss"].backward()
    g1 = preds[0].grad.reshape(2, 6, -1)  # view 1's predictions (B, R, C)
    unmatched = batch["ids1"][0] == 1
    assert unmatched.sum() == 3
    assert torch.count_nonzero(g1[0, unmatched]) == 0  # exactly zero, not small
    assert (g1[0, ~unmatched].abs().sum(dim=1) > 0).all()
    assert (g1[1].abs().sum(dim=1) > 0).all()
    assert out["matched"].item() == pytest.approx(1 - 3 / 24)


@pytest.mark.parametrize("variant", ["s", "b"])
def test_detcon_s_negatives_come_from_other_images(variant: str) -> None:
    """Image 1 has no mask present in both views (no positives, weight 0): only image 0's queries count. Its pixels then
    reach the loss only as negatives of image 0: DetCon-S keys carry gradient (nonzero), DetCon-B's EMA targets do
    not (exactly zero). BatchNorm in eval mode, so images do not couple through batch statistics."""
    torch.manual_seed(0)
    obj = DetCon(build_backbone("resnet18"), variant=variant, num_masks=6, size=32, **SMALL).eval()
    batch = _grid_batch()
    batch["cells1"][1], batch["cells2"][1] = 5, 6
    batch["ids1"][1], batch["ids2"][1] = 5, 6
    views = [batch[k].requires_grad_(True) for k in ("view1", "view2")]
    out = obj(batch)
    # view 1 -> 2: image 0 matches 3 of 6, image 1 none; view 2 -> 1: image 0 all 6, image 1 none
    assert out["matched"].item() == pytest.approx((3 / 12 + 6 / 12) / 2)
    out["loss"].backward()
    other = sum(float(v.grad[1].abs().sum()) for v in views)
    assert (other > 0) if variant == "s" else (other == 0.0)
    assert float(views[0].grad[0].abs().sum()) > 0


def test_too_many_masks_for_the_grid_is_one_line() -> None:
    with pytest.raises(DensekitError) as err:
        DetCon(build_backbone("timm:vit_tiny_patch16_224"), size=48, num_masks=16, **SMALL)  # 3 x 3 patch grid
    msg = str(err.value)
    assert "\n" not in msg and "num_masks=16" in msg and "3x3" in msg
    # size 0 (the frame's size) is only known in the transform: the same line there
    tf = DetCon(build_backbone("resnet18"), size=0, num_masks=16, **SMALL).transform()
    with pytest.raises(DensekitError, match="cannot fit on the 3x4 feature grid"):
        tf([two_colour_frame(24, 32, 10)], np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------
# Trainer: both variants on both backbone kinds, exact resume
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample") / "s", sequences=2, frames=6, height=64, width=80, seed=0)


def _cfg(sample: Path, out: Path, backbone: str, variant: str, *extra: str):  # noqa: ANN202
    from densekit.train.config import build_config

    return build_config(
        overrides=["max_steps=4", "batch_size=4", "data.size=[64,64]", "data.num_workers=0", "save_every=2",
                   "log_every=1", "progress=false", "tensorboard=false", "deterministic=true",
                   "optim.warmup_steps=1", f"hparams.variant={variant}", "hparams.size=64", "hparams.num_masks=8",
                   "hparams.hidden_dim=32", "hparams.proj_dim=16", "hparams.fh_min_size=60", *extra],
        objective="detcon", backbone=backbone, out=str(out), data_path=str(sample),
    )


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "timm:vit_tiny_patch16_224"])
@pytest.mark.parametrize("variant", ["b", "s"])
def test_trainer_steps_are_finite(sample: Path, tmp_path: Path, backbone: str, variant: str) -> None:
    from densekit.train.trainer import Trainer

    res = Trainer(_cfg(sample, tmp_path / "run", backbone, variant, "max_steps=3")).fit()
    lines = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in lines] == [1, 2, 3] and res.step == 3
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and 0 < r["matched"] <= 1 for r in lines)
    assert all(r["proj_std"] > 0 for r in lines)


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(sample: Path, tmp_path: Path) -> None:
    from test_trainer import Kill, _assert_identical, _kill_at, _weights

    from densekit.train.trainer import Trainer

    Trainer(_cfg(sample, tmp_path / "full", "resnet18", "b")).fit()
    with pytest.raises(Kill):
        Trainer(_cfg(sample, tmp_path / "cut", "resnet18", "b"), hooks=[_kill_at(3)]).fit()
    Trainer(_cfg(sample, tmp_path / "cut", "resnet18", "b"), resume=True).fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    _assert_identical(a, b)
    assert float(a["model.momentum"]) > 0.996  # the EMA schedule ran and was restored
    assert not torch.equal(a["model.target_projector.layers.0.weight"], a["model.projector.layers.0.weight"])


# ------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on halves of one global batch == 1 process on all of it
# ------------------------------------------------------------------------------------------------

WORLD, GLOBAL_BATCH = 2, 4


def _rect_frames(n: int, side: int = 64) -> list[np.ndarray]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        img = np.empty((side, side, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        for _ in range(3):
            y, x = rng.integers(0, side - 20, 2)
            img[y : y + int(rng.integers(16, 40)), x : x + int(rng.integers(16, 40))] = rng.integers(0, 255, 3)
        out.append(img)
    return out


def _ddp_objective(variant: str) -> DetCon:
    torch.manual_seed(0)
    # eval mode: BatchNorm uses running statistics, so the halves do not differ through batch statistics (that
    # is SyncBatchNorm's business); what is under test is the gathering of keys, ids and rank offsets
    return DetCon(build_backbone("resnet18", seed=0), variant=variant, size=32, num_masks=6, fh_min_size=60,
                  **SMALL).eval()


def _ddp_batch() -> dict[str, torch.Tensor]:
    tf = _ddp_objective("s").transform()
    return default_collate([tf([f], np.random.default_rng(i)) for i, f in enumerate(_rect_frames(GLOBAL_BATCH))])


def _grads(obj: DetCon) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in obj.named_parameters() if p.grad is not None}


def _ranked_grads(rank: int, variant: str, gather: bool) -> dict[str, torch.Tensor]:
    import densekit.train.objectives.detcon as detcon_mod
    from torch.nn.parallel import DistributedDataParallel as DDP

    from densekit.train import dist

    obj = _ddp_objective(variant)
    ddp = DDP(obj, find_unused_parameters=False, **dist.ddp_buffer_kwargs(False))
    local = GLOBAL_BATCH // WORLD
    batch = {k: v[rank * local : (rank + 1) * local] for k, v in _ddp_batch().items()}
    saved = detcon_mod.gather_with_grad, detcon_mod.concat_all_gather
    if not gather:  # a DDP-naive loss: keys and ids of this process only
        detcon_mod.gather_with_grad = detcon_mod.concat_all_gather = lambda x: x  # type: ignore[assignment]
    try:
        ddp(batch)["loss"].backward()
    finally:
        detcon_mod.gather_with_grad, detcon_mod.concat_all_gather = saved
    return _grads(obj)


def _ddp_ranks(rank: int, world: int, out: str) -> None:
    import os

    from safetensors.torch import save_file

    for variant in ("b", "s"):
        for gather in (True, False):
            g = _ranked_grads(rank, variant, gather)
            if rank == 0:
                save_file(g, os.path.join(out, f"{variant}_{'gather' if gather else 'local'}.safetensors"))


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _gloo import run_ranks

    root = tmp_path_factory.mktemp("detcon_ddp")
    run_ranks(_ddp_ranks, str(root), world=WORLD)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b", "s"])
def test_two_processes_give_the_gradients_of_one(ddp_grads: Path, variant: str) -> None:
    from safetensors.torch import load_file

    single = _ddp_objective(variant)
    single(_ddp_batch())["loss"].backward()
    ref = _grads(single)
    two = load_file(str(ddp_grads / f"{variant}_gather.safetensors"))
    assert ref.keys() == two.keys() and any(k.startswith("backbone.") for k in ref)
    for k in ref:
        torch.testing.assert_close(two[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    naive = load_file(str(ddp_grads / f"{variant}_local.safetensors"))
    assert any(not torch.allclose(naive[k], ref[k], rtol=1e-5, atol=1e-6) for k in ref)
