"""SelfPatch: neighbours are the top-k of the window (brute force, any grid), the teacher's patch target depends on
the chosen neighbours only, the objective trains, resumes bit-identically and refuses a CNN in one line."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError
from densekit.train.objectives.selfpatch import SelfPatchHead, neighbour_index, select_neighbours


def _window_members(i: int, h: int, w: int, border: str) -> set[int]:
    """Brute force: the patches j != i within Chebyshev distance 1 of i (torus distance for wrap; for clamp,
    distance to i's centre moved one cell inside the grid)."""
    y, x = divmod(i, w)
    if border == "clamp":
        y, x = min(max(y, 1), h - 2), min(max(x, 1), w - 2)
    out = set()
    for j in range(h * w):
        jy, jx = divmod(j, w)
        dy, dx = abs(jy - y), abs(jx - x)
        if border == "wrap":
            dy, dx = min(dy, h - dy), min(dx, w - dx)
        if j != i and max(dy, dx) <= 1:
            out.add(j)
    return out


@pytest.mark.parametrize("h,w,border", [(6, 6, "wrap"), (4, 7, "wrap"), (3, 5, "wrap"), (5, 4, "clamp")])
def test_neighbours_are_the_top_k_of_the_window(h: int, w: int, border: str) -> None:
    idx = neighbour_index(h, w, border=border)
    assert [set(r) for r in idx.tolist()] == [_window_members(i, h, w, border) for i in range(h * w)]
    tokens = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * 10 + w))
    chosen = select_neighbours(tokens, idx, 4)
    cos = F.cosine_similarity(tokens.unsqueeze(2), tokens.unsqueeze(1), dim=-1)  # (B, N, N)
    for b, i in itertools.product(range(2), range(h * w)):
        ranked = sorted(_window_members(i, h, w, border), key=lambda j: -float(cos[b, i, j]))
        assert set(chosen[b, i].tolist()) == set(ranked[:4]), (b, i)
    # the official table for the corner of a 6x6 grid (wrap-around): explicit, not derived
    assert set(neighbour_index(6, 6)[0].tolist()) == {1, 5, 6, 7, 11, 30, 31, 35}


def test_teacher_target_uses_only_the_chosen_neighbours() -> None:
    torch.manual_seed(0)
    h, w, d = 4, 6, 32
    head = SelfPatchHead(d, num_heads=4).eval()
    tokens = torch.randn(2, h * w, d)
    i = 7
    with torch.no_grad():
        _, target = head(tokens, (h, w), aggregate=True)
        chosen = set(select_neighbours(tokens, head.index(h, w), 4)[0, i].tolist())

        def target_after(j: int, new: torch.Tensor) -> torch.Tensor:
            t = tokens.clone()
            t[0, j] = new
            return head(t, (h, w), aggregate=True)[1][0, i]

        window = set(head.index(h, w)[i].tolist())
        for j in range(h * w):
            if j != i and j not in window:  # outside i's window: anything goes
                assert torch.equal(target_after(j, 5 * torch.randn(d)), target[0, i]), j
            elif j in window and j not in chosen:  # in the window, made the least similar: still not chosen
                assert torch.equal(target_after(j, -3 * tokens[0, i]), target[0, i]), j
        # i itself is not in its own target (scaling keeps every cosine ranking, so the same neighbours are chosen)
        assert torch.equal(target_after(i, 2 * tokens[0, i]), target[0, i])
        for j in chosen:
            assert not torch.allclose(target_after(j, 5 * torch.randn(d)), target[0, i]), j
        # the student's patch i is its own token, nothing else: the opposite dependence
        def student_after(j: int) -> torch.Tensor:
            t = tokens.clone()
            t[0, j] = 5 * torch.randn(d)
            return head(t, (h, w), aggregate=False)[1][0, i]

        student = head(tokens, (h, w), aggregate=False)[1][0, i]
        assert not torch.allclose(student_after(i), student)
        assert all(torch.equal(student_after(j), student) for j in chosen)
        # on the torus (wrap) the targets are translation-equivariant, on a non-square grid too
        grid = tokens.reshape(2, h, w, d)
        rolled = grid.roll(shifts=(1, 2), dims=(1, 2)).reshape(2, h * w, d)
        expect = target.reshape(2, h, w, d).roll(shifts=(1, 2), dims=(1, 2)).reshape(2, h * w, d)
        assert torch.allclose(head(rolled, (h, w), aggregate=True)[1], expect, atol=1e-5)


