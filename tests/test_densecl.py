"""DenseCL objective: correspondence, queues, warm-up, training steps, no collapse, backbone fit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from densekit.serve.backbones import build_backbone
from densekit.serve.errors import DensekitError
from densekit.train.objectives import OBJECTIVES, DenseCL
from densekit.train.losses import dense_correspondence

TINY = dict(hidden_dim=32, out_dim=16, queue_len=64, crop_size=64, grid_size=0)


def images() -> list[np.ndarray]:
    """Four different real photos (scikit-image), uint8 RGB."""
    return [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]


def make_batch(obj: DenseCL, seed: int) -> dict[str, torch.Tensor]:
    tf = pickle.loads(pickle.dumps(obj.transform()))
    rng = np.random.default_rng(seed)
    samples = [tf([img], rng) for img in images()]
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def test_correspondence_recovers_a_known_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 32, 49, generator=g)
    perm = torch.stack([torch.randperm(49, generator=g) for _ in range(3)])  # key j holds query perm[j]
    k = torch.gather(q, 2, perm.unsqueeze(1).expand(-1, 32, -1)) * 2.5  # cosine ignores scale
    k = k + 0.05 * torch.randn(k.shape, generator=g)
    match = dense_correspondence(q, k)
    inverse = torch.argsort(perm, dim=1)  # the key position that holds query i
    assert torch.equal(match, inverse)
    assert not torch.equal(match, torch.arange(49).expand(3, -1))


def make(**kw) -> DenseCL:
    return DenseCL(build_backbone("resnet18", seed=0), **{**TINY, **kw})


def test_queue_pointer_wraps() -> None:
    obj = make(queue_len=10)
    keys = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(3)]
    for i, k in enumerate(keys):
        obj._enqueue(k, -k)
        assert int(obj.queue_ptr) == (4 * (i + 1)) % 10
    q = obj.queue.T
    assert torch.allclose(q[4:8], keys[1])
    assert torch.allclose(q[8:10], keys[2][:2])
    assert torch.allclose(q[0:2], keys[2][2:])  # wrapped around to the front
    assert torch.allclose(q[2:4], keys[0][2:])  # untouched leftovers of the first push
    assert torch.allclose(obj.queue2.T[8:10], -keys[2][:2])


def test_step_pushes_teacher_keys_and_counts_steps() -> None:
    obj = make(queue_len=8).train()
    batch = make_batch(obj, 0)
    out = obj(batch)
    assert int(obj.queue_ptr) == 0  # nothing pushed before the optimiser step ends
    with torch.no_grad():
        k, _, k2 = obj.teacher_neck(obj.teacher_backbone(batch["view2"]))
    obj.on_step_end(0, 10)
    assert int(obj.queue_ptr) == 4 and int(obj.steps_done) == 1
    assert torch.allclose(obj.queue[:, :4].T, F.normalize(k, dim=1), atol=1e-5)
    assert torch.allclose(obj.queue2[:, :4].T, F.normalize(k2, dim=1), atol=1e-5)
    assert torch.isfinite(out["loss"])


def test_dense_weight_warmup() -> None:
    obj = make(warmup_iters=2)
    assert obj.current_lambda() == 0.0
    obj.on_step_end(0, 10)
    assert obj.current_lambda() == 0.0
    obj.on_step_end(1, 10)
    assert obj.current_lambda() == 0.5


def test_loss_finite_and_decreasing_against_fixed_negatives() -> None:
    """Optimiser steps on one batch lower both InfoNCE terms. The queues are held fixed (keys not pushed) so the
    losses stay comparable: pushing this batch's own keys makes the negatives harder at every step."""
    torch.manual_seed(0)
    obj = make(warmup_iters=0).train()
    batch = make_batch(obj, 1)
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.03, momentum=0.9)  # paper's
    history = []
    for step in range(6):
        out = obj(batch)
        assert all(torch.isfinite(v) for v in out.values())
        history.append((out["loss_global"].item(), out["loss_dense"].item(), out["loss"].item()))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj._pending.clear()
        obj.on_step_end(step, 6)
    assert out["lambda"].item() == 0.5
    # random-init views of one image already agree globally, so the global term has less room to fall
    assert history[-1][2] < 0.8 * history[0][2], history
    assert history[-1][1] < 0.9 * history[0][1], history
    assert history[-1][0] < history[0][0], history


def spread(obj: DenseCL) -> tuple[float, float]:
    """Std over samples (and locations) of the normalised dense / global embeddings, averaged over dimensions,
    with batch statistics as in training."""
    obj.train()
    with torch.no_grad():
        g, d, _ = obj.neck(obj.backbone(make_batch(obj, 100)["view1"]))
    z = F.normalize(d, dim=1).permute(0, 2, 3, 1).reshape(-1, d.shape[1])
    return z.std(dim=0).mean().item(), F.normalize(g, dim=1).std(dim=0).mean().item()


def test_no_collapse_after_training() -> None:
    """The embeddings stay spread out after N steps. Isotropic unit vectors give 1/sqrt(C) per dimension; a
    collapsed encoder gives ~0 (this check fails with lr 0.5, where DenseCL does collapse in 6 steps)."""
    torch.manual_seed(0)
    obj = make(warmup_iters=0, queue_len=32)
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    obj.train()
    for step in range(6):
        out = obj(make_batch(obj, step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.on_step_end(step, 6)
    floor = 0.2 / np.sqrt(TINY["out_dim"])
    dense_std, global_std = spread(obj)
    assert dense_std > floor and global_std > floor, (dense_std, global_std, floor)
    assert out["q_std"].item() > floor


def test_transform_outputs_and_determinism() -> None:
    obj = make()
    tf = obj.transform()
    a = tf([skdata.chelsea()], np.random.default_rng(5))
    b = tf([skdata.chelsea()], np.random.default_rng(5))
    assert set(a) == {"view1", "view2"}
    assert a["view1"].shape == (3, 64, 64) and a["view1"].dtype == np.float32
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["view1"], a["view2"])


def test_state_dict_holds_queues_and_teacher() -> None:
    keys = make().state_dict().keys()
    for k in ("queue", "queue2", "queue_ptr", "steps_done"):
        assert k in keys
    assert any(k.startswith("teacher_backbone.") for k in keys)


def test_default_grid_pools_to_paper_resolution() -> None:
    obj = DenseCL(build_backbone("resnet18", seed=0), hidden_dim=32, out_dim=16, queue_len=16, crop_size=64,
                  grid_size=4)
    out = obj.train()(make_batch(obj, 0))
    assert torch.isfinite(out["loss"])
    assert obj._grid(torch.zeros(1, 8, 8, 8)).shape[-2:] == (4, 4)


def test_registered_and_refuses_parameterless_backbone() -> None:
    assert OBJECTIVES["densecl"] is DenseCL and DenseCL.data == "images"
    with pytest.raises(DensekitError, match="trainable") as err:
        DenseCL(build_backbone("pixels"), **TINY)
    assert "\n" not in str(err.value)
