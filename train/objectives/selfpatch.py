"""SelfPatch: neighbouring patches as positives (Yun, Lee, Kim, Shin, "Patch-level Representation Learning for
Self-supervised Vision Transformers", CVPR 2022; official code github.com/alinlab/SelfPatch, DINO + SelfPatch).

DINO's multi-crop self-distillation, plus a patch-level term. Per view, the teacher's last-block patch tokens pick,
for every patch i, the ``k`` (4) most cosine-similar patches among its 8 neighbours (a 3x3 window without i); an
aggregation module (2 CaiT-style class-attention blocks with a learnable query) summarises those k tokens into
i's target. The student's patch i is its own raw token. Both go through a patch DINO head and are matched by
DINO's cross-entropy in the same view, patch by patch. The image-level token is the same aggregation module's
query attending to all patch tokens (the ViT has no CLS token), scored with DINO's image loss.
``loss = L_image + 0.1 * L_patch``.

Asymmetry kept from the official code (``main_selfpatch.py``): the student aggregates nothing at patch level (raw
tokens), the teacher aggregates neighbours only (patch i itself is never in its target); the teacher is an EMA
copy without stochastic depth (student drop path 0.1); local crops go through the teacher too (their patch
loss); SelfPatch evaluates the teacher, so the teacher's backbone is exported.

Official details kept: the neighbourhood wraps around the grid borders (``get_local_index``: patch 0 of a
6x6 grid has neighbours {1, 5, 6, 7, 11, 30, 31, 35}); class attention's keys include its own query token;
patch centre over all patches of all views, and the image centre over the teacher's image tokens of all views,
the local crops' included (DINO's uses the global crops only; SelfPatch's teacher runs on the local crops, and its
``update_center`` takes them all); each view weighs the same in the patch term whatever its grid; constant
teacher temperature 0.04; lambda 0.1. The aggregation head equals the official ``SelfPatchHead`` to 1e-6 on the
same weights (checked against ``selfpatch_vision_transformer.py`` at commit 81aef14 while writing this).

Differences from the official code, on purpose:

* Any h x w grid: the official head hard-codes 196 and 36 tokens (``assert(False)`` otherwise) and square grids;
  :func:`neighbour_index` builds the table for any grid of at least ``window`` x ``window``.
  ``border="clamp"`` (not in the official code) keeps the window inside the grid instead of wrapping.
* The neighbour similarities come from one (B, N, N) cosine matrix (fp32) gathered at the table, not from
  gathering (B, N, 8, D) token copies: the same numbers, less memory for N < 8 D; and no ``squeeze()`` that
  breaks the official selection at a batch of one.
* Epoch-counted settings are steps (``freeze_last_layer_steps``, ``warmup_teacher_temp_steps``); the optimiser
  settings (wd 0.04 -> 0.4, per-parameter clipping) are the trainer's config, not hparams.
* Augmentation: densekit's OpenCV crops (area/bilinear, official PIL bicubic) and VICReg's two view recipes for the
  global crops (the same distributions as DINO's; view 1 makes one extra, never-solarising draw).
* Any timm ViT: prefix tokens (CLS, registers), if the ViT has them, take part in attention and are then ignored.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.cait import ClassAttn
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import VICREG_VIEW1, VICREG_VIEW2, Photometric, RandomView, normalize
from densekit.train.heads import DINOHead, cancel_last_layer_grads
from densekit.train.losses import DINOLoss, dino_cross_entropy
from densekit.train.objective import Objective, Transform, make_teacher
from densekit.train.vit import ViTAdapter

BORDERS = ("wrap", "clamp")


# ----------------------------------------------------------------------------------------------------------------
# neighbours


def neighbour_index(h: int, w: int, window: int = 3, border: str = "wrap") -> torch.Tensor:
    """The candidate positives of every patch of an h x w grid (raster order): (h * w, window^2 - 1) long.

    Row i lists, in raster order, the patches of the ``window`` x ``window`` square around patch i except i.
    ``border="wrap"`` (official): the square wraps around the grid edges (a torus). ``"clamp"``: the square is
    shifted to lie inside the grid, so border patches also get window^2 - 1 distinct neighbours.
    """
    if window < 3 or window % 2 == 0:
        raise DensekitError(f"selfpatch window must be odd and >= 3, got {window}")
    if border not in BORDERS:
        raise DensekitError(f"selfpatch border must be one of {', '.join(BORDERS)}, got {border!r}")
    if h < window or w < window:
        raise DensekitError(f"selfpatch needs a patch grid of at least {window}x{window}, got {h}x{w}: "
                            "use larger crops or a smaller patch size")
    r = window // 2
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1, 1), xs.reshape(-1, 1)
    if border == "clamp":
        ys, xs = ys.clamp(r, h - 1 - r), xs.clamp(r, w - 1 - r)
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    rows = ((ys + dy.reshape(1, -1)) % h) * w + (xs + dx.reshape(1, -1)) % w  # (N, window^2) square members
    rows = rows.sort(dim=1).values
    keep = rows != torch.arange(h * w).unsqueeze(1)
    return rows[keep].reshape(h * w, window * window - 1)


def select_neighbours(tokens: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """For every patch, its ``k`` most cosine-similar candidates: tokens (B, N, D), index (N, M) -> (B, N, k) long
    patch ids (into N), most similar first."""
    if not 1 <= k <= index.shape[1]:
        raise DensekitError(f"selfpatch k must be in [1, {index.shape[1]}] for this window, got {k}")
    x = F.normalize(tokens.float(), dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, N, N)
    cand = index.to(tokens.device).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    top = sim.gather(2, cand).topk(k, dim=-1).indices  # (B, N, k) positions in the candidate list
    return cand.gather(2, top)


# ----------------------------------------------------------------------------------------------------------------
# the aggregation module


class ClassAttentionBlock(nn.Module):
    """One pre-norm class-attention block (CaiT's, without LayerScale, as SelfPatch's ``LayerScale_Block_CA``).

    ``forward(x, query)``: x (B, N, D) keys/values, query (B, 1, D) -> (B, 1, D). The query attends to
    ``[query, x]``; then an MLP (ratio 4, GELU) on the query, both residual.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        query = query + self.attn(self.norm1(torch.cat([query, x], dim=1)))
        return query + self.mlp(self.norm2(query))


