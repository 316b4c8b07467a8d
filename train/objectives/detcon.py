"""DetCon: contrastive detection over unsupervised masks (Hénaff, Koppula, Alayrac, van den Oord, Vinyals,
Carreira, "Efficient Visual Pretraining with Contrastive Detection", ICCV 2021, arXiv:2103.10957; official JAX code
github.com/google-deepmind/detcon, DetCon-B only: ``detcon_b.py``, ``utils/losses.py``, ``utils/augmentations.py``,
``utils/networks.py``, ``generate_fh_masks_for_imagenet.py``; Apache-2.0, read and reimplemented here).

Per image, unsupervised masks (Felzenszwalb-Huttenlocher) are carried through the two views' crops and flips,
pooled onto each view's feature grid by majority vote, and ``num_masks`` mask ids are sampled per view among the
masks present on that grid. Each sampled mask's features are averaged; the projection of a mask in one view must
pick out the same mask of the same image in the other view against every other mask of every image of the global
batch (both views), with temperature 0.1 (:class:`DetConLoss`).

* ``variant="b"`` (DetCon-B, the official code): BYOL's architecture: online backbone -> projector -> predictor,
  EMA target backbone -> projector (momentum 0.996 -> 1, cosine); the targets of the whole global batch are gathered
  without gradient (``concat_all_gather``). The loss is the contrastive detection loss, not BYOL's regression: the
  official ``byol_nce_detcon`` keeps negatives for DetCon-B too (the paper: both variants use the contrastive
  detection objective).
* ``variant="s"`` (DetCon-S, SimCLR's architecture): one network, projector only, no predictor and no EMA; the
  projections of the other view and of the other images are the keys, gathered with gradient
  (``gather_with_grad``), so 2 DDP processes give the gradients of 1.

Defaults (official ``detcon_b_config.py`` unless noted): projector/predictor Linear(4096)-BN-ReLU-Linear(256, no
bias) (``networks.MLP``), per mask (BatchNorm over B x num_masks); ``num_masks`` 16 (``n_random_vectors``), sampled
uniformly with replacement among the masks present on the view's grid; temperature 0.1; views 224 px, crop area
U(0.08, 1), aspect (3/4, 4/3), flip p 0.5; BYOL's colours (jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey 0.2, blur p 1.0 /
0.1, solarise p 0 / 0.2: densekit's ``VICREG_VIEW1/2`` are the same recipe); FH ``scale=1000, min_size=1000``,
sigma 0.8 (scikit-image's default, the official call passes none).

Kept from the official code: majority-vote pooling (one-hot average over each cell, arg-max, smallest id on a
tie); masks sampled among those present on that view's pooled grid, independently per view, so a sampled mask
may have no positive (weight 0: it gets exactly zero gradient); the same mask ids for online and target (the
official code reuses one rng: here the ids come from the transform); positives = same image and same id in the
other view, divided by their number; in the same-view block the same-image same-id entries are removed, the other
masks of the same image stay as negatives ("local negatives"); the de-duplication weight 1 / (how many sampled
slots of the same image and view hold the same id); mean over B x num_masks, the two directions summed; the target
projector is a copy of the online one at the start.

Departures, and why:

* Masks are computed in the transform on the frame the data layer delivers (``data.size``), not offline on the
  full ImageNet image; FH ``min_size`` is in pixels, so CPU configurations scale it by area (1000 px at ~500x375
  is ~130 px at 160x160). Ids stay int32 (the official masks are cast to uint8, so ids > 255 wrap and merge).
* Mask pooling reads the mask at every view pixel centre (nearest neighbour, exactly the geometry of the bilinear
  view warp) and votes over the stride x stride pixels of each cell; the official code resizes the cropped mask
  to 224 px nearest and average-pools by 32. Same vote, densekit's cell geometry (:mod:`densekit.train.augment`).
* Views: torchvision's ten-try RandomResizedCrop (``augment.random_resized_crop``) instead of the official single
  clamped draw; bilinear warp instead of bicubic resize; OpenCV's Gaussian kernel (size from sigma) instead of
  kernel side H / 10.
* ``num_masks`` larger than the view's feature grid has cells is refused (one line) rather than sampling
  duplicates of duplicates: the grid cannot hold that many masks.
* The official target network is initialised with its own rng; here it starts as the online network's copy
  (BYOL's convention; the official comment reports no difference). Its BatchNorm runs in training mode (batch
  statistics), as the official target does (``is_training=True``).
* No online linear classifier (the official one only monitors ImageNet accuracy) and no LARS (densekit's
  optimisers are AdamW / SGD).
* On a ViT the grid is the patch grid (stride p), on densekit's ResNets the stride-8 map: finer grids than the
  paper's 7 x 7 ResNet-50 C5; the paper and the official code are ResNet-only.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import VICREG_VIEW1, VICREG_VIEW2, Box, RandomView, normalize, view_size
from densekit.train.dist import concat_all_gather, gather_with_grad, rank
from densekit.train.heads import mlp_head
from densekit.train.objective import Objective, Transform
from densekit.train.regions import grid_labels

Variant = Literal["b", "s"]
VARIANTS: tuple[str, ...] = ("b", "s")

#: a logit pushed out of the softmax (the official code subtracts 1e9 as well)
MASKED_LOGIT = -1e9


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def fh_masks(image: np.ndarray, scale: float = 1000.0, sigma: float = 0.8, min_size: int = 1000) -> np.ndarray:
    """Felzenszwalb-Huttenlocher segmentation (scikit-image): (H, W, 3) uint8 RGB -> (H, W) int32 ids 0..K-1."""
    from skimage.segmentation import felzenszwalb

    return felzenszwalb(image, scale=float(scale), sigma=float(sigma), min_size=int(min_size)).astype(np.int32)


def majority_labels(labels: np.ndarray, frame_hw: tuple[int, int], box: Box, view_hw: tuple[int, int],
                    stride: int) -> np.ndarray:
    """A frame's mask carried through a view's crop (and flip) and pooled onto the view's feature grid.

    Every view pixel takes the mask id under its centre (nearest neighbour, the geometry of ``crop_resize``'s
    warp); each feature cell (``stride`` x ``stride`` view pixels) takes the id most of its pixels hold, the
    smallest id on a tie (the official one-hot average pooling and arg-max).

    Args:
        labels: (h0, w0) integer mask ids of the frame (may be computed on a resized copy of it).
        frame_hw: the frame's (H, W); ``box`` is in its pixel coordinates.
        box: the view's crop (x_left, y_top, x_right, y_bottom), x_left > x_right when flipped.
        view_hw: the view's (H_v, W_v), multiples of ``stride``.
        stride: view pixels per feature cell.
    Returns:
        (H_v / stride, W_v / stride) int64 mask ids.
    """
    vh, vw = view_hw
    if vh % stride or vw % stride:
        raise DensekitError(f"detcon: view size {vh}x{vw} is not a multiple of the feature stride {stride}")
    pix = grid_labels(labels, frame_hw, box, view_hw)  # (vh, vw): one cell per view pixel
    h, w = vh // stride, vw // stride
    ids, compact = np.unique(pix, return_inverse=True)
    cell = (np.arange(vh)[:, None] // stride) * w + np.arange(vw)[None, :] // stride
    counts = np.bincount(cell.reshape(-1) * ids.size + compact.reshape(-1), minlength=h * w * ids.size)
    return ids[counts.reshape(h * w, ids.size).argmax(axis=1)].reshape(h, w).astype(np.int64)


def sample_mask_ids(cells: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` mask ids drawn uniformly, with replacement, among the ids present in ``cells`` (any shape) -> (num,)
    int64. Every slot holds a mask of this view; whether the other view has it too is the loss's business."""
    return rng.choice(np.unique(cells), size=int(num), replace=True).astype(np.int64)


