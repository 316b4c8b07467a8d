"""The shared DINO-family parts: DINOHead, DINOLoss (centring, temperature schedule, fp32), Sinkhorn-Knopp,
make_teacher and the objective's train() that keeps teachers in eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import build_backbone
from densekit.train.heads import DINOHead, cancel_last_layer_grads
from densekit.train.losses import DINOLoss, dino_cross_entropy, fp32, sinkhorn_knopp, teacher_temperature
from densekit.train.objective import Objective, make_teacher


def _all_prefer_cluster_zero(n: int = 64, k: int = 8, seed: int = 0) -> torch.Tensor:
    """A (n, k) cost where every item's cheapest cluster is 0, min-max normalised to [0, 1] (CrIBo's M)."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    m = -(z @ c.t())
    m[:, 0] -= 2.0
    return (m - m.min()) / (m.max() - m.min())


def test_sinkhorn_balances_clusters_where_argmin_does_not():
    n, k = 64, 8
    cost = _all_prefer_cluster_zero(n, k)
    assert torch.bincount(cost.argmin(1), minlength=k)[0] == n  # the greedy assignment collapses
    p = sinkhorn_knopp(-cost, n_iters=5, eps=0.05)  # CrIBo: exp(-20 M), 5 iterations
    assert p.dtype == torch.float32 and p.shape == (n, k)
    torch.testing.assert_close(p.sum(0), torch.full((k,), 1.0 / k), rtol=0, atol=1e-6)
    sizes = torch.bincount(p.argmax(1), minlength=k)
    assert int(sizes.min()) >= n // (2 * k), sizes.tolist()
    # a batch of problems is solved independently, and a given marginal is met
    marg = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    pb = sinkhorn_knopp(torch.stack([-cost, -cost.flip(0)]), n_iters=5, eps=0.05, cluster_marginal=marg)
    torch.testing.assert_close(pb[0], sinkhorn_knopp(-cost, 5, 0.05, marg), rtol=0, atol=0)
    torch.testing.assert_close(pb.sum(-2), marg.expand(2, k), rtol=0, atol=1e-6)


