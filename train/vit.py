"""Token access to a timm Vision Transformer for training: prefix (CLS, registers) and patch tokens, and the parts.

serve's :class:`~densekit.serve.backbones.TimmViTDense` is the inference contract: it drops the prefix tokens and
returns the patch grid. ViT objectives need more (CrIBo's CLS token, DropPos's patch subsets with their own
position embeddings, SelfPatch's raw last-block tokens, packed sequences with an attention mask), so
:class:`ViTAdapter` reads the same timm ``VisionTransformer`` (``backbone.body.model``) piece by piece. It holds a
reference, not a copy, and is a plain object (not an ``nn.Module``): the parameters stay registered once, under the
backbone, and ``state_dict`` keys do not change. Build a new adapter for a deep-copied teacher.

The pieces compose to timm's ``forward_features`` exactly (tested)::

    patches, (h, w) = vit.embed(x)                        # (B, N, D), N = h * w
    seq = vit.with_prefix(vit.add_pos(patches, h, w))     # (B, P + N, D), position embeddings as timm adds them
    out = vit.norm(vit.run_blocks(vit.pre_blocks(seq)))   # == model.forward_features(x)

``tokens(x)`` does all of it and splits ``out`` into ``(prefix (B, P, D), patches (B, N, D), (h, w))``.
"""

from __future__ import annotations

import torch
from torch import nn

from densekit.serve import packing as _packing
from densekit.serve.backbones import DenseBackbone, TimmViTDense
from densekit.serve.errors import DensekitError

# the ViT parts (position resampling, prefix tokens, masked blocks) live in serve, which packs at inference too
segment_attention_mask = _packing.segment_attention_mask