class SelfPatchHead(nn.Module):
    """SelfPatch's aggregation module (``SelfPatchHead``): a learnable query, ``depth`` class-attention blocks, a
    final LayerNorm.

    ``forward(tokens, grid_hw, aggregate)``: tokens (B, N, D) last-block patch tokens of an h x w grid (N = h w) ->
    (image (B, D), patches (B, N, D)). ``image``: the query after attending to all N tokens. ``patches``: with
    ``aggregate=False`` (student) the tokens themselves; with ``aggregate=True`` (teacher) patch i is a fresh
    query attending to its ``k`` chosen neighbours only (:func:`select_neighbours`). All outputs LayerNorm'd.
    """

    def __init__(self, dim: int, num_heads: int, k: int = 4, depth: int = 2, window: int = 3,
                 border: str = "wrap") -> None:
        super().__init__()
        if border not in BORDERS:
            raise DensekitError(f"selfpatch border must be one of {', '.join(BORDERS)}, got {border!r}")
        if not 1 <= k <= window * window - 1:
            raise DensekitError(f"selfpatch k must be in [1, {window * window - 1}] for window {window}, got {k}")
        if dim % num_heads:
            raise DensekitError(f"selfpatch head: width {dim} is not divisible by {num_heads} heads")
        self.k, self.window, self.border = int(k), int(window), border
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.query, std=0.02)
        self.apply(_init_linear)
        self._index: dict[tuple[int, int], torch.Tensor] = {}

    def index(self, h: int, w: int) -> torch.Tensor:
        """:func:`neighbour_index` for this head's window and border, cached per grid."""
        if (h, w) not in self._index:
            self._index[(h, w)] = neighbour_index(h, w, self.window, self.border)
        return self._index[(h, w)]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The query after the blocks over x (B, N, D) -> (B, D), not normalised."""
        q = self.query.expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(x, q)
        return q[:, 0]

    def aggregate(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Every patch's target from its chosen neighbours: tokens (B, N, D) -> (B, N, D), not normalised."""
        b, n, d = tokens.shape
        ids = select_neighbours(tokens, self.index(*grid_hw), self.k)  # (B, N, k)
        nb = tokens.gather(1, ids.reshape(b, n * self.k, 1).expand(-1, -1, d))
        return self.pool(nb.reshape(b * n, self.k, d)).reshape(b, n, d)

    def forward(self, tokens: torch.Tensor, grid_hw: tuple[int, int],
                aggregate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = grid_hw
        if tokens.shape[1] != h * w:
            raise DensekitError(f"selfpatch head: {tokens.shape[1]} tokens do not make a {h}x{w} grid")
        image = self.pool(tokens)
        patches = self.aggregate(tokens, grid_hw) if aggregate else tokens
        return self.norm(image), self.norm(patches)


def _init_linear(m: nn.Module) -> None:
    # the official head's init (DINO's): truncated normal 0.02 for every linear map, zero bias
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------
# the patch-level loss


class PatchDINOLoss(DINOLoss):
    """SelfPatch's patch term: DINO's cross-entropy per patch, between the teacher's and the student's patch i of
    the same view (no cross-view pairs), averaged over the patches of a view, then over views (each view counts
    once, whatever its grid). Centring, sharpening and fp32 as :class:`~densekit.train.losses.DINOLoss`; the centre
    moves toward the mean over every patch of every view (global batch).

    ``forward(student, teacher, step)``: student, teacher: one (B, N_v, K) logits tensor per view -> scalar.
    """

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],  # type: ignore[override]
                step: int, update_center: bool = True) -> torch.Tensor:
        if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
            raise ValueError(f"PatchDINOLoss needs one student and one teacher (B, N, K) per view, got "
                             f"{[tuple(s.shape) for s in student]} and {[tuple(t.shape) for t in teacher]}")
        terms = [dino_cross_entropy(s, self.teacher_probs(t, step), self.student_temp).mean()
                 for s, t in zip(student, teacher)]
        if update_center:
            self.update_center(torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher]))
        return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------------------------
