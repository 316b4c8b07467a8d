"""DropPos: pre-training ViTs by reconstructing dropped positions, on packed sequences.

Wang et al., "DropPos: Pre-Training Vision Transformers by Reconstructing Dropped Positions", NeurIPS 2023
(arXiv:2309.03576); official code github.com/Haochen-Wang409/DropPos (``models_DropPos_mae.py``,
``engine_pretrain.py``; Apache-2.0, read for the method, reimplemented here), mode ``drop_pos_type=mae_pos_target``.

The method: keep a random 25 % of the patches (MAE masking, ``mask_ratio`` 0.75); of those, keep the position
embedding of a random 25 % (``pos_mask_ratio`` 0.75) and give the others one learnable ``mask_pos_token``
instead; run the ViT (CLS token included); a 2-block, 512-d decoder *without* position embeddings classifies each
visible token's position among the L grid cells. Targets are Gaussian-smoothed one-hots,
``w_ij = exp(-|p_i - p_j|^2 / sigma^2)``, sigma decayed linearly from 1 to 0 over training; the cross-entropy
counts only tokens whose position was dropped, each weighted by its *attentive* weight: a no-grad forward of the
same encoder on the whole image, cosine(CLS, patch) through a softmax at temperature 0.1, taken at the visible
tokens and renormalised per image. The ViT's position embeddings are the fixed 2-D sin-cos ones.

Here the images are packed (:mod:`densekit.train.packing`): the visible tokens of several images share one
sequence under a block-diagonal mask, and, for the attentive weights, so do the full images. With ``native=True``
each image gets its own aspect ratio and resolution (NaViT-style): its positions are classified among its own
grid's cells (class ``row * G + col`` of a G x G lattice, G = ``size // patch``; other classes masked out).
With ``native=False`` (default) every image is ``size`` x ``size`` and this is the paper's setting.

Defaults are the paper's (``scripts/pretrain_base.sh``): mask_ratio 0.75, pos_mask_ratio 0.75, sigma 1 with
decay, attentive weights at temperature 0.1, decoder 512-d x 2 blocks x 16 heads, 224 px, RandomResizedCrop
scale (0.2, 1) + flip and no photometric augmentation. The paper's optimiser (AdamW betas (0.9, 0.95), wd 0.05,
blr 1.5e-4 x batch / 256, per-parameter clip 5) is the config's business (``optim.*``).

Official quirks, kept or not:

* Smoothing normalisation: the code divides ``weight / weight.sum(-1)``, which broadcasts the sum of row j over
  column j, so target rows sum to 0.89-1.11 at sigma 1 on 14 x 14, not 1. The paper describes normalised
  targets; ``smoothing="row"`` (default) normalises each row to 1, ``smoothing="official"`` reproduces the code.
* sigma schedule: the code steps sigma once per epoch, ``(1 - epoch / epochs) sigma0``; densekit counts steps,
  so sigma is ``(1 - step / max_steps) sigma0``, the same line sampled per step (an epoch of a small video set is
  an arbitrary unit).
* Loss normalisation: the code divides by the local sum of the weights; here by the global sum (all-reduced,
  no grad), so 2 processes give the gradients of 1 on the same global batch.
* Masks: the code draws both masks with ``torch.rand`` inside forward; here the transform draws them from the
  sample's generator (exact resume, 1 process = N). Visible tokens keep raster order (the blocks and the decoder
  see no positions of dropped tokens, so the order carries none).
* The full forward for the attentive weights runs the encoder in the same (train) mode as the code does.
* Crops are resampled bilinearly (the code: bicubic).
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train import dist
from densekit.train.augment import RATIO, crop_resize, normalize, random_box
from densekit.train.objective import Objective, Transform
from densekit.train.packing import (
    PackCollate, Stream, drop_tokens, keep_count, native_grid, packed_blocks, packed_embed, packed_forward, patchify,
    segment_softmax, segment_sum,
)
from densekit.train.vit import ViTAdapter, segment_attention_mask

#: aspect ratios (w / h) of native-resolution crops (NaViT-style training)
NATIVE_RATIO = (0.5, 2.0)


# ----------------------------------------------------------------------------------------------------
# Transform: the view, its patches, the two masks
# ----------------------------------------------------------------------------------------------------


class DropPosTransform:
    """One view of one frame, patchified, with DropPos's two masks (picklable; plain numbers only).

    Draw order: crop box and flip, (native) grid size, patch mask, position mask.

    Returns (n = h w patches of the view's (h, w) grid, V = floor(n (1 - mask_ratio)) visible ones):
        ``patches`` (V, 3 p p) float32 and ``coords`` (V, 2) int64 (row, col) of the visible patches;
        ``keep_pos`` (V,) bool, True where the token keeps its position embedding
        (floor(V (1 - pos_mask_ratio)) of them); ``grid`` (2,) int64 (h, w);
        with ``full``: ``full_patches`` (n, 3 p p), ``full_coords`` (n, 2), the whole view.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], patch: int, size: int,
                 mask_ratio: float, pos_mask_ratio: float, scale: tuple[float, float] = (0.2, 1.0),
                 native: bool = False, min_side: int = 4, full: bool = True) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch, self.side = int(patch), int(size) // int(patch)
        self.mask_ratio, self.pos_mask_ratio = float(mask_ratio), float(pos_mask_ratio)
        self.scale = (float(scale[0]), float(scale[1]))
        self.native, self.min_side, self.full = bool(native), int(min_side), bool(full)

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = frames[0]
        box = random_box(rng, image.shape[0], image.shape[1], self.scale, NATIVE_RATIO if self.native else RATIO)
        h = w = self.side
        if self.native:
            aspect = abs(box[2] - box[0]) / max(box[3] - box[1], 1e-6)
            h, w = native_grid(rng, aspect, self.side, min(self.min_side, self.side))
        view = crop_resize(image, box, (h * self.patch, w * self.patch)).astype(np.float32) / 255.0
        patches, coords, grid = patchify(normalize(view, self.mean, self.std), self.patch)
        vis = drop_tokens(rng, len(patches), self.mask_ratio)
        keep_pos = np.zeros(len(vis), bool)
        keep_pos[drop_tokens(rng, len(vis), self.pos_mask_ratio, at_least=0)] = True
        out = {"patches": patches[vis], "coords": coords[vis], "keep_pos": keep_pos, "grid": grid}
        if self.full:
            out.update(full_patches=patches, full_coords=coords)
        return out


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------


