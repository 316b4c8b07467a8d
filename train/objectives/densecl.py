"""DenseCL: dense contrastive learning (Wang, Zhang, Shen, Kong, Li, "Dense Contrastive Learning for
Self-Supervised Visual Pre-Training", CVPR 2021; official code github.com/WXinlong/DenseCL, an OpenSelfSup fork).

Two augmented views of one image. The query encoder (student backbone + necks) sees view 1, a momentum encoder
(EMA copy, MoCo v2) sees view 2. Two InfoNCE losses:

* global: the pooled projection q against the key k of the same image (positive) and a queue of past keys;
* dense: every location i of the query's dense projection against the key's dense projection at
  ``argmax_j cos(f_q[i], f_k[j])`` (correspondence from *backbone* features), negatives from a second queue that
  holds the keys' *pooled* dense projections (``avgpooled_x2`` in DenseCL's neck, confirmed by the author in
  AdelaiDet issue #277), not per-location keys.

``loss = (1 - lambda) * global + lambda * dense``, lambda = 0.5, and lambda = 0 for the first 1000 iterations
(``DenseCLWarmupHook``, ``start_iters=1000``) while the queues fill with meaningful keys.

Differences from the official code, on purpose:

* The backbone is densekit's dense backbone (stride 8 for resnet18/50), not C5 at stride 32. Its map is pooled to
  ``grid_size`` x ``grid_size`` (default 7, the paper's S = 7 for 224 inputs) before the necks: the dense logits
  are (B * S^2, 1 + K) and with S = 28 and K = 65536 they would cost gigabytes per step. ``grid_size=0`` keeps
  the native resolution.
* MoCo's shuffle-BN across GPUs is not done (a single-process run cannot shuffle either); the momentum encoder
  runs in the same train/eval mode as the student.
* Keys are gathered across processes (:func:`densekit.train.dist.concat_all_gather`) and pushed in
  :meth:`DenseCL.on_step_end`, so the queue holds the global batch's keys in rank order, as one process would.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import MOCO_V2, Photometric, RandomView, normalize
from densekit.train.dist import concat_all_gather
from densekit.train.heads import mlp_head
from densekit.train.losses import DenseInfoNCELoss, GlobalInfoNCELoss, dense_correspondence
from densekit.train.objective import Objective, Transform


# ----------------------------------------------------------------------------------------------------------------
# CPU augmentation


class DenseCLTransform:
    """MoCo v2 two-view augmentation (DenseCL's pipeline), picklable.

    ``__call__([image (H, W, 3) uint8], rng)`` -> ``{"view1", "view2"}``: (3, S, S) float32 each, normalised with
    the backbone's mean/std. RandomResizedCrop(S, scale ``crop_scale``) resampled with OpenCV's resize (area when
    shrinking), horizontal flip p 0.5, :data:`densekit.train.augment.MOCO_V2` colour augmentation.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 crop_scale: tuple[float, float] = (0.2, 1.0), color: Photometric | None = None) -> None:
        self.size = int(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.view = RandomView(color or MOCO_V2, scale=tuple(crop_scale), resample="resize")

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = frames[0].astype(np.float32) / 255.0
        return {"view1": self._view(img, rng), "view2": self._view(img, rng)}

    def _view(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        view, _ = self.view(img, (self.size, self.size), rng)
        return normalize(view, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------------------
# heads


class DenseCLNeck(nn.Module):
    """DenseCL's neck (``DenseCLNeck``): a global MLP and a dense 1x1-conv MLP on the backbone map.

    ``forward(x)``: x (B, D, h, w) -> (global (B, out), dense (B, out, h, w), pooled dense (B, out)); not normalised.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp_head(in_dim, [hidden_dim, out_dim], norm=False)  # MoCo v2: Linear-ReLU-Linear
        self.mlp2 = mlp_head(in_dim, [hidden_dim, out_dim], norm=False, dense=True)  # the same per location

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.mlp(x.mean(dim=(2, 3)))
        d = self.mlp2(x)
        return g, d, d.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# the objective


class DenseCL(Objective):
    """DenseCL (CVPR 2021) on a densekit backbone.

    Batch (from :meth:`transform`): ``view1``, ``view2`` (B, 3, S, S) normalised.
    Logged: ``loss``, ``loss_global``, ``loss_dense``, ``lambda``, ``q_std`` (std over the batch of the L2-normalised
    global query, averaged over dimensions: ~1/sqrt(out_dim) when spread, 0 at collapse).

    Hyper-parameters (defaults from the paper / ``configs/selfsup/densecl/densecl_imagenet_200ep.py``):
        out_dim 128, hidden_dim 2048 (neck), queue_len 65536 (both queues), temperature 0.2,
        momentum 0.999 (constant, MoCo v2), loss_lambda 0.5, warmup_iters 1000 (lambda = 0 before),
        crop_size 224, crop_scale (0.2, 1.0) (MoCo v2 augmentation). grid_size 7: see the module docstring.
    """

    name: ClassVar[str] = "densecl"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, *, out_dim: int = 128, hidden_dim: int = 2048,
                 queue_len: int = 65536, temperature: float = 0.2, momentum: float = 0.999,
                 loss_lambda: float = 0.5, warmup_iters: int = 1000, grid_size: int = 7, crop_size: int = 224,
                 crop_scale: tuple[float, float] = (0.2, 1.0), queue_seed: int = 0) -> None:
        super().__init__(backbone, out_dim=out_dim, hidden_dim=hidden_dim, queue_len=queue_len,
                         temperature=temperature, momentum=momentum, loss_lambda=loss_lambda,
                         warmup_iters=warmup_iters, grid_size=grid_size, crop_size=crop_size,
                         crop_scale=tuple(crop_scale), queue_seed=queue_seed)
        if not any(p.requires_grad for p in backbone.parameters()):
            raise DensekitError(f"densecl needs a trainable backbone; {backbone.meta.name!r} has no parameters")
        if crop_size % backbone.meta.input_multiple:
            raise DensekitError(f"densecl crop_size {crop_size} must be a multiple of "
                                f"{backbone.meta.input_multiple} for {backbone.meta.name}")
        if queue_len < 1 or not 0.0 <= loss_lambda <= 1.0 or temperature <= 0:
            raise DensekitError("densecl needs queue_len >= 1, 0 <= loss_lambda <= 1 and temperature > 0")
        self.momentum = float(momentum)
        self.loss_lambda, self.warmup_iters = float(loss_lambda), int(warmup_iters)
        self.grid_size, self.crop_size, self.crop_scale = int(grid_size), int(crop_size), tuple(crop_scale)

        self.neck = DenseCLNeck(backbone.meta.dim, hidden_dim, out_dim)
        self.global_loss = GlobalInfoNCELoss(temperature)
        self.dense_loss = DenseInfoNCELoss(temperature)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_neck = copy.deepcopy(self.neck)
        for p in (*self.teacher_backbone.parameters(), *self.teacher_neck.parameters()):
            p.requires_grad_(False)

        gen = torch.Generator().manual_seed(int(queue_seed))
        self.register_buffer("queue", F.normalize(torch.randn(out_dim, queue_len, generator=gen), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(out_dim, queue_len, generator=gen), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros(1, dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- data ----------------------------------------------------------------------------------------------------
    def transform(self) -> Transform:
        """MoCo v2 two views (see :class:`DenseCLTransform`)."""
        meta = self.backbone.meta
        return DenseCLTransform(self.crop_size, meta.mean, meta.std, self.crop_scale)

    # -- model ---------------------------------------------------------------------------------------------------
    def _grid(self, feat: torch.Tensor) -> torch.Tensor:
        g = self.grid_size
        if g and tuple(feat.shape[-2:]) != (g, g):
            return F.adaptive_avg_pool2d(feat, g)
        return feat

    def current_lambda(self) -> float:
        """The dense loss weight now: 0 during warm-up (``steps_done < warmup_iters``), else ``loss_lambda``."""
        return 0.0 if int(self.steps_done.item()) < self.warmup_iters else self.loss_lambda

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """batch ``view1``, ``view2`` (B, 3, S, S) -> loss dict (see class docstring)."""
        q_b = self._grid(self.backbone(batch["view1"]))  # (B, D, h, w)
        q, q_dense, _ = self.neck(q_b)
        q = F.normalize(q, dim=1)  # (B, C)
        q_dense = F.normalize(q_dense.flatten(2), dim=1)  # (B, C, N)

        with torch.no_grad():
            k_b = self._grid(self.teacher_backbone(batch["view2"]))
            k, k_dense, k2 = self.teacher_neck(k_b)
            k, k2 = F.normalize(k, dim=1), F.normalize(k2, dim=1)
            k_dense = F.normalize(k_dense.flatten(2), dim=1)  # (B, C, N)
            match = dense_correspondence(q_b.detach().flatten(2), k_b.flatten(2))  # (B, N)

        queue, queue2 = self.queue.clone().detach(), self.queue2.clone().detach()
        loss_global = self.global_loss(q, k, queue)
        loss_dense = self.dense_loss(q_dense, k_dense, match, queue2)
        lam = self.current_lambda()
        loss = (1.0 - lam) * loss_global + lam * loss_dense

        if self.training:
            self._pending.append((k.detach(), k2.detach()))
        return {"loss": loss, "loss_global": loss_global.detach(), "loss_dense": loss_dense.detach(),
                "lambda": torch.tensor(lam), "q_std": q.detach().std(dim=0).mean()}

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor, k2: torch.Tensor) -> None:
        """Write keys (n, C) at the pointer, wrapping around the queue end."""
        n, size = k.shape[0], self.queue.shape[1]
        if n > size:  # only the newest keys fit
            k, k2, n = k[-size:], k2[-size:], size
        idx = (int(self.queue_ptr.item()) + torch.arange(n, device=k.device)) % size
        self.queue[:, idx] = k.T.to(self.queue.dtype)
        self.queue2[:, idx] = k2.T.to(self.queue2.dtype)
        self.queue_ptr[0] = (int(self.queue_ptr.item()) + n) % size

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Push this step's keys (gathered over processes), then the momentum update (MoCo: m = 0.999)."""
        for k, k2 in self._pending:
            self._enqueue(concat_all_gather(k), concat_all_gather(k2))
        self._pending.clear()
        m = self.momentum
        for student, teacher in ((self.backbone, self.teacher_backbone), (self.neck, self.teacher_neck)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        self.steps_done[0] = step + 1
