"""Backbones: shapes and strides, seeding, the pretrained EfficientNet-Lite0 weights, name handling."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import (
    BUILTIN_NAMES,
    FAMILIES,
    LITE_MEAN,
    LITE_STD,
    BackboneFamily,
    DenseBackbone,
    DenseBody,
    StageInfo,
    build_backbone,
    build_lite0_classifier,
    default_arch,
    register_family,
)
from densekit.serve.errors import DensekitError
from densekit.serve.loader import load_backbone

VIT = "timm:vit_tiny_patch16_224"


@functools.lru_cache(maxsize=None)
def cached(name: str, decoder: bool = False) -> DenseBackbone:
    return build_backbone(name, decoder=decoder)


def run(model: DenseBackbone, h: int, w: int, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return model(torch.randn(batch, 3, h, w, generator=gen))


@pytest.mark.parametrize(
    ("name", "decoder", "stride", "dim"),
    [
        ("resnet18", False, 8, 256),
        ("resnet18", True, 8, 256),
        ("efficientnet_lite0", False, 8, 80),
        ("pixels", False, 8, 192),
        (VIT, False, 16, 192),
        ("timm:resnet18", False, 32, 512),
    ],
)
@pytest.mark.parametrize("size", [(64, 96), (120, 200)])
def test_shapes_and_strides(name: str, decoder: bool, stride: int, dim: int, size: tuple[int, int]) -> None:
    model = cached(name, decoder)
    meta = model.meta
    assert (meta.name, meta.stride, meta.dim) == (name, stride, dim)
    assert meta.arch["decoder"] is decoder
    assert meta.input_multiple % meta.stride == 0
    # sizes that are not multiples get rounded down, as the extractor does
    h, w = (s // meta.input_multiple * meta.input_multiple for s in size)
    out = run(model, h, w)
    assert out.shape == (2, dim, h // stride, w // stride)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


STAGE_CASES = [
    ("resnet18", False), ("resnet18", True), ("efficientnet_lite0", False), ("pixels", False), (VIT, False),
    ("timm:resnet18", False),
]


@pytest.mark.parametrize(("name", "decoder"), STAGE_CASES)
def test_stage_info_matches_forward_stages(name: str, decoder: bool) -> None:
    """Every family: one tensor per StageInfo with its channels and stride; the last stage is the output."""
    model = cached(name, decoder)
    assert isinstance(model.body, DenseBody)
    info = model.stage_info
    assert info and all(isinstance(i, StageInfo) for i in info) and len({i.name for i in info}) == len(info)
    m = model.meta.input_multiple
    h, w = 2 * m, 3 * m
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        stages, out = model.forward_stages(x), model(x)
    assert [tuple(t.shape) for t in stages] == [(2, i.channels, h // i.stride, w // i.stride) for i in info]
    assert torch.equal(stages[-1], out)
    assert (info[-1].channels, info[-1].stride) == (model.meta.dim, model.meta.stride)
    assert max(i.stride for i in info) == m


def test_resnet_stages_are_its_layers_and_last_stops_early() -> None:
    """What hiergroup and PooDLe read: layer1..4 as the modules compute them, the decoder last, ``last=`` stops."""
    model = cached("resnet18", True)
    body = model.body
    assert [i.name for i in model.stage_info] == ["layer1", "layer2", "layer3", "layer4", "decoder"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model.forward_stages(x)
        upto4 = model.forward_stages(x, last="layer4")
        c4 = body.layer4(body.layer3(body.layer2(body.layer1(body.stem(x)))))
    assert len(upto4) == 4 and all(torch.equal(a, b) for a, b in zip(upto4, full))
    assert torch.equal(upto4[-1], c4)
    assert body.stage("layer4") == StageInfo("layer4", 512, 32)
    with pytest.raises(DensekitError, match="no stage 'layer5'.*layer4, decoder"):
        model.forward_stages(x, last="layer5")


def test_stage_strides_follow_the_arch() -> None:
    """CRW's stride removal and EfficientNet's dilation show in the strides (computed from the modules)."""
    assert [i.stride for i in cached("resnet18").stage_info] == [4, 8, 8]
    assert [i.stride for i in cached("resnet18", True).stage_info] == [4, 8, 16, 32, 8]
    assert [(i.channels, i.stride) for i in cached("efficientnet_lite0").stage_info] == [
        (16, 2), (24, 4), (40, 8), (80, 8)]


def test_resnet50_shape_small() -> None:
    for decoder, dim in ((False, 1024), (True, 256)):
        model = build_backbone("resnet50", decoder=decoder)
        assert (model.meta.stride, model.meta.dim) == (8, dim)
        assert run(model, 64, 64, batch=1).shape == (1, dim, 8, 8)


def test_resnet_is_crw_style() -> None:
    """Stride 8 by removing strides without dilation, layer4 dropped (CRW), recorded in meta.arch."""
    model = cached("resnet18")
    arch = model.meta.arch
    assert arch["last_layer"] == 3 and arch["remove_strides"] is True
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.dilation == (1, 1) for c in convs)
    assert sum(c.stride == (2, 2) for c in convs) == 1 + 1 + 1  # stem conv1, layer2 conv + its downsample
    assert model.meta.input_multiple == 8


def test_decoder_uses_earlier_stages() -> None:
    """The decoder output depends on fine detail that the stride-32 layer4 alone cannot resolve."""
    model = cached("resnet18", True)
    x = torch.zeros(1, 3, 64, 64)
    x2 = x.clone()
    x2[..., 8:16, 8:16] = 1.0  # one stride-8 cell
    with torch.inference_mode():
        diff = (model(x2) - model(x)).abs().sum(1)[0]
    # the change is strongest near the edited cell (1, 1), not spread evenly over a 32x32 block
    assert diff.argmax().item() in {r * 8 + c for r in range(3) for c in range(3)}
    assert diff[1, 1] > diff[6, 6]


def test_pixels_is_space_to_depth() -> None:
    model = cached("pixels")
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).reshape(2, 3, 16, 24)
    out = model(x)
    c, i, j, y, xx = 2, 3, 5, 1, 2
    assert out[1, c * 64 + i * 8 + j, y, xx] == x[1, c, 8 * y + i, 8 * xx + j]
    assert sum(p.numel() for p in model.parameters()) == 0


def test_vit_drops_prefix_tokens() -> None:
    model = cached(VIT)
    vit = model.body.model
    assert vit.num_prefix_tokens >= 1
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        tokens = vit.forward_features(x)
        out = model(x)
    assert tokens.shape[1] == vit.num_prefix_tokens + 2 * 3
    # the grid's top-left cell is the first patch token, never the CLS token
    assert torch.allclose(out[0, :, 0, 0], tokens[0, vit.num_prefix_tokens])
    assert not torch.allclose(out[0, :, 0, 0], tokens[0, 0])


def test_seeded_determinism_and_global_rng_untouched() -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = build_backbone("resnet18", seed=0).state_dict()
    b = build_backbone("resnet18", seed=0).state_dict()
    c = build_backbone("resnet18", seed=1).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = "body.layer3.0.conv1.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[weight], c[weight])
    d1 = build_backbone("resnet18", seed=5, decoder=True).state_dict()["body.decoder.smooth.weight"]
    d2 = build_backbone("resnet18", seed=5, decoder=True).state_dict()["body.decoder.smooth.weight"]
    assert torch.equal(d1, d2)


def test_efficientnet_lite0_ranks_egyptian_cat_first() -> None:
    """The shipped weights classify skimage's chelsea as ImageNet 285 (Egyptian cat)."""
    from skimage.data import chelsea

    meta = cached("efficientnet_lite0").meta
    assert meta.mean == LITE_MEAN and meta.std == LITE_STD
    img = cv2.resize(chelsea(), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (img - np.asarray(meta.mean, np.float32)) / np.asarray(meta.std, np.float32)
    with torch.inference_mode():
        logits = build_lite0_classifier()(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))
    assert logits.shape == (1, 1000)
    assert logits.argmax().item() == 285