# CPU augmentation

#: DINO's local crops (``DataAugmentationDINO.local_transfo``): flip, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grey 0.2,
#: blur p 0.5. Its global crops are VICReg's two views (BYOL's recipe, which DINO took over).
DINO_LOCAL = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5)


class SelfPatchTransform:
    """DINO's multi-crop, as SelfPatch uses it. Picklable.

    ``__call__([image (H, W, 3) uint8], rng)`` -> ``globals`` (2, 3, Sg, Sg) and ``locals`` (L, 3, Sl, Sl) float32,
    normalised with the backbone's mean/std. RandomResizedCrop (global scale (0.25, 1), local (0.05, 0.25)) + flip
    p 0.5; global 1: :data:`~densekit.train.augment.VICREG_VIEW1` (blur p 1), global 2: ``VICREG_VIEW2`` (blur 0.1,
    solarise 0.2), locals :data:`DINO_LOCAL`. OpenCV area/bilinear resampling (official: PIL bicubic).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], global_size: int, local_size: int,
                 local_crops_number: int, global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25)) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.local_number = int(local_crops_number)
        gs, ls = (float(global_scale[0]), float(global_scale[1])), (float(local_scale[0]), float(local_scale[1]))
        self.globals = (RandomView(VICREG_VIEW1, scale=gs, resample="resize"),
                        RandomView(VICREG_VIEW2, scale=gs, resample="resize"))
        self.local = RandomView(DINO_LOCAL, scale=ls, resample="resize")

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = frames[0].astype(np.float32) / 255.0
        g = [self._view(v, img, self.global_size, rng) for v in self.globals]
        loc = [self._view(self.local, img, self.local_size, rng) for _ in range(self.local_number)]
        shape = (0, 3, self.local_size, self.local_size)
        return {"globals": np.stack(g), "locals": np.stack(loc) if loc else np.zeros(shape, np.float32)}

    def _view(self, view: RandomView, img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        pixels, _ = view(img, (size, size), rng)
        return normalize(pixels, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------------------
# the objective


class SelfPatch(Objective):
    """SelfPatch (CVPR 2022) on a timm ViT (DINO + the patch-level term).

    Batch (from :meth:`transform`): ``globals`` (B, 2, 3, Sg, Sg), ``locals`` (B, L, 3, Sl, Sl) normalised.
    Logged: ``loss``, ``loss_image``, ``loss_patch``, ``patch_max_prob`` (mean over teacher patches of the largest
    probability of the sharpened patch target: near 1 means the patch head collapsed onto one prototype),
    ``teacher_temp``.

    The backbone is the ViT's last block, unnormalised (the official ViT has neither a CLS token nor a final norm:
    ``backbone_kwargs`` ``class_token: false, global_pool: avg`` make timm's the same, and then the exported
    backbone's features are exactly the official evaluation's ``get_intermediate_layers(n=1)``). A ViT with prefix
    tokens works too: they take part in attention, but the head reads the patch tokens only.

    Hyper-parameters (defaults: ``main_selfpatch.py`` and the README's command, ViT-S/16, batch 1024; the
    epoch-counted ones in steps of 1251 per ImageNet-1k epoch):
        k 4 neighbours of a ``window`` 3 square, ``border`` wrap; aggregation ``head_depth`` 2 class-attention
        blocks (heads = the ViT's); out_dim 65536 (image head), out_dim_selfpatch 4096 (patch head), hidden_dim
        2048, bottleneck_dim 256, norm_last_layer True; teacher temperature 0.04 constant (``warmup_teacher_temp``
        0.04 over 0 steps), student 0.1, centre momentum 0.9 (both centres); ``patch_weight`` lambda 0.1; teacher
        EMA 0.996 -> 1 (cosine); ``freeze_last_layer_steps`` 1251 (1 epoch); 2 global crops 224 px, scale
        (0.25, 1), ``local_crops_number`` 8 of 96 px, scale (0.05, 0.25). The optimiser (AdamW, lr 5e-4 x batch /
        256, wd 0.04 -> 0.4, per-parameter clipping 3.0) is the config's: see ``train/configs/selfpatch_vit_tiny.yaml``.
    """

    name: ClassVar[str] = "selfpatch"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, *, k: int = 4, window: int = 3, border: str = "wrap",
                 head_depth: int = 2, out_dim: int = 65536, out_dim_selfpatch: int = 4096, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, student_temp: float = 0.1,
                 center_momentum: float = 0.9, patch_weight: float = 0.1, base_momentum: float = 0.996,
                 freeze_last_layer_steps: int = 1251, global_crop_size: int = 224, local_crop_size: int = 96,
                 local_crops_number: int = 8, global_crops_scale: tuple[float, float] = (0.25, 1.0),
                 local_crops_scale: tuple[float, float] = (0.05, 0.25)) -> None:
        super().__init__(backbone, k=k, window=window, border=border, head_depth=head_depth, out_dim=out_dim,
                         out_dim_selfpatch=out_dim_selfpatch, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                         norm_last_layer=norm_last_layer, teacher_temp=teacher_temp,
                         warmup_teacher_temp=warmup_teacher_temp, warmup_teacher_temp_steps=warmup_teacher_temp_steps,
                         student_temp=student_temp, center_momentum=center_momentum, patch_weight=patch_weight,
                         base_momentum=base_momentum, freeze_last_layer_steps=freeze_last_layer_steps,
                         global_crop_size=global_crop_size, local_crop_size=local_crop_size,
                         local_crops_number=local_crops_number, global_crops_scale=tuple(global_crops_scale),
                         local_crops_scale=tuple(local_crops_scale))
        vit = ViTAdapter(backbone)
        self._check_crops(vit.patch_size, window, global_crop_size, local_crop_size, local_crops_number)
        if patch_weight < 0 or head_depth < 1:
            raise DensekitError(f"selfpatch needs patch_weight >= 0 and head_depth >= 1, got {patch_weight}, "
                                f"{head_depth}")
        self.patch_weight, self.base_momentum = float(patch_weight), float(base_momentum)
        self.freeze_last_layer_steps = int(freeze_last_layer_steps)
        self.crops = (int(global_crop_size), int(local_crop_size), int(local_crops_number),
                      tuple(global_crops_scale), tuple(local_crops_scale))

        num_heads = int(vit.blocks[0].attn.num_heads)
        self.ca_head = SelfPatchHead(vit.dim, num_heads, k=k, depth=head_depth, window=window, border=border)
        dino = {"hidden_dim": hidden_dim, "bottleneck_dim": bottleneck_dim, "norm_last_layer": norm_last_layer}
        self.c_head = DINOHead(vit.dim, out_dim, **dino)
        self.p_head = DINOHead(vit.dim, out_dim_selfpatch, **dino)
        self.teacher_backbone = make_teacher(backbone)
        self.teacher_ca_head = make_teacher(self.ca_head)
        self.teacher_c_head = make_teacher(self.c_head)
        self.teacher_p_head = make_teacher(self.p_head)
        temps = {"teacher_temp": teacher_temp, "warmup_teacher_temp": warmup_teacher_temp,
                 "warmup_steps": warmup_teacher_temp_steps, "student_temp": student_temp,
                 "center_momentum": center_momentum}
        self.image_loss = DINOLoss(out_dim, **temps)
        self.patch_loss = PatchDINOLoss(out_dim_selfpatch, **temps)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _check_crops(patch: int, window: int, global_size: int, local_size: int, local_number: int) -> None:
        if local_number < 0:
            raise DensekitError(f"selfpatch local_crops_number must be >= 0, got {local_number}")
        sizes = [("global_crop_size", global_size)] + ([("local_crop_size", local_size)] if local_number else [])
        for key, size in sizes:
            if size % patch or size // patch < window:
                raise DensekitError(f"selfpatch {key} {size} must be a multiple of the patch size {patch} giving at "
                                    f"least a {window}x{window} patch grid (the neighbour window)")

    # -- data ----------------------------------------------------------------------------------------------------
    def transform(self) -> Transform:
        """DINO's multi-crop (:class:`SelfPatchTransform`)."""
        meta = self.backbone.meta
        gsize, lsize, lnum, gscale, lscale = self.crops
        return SelfPatchTransform(meta.mean, meta.std, gsize, lsize, lnum, gscale, lscale)

    # -- model ---------------------------------------------------------------------------------------------------
    def _outputs(self, teacher: bool, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One crop size through a network: views (B, V, 3, S, S) -> (image logits (V, B, K), patch logits
        (V, B, N, K_p)). The teacher aggregates neighbours at patch level, the student does not."""
        b, v = views.shape[:2]
        x = views.transpose(0, 1).flatten(0, 1)  # view-major: (V B, 3, S, S)
        nets = ((self.teacher_backbone, self.teacher_ca_head, self.teacher_c_head, self.teacher_p_head) if teacher
                else (self.backbone, self.ca_head, self.c_head, self.p_head))
        vit = ViTAdapter(nets[0])
        _, tokens, hw = vit.tokens(x, norm=False)  # last block, raw: the official backbone output
        image, patches = nets[1](tokens, hw, aggregate=teacher)
        return nets[2](image).unflatten(0, (v, b)), nets[3](patches).unflatten(0, (v, b))

    def _all_views(self, teacher: bool, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global crops first, then the local ones: (image logits (V, B, K), [patch logits (B, N_v, K_p)] * V)."""
        outs = [self._outputs(teacher, batch[key]) for key in ("globals", "locals") if batch[key].shape[1]]
        return torch.cat([o[0] for o in outs]), [p for o in outs for p in o[1]]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """batch ``globals``, ``locals`` -> loss dict (see the class docstring)."""
        step = int(self.steps_done)
        with torch.no_grad():
            t_image, t_patches = self._all_views(True, batch)
        s_image, s_patches = self._all_views(False, batch)
        # image term: teacher global views x every other student view; the centre (official quirk) moves toward
        # the teacher's image tokens of all views, the local crops' included
        loss_image = self.image_loss(s_image, t_image[:2], step, update_center=False)
        loss_patch = self.patch_loss(s_patches, t_patches, step, update_center=self.training)
        if self.training:
            self.image_loss.update_center(t_image)
        with torch.no_grad():
            max_prob = torch.cat([self.patch_loss.teacher_probs(t, step).amax(-1).flatten() for t in t_patches])
        return {"loss": loss_image + self.patch_weight * loss_patch, "loss_image": loss_image.detach(),
                "loss_patch": loss_patch.detach(), "patch_max_prob": max_prob.mean(),
                "teacher_temp": torch.tensor(self.patch_loss.teacher_temp_at(step))}

    # -- around the step -----------------------------------------------------------------------------------------
    def before_optimizer_step(self, step: int, max_steps: int) -> None:
        """DINO's ``freeze_last_layer``: no update of both heads' last layers for the first steps."""
        for head in (self.c_head, self.p_head):
            cancel_last_layer_grads(head, step, self.freeze_last_layer_steps)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """Teacher EMA of backbone and all three heads: m = 1 - (1 - m0) (cos(pi k / K) + 1) / 2."""
        m = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * step / max(max_steps, 1)) + 1.0) / 2.0
        pairs = ((self.backbone, self.teacher_backbone), (self.ca_head, self.teacher_ca_head),
                 (self.c_head, self.teacher_c_head), (self.p_head, self.teacher_p_head))
        for student, teacher in pairs:
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        self.steps_done.fill_(step + 1)

    def export_backbone(self) -> DenseBackbone:
        """SelfPatch evaluates (and exports) the teacher (``eval_video_segmentation.py --checkpoint_key teacher``)."""
        return self.teacher_backbone