def position_classes(coords: torch.Tensor, side: int) -> torch.Tensor:
    """(..., 2) (row, col) -> (...) class index ``row * side + col`` of the side x side lattice."""
    return coords[..., 0] * side + coords[..., 1]


def valid_classes(grid: torch.Tensor, side: int) -> torch.Tensor:
    """(M, 2) grids (h, w) -> (M, side * side) bool: the lattice cells inside each grid."""
    r = torch.arange(side, device=grid.device)
    return ((r[None, :, None] < grid[:, :1, None]) & (r[None, None, :] < grid[:, 1:, None])).reshape(len(grid), -1)


def smoothed_targets(coords: torch.Tensor, grid: torch.Tensor, side: int, sigma: float,
                     normalisation: str = "row") -> torch.Tensor:
    """DropPos's Gaussian-smoothed position targets.

    Args:
        coords: (M, 2) true (row, col) of M tokens; grid: (M, 2) their image's (h, w); side: lattice side G.
        sigma: smoothing width in patches; 0 gives one-hot targets.
        normalisation: ``"row"`` (each target sums to 1) or ``"official"`` (the code's broadcast: entry j divided
            by the sum of row j of the image's weight matrix).
    Returns:
        (M, G * G) float32 targets, 0 outside each image's grid.
    """
    valid = valid_classes(grid, side)
    if sigma <= 0:
        return F.one_hot(position_classes(coords, side), side * side).float()
    r = torch.arange(side, device=coords.device, dtype=torch.float32)
    # the Gaussian factorises over rows and columns: exp(-(dr^2 + dc^2) / s^2) = exp(-dr^2/s^2) exp(-dc^2/s^2)
    gr = torch.exp(-(coords[:, :1].float() - r[None]) ** 2 / sigma**2)  # (M, G)
    gc = torch.exp(-(coords[:, 1:].float() - r[None]) ** 2 / sigma**2)
    w = (gr[:, :, None] * gc[:, None, :]).reshape(len(coords), -1) * valid
    if normalisation == "row":
        return w / w.sum(-1, keepdim=True)
    if normalisation != "official":
        raise DensekitError(f"smoothing must be 'row' or 'official', got {normalisation!r}")
    # sum of row j (cell (jr, jc)) over the image's cells k: separable sums over k's rows and columns
    k = torch.arange(side, device=coords.device, dtype=torch.float32)
    kern = torch.exp(-(r[:, None] - k[None]) ** 2 / sigma**2)  # (G, G): cell index, k
    inside_r = (k[None] < grid[:, :1]).float()  # (M, G)
    inside_c = (k[None] < grid[:, 1:]).float()
    sr, sc = inside_r @ kern.T, inside_c @ kern.T  # (M, G): per-row / per-column sums
    return w / (sr[:, :, None] * sc[:, None, :]).reshape(len(coords), -1).clamp_min(1e-30)


