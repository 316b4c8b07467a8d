"""CrIBo: cross-image object-level bootstrapping (Lebailly, Stegmüller, Bozorgtabar, Thiran, Tuytelaars,
"CrIBo: Self-Supervised Learning via Cross-Image Object-Level Bootstrapping", ICLR 2024; official code
github.com/tileb1/CrIBo, ``main_cribo.py``; reimplemented here, nothing copied).

Two global views of one image go through a student ViT and its EMA teacher. Per step:

1. **Joint-space clustering** on the teacher: the L2-normalised patch tokens of both views, (B, 2N, D), are
   clustered into K groups per image by Sinkhorn-Knopp on the cost ``-cos(token, centroid) + pos_alpha * spatial``
   (spatial: the pixel distance, in the original image, from a token to the nearest other member of the cluster;
   :func:`spatial_cost`), ``n_iter`` outer rounds with hard assignments and, with ``update_c``, the column
   marginal set to the current cluster sizes (so only the first round is uniformly balanced).
2. **Object representations**: a cluster's mean last-layer token in each view (:func:`object_representations`);
   a cluster absent from either view is dropped (no loss, no gradient, not queued). The student's objects reuse
   the teacher's assignments on the student's tokens.
3. **Cross-view object loss** L_cv^o: DINO cross-entropy between teacher object k of view i and student object k
   of view j != i, through the object head (its own last layer and centre).
4. **Cross-image object loss** L_ci^o: each teacher object of view 1 retrieves its nearest neighbour in memory
   bank 1 (past teacher objects, pre-head, cosine); the neighbour's view-2 partner in bank 2 must retrieve, among
   all objects of view 2 in the (global) batch, the query's own view-2 object (cycle consistency,
   :func:`cycle_consistent_nn`). Kept pairs bootstrap: teacher head on the neighbour vs the student's object of
   the other view; and the mirror (view 2 -> bank 2 -> bank 1 -> view 1).
5. **Global loss** L_cv^g: DINO on the CLS tokens across views. ``loss = L_cv^g + L_cv^o + L_ci^o``.

Differences from the official code, on purpose (each keeps 1 process == N processes and exact resume):

* The cost matrix is min-max normalised **per image** (official: over the whole local batch tensor, which makes
  the clustering depend on the other images on the same GPU).
* The K initial centroid indices are drawn in the transform from the sample's generator (official: torch
  ``multinomial`` in the forward pass).
* A token's hard assignment is its single arg-max cluster (official: every cluster equal to the row maximum, so
  exact ties give a token to several clusters).
* The memory bank is fixed-shape (:class:`densekit.train.dist.MaskedQueue` of Q images x (2 views, K slots, D))
  with a validity mask, in the training state (exact resume), starts empty (official: uniform random entries that
  count as valid) and is a ring buffer (official: newest first; the same set of entries). The official
  bookkeeping-only CLS queue is not kept. The cross-image loss starts at ``nn_start_step`` (official: epoch 1)
  once the bank is full. The backward search of the cycle runs over the objects of the global batch (official:
  the local batch). A bank not smaller than the data is refused (:meth:`CrIBo.check_dataset`).
* Loss means over a variable number of objects use global counts (all-reduced), so DDP gives the gradients of
  one process; the cross-image terms keep the official normalisation: both are divided by the number of kept
  view-1 queries, summed and halved (the paper divides the mirror term by its own count). L_cv^o keeps the
  official extra /2 (the project page's formula has none).
* Schedules are functions of the step (official: of the epoch; the defaults convert epochs at 1251 steps each).
* Views are resampled bilinearly (official: bicubic), so patch positions are exact cell centres.
* The CPU configuration (``train/configs/cribo_vit_tiny.yaml``) shrinks widths, K and the bank only.

Kept from the official code: the spatial term ignores zero distances (a token is not "near" its own cluster
through itself) and gives empty pairs the image's mean cost; Sinkhorn exp(-20 M) with 5 row/column rounds
(:func:`densekit.train.losses.sinkhorn_knopp`, fp32); objects are pre-head teacher means, matched by cosine, only
the retrieved entries go through the teacher head; student objects reuse the teacher's assignments; one MLP and
two last layers, both frozen for ``freeze_last_layer_steps``; the teacher has no stochastic depth
(:func:`~densekit.train.objective.make_teacher`) and is what gets exported and evaluated.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import VICREG_VIEW1, VICREG_VIEW2, RandomView, cell_locations, normalize
from densekit.train.dist import MaskedQueue, all_reduce_sum, concat_all_gather, global_mean, rank, world_size
from densekit.train.heads import DINOHead, cancel_last_layer_grads, weight_normed_linear
from densekit.train.losses import DINOLoss, dino_cross_entropy, fp32, sinkhorn_knopp
from densekit.train.objective import Objective, Transform, make_teacher
from densekit.train.vit import ViTAdapter


# ----------------------------------------------------------------------------------------------------------------
# Joint-space clustering


def spatial_cost(positions: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """CrIBo's spatial term: for token t and cluster k, the distance from t to the nearest member m != t of k.

    Args:
        positions: (B, T, 2) token positions (pixels of the original image).
        assign: (B, T, K) hard assignments (0/1).
    Returns:
        (B, T, K) in [0, 1]: divided by the image's maximum; a (token, cluster) pair without such a member (empty
        cluster, or the token alone at its position) gets the image's mean cost, as the official code does.
    """
    dist = torch.cdist(positions.float(), positions.float())  # (B, T, T)
    # Zero distances are the token itself (or a token at the same place): they do not count as "near".
    dist = torch.where(dist > 0, dist, torch.full_like(dist, float("inf")))
    # one cluster at a time: (B, T, T) each instead of a (B, T, T, K) tensor (2.5 GB at the paper's sizes)
    inf = torch.full_like(dist, float("inf"))
    near = torch.stack([torch.where(assign[:, None, :, k] > 0, dist, inf).amin(dim=2)
                        for k in range(assign.shape[2])], dim=2)  # (B, T, K)
    has = torch.isfinite(near)
    near = torch.where(has, near, torch.zeros_like(near))
    mean = near.mean(dim=(1, 2), keepdim=True)
    near = torch.where(has, near, mean.expand_as(near))
    return near / near.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def joint_clustering(tokens: torch.Tensor, positions: torch.Tensor, init_idx: torch.Tensor, *,
                     pos_alpha: float = 1.0, lam: float = 20.0, sinkhorn_iters: int = 5, n_iter: int = 5,
                     update_c: bool = True) -> torch.Tensor:
    """Cluster the tokens of both views of each image jointly (CrIBo's ``compute_assignments``).

    Args:
        tokens: (B, T, D) tokens of both views (T = 2N; normalised here).
        positions: (B, T, 2) their positions in the original image.
        init_idx: (B, K) int64, distinct token indices of the initial centroids (drawn in the transform).
    Returns:
        (B, T, K) float hard assignments (one 1 per token).
    """
    with fp32():
        z = F.normalize(tokens.float(), dim=-1)
        b, t, _ = z.shape
        k = init_idx.shape[1]
        assign = F.one_hot(init_idx, t).transpose(1, 2).float()  # (B, T, K): the seeds are the only members
        centroids = z.gather(1, init_idx[..., None].expand(-1, -1, z.shape[2]))  # (B, K, D)
        col = torch.full((b, k), 1.0 / k, device=z.device)
        for _ in range(n_iter):
            cost = -torch.einsum("btd,bkd->btk", z, centroids) + pos_alpha * spatial_cost(positions, assign)
            lo = cost.amin(dim=(1, 2), keepdim=True)
            hi = cost.amax(dim=(1, 2), keepdim=True)
            cost = (cost - lo) / (hi - lo).clamp_min(1e-12)  # per image: see the module docstring
            # exp(-lam * M), rows 1/T, columns col: CrIBo's sinkhorn (densekit's shared one, eps = 1 / lam)
            plan = sinkhorn_knopp(-cost, sinkhorn_iters, eps=1.0 / lam, cluster_marginal=col)
            assign = F.one_hot(plan.argmax(dim=2), k).float()
            if update_c:
                col = assign.sum(dim=1) + 1e-2
                col = col / col.sum(dim=1, keepdim=True)
            centroids = F.normalize(torch.einsum("btd,btk->bkd", z, assign), dim=-1)
        return assign


def object_representations(tokens: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token of each cluster in one view.

    Args:
        tokens: (B, N, D) one view's last-layer tokens.
        assign: (B, N, K) that view's hard assignments.
    Returns:
        (objects (B, K, D), present (B, K) bool); an absent cluster's row is 0.
    """
    count = assign.sum(dim=1)  # (B, K)
    objects = torch.einsum("bnd,bnk->bkd", tokens, assign.to(tokens.dtype)) / count.clamp_min(1.0)[..., None]
    return objects, count > 0


# ----------------------------------------------------------------------------------------------------------------
# Cross-image nearest neighbours


@torch.no_grad()
def cycle_consistent_nn(queries: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor, bank_valid: torch.Tensor,
                        partners: torch.Tensor, partners_valid: torch.Tensor, own: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbours in a memory bank that survive CrIBo's cycle check (cosine similarity throughout).

    Query q (an object of view a) -> its nearest valid entry j of ``bank_a`` -> ``bank_b[j]`` (the same past
    object seen in view b) -> its nearest valid object among ``partners`` (view-b objects of every image of the
    batch); q is kept iff that is ``partners[own[q]]``, q's own view-b object.

    Args:
        queries: (M, D); bank_a, bank_b: (Q, D); bank_valid: (Q,) bool.
        partners: (P, D); partners_valid: (P,) bool; own: (M,) int64 index of each query's own partner.
    Returns:
        (nn (M,) int64 index into the bank, keep (M,) bool); keep is all False when the bank is empty.
    """
    q = F.normalize(queries.float(), dim=-1)
    a, b = F.normalize(bank_a.float(), dim=-1), F.normalize(bank_b.float(), dim=-1)
    p = F.normalize(partners.float(), dim=-1)
    neg = torch.tensor(float("-inf"), device=q.device)
    nn_idx = torch.where(bank_valid[None, :], q @ a.T, neg).argmax(dim=1)  # (M,)
    back = torch.where(partners_valid[None, :], b[nn_idx] @ p.T, neg).argmax(dim=1)  # (M,)
    keep = (back == own) & bank_valid.any()
    return nn_idx, keep


# ----------------------------------------------------------------------------------------------------------------
# CPU augmentation


class CrIBoTransform:
    """CrIBo's two global views (``DataAugmentationCrIBo``), their crop boxes and the clustering's seeds. Picklable.

    ``__call__([image (H, W, 3) uint8], rng)`` -> ``view1``, ``view2``: (3, S, S) float32 normalised; ``box1``,
    ``box2``: (4,) float32 crop boxes (positions of the patches in the original image come from them);
    ``init_idx``: (K,) int64, K distinct indices into the 2N tokens of both views (the initial centroids).

    RandomResizedCrop(S, scale (0.25, 1)) + flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2;
    view 1 blur p 1.0, view 2 blur p 0.1 and solarisation p 0.2 (VICReg's recipe, which CrIBo uses unchanged).
    Bilinear resampling (official: bicubic), so the cell positions are exact.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int, patch: int, n_tokens: int,
                 scale: tuple[float, float] = (0.25, 1.0)) -> None:
        self.mean, self.std, self.size, self.n_tokens = tuple(mean), tuple(std), int(size), int(n_tokens)
        self.tokens = 2 * (self.size // int(patch)) ** 2
        scale = (float(scale[0]), float(scale[1]))
        self.views = (RandomView(VICREG_VIEW1, scale=scale), RandomView(VICREG_VIEW2, scale=scale))

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, view in enumerate(self.views, start=1):
            pixels, box = view(frames[0], (self.size, self.size), rng)
            out[f"view{k}"] = normalize(pixels, self.mean, self.std)
            out[f"box{k}"] = np.asarray(box, np.float32)
        out["init_idx"] = rng.choice(self.tokens, size=self.n_tokens, replace=False).astype(np.int64)
        return out


# ----------------------------------------------------------------------------------------------------------------
# heads


class CrIBoHead(DINOHead):
    """CrIBo's head: DINO's MLP shared by the CLS token and the objects, then two last layers.

    ``forward(x)``: (M, in_dim) -> (M, out_dim) (CLS, ``last_layer``); ``forward_c(x)``: (M, in_dim) -> (M, out_dim_c)
    (objects, ``last_layer_c``). :func:`densekit.train.heads.cancel_last_layer_grads` freezes both (by name).
    """

    def __init__(self, in_dim: int, out_dim: int, out_dim_c: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = False) -> None:
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.last_layer_c = weight_normed_linear(bottleneck_dim, out_dim_c, norm=norm_last_layer)

    def forward_c(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer_c(self.embed(x))


# ----------------------------------------------------------------------------------------------------------------
# the objective


class CrIBo(Objective):
    """CrIBo (ICLR 2024) on a timm ViT backbone; the teacher is exported (CrIBo evaluates the teacher).

    Batch (from :meth:`transform`): ``view1``, ``view2`` (B, 3, S, S); ``box1``, ``box2`` (B, 4); ``init_idx``
    (B, K). Logged: ``loss``, ``d_loss`` (L_cv^g), ``s_loss`` (L_cv^o), ``nn_loss`` (L_ci^o), ``region_count``
    (objects present in both views per image), ``bootstrap_ratio`` (cycle-consistent share of the view-1 objects),
    ``teacher_temp``.

    Hyper-parameters (defaults: ViT-S/16 ImageNet-1k, ``checkpoints/vits16-in_args.json`` and ``CrIBoLoss``; the
    epoch-counted ones in steps of batch 1024 on ImageNet-1k, 1251 steps per epoch):
        n_tokens K 32, pos_alpha 1.0, sinkhorn_lambda 20, sinkhorn_iterations 5, n_iter 5, update_c True;
        queue_size 25000 images (the bank holds queue_size x 2 x K x D floats: 2.4 GB for ViT-S);
        out_dim = out_dim_c 65536, hidden_dim 2048, bottleneck_dim 256, norm_last_layer False;
        teacher temperature 0.04 -> 0.07 linear over ``warmup_teacher_temp_steps`` (30 epochs), student 0.1;
        centre momentum 0.9 (both centres); teacher EMA 0.996 -> 1 (cosine); ``freeze_last_layer_steps`` (1 epoch);
        ``nn_start_step`` (the cross-image loss from epoch 1); crop_size 224, crop_scale (0.25, 1.0).
    """

    name: ClassVar[str] = "cribo"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, *, n_tokens: int = 32, pos_alpha: float = 1.0,
                 sinkhorn_lambda: float = 20.0, sinkhorn_iterations: int = 5, n_iter: int = 5, update_c: bool = True,
                 queue_size: int = 25000, out_dim: int = 65536, out_dim_c: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = False, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.07, warmup_teacher_temp_steps: int = 30 * 1251, student_temp: float = 0.1,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, freeze_last_layer_steps: int = 1251,
                 nn_start_step: int = 1251, crop_size: int = 224,
                 crop_scale: tuple[float, float] = (0.25, 1.0)) -> None:
        super().__init__(backbone, n_tokens=n_tokens, pos_alpha=pos_alpha, sinkhorn_lambda=sinkhorn_lambda,
                         sinkhorn_iterations=sinkhorn_iterations, n_iter=n_iter, update_c=update_c,
                         queue_size=queue_size, out_dim=out_dim, out_dim_c=out_dim_c, hidden_dim=hidden_dim,
                         bottleneck_dim=bottleneck_dim, norm_last_layer=norm_last_layer,
                         warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                         warmup_teacher_temp_steps=warmup_teacher_temp_steps, student_temp=student_temp,
                         center_momentum=center_momentum, base_momentum=base_momentum,
                         freeze_last_layer_steps=freeze_last_layer_steps, nn_start_step=nn_start_step,
                         crop_size=crop_size, crop_scale=tuple(crop_scale))
        try:
            vit = ViTAdapter(backbone)
        except DensekitError as exc:
            raise DensekitError(f"cribo: {exc}") from None
        if not vit.has_class_token:
            raise DensekitError("cribo needs a ViT with a class token (its global loss is on CLS)")
        p = vit.patch_size
        if crop_size % p:
            raise DensekitError(f"cribo crop_size {crop_size} must be a multiple of the patch size {p}")
        side = crop_size // p
        if side * side < n_tokens or n_tokens < 1:
            raise DensekitError(f"cribo: a {side}x{side} patch grid ({side * side} tokens per view) is too small for "
                                f"n_tokens={n_tokens} clusters; lower hparams.n_tokens or raise hparams.crop_size")
        if queue_size < 1:
            raise DensekitError(f"cribo needs queue_size >= 1 image, got {queue_size}")
        self.n_tokens, self.crop_size, self.crop_scale = int(n_tokens), int(crop_size), tuple(crop_scale)
        self.cluster_kw = {"pos_alpha": float(pos_alpha), "lam": float(sinkhorn_lambda),
                           "sinkhorn_iters": int(sinkhorn_iterations), "n_iter": int(n_iter),
                           "update_c": bool(update_c)}
        self.student_temp, self.base_momentum = float(student_temp), float(base_momentum)
        self.freeze_last_layer_steps, self.nn_start_step = int(freeze_last_layer_steps), int(nn_start_step)

        self.head = CrIBoHead(vit.dim, out_dim, out_dim_c, hidden_dim, bottleneck_dim, norm_last_layer)
        self.teacher_backbone = make_teacher(backbone)
        self.teacher_head = make_teacher(self.head)
        temps = {"teacher_temp": teacher_temp, "warmup_teacher_temp": warmup_teacher_temp,
                 "warmup_steps": warmup_teacher_temp_steps, "student_temp": student_temp,
                 "center_momentum": center_momentum}
        self.cls_loss = DINOLoss(out_dim, **temps)  # L_cv^g and the CLS centre
        self.object_loss = DINOLoss(out_dim_c, **temps)  # its centre_c and temperature; the terms are masked here
        # past teacher objects (pre-head) of both views, one row of K slots per image
        self.bank = MaskedQueue(queue_size, (2, n_tokens, vit.dim), (n_tokens,))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- data ----------------------------------------------------------------------------------------------------
    def transform(self) -> Transform:
        """Two global views, their boxes and the K seed indices (:class:`CrIBoTransform`)."""
        meta = self.backbone.meta
        return CrIBoTransform(meta.mean, meta.std, self.crop_size, ViTAdapter(self.backbone).patch_size,
                              self.n_tokens, self.crop_scale)

    def check_dataset(self, num_samples: int) -> None:
        """The bank must hold fewer images than the data: otherwise it holds past crops of the very image being
        trained on, its nearest neighbours are those, and the cycle check passes trivially."""
        q = self.bank.size
        if q >= num_samples:
            raise DensekitError(f"cribo's memory bank (hparams.queue_size={q} images) is not smaller than the "
                                f"{num_samples} training images; lower hparams.queue_size (well below the data size)")

    def nn_active(self) -> bool:
        """The cross-image loss is on from ``nn_start_step`` once the bank is full (official: from epoch 1)."""
        return int(self.steps_done) >= self.nn_start_step and self.bank.full

    # -- model ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _tokens(backbone: DenseBackbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix, patches, _ = ViTAdapter(backbone).tokens(x)
        return prefix[:, 0], patches  # CLS (2B, D), last-layer normed patch tokens (2B, N, D)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """batch (see the class docstring) -> loss dict."""
        v1, v2 = batch["view1"], batch["view2"]
        b = v1.shape[0]
        x = torch.cat([v1, v2])
        with torch.no_grad():
            t_cls, t_tok = self._tokens(self.teacher_backbone, x)
            hw = ViTAdapter(self.backbone).grid_size(v1)
            pos = torch.cat([cell_locations(batch[k].float(), tuple(v1.shape[-2:]), hw) for k in ("box1", "box2")],
                            dim=1)  # (B, 2N, 2) in the pixels of the original image
            assign = joint_clustering(torch.cat([t_tok[:b], t_tok[b:]], dim=1), pos, batch["init_idx"].long(),
                                      **self.cluster_kw)
            n = t_tok.shape[1]
            a1, a2 = assign[:, :n], assign[:, n:]
            tc1, p1 = object_representations(t_tok[:b].float(), a1)
            tc2, p2 = object_representations(t_tok[b:].float(), a2)
            valid = p1 & p2  # (B, K): objects present in both views; the others are dropped
            keep1, keep2, nn1, nn2 = self._cross_image(tc1, tc2, valid)
        s_cls, s_tok = self._tokens(self.backbone, x)
        sc1, _ = object_representations(s_tok[:b], a1.to(s_tok.dtype))
        sc2, _ = object_representations(s_tok[b:], a2.to(s_tok.dtype))
        losses = self.losses(t_cls, s_cls, (tc1, tc2), (sc1, sc2), valid, (keep1, keep2), (nn1, nn2))
        if self.training:
            self._pending.append((torch.stack([tc1, tc2], dim=1), valid))
        ratio = keep1.sum() / valid.sum().clamp_min(1)
        return {**losses, "region_count": valid.sum(dim=1).float().mean(), "bootstrap_ratio": ratio.float(),
                "teacher_temp": torch.tensor(self.object_loss.teacher_temp_at(int(self.steps_done)))}

    def _cross_image(self, tc1: torch.Tensor, tc2: torch.Tensor, valid: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cycle-consistent bank neighbours of this rank's objects, checked against the global batch's objects.

        Returns (keep1, keep2 (B*K,) bool, nn1, nn2 (B*K,) int64 flat indices into a view's bank).
        """
        b, k, _ = tc1.shape
        g1, g2 = concat_all_gather(tc1), concat_all_gather(tc2)
        gv = concat_all_gather(valid.to(torch.uint8)).bool()  # gloo has no bool all_gather
        own = rank() * b * k + torch.arange(b * k, device=tc1.device)
        bank1, bank2 = self.bank.items[:, 0].flatten(0, 1), self.bank.items[:, 1].flatten(0, 1)
        bv = self.bank.valid.flatten()
        nn1, keep1 = cycle_consistent_nn(tc1.flatten(0, 1), bank1, bank2, bv, g2.flatten(0, 1), gv.flatten(), own)
        nn2, keep2 = cycle_consistent_nn(tc2.flatten(0, 1), bank2, bank1, bv, g1.flatten(0, 1), gv.flatten(), own)
        v = valid.flatten()
        return keep1 & v, keep2 & v, nn1, nn2

    def losses(self, t_cls: torch.Tensor, s_cls: torch.Tensor, tc: tuple[torch.Tensor, torch.Tensor],
               sc: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor, keep: tuple[torch.Tensor, torch.Tensor],
               nn_idx: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The three terms (and the centre updates).

        Args:
            t_cls, s_cls: (2B, D) teacher / student CLS tokens, view 1 first.
            tc, sc: per view (B, K, D) teacher / student objects; valid (B, K) present in both views.
            keep: per view (B*K,) cycle-consistent objects; nn_idx: per view (B*K,) their flat bank index.
        Means over a variable number of objects use global counts, so DDP equals one process.
        """
        step = int(self.steps_done)
        with torch.no_grad():
            t_logits = self.teacher_head(t_cls)
            t_obj = torch.cat([self.teacher_head.forward_c(c.flatten(0, 1)) for c in tc])  # (2BK, C): view 1 first
            pt_obj = self.object_loss.teacher_probs(t_obj, step).chunk(2)
        s_logits = self.head(s_cls)
        d_loss = self.cls_loss(s_logits.unflatten(0, (2, -1)), t_logits.unflatten(0, (2, -1)), step,
                               update_center=self.training)
        s_obj = [self.head.forward_c(c.flatten(0, 1)) for c in sc]
        v = valid.flatten()
        # mean over valid objects of each direction, then halved (the official extra /2)
        s_loss = (global_mean(dino_cross_entropy(s_obj[1], pt_obj[0], self.student_temp), v)
                  + global_mean(dino_cross_entropy(s_obj[0], pt_obj[1], self.student_temp), v)) / 2
        nn_loss = s_cls.new_zeros(())
        n_keep = all_reduce_sum(keep[0].sum().float())
        if self.nn_active() and float(n_keep) > 0:
            with torch.no_grad():
                pn = [self.object_loss.teacher_probs(self.teacher_head.forward_c(
                    self.bank.items[:, i].flatten(0, 1)[nn_idx[i]]), step) for i in (0, 1)]
            ce1 = dino_cross_entropy(s_obj[1], pn[0], self.student_temp) * keep[0]
            ce2 = dino_cross_entropy(s_obj[0], pn[1], self.student_temp) * keep[1]
            # the official normalisation: both directions over the kept view-1 count, then halved
            nn_loss = (ce1.sum() + ce2.sum()) * world_size() / (2 * n_keep)
        if self.training:
            self.object_loss.update_center(t_obj, torch.cat([v, v]))
        return {"loss": d_loss + s_loss + nn_loss, "d_loss": d_loss.detach(), "s_loss": s_loss.detach(),
                "nn_loss": nn_loss.detach()}

    # -- around the step -----------------------------------------------------------------------------------------
    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        """DINO's ``freeze_last_layer``: no update of both last layers for the first steps."""
        cancel_last_layer_grads(self.head, step, self.freeze_last_layer_steps)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Bank push (gathered), then the teacher EMA: 1 - (1 - m0) (cos(pi k / K) + 1) / 2."""
        for objects, valid in self._pending:
            self.bank.push(objects, valid)
        self._pending.clear()
        m = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * step / max(max_steps, 1)) + 1.0) / 2.0
        for student, teacher in ((self.backbone, self.teacher_backbone), (self.head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        self.steps_done.fill_(step + 1)

    def export_backbone(self) -> DenseBackbone:
        """CrIBo evaluates (and exports) the teacher (``dinovit2mmseg.py`` takes ``checkpoint['teacher']``)."""
        return self.teacher_backbone