class ViTAdapter:
    """The parts of a timm ``VisionTransformer`` inside a densekit backbone.

    Args:
        backbone: a :class:`DenseBackbone` whose body is a timm ViT (``timm:vit_*``, ``timm:deit_*``...).

    Raises:
        DensekitError: the backbone is not a timm ViT (a CNN, pixels...), for objectives that need tokens.

    Attributes:
        model: the timm ``VisionTransformer`` (shared with the backbone).
        patch_size: p; the patch grid of an (H, W) input is (H / p, W / p).
        dim: D, the token width.
        num_prefix_tokens: P, class token plus register tokens (0 for ``class_token=False`` without registers).
    """

    def __init__(self, backbone: nn.Module) -> None:
        body = getattr(backbone, "body", None)
        name = getattr(getattr(backbone, "meta", None), "name", type(backbone).__name__)
        if not isinstance(backbone, DenseBackbone) or not isinstance(body, TimmViTDense):
            raise DensekitError(f"this objective needs a timm ViT backbone (e.g. timm:vit_tiny_patch16_224), "
                                f"got {name!r}")
        model = body.model
        missing = [a for a in ("patch_embed", "blocks", "norm", "pos_embed", "cls_token") if not hasattr(model, a)]
        if missing:
            raise DensekitError(f"backbone {name!r} is a timm model without {', '.join(missing)}: not a plain ViT")
        self.model = model
        self.patch_size = int(body.patch)
        self.dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    # -- the parts ---------------------------------------------------------------------------------------

    @property
    def cls_token(self) -> nn.Parameter | None:
        """(1, 1, D) learnable class token, or None (``class_token=False``)."""
        return self.model.cls_token

    @property
    def blocks(self) -> nn.Sequential:
        """The transformer blocks (timm ``Block`` s: ``block(x, attn_mask=None)``)."""
        return self.model.blocks

    @property
    def has_class_token(self) -> bool:
        return self.model.cls_token is not None

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(h, w) patch grid of an input (B, 3, H, W); H and W must be multiples of p."""
        hh, ww = int(x.shape[-2]), int(x.shape[-1])
        p = self.patch_size
        if hh % p or ww % p:
            raise DensekitError(f"input {hh}x{ww} is not a multiple of the patch size {p}")
        return hh // p, ww // p

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding without position: (B, 3, H, W) -> ((B, N, D) row-major tokens, (h, w))."""
        h, w = self.grid_size(x)
        y = self.model.patch_embed(x)
        return y.reshape(y.shape[0], h * w, y.shape[-1]), (h, w)

    def _prefix_pos_len(self) -> int:
        return _packing.prefix_pos_len(self.model)

    def pos_for(self, h: int, w: int) -> torch.Tensor | None:
        """Patch position embeddings for an (h, w) grid: (1, h * w, D), resampled from the learned grid exactly as
        timm does for ``dynamic_img_size`` (bicubic, antialiased; unchanged at the native grid). None when the
        model has no position embedding (``pos_embed='none'``)."""
        return _packing.pos_for(self.model, h, w)

    def prefix_pos(self) -> torch.Tensor | None:
        """(1, P, D) position embeddings of the prefix tokens, or None (``no_embed_class``, no prefix, no pos)."""
        return _packing.prefix_pos(self.model)

    def add_pos(self, patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``patches`` (B, h * w, D) plus their position embeddings (a no-op without position embedding)."""
        pos = self.pos_for(h, w)
        return patches if pos is None else patches + pos

    def prefix_tokens(self, batch: int) -> torch.Tensor | None:
        """(B, P, D) class and register tokens with their position embeddings (if the model gives them one), or
        None when P = 0."""
        return _packing.prefix_tokens(self.model, batch)

    def with_prefix(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) positioned patch tokens -> (B, P + N, D) with the prefix tokens in front."""
        prefix = self.prefix_tokens(patches.shape[0])
        return patches if prefix is None else torch.cat([prefix, patches], dim=1)

    def pre_blocks(self, seq: torch.Tensor) -> torch.Tensor:
        """What timm applies between the position embedding and the blocks: position dropout, patch dropout,
        pre-norm (identities for a plain ViT in eval mode)."""
        return _packing.pre_blocks(self.model, seq)

    def run_blocks(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer blocks on a token sequence.

        Args:
            x: (B, S, D) tokens.
            attn_mask: None, or a mask broadcastable to (B, heads, S, S): bool (True = may attend) or additive
                float, the semantics of ``F.scaled_dot_product_attention`` (timm's ``Attention``); (B, S, S) is
                taken as one mask per sequence for every head. E.g. :func:`segment_attention_mask`.
        Returns:
            (B, S, D), before the final norm.
        """
        return _packing.run_blocks(self.model, x, attn_mask)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm ``forward_features`` applies (an identity when timm moves it to ``fc_norm``, as with
        ``class_token=False, global_pool='avg'``)."""
        return self.model.norm(x)

    # -- whole forwards ----------------------------------------------------------------------------------

    def sequence(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The token sequence that enters the blocks: (B, 3, H, W) -> ((B, P + N, D), (h, w))."""
        patches, (h, w) = self.embed(x)
        return self.pre_blocks(self.with_prefix(self.add_pos(patches, h, w))), (h, w)

    def tokens(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *, norm: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> (prefix (B, P, D), patches (B, N, D), (h, w)): timm's ``forward_features`` split at P.

        ``norm=False`` returns the last block's raw tokens (SelfPatch reads those). The patches are what the
        backbone's ``forward`` turns into its (B, D, h, w) grid (:meth:`to_grid`).
        """
        seq, hw = self.sequence(x)
        out = self.run_blocks(seq, attn_mask)
        if norm:
            out = self.norm(out)
        p = self.num_prefix_tokens
        return out[:, :p], out[:, p:], hw

    @staticmethod
    def to_grid(patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h * w, D) row-major tokens -> (B, D, h, w)."""
        b, n, d = patches.shape
        if n != h * w:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
        return patches.transpose(1, 2).reshape(b, d, h, w)


__all__ = ["ViTAdapter", "segment_attention_mask"]
