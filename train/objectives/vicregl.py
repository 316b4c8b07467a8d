"""VICRegL: global VICReg plus local (location- and feature-matched) VICReg on dense maps.

Bardes, Ponce and LeCun, "VICRegL: Self-Supervised Learning of Local Visual Features", NeurIPS 2022
(arXiv:2210.01571); official code github.com/facebookresearch/VICRegL (``main_vicregl.py``, read for the loss
structure; reimplemented here, the code is CC-BY-NC). Defaults and where they come from:

* invariance / variance / covariance coefficients 25 / 25 / 1 (``--inv-coeff``, ``--var-coeff``, ``--cov-coeff``);
* ``alpha`` = 0.75: loss = alpha * global + (1 - alpha) * local (``--alpha``; the README's 0.75 models are the
  ones with the better segmentation numbers);
* global expander ``8192-8192-8192`` (``--mlp``), local expander ``512-512-512`` (``--maps-mlp``); Linear-BN-ReLU
  blocks and a final bias-free Linear, as the official ``utils.MLP`` (the local one applied per location, here as
  1x1 convolutions);
* top-k matching: the paper keeps the gamma = 20 best matches for global views (4 for small local crops). densekit
  uses two global views, so ``num_matches`` = 20 in both directions for both location- and feature-based matching.
  (The official code uses 20 for the first and 4 for the second direction regardless of view type and, by default,
  all feature-based matches, ``--l2_all_matches 1``; lightly's ``VICRegLLoss`` docstring notes the same
  discrepancy. ``l2_all_matches=True`` reproduces the code's feature matching.)
* global crops: RandomResizedCrop scale (0.4, 1.0) (``--min_scale_crops 0.4 --max_scale_crops 1``); photometric
  augmentation of VICReg (Bardes et al., ICLR 2022): colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2,
  blur p=1.0/0.1 and solarisation p=0.0/0.2 for view 1/2, horizontal flip p=0.5.

Loss structure as in the official code: the global term averages the invariance over the two orderings and the
variance/covariance over the two views; the local term, for each ordered view pair, matches view a -> b and
b -> a by location (nearest crop-grid position in original-image coordinates) and by feature (nearest neighbour in
L2), keeps the top-k matches, and applies VICReg to the matched pairs, with variance and covariance taken over the
batch for each match slot (``_vicreg_loss`` in ``main_vicregl.py``). Variance and covariance use
:func:`densekit.train.dist.gather_with_grad` over the global batch, so DDP matches one process.

Geometry: the transform returns each view's crop box ``(x_left, y_top, x_right, y_bottom)`` in the input frame's
pixel coordinates, where ``x_left`` is the x of the view's left edge: for a horizontally flipped view
``x_left > x_right``. A feature cell's location is the image point under its centre.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import VICREG_VIEW1, VICREG_VIEW2, RandomView, cell_locations, normalize, view_size
from densekit.train.dist import world_size
from densekit.train.heads import mlp_head
from densekit.train.losses import VICRegLLocalLoss, VICRegLoss
from densekit.train.objective import Objective, Transform

# ----------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------


class VICRegLTransform:
    """Two global views of one frame with their crop boxes (picklable; captures plain numbers only).

    Returns ``{"view1", "view2": (3, h, w) float32 normalised, "box1", "box2": (4,) float32}``; views are
    bilinear crops (``warp``, so cell locations are exact) with VICReg's asymmetric photometric augmentation
    (:data:`densekit.train.augment.VICREG_VIEW1` / ``VICREG_VIEW2``).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], multiple: int, size: int = 0,
                 scale: tuple[float, float] = (0.4, 1.0)) -> None:
        self.mean, self.std, self.multiple, self.size = tuple(mean), tuple(std), int(multiple), int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.views = (RandomView(VICREG_VIEW1, scale=self.scale), RandomView(VICREG_VIEW2, scale=self.scale))

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = frames[0]
        out_hw = view_size(image.shape[:2], self.size, self.multiple)
        out: dict[str, np.ndarray] = {}
        for k, view in enumerate(self.views, start=1):
            pixels, box = view(image, out_hw, rng)
            out[f"view{k}"] = normalize(pixels, self.mean, self.std)
            out[f"box{k}"] = np.asarray(box, np.float32)
        return out


# ----------------------------------------------------------------------------------------------------
# Head widths
# ----------------------------------------------------------------------------------------------------


def _dims(spec: str, name: str) -> list[int]:
    try:
        dims = [int(v) for v in str(spec).split("-")]
    except ValueError:
        dims = []
    if not dims or min(dims) <= 0:
        raise DensekitError(f"vicregl: {name} must look like '8192-8192-8192' (positive widths), got {spec!r}")
    return dims


# ----------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------