def check_grid(grid_hw: tuple[int, int], num_masks: int, where: str) -> None:
    """One line when a feature grid has fewer cells than the masks to sample on it."""
    cells = int(grid_hw[0]) * int(grid_hw[1])
    if cells < num_masks:
        raise DensekitError(
            f"detcon: num_masks={num_masks} masks cannot fit on the {grid_hw[0]}x{grid_hw[1]} feature grid of "
            f"{where} ({cells} cells); use larger views (hparams.size) or fewer masks (hparams.num_masks)"
        )


class DetConTransform:
    """FH masks of the frame, two views with their crops, the masks pooled onto each view's grid, sampled ids.

    Picklable (plain numbers only). ``__call__([frame (H, W, 3) uint8], rng)`` returns, for views of (H_v, W_v)
    and grids of (h, w) = (H_v, W_v) / stride, R = ``num_masks``:
        ``view1``, ``view2`` (3, H_v, W_v) float32 normalised; ``box1``, ``box2`` (4,) float32 crop boxes;
        ``cells1``, ``cells2`` (h, w) int64 mask id of every feature cell; ``ids1``, ``ids2`` (R,) int64 sampled ids.
    Draw order: view 1 (box, flip, colours), its ids, view 2, its ids; the FH masks draw nothing.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], multiple: int, stride: int, *,
                 size: int = 224, scale: tuple[float, float] = (0.08, 1.0), num_masks: int = 16,
                 fh_scale: float = 1000.0, fh_sigma: float = 0.8, fh_min_size: int = 1000) -> None:
        self.mean, self.std, self.multiple, self.stride = tuple(mean), tuple(std), int(multiple), int(stride)
        self.size, self.num_masks = int(size), int(num_masks)
        self.fh = (float(fh_scale), float(fh_sigma), int(fh_min_size))
        sc = (float(scale[0]), float(scale[1]))
        self.views = (RandomView(VICREG_VIEW1, scale=sc), RandomView(VICREG_VIEW2, scale=sc))

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = frames[0]
        frame_hw = (int(image.shape[0]), int(image.shape[1]))
        masks = fh_masks(image, *self.fh)
        out_hw = view_size(frame_hw, self.size, self.multiple)
        check_grid((out_hw[0] // self.stride, out_hw[1] // self.stride), self.num_masks, f"{out_hw[0]}x{out_hw[1]} views")
        out: dict[str, np.ndarray] = {}
        for k, view in enumerate(self.views, start=1):
            pixels, box = view(image, out_hw, rng)
            out[f"view{k}"] = normalize(pixels, self.mean, self.std)
            out[f"box{k}"] = np.asarray(box, np.float32)
            out[f"cells{k}"] = majority_labels(masks, frame_hw, box, out_hw, self.stride)
            out[f"ids{k}"] = sample_mask_ids(out[f"cells{k}"], self.num_masks, rng)
        return out


# ----------------------------------------------------------------------------------------------------
# Pooling and the loss
# ----------------------------------------------------------------------------------------------------


def mask_pool(feats: torch.Tensor, cells: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean feature of each sampled mask: feats (B, D, h, w), cells (B, h, w) ids, ids (B, R) -> (B, R, D).

    A mask with no cell on the grid pools to zeros (cannot happen for ids sampled by :class:`DetConTransform`).
    """
    if cells.shape[-2:] != feats.shape[-2:]:
        raise DensekitError(f"detcon: the transform's mask grid {tuple(cells.shape[-2:])} does not match the "
                            f"backbone's feature grid {tuple(feats.shape[-2:])}")
    onehot = (ids[:, :, None] == cells.flatten(1)[:, None, :]).to(feats.dtype)  # (B, R, h*w)
    onehot = onehot / onehot.sum(dim=2, keepdim=True).clamp_min(1.0)
    return onehot @ feats.flatten(2).transpose(1, 2)


