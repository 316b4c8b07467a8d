"""NaViT-style packing at inference: several images of their own size in one sequence, one forward.

Dehghani et al., "Patch n' Pack: NaViT" (2023). The model-side core lives here, on the ground floor, because
serving (:meth:`FeatureExtractor.batch(frames, pack=True) <densekit.serve.extractor.FeatureExtractor.batch>`) and
export (:mod:`densekit.export.packed`) need it as much as training does; :mod:`densekit.train.packing` and
:mod:`densekit.train.vit` import it from here (their names stay importable there).

* **Layout** (numpy only, no torch): :func:`patchify` cuts a (C, H, W) image into flattened patches with their
  (row, col); :func:`first_fit` places items into sequences of length L; :func:`pack_layout` turns that into the
  per-slot arrays ``seg`` (image index, -1 = padding), ``tok`` (index in the image's token list, -1 for prefix
  slots and padding) and ``is_prefix``; :func:`pack_images` does all of it for a list of images and
  :func:`unpack_grids` turns packed (S, L, D) tokens back into each image's (D, h, w) map.
* **Model** (torch, imported inside the functions, so the layout half runs without torch): the parts of a timm
  ``VisionTransformer`` (:func:`pos_for`, :func:`prefix_tokens`, :func:`pre_blocks`, :func:`run_blocks`),
  :func:`segment_attention_mask` (block-diagonal: a token sees only its own image, padding only padding),
  :func:`packed_embed` (the patch-embedding conv as a linear map of the flattened patch, each image's position
  embeddings resampled to its grid exactly as timm's ``dynamic_img_size`` forward does), :func:`packed_blocks`,
  :func:`packed_tokens`, and :func:`packed_features`, the extractor's path. Each takes "the ViT" in any of its
  wrappers (:func:`vit_model`): a DenseBackbone, its ``TimmViTDense`` body, a ``ViTAdapter`` or the timm model.

A packed image gives the tokens it gives alone (the conv written as a matmul, so up to float rounding).

Measured with benchmarks/packing.py (issue 12 item 3; lscpu "AMD EPYC", 1 torch thread on a shared 2-core machine at load average ~7,
medians of 7 interleaved rounds; ViT-Tiny/16, 12 blocks, random init; ``FeatureExtractor`` end to end, one frame
at a time vs ``batch(frames, pack=True)``): 6 small frames (64x96 to 112x112, 17-50 tokens, 184 in all) 231 ms vs
93 ms, 2.5x faster (one 184-token sequence: 2.3x); 6 frames of 96x320 to 224x224 (65-197 tokens, 858 in all)
560 ms vs 604 ms, 0.93x (1.10x in an earlier run; one 858-token sequence 0.90x, L = 256 0.70x): once a frame
fills ~200 tokens, the L^2 attention over the packed sequence eats the batching gain on a CPU. Packed vs alone
max |diff| 5e-7 on the unit-norm features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from densekit.serve.errors import DensekitError

if TYPE_CHECKING:
    import torch
    from torch import nn

# ----------------------------------------------------------------------------------------------------
# Layout (numpy)
# ----------------------------------------------------------------------------------------------------


def patchify(image: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a (C, H, W) float32 view (H, W multiples of ``patch``) into raster-ordered patches.

    Returns:
        patches (h*w, C*p*p) float32 flattened in (c, dy, dx) order, the order of a patch-embedding conv's
        weight (D, C, p, p); coords (h*w, 2) int64 (row, col); grid (2,) int64 (h, w).
    """
    c, hh, ww = image.shape
    if hh % patch or ww % patch or hh < patch or ww < patch:
        raise DensekitError(f"a {ww}x{hh} view does not split into {patch}x{patch} patches")
    h, w = hh // patch, ww // patch
    x = image.reshape(c, h, patch, w, patch).transpose(1, 3, 0, 2, 4).reshape(h * w, c * patch * patch)
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return np.ascontiguousarray(x, np.float32), np.stack([rows, cols], 1), np.array([h, w], np.int64)


