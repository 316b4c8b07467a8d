"""PooDLe objective: flow-equivariance invariance, transform, training steps, backbone fit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from densekit.serve.backbones import build_backbone
from densekit.serve.errors import DensekitError
from densekit.train.objectives import OBJECTIVES, PooDLe
from densekit.train.losses import FlowEquivarianceLoss

def dense_equivariance_loss(*args: torch.Tensor, loss_stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return FlowEquivarianceLoss(loss_stride)(*args)


TINY = dict(hidden_dim=32, proj_dim=16, crop_size=(64, 64), subcrop_size=32, subcrop_num=2, flow="dis")


def smooth_field(c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """(1, c, h, w) spatially smooth random features (blurred noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, h // 4, w // 4, generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def translated_features(dx: int, dy: int, size: int = 64, c: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps of frame a and frame b with a(p) = b(p + (dx, dy)) exactly (crops of one larger field)."""
    big = smooth_field(c, size + 32, size + 32, seed=1)
    y0 = x0 = 16
    fa = big[:, :, y0 : y0 + size, x0 : x0 + size]
    fb = big[:, :, y0 - dy : y0 - dy + size, x0 - dx : x0 - dx + size]
    return fa.contiguous(), fb.contiguous()


def const_flow(dx: float, dy: float, size: int = 64) -> torch.Tensor:
    f = torch.zeros(1, 2, size, size)
    f[:, 0], f[:, 1] = dx, dy
    return f


IDENT = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
FLIP = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # normalised horizontal flip


@pytest.mark.parametrize("dx,dy", [(6, -4), (0, 0), (8, 8)])
def test_dense_loss_is_zero_when_features_follow_the_warp(dx: int, dy: int) -> None:
    fa, fb = translated_features(dx, dy)
    fwd, bwd = const_flow(dx, dy), const_flow(-dx, -dy)
    loss, cover = dense_equivariance_loss(fa, fb, fwd, bwd, IDENT, IDENT)
    assert loss.item() < 1e-6
    assert 0.5 < cover.item() <= 1.0
    if dx or dy:
        # teacher features that do NOT follow the motion (frame a's own map shown as frame b) are penalised
        wrong, _ = dense_equivariance_loss(fa, fa, fwd, bwd, IDENT, IDENT)
        assert wrong.item() > 0.05
        assert wrong.item() > 1e4 * loss.item()


def test_dense_loss_undoes_affine_augmentation_and_coarse_grid() -> None:
    """The student sees a flipped view (features flipped too); theta undoes it. Also at loss_stride 2."""
    fa, fb = translated_features(8, 4)
    fwd, bwd = const_flow(8, 4), const_flow(-8, -4)
    student = fa.flip(-1)  # features of the flipped view of frame a
    for stride in (1, 2):
        ok, _ = dense_equivariance_loss(student, fb, fwd, bwd, FLIP, IDENT, loss_stride=stride)
        bad, _ = dense_equivariance_loss(student, fb, fwd, bwd, IDENT, IDENT, loss_stride=stride)
        assert ok.item() < 1e-4
        assert bad.item() > 0.05


def test_dense_loss_masks_occluded_pixels() -> None:
    """Garbage teacher features inside an occluded region do not count once the flows say it is occluded."""
    fa, fb = translated_features(0, 0)
    fwd, bwd = const_flow(0, 0), const_flow(0, 0)
    fb = fb.clone()
    fb[:, :, 20:40, 20:40] = torch.randn(1, fb.shape[1], 20, 20)
    corrupted, _ = dense_equivariance_loss(fa, fb, fwd, bwd, IDENT, IDENT)
    bwd_occ = bwd.clone()
    bwd_occ[:, 0, 20:40, 20:40] = 10.0  # inconsistent backward flow there -> occluded
    masked, cover = dense_equivariance_loss(fa, fb, fwd, bwd_occ, IDENT, IDENT)
    assert corrupted.item() > 0.05
    assert masked.item() < 1e-3
    assert cover.item() < 1.0


def test_dense_loss_gradient_reaches_student_only() -> None:
    fa, fb = translated_features(4, 0)
    fa = (fa + 0.3 * torch.randn_like(fa)).requires_grad_(True)
    fb = fb.requires_grad_(True)
    loss, _ = dense_equivariance_loss(fa, fb, const_flow(4, 0), const_flow(-4, 0), IDENT, IDENT)
    loss.backward()
    assert fa.grad is not None and fa.grad.abs().sum() > 0
    assert fb.grad is None


def real_pair(size: int = 96, dx: int = 6, dy: int = 3) -> list[np.ndarray]:
    """A real photo and a translated copy (camera pan), uint8 RGB."""
    img = skdata.coffee()
    y0, x0 = 100, 200
    return [np.ascontiguousarray(img[y0 : y0 + size, x0 : x0 + size]),
            np.ascontiguousarray(img[y0 - dy : y0 - dy + size, x0 - dx : x0 - dx + size])]


def make_batch(obj: PooDLe, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    tf = pickle.loads(pickle.dumps(obj.transform()))  # must survive DataLoader workers
    rng = np.random.default_rng(seed)
    samples = [tf(real_pair(dx=4 + i, dy=2), rng) for i in range(n)]
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


@pytest.fixture(scope="module")
def poodle() -> PooDLe:
    return PooDLe(build_backbone("resnet18", decoder=True, seed=0), **TINY)


def test_transform_outputs(poodle: PooDLe) -> None:
    tf = poodle.transform()
    frames = real_pair()
    out = tf(frames, np.random.default_rng(3))
    assert out["view0"].shape == (3, 64, 64) and out["view0"].dtype == np.float32
    assert out["theta1"].shape == (2, 3)
    assert out["flow01"].shape == (2, 64, 64) and out["flow10"].shape == (2, 64, 64)
    assert out["crops_s"].shape == (2, 2, 3, 32, 32) and out["crops_t"].shape == (2, 2, 3, 32, 32)
    assert out["paired"].shape == (2, 2)
    assert all(np.isfinite(v).all() for v in out.values())
    # views are normalised with the backbone's mean/std: roughly zero-centred, unit-scale
    assert abs(float(out["view0"].mean())) < 1.5 and 0.2 < float(out["view0"].std()) < 3.0
    # a small camera pan is mostly paired across frames, and the flow has the pan's direction
    # (the crop window is resized, so the pan is scaled by the resize factor, positive in x and y)
    assert out["paired"].mean() > 0.5
    assert np.median(out["flow01"][0]) > 0.5 and np.median(out["flow10"][0]) < -0.5
    again = tf(frames, np.random.default_rng(3))
    assert all(np.array_equal(out[k], again[k]) for k in out)  # exact resume needs determinism


def test_frames_used_as_given_without_crop_size() -> None:
    """With crop_size None (the trainer path: data.size already applied) the frames keep their size."""
    obj = PooDLe(build_backbone("resnet18", decoder=True, seed=0), **{**TINY, "crop_size": None})
    tf = obj.transform()
    out = tf([f[:64, :96] for f in real_pair()], np.random.default_rng(0))
    assert out["view0"].shape == (3, 64, 96) and out["flow10"].shape == (2, 64, 96)
    with pytest.raises(DensekitError, match="multiples of 32"):
        tf([f[:70, :70] for f in real_pair()], np.random.default_rng(0))


def test_forward_finite_and_loss_decreases() -> None:
    torch.manual_seed(0)
    obj = PooDLe(build_backbone("resnet18", decoder=True, seed=0), **TINY).train()
    batch = make_batch(obj, 2)
    params = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(4):
        out = obj(batch)
        assert set(out) >= {"loss", "loss_dense", "loss_pooled", "mask"}
        assert all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.on_step_end(step, 4)
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] * 0.9, losses
    # the teacher is an EMA: it moved, but stayed off the student; no gradient on it
    assert all(not p.requires_grad for p in obj.teacher_backbone.parameters())
    assert obj.momentum.item() == pytest.approx(1.0)  # cosine schedule ends at 1


def test_pooled_branch_reads_the_last_encoder_stage(poodle: PooDLe) -> None:
    body = poodle.backbone.body
    assert poodle.pooled_stage == "layer4" and poodle.pooled_projector.in_dim == 512
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        direct = body.layer4(body.layer3(body.layer2(body.layer1(body.stem(x)))))
        assert torch.equal(poodle.backbone.forward_stages(x, last="layer4")[-1], direct)


def test_state_dict_holds_teacher(poodle: PooDLe) -> None:
    keys = poodle.state_dict().keys()
    assert any(k.startswith("teacher_backbone.") for k in keys)
    assert any(k.startswith("teacher_pooled_projector.") for k in keys)
    assert "momentum" in keys
    assert poodle.student_backbone() is poodle.backbone


def test_registered() -> None:
    assert OBJECTIVES["poodle"] is PooDLe and PooDLe.data == "pairs"


@pytest.mark.parametrize("name,decoder", [("pixels", False), ("resnet18", False)])
def test_backbone_without_decoder_is_refused(name: str, decoder: bool) -> None:
    with pytest.raises(DensekitError, match="decoder") as err:
        PooDLe(build_backbone(name, decoder=decoder), **TINY)
    assert "\n" not in str(err.value)


def test_bad_crop_size_is_refused() -> None:
    with pytest.raises(DensekitError, match="multiples of 32"):
        PooDLe(build_backbone("resnet18", decoder=True), **{**TINY, "crop_size": (72, 72)})
