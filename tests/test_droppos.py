"""DropPos: no positional leak, the smoothed targets and their schedule, label plumbing, trainer runs, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densekit.serve.backbones import build_backbone
from densekit.serve.errors import DensekitError
from densekit.train.objectives import OBJECTIVES
from densekit.train.objectives.droppos import DropPos, smoothed_targets

# a 2-block ViT with 4 x 4 patches of 4 px: 16 positions (chance 1/16)
TINY = {"depth": 2, "patch_size": 4, "img_size": 16}


def _model(cls: type[DropPos] = DropPos, **hp) -> DropPos:
    torch.manual_seed(0)
    bb = build_backbone("timm:vit_tiny_patch16_224", kwargs=TINY)
    kw = dict(size=16, mask_ratio=0.5, pos_mask_ratio=0.5, decoder_dim=64, decoder_depth=1, decoder_heads=4,
              sigma=0.0, sigma_decay=False)
    kw.update(hp)
    return cls(bb, **kw)


class LeakyDropPos(DropPos):
    """Bug injection: the dropped tokens keep their true position embedding."""

    def position_inputs(self, pos, keep_pos, is_patch):  # noqa: ANN001, ANN201
        return pos * is_patch.unsqueeze(-1).to(pos.dtype)


def _train_accuracy(model: DropPos, steps: int = 150, batch: int = 8) -> float:
    """Train on i.i.d. noise frames (their content says nothing about where a patch sits); mean accuracy on
    dropped-position tokens over the last 30 steps (fresh images every step, so it is held-out accuracy)."""
    tf, col = model.transform(), model.collate()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    accs = []
    for step in range(steps):
        samples = []
        for i in range(batch):
            g = step * batch + i
            frame = np.random.default_rng([7, g, 0]).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            samples.append(tf([frame], np.random.default_rng([7, g, 1])))
        out = model(col(samples))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if step >= steps - 30:
            accs.append(float(out["acc_dropped"]))
    return float(np.mean(accs))


def test_dropped_positions_stay_at_chance_unless_positions_leak() -> None:
    # without attentive weights: they put most of the loss on a few tokens per image, which slows the leaky
    # variant down (0.4 after 150 steps), not the honest one
    honest = _train_accuracy(_model(attn_guide=False))
    leaky = _train_accuracy(_model(LeakyDropPos, attn_guide=False))
    # 8 visible tokens, 4 keep their position: a dropped one is at one of the other 12 cells (1/12 = 0.083)
    assert honest < 0.2, honest
    assert leaky > 0.8, leaky


def test_smoothed_targets_sum_to_one_and_peak_at_the_true_position() -> None:
    side = 14
    rows, cols = np.divmod(np.arange(side * side), side)
    coords = torch.from_numpy(np.stack([rows, cols], 1))
    grid = torch.full((side * side, 2), side)
    t = smoothed_targets(coords, grid, side, 1.0)
    assert torch.allclose(t.sum(-1), torch.ones(side * side), atol=1e-5)
    assert torch.equal(t.argmax(-1), torch.arange(side * side))
    # the Gaussian of the paper: exp(-d^2 / sigma^2), so a 4-neighbour gets e^-1 of the peak
    assert abs(float(t[0, 1] / t[0, 0]) - np.exp(-1.0)) < 1e-5
    assert torch.equal(smoothed_targets(coords, grid, side, 0.0), torch.eye(side * side))
    # the official normalisation (weight / weight.sum(-1) broadcast: entry j over the sum of row j), kept as an option
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    w = np.exp(-d2 / 1.0)
    official = smoothed_targets(coords, grid, side, 1.0, "official").numpy()
    assert np.allclose(official, w / w.sum(-1), atol=1e-6)
    sums = official.sum(-1)
    assert sums.min() < 0.95 and sums.max() > 1.05  # the quirk: rows do not sum to 1
    # an image of its own size (native packing): nothing outside its 3 x 5 grid, still normalised
    small = smoothed_targets(torch.tensor([[2, 4]]), torch.tensor([[3, 5]]), side, 1.0)[0].reshape(side, side)
    assert float(small[3:].sum() + small[:, 5:].sum()) == 0.0
    assert abs(float(small.sum()) - 1.0) < 1e-6 and int(small.argmax()) == 2 * side + 4


def test_sigma_decays_linearly_over_the_schedule() -> None:
    model = _model(sigma=1.0, sigma_decay=True)
    assert float(model.sigma_now) == 1.0
    for k in range(10):
        model.on_step_end(k, 10)
        assert abs(float(model.sigma_now) - (1 - (k + 1) / 10)) < 1e-12


def test_loss_is_over_dropped_positions_only() -> None:
    """Label plumbing: a decoder that is exactly right on dropped-position tokens gives acc1 = 1 and the loss is
    the entropy of the one-hot targets (0); exactly right only on kept-position tokens gives acc1 = 0."""
    model = _model(attn_guide=False)
    tf, col = model.transform(), model.collate()
    frames = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(4)]
    batch = col([tf([f], np.random.default_rng([0, i, 1])) for i, f in enumerate(frames)])

    def oracle(on_dropped: bool):  # noqa: ANN202
        def forward(tokens, seg):  # noqa: ANN001, ANN202
            cls = batch["coords"][..., 0] * model.side + batch["coords"][..., 1]
            right = torch.nn.functional.one_hot(cls, model.side**2).float() * 60.0
            wrong = torch.nn.functional.one_hot((cls + 1) % model.side**2, model.side**2).float() * 60.0
            dropped = (~batch["keep_pos"]).unsqueeze(-1)
            return torch.where(dropped == on_dropped, right, wrong) + 0 * tokens.sum()
        return forward

    model.decoder.forward = oracle(True)  # type: ignore[method-assign]
    out = model(batch)
    assert float(out["acc1"]) == 1.0 and float(out["loss"].detach()) < 1e-6
    model.decoder.forward = oracle(False)  # type: ignore[method-assign]
    out = model(batch)
    assert float(out["acc1"]) == 0.0 and float(out["loss"].detach()) > 10.0


def test_bad_input_is_one_line() -> None:
    with pytest.raises(DensekitError, match="timm ViT"):
        DropPos(build_backbone("resnet18"))
    bb = build_backbone("timm:vit_tiny_patch16_224", kwargs=TINY)
    with pytest.raises(DensekitError, match="more than the packed sequence lengths") as err:
        DropPos(bb, size=16, seq_len=4, decoder_dim=64, decoder_heads=4)
    assert "\n" not in str(err.value)
    with pytest.raises(DensekitError, match="at least 2x2"):
        DropPos(bb, size=4, decoder_dim=64, decoder_heads=4)
    assert OBJECTIVES["droppos"] is DropPos


# --------------------------------------------------------------------------------------------------
# Through the trainer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample") / "s", sequences=2, frames=6, height=64, width=80, seed=0)


def _cfg(sample: Path, out: Path, *extra: str):  # noqa: ANN202
    from densekit.train.config import build_config

    return build_config(
        overrides=["max_steps=6", "batch_size=4", "data.size=[24,24]", "data.num_workers=0", "save_every=2",
                   "log_every=1", "progress=false", "tensorboard=false", "deterministic=true",
                   "optim.warmup_steps=2", "optim.lr=0.001", "backbone_kwargs.depth=2", "backbone_kwargs.patch_size=4",
                   "backbone_kwargs.img_size=16", "hparams.size=16", "hparams.decoder_dim=64",
                   "hparams.decoder_heads=4", "hparams.decoder_depth=1", "hparams.seq_len=20", *extra],
        objective="droppos", backbone="timm:vit_tiny_patch16_224", out=str(out), data_path=str(sample),
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(run / "state.safetensors")).items() if k.startswith("model.")}


class Kill(Exception):
    pass


def _kill_at(k: int):  # noqa: ANN202
    def hook(_trainer, step: int) -> None:  # noqa: ANN001
        if step == k:
            raise Kill(step)

    return hook


@pytest.mark.parametrize("extra", [[], ["hparams.native=true", "hparams.min_side=2"]], ids=["square", "native"])
def test_trainer_steps_have_finite_loss(sample: Path, tmp_path: Path, extra: list[str]) -> None:
    from densekit.train.trainer import Trainer

    res = Trainer(_cfg(sample, tmp_path / "run", "max_steps=3", *extra)).fit()
    assert res.step == 3 and np.isfinite(res.metrics["loss"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x and "loss" in x]
    assert len(steps) == 3 and all(np.isfinite(x["loss"]) and 0 <= x["acc1"] <= 1 for x in steps)
    # images, not packed sequences, are counted (4 images of 1 + 4 visible tokens: one sequence of 20)
    assert res.images_per_s > 0
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


def test_resume_after_kill_is_bit_identical(sample: Path, tmp_path: Path) -> None:
    from densekit.train.trainer import Trainer

    extra = ["data.num_workers=2"]  # the collate and the transform run in worker processes
    full = Trainer(_cfg(sample, tmp_path / "full", *extra)).fit()
    assert full.step == 6
    with pytest.raises(Kill):
        Trainer(_cfg(sample, tmp_path / "cut", *extra), hooks=[_kill_at(5)]).fit()
    Trainer(_cfg(sample, tmp_path / "cut", *extra), resume=True).fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert float(a["model.sigma_now"]) == 0.0  # the schedule ran to its end (and was restored on resume)
    init = Trainer(_cfg(sample, tmp_path / "init"))._build_objective().state_dict()
    moved = [k for k in init if not torch.equal(init[k], a[f"model.{k}"])]
    assert "mask_pos_token" in moved and any(k.startswith("decoder.") for k in moved)
    assert "backbone.body.model.pos_embed" not in moved  # the sin-cos positions stay fixed


# --------------------------------------------------------------------------------------------------
# 2 gloo processes == 1 process
# --------------------------------------------------------------------------------------------------

DDP_BATCH = 4


def _ddp_batches(world: int) -> list[dict[str, torch.Tensor]]:
    """The global batch of DDP_BATCH images cut into ``world`` ranks' parts, each packed by the objective's
    collate (as each rank's loader does)."""
    model = _model(sigma=1.0, attn_guide=True)
    tf, col = model.transform(), model.collate()
    frames = [np.random.default_rng([7, i, 0]).integers(0, 256, (16, 16, 3), dtype=np.uint8)
              for i in range(DDP_BATCH)]
    samples = [tf([f], np.random.default_rng([7, i, 1])) for i, f in enumerate(frames)]
    n = DDP_BATCH // world
    return [col(samples[r * n : (r + 1) * n]) for r in range(world)]


def _droppos_step(rank: int, world: int, local_norm: bool = False) -> dict[str, torch.Tensor]:
    """One forward/backward on this rank's part -> gradients and ``weight_sum``, this rank's sum of the
    attentive weights of its dropped-position tokens (the loss's normaliser before the all-reduce)."""
    from types import SimpleNamespace

    import densekit.train.objectives.droppos as droppos

    model = _model(sigma=1.0, attn_guide=True)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    batch = _ddp_batches(world)[rank]
    seen: list[torch.Tensor] = []
    real = droppos.dist

    def reduce_sum(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x if local_norm else real.all_reduce_sum(x)

    # local_norm: the official code's normaliser, this rank's weights only (and DDP then averages the ranks)
    droppos.dist = SimpleNamespace(all_reduce_sum=reduce_sum,
                                   world_size=(lambda: 1) if local_norm else real.world_size)
    try:
        net(batch)["loss"].backward()
    finally:
        droppos.dist = real
    out = {f"grad.{k}": p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return {**out, "weight_sum": seen[0].reshape(1)}


def _ddp_ranks(rank: int, world: int, out: str) -> None:
    import os

    from safetensors.torch import save_file

    for name, local in (("global", False), ("local", True)):
        res = _droppos_step(rank, world, local)
        save_file(res, os.path.join(out, f"{name}{rank}.safetensors"))


@pytest.mark.slow
def test_two_gloo_processes_give_the_gradients_of_one(tmp_path: Path) -> None:
    """DropPos has no gathers, but its loss is a weighted mean whose weight sum differs between images (attentive
    weights renormalised over each image's visible tokens, counted on its dropped-position ones): normalised by the
    all-reduced sum, 2 ranks give one process's gradients; normalised per rank (the official code), they do not."""
    from _gloo import run_ranks
    from safetensors.torch import load_file

    run_ranks(_ddp_ranks, str(tmp_path))
    one = _droppos_step(0, 1)
    two, naive = (load_file(str(tmp_path / f"{n}0.safetensors")) for n in ("global", "local"))
    # the two ranks' normalisers differ, so per-rank and global normalisation are different losses
    sums = [float(load_file(str(tmp_path / f"global{r}.safetensors"))["weight_sum"]) for r in range(2)]
    assert abs(sums[0] - sums[1]) > 0.05 * max(sums), sums
    assert abs(sum(sums) - float(one["weight_sum"])) < 1e-5
    grads = [k for k in one if k.startswith("grad.")]
    assert "grad.mask_pos_token" in grads and any(k.startswith("grad.decoder.") for k in grads)
    assert any(k.startswith("grad.backbone.") for k in grads)
    bad = [k for k in grads if not torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6)]
    assert not bad, bad[:3]
    # negative control: per-rank normalisation does not give one process's gradients
    assert any(not torch.allclose(one[k], naive[k], rtol=1e-4, atol=1e-6) for k in grads)