class DetConLoss(nn.Module):
    """The contrastive detection loss (official ``byol_nce_detcon``) over the GLOBAL batch.

    For every sampled mask (b, r) of view a with query q = pred_a[b, r]: keys are the targets of both views of every
    image of the global batch; positives are the view-b targets of the same image with the same id; the view-a
    targets of the same image with the same id are removed (itself, duplicates); everything else is a negative.
    ``ce = logsumexp(all logits) - mean(positive logits)`` on cosine logits / ``temperature``, weighted by
    ``[has a positive] / (slots of the same image and view holding the same id)``, averaged over the local
    B x R queries; the loss is the sum of the two directions (view 1 -> 2 and 2 -> 1). Computed in float32.

    ``forward(pred1, pred2, target1, target2, ids1, ids2)``: pred (B, R, C) queries, target (B, R, C) keys (with
    gradient: gathered with ``gather_with_grad``, DetCon-S; without: ``concat_all_gather``, DetCon-B), ids (B, R)
    -> ``{"loss", "matched"}`` (matched: fraction of the local queries that have a positive, no grad).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise DensekitError(f"detcon: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, pred1: torch.Tensor, pred2: torch.Tensor, target1: torch.Tensor, target2: torch.Tensor,
                ids1: torch.Tensor, ids2: torch.Tensor) -> dict[str, torch.Tensor]:
        b = pred1.shape[0]
        keys = [_gather(F.normalize(t.float(), dim=-1)) for t in (target1, target2)]  # (G, R, C) each
        kids = [concat_all_gather(i) for i in (ids1, ids2)]  # (G, R)
        own = rank() * b + torch.arange(b, device=pred1.device)
        own_img = own[:, None] == torch.arange(keys[0].shape[0], device=pred1.device)[None, :]  # (B, G)
        loss_a, m_a = self._direction(pred1, ids1, keys[1], kids[1], keys[0], kids[0], own_img)
        loss_b, m_b = self._direction(pred2, ids2, keys[0], kids[0], keys[1], kids[1], own_img)
        return {"loss": loss_a + loss_b, "matched": (m_a + m_b) / 2}

    def _direction(self, pred: torch.Tensor, ids: torch.Tensor, k_other: torch.Tensor, ids_other: torch.Tensor,
                   k_same: torch.Tensor, ids_same: torch.Tensor, own_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction: queries pred (B, R, C) of a view -> (loss scalar, matched fraction scalar)."""
        q = F.normalize(pred.float(), dim=-1)
        b, r = ids.shape
        same_img = own_img[:, None, :, None]  # (B, 1, G, 1)
        pos = same_img & (ids[:, :, None, None] == ids_other[None, None, :, :])  # (B, R, G, R)
        itself = same_img & (ids[:, :, None, None] == ids_same[None, None, :, :])
        l_other = torch.einsum("brc,gsc->brgs", q, k_other) / self.temperature
        l_same = (torch.einsum("brc,gsc->brgs", q, k_same) / self.temperature).masked_fill(itself, MASKED_LOGIT)
        pos = pos.reshape(b, r, -1).to(q.dtype)
        l_other = l_other.reshape(b, r, -1)
        n_pos = pos.sum(dim=-1)
        logits = torch.cat([l_other, l_same.reshape(b, r, -1)], dim=-1)
        ce = torch.logsumexp(logits, dim=-1) - (l_other * pos).sum(dim=-1) / n_pos.clamp_min(1.0)
        dup = (ids[:, :, None] == ids[:, None, :]).sum(dim=-1).to(q.dtype)  # >= 1: the slot itself
        weight = (n_pos > 0).to(q.dtype) / dup
        return (weight * ce).mean(), (n_pos > 0).float().mean().detach()