def test_bad_grid_and_k_are_one_line() -> None:
    for call, match in [(lambda: neighbour_index(2, 5), "at least 3x3"),
                        (lambda: neighbour_index(4, 4, border="reflect"), "border"),
                        (lambda: SelfPatchHead(32, 4, k=9), "k must be")]:
        with pytest.raises(DensekitError, match=match) as exc:
            call()
        assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------------
# the objective, through the trainer
# --------------------------------------------------------------------------------------------------

TINY_VIT = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.1,
            "class_token": False, "global_pool": "avg"}
TINY_HPARAMS = {"out_dim": 64, "out_dim_selfpatch": 32, "hidden_dim": 32, "bottleneck_dim": 16,
                "global_crop_size": 32, "local_crop_size": 24, "local_crops_number": 2, "freeze_last_layer_steps": 2}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample") / "s", sequences=3, frames=8, height=64, width=96, seed=0)


def _cfg(sample: Path, out: Path, *extra: str):  # noqa: ANN202
    from densekit.train.config import build_config

    hp = [f"hparams.{k}={v}" for k, v in TINY_HPARAMS.items()]
    return build_config(
        overrides=["max_steps=6", "batch_size=4", "data.size=[48,48]", "data.num_workers=0", "save_every=2",
                   "log_every=1", "progress=false", "tensorboard=false", "deterministic=true", "optim.lr=0.0005",
                   "optim.weight_decay_end=0.4", "optim.grad_clip_mode=per_param",
                   f"backbone_kwargs={json.dumps(TINY_VIT)}", *hp, *extra],
        objective="selfpatch", backbone="timm:vit_tiny_patch16_224", out=str(out), data_path=str(sample))


class Kill(Exception):
    pass


def _kill_at_5(_trainer: object, step: int) -> None:
    if step == 5:
        raise Kill


