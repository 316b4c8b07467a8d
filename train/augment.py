"""View augmentation shared by the objectives: crop boxes and their cell locations, photometric jitter / blur /
solarisation, normalisation. numpy + OpenCV, run in DataLoader workers.

Every random number comes from the ``np.random.Generator`` the trainer hands to a transform (a pure function of
seed and sample index, so exact resume holds), in a fixed order per view: crop box, flip, then the photometric
draws. torchvision / kornia transforms are not used: they draw from torch's RNG and compute hue and blur
differently, so the views (and the objectives' losses) would change.

Geometry: a crop box is ``(x_left, y_top, x_right, y_bottom)`` in the frame's continuous pixel coordinates
(pixel i covers [i, i + 1)), where ``x_left`` is the x of the view's left edge: a horizontally flipped view has
``x_left > x_right``. A feature cell's location is the frame point under its centre (:func:`cell_locations`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch

from densekit.serve.errors import DensekitError

#: (x_left, y_top, x_right, y_bottom) in frame pixels; x_left > x_right for a flipped view
Box = tuple[float, float, float, float]

#: torchvision RandomResizedCrop's default aspect-ratio range
RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ----------------------------------------------------------------------------------------------------
# Crop boxes
# ----------------------------------------------------------------------------------------------------


def random_resized_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with a numpy generator -> (top, left, crop_h, crop_w).

    Ten tries of area ``U(scale)`` and log-uniform aspect ratio; then the centre crop with the ratio clamped.
    """
    area = float(height * width)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(rng.uniform(scale[0], scale[1]))
        r = math.exp(float(rng.uniform(*log_r)))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO, p_flip: float = 0.5) -> Box:
    """A :func:`random_resized_crop` box, flipped horizontally with probability ``p_flip`` (one draw)."""
    top, left, h, w = random_resized_crop(rng, height, width, scale, ratio)
    x0, y0, x1, y1 = float(left), float(top), float(left + w), float(top + h)
    return (x1, y0, x0, y1) if rng.random() < p_flip else (x0, y0, x1, y1)


def crop_resize(image: np.ndarray, box: Box, out_hw: tuple[int, int],
                resample: Literal["warp", "resize"] = "warp") -> np.ndarray:
    """The content of ``box`` resampled to ``out_hw``: (H, W, C) -> (out_h, out_w, C), same dtype.

    ``warp`` (bilinear, any box): output pixel (u, v) samples the frame point
    x = x_left + (u + 0.5) (x_right - x_left) / out_w (same for y), so cell locations are exact.
    ``resize`` (integer boxes): OpenCV resize of the cut-out, area-averaging when shrinking (anti-aliased),
    bilinear when enlarging, then mirrored when the box is flipped (MoCo/DenseCL's pipeline).
    """
    oh, ow = out_hw
    xl, yt, xr, yb = box
    if resample == "resize":
        x0, x1 = int(min(xl, xr)), int(max(xl, xr))
        top, bottom = int(yt), int(yb)
        interp = cv2.INTER_LINEAR if bottom - top < oh else cv2.INTER_AREA
        out = cv2.resize(image[top:bottom, x0:x1], (ow, oh), interpolation=interp)
        return np.ascontiguousarray(out[:, ::-1]) if xl > xr else out
    ax, ay = (xr - xl) / ow, (yb - yt) / oh
    # OpenCV puts pixel centres at integers: continuous x = cv_x + 0.5
    m = np.array([[ax, 0.0, xl + 0.5 * ax - 0.5], [0.0, ay, yt + 0.5 * ay - 0.5]], dtype=np.float64)
    return cv2.warpAffine(image, m, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT_101)


def view_size(frame_hw: tuple[int, int], size: int, multiple: int) -> tuple[int, int]:
    """Output (h, w) of a view: ``size`` x ``size`` if size > 0, else the frame's size rounded down to ``multiple``."""
    h, w = (size, size) if size > 0 else frame_hw
    h, w = (h // multiple) * multiple, (w // multiple) * multiple
    if h <= 0 or w <= 0:
        raise DensekitError(f"view size {frame_hw} is smaller than the backbone's input multiple {multiple}")
    return h, w


def cell_centres(box: Box, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frame coordinates under the centres of a view's (h, w) cell grid: (xs (w,), ys (h,)) float64.

    Cells tile the view evenly; a flipped box (x_left > x_right) gives decreasing xs. The numpy, one-box form of
    :func:`cell_locations`.
    """
    h, w = grid_hw
    xl, yt, xr, yb = box
    return xl + (np.arange(w) + 0.5) / w * (xr - xl), yt + (np.arange(h) + 0.5) / h * (yb - yt)


def cell_locations(boxes: torch.Tensor, view_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Frame point under each feature cell's centre.

    Args:
        boxes: (B, 4) crop boxes (x_left, y_top, x_right, y_bottom) in frame pixels (x_left > x_right: flipped).
        view_hw: the view's (H, W) in pixels (cells split it evenly; kept for the signature's clarity).
        grid_hw: the feature map's (h, w); cell (i, j) covers view pixels [j W/w, (j+1) W/w) x [i H/h, ...).
    Returns:
        (B, h*w, 2) float (x, y) in frame pixels, raster order.
    """
    h, w = grid_hw
    fy = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) / h
    fx = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) / w
    xl, yt, xr, yb = boxes.unbind(dim=1)
    xs = xl[:, None] + fx[None, :] * (xr - xl)[:, None]  # (B, w)
    ys = yt[:, None] + fy[None, :] * (yb - yt)[:, None]  # (B, h)
    grid_x = xs[:, None, :].expand(-1, h, -1)
    grid_y = ys[:, :, None].expand(-1, -1, w)
    return torch.stack([grid_x, grid_y], dim=-1).reshape(boxes.shape[0], h * w, 2)