def test_efficientnet_dense_body_has_pretrained_weights() -> None:
    dense = cached("efficientnet_lite0").body.state_dict()
    full = build_lite0_classifier().state_dict()
    assert len(dense) > 50
    assert all(torch.equal(v, full[k]) for k, v in dense.items())


def test_efficientnet_features_are_not_random() -> None:
    """Pretrained features: the same object in two crops matches better than a different texture."""
    from skimage.data import chelsea

    model = cached("efficientnet_lite0")
    meta = model.meta
    img = chelsea()[:288, :448]

    def feats(rgb: np.ndarray) -> torch.Tensor:
        x = (rgb.astype(np.float32) / 255 - np.asarray(meta.mean, np.float32)) / np.asarray(meta.std, np.float32)
        with torch.inference_mode():
            return F.normalize(model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())), dim=1)[0]

    full = feats(img)
    shifted = feats(np.ascontiguousarray(img[:, 16:]))  # 2 cells to the left
    aligned = (full[:, :, 2:] * shifted[:, :, : full.shape[2] - 2]).sum(0)
    misaligned = (full[:, :, 2:] * shifted.flip(-1)[:, :, : full.shape[2] - 2]).sum(0)
    # random weights give ~0.99 vs ~0.89 here (smooth, position-blind maps); pretrained ~0.99 vs ~0.30
    assert aligned.mean() > misaligned.mean() + 0.3