# ----------------------------------------------------------------------------------------------------
# Sin-cos position embeddings (MAE's, which DropPos uses fixed)
# ----------------------------------------------------------------------------------------------------


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding: (h * w, dim); half the channels encode the row, half the column."""
    if dim % 4:
        raise DensekitError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    # MAE's grid puts the width coordinate first
    return torch.cat([axis(cols), axis(rows)], 1).float()


def set_sincos_positions(vit: ViTAdapter) -> None:
    """Overwrite the ViT's learned position embeddings with frozen 2-D sin-cos ones (prefix slots 0)."""
    pos = vit.model.pos_embed
    if pos is None:
        raise DensekitError("DropPos needs a ViT with position embeddings (pos_embed='learn')")
    h, w = vit.model.patch_embed.grid_size
    table = sincos_2d(pos.shape[-1], int(h), int(w))
    with torch.no_grad():
        pos.zero_()
        pos[0, pos.shape[1] - h * w :] = table.to(pos.dtype)
    pos.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------


class PositionDecoder(nn.Module):
    """Linear(D -> d), ``depth`` Transformer blocks without position embedding, LayerNorm, Linear(d -> G * G).

    forward(tokens (S, L, D), seg (S, L)) -> position logits (S, L, G * G); blocks attend within each image.
    """

    def __init__(self, in_dim: int, classes: int, dim: int = 512, depth: int = 2, heads: int = 16) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if dim % heads:
            raise DensekitError(f"decoder_dim {dim} is not divisible by decoder_heads {heads}")
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, classes)
        for m in self.modules():  # MAE's initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        mask = segment_attention_mask(seg)
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.pred(self.norm(x))


# ----------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------


