"""Pixel contrast from a region hierarchy (Zhang and Maire, NeurIPS 2020).

Zhang and Maire, "Self-Supervised Visual Representation Learning from Hierarchical Grouping", NeurIPS 2020
(arXiv:2012.03044). No official code was found (densekit notes, ssl_training.md 1.6), and the stored copies of the
paper reachable from here gave only its abstract, so the pieces below are the issue's specification plus our
reading, each marked as such:

* Region tree: an ultrametric contour map from an edge map, built on CPU in the transform
  (:mod:`densekit.train.regions`: Sobel colour gradient -> higra hierarchical watershed on the 4-adjacency graph,
  altitudes normalised to [0, 1]). The paper uses a contour detector trained on BSDS instead of Sobel.
* Sampling (issue: "per the paper's Eq. 2 and 3 with sigma_p = 0.8, 7 regions x 10 positives x 5 negatives per
  image"). Our reading: cut the tree at sigma_p; a positive pair is two cells of one region (ultrametric distance
  <= sigma_p), one in each augmented view; a negative is a cell of another region (distance > sigma_p) in the
  other view. 7 regions x 10 (anchor, positive) pairs x 5 negatives per image
  (:func:`densekit.train.regions.sample_region_pairs`).
* Cross-image negatives: ``cns`` extra negatives per anchor from other images of the global batch (a setting,
  default 5 = as many as the in-image ones: our choice, the paper's value was not verifiable here). Which image and
  cell are drawn in the transform (numpy Generator), so DDP and one process pick the same ones.
* Loss: InfoNCE over cosine similarities, one positive against its negatives, temperature 0.07 (our choice,
  following instance discrimination, Wu et al. CVPR 2018, on which the paper builds).
* Embedding: a hypercolumn head (Hariharan et al., CVPR 2015) giving a 32-d, L2-normalised embedding at stride 4:
  every backbone stage from stride 4 on is upsampled (bilinear) to stride 4, concatenated, and mapped by a
  1x1 Conv-BN-ReLU-1x1 Conv MLP (hidden 256: our choice) to 32-d. Stages come from the backbone's stage API
  (``forward_stages`` / ``stage_info``: ResNet layer1..4 and decoder, EfficientNet-Lite stages, timm CNN feature
  levels); single-stage backbones (``pixels``, ViTs) cannot give hypercolumns and are refused with one clear line.
* Augmentation (our choice, MoCo v2 / SimCLR style): RandomResizedCrop scale (0.2, 1), flip, colour jitter
  (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import MOCO_V2, RandomView, normalize, view_size
from densekit.train.heads import mlp_head
from densekit.train.losses import PixelContrastLoss
from densekit.train.objective import Objective, Transform
from densekit.train.regions import ATTRIBUTES, build_hierarchy, grid_labels, sample_region_pairs

EMBED_STRIDE = 4


# ----------------------------------------------------------------------------------------------------
# Hypercolumns
# ----------------------------------------------------------------------------------------------------


def hypercolumn_stages(backbone: DenseBackbone) -> list[int]:
    """Indices (into ``backbone.stage_info``) of the stages that feed the hypercolumn: every stage at stride >= 4.

    ResNet: layer1 (s4), layer2, layer3, layer4 (when kept) and the decoder (when present: it is what the
    exported backbone returns, so it trains too and DDP sees every parameter used). EfficientNet-Lite: its stages
    from stride 4 on. timm CNNs: their feature levels from stride 4 on.

    Raises:
        DensekitError: fewer than two such stages (``pixels``, ViTs): no hypercolumn to take.
    """
    stages = getattr(backbone.body, "stage_info", None) or []
    keep = [i for i, info in enumerate(stages) if info.stride >= EMBED_STRIDE]
    if len(keep) < 2:
        raise DensekitError(
            f"objective 'hiergroup' needs hypercolumns from a multi-stage CNN backbone (resnet18, resnet50, "
            f"efficientnet_lite0, timm CNNs); backbone {backbone.meta.name!r} ({type(backbone.body).__name__}) has "
            f"{len(keep)} stage(s) at stride >= {EMBED_STRIDE}"
        )
    return keep


class HypercolumnHead(nn.Module):
    """Hypercolumn embedding: stage maps upsampled to stride 4, concatenated, 1x1 MLP, L2-normalised.

    ``forward(feats, out_hw)``: list of (B, C_i, h_i, w_i) -> (B, dim, out_h, out_w), unit norm over dim.
    """

    def __init__(self, in_channels: list[int], dim: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = mlp_head(sum(in_channels), [hidden, dim], dense=True)  # 1x1 Conv-BN-ReLU-1x1 Conv

    def forward(self, feats: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
        up = [f if f.shape[-2:] == out_hw else F.interpolate(f, size=out_hw, mode="bilinear", align_corners=False)
              for f in feats]
        return F.normalize(self.mlp(torch.cat(up, dim=1)), dim=1)


# ----------------------------------------------------------------------------------------------------
# Transform
# ----------------------------------------------------------------------------------------------------


class HierGroupTransform:
    """Region hierarchy + two augmented views + sampled cell pairs for one image (picklable, numbers only).

    Returns, with n = regions * positives and (h, w) = view size / 4:
        ``view1``, ``view2`` (3, H, W) float32 normalised; ``box1``, ``box2`` (4,) float32 crop boxes;
        ``labels1``, ``labels2`` (h, w) int64 region ids at sigma_p under each embedding cell;
        ``anchor`` (n,), ``positive`` (n,) int64; ``negative`` (n, negatives) int64 flat cell indices;
        ``valid`` (n,), ``neg_valid`` (n, negatives) float32; ``cross_idx`` (n, cns) int64 cells of another
        image's view 2; ``cross_shift`` (n, cns) int64 random offsets choosing that image in the global batch.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], multiple: int, *, size: int = 0,
                 scale: tuple[float, float] = (0.2, 1.0), sigma_p: float = 0.8, regions: int = 7,
                 positives: int = 10, negatives: int = 5, cns: int = 5, attribute: str = "dynamics",
                 ucm_max_side: int = 128) -> None:
        self.mean, self.std, self.multiple, self.size = tuple(mean), tuple(std), int(multiple), int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.sigma_p, self.regions, self.positives = float(sigma_p), int(regions), int(positives)
        self.negatives, self.cns, self.attribute = int(negatives), int(cns), str(attribute)
        self.ucm_max_side = int(ucm_max_side)
        # MoCo v2's colours; p_solarize 0.0 (not None) keeps the draw the first version made, so seeds give
        # the views they always gave
        self.view = RandomView(dataclasses.replace(MOCO_V2, p_solarize=0.0), scale=self.scale)

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        import cv2

        image = frames[0]
        H, W = image.shape[:2]
        small = image
        side = max(H, W)
        if self.ucm_max_side > 0 and side > self.ucm_max_side:
            s = self.ucm_max_side / side
            small = cv2.resize(image, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
        labels = build_hierarchy(small, self.attribute).labels_at(self.sigma_p)
        out_hw = view_size((H, W), self.size, self.multiple)
        grid = (out_hw[0] // EMBED_STRIDE, out_hw[1] // EMBED_STRIDE)
        out: dict[str, np.ndarray] = {}
        for k in (1, 2):
            pixels, box = self.view(image, out_hw, rng)
            out[f"view{k}"] = normalize(pixels, self.mean, self.std)
            out[f"box{k}"] = np.asarray(box, np.float32)
            out[f"labels{k}"] = grid_labels(labels, (H, W), box, grid).astype(np.int64)
        pairs = sample_region_pairs(out["labels1"], out["labels2"], rng, self.regions, self.positives,
                                    self.negatives)
        pairs.pop("region")
        out.update(pairs)
        n = self.regions * self.positives
        out["cross_idx"] = rng.integers(0, grid[0] * grid[1], size=(n, self.cns), dtype=np.int64)
        out["cross_shift"] = rng.integers(0, 2**31 - 1, size=(n, self.cns), dtype=np.int64)
        return out


# ----------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------


class HierGroupContrast(Objective):
    """Pixel contrast from a region hierarchy (Zhang and Maire, NeurIPS 2020) with a 32-d stride-4 hypercolumn head.

    Batch: see :class:`HierGroupTransform`. Embeddings z1, z2 (B, dim, H/4, W/4) of the two views; for every
    valid anchor a (view 1) with positive p (view 2), in-image negatives n_k (view 2) and cross-image negatives
    c_k (view 2 of other images of the global batch):
    ``loss_a = -log( e^{a.p/t} / (e^{a.p/t} + sum_k e^{a.n_k/t} + sum_k e^{a.c_k/t}) )``, averaged over the
    valid anchors of the global batch.

    Args:
        backbone: a DenseBackbone with at least two stages at stride >= 4 (ResNet, EfficientNet-Lite, timm CNN),
            else DensekitError.
        sigma_p: tree level that defines positives (0.8, issue/paper).
        regions, positives, negatives: per image 7 x 10 x 5 (issue/paper).
        cns: cross-image negatives per anchor (5, our choice).
        temperature: InfoNCE temperature (0.07, our choice).
        dim: embedding width (32, issue/paper); hidden: head MLP width (256, our choice).
        size: view side (0: the input frame's size, rounded down to the backbone's input multiple).
        min_scale, max_scale: RandomResizedCrop area range (0.2, 1.0).
        attribute: higra watershed attribute for the tree (``dynamics``, ``area``, ``volume``).
        ucm_max_side: the hierarchy is computed on the frame downscaled to this longer side (128; 0 = full size).
    """

    name: ClassVar[str] = "hiergroup"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, *, sigma_p: float = 0.8, regions: int = 7, positives: int = 10,
                 negatives: int = 5, cns: int = 5, temperature: float = 0.07, dim: int = 32, hidden: int = 256,
                 size: int = 0, min_scale: float = 0.2, max_scale: float = 1.0, attribute: str = "dynamics",
                 ucm_max_side: int = 128) -> None:
        super().__init__(backbone, sigma_p=sigma_p, regions=regions, positives=positives, negatives=negatives,
                         cns=cns, temperature=temperature, dim=dim, hidden=hidden, size=size, min_scale=min_scale,
                         max_scale=max_scale, attribute=attribute, ucm_max_side=ucm_max_side)
        if not 0.0 <= sigma_p <= 1.0:
            raise DensekitError(f"hiergroup: sigma_p must be in [0, 1], got {sigma_p}")
        if min(regions, positives) < 1 or min(negatives, cns) < 0:
            raise DensekitError("hiergroup: regions and positives must be >= 1, negatives and cns >= 0")
        if temperature <= 0 or dim < 1 or hidden < 1:
            raise DensekitError("hiergroup: temperature, dim and hidden must be positive")
        if attribute not in ATTRIBUTES:
            raise DensekitError(f"hiergroup: attribute must be one of {', '.join(ATTRIBUTES)}, got {attribute!r}")
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise DensekitError(f"hiergroup: need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        self.sigma_p, self.regions, self.positives, self.negatives = sigma_p, regions, positives, negatives
        self.cns, self.temperature, self.size = int(cns), float(temperature), int(size)
        self.scale, self.attribute, self.ucm_max_side = (float(min_scale), float(max_scale)), attribute, ucm_max_side
        self.stages = hypercolumn_stages(backbone)
        channels = [backbone.stage_info[i].channels for i in self.stages]
        self.head = HypercolumnHead(channels, dim=dim, hidden=hidden)
        self.pixel_loss = PixelContrastLoss(self.temperature, cross_negatives=self.cns > 0)

    def transform(self) -> Transform:
        meta = self.backbone.meta
        return HierGroupTransform(meta.mean, meta.std, meta.input_multiple, size=self.size, scale=self.scale,
                                  sigma_p=self.sigma_p, regions=self.regions, positives=self.positives,
                                  negatives=self.negatives, cns=self.cns, attribute=self.attribute,
                                  ucm_max_side=self.ucm_max_side)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, dim, H/4, W/4) unit-norm hypercolumn embedding."""
        feats = self.backbone.forward_stages(x)
        out_hw = (x.shape[-2] // EMBED_STRIDE, x.shape[-1] // EMBED_STRIDE)
        return self.head([feats[i] for i in self.stages], out_hw)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"loss", "pos_sim", "neg_sim", "anchors"}``: InfoNCE over sampled cells (see the class docstring)."""
        z1 = self.embed(batch["view1"]).flatten(2)  # (B, C, N)
        z2 = self.embed(batch["view2"]).flatten(2)
        return self.pixel_loss(z1, z2, batch["anchor"].long(), batch["positive"].long(), batch["negative"].long(),
                         batch["valid"], batch["neg_valid"], batch["cross_idx"].long(), batch["cross_shift"].long())