def first_fit(lengths: Sequence[int], seq_len: int, num_seqs: int = 0) -> list[tuple[int, int]]:
    """Greedy first-fit-decreasing packing: the (sequence, offset) of each item.

    Items are placed longest first (ties: lower index first), each into the first sequence with room, so the
    result is a pure function of ``lengths``. Within a sequence, items sit in placement order.

    Args:
        lengths: tokens per item (prefix slots included).
        seq_len: L, the length of every sequence.
        num_seqs: S, a fixed number of sequences (0: as many as needed).
    Raises:
        DensekitError: an item longer than ``seq_len``; more than ``num_seqs`` sequences needed.
    """
    if seq_len < 1:
        raise DensekitError(f"the packed sequence length must be >= 1, got {seq_len}")
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        i = too_long[0]
        raise DensekitError(
            f"image {i} has {lengths[i]} tokens, more than the packed sequence length {seq_len} "
            f"({len(too_long)} such image(s)); raise the sequence length or lower the resolution"
        )
    fill: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        s = next((j for j, used in enumerate(fill) if used + lengths[i] <= seq_len), len(fill))
        if s == len(fill):
            fill.append(0)
        where[i] = (s, fill[s])
        fill[s] += lengths[i]
    if num_seqs and len(fill) > num_seqs:
        raise DensekitError(f"{len(lengths)} images ({sum(lengths)} tokens) need {len(fill)} packed sequences of "
                            f"{seq_len}, more than the {num_seqs} allowed")
    return where


def pack_layout(counts: Sequence[int], seq_len: int, prefix: int = 1, num_seqs: int = 0
                ) -> tuple[list[tuple[int, int]], dict[str, np.ndarray]]:
    """Where each image's ``prefix`` slots and ``counts[i]`` tokens go in (S, L) sequences (:func:`first_fit`).

    Returns:
        where: (sequence, offset) of each image's first (prefix) slot; its tokens start ``prefix`` later.
        arrays: ``seg`` (S, L) int64 image index (-1 = padding), ``tok`` (S, L) int64 index in the image's token
        list (-1 for prefix slots and padding), ``is_prefix`` (S, L) bool.
    """
    where = first_fit([int(n) + prefix for n in counts], seq_len, num_seqs)
    n_seq = max((s for s, _ in where), default=-1) + 1
    seg = np.full((n_seq, seq_len), -1, np.int64)
    tok = np.full((n_seq, seq_len), -1, np.int64)
    is_prefix = np.zeros((n_seq, seq_len), bool)
    for i, ((s, o), n) in enumerate(zip(where, counts)):
        seg[s, o : o + prefix + n] = i
        is_prefix[s, o : o + prefix] = True
        tok[s, o + prefix : o + prefix + n] = np.arange(n)
    return where, {"seg": seg, "tok": tok, "is_prefix": is_prefix}


def pack_images(images: Sequence[np.ndarray], patch: int, prefix: int = 1, seq_len: int | None = None
                ) -> dict[str, np.ndarray]:
    """(C, H_i, W_i) float32 images -> one packed batch (what :func:`packed_tokens` and the packed ONNX take).

    Args:
        patch: p; every H_i, W_i must be a multiple of it.
        prefix: P, the ViT's prefix slots per image (CLS, registers).
        seq_len: L; None puts every image into one sequence (L = the sum of their tokens).
    Returns:
        ``patches`` (S, L, C p p) float32 (0 at prefix slots and padding), ``coords`` (S, L, 2) int64 (row, col;
        0 elsewhere), ``seg``, ``tok``, ``is_prefix`` (S, L) as :func:`pack_layout`, ``grid`` (B, 2) int64 (h, w).
    """
    if not images:
        raise DensekitError("no images to pack")
    cut = [patchify(np.asarray(im, np.float32), patch) for im in images]
    counts = [len(p) for p, _, _ in cut]
    length = sum(counts) + prefix * len(counts) if seq_len is None else int(seq_len)
    where, out = pack_layout(counts, length, prefix)
    s_, l_ = out["seg"].shape
    patches = np.zeros((s_, l_, cut[0][0].shape[1]), np.float32)
    coords = np.zeros((s_, l_, 2), np.int64)
    for (s, o), (p, c, _) in zip(where, cut):
        patches[s, o + prefix : o + prefix + len(p)] = p
        coords[s, o + prefix : o + prefix + len(p)] = c
    out.update(patches=patches, coords=coords, grid=np.stack([g for _, _, g in cut]))
    return out


