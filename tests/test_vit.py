"""train/vit.py (token access to timm ViTs) and the timm keyword arguments stored in the model contract."""

from __future__ import annotations

import pytest
import torch

from densekit.serve.backbones import build_backbone
from densekit.serve.checkpoint import load_checkpoint, save_checkpoint
from densekit.serve.errors import DensekitError
from densekit.train.vit import ViTAdapter, segment_attention_mask

VIT = "timm:vit_tiny_patch16_224"
SMALL = {"depth": 2, "img_size": 64}


def _vit(**extra):
    return build_backbone(VIT, seed=0, kwargs={**SMALL, **extra}).eval()


def test_tokens_split_forward_features_and_patches_are_the_backbone_grid():
    torch.manual_seed(0)
    bb = _vit()
    vit = ViTAdapter(bb)
    x = torch.randn(2, 3, 64, 96)  # not the native 4x4 grid: position embeddings are resampled
    prefix, patches, (h, w) = vit.tokens(x)
    assert (h, w) == (4, 6) and prefix.shape == (2, 1, 192) and patches.shape == (2, 24, 192)
    ref = bb.body.model.forward_features(x)
    torch.testing.assert_close(torch.cat([prefix, patches], 1), ref, rtol=0, atol=0)
    torch.testing.assert_close(vit.to_grid(patches, h, w), bb(x), rtol=0, atol=0)
    # the pieces compose to the same thing
    emb, hw = vit.embed(x)
    seq = vit.pre_blocks(vit.with_prefix(vit.add_pos(emb, *hw)))
    torch.testing.assert_close(vit.norm(vit.run_blocks(seq)), ref, rtol=0, atol=0)
    # norm=False is the last block's raw output
    _, raw, _ = vit.tokens(x, norm=False)
    assert not torch.allclose(raw, patches)


def test_class_token_free_vit_has_no_prefix_and_no_final_norm():
    bb = _vit(class_token=False, global_pool="avg")
    vit = ViTAdapter(bb)
    assert vit.num_prefix_tokens == 0 and vit.cls_token is None and vit.prefix_tokens(2) is None
    x = torch.randn(1, 3, 64, 64)
    prefix, patches, _ = vit.tokens(x)
    assert prefix.shape == (1, 0, 192)
    torch.testing.assert_close(patches, vit.tokens(x, norm=False)[1])  # timm moved the norm to fc_norm


def test_block_diagonal_mask_isolates_two_images_in_one_sequence():
    torch.manual_seed(1)
    vit = ViTAdapter(_vit())
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 64)
    sa, _ = vit.sequence(a)
    sb, _ = vit.sequence(b)
    packed = torch.cat([sa, sb], dim=1)  # (1, 17 + 9, D)
    seg = torch.tensor([[0] * sa.shape[1] + [1] * sb.shape[1]])
    out = vit.run_blocks(packed, segment_attention_mask(seg))
    torch.testing.assert_close(out[:, : sa.shape[1]], vit.run_blocks(sa), rtol=0, atol=2e-6)
    torch.testing.assert_close(out[:, sa.shape[1]:], vit.run_blocks(sb), rtol=0, atol=2e-6)
    # a (B, S, S) mask is taken for every head, and without a mask the images do mix
    out3 = vit.run_blocks(packed, segment_attention_mask(seg)[:, 0])
    torch.testing.assert_close(out3, out, rtol=0, atol=0)
    mixed = vit.run_blocks(packed)
    assert (mixed[:, : sa.shape[1]] - out[:, : sa.shape[1]]).abs().max() > 1e-3


def test_adapter_refuses_non_vit_backbones():
    for name in ("resnet18", "pixels", "timm:resnet18"):
        with pytest.raises(DensekitError, match="needs a timm ViT"):
            ViTAdapter(build_backbone(name))


def test_timm_kwargs_rebuild_the_same_architecture_from_a_checkpoint(tmp_path):
    kw = {"depth": 3, "patch_size": 8, "img_size": 64, "drop_path_rate": 0.1, "class_token": False,
          "global_pool": "avg", "no_embed_class": True}
    bb = build_backbone(VIT, seed=3, kwargs=kw)
    assert bb.meta.arch["kwargs"] == dict(sorted(kw.items())) and bb.meta.stride == 8
    assert len(bb.body.model.blocks) == 3 and bb.body.model.pos_embed.shape == (1, 64, 192)
    save_checkpoint(bb, tmp_path / "vit.safetensors")
    back = load_checkpoint(tmp_path / "vit.safetensors")
    assert back.meta.arch == bb.meta.arch
    sd, sd2 = bb.state_dict(), back.state_dict()
    assert list(sd) == list(sd2) and all(sd[k].shape == sd2[k].shape for k in sd)
    x = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(back(x), bb.eval()(x), rtol=0, atol=0)
    # without kwargs the arch is exactly what it was before kwargs existed (old checkpoints keep loading)
    assert build_backbone(VIT).meta.arch == {"family": "timm", "model_name": "vit_tiny_patch16_224", "decoder": False}


def test_bad_timm_kwargs_are_one_line_errors():
    with pytest.raises(DensekitError, match="does not take kwargs"):
        build_backbone(VIT, kwargs={"dpeth": 2})
    with pytest.raises(DensekitError, match="only for timm"):
        build_backbone("resnet18", kwargs={"depth": 2})
    with pytest.raises(DensekitError, match="set by densekit"):
        build_backbone(VIT, kwargs={"pretrained": True})