def test_sinkhorn_is_fp32_under_autocast():
    scores = (-_all_prefer_cluster_zero()).bfloat16()  # as a matmul under autocast hands them over
    ref = sinkhorn_knopp(scores.float(), 5, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_knopp(scores, 5, 0.05)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dino_centre_moves_toward_the_teacher_mean_and_the_temperature_warms_up():
    torch.manual_seed(0)
    loss = DINOLoss(out_dim=32, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_steps=10, center_momentum=0.9)
    teacher = torch.randn(2, 8, 32) + 3.0
    student = torch.randn(3, 8, 32)
    mean = teacher.reshape(-1, 32).mean(0, keepdim=True)
    before = (loss.center - mean).norm()
    loss(student, teacher, step=0)
    torch.testing.assert_close(loss.center, 0.1 * mean, rtol=1e-6, atol=1e-6)  # from 0: (1 - m) * mean
    assert (loss.center - mean).norm() < before
    assert [loss.teacher_temp_at(s) for s in (0, 5, 10, 50)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert teacher_temperature(3, 0, 0.04, 0.07) == 0.07
    # valid rows only: the centre update ignores masked rows
    loss2 = DINOLoss(out_dim=32, center_momentum=0.5)
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[0, :3] = True
    loss2.update_center(teacher, valid)
    torch.testing.assert_close(loss2.center, 0.5 * teacher[0, :3].mean(0, keepdim=True))


def test_dino_loss_pairs_different_views_and_its_minimum_is_the_teacher_entropy():
    torch.manual_seed(1)
    loss = DINOLoss(out_dim=16, teacher_temp=0.1, student_temp=0.1)
    t = torch.randn(2, 4, 16)
    # student view 0 = teacher view 1 and vice versa; the loss must pair them (cross views), not same views
    s_swapped = torch.stack([t[1], t[0]])
    s_same = t.clone()
    lo = loss(s_swapped, t, step=0, update_center=False)
    q = F.softmax(t / 0.1, dim=-1)
    entropy = -(q * q.log()).sum(-1).mean()
    torch.testing.assert_close(lo, entropy, rtol=1e-5, atol=1e-6)
    assert loss(s_same, t, step=0, update_center=False) > lo + 1e-3
    # gradient reaches the student only
    s = torch.randn(3, 4, 16, requires_grad=True)
    tt = torch.randn(2, 4, 16, requires_grad=True)
    loss(s, tt, step=0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and tt.grad is None


def test_dino_loss_is_fp32_and_finite_under_bf16_autocast():
    torch.manual_seed(2)
    k = 65536
    s = (torch.randn(2, 4, k) * 5).bfloat16()  # what a head under autocast hands over
    t = (torch.randn(2, 4, k) * 5).bfloat16()
    ref = DINOLoss(out_dim=k)(s.float(), t.float(), step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DINOLoss(out_dim=k)(s, t, step=0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), fp32():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert dino_cross_entropy(s[0], F.softmax(t[0].float(), -1), 0.1).dtype == torch.float32


def test_dino_head_shapes_normalised_last_layer_and_freezing():
    torch.manual_seed(3)
    head = DINOHead(24, out_dim=100, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(5, 24)
    assert head(x).shape == (5, 100) and head(torch.randn(2, 3, 24)).shape == (2, 3, 100)
    torch.testing.assert_close(head.embed(x).norm(dim=-1), torch.ones(5))
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))  # unit prototypes (norm_last_layer)
    names = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "last_layer.parametrizations.weight.original0" not in names  # g frozen at 1
    assert any(isinstance(m, nn.GELU) for m in head.mlp.modules())
    assert DINOHead(24, 10, 32, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    # freeze_last_layer: while step < freeze_steps the last layer gets no gradient and AdamW leaves it alone
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    v0 = head.last_layer.parametrizations.weight.original1.detach().clone()
    m0 = head.mlp.layers[0].weight.detach().clone()
    head(x).pow(2).sum().backward()
    assert cancel_last_layer_grads(head, step=0, freeze_steps=1)
    opt.step()
    torch.testing.assert_close(head.last_layer.parametrizations.weight.original1, v0, rtol=0, atol=0)
    assert not torch.equal(head.mlp.layers[0].weight, m0)
    assert not cancel_last_layer_grads(head, step=1, freeze_steps=1)


class _WithTeacher(Objective):
    name = "with_teacher"

    def __init__(self, backbone):
        super().__init__(backbone)
        self.head = nn.Sequential(nn.Linear(192, 8), nn.Dropout(0.5))
        self.teacher_backbone = make_teacher(backbone)
        self.teacher_head = make_teacher(self.head)


def test_make_teacher_freezes_drops_no_paths_and_stays_in_eval_under_train():
    student = build_backbone("timm:vit_tiny_patch16_224", kwargs={"depth": 2, "img_size": 32,
                                                                 "drop_path_rate": 0.5})
    obj = _WithTeacher(student).train()
    teacher = obj.teacher_backbone
    assert obj.teacher_modules() == [teacher, obj.teacher_head]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in obj.backbone.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert obj.backbone.training and obj.head.training and not obj.teacher_head.training
    from timm.layers import DropPath

    assert any(isinstance(m, DropPath) for m in obj.backbone.modules())
    assert not any(isinstance(m, DropPath) for m in teacher.modules())
    assert list(teacher.state_dict()) == list(student.state_dict())
    x = torch.randn(2, 3, 32, 32)
    teacher.train()  # even put in train mode directly, no path is dropped: outputs are deterministic
    torch.testing.assert_close(teacher(x), teacher(x), rtol=0, atol=0)
    obj.train()
    s1, s2 = obj.backbone(x), obj.backbone(x)
    assert not torch.equal(s1, s2)  # the student keeps its stochastic depth
    obj.eval()
    assert not obj.backbone.training


# -- the parts together in the trainer: a minimal DINO on a ViT, killed and resumed ---------------------------


class MiniDINO(Objective):
    """DINO with every shared part: ViT tokens (CLS), DINOHead, DINOLoss with temperature warm-up, a teacher from
    make_teacher (EMA), freeze_last_layer in before_optimizer_step, a MaskedQueue of teacher CLS embeddings (pushed
    in on_step_end, unused by the loss: it checks that the bank resumes exactly) and the teacher exported."""

    name = "minidino"
    data = "pairs"

    def __init__(self, backbone, out_dim: int = 32, momentum: float = 0.9, freeze_steps: int = 2) -> None:
        super().__init__(backbone, out_dim=out_dim, momentum=momentum, freeze_steps=freeze_steps)
        from densekit.train.dist import MaskedQueue
        from densekit.train.vit import ViTAdapter

        dim = ViTAdapter(backbone).dim
        self.head = DINOHead(dim, out_dim=out_dim, hidden_dim=32, bottleneck_dim=16)
        self.teacher_backbone, self.teacher_head = make_teacher(backbone), make_teacher(self.head)
        self.loss = DINOLoss(out_dim, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_steps=3)
        self.bank = MaskedQueue(5, (dim,), mask_shape=())
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.momentum, self.freeze_steps = momentum, freeze_steps
        self._keys = None

    def transform(self):
        from test_trainer import TinyTransform

        return TinyTransform(self.backbone.meta.mean, self.backbone.meta.std)

    def _cls(self, backbone, x):
        from densekit.train.vit import ViTAdapter

        return ViTAdapter(backbone).tokens(x)[0][:, 0]

    def forward(self, batch):
        x = torch.stack([batch["view1"], batch["view2"]])  # (2, B, 3, H, W)
        s = torch.stack([self.head(self._cls(self.backbone, v)) for v in x])
        with torch.no_grad():
            cls_t = [self._cls(self.teacher_backbone, v) for v in x]
            t = torch.stack([self.teacher_head(c) for c in cls_t])
        self._keys = cls_t[0]
        loss = self.loss(s, t, step=int(self.steps_done))
        return {"loss": loss, "center_norm": self.loss.center.norm()}

    def before_optimizer_step(self, step, max_steps):
        cancel_last_layer_grads(self, step, self.freeze_steps)

    @torch.no_grad()
    def on_step_end(self, step, max_steps):
        for ps, pt in zip((*self.backbone.parameters(), *self.head.parameters()),
                          (*self.teacher_backbone.parameters(), *self.teacher_head.parameters())):
            pt.mul_(self.momentum).add_(ps.detach(), alpha=1 - self.momentum)
        self.bank.push(self._keys, torch.ones(self._keys.shape[0], dtype=torch.bool))
        self.steps_done.add_(1)

    def export_backbone(self):
        return self.teacher_backbone


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from densekit.serve.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample") / "s", sequences=2, frames=6, height=64, width=64, seed=0)


def _dino_cfg(sample, out, *extra):
    from densekit.train.config import build_config

    return build_config(
        overrides=["max_steps=4", "batch_size=2", "data.size=[32,32]", "data.gap_max=2", "data.num_workers=0",
                   "save_every=2", "log_every=1", "progress=false", "tensorboard=false", "deterministic=true",
                   "optim.lr=0.01", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
                   "optim.grad_clip_mode=per_param", "backbone_kwargs.depth=1", "backbone_kwargs.patch_size=8",
                   "backbone_kwargs.img_size=32", "backbone_kwargs.drop_path_rate=0.1", *extra],
        objective="minidino", backbone="timm:vit_tiny_patch16_224", out=str(out), data_path=str(sample))


def test_minimal_dino_trains_resumes_bit_identically_and_exports_its_teacher(sample, tmp_path):
    from safetensors.torch import load_file

    from densekit.serve.checkpoint import load_checkpoint
    from densekit.train.trainer import Trainer

    class Kill(Exception):
        pass

    def kill_at_3(_trainer, step):
        if step == 3:
            raise Kill

    Trainer(_dino_cfg(sample, tmp_path / "full"), objective_cls=MiniDINO).fit()
    with pytest.raises(Kill):
        Trainer(_dino_cfg(sample, tmp_path / "cut"), objective_cls=MiniDINO, hooks=[kill_at_3]).fit()
    Trainer(_dino_cfg(sample, tmp_path / "cut"), objective_cls=MiniDINO, resume=True).fit()
    a = load_file(str(tmp_path / "full" / "state.safetensors"))
    b = load_file(str(tmp_path / "cut" / "state.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert int(a["model.bank.pushed"]) == 4 * 2 and bool(a["model.bank.valid"].all())
    assert float(a["model.loss.center"].abs().sum()) > 0
    # the teacher is what was exported, with the architecture of the timm kwargs
    bb = load_checkpoint(tmp_path / "full" / "backbone.safetensors")
    assert bb.meta.arch["kwargs"]["depth"] == 1 and bb.meta.objective == "minidino"
    for k, v in bb.state_dict().items():
        assert torch.equal(v, a[f"model.teacher_backbone.{k}"]), k
