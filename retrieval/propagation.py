"""Semi-supervised video object segmentation by label propagation over frozen dense features.

The protocol is the one of CRW / "STC" (Jabri et al., NeurIPS 2020, ``ajabri/videowalk``) that DINO
(Caron et al., ICCV 2021, ``facebookresearch/dino: eval_video_segmentation.py``) follows: a target frame's
soft label map is a weighted average of context labels, where the context is the first frame (with its
given mask) plus the ``n_last`` most recent frames (with their *predicted soft* maps). For each target
position:

1. cosine affinity ``s`` (features are L2-normalised) against every candidate position of every context
   frame; candidates of a windowed context frame are restricted to a spatial neighbourhood of the
   query position on the feature grid (positions outside the image are excluded, never zero-scored);
2. the top-k candidates are taken **jointly** over all context frames (k in total, not per frame);
3. weights ``exp(s / T)`` renormalised over those k (== softmax over the top-k at temperature T);
4. the soft label is the weighted sum of the candidates' soft labels.

Two implementations share steps 3-4 and this module's tie rule:

* :func:`propagate_step_dense` - the straightforward all-pairs version, as the references do it: a dense
  ``hw x (n_context * hw)`` affinity with the windows applied as masks. Memory grows with ``(h*w)^2`` per
  context frame (DINO's reference: ~1.25 GB per such tensor at 480p, stride 8, 8 contexts). Kept as the
  reference for tests and ``benchmarks/propagation.py``.
* :func:`propagate_step` - the fast one. Windowed context frames are scored only over local windows: one
  batched GEMM per group of ``tile`` target columns scores, for every source row, the target rows whose
  window holds it against that row's band of ``tile + 2r`` columns; each target position's exact
  ``(2r+1)^2`` window is then a strided view of those products (:func:`_window_topk`). Per context frame
  a top-k is taken and the per-frame top-ks are merged into the joint top-k (exact: the top-k of a
  union is the top-k of the union of per-part top-ks under one total order). Unwindowed frames (CRW's
  first frame) are scored fully but in chunks of query rows, so memory stays bounded for any grid size.
  :class:`MaskPropagator` keeps every context frame in the channels-last layout this path reads, made
  once when the frame enters the context.

**Tie rule** (both implementations): candidates are ranked by score descending and, among equal scores,
by their position in the concatenated candidate list ``[context 0 positions, context 1 positions, ...]``
with positions in raster order (``y * w + x``) - i.e. the lower ``(context index, y, x)`` wins. Exactly
k candidates are kept (DINO's reference keeps every candidate tied with the k-th value). The scores of
the k kept candidates are then recomputed in float64 for the weights, and summed in candidate-index
order, so both implementations give the same soft labels whenever they keep the same candidates (the
float32 scores used for the *selection* come from differently shaped GEMMs, so a near-tie at the
k-boundary within float32 rounding could in principle still differ).

Presets (:data:`PRESETS`, :func:`preset`):

* ``dino``: ``n_last=7, topk=5, radius=12`` as a square ``(2r+1)^2`` window on every context frame
  including the first, ``temperature=0.1`` (hard-coded in DINO's script); frames resized so the shorter
  side is 480 and the longer side is floored to a multiple of 64 (DINO's ``read_frame``); the first mask is
  resized to the feature grid by nearest neighbour (PIL-style pixel centres, DINO's ``read_seg``); output:
  bilinear upsampling by the stride, per-channel min-max ``norm_mask``, argmax, nearest resize to the
  original size.
* ``crw``: ``n_last=20, topk=10, radius=12`` as Euclidean distance ``< r`` on the short-term frames only
  (not on the first frame), ``temperature=0.05`` (videowalk README's DAVIS command); native resolution
  floored to the input multiple (videowalk keeps 854 px and gets ceil(854/8) = 107 columns; here the
  extractor needs a multiple, so 848 px -> 106); the first mask is one-hot and resized bilinearly (soft)
  to the feature grid (videowalk ``data/vos.py``: ``cv2.resize(onehot, ..., INTER_LINEAR)``, which is
  torch's ``bilinear, align_corners=False`` without antialiasing); output: bilinear resize to the image
  and argmax. Like videowalk's ``make_paths`` (which pads the
  video with ``videoLen`` copies of frame 0), the short-term queue starts filled with copies of the first
  frame (``pad_with_first``).
* ``live`` (densekit's, for tracking as frames arrive on a CPU): ``dino`` with ``n_last=2`` and a shorter
  side of 360, i.e. 3 context frames instead of 8 on a grid 1.8x smaller, so about 5x less propagation
  work. Chosen on davis2016-mini with EfficientNet-Lite0 features at 360p (J&F-Mean, dino's own 0.750):
  ``n_last`` 3 / 2 / 1 at radius 12 gave 0.742 / 0.736 / 0.727, while radius 10 / 8 / 6 cost far more
  (n_last=2: 0.725 at radius 10; n_last=3: 0.729 at 10, 0.682 at 8, 0.643 at 6), so the window keeps
  DINO's radius and the short-term queue is what shrinks. It also scores in the 64 leading principal
  directions of the reference frame's features (``pca_dim=64``): little saving for EfficientNet-Lite0's
  80 channels, 4x fewer multiply-adds in the window search for ResNet-18's 256 (360p: 168 -> 66 ms
  per frame on 2 cores), and no loss on davis2016-mini with EfficientNet-Lite0 - J&F-Mean 0.736 -> 0.740
  (live, 360p), 0.778 -> 0.781 (dino, 480p), 0.818 -> 0.818 (crw, 480p); 32 directions moved it by
  +0.026 / +0.001 / -0.014, too unsteady to choose.

A ``short_side`` override (``preset(name, short_side=S)``, ``--short-side S``) always means the ``dino``
resize to that shorter side, native presets included (:func:`preset`'s short-side rule); with the config,
:func:`processing_size` alone decides the size a frame is processed at, and masks come back at the frame's
own size. :func:`densekit.retrieval.davis_protocol.score_davis` relies on that: nobody resizes around it.

:class:`MaskPropagator` is the streaming API (``start`` / ``step`` / ``reset_mask`` / ``stream``) around a
feature extractor (``densekit.serve.extractor.FeatureExtractor`` or anything with the same protocol).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError

__all__ = [
    "PRESETS",
    "MaskPropagator",
    "PropagationConfig",
    "config_from_options",
    "preset",
    "processing_size",
    "propagate_step",
    "propagate_step_dense",
]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class PropagationConfig:
    """Every knob of the propagation; the defaults are DINO's (see :data:`PRESETS`).

    Attributes:
        n_last: number of most recent frames kept as short-term context (besides the first frame).
        topk: candidates kept per target position, jointly over all context frames.
        temperature: softmax temperature T; weights are ``exp(s / T)`` renormalised over the top-k.
        radius: spatial radius on the feature grid in cells; ``None`` or ``<= 0`` means no restriction.
        window: ``"square"`` (Chebyshev distance ``<= radius``, a ``(2r+1)^2`` window, DINO) or
            ``"euclidean"`` (``dy^2 + dx^2 < radius^2``, CRW).
        window_first: whether the window also restricts the first frame (DINO: yes, CRW: no).
        resize: ``"dino"`` (shorter side -> ``short_side``, longer side floored to ``long_multiple``) or
            ``"native"`` (original size); both are then floored to the extractor's input multiple.
        short_side: target shorter side for ``resize="dino"``.
        long_multiple: the longer side is floored to a multiple of this for ``resize="dino"``.
        mask_downsample: first mask to the feature grid: ``"nearest"`` (ids, then one-hot) or
            ``"bilinear"`` (one-hot, then soft bilinear).
        output: ``"dino"`` (bilinear x stride, ``norm_mask``, argmax, nearest to the original size) or
            ``"crw"`` (bilinear to the original size, argmax).
        pad_with_first: start the short-term queue filled with ``n_last`` copies of the first frame.
        pca_dim: project every frame's features onto the ``pca_dim`` leading principal directions
            (uncentred) of the reference frame's features, then re-normalise, before any scoring; the
            reference frame is the first frame, or the frame of the latest ``reset_mask``. ``None``, or
            a value >= the feature dimension, keeps the features as they are. It cuts the window
            search's cost in proportion for wide features (ResNet's D = 256); what it does to J&F is
            measured in ``benchmarks/live_latency.py``.
        tile: width of the target column groups of the fast window path (speed only; results do not
            depend on it).
        chunk_elems: about how many float32 scores the fast path holds at once (memory only).
    """

    n_last: int = 7
    topk: int = 5
    temperature: float = 0.1
    radius: float | None = 12
    window: Literal["square", "euclidean"] = "square"
    window_first: bool = True
    resize: Literal["dino", "native"] = "dino"
    short_side: int = 480
    long_multiple: int = 64
    mask_downsample: Literal["nearest", "bilinear"] = "nearest"
    output: Literal["dino", "crw"] = "dino"
    pad_with_first: bool = False
    pca_dim: int | None = None
    tile: int = 8
    chunk_elems: int = 7_000_000

    def __post_init__(self) -> None:
        def bad(msg: str) -> DensekitError:
            return DensekitError(f"invalid propagation config: {msg}")

        if int(self.n_last) != self.n_last or self.n_last < 0:
            raise bad(f"n_last must be an integer >= 0, got {self.n_last!r}")
        if int(self.topk) != self.topk or self.topk < 1:
            raise bad(f"topk must be an integer >= 1, got {self.topk!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise bad(f"temperature must be > 0, got {self.temperature!r}")
        if self.radius is not None and not isinstance(self.radius, (int, float)):
            raise bad(f"radius must be a number or None, got {self.radius!r}")
        choices = {
            "window": ("square", "euclidean"),
            "resize": ("dino", "native"),
            "mask_downsample": ("nearest", "bilinear"),
            "output": ("dino", "crw"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.short_side < 1 or self.long_multiple < 1:
            raise bad("short_side and long_multiple must be >= 1")
        if self.pca_dim is not None and (isinstance(self.pca_dim, bool) or not isinstance(self.pca_dim, int)
                                         or self.pca_dim < 1):
            raise bad(f"pca_dim must be an integer >= 1 or None, got {self.pca_dim!r}")
        if self.tile < 1 or self.chunk_elems < 1:
            raise bad("tile and chunk_elems must be >= 1")

    @property
    def windowed(self) -> bool:
        """Whether a spatial radius applies at all."""
        return self.radius is not None and self.radius > 0


PRESETS: dict[str, PropagationConfig] = {
    # DINO eval_video_segmentation.py defaults (n_last_frames 7, topk 5, size_mask_neighborhood 12, T 0.1).
    "dino": PropagationConfig(),
    # videowalk README DAVIS command: --topk 10 --videoLen 20 --radius 12 --temperature 0.05 --cropSize -1.
    "crw": PropagationConfig(
        n_last=20,
        topk=10,
        temperature=0.05,
        radius=12,
        window="euclidean",
        window_first=False,
        resize="native",
        mask_downsample="bilinear",
        output="crw",
        pad_with_first=True,
    ),
    # Live tracking on a CPU: DINO's protocol with 2 short-term frames instead of 7, 360p processing and
    # features reduced to 64 principal directions. The radius stays 12: on davis2016-mini it matters far
    # more than the number of frames (see the module docstring and benchmarks/live_latency.py).
    "live": PropagationConfig(n_last=2, short_side=360, pca_dim=64),
}


def preset(name: str, **overrides: Any) -> PropagationConfig:
    """A preset config (``"dino"``, ``"crw"``, ``"live"``) with fields overridden, e.g. ``preset("crw", topk=5)``.

    The short-side rule: a ``short_side`` override without a ``resize`` override turns ``resize="dino"``
    on (shorter side -> ``short_side``, longer side floored to ``long_multiple``), also for a native preset
    such as ``crw``, which would otherwise ignore it and run at full size while its caller believes it
    asked for less. Pass ``resize="native"`` with it to keep the native size.
    """
    if name not in PRESETS:
        raise DensekitError(f"unknown propagation preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(PropagationConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DensekitError(f"unknown propagation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "short_side" in overrides and "resize" not in overrides:
        overrides["resize"] = "dino"
    return replace(PRESETS[name], **overrides)


def config_from_options(
    name: str,
    *,
    n_context: int | None = None,
    topk: int | None = None,
    radius: float | None = None,
    temperature: float | None = None,
    short_side: int | None = None,
) -> PropagationConfig:
    """The config of the command line's (and the app's, and the benchmarks') propagation options: preset
    ``name`` with every option that was given (not None) overriding its field; ``n_context`` is ``n_last``.
    ``short_side`` follows :func:`preset`'s short-side rule."""
    given = {"n_last": n_context, "topk": topk, "radius": radius, "temperature": temperature, "short_side": short_side}
    return preset(name, **{k: v for k, v in given.items() if v is not None})