class DropPos(Objective):
    """DropPos on a timm ViT, on packed sequences (see the module docstring).

    batch (from :meth:`collate`; S, S' sequences of lengths L, L'; B images):
        ``patches`` (S, L, 3 p p), ``coords`` (S, L, 2), ``keep_pos``/``seg``/``tok``/``is_prefix`` (S, L),
        ``grid`` (B, 2), ``num_images``; with ``attn_guide`` the full views as ``full_patches`` (S', L', 3 p p),
        ``full_coords``, ``full_seg``, ``full_is_prefix``... Returns ``loss``, ``acc1`` (the official weighted
        accuracy on dropped-position tokens), ``acc_dropped`` (unweighted) and ``sigma``.
    """

    name: ClassVar[str] = "droppos"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, mask_ratio: float = 0.75, pos_mask_ratio: float = 0.75,
                 sigma: float = 1.0, sigma_decay: bool = True, smoothing: str = "row", attn_guide: bool = True,
                 attn_temperature: float = 0.1, decoder_dim: int = 512, decoder_depth: int = 2,
                 decoder_heads: int = 16, size: int = 224, scale: tuple[float, float] = (0.2, 1.0),
                 native: bool = False, min_side: int = 4, seq_len: int = 0, full_seq_len: int = 0,
                 sincos: bool = True) -> None:
        super().__init__(backbone, mask_ratio=mask_ratio, pos_mask_ratio=pos_mask_ratio, sigma=sigma,
                         sigma_decay=sigma_decay, smoothing=smoothing, attn_guide=attn_guide,
                         attn_temperature=attn_temperature, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                         decoder_heads=decoder_heads, size=size, scale=scale, native=native, min_side=min_side,
                         seq_len=seq_len, full_seq_len=full_seq_len, sincos=sincos)
        self.vit = ViTAdapter(backbone)
        p, self.side = self.vit.patch_size, int(size) // self.vit.patch_size
        if not (0.0 <= mask_ratio < 1.0 and 0.0 < pos_mask_ratio <= 1.0):
            raise DensekitError(f"need 0 <= mask_ratio < 1 and 0 < pos_mask_ratio <= 1, got {mask_ratio}, "
                                f"{pos_mask_ratio}")
        if self.side < 2:
            raise DensekitError(f"DropPos needs a patch grid of at least 2x2: size {size} with patch {p}")
        if smoothing not in ("row", "official"):
            raise DensekitError(f"smoothing must be 'row' or 'official', got {smoothing!r}")
        if attn_guide and not self.vit.has_class_token:
            raise DensekitError("DropPos's attentive weights need the ViT's class token (or attn_guide=false)")
        prefix = self.vit.num_prefix_tokens
        vis = keep_count(self.side**2, mask_ratio)
        self.seq_len = int(seq_len) or 4 * (prefix + vis)
        self.full_seq_len = int(full_seq_len) or 4 * (prefix + self.side**2)
        if self.seq_len < prefix + vis or (attn_guide and self.full_seq_len < prefix + self.side**2):
            raise DensekitError(
                f"droppos: an image of {self.side}x{self.side} patches has {prefix + vis} visible and "
                f"{prefix + self.side**2} full tokens, more than the packed sequence lengths "
                f"hparams.seq_len={self.seq_len} / hparams.full_seq_len={self.full_seq_len}; raise them (0 packs 4 "
                f"images) or lower hparams.size")
        if sincos:
            set_sincos_positions(self.vit)
        self.mask_pos_token = nn.Parameter(torch.zeros(self.vit.dim))
        nn.init.normal_(self.mask_pos_token, std=0.02)
        self.decoder = PositionDecoder(self.vit.dim, self.side**2, decoder_dim, decoder_depth, decoder_heads)
        self.register_buffer("sigma_now", torch.tensor(float(sigma), dtype=torch.float64))
        self.mask_ratio, self.pos_mask_ratio = mask_ratio, pos_mask_ratio
        self.sigma0, self.sigma_decay = sigma, sigma_decay
        self.smoothing, self.attn_guide, self.attn_temperature = smoothing, attn_guide, attn_temperature
        self.size, self.scale, self.native, self.min_side = int(size), tuple(scale), bool(native), int(min_side)

    # -- data ----------------------------------------------------------------------------------------

    def transform(self) -> Transform:
        m = self.backbone.meta
        return DropPosTransform(m.mean, m.std, self.vit.patch_size, self.size, self.mask_ratio,
                                self.pos_mask_ratio, self.scale, self.native, self.min_side, self.attn_guide)

    def collate(self) -> PackCollate:
        prefix = self.vit.num_prefix_tokens
        streams = [Stream("", self.seq_len, 0, prefix, ("keep_pos",))]
        if self.attn_guide:
            streams.append(Stream("full_", self.full_seq_len, 0, prefix))
        return PackCollate(tuple(streams))

    # -- model ---------------------------------------------------------------------------------------

    def position_inputs(self, pos: torch.Tensor, keep_pos: torch.Tensor, is_patch: torch.Tensor) -> torch.Tensor:
        """What is added to each patch token for its position: (S, L, D). Its own embedding where ``keep_pos``,
        the learnable mask-position token at the other patch slots (so a dropped token carries no position),
        0 at prefix slots and padding."""
        token = self.mask_pos_token.to(pos.dtype).expand_as(pos)
        out = torch.where(keep_pos.unsqueeze(-1), pos, token)
        return out * is_patch.unsqueeze(-1).to(pos.dtype)

    @torch.no_grad()
    def attentive_weights(self, batch: dict[str, torch.Tensor], num_images: int) -> torch.Tensor:
        """(B, G * G) per image: softmax over its patches of cosine(CLS, patch) / T from a full forward."""
        seg, pref = batch["full_seg"], batch["full_is_prefix"]
        full = packed_forward(self.vit, batch, key="full_").float()
        first = pref & ((torch.cumsum(pref.long(), dim=1) - 1) % self.vit.num_prefix_tokens == 0)
        cls = segment_sum(full, seg, num_images, select=first)  # the CLS token (first prefix slot)
        sim = F.cosine_similarity(full, cls[seg.clamp_min(0)], dim=-1)
        patch = (seg >= 0) & ~pref
        w = segment_softmax(sim / self.attn_temperature, seg, num_images, select=patch)
        table = w.new_zeros(num_images, self.side**2)
        table[seg[patch], position_classes(batch["full_coords"][patch], self.side)] = w[patch]
        return table

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        seg, is_prefix, coords, keep_pos = batch["seg"], batch["is_prefix"], batch["coords"], batch["keep_pos"]
        b = int(batch["num_images"])
        is_patch = (seg >= 0) & ~is_prefix
        content, pos = packed_embed(self.vit, batch["patches"], coords, seg, is_prefix, batch["grid"])
        tokens = packed_blocks(self.vit, content + self.position_inputs(pos, keep_pos, is_patch), seg)
        logits = self.decoder(tokens, seg)[is_patch].float()  # (M, G * G) for the M visible tokens
        img, xy, grid = seg[is_patch], coords[is_patch], batch["grid"][seg[is_patch]]
        labels = position_classes(xy, self.side)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            valid = valid_classes(grid, self.side)
            log_prob = torch.log_softmax(logits.masked_fill(~valid, -torch.inf), dim=-1)
            target = smoothed_targets(xy, grid, self.side, float(self.sigma_now), self.smoothing)
            ce = -torch.where(valid, target * log_prob, torch.zeros_like(log_prob)).sum(-1)  # (M,)
        dropped = (~keep_pos[is_patch]).float()
        weight = dropped
        if self.attn_guide:
            attn = self.attentive_weights(batch, b)[img, labels]  # at the visible tokens
            attn = attn / torch.zeros(b, device=attn.device, dtype=attn.dtype).index_add(0, img, attn)[img]
            weight = dropped * attn
        total = dist.all_reduce_sum(weight.sum().detach()).clamp_min(1e-12)
        loss = (weight * ce).sum() / total * dist.world_size()
        with torch.no_grad():
            hit = (logits.argmax(-1) == labels).float()
            acc1 = (hit * weight).sum() / weight.sum().clamp_min(1e-12)
            acc_dropped = (hit * dropped).sum() / dropped.sum().clamp_min(1.0)
        return {"loss": loss, "acc1": acc1, "acc_dropped": acc_dropped, "sigma": self.sigma_now.float()}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        if self.sigma_decay:
            self.sigma_now.fill_(self.sigma0 * max(0.0, 1.0 - (step + 1) / max(1, max_steps)))


__all__ = ["DropPos", "DropPosTransform", "PositionDecoder", "set_sincos_positions", "sincos_2d",
           "smoothed_targets", "valid_classes", "position_classes"]