def test_trainer_steps_resume_bit_identical_and_export_the_teacher(sample: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from densekit.serve.checkpoint import load_checkpoint
    from densekit.train.trainer import Trainer

    full = Trainer(_cfg(sample, tmp_path / "full"))
    assert full.fit().step == 6
    logs = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert len(steps) == 6 and all(math.isfinite(r["loss"]) and math.isfinite(r["loss_patch"]) for r in steps)
    model = full.model
    # freeze_last_layer: both heads' last layers get no update before step 2, everything else does
    batch = {k: torch.from_numpy(v)[None].repeat(2, *([1] * v.ndim))
             for k, v in model.transform()([np.full((48, 48, 3), 90, np.uint8)], np.random.default_rng(0)).items()}
    for step, frozen in ((1, True), (2, False)):
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        model.before_optimizer_step(step, 6)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        last = [n for n in grads if "last_layer" in n]
        assert last and all((grads[n] is None) == frozen for n in last)
        assert grads["p_head.mlp.layers.0.weight"] is not None and grads["ca_head.query"] is not None
    exported = load_checkpoint(tmp_path / "full" / "backbone.safetensors")
    teacher_sd, student_sd = model.teacher_backbone.state_dict(), model.backbone.state_dict()
    assert all(torch.equal(v, teacher_sd[k]) for k, v in exported.state_dict().items())
    assert any(not torch.equal(v, student_sd[k]) for k, v in exported.state_dict().items())

    with pytest.raises(Kill):
        Trainer(_cfg(sample, tmp_path / "cut"), hooks=[_kill_at_5]).fit()
    Trainer(_cfg(sample, tmp_path / "cut"), resume=True).fit()
    a, b = (load_file(str(tmp_path / r / "state.safetensors")) for r in ("full", "cut"))
    a = {k: v for k, v in a.items() if k.startswith("model.")}
    b = {k: v for k, v in b.items() if k.startswith("model.")}
    assert a.keys() == b.keys() and int(a["model.steps_done"]) == 6
    assert bool(a["model.patch_loss.center"].abs().sum() > 0)  # the centres moved and are saved
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_cnn_backbone_or_a_tiny_grid_is_one_clear_line() -> None:
    from densekit.serve.backbones import build_backbone

    from densekit.train.objectives import OBJECTIVES, SelfPatch

    assert OBJECTIVES["selfpatch"] is SelfPatch
    with pytest.raises(DensekitError, match="timm ViT") as exc:
        SelfPatch(build_backbone("resnet18"), **TINY_HPARAMS)
    assert "\n" not in str(exc.value)
    vit = build_backbone("timm:vit_tiny_patch16_224", kwargs=TINY_VIT)
    with pytest.raises(DensekitError, match="local_crop_size 16 .* at least a 3x3 patch grid") as exc:
        SelfPatch(vit, **{**TINY_HPARAMS, "local_crop_size": 16})  # 2x2 patches cannot hold a 3x3 window
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process
# --------------------------------------------------------------------------------------------------

DDP_BATCH = 4


def _ddp_model():  # noqa: ANN202
    """The tiny SelfPatch without stochastic depth (each rank would drop other paths), centres made non-zero."""
    from densekit.serve.backbones import build_backbone
    from densekit.train.objectives.selfpatch import SelfPatch

    torch.manual_seed(0)
    model = SelfPatch(build_backbone("timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "drop_path_rate": 0.0}),
                      **TINY_HPARAMS).train()
    gen = torch.Generator().manual_seed(5)
    for loss in (model.image_loss, model.patch_loss):
        loss.center.copy_(torch.randn(loss.center.shape, generator=gen))
    return model


def _ddp_batch() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    tf = _ddp_model().transform()
    samples = [tf([rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)], np.random.default_rng([7, i]))
               for i in range(DDP_BATCH)]
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def _selfpatch_step(rank: int, world: int, local_centre: bool = False) -> dict[str, torch.Tensor]:
    """One forward/backward on this rank's part of the batch -> gradients and the updated centres."""
    import densekit.train.losses as losses

    model = _ddp_model()
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, find_unused_parameters=True)
    n = DDP_BATCH // world
    batch = {k: v[rank * n : (rank + 1) * n] for k, v in _ddp_batch().items()}
    real = losses.all_reduce_sum
    if local_centre:
        losses.all_reduce_sum = lambda x: x  # a DDP-naive centre: this rank's teacher outputs only
    try:
        net(batch)["loss"].backward()
    finally:
        losses.all_reduce_sum = real
    out = {f"grad.{k}": p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return {**out, "image_center": model.image_loss.center.clone(), "patch_center": model.patch_loss.center.clone()}


def _ddp_ranks(rank: int, world: int, out: str) -> None:
    import os

    from safetensors.torch import save_file

    for name, local in (("global", False), ("local", True)):
        res = _selfpatch_step(rank, world, local)
        if rank == 0:
            save_file(res, os.path.join(out, f"{name}.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_give_the_gradients_and_centres_of_one(tmp_path: Path) -> None:
    from _gloo import run_ranks
    from safetensors.torch import load_file

    run_ranks(_ddp_ranks, str(tmp_path))
    one = _selfpatch_step(0, 1)
    two, naive = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("global", "local"))
    assert one.keys() == two.keys() and any("last_layer" in k for k in one)
    bad = [k for k in one if not torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6)]
    assert not bad, bad[:3]
    # negative control: centres from one rank's teacher outputs are not one process's
    for key in ("image_center", "patch_center"):
        assert not torch.allclose(one[key], naive[key], rtol=1e-4, atol=1e-6)