def _gather(keys: torch.Tensor) -> torch.Tensor:
    """Keys of the global batch: with gradient when they carry one (DetCon-S), without (DetCon-B targets)."""
    return gather_with_grad(keys) if keys.requires_grad else concat_all_gather(keys)


# ----------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------


class DetCon(Objective):
    """DetCon (Hénaff et al., ICCV 2021): contrastive detection over FH masks; DetCon-B or DetCon-S.

    Batch (see :class:`DetConTransform`): ``view1``, ``view2`` (B, 3, H, W); ``cells1``, ``cells2`` (B, h, w) mask
    ids per feature cell; ``ids1``, ``ids2`` (B, R) sampled ids (``box1``, ``box2`` unused here).
    Model: backbone (B, D, h, w) -> :func:`mask_pool` (B, R, D) -> ``projector`` (B, R, proj_dim) [-> ``predictor``
    (B, R, proj_dim), DetCon-B]; DetCon-B's keys come from ``target_backbone`` -> ``target_projector`` (EMA).
    Logged: ``loss``, ``matched`` (fraction of sampled masks present in both views), ``proj_std`` (feature-wise std
    of view 1's normalised projections, the official ``normalized_proj_std``: 0 on collapse), ``momentum``
    (DetCon-B).

    Args:
        backbone: any DenseBackbone (ResNets at stride 8, a timm ViT's patch grid, ...).
        variant: ``"b"`` (DetCon-B: predictor + EMA target) or ``"s"`` (DetCon-S: one network).
        num_masks: masks sampled per view (16).
        temperature: softmax temperature (0.1).
        hidden_dim, proj_dim: projector / predictor widths (4096, 256).
        base_momentum: DetCon-B's EMA momentum at step 0, cosine to 1 (0.996).
        size: view side in pixels (224; 0: the frame's size rounded down to the backbone's input multiple).
        min_scale, max_scale: crop area range (0.08, 1.0).
        fh_scale, fh_sigma, fh_min_size: Felzenszwalb-Huttenlocher parameters (1000, 0.8, 1000 px).
    """

    name: ClassVar[str] = "detcon"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, *, variant: Variant = "b", num_masks: int = 16,
                 temperature: float = 0.1, hidden_dim: int = 4096, proj_dim: int = 256, base_momentum: float = 0.996,
                 size: int = 224, min_scale: float = 0.08, max_scale: float = 1.0, fh_scale: float = 1000.0,
                 fh_sigma: float = 0.8, fh_min_size: int = 1000) -> None:
        super().__init__(backbone, variant=variant, num_masks=num_masks, temperature=temperature,
                         hidden_dim=hidden_dim, proj_dim=proj_dim, base_momentum=base_momentum, size=size,
                         min_scale=min_scale, max_scale=max_scale, fh_scale=fh_scale, fh_sigma=fh_sigma,
                         fh_min_size=fh_min_size)
        if variant not in VARIANTS:
            raise DensekitError(f"detcon: variant must be 'b' (DetCon-B) or 's' (DetCon-S), got {variant!r}")
        if num_masks < 1 or min(hidden_dim, proj_dim) < 1 or fh_min_size < 0 or fh_scale <= 0:
            raise DensekitError("detcon: num_masks, hidden_dim and proj_dim must be >= 1, fh_scale > 0, fh_min_size >= 0")
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise DensekitError(f"detcon: need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        if not 0.0 <= base_momentum <= 1.0:
            raise DensekitError(f"detcon: base_momentum must be in [0, 1], got {base_momentum}")
        meta = backbone.meta
        self.variant, self.num_masks, self.size = str(variant), int(num_masks), int(size)
        self.stride, self.base_momentum = int(meta.stride), float(base_momentum)
        if self.size > 0:
            side = (self.size // meta.input_multiple) * meta.input_multiple
            check_grid((side // self.stride, side // self.stride), self.num_masks, f"{side}x{side} views")
        self.criterion = DetConLoss(temperature)
        # official networks.MLP: Linear(bias) - BN - ReLU - Linear(no bias), applied to every sampled mask
        self.projector = mlp_head(meta.dim, [hidden_dim, proj_dim], last_bias=False)
        if self.variant == "b":
            self.predictor = mlp_head(proj_dim, [hidden_dim, proj_dim], last_bias=False)
            self.target_backbone = copy.deepcopy(backbone)
            self.target_projector = copy.deepcopy(self.projector)
            for p in self._target_params():
                p.requires_grad_(False)
            self.register_buffer("momentum", torch.tensor(self.base_momentum, dtype=torch.float64))

    def _target_params(self) -> list[nn.Parameter]:
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def transform(self) -> Transform:
        hp, meta = self.hparams, self.backbone.meta
        return DetConTransform(meta.mean, meta.std, meta.input_multiple, self.stride, size=self.size,
                               scale=(float(hp["min_scale"]), float(hp["max_scale"])), num_masks=self.num_masks,
                               fh_scale=hp["fh_scale"], fh_sigma=hp["fh_sigma"], fh_min_size=hp["fh_min_size"])

    def _project(self, backbone: nn.Module, projector: nn.Module, x: torch.Tensor, cells: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, R, proj_dim): backbone, mask pooling, projector over the B x R masks."""
        pooled = mask_pool(backbone(x), cells.long(), ids.long())
        b, r, _ = pooled.shape
        return projector(pooled.reshape(b * r, -1)).reshape(b, r, -1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"loss", "matched", "proj_std"[, "momentum"]}`` (see the class docstring)."""
        ids = (batch["ids1"].long(), batch["ids2"].long())
        views, cells = (batch["view1"], batch["view2"]), (batch["cells1"], batch["cells2"])
        # each view on its own, as the official code (BatchNorm statistics per view)
        proj = [self._project(self.backbone, self.projector, v, c, i) for v, c, i in zip(views, cells, ids)]
        if self.variant == "b":
            queries = [self.predictor(p.flatten(0, 1)).reshape(p.shape) for p in proj]
            with torch.no_grad():
                keys = [self._project(self.target_backbone, self.target_projector, v, c, i)
                        for v, c, i in zip(views, cells, ids)]
        else:
            queries = keys = proj
        out = self.criterion(queries[0], queries[1], keys[0], keys[1], ids[0], ids[1])
        with torch.no_grad():
            unit = F.normalize(proj[0].detach().flatten(0, 1).float(), dim=1)
            out["proj_std"] = unit.std(dim=0, correction=0).mean()
            if self.variant == "b":
                out["momentum"] = self.momentum.float()
        return out

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """DetCon-B: EMA target update, momentum 1 - (1 - base) (cos(pi k / K) + 1) / 2 (official
        ``schedules.target_ema``). DetCon-S: nothing."""
        if self.variant != "b":
            return
        frac = min(1.0, (step + 1) / max(1, max_steps))
        m = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * frac) + 1.0) / 2.0
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        for po, pt in zip(online, self._target_params()):
            pt.mul_(m).add_(po.detach(), alpha=1.0 - m)
        self.momentum.fill_(m)


__all__ = ["DetCon", "DetConLoss", "DetConTransform", "check_grid", "fh_masks", "majority_labels", "mask_pool",
           "sample_mask_ids"]