def unpack_grids(tokens: np.ndarray, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Packed final tokens (S, L, D) -> each image's (D, h, w) patch map (prefix slots and padding left out)."""
    seg, tok, grid = np.asarray(batch["seg"]), np.asarray(batch["tok"]), np.asarray(batch["grid"])
    out = []
    for i, (h, w) in enumerate(grid.tolist()):
        sel = (seg == i) & (tok >= 0)
        order = np.argsort(tok[sel], kind="stable")  # raster order (it already is, as packed)
        out.append(np.ascontiguousarray(tokens[sel][order].reshape(h, w, -1).transpose(2, 0, 1)))
    return out


# ----------------------------------------------------------------------------------------------------
# Model (torch): the parts of a timm VisionTransformer
# ----------------------------------------------------------------------------------------------------

_VIT_PARTS = ("patch_embed", "blocks", "norm", "pos_embed", "cls_token", "num_prefix_tokens")


def vit_model(vit: Any) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``vit`` (a DenseBackbone, its body, a ViTAdapter or the model).

    Raises:
        DensekitError: it is not a plain timm ViT (a CNN, pixels...): only ViTs can be packed.
    """
    model = vit
    for attr in ("body", "model"):  # DenseBackbone -> TimmViTDense -> VisionTransformer; ViTAdapter -> model
        if not all(hasattr(model, a) for a in _VIT_PARTS) and hasattr(model, attr):
            model = getattr(model, attr)
    if not all(hasattr(model, a) for a in _VIT_PARTS):
        name = getattr(getattr(vit, "meta", None), "name", type(vit).__name__)
        raise DensekitError(f"packing needs a timm ViT backbone (e.g. timm:vit_tiny_patch16_224); {name!r} is not "
                            f"one (CNNs and pixels cannot pack)")
    return model


def patch_size(vit: Any) -> int:
    """p of the ViT's square patches."""
    size = vit_model(vit).patch_embed.patch_size
    return int(size if isinstance(size, int) else size[0])


def prefix_pos_len(vit: Any) -> int:
    """Prefix tokens that carry a position embedding (0 with ``no_embed_class``)."""
    model = vit_model(vit)
    return 0 if model.no_embed_class else int(model.num_prefix_tokens)


def pos_for(vit: Any, h: int, w: int) -> torch.Tensor | None:
    """Patch position embeddings for an (h, w) grid: (1, h * w, D), resampled from the learned grid exactly as
    timm does for ``dynamic_img_size`` (bicubic, antialiased; unchanged at the native grid). None when the model
    has no position embedding (``pos_embed='none'``)."""
    from timm.layers import resample_abs_pos_embed

    model = vit_model(vit)
    if model.pos_embed is None:
        return None
    k = prefix_pos_len(model)
    full = resample_abs_pos_embed(model.pos_embed, new_size=(h, w), old_size=model.patch_embed.grid_size,
                                  num_prefix_tokens=k)
    return full[:, k:]


def prefix_pos(vit: Any) -> torch.Tensor | None:
    """(1, P, D) position embeddings of the prefix tokens, or None (``no_embed_class``, no prefix, no pos)."""
    model = vit_model(vit)
    k = prefix_pos_len(model)
    if model.pos_embed is None or k == 0:
        return None
    return model.pos_embed[:, :k]


def prefix_tokens(vit: Any, batch: int) -> torch.Tensor | None:
    """(B, P, D) class and register tokens with their position embeddings (if the model gives them one), or None
    when P = 0."""
    import torch

    model = vit_model(vit)
    parts = [t.expand(batch, -1, -1) for t in (model.cls_token, getattr(model, "reg_token", None)) if t is not None]
    if not parts:
        return None
    prefix = torch.cat(parts, dim=1)
    pos = prefix_pos(model)
    return prefix if pos is None else prefix + pos


def pre_blocks(vit: Any, seq: torch.Tensor) -> torch.Tensor:
    """What timm applies between the position embedding and the blocks: position dropout, patch dropout, pre-norm
    (identities for a plain ViT in eval mode)."""
    m = vit_model(vit)
    return m.norm_pre(m.patch_drop(m.pos_drop(seq)))


def run_blocks(vit: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer blocks on (B, S, D) tokens -> (B, S, D), before the final norm.

    ``attn_mask``: None, or broadcastable to (B, heads, S, S), bool (True = may attend) or additive float, the
    semantics of ``F.scaled_dot_product_attention`` (timm's ``Attention``); (B, S, S) is taken as one mask per
    sequence for every head. E.g. :func:`segment_attention_mask`.
    """
    model = vit_model(vit)
    if attn_mask is None:
        return model.blocks(x)
    if attn_mask.ndim == 3:
        attn_mask = attn_mask.unsqueeze(1)
    for blk in model.blocks:
        x = blk(x, attn_mask=attn_mask)
    return x


def segment_attention_mask(seg: torch.Tensor) -> torch.Tensor:
    """Block-diagonal attention mask for sequences holding several images.

    Args:
        seg: (B, S) integer segment id of every token (tokens of one image share an id; padding uses its own id,
            e.g. -1, so padding attends only to padding and no row of the mask is empty).
    Returns:
        (B, 1, S, S) bool, True where token i may attend to token j (same segment): the form timm's ``Block``
        and ``F.scaled_dot_product_attention`` take, broadcast over heads.
    """
    if seg.ndim != 2:
        raise ValueError(f"seg must be (B, S), got shape {tuple(seg.shape)}")
    return (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)


def packed_content(vit: Any, patches: torch.Tensor, seg: torch.Tensor, is_prefix: torch.Tensor) -> torch.Tensor:
    """(S, L, D) token content without patch positions: the patch embedding (its conv as a linear map of the
    flattened (S, L, C p p) patch) at patch slots, prefix tokens (with their position, if any) at prefix slots, 0 at
    padding. The packed ONNX graph shares this (it has no data-dependent control flow)."""
    import torch

    model = vit_model(vit)
    proj = model.patch_embed.proj
    w = proj.weight.reshape(proj.weight.shape[0], -1)
    content = model.patch_embed.norm(torch.nn.functional.linear(patches, w, proj.bias))
    is_patch = (seg >= 0) & ~is_prefix
    content = content * is_patch.unsqueeze(-1).to(content.dtype)
    pref = prefix_tokens(model, 1)
    if pref is not None:
        pref = pref[0].to(content.dtype)
        # every image has the same P prefix slots in front of its tokens: the k-th is (prefix slots so far) mod P
        k = (torch.cumsum(is_prefix.long(), dim=1) - 1).clamp_min(0) % pref.shape[0]
        content = torch.where(is_prefix.unsqueeze(-1), pref[k], content)
    return content


def packed_embed(vit: Any, patches: torch.Tensor, coords: torch.Tensor, seg: torch.Tensor,
                 is_prefix: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token content and position embeddings of a packed batch, kept apart (DropPos swaps positions).

    The position embeddings are the ViT's own, resampled to each image's grid as its grid forward does
    (:func:`pos_for`), so an image packed with others gives the tokens it gives alone.

    Args:
        vit: the ViT (see :func:`vit_model`).
        patches: (S, L, 3 p p) flattened patches; coords (S, L, 2) (row, col); seg, is_prefix (S, L);
            grid (B, 2) each image's full patch grid (h, w), which picks its position embeddings.
    Returns:
        content (S, L, D) (:func:`packed_content`); pos (S, L, D): patch position embeddings at patch slots, 0
        elsewhere.
    """
    import torch

    content = packed_content(vit, patches, seg, is_prefix)
    is_patch = (seg >= 0) & ~is_prefix
    pos = content.new_zeros(content.shape)
    img = seg.clamp_min(0)
    for h, w_ in torch.unique(grid, dim=0).tolist():
        table = pos_for(vit, int(h), int(w_))
        if table is None:  # pos_embed='none'
            break
        sel = is_patch & (grid[img, 0] == h) & (grid[img, 1] == w_)
        pos[sel] = table[0].to(content.dtype)[coords[..., 0][sel] * w_ + coords[..., 1][sel]]
    return content, pos


def packed_blocks(vit: Any, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Pre-block ops, the blocks under the block-diagonal mask, final norm: (S, L, D) -> (S, L, D)."""
    return vit_model(vit).norm(run_blocks(vit, pre_blocks(vit, x), segment_attention_mask(seg)))


def packed_tokens(vit: Any, patches: torch.Tensor, coords: torch.Tensor, seg: torch.Tensor,
                  is_prefix: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The packed forward: inputs as :func:`packed_embed` -> (S, L, D) final tokens (prefix slots included)."""
    content, pos = packed_embed(vit, patches, coords, seg, is_prefix, grid)
    return packed_blocks(vit, content + pos, seg)


def packed_features(vit: Any, images: Sequence[np.ndarray], seq_len: int | None = None,
                    device: Any = "cpu") -> list[np.ndarray]:
    """Normalised (3, H_i, W_i) float32 images -> each image's (D, H_i / p, W_i / p) float32 patch map, from one
    packed forward of (S, L) sequences under ``inference_mode``; not L2-normalised.

    ``seq_len``: L; None is the longest image's tokens: attention costs L^2 per sequence, and on a CPU at
    ViT-Tiny width that beat both a fixed L = 256 and one sequence holding everything (module docstring).
    """
    import torch

    model = vit_model(vit)
    p, prefix = patch_size(model), int(model.num_prefix_tokens)
    if seq_len is None:
        seq_len = max(im.shape[-2] // p * (im.shape[-1] // p) + prefix for im in images)
    batch = pack_images(images, p, prefix, seq_len)
    names = ("patches", "coords", "seg", "is_prefix", "grid")
    with torch.inference_mode():
        args = [torch.from_numpy(batch[k]).to(device) for k in names]
        tokens = packed_tokens(model, *args).float().cpu().numpy()
    return unpack_grids(tokens, batch)


__all__ = [
    "first_fit", "pack_images", "pack_layout", "packed_blocks", "packed_content", "packed_embed",
    "packed_features", "packed_tokens", "patch_size", "patchify", "pos_for", "pre_blocks", "prefix_pos",
    "prefix_pos_len", "prefix_tokens", "run_blocks", "segment_attention_mask", "unpack_grids", "vit_model",
]