def _as_config(config: PropagationConfig | str) -> PropagationConfig:
    return preset(config) if isinstance(config, str) else config


# ----------------------------------------------------------------------------------------------------
# shared pieces of both implementations


def _windowed_flags(n_context: int, config: PropagationConfig) -> list[bool]:
    """Which context frames (index 0 = first frame) are restricted to a window."""
    return [config.windowed and (i > 0 or config.window_first) for i in range(n_context)]


def _pca_basis(ref: torch.Tensor, dim: int | None) -> torch.Tensor | None:
    """(D, dim) float32 leading eigenvectors of ``ref.T @ ref`` for (n, D) rows ``ref``; None if dim >= D.

    Uncentred (the second moment, not the covariance): projecting onto these directions keeps as much
    of the rows' inner products - the cosine scores - as any ``dim``-dimensional projection can.
    """
    if dim is None or dim >= ref.shape[1]:
        return None
    ref64 = ref.double()
    _, vecs = torch.linalg.eigh(ref64.T @ ref64)  # ascending eigenvalues
    return vecs[:, -dim:].flip(1).float().contiguous()


def _project(rows: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """(n, D) rows -> (n, dim) unit rows in the basis (unchanged when there is no basis)."""
    return rows if basis is None else F.normalize(rows @ basis, dim=1)


def _allowed(dy: torch.Tensor, dx: torch.Tensor, config: PropagationConfig) -> torch.Tensor:
    """Whether an offset (source - query, in feature cells) lies inside the window (bool, broadcast)."""
    r = float(config.radius)  # type: ignore[arg-type]
    if config.window == "square":
        return (dy.abs() <= r) & (dx.abs() <= r)
    return (dy * dy + dx * dx) < r * r


def _window_extent(config: PropagationConfig, h: int, w: int) -> tuple[int, int]:
    """Largest |dy|, |dx| that can be allowed, clamped to the grid (offsets beyond it never exist)."""
    r = float(config.radius)  # type: ignore[arg-type]
    reach = math.floor(r)
    if config.window == "euclidean" and reach * reach >= r * r:
        reach -= 1  # strict inequality: an integer radius excludes the offset at exactly r
    return max(0, min(reach, h - 1)), max(0, min(reach, w - 1))


def _topk_ordered(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim of a 2-D tensor under the total order (value desc, index asc).

    ``torch.topk`` does not define which of several equal values it returns. One extra value is fetched:
    a row whose (k+1)-th value equals its k-th has a tie across the boundary and is redone with a stable
    descending sort (rare for real-valued features, common for flat synthetic ones). Rows whose k-th
    value is ``-inf`` are left alone: those candidates get zero weight whichever is picked.
    """
    n = x.shape[1]
    vals, idx = torch.topk(x, min(k + 1, n), dim=-1)
    if vals.shape[1] <= k:
        return vals, idx
    tied = (vals[:, k] == vals[:, k - 1]) & torch.isfinite(vals[:, k - 1])
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    rows = tied.nonzero().flatten()
    step = max(1, (1 << 22) // max(1, n))
    for start in range(0, rows.numel(), step):
        r = rows[start : start + step]
        sv, si = torch.sort(x[r], dim=-1, descending=True, stable=True)
        vals[r] = sv[:, :k]
        idx[r] = si[:, :k]
    return vals, idx


def _merge_topk(vals: torch.Tensor, gidx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint top-k of concatenated per-part top-ks, same total order as :func:`_topk_ordered`."""
    gidx, order = torch.sort(gidx, dim=-1, stable=True)
    vals = vals.gather(-1, order)
    vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
    k = min(k, vals.shape[1])
    return vals[:, :k], gidx.gather(-1, order[:, :k])


def _aggregate(
    queries: torch.Tensor,
    vals: torch.Tensor,
    gidx: torch.Tensor,
    ctx_rows: Sequence[torch.Tensor],
    labels_flat: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Softmax-weighted label average over the kept candidates.

    Args:
        queries: (Q, D) target features. vals: (Q, k) float32 scores of the kept candidates (``-inf`` =
            excluded). gidx: (Q, k) indices into the flattened context (``context * hw + y * w + x``).
        ctx_rows: per context frame, its (hw, D) features. labels_flat: (m*hw, C) context soft labels.

    Returns:
        (Q, C) float32 soft labels. Scores are recomputed in float64 and summed in index order so that
        any two selections of the same candidates give the same result bit for bit.
    """
    valid = torch.isfinite(vals)
    gidx = torch.where(valid, gidx, torch.zeros_like(gidx))
    gidx, order = torch.sort(gidx, dim=-1, stable=True)
    valid = valid.gather(-1, order)
    out = torch.empty(queries.shape[0], labels_flat.shape[1], dtype=torch.float32)
    hw, D = ctx_rows[0].shape
    # Fewer context frames than kept candidates (live presets): copying the frames into one matrix is
    # cheaper than sorting the candidates by frame and putting the gathered rows back in order. Both
    # give the same rows, hence the same result.
    all_rows = torch.cat(list(ctx_rows), 0) if len(ctx_rows) <= gidx.shape[1] else None
    # Small chunks keep every temporary far below glibc's mmap threshold, so memory is reused rather
    # than page-faulted in afresh on each call.
    step = 1024
    for s in range(0, queries.shape[0], step):
        g, ok = gidx[s : s + step], valid[s : s + step]
        q = queries[s : s + step].double()
        flat = g.reshape(-1)
        if all_rows is not None:
            f = all_rows.index_select(0, flat).view(g.shape[0], g.shape[1], D)
        else:
            # Gather candidate features context by context (entries grouped by context with one sort).
            ctx_sorted, order = torch.sort(torch.div(flat, hw, rounding_mode="floor"), stable=True)
            pos_sorted = flat[order] - ctx_sorted * hw
            counts = torch.bincount(ctx_sorted, minlength=len(ctx_rows)).tolist()
            f_sorted = torch.empty(flat.shape[0], D)
            start = 0
            for rows, n in zip(ctx_rows, counts):
                if n:
                    torch.index_select(rows, 0, pos_sorted[start : start + n], out=f_sorted[start : start + n])
                    start += n
            f = torch.empty_like(f_sorted).index_copy_(0, order, f_sorted).view(g.shape[0], g.shape[1], D)
        score = torch.bmm(f.double(), q[:, :, None])[..., 0]  # (q, k)
        score = score.masked_fill(~ok, _NEG_INF)
        top = score.max(-1, keepdim=True).values
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weight = torch.exp((score - top) / temperature)
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-300)
        out[s : s + step] = (weight[..., None] * labels_flat[g].double()).sum(1).float()
    return out


def _check_step_inputs(
    target: torch.Tensor, ctx_feats: Sequence[torch.Tensor], ctx_labels: Sequence[torch.Tensor]
) -> tuple[int, int, int, int]:
    if target.dim() != 3:
        raise DensekitError(f"target features must be (D, h, w), got shape {tuple(target.shape)}")
    if not ctx_feats or len(ctx_feats) != len(ctx_labels):
        raise DensekitError("need at least one context frame, with one label map per context feature map")
    D, h, w = target.shape
    C = ctx_labels[0].shape[0]
    for f, lab in zip(ctx_feats, ctx_labels):
        if tuple(f.shape) != (D, h, w) or lab.dim() != 3 or tuple(lab.shape) != (C, h, w):
            raise DensekitError(
                f"context shapes {tuple(f.shape)}/{tuple(lab.shape)} do not match target {(D, h, w)} / C={C}"
            )
    return D, h, w, C


# ----------------------------------------------------------------------------------------------------
# the two implementations


@torch.inference_mode()
def propagate_step_dense(
    target: torch.Tensor,
    ctx_feats: Sequence[torch.Tensor],
    ctx_labels: Sequence[torch.Tensor],
    config: PropagationConfig | str = "dino",
) -> torch.Tensor:
    """All-pairs reference: dense affinity of every target position with every context position.

    Args:
        target: (D, h, w) L2-normalised target features.
        ctx_feats: context features, each (D, h, w); index 0 is the first frame (the long-term memory,
            windowed only if ``config.window_first``), the rest are short-term frames.
        ctx_labels: matching soft label maps, each (C, h, w).
        config: a :class:`PropagationConfig` or preset name.

    Returns:
        (C, h, w) float32 soft labels of the target.

    Memory: one ``(h*w) x (m*h*w)`` float32 tensor plus an ``(h*w)^2`` window mask, as in the references.
    """
    cfg = _as_config(config)
    D, h, w, C = _check_step_inputs(target, ctx_feats, ctx_labels)
    hw, m = h * w, len(ctx_feats)
    flags = _windowed_flags(m, cfg)
    ctx_rows = [f.float().reshape(D, hw).T.contiguous() for f in ctx_feats]
    basis = _pca_basis(ctx_rows[0], cfg.pca_dim)
    ctx_rows = [_project(r, basis) for r in ctx_rows]
    queries = _project(target.float().reshape(D, hw).T.contiguous(), basis)
    blocked = None
    if any(flags):
        ys, xs = torch.arange(h), torch.arange(w)
        dy = (ys[None, :] - ys[:, None])[:, None, :, None]  # (query y, 1, source y, 1)
        dx = (xs[None, :] - xs[:, None])[None, :, None, :]
        blocked = ~_allowed(dy, dx, cfg).reshape(hw, hw)
    affinity = torch.empty(hw, m * hw)
    for i, windowed in enumerate(flags):
        block = affinity[:, i * hw : (i + 1) * hw]
        block.copy_(queries @ ctx_rows[i].T)
        if windowed:
            block.masked_fill_(blocked, _NEG_INF)
    vals, idx = _topk_ordered(affinity, min(cfg.topk, m * hw))
    del affinity
    labels_flat = torch.stack([lab.float() for lab in ctx_labels]).permute(0, 2, 3, 1).reshape(m * hw, C)
    out = _aggregate(queries, vals, idx, ctx_rows, labels_flat, cfg.temperature)
    return out.T.reshape(C, h, w).contiguous()


@torch.inference_mode()
def propagate_step(
    target: torch.Tensor,
    ctx_feats: Sequence[torch.Tensor],
    ctx_labels: Sequence[torch.Tensor],
    config: PropagationConfig | str = "dino",
) -> torch.Tensor:
    """Fast local-window propagation; same arguments and result as :func:`propagate_step_dense`.

    Each target position is scored only against its own window in each windowed context frame
    (:func:`_window_topk`); unwindowed frames are scored fully, in chunks. Each context frame yields its
    own top-k, merged at the end into the joint top-k. About ``config.chunk_elems`` scores exist at
    once - never an ``(h*w)^2`` tensor.
    """
    cfg = _as_config(config)
    _, h, w, _ = _check_step_inputs(target, ctx_feats, ctx_labels)
    feats = [_channels_last(f) for f in ctx_feats]
    basis = _pca_basis(feats[0], cfg.pca_dim)
    feats = [_project(f, basis) for f in feats]
    labels = [_channels_last(lab) for lab in ctx_labels]
    return _propagate_channels_last(_project(_channels_last(target), basis), feats, labels, h, w, cfg)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(K, h, w) -> contiguous float32 (h*w, K), rows in raster order."""
    return x.float().permute(1, 2, 0).reshape(-1, x.shape[0]).contiguous()


def _propagate_channels_last(
    query: torch.Tensor,
    ctx_cl: Sequence[torch.Tensor],
    labels_cl: Sequence[torch.Tensor],
    h: int,
    w: int,
    cfg: PropagationConfig,
) -> torch.Tensor:
    """:func:`propagate_step` on channels-last inputs (what :class:`MaskPropagator` keeps per frame).

    Args:
        query: (h*w, D) target features. ctx_cl: per context frame (h*w, D). labels_cl: per context
            frame (h*w, C) soft labels. Rows in raster order, float32, contiguous.

    Returns:
        (C, h, w) float32 soft labels.
    """
    hw, D = query.shape
    m, k = len(ctx_cl), cfg.topk
    flags = _windowed_flags(m, cfg)
    # Candidates are gathered per target position in column-major order (x, then y): the order in
    # which the window path produces them; unwindowed frames are transposed to match.
    part_vals: list[torch.Tensor] = []
    part_idx: list[torch.Tensor] = []
    windowed = [(i, ctx_cl[i]) for i in range(m) if flags[i]]
    if windowed:
        for vals_i, idx_i in _window_topk(query.view(h, w, D), windowed, h, w, cfg):
            part_vals.append(vals_i)
            part_idx.append(idx_i)
    if not all(flags):
        step = max(1, cfg.chunk_elems // hw)
        kf = min(k, hw)
        for i in range(m):
            if flags[i]:
                continue
            vals_r, idx_r = torch.empty(hw, kf), torch.empty(hw, kf, dtype=torch.long)
            for s in range(0, hw, step):
                vals_r[s : s + step], idx_r[s : s + step] = _topk_ordered(query[s : s + step] @ ctx_cl[i].T, kf)
            part_vals.append(vals_r.view(h, w, kf).transpose(0, 1).reshape(hw, kf))
            part_idx.append((idx_r + i * hw).view(h, w, kf).transpose(0, 1).reshape(hw, kf))
    vals, gidx = _merge_topk(torch.cat(part_vals, 1), torch.cat(part_idx, 1), k)
    labels_flat = torch.cat(list(labels_cl), 0)
    q_cols = query.view(h, w, D).transpose(0, 1).reshape(hw, D)
    out = _aggregate(q_cols, vals, gidx, ctx_cl, labels_flat, cfg.temperature)  # (w*h, C), x-major
    return out.view(w, h, -1).permute(2, 1, 0).contiguous()


def _window_topk(
    query: torch.Tensor,
    contexts: Sequence[tuple[int, torch.Tensor]],
    h: int,
    w: int,
    cfg: PropagationConfig,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per windowed context frame, the top-k of every target position over its own window.

    The target columns are cut into groups of ``t = config.tile``. For one column group and one source
    row, the ``2Ry+1`` target rows whose window holds that row, times the row's ``t + 2Rx`` columns
    around the group, is one small GEMM; a single batched GEMM per column group does it for every
    source row (both operands are strided views read in place: the target rows padded with ``Ry``
    zero rows above and below, the context frame padded with ``Rx`` zero columns). Each target
    position's own ``(2Ry+1) x (2Rx+1)`` window is then a strided *view* of those products (cell
    ``(j, v)`` = source offset ``(j - Ry, v - Rx)``), so the top-k scans exactly the window: no tile
    band around it, and no masking inside the image for a square window. Source rows outside the image
    are ``-inf`` and never computed; window cells left or right of the image, or outside a Euclidean
    window, are set to ``-inf``. A handful of large operations per context frame (rather than one per
    row) also keeps the threads of a shared CPU from waiting on each other.

    Args:
        query: (h, w, D) target features. contexts: (context index, (h*w, D) features) pairs.

    Returns:
        Per context, ((w*h, kb) float32 scores, (w*h, kb) flat candidate indices ``index*h*w + y*w + x``),
        target positions in column-major order (``x * h + y``).
    """
    D = query.shape[2]
    hw, k = h * w, cfg.topk
    Ry, Rx = _window_extent(cfg, h, w)
    ny, nx = 2 * Ry + 1, 2 * Rx + 1
    cells = ny * nx
    kb = min(k, cells)
    Tx = max(1, min(cfg.tile, w))
    ntx = -(-w // Tx)
    Wq, Nc = ntx * Tx, Tx + 2 * Rx
    Wp, M, Hq = Wq + 2 * Rx, ny * Tx, h + 2 * Ry
    # Target columns padded to whole groups by edge replication (zero queries would tie with everything
    # and send their rows to the slow tie-breaking path; their results are cropped away anyway).
    q = query if Wq == w else torch.cat([query, query[:, -1:].expand(h, Wq - w, D)], 1)
    qtp = torch.zeros(ntx, Hq, Tx, D)  # (group, Ry + y + Ry, column in group, D)
    qtp[:, Ry : Ry + h] = q.view(h, ntx, Tx, D).permute(1, 0, 2, 3)
    # Chunks of target rows: a chunk of n rows needs the products of n + 2Ry source rows.
    rows_per_chunk = min(h, max(2 * ny, cfg.chunk_elems // (Wq * ny * Nc) - 2 * Ry))
    prods = torch.empty(ntx, rows_per_chunk + 2 * Ry, M, Nc)  # (group, source row, (a, b), band column)
    padded = torch.zeros(h, Wp, D)

    # Window geometry, the same for every context frame.
    dy, dx = torch.arange(ny) - Ry, torch.arange(nx) - Rx
    pattern = _allowed(dy[:, None], dx[None, :], cfg)  # (ny, nx): inside the window shape
    xq = torch.arange(Wq).view(ntx, Tx)
    src_x = xq[:, :, None] + dx  # (ntx, Tx, nx)
    blocked = ~(((src_x >= 0) & (src_x < w))[:, :, None, None, :] & pattern)  # (ntx, Tx, 1, ny, nx)
    # Square window: only the column groups at the left and right borders have cells to block (two runs
    # of groups: [0, left) and [right, ntx)).
    edge = blocked.flatten(1).any(1).tolist()
    left = next((g for g, e in enumerate(edge) if not e), ntx)
    right = max(left, ntx - next((g for g, e in enumerate(reversed(edge)) if not e), ntx))
    square = bool(pattern.all())
    jy, jx = torch.arange(cells) // nx - Ry, torch.arange(cells) % nx - Rx

    results = []
    filled_for = -1  # the chunk whose out-of-image source rows hold -inf (products never overwrite them)
    for ci, feats in contexts:
        padded[:, Rx : Rx + w] = feats.view(h, w, D)
        vals_i = torch.empty(ntx, Tx, h, kb)
        idx_i = torch.empty(ntx, Tx, h, kb, dtype=torch.long)
        for y0 in range(0, h, rows_per_chunk):
            y1 = min(h, y0 + rows_per_chunk)
            nr = y1 - y0
            p = prods[:, : nr + 2 * Ry]  # row r <-> source row y0 - Ry + r
            s_lo, s_hi = max(0, y0 - Ry), min(h, y1 + Ry)
            lo, hi = s_lo - (y0 - Ry), s_hi - (y0 - Ry)
            if filled_for != y0:
                p[:, :lo].fill_(_NEG_INF)  # source rows outside the image
                p[:, hi:].fill_(_NEG_INF)
                filled_for = y0
            for g in range(ntx):
                # Batch over source rows s: target rows s-Ry .. s+Ry of group g (padded rows s .. s+2Ry)
                # against source row s, columns g*Tx - Rx .. g*Tx + Tx - 1 + Rx.
                a = qtp.as_strided((hi - lo, M, D), (Tx * D, D, 1), (g * Hq + s_lo) * Tx * D)
                band = padded.as_strided((hi - lo, Nc, D), (Wp * D, D, 1), s_lo * Wp * D + g * Tx * D)
                torch.bmm(a, band.transpose(1, 2), out=p[g, lo:hi])
            # Target (y0 + i, g*Tx + b), window cell (j, v): source row r = i + j of the chunk, target row
            # a = 2Ry - j of that product, band column b + v.
            sg, sr = p.stride(0), p.stride(1)
            window = p.as_strided(
                (ntx, Tx, nr, ny, nx), (sg, Nc + 1, sr, sr - Tx * Nc, 1), p.storage_offset() + 2 * Ry * Tx * Nc
            )
            if not square:
                window.masked_fill_(blocked, _NEG_INF)
            else:
                for g0, g1 in ((0, left), (right, ntx)):
                    if g1 > g0:
                        window[g0:g1].masked_fill_(blocked[g0:g1], _NEG_INF)
            vals, j = _topk_ordered(window.reshape(-1, cells), kb)
            j = j.view(ntx, Tx, nr, kb)
            sy = torch.arange(y0, y1).view(1, 1, nr, 1) + jy[j]
            sx = xq.view(ntx, Tx, 1, 1) + jx[j]
            # Out-of-image cells only ever come with -inf scores (zero weight); clamp keeps them indexable.
            idx_i[:, :, y0:y1] = (sy * w + sx).clamp_(0, hw - 1) + ci * hw
            vals_i[:, :, y0:y1] = vals.view(ntx, Tx, nr, kb)
        results.append((vals_i.view(Wq * h, kb)[:hw], idx_i.view(Wq * h, kb)[:hw]))
    return results


# ----------------------------------------------------------------------------------------------------
# streaming API


def _argmax_channels(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(0)`` for a finite (C, H, W) tensor: (H, W) int64, the first maximal channel wins.

    One elementwise pass per channel instead of torch's reduction over the strided channel axis, which
    on the CPU takes tens of milliseconds for a 360p frame (the whole propagation step of a live preset
    takes about as long).
    """
    best = x[0].clone()
    label = torch.zeros(x.shape[1:], dtype=torch.long)
    for c in range(1, x.shape[0]):
        label.masked_fill_(x[c] > best, c)  # strictly greater: ties keep the earlier channel
        torch.maximum(best, x[c], out=best)
    return label


class _Meta(Protocol):
    stride: int
    input_multiple: int


class FeatureExtractorLike(Protocol):
    """What :class:`MaskPropagator` needs from an extractor (``densekit.serve.extractor.FeatureExtractor``)."""

    meta: _Meta

    def __call__(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (D, h, w) float32, L2-normalised over D, after resizing to ``size``."""
        ...


def processing_size(height: int, width: int, config: PropagationConfig, multiple: int = 1) -> tuple[int, int]:
    """Size (H', W') a frame of (height, width) is resized to before feature extraction.

    ``resize="dino"`` mirrors DINO's ``read_frame``: if the frame is taller than wide, width ->
    ``short_side`` and height scaled then floored to ``long_multiple``; otherwise (also for square frames)
    height -> ``short_side`` and width scaled and floored. Both sides are then floored to ``multiple``
    (the extractor's input multiple). ``"native"`` keeps the size, floored to ``multiple``.
    """
    if config.resize == "dino":
        s, lm = config.short_side, config.long_multiple
        if height > width:
            new_w, new_h = s, int((s * height / width) // lm * lm)
        else:
            new_h, new_w = s, int((s * width / height) // lm * lm)
    else:
        new_h, new_w = height, width
    new_h, new_w = new_h // multiple * multiple, new_w // multiple * multiple
    if new_h < 1 or new_w < 1:
        raise DensekitError(f"frame of {height}x{width} is too small for this model (multiple of {multiple} needed)")
    return new_h, new_w


class MaskPropagator:
    """Propagate a first-frame object mask through a video, frame by frame.

    Usage::

        prop = MaskPropagator(FeatureExtractor("resnet18"), "crw")
        for mask in prop.stream(frames, first_mask):   # one (H, W) uint8 mask per frame
            ...

    or drive it yourself: ``start(frame, mask)`` then ``step(frame)`` per later frame, and
    ``reset_mask(frame, mask)`` to correct the mask on any frame. A corrected frame **replaces** the
    first-frame (long-term) reference and the short-term queue is cleared (refilled with copies of it if
    ``pad_with_first``): propagation continues exactly as if the video started at that frame, so stale
    predictions made before the correction are not reused.

    Masks hold object ids: 0 is background, 255 is void (treated as background), any other values are
    objects (need not be consecutive; they are mapped to channels and back). Output masks contain only 0
    and the ids of the latest reference mask.
    """

    def __init__(self, extractor: FeatureExtractorLike, config: PropagationConfig | str = "dino") -> None:
        self.extractor = extractor
        self.config = _as_config(config)
        self._stride = int(extractor.meta.stride)
        self._multiple = int(getattr(extractor.meta, "input_multiple", 1) or 1)
        self._frame_size: tuple[int, int] | None = None
        self._proc_size: tuple[int, int] = (0, 0)
        self._ids = np.zeros(1, np.uint8)
        self._grid: tuple[int, int, int] = (0, 0, 0)  # (D, h, w) of the feature maps
        # Context frames as (features (h*w, D), soft labels (h*w, C)), channels-last: laid out once when
        # a frame enters the context and reused by every step it stays there.
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None
        self._queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(self.config.n_last, 0) or None)
        self.last_soft: torch.Tensor | None = None  # (C, h, w) soft labels of the latest step
        self._basis: torch.Tensor | None = None  # config.pca_dim's projection, from the reference frame

    @property
    def object_ids(self) -> list[int]:
        """Object ids being tracked, in channel order (channel 0 = background is not listed)."""
        return [int(v) for v in self._ids[1:]]

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _check_frame(frame: np.ndarray) -> None:
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            desc = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise DensekitError(f"frames must be (H, W, 3) uint8 RGB arrays, got {desc}")

    def _features(self, frame: np.ndarray) -> torch.Tensor:
        feats = np.asarray(self.extractor(frame, size=self._proc_size), dtype=np.float32)
        if feats.ndim != 3:
            raise DensekitError(f"the feature extractor returned shape {feats.shape}, expected (D, h, w)")
        # Cosine affinity needs unit vectors; re-normalising is a no-op for a conforming extractor.
        if not feats.flags.writeable or not feats.flags.c_contiguous:
            feats = np.array(feats, order="C")
        return F.normalize(torch.from_numpy(feats), dim=0)

    def _labels_from_mask(self, mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
        """(C, h, w) float32 first-frame labels at feature resolution; sets the id <-> channel map."""
        values = np.unique(mask)
        objects = values[(values != 0) & (values != 255)].astype(np.uint8)
        if objects.size == 0:
            raise DensekitError("the mask has no object: it holds only background (0) and void (255)")
        lut = np.zeros(256, np.int64)
        lut[objects] = np.arange(1, objects.size + 1)
        self._ids = np.concatenate([[0], objects]).astype(np.uint8)
        channels = torch.from_numpy(lut[mask])
        n = objects.size + 1
        if self.config.mask_downsample == "nearest":
            # PIL-style nearest (pixel centres), as DINO's read_seg resizes the palette mask.
            small = F.interpolate(channels[None, None].float(), size=grid, mode="nearest-exact")[0, 0].long()
            return F.one_hot(small, n).permute(2, 0, 1).float().contiguous()
        onehot = F.one_hot(channels, n).permute(2, 0, 1).float()
        return F.interpolate(onehot[None], size=grid, mode="bilinear", align_corners=False)[0].contiguous()

    def _to_mask(self, soft: torch.Tensor) -> np.ndarray:
        H, W = self._frame_size  # type: ignore[misc]
        if self.config.output == "dino":
            up = F.interpolate(soft[None], scale_factor=self._stride, mode="bilinear", align_corners=False)[0]
            # DINO's norm_mask: per-channel min-max to [0, 1] when the channel has a positive max
            # (guarded against a constant channel, which the reference would turn into NaN).
            for c in range(up.shape[0]):
                ch = up[c]
                if ch.max() > 0:
                    ch -= ch.min()
                    peak = ch.max()
                    if peak > 0:
                        ch /= peak
            label = _argmax_channels(up)
            if tuple(up.shape[1:]) != (H, W):
                label = F.interpolate(label[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0].long()
        else:
            up = F.interpolate(soft[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            label = _argmax_channels(up)
        return self._ids[label.numpy()]

    # -- public API --------------------------------------------------------------------------------

    @torch.inference_mode()
    def start(self, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Begin a video: ``frame`` (H, W, 3) uint8 RGB with its (H, W) id mask. Returns the mask (uint8)."""
        self._check_frame(frame)
        mask = np.asarray(mask)
        if mask.dtype == bool:
            mask = mask.astype(np.uint8)
        if mask.ndim != 2:
            raise DensekitError(f"masks must be (H, W) arrays of object ids, got shape {mask.shape}")
        if mask.shape != frame.shape[:2]:
            raise DensekitError(
                f"mask size {mask.shape[0]}x{mask.shape[1]} differs from frame size {frame.shape[0]}x{frame.shape[1]}"
            )
        if not np.issubdtype(mask.dtype, np.integer) or (mask.size and (mask.min() < 0 or mask.max() > 255)):
            raise DensekitError("mask values must be integer object ids in 0..255")
        mask = mask.astype(np.uint8)
        self._frame_size = (frame.shape[0], frame.shape[1])
        self._proc_size = processing_size(frame.shape[0], frame.shape[1], self.config, self._multiple)
        feats = self._features(frame)
        labels = self._labels_from_mask(mask, (feats.shape[1], feats.shape[2]))
        self._grid = tuple(feats.shape)  # type: ignore[assignment]
        rows = _channels_last(feats)
        self._basis = _pca_basis(rows, self.config.pca_dim)
        self._first = (_project(rows, self._basis), _channels_last(labels))
        self._queue.clear()
        if self.config.pad_with_first:
            self._queue.extend([self._first] * self.config.n_last)
        self.last_soft = labels
        return mask.copy()

    def reset_mask(self, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Correct the mask on ``frame`` and continue from it (it becomes the new first-frame reference)."""
        return self.start(frame, mask)

    @torch.inference_mode()
    def step(self, frame: np.ndarray) -> np.ndarray:
        """Propagate to the next frame; returns its (H, W) uint8 id mask."""
        if self._first is None:
            raise DensekitError("call start(frame, mask) before step(frame)")
        self._check_frame(frame)
        if frame.shape[:2] != self._frame_size:
            H, W = self._frame_size  # type: ignore[misc]
            raise DensekitError(f"frame size {frame.shape[0]}x{frame.shape[1]} differs from the video's {H}x{W}")
        feats = self._features(frame)
        if tuple(feats.shape) != self._grid:
            raise DensekitError(f"feature shape changed from {self._grid} to {tuple(feats.shape)}")
        _, h, w = self._grid
        query = _project(_channels_last(feats), self._basis)
        ctx = [self._first, *self._queue]
        soft = _propagate_channels_last(query, [c[0] for c in ctx], [c[1] for c in ctx], h, w, self.config)
        if self.config.n_last > 0:
            self._queue.append((query, _channels_last(soft)))
        self.last_soft = soft
        return self._to_mask(soft)

    def stream(self, frames: Iterable[np.ndarray], first_mask: np.ndarray) -> Iterator[np.ndarray]:
        """Yield one (H, W) uint8 mask per frame as frames arrive; the first one is ``first_mask`` itself."""
        it = iter(frames)
        try:
            first = next(it)
        except StopIteration:
            raise DensekitError("the video has no frames") from None
        yield self.start(first, first_mask)
        for frame in it:
            yield self.step(frame)