# ----------------------------------------------------------------------------------------------------
# Photometric augmentation and normalisation
# ----------------------------------------------------------------------------------------------------


def luma(img: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of (H, W, 3) RGB, as torchvision's ``rgb_to_grayscale``: (H, W) float32."""
    return (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]).astype(np.float32)


def _jitter(x: np.ndarray, op: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One ColorJitter op (0 brightness, 1 contrast, 2 saturation, 3 hue) on float RGB in [0, 1], clipped."""
    if op == 0:
        x = x * float(rng.uniform(1 - strength, 1 + strength))
    elif op == 1:
        mean = float(luma(x).mean())
        x = (x - mean) * float(rng.uniform(1 - strength, 1 + strength)) + mean
    elif op == 2:
        g = luma(x)[..., None]
        x = (x - g) * float(rng.uniform(1 - strength, 1 + strength)) + g
    else:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float32: H in [0, 360)
        hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * float(rng.uniform(-strength, strength)), 360.0)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(x, 0.0, 1.0)


@dataclass(frozen=True)
class Photometric:
    """SimCLR / MoCo v2 / BYOL-style photometric augmentation with torchvision's semantics.

    With probability ``p_jitter`` ColorJitter(brightness, contrast, saturation, hue = ``jitter``) in a random
    order (factors uniform in [1 - s, 1 + s], hue shift uniform in [-h, h] of a full turn); RandomGrayscale
    ``p_gray``; GaussianBlur, sigma uniform in ``blur_sigma``, with probability ``p_blur``; solarisation
    (x >= 0.5 -> 1 - x) with probability ``p_solarize``. ``p_solarize=None`` has no solarisation step and makes
    no draw for it; ``0.0`` makes the draw and never solarises (the two give different random streams).

    ``__call__(image, rng)``: (H, W, 3) uint8 (or float in [0, 1]) RGB -> (H, W, 3) float32 in [0, 1].
    """

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_solarize: float | None = None

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32, copy=True)
        if rng.random() < self.p_jitter:
            for op in rng.permutation(4):
                if self.jitter[int(op)] > 0:
                    x = _jitter(x, int(op), self.jitter[int(op)], rng)
        if rng.random() < self.p_gray:
            x = np.repeat(luma(x)[..., None], 3, axis=2)
        if rng.random() < self.p_blur:
            sigma = float(rng.uniform(*self.blur_sigma))
            x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        if self.p_solarize is not None and rng.random() < self.p_solarize:
            x = np.where(x >= 0.5, 1.0 - x, x)
        return np.clip(x, 0.0, 1.0).astype(np.float32)


def normalize(img: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] -> (3, H, W) float32 normalised with ``mean``/``std``."""
    out = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# One view
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomView:
    """One augmented view: random resized crop box (+ flip), resampling, :class:`Photometric`. Picklable.

    ``__call__(image, out_hw, rng)`` -> (view (out_h, out_w, 3) float32 in [0, 1], its :data:`Box`). Draws in
    the order box, flip, photometric. ``resample``: see :func:`crop_resize`; ``resize`` expects a float image
    (it is resampled before any rounding to uint8 could happen), ``warp`` takes uint8 or float.
    """

    photometric: Photometric = field(default_factory=Photometric)
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = RATIO
    p_flip: float = 0.5
    resample: Literal["warp", "resize"] = "warp"

    def __call__(self, image: np.ndarray, out_hw: tuple[int, int],
                 rng: np.random.Generator) -> tuple[np.ndarray, Box]:
        box = random_box(rng, image.shape[0], image.shape[1], self.scale, self.ratio, self.p_flip)
        return self.photometric(crop_resize(image, box, out_hw, self.resample), rng), box


# Recipes of the papers, by name (each objective's module says which it uses and why).

#: MoCo v2 (Chen et al. 2020, ``moco/main_moco.py``), used unchanged by DenseCL
MOCO_V2 = Photometric(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5)
#: VICReg (Bardes et al., ICLR 2022, Appendix C): asymmetric blur / solarisation between the two views
VICREG_VIEW1 = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), p_blur=1.0, p_solarize=0.0)
VICREG_VIEW2 = Photometric(jitter=(0.4, 0.4, 0.2, 0.1), p_blur=0.1, p_solarize=0.2)
#: PooDLe's BDD100K recipe (``src/datasets/bdd100k.py``, colour distortion strength s = 1)
POODLE = Photometric(jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_gray=0.2, p_blur=0.5)