class VICRegL(Objective):
    """VICRegL (Bardes et al., NeurIPS 2022): global VICReg + location/feature-matched local VICReg.

    Batch (from :meth:`transform`): ``view1``, ``view2`` (B, 3, H, W) normalised; ``box1``, ``box2`` (B, 4) crop
    boxes (x_left, y_top, x_right, y_bottom) in frame pixels.

    Model: backbone maps (B, D, h, w); representation = spatial mean (B, D) -> ``projector`` (B, mlp[-1]);
    maps -> ``maps_projector`` (B, h*w, maps_mlp[-1]).

    Args:
        backbone: the student DenseBackbone (any: VICRegL only needs its output map).
        mlp: global expander widths (paper/code ``--mlp`` 8192-8192-8192).
        maps_mlp: local expander widths (``--maps-mlp`` 512-512-512).
        alpha: weight of the global loss; local gets 1 - alpha (0.75).
        inv_coeff, var_coeff, cov_coeff: VICReg coefficients (25, 25, 1).
        num_matches: top-k matches kept per direction (paper: 20 for global views).
        l2_all_matches: keep every feature-based match (official code default) instead of the top-k.
        size: view side in pixels (0: the input frame's size, rounded down to the backbone's input multiple).
        min_scale, max_scale: RandomResizedCrop area range of the views (0.4, 1.0).
        eps: added to the variance before the square root (1e-4).
    """

    name: ClassVar[str] = "vicregl"
    data: ClassVar[str] = "images"

    def __init__(self, backbone: DenseBackbone, *, mlp: str = "8192-8192-8192", maps_mlp: str = "512-512-512",
                 alpha: float = 0.75, inv_coeff: float = 25.0, var_coeff: float = 25.0, cov_coeff: float = 1.0,
                 num_matches: int = 20, l2_all_matches: bool = False, size: int = 0, min_scale: float = 0.4,
                 max_scale: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__(backbone, mlp=mlp, maps_mlp=maps_mlp, alpha=alpha, inv_coeff=inv_coeff,
                         var_coeff=var_coeff, cov_coeff=cov_coeff, num_matches=num_matches,
                         l2_all_matches=l2_all_matches, size=size, min_scale=min_scale, max_scale=max_scale, eps=eps)
        if not 0.0 <= alpha <= 1.0:
            raise DensekitError(f"vicregl: alpha must be in [0, 1], got {alpha}")
        if num_matches < 1:
            raise DensekitError(f"vicregl: num_matches must be >= 1, got {num_matches}")
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise DensekitError(f"vicregl: need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        dim = int(backbone.meta.dim)
        self.alpha = float(alpha)
        self.size, self.scale = int(size), (float(min_scale), float(max_scale))
        # VICReg's expander (official utils.MLP): Linear-BN-ReLU blocks, a bias-free last Linear; the local one
        # per location (1x1 convolutions, BN over batch and positions)
        self.projector = mlp_head(dim, _dims(mlp, "mlp"), last_bias=False)
        self.maps_projector = mlp_head(dim, _dims(maps_mlp, "maps_mlp"), last_bias=False, dense=True)
        self.global_loss = VICRegLoss(inv_coeff, var_coeff, cov_coeff, eps)
        self.local_loss = VICRegLLocalLoss(num_matches, l2_all_matches, inv_coeff, var_coeff, cov_coeff, eps)

    def transform(self) -> Transform:
        meta = self.backbone.meta
        return VICRegLTransform(meta.mean, meta.std, meta.input_multiple, self.size, self.scale)

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All loss terms (with grad): global ``g_inv``, ``g_var``, ``g_cov``; local ``l_inv_feat``,
        ``l_inv_loc``, ``l_var``, ``l_cov``; ``global``, ``local`` and ``loss`` = alpha global + (1-alpha) local;
        plus ``emb_std`` (no grad): mean per-dimension batch std of view 1's global embedding (the variance hinge
        pushes it towards 1; collapse -> 0)."""
        views = (batch["view1"], batch["view2"])
        _check_batch(views[0].shape[0] * world_size())  # before BatchNorm1d refuses a batch of 1 less clearly
        boxes = (batch["box1"].to(views[0].dtype), batch["box2"].to(views[0].dtype))
        z, maps, locs = [], [], []
        for v, box in zip(views, boxes):
            f = self.backbone(v)  # each view on its own, like the official code (BN statistics per view)
            z.append(self.projector(f.mean(dim=(2, 3))))
            maps.append(self.maps_projector(f).flatten(2).transpose(1, 2))  # (B, h*w, C)
            locs.append(cell_locations(box, (v.shape[-2], v.shape[-1]), (f.shape[-2], f.shape[-1])))
        g = self.global_loss(z[0], z[1])
        # official local_loss: ordered pairs (0, 1) and (1, 0), averaged
        l12 = self.local_loss(maps[0], maps[1], locs[0], locs[1])
        l21 = self.local_loss(maps[1], maps[0], locs[1], locs[0])
        loc = {k: (l12[k] + l21[k]) / 2 for k in l12}
        glob = g["inv"] + g["var"] + g["cov"]
        local = loc["inv_feat"] + loc["inv_loc"] + loc["var"] + loc["cov"]
        out = {"g_inv": g["inv"], "g_var": g["var"], "g_cov": g["cov"], "l_inv_feat": loc["inv_feat"],
               "l_inv_loc": loc["inv_loc"], "l_var": loc["var"], "l_cov": loc["cov"], "global": glob,
               "local": local, "loss": self.alpha * glob + (1.0 - self.alpha) * local}
        with torch.no_grad():
            out["emb_std"] = z[0].detach().std(dim=0).mean()
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"loss": alpha * global + (1 - alpha) * local, and every term detached for logging}``."""
        t = self.terms(batch)
        return {k: (v if k == "loss" else v.detach()) for k, v in t.items()}


def _check_batch(n: int) -> None:
    if n < 2:
        raise DensekitError("vicregl needs a global batch of at least 2 (variance/covariance are batch statistics)")
