"""PooDLe: pooled and dense self-supervised learning from naturalistic videos (Wang, Hoang, Silva, Ren, Clark,
"PooDLe: Pooled and dense self-supervised learning from naturalistic videos", ICLR 2025; official code
github.com/agentic-learning-ai-lab/poodle, ``src/models/poodle.py``, ``configs/exp/poodle.yaml``).

Two frames t and t+d of one video, cropped with the same window:

* **Dense flow-equivariance loss.** The student's spatial-decoder output on frame a (projected, predicted) must
  equal the EMA teacher's (projected) output on frame b warped back into frame a by the optical flow a -> b.
  Both frames are photometrically augmented and each gets its own random affine (rotation, scale, flip) that is
  undone on the features. Masked by warp validity, forward-backward occlusion (UnFlow test, alpha1 0.1,
  alpha2 0.5) and both affine validity masks. Squared L2 between L2-normalised vectors, summed over each image's
  mask and divided by its mask area, averaged over the batch. Each pair is used in both directions.
* **Pooled loss on flow-paired subcrops.** K = 6 small crops (area scale 0.05-0.3) of frame a; each crop's centre
  is moved by the flow (plus 10 % jitter) to frame b where the teacher's crop is taken (scale between the
  student crop's and 0.3; same-frame fallback when the moved centre leaves the frame). Crops are resized to
  ``subcrop_size``, encoded to the last encoder stage (``layer4``), average-pooled, projected (student also
  predicted); BYOL loss (squared L2 of normalised vectors).
* ``loss = 0.5 * dense + 0.5 * pooled`` (``loss_weights``); teacher EMA momentum 0.996 -> 1 (cosine).

Differences from the official code:

* Flow comes from OpenCV DIS (or Farneback) in the CPU transform; RAFT (torchvision) only when its weights are
  already on disk (``flow="auto"``; the resolved method is :attr:`PooDLe.flow_method`). The official code runs
  RAFT-things (24 iterations) on the GPU.
* The spatial decoder is densekit's FPN-style :class:`~densekit.serve.backbones.TopDownDecoder` (stride 8), not
  PooDLe's Bottleneck + bilinear decoder (stride 8 for their ResNet-50 with two decoder stages too).
* Features are bilinearly sampled from the stride-8 map straight at the loss positions (the official code first
  upsamples to image size, then warps: the same bilinear reconstruction up to second order).
  ``loss_stride`` > 1 evaluates the loss on a coarser grid (occlusion mask average-pooled) to save memory on CPU.
* The teacher's affine validity mask is warped by the flow into frame a before use (the official code multiplies
  it unwarped).
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import cv2
import numpy as np
import torch
from torch import nn

from densekit.serve.backbones import DenseBackbone
from densekit.serve.errors import DensekitError
from densekit.train.augment import POODLE, Photometric, normalize
from densekit.train.flow import OCC_ALPHA1, OCC_ALPHA2, FlowEstimator, affine_to_normalized, resolve_flow_method
from densekit.train.heads import mlp_head
from densekit.train.losses import BYOLLoss, FlowEquivarianceLoss
from densekit.train.objective import Objective, Transform

MAX_TRIES_PER_CROP = 5  # official code: MAX_TRIES_PER_CROP = 5


# ----------------------------------------------------------------------------------------------------------------
# CPU transform


class PooDLeTransform:
    """Frame pair -> two augmented views, their affines, forward/backward flow and flow-paired subcrops.

    ``__call__([frame_t, frame_t+d] (H, W, 3) uint8, rng)`` returns (shapes for crop (Hc, Wc) = ``crop_size`` or
    the frames' own size, K subcrops of S):

    * ``view0``, ``view1``: (3, Hc, Wc) float32, colour-augmented, affine-augmented, normalised.
    * ``theta0``, ``theta1``: (2, 3) float32 normalised affine: original position -> position in the view.
    * ``flow01``, ``flow10``: (2, Hc, Wc) float32 flow between the *unaugmented* crops (pixels, x then y).
    * ``crops_s``, ``crops_t``: (2, K, 3, S, S) float32 student / teacher subcrops; index 0 = student crops from
      frame 0 paired into frame 1, index 1 = the reverse direction. ``paired``: (2, K) int64, 1 = teacher crop came
      from the other frame, 0 = same-frame fallback.
    """

    def __init__(self, *, crop_size: tuple[int, int] | None, resize_short: int, resize_scale: tuple[float, float],
                 input_multiple: int,
                 mean: tuple[float, ...], std: tuple[float, ...], flow_method: str,
                 affine_degrees: float, affine_scale: tuple[float, float], flip: bool,
                 subcrop_num: int, subcrop_scale: tuple[float, float], subcrop_ratio: tuple[float, float],
                 subcrop_size: int, subcrop_jitter: float, color: Photometric = POODLE) -> None:
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.resize_short, self.resize_scale = int(resize_short), tuple(resize_scale)
        self.input_multiple = int(input_multiple)
        self.mean, self.std = tuple(mean), tuple(std)
        self.flow = FlowEstimator(flow_method)
        self.affine_degrees, self.affine_scale, self.flip = float(affine_degrees), tuple(affine_scale), bool(flip)
        self.subcrop_num, self.subcrop_scale = int(subcrop_num), tuple(subcrop_scale)
        self.subcrop_ratio, self.subcrop_size = tuple(subcrop_ratio), int(subcrop_size)
        self.subcrop_jitter = float(subcrop_jitter)
        self.color = color

    def __call__(self, frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if len(frames) != 2:
            raise DensekitError(f"poodle needs frame pairs, got {len(frames)} frame(s)")
        a, b = self._crop_pair(frames[0], frames[1], rng)
        fwd, bwd = self.flow.pair(a, b)
        col = [self.color(x.astype(np.float32) / 255.0, rng) for x in (a, b)]
        out: dict[str, np.ndarray] = {}
        for i in (0, 1):
            view, theta = self._affine_view(col[i], rng)
            out[f"view{i}"], out[f"theta{i}"] = view, theta
        out["flow01"] = np.ascontiguousarray(fwd.transpose(2, 0, 1))
        out["flow10"] = np.ascontiguousarray(bwd.transpose(2, 0, 1))
        s0, t0, p0 = self._paired_subcrops(col[0], col[1], fwd, rng)
        s1, t1, p1 = self._paired_subcrops(col[1], col[0], bwd, rng)
        out["crops_s"], out["crops_t"] = np.stack([s0, s1]), np.stack([t0, t1])
        out["paired"] = np.stack([p0, p1]).astype(np.int64)
        return out

    def _crop_pair(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Resize both frames (short side ``resize_short`` x U(resize_scale)) and cut the same random window.

        Without ``crop_size`` the frames are used as given (the trainer's data layer already resized and cropped
        them to ``data.size``, the same window for both frames).
        """
        h, w = a.shape[:2]
        if b.shape[:2] != (h, w):
            b = cv2.resize(b, (w, h), interpolation=cv2.INTER_AREA)
        if self.crop_size is None:
            m = self.input_multiple
            if h % m or w % m:
                raise DensekitError(f"poodle needs frame sizes that are multiples of {m}, got {h}x{w} "
                                    "(set data.size or the crop_size hyper-parameter)")
            return np.ascontiguousarray(a), np.ascontiguousarray(b)
        ch, cw = self.crop_size
        r = self.resize_short * rng.uniform(*self.resize_scale) / min(h, w)
        r = max(r, ch / h, cw / w)
        nh, nw = max(ch, int(math.ceil(h * r))), max(cw, int(math.ceil(w * r)))
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        a, b = (cv2.resize(x, (nw, nh), interpolation=interp) for x in (a, b))
        top, left = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
        win = (slice(top, top + ch), slice(left, left + cw))
        return np.ascontiguousarray(a[win]), np.ascontiguousarray(b[win])

    def _affine_view(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random rotation/scale about the centre (+ horizontal flip p 0.5) -> (normalised view, theta)."""
        h, w = img.shape[:2]
        angle = rng.uniform(-self.affine_degrees, self.affine_degrees)
        scale = rng.uniform(*self.affine_scale)
        m = np.vstack([cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, scale), [0, 0, 1]])
        if self.flip and rng.random() < 0.5:
            m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
        view = cv2.warpAffine(img, m[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(0.0, 0.0, 0.0))
        return normalize(view, self.mean, self.std), affine_to_normalized(m[:2], h, w)

    def _box(self, h: int, w: int, scale: float, rng: np.random.Generator) -> tuple[int, int]:
        """(height, width) of a crop with area ``scale`` * h * w and a log-uniform aspect ratio, inside (h, w)."""
        r = math.exp(rng.uniform(math.log(self.subcrop_ratio[0]), math.log(self.subcrop_ratio[1])))
        area = scale * h * w
        return (max(2, min(h, int(round(math.sqrt(area / r))))), max(2, min(w, int(round(math.sqrt(area * r))))))

    def _paired_subcrops(self, src: np.ndarray, dst: np.ndarray, flow: np.ndarray,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """K student crops of ``src`` and their flow-paired teacher crops of ``dst`` (PooDLe's crop search).

        Crop centres are spread over a coarse grid of cells (one cell per crop, sampled without replacement when
        there are enough cells), as the official code does.
        Returns: student (K, 3, S, S), teacher (K, 3, S, S), paired (K,) flags.
        """
        h, w = src.shape[:2]
        res = max(1, round(math.sqrt(sum(self.subcrop_scale) / 2) * min(h, w)))
        cells = [(i, j) for i in range(h // res + 1) for j in range(w // res + 1)]
        k = self.subcrop_num
        picks = rng.choice(len(cells), size=k, replace=k > len(cells))
        students, teachers, paired = [], [], []
        for gi, gj in (cells[int(c)] for c in picks):
            s = rng.uniform(*self.subcrop_scale)
            ch, cw = self._box(h, w, s, rng)
            found = False
            for _ in range(MAX_TRIES_PER_CROP):
                cy, cx = self._centre(gi, gj, res, h, w, ch, cw, rng)
                jitter = np.array([h, w]) * rng.uniform(-1, 1, size=2) * self.subcrop_jitter
                ty = cy + flow[cy, cx, 1] + jitter[0]
                tx = cx + flow[cy, cx, 0] + jitter[1]
                if 0 <= ty < h and 0 <= tx < w:
                    found = True
                    break
            if not found:
                cy, cx = self._centre(gi, gj, res, h, w, ch, cw, rng)
                ty, tx = float(cy), float(cx)
            students.append(self._resize(src, cy - ch // 2, cx - cw // 2, ch, cw))
            th, tw = self._box(h, w, rng.uniform(s, self.subcrop_scale[1]), rng)
            y0 = int(np.clip(round(ty - th / 2), 0, h - 2))
            x0 = int(np.clip(round(tx - tw / 2), 0, w - 2))
            y1, x1 = min(h, y0 + th), min(w, x0 + tw)  # clamped like the official code (crop may shrink)
            teachers.append(self._resize(dst if found else src, y0, x0, y1 - y0, x1 - x0))
            paired.append(int(found))
        return np.stack(students), np.stack(teachers), np.asarray(paired)

    @staticmethod
    def _centre(gi: int, gj: int, res: int, h: int, w: int, ch: int, cw: int,
                rng: np.random.Generator) -> tuple[int, int]:
        cy = int(rng.integers(min(gi * res, h - 1), min((gi + 1) * res, h)))
        cx = int(rng.integers(min(gj * res, w - 1), min((gj + 1) * res, w)))
        # keep the student crop inside the frame
        return int(np.clip(cy, ch // 2, h - (ch - ch // 2))), int(np.clip(cx, cw // 2, w - (cw - cw // 2)))

    def _resize(self, img: np.ndarray, y0: int, x0: int, ch: int, cw: int) -> np.ndarray:
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        s = self.subcrop_size
        crop = cv2.resize(crop, (s, s), interpolation=cv2.INTER_AREA if min(ch, cw) > s else cv2.INTER_LINEAR)
        return normalize(crop, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------------------
# the backbone stage the pooled branch reads


def _pooled_stage(backbone: DenseBackbone) -> str:
    """The stage PooDLe's pooled branch reads: the last encoder stage, the one before the spatial decoder
    (``layer4`` of a ResNet with the decoder)."""
    stages = getattr(backbone.body, "stage_info", None) or []
    if len(stages) < 2 or stages[-1].name != "decoder":
        raise DensekitError(
            f"poodle needs a backbone with the spatial decoder (resnet18/resnet50 with decoder=True), "
            f"got {backbone.meta.name!r} (arch {backbone.meta.arch.get('family', '?')}, "
            f"decoder={bool(backbone.meta.arch.get('decoder'))})"
        )
    return stages[-2].name


def _encode_pooled(backbone: DenseBackbone, stage: str, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) -> (N, C) average-pooled features of ``stage`` (the decoder does not run)."""
    return backbone.forward_stages(x, last=stage)[-1].mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# the objective


class PooDLe(Objective):
    """PooDLe (ICLR 2025) on a densekit ResNet with the spatial decoder.

    Batch (from :meth:`transform`, see :class:`PooDLeTransform`): ``view0``, ``view1`` (B, 3, Hc, Wc);
    ``theta0``, ``theta1`` (B, 2, 3); ``flow01``, ``flow10`` (B, 2, Hc, Wc); ``crops_s``, ``crops_t``
    (B, 2, K, 3, S, S); ``paired`` (B, 2, K).
    Logged: ``loss``, ``loss_dense``, ``loss_pooled``, ``mask`` (mean dense mask coverage), ``paired`` (fraction
    of subcrops paired across frames).

    Hyper-parameters (defaults from ``configs/exp/poodle.yaml`` unless noted):
        dense_weight 0.5, pooled_weight 0.5 (loss_weights); hidden_dim 4096, proj_dim 256 (mlp_hidden_dim,
        proj_dim); base_momentum 0.996 (cosine to 1); alpha1 0.1, alpha2 0.5 (occlusion); crop_size None = use
        the frames as the trainer's data layer delivers them (``data.size``; the paper's is [512, 1024],
        initial_crop_size); with a crop_size the transform resizes the short side to resize_short (default
        crop_h * 1080 / 512, their 1080p frames) times U(resize_scale = (0.75, 1.25)) (initial_scale) and cuts
        the same window from both frames; affine_degrees 10, affine_scale
        (0.9, 1.1), flip (affine_aug_params + RandomHorizontalFlip); subcrop_num 6, subcrop_scale (0.05, 0.3),
        subcrop_ratio (0.75, 1.3333), subcrop_size 192, subcrop_jitter 0.10; loss_stride 1 (image resolution,
        densekit's knob); flow "auto" (RAFT with local torchvision weights, else OpenCV DIS).
    """

    name: ClassVar[str] = "poodle"
    data: ClassVar[str] = "pairs"
    backbone_decoder: ClassVar[bool] = True  # the trainer builds the backbone with the spatial decoder

    def __init__(self, backbone: DenseBackbone, *, dense_weight: float = 0.5, pooled_weight: float = 0.5,
                 hidden_dim: int = 4096, proj_dim: int = 256, base_momentum: float = 0.996,
                 alpha1: float = OCC_ALPHA1, alpha2: float = OCC_ALPHA2,
                 crop_size: tuple[int, int] | None = None, resize_short: int | None = None,
                 resize_scale: tuple[float, float] = (0.75, 1.25), affine_degrees: float = 10.0,
                 affine_scale: tuple[float, float] = (0.9, 1.1), flip: bool = True, subcrop_num: int = 6,
                 subcrop_scale: tuple[float, float] = (0.05, 0.3), subcrop_ratio: tuple[float, float] = (0.75, 1.3333),
                 subcrop_size: int = 192, subcrop_jitter: float = 0.10, loss_stride: int = 1,
                 flow: str = "auto") -> None:
        if crop_size is not None:
            crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else (int(crop_size[0]), int(crop_size[1]))
        super().__init__(backbone, dense_weight=dense_weight, pooled_weight=pooled_weight, hidden_dim=hidden_dim,
                         proj_dim=proj_dim, base_momentum=base_momentum, alpha1=alpha1, alpha2=alpha2,
                         crop_size=crop_size, resize_short=resize_short, resize_scale=tuple(resize_scale),
                         affine_degrees=affine_degrees, affine_scale=tuple(affine_scale), flip=flip,
                         subcrop_num=subcrop_num, subcrop_scale=tuple(subcrop_scale),
                         subcrop_ratio=tuple(subcrop_ratio), subcrop_size=subcrop_size,
                         subcrop_jitter=subcrop_jitter, loss_stride=loss_stride, flow=flow)
        self.pooled_stage = _pooled_stage(backbone)
        mult = backbone.meta.input_multiple
        if crop_size is not None and (crop_size[0] % mult or crop_size[1] % mult):
            raise DensekitError(f"poodle crop_size {crop_size} must be multiples of {mult} for {backbone.meta.name}")
        if subcrop_size < 32 or subcrop_num < 1:
            raise DensekitError("poodle needs subcrop_size >= 32 (one layer4 cell) and subcrop_num >= 1")
        if loss_stride < 1 or mult % loss_stride:
            raise DensekitError(f"poodle loss_stride {loss_stride} must divide the input multiple {mult}")
        self.flow_method = resolve_flow_method(flow)  # "raft_small" / "raft_large" / "dis" / "farneback"
        self.dense_weight, self.pooled_weight = float(dense_weight), float(pooled_weight)
        self.base_momentum, self.alpha1, self.alpha2 = float(base_momentum), float(alpha1), float(alpha2)
        self.loss_stride = int(loss_stride)
        self.crop_size = crop_size
        self.resize_short = int(resize_short) if resize_short else int(round((crop_size or (0,))[0] * 1080 / 512))

        dec_dim = backbone.meta.dim
        last_dim = backbone.body.stage(self.pooled_stage).channels
        # PooDLe's (BYOL's) projectors and predictors: Linear-BN-ReLU-Linear, the dense ones per location
        self.dense_projector = mlp_head(dec_dim, [hidden_dim, proj_dim], dense=True)
        self.dense_predictor = mlp_head(proj_dim, [hidden_dim, proj_dim], dense=True)
        self.pooled_projector = mlp_head(last_dim, [hidden_dim, proj_dim])
        self.pooled_predictor = mlp_head(proj_dim, [hidden_dim, proj_dim])
        self.dense_loss = FlowEquivarianceLoss(self.loss_stride, self.alpha1, self.alpha2)
        self.pooled_loss = BYOLLoss()
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_dense_projector = copy.deepcopy(self.dense_projector)
        self.teacher_pooled_projector = copy.deepcopy(self.pooled_projector)
        for module in self._teacher_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.register_buffer("momentum", torch.tensor(self.base_momentum, dtype=torch.float64))

    def _student_modules(self) -> list[nn.Module]:
        return [self.backbone, self.dense_projector, self.pooled_projector]

    def _teacher_modules(self) -> list[nn.Module]:
        return [self.teacher_backbone, self.teacher_dense_projector, self.teacher_pooled_projector]

    # -- data ----------------------------------------------------------------------------------------------------
    def transform(self) -> Transform:
        """The pair transform (see :class:`PooDLeTransform`); flow method already resolved."""
        hp, meta = self.hparams, self.backbone.meta
        return PooDLeTransform(crop_size=self.crop_size, resize_short=self.resize_short,
                               input_multiple=meta.input_multiple, resize_scale=hp["resize_scale"],
                               mean=meta.mean, std=meta.std,
                               flow_method=self.flow_method, affine_degrees=hp["affine_degrees"],
                               affine_scale=hp["affine_scale"], flip=hp["flip"], subcrop_num=hp["subcrop_num"],
                               subcrop_scale=hp["subcrop_scale"], subcrop_ratio=hp["subcrop_ratio"],
                               subcrop_size=hp["subcrop_size"], subcrop_jitter=hp["subcrop_jitter"])

    # -- model ---------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Dense loss in both directions plus pooled subcrop loss (see class docstring for the batch)."""
        x = torch.cat([batch["view0"], batch["view1"]])  # (2B, 3, H, W): student frame a
        xt = torch.cat([batch["view1"], batch["view0"]])  # teacher frame b
        theta_s = torch.cat([batch["theta0"], batch["theta1"]])
        theta_t = torch.cat([batch["theta1"], batch["theta0"]])
        fwd = torch.cat([batch["flow01"], batch["flow10"]]).float()
        bwd = torch.cat([batch["flow10"], batch["flow01"]]).float()

        z = self.dense_predictor(self.dense_projector(self.backbone(x)))  # (2B, P, H/8, W/8)
        with torch.no_grad():
            zt = self.teacher_dense_projector(self.teacher_backbone(xt))
        dense, coverage = self.dense_loss(z, zt, fwd, bwd, theta_s, theta_t)

        crops_s = batch["crops_s"].flatten(0, 2)  # (B*2*K, 3, S, S)
        crops_t = batch["crops_t"].flatten(0, 2)
        online = self.pooled_predictor(self.pooled_projector(_encode_pooled(self.backbone, self.pooled_stage, crops_s)))
        with torch.no_grad():
            target = self.teacher_pooled_projector(_encode_pooled(self.teacher_backbone, self.pooled_stage, crops_t))
        pooled = self.pooled_loss(online, target)

        loss = self.dense_weight * dense + self.pooled_weight * pooled
        return {"loss": loss, "loss_dense": dense.detach(), "loss_pooled": pooled.detach(),
                "mask": coverage.detach(), "paired": batch["paired"].float().mean()}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """EMA teacher update with momentum 1 - (1 - base) (cos(pi k / K) + 1) / 2 (BYOL schedule, PooDLe)."""
        frac = min(1.0, (step + 1) / max(1, max_steps))
        m = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * frac) + 1.0) / 2.0
        for student, teacher in zip(self._student_modules(), self._teacher_modules()):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
        self.momentum.fill_(m)
