"""CrIBo (train/objectives/cribo.py): the properties its parts claim, on plain tensors, then through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError
from densekit.train.objectives.cribo import (
    CrIBo,
    cycle_consistent_nn,
    joint_clustering,
    object_representations,
    spatial_cost,
)


def _grid(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (h*w, 2)


def test_sinkhorn_with_the_spatial_term_balances_where_argmin_would_not() -> None:
    """Every token is closest to seed 0: the arg-min of the first round's cost puts (nearly) all 64 tokens in
    cluster 0; one round of the transport plan, spatial term included, gives every cluster its share."""
    gen = torch.Generator().manual_seed(0)
    t, k = 64, 8
    u = F.normalize(torch.randn(16, generator=gen), dim=0)
    tokens = u + 0.02 * torch.randn(t, 16, generator=gen)
    init = torch.arange(0, t, t // k)[None]  # seeds spread over the image
    tokens[init[0, 1:]] = u + 2.0 * torch.randn(k - 1, 16, generator=gen)  # other seeds look less like the rest
    tokens = tokens[None]
    pos = _grid(8, 8)[None]
    z = F.normalize(tokens, dim=-1)
    cost = -(z @ z[0, init[0]].T)[0] + spatial_cost(pos, F.one_hot(init, t).transpose(1, 2).float())[0]
    argmin_sizes = torch.bincount(cost.argmin(dim=1), minlength=k)
    assert argmin_sizes.max() >= t - 2 * k, argmin_sizes.tolist()  # all but about the seeds
    sizes = joint_clustering(tokens, pos, init, pos_alpha=1.0, n_iter=1).sum(dim=1)[0]
    assert sizes.min() >= t // (2 * k), sizes.tolist()


def test_spatial_term_makes_clusters_spatially_coherent() -> None:
    """Tokens without semantic structure: the spatial term doubles how often 4-neighbours share a cluster."""
    gen = torch.Generator().manual_seed(1)
    b, h, w, k = 2, 8, 8, 8
    pos = _grid(h, w)[None].repeat(b, 2, 1)  # two views of the same place: (B, 2N, 2)
    tokens = torch.randn(b, 2 * h * w, 16, generator=gen)
    init = torch.stack([torch.randperm(2 * h * w, generator=gen)[:k] for _ in range(b)])

    def agreement(alpha: float) -> float:
        assign = joint_clustering(tokens, pos, init, pos_alpha=alpha, n_iter=3)
        assert torch.equal(assign.sum(dim=2), torch.ones(b, 2 * h * w))  # one cluster per token
        lab = assign.argmax(dim=2).reshape(b, 2, h, w)
        return float(((lab[..., 1:, :] == lab[..., :-1, :]).float().mean()
                      + (lab[..., :, 1:] == lab[..., :, :-1]).float().mean()) / 2)

    assert agreement(1.0) > 1.5 * agreement(0.0)


def test_joint_clustering_gives_the_view_correspondence_and_drops_absent_objects() -> None:
    gen = torch.Generator().manual_seed(2)
    h = w = 6
    k = 6
    proto = F.normalize(torch.randn(k, 32, generator=gen), dim=1)
    labels = (torch.arange(h * w) // 6)  # six horizontal stripes, one prototype each
    view = proto[labels] + 0.05 * torch.randn(h * w, 32, generator=gen)
    pos = _grid(h, w)
    init = torch.tensor([[0, 6, 12, 18, 24, 30]])
    # identical views: identical halves, every object present in both, c1 == c2
    assign = joint_clustering(torch.cat([view, view])[None], torch.cat([pos, pos])[None], init)
    a1, a2 = assign[:, : h * w], assign[:, h * w :]
    assert torch.equal(a1, a2)
    o1, p1 = object_representations(view[None], a1)
    o2, p2 = object_representations(view[None], a2)
    assert torch.equal(p1 & p2, p1) and int(p1.sum()) >= 2 and torch.allclose(o1, o2)
    # view 2 shows only the bottom half of the image: the top stripes' objects are absent from it
    top, bottom = labels < 3, labels >= 3
    v2, q2 = view[bottom], pos[bottom]
    assign = joint_clustering(torch.cat([view, v2])[None], torch.cat([pos, q2])[None], init)
    a1, a2 = assign[:, : h * w], assign[:, h * w :]
    _, p1 = object_representations(view[None], a1)
    _, p2 = object_representations(v2[None], a2)
    valid = p1 & p2
    top_clusters = set(a1[0, top].argmax(dim=1).tolist())
    assert top_clusters and not any(bool(valid[0, c]) for c in top_clusters - set(a2[0].argmax(dim=1).tolist()))
    assert bool((p1 & ~p2).any())  # some object of view 1 is absent from view 2 and is dropped


def test_cycle_keeps_only_mutual_neighbours() -> None:
    gen = torch.Generator().manual_seed(3)
    m, d = 6, 32
    c1, c2 = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)
    noise = lambda x: x + 0.05 * torch.randn(x.shape, generator=gen)  # noqa: E731
    distract = torch.randn(10, d, generator=gen)
    bank1 = torch.cat([noise(c1), distract])
    bank2 = torch.cat([noise(c2), torch.randn(10, d, generator=gen)])
    valid = torch.ones(m + 10, dtype=torch.bool)
    own = torch.arange(m)
    nn, keep = cycle_consistent_nn(c1, bank1, bank2, valid, c2, torch.ones(m, dtype=torch.bool), own)
    assert nn.tolist() == list(range(m)) and keep.all()
    # break the view link of two bank entries (their view-2 halves swapped): exactly those two fail
    bank2[[0, 1]] = bank2[[1, 0]]
    _, keep = cycle_consistent_nn(c1, bank1, bank2, valid, c2, torch.ones(m, dtype=torch.bool), own)
    assert keep.tolist() == [False, False, True, True, True, True]
    # invalid bank entries are never retrieved; an empty bank keeps nothing
    valid[:m] = False
    nn, keep = cycle_consistent_nn(c1, bank1, bank2, valid, c2, torch.ones(m, dtype=torch.bool), own)
    assert bool((nn >= m).all())
    _, keep = cycle_consistent_nn(c1, bank1, bank2, torch.zeros_like(valid), c2, torch.ones(m, dtype=torch.bool), own)
    assert not keep.any()


# --------------------------------------------------------------------------------------------------
# The objective on a tiny ViT
# --------------------------------------------------------------------------------------------------

#: a 2-block, 32-wide ViT on 32 px views (4x4 patches of 8 px): seconds per step on a laptop CPU
TINY_VIT = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.1}
TINY_HPARAMS = {"n_tokens": 4, "queue_size": 4, "out_dim": 64, "out_dim_c": 64, "hidden_dim": 32,
                "bottleneck_dim": 16, "crop_size": 32, "n_iter": 2, "nn_start_step": 2,
                "warmup_teacher_temp_steps": 2, "freeze_last_layer_steps": 1}


def _tiny_vit():  # noqa: ANN202
    from densekit.serve.backbones import build_backbone

    return build_backbone("timm:vit_tiny_patch16_224", kwargs=TINY_VIT)


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
                   f"backbone_kwargs={json.dumps(TINY_VIT)}", *hp, *extra],
        objective="cribo", backbone="timm:vit_tiny_patch16_224", out=str(out), data_path=str(sample))


def test_absent_objects_get_no_loss_and_no_gradient() -> None:
    model = CrIBo(_tiny_vit(), **TINY_HPARAMS).eval()  # eval: the centres stay put between the two calls
    gen = torch.Generator().manual_seed(4)
    b, k, d = 2, 4, 32
    t_cls = torch.randn(2 * b, d, generator=gen)
    s_cls = torch.randn(2 * b, d, generator=gen, requires_grad=True)
    tc = (torch.randn(b, k, d, generator=gen), torch.randn(b, k, d, generator=gen))
    sc = tuple(torch.randn(b, k, d, generator=gen, requires_grad=True) for _ in range(2))
    valid = torch.tensor([[True, False, True, True], [False, True, True, False]])
    none = torch.zeros(b * k, dtype=torch.bool)
    out = model.losses(t_cls, s_cls, tc, sc, valid, (none, none), (none.long(), none.long()))
    out["loss"].backward()
    for s in sc:
        g = s.grad.abs().sum(dim=2)  # (B, K)
        assert torch.equal(g[~valid], torch.zeros_like(g[~valid]))
        assert bool((g[valid] > 0).all())
    # changing an absent object changes no loss term
    sc2 = (sc[0].detach().clone(), sc[1].detach().clone())
    sc2[0][0, 1] += 10.0
    again = model.losses(t_cls, s_cls.detach(), tc, sc2, valid, (none, none), (none.long(), none.long()))
    assert float(again["s_loss"]) == pytest.approx(float(out["s_loss"]), abs=0)


def test_a_few_trainer_steps_run_and_bootstrap(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer

    run = tmp_path / "run"
    result = Trainer(_cfg(sample, run)).fit()
    assert result.step == 6
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # the cross-image term is off while the banks fill and before nn_start, on afterwards
    assert steps[0]["nn_loss"] == 0.0 and any(r["nn_loss"] > 0 for r in steps[2:])
    assert all(1.0 <= r["region_count"] <= TINY_HPARAMS["n_tokens"] for r in steps)
    # the exported backbone is the EMA teacher, not the student
    from safetensors.torch import load_file

    exported, state = load_file(str(run / "backbone.safetensors")), load_file(str(run / "state.safetensors"))
    name = next(k for k in exported if k.endswith("blocks.0.attn.qkv.weight"))
    assert torch.equal(exported[name], state[f"model.teacher_backbone.{name}"])
    assert not torch.equal(exported[name], state[f"model.backbone.{name}"])


def test_killed_and_resumed_run_is_bit_identical(sample: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from densekit.train.trainer import Trainer

    class Kill(Exception):
        pass

    def kill_at_5(_trainer: object, step: int) -> None:
        if step == 5:
            raise Kill

    Trainer(_cfg(sample, tmp_path / "full")).fit()
    with pytest.raises(Kill):
        Trainer(_cfg(sample, tmp_path / "cut"), hooks=[kill_at_5]).fit()
    Trainer(_cfg(sample, tmp_path / "cut"), resume=True).fit()
    a, b = (load_file(str(tmp_path / r / "state.safetensors")) for r in ("full", "cut"))
    a = {k: v for k, v in a.items() if k.startswith("model.")}
    b = {k: v for k, v in b.items() if k.startswith("model.")}
    assert a.keys() == b.keys() and bool(a["model.bank.valid"].any()) and int(a["model.bank.pushed"]) == 6 * 4
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_bad_input_is_one_clear_line(sample: Path, tmp_path: Path) -> None:
    from densekit.serve.backbones import build_backbone
    from densekit.train.trainer import Trainer

    with pytest.raises(DensekitError, match="timm ViT") as exc:
        CrIBo(build_backbone("resnet18"), **TINY_HPARAMS)
    assert "\n" not in str(exc.value)
    with pytest.raises(DensekitError, match="too small for n_tokens=32") as exc:
        CrIBo(_tiny_vit(), **{**TINY_HPARAMS, "n_tokens": 32})  # 4x4 patches for 32 clusters
    assert "\n" not in str(exc.value)
    # 3 videos x 8 frames = 24 images, a 64-image bank: refused before the first step
    with pytest.raises(DensekitError, match="memory bank .* not smaller than the 24 training images") as exc:
        Trainer(_cfg(sample, tmp_path / "big", "hparams.queue_size=64")).fit()
    assert "\n" not in str(exc.value) and not (tmp_path / "big" / "state.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process
# --------------------------------------------------------------------------------------------------

DDP_BATCH = 4


def _ddp_model(batch: dict[str, torch.Tensor] | None = None) -> CrIBo:
    """The tiny CrIBo without stochastic depth (each rank would drop other paths), past ``nn_start_step``, its
    bank holding noisy copies of the global batch's own teacher objects (the same on every rank), so all three
    terms are on."""
    from densekit.serve.backbones import build_backbone

    torch.manual_seed(0)
    model = CrIBo(build_backbone("timm:vit_tiny_patch16_224", kwargs={**TINY_VIT, "drop_path_rate": 0.0}),
                  **TINY_HPARAMS)
    if batch is not None:
        with torch.no_grad():
            model(batch)  # every rank runs the whole global batch here, so every rank pushes the same rows
        (objects, valid), = model._pending
        model._pending.clear()
        gen = torch.Generator().manual_seed(5)
        model.bank.push(objects + 0.05 * torch.randn(objects.shape, generator=gen), valid)
        model.steps_done.fill_(10)
    return model


def _ddp_batch() -> dict[str, torch.Tensor]:
    import numpy as np

    from densekit.train.objectives.cribo import CrIBoTransform

    tf = CrIBoTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), TINY_HPARAMS["crop_size"], TINY_VIT["patch_size"],
                        TINY_HPARAMS["n_tokens"])
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1) for _ in range(DDP_BATCH)]
    samples = [tf([im], np.random.default_rng([7, i])) for i, im in enumerate(images)]
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def _local_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    w = torch.ones_like(values) if weights is None else weights.to(values.dtype).expand_as(values)
    return (values * w).sum() / w.sum().clamp_min(1e-12)


def _cribo_grads(rank: int, world: int, local_counts: bool = False) -> dict[str, torch.Tensor]:
    import densekit.train.objectives.cribo as cribo

    full = _ddp_batch()
    model = _ddp_model(full)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, find_unused_parameters=True)
    n = DDP_BATCH // world
    batch = {k: v[rank * n : (rank + 1) * n] for k, v in full.items()}
    real = cribo.global_mean
    if local_counts:
        cribo.global_mean = _local_mean  # a DDP-naive loss: means over this rank's objects only
    try:
        out = net(batch)
    finally:
        cribo.global_mean = real
    if world == 1:  # all three terms are on (a rank alone may have no kept object)
        assert float(out["nn_loss"]) > 0 and float(out["s_loss"]) > 0 and float(out["d_loss"]) > 0
    out["loss"].backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _ddp_ranks(rank: int, world: int, out: str) -> None:
    import os

    from safetensors.torch import save_file

    for name, local in (("global", False), ("local", True)):
        grads = _cribo_grads(rank, world, local)
        if rank == 0:
            save_file(grads, os.path.join(out, f"{name}.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_give_the_gradients_of_one(tmp_path: Path) -> None:
    from _gloo import run_ranks
    from safetensors.torch import load_file

    run_ranks(_ddp_ranks, str(tmp_path))
    one = _cribo_grads(0, 1)
    two, naive = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("global", "local"))
    assert one.keys() == two.keys() and any("last_layer_c" in k for k in one)
    bad = [k for k in one if not torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6)]
    assert not bad, bad[:3]
    # negative control: per-rank object counts do not give one process's gradients
    assert any(not torch.allclose(one[k], naive[k], rtol=1e-4, atol=1e-6) for k in one)