def test_unknown_names() -> None:
    with pytest.raises(DensekitError, match="valid names") as info:
        build_backbone("resnet19")
    for name in BUILTIN_NAMES:
        assert name in str(info.value)
    with pytest.raises(DensekitError, match="unknown timm model"):
        build_backbone("timm:not_a_real_model_xyz")
    with pytest.raises(DensekitError, match="unknown timm model"):
        build_backbone("timm:")
    with pytest.raises(DensekitError, match="decoder"):
        build_backbone("pixels", decoder=True)


def test_load_backbone_names_and_unsupported_paths(tmp_path) -> None:
    assert load_backbone("pixels").meta.dim == 192
    for suffix in (".onnx", ".engine"):
        with pytest.raises(DensekitError, match="not supported by load_backbone.*FeatureExtractor"):
            load_backbone(tmp_path / f"model{suffix}")
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not a pickle")
    with pytest.raises(DensekitError, match="safetensors"):
        load_backbone(pth)
    other = tmp_path / "weights.txt"
    other.write_text("x")
    with pytest.raises(DensekitError):
        load_backbone(other)


class _PatchConv(DenseBody):
    """A one-convolution body for the registry test: (B, 3, H, W) -> (B, width, H / 4, W / 4)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.stage_info = [StageInfo("conv", width, 4)]

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        self.stage_index(last)
        return [self.conv(x)]


def test_a_new_family_is_one_registration(tmp_path) -> None:
    """Registered once: named, built, described by its stages, saved and loaded like the built-ins."""
    from densekit.serve.checkpoint import load_checkpoint, save_checkpoint

    spec = BackboneFamily(lambda arch: _PatchConv(int(arch["width"])), lambda name, decoder: {"width": 6},
                          names=("patchconv",), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    register_family("patchconv_test", spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_family("patchconv_test", spec)
        assert default_arch("patchconv") == {"family": "patchconv_test", "width": 6}
        model = build_backbone("patchconv", seed=3)
        meta = model.meta
        assert (meta.stride, meta.dim, meta.input_multiple, meta.mean) == (4, 6, 4, (0.5, 0.5, 0.5))
        with pytest.raises(DensekitError, match="valid names: .*patchconv"):
            build_backbone("patchconvv")
        with pytest.raises(DensekitError, match="only available for resnet18 and resnet50, not 'patchconv'"):
            build_backbone("patchconv", decoder=True)
        save_checkpoint(model, tmp_path / "p.safetensors")
        x = torch.randn(1, 3, 16, 20)
        with torch.inference_mode():
            assert torch.equal(load_checkpoint(tmp_path / "p.safetensors")(x), model(x))
    finally:
        FAMILIES.pop("patchconv_test", None)
    with pytest.raises(DensekitError, match="unknown family 'patchconv_test'"):
        load_checkpoint(tmp_path / "p.safetensors")
