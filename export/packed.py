"""A packed ONNX export of a timm ViT: several images of their own size in one sequence (NaViT-style).

``export_packed_onnx`` writes one ``.onnx`` file (atomically) whose graph takes what
:func:`densekit.serve.packing.pack_images` lays out, numpy only on the serving side:

=============  ====================  ======================================================================
input          shape, type           meaning
=============  ====================  ======================================================================
``patches``    (S, L, 3 p p) f32     flattened patches in (c, dy, dx) order; anything at other slots
``coords``     (S, L, 2) int64       (row, col) of each patch in its image's grid
``seg``        (S, L) int64          image index of each slot, -1 = padding
``is_prefix``  (S, L) bool           the image's CLS/register slots (P in front of its patches)
``grid``       (B, 2) int64          each image's patch grid (h, w)
=============  ====================  ======================================================================

and returns ``tokens`` (S, L, D), the final normed tokens (:func:`~densekit.serve.packing.unpack_grids` gives
each image's (D, h, w) map). S, L and B are dynamic. The block-diagonal attention mask is built inside the graph
from ``seg`` (``Equal`` of ``seg`` against itself, so padding attends to padding only).

Why the graph is not the torch packed forward traced as is: that one resamples the position embeddings per
distinct grid in a Python loop with antialiased bicubic interpolation, which is data-dependent control flow and a
``Resize(cubic, antialias)`` that TensorRT's parser rejects. The resampling is linear and separable, so here it is
a pair of weight matrices per output size, precomputed in torch with the same ``F.interpolate`` call timm makes
(on identity bases) for every side 1..``max_side``: each token gathers its row's and column's weights and contracts
them with the learned (H0, W0, D) grid (``Gather``, ``MatMul``, ``ReduceSum``). Grids with a side above
``max_side`` patches are outside the table; the graph clamps them, so :func:`check_grid` refuses them first.

Verification after export: ``onnx.checker``, ONNX Runtime (CPU) against the torch packed forward
(:func:`~densekit.serve.packing.packed_tokens`, itself tested equal to each image alone) on real photographs of
three sizes packed into two sequences, with :func:`densekit.export.parity.compare`; and the TensorRT operator
check (:mod:`densekit.export.trt_ops`), which must pass.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from densekit.export.onnx import DEFAULT_OPSET, FP32_COSINE, check_target, load_model_for_export, set_metadata
from densekit.export.parity import compare, real_images
from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError, one_line

INPUTS = ("patches", "coords", "seg", "is_prefix", "grid")
OUTPUT = "tokens"
DEFAULT_MAX_SIDE = 64  # patches per side: 1024 px at p = 16, 512 px at p = 8
#: (H, W) of the verification photographs: three aspect ratios, packed with L = the two largest
PARITY_SIZES = ((224, 320), (288, 192), (128, 128))


@dataclass
class PackedExportReport:
    path: Path
    opset: int
    max_side: int
    seconds: float
    max_abs: float = float("nan")
    cosine: float = float("nan")
    tensorrt_ops: tuple[str, ...] = ()  # the graph's ops, all in onnx-tensorrt's table (checked)


def resample_weights(old: int, max_side: int) -> Any:
    """(max_side, max_side, old) float32: ``[n - 1, i]`` holds the weights of output index i of a length-``old``
    axis resampled to length n (i < n; zero rows beyond), exactly the 1-D factor of timm's
    ``resample_abs_pos_embed`` (``F.interpolate(mode='bicubic', antialias=True, align_corners=False)``)."""
    import torch
    import torch.nn.functional as F

    table = torch.zeros(max_side, max_side, old)
    # channel c = the c-th unit vector along the width axis; along a height axis with a width of 1, torch's
    # antialiased bicubic gives other weights than it applies to a 2-D grid (measured: off by up to 1.1)
    basis = torch.eye(old).reshape(1, old, 1, old)
    for n in range(1, max_side + 1):
        out = F.interpolate(basis, size=(1, n), mode="bicubic", antialias=True, align_corners=False)
        table[n - 1, :n] = out[0, :, 0, :].T
    return table


def _packed_module(vit: Any, max_side: int) -> Any:
    """The graph as a ``torch.nn.Module`` (forward takes :data:`INPUTS`, returns (S, L, D))."""
    import torch
    from torch import nn

    from densekit.serve.packing import packed_blocks, packed_content, prefix_pos_len, vit_model

    class PackedViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit_model(vit)
            h0, w0 = (int(v) for v in self.vit.patch_embed.grid_size)
            self.h0, self.w0, self.max_side = h0, w0, max_side
            self.register_buffer("rows", resample_weights(h0, max_side).reshape(max_side * max_side, h0))
            self.register_buffer("cols", resample_weights(w0, max_side).reshape(max_side * max_side, w0))

        def positions(self, coords: torch.Tensor, seg: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            """(S, L, D) patch position embeddings, resampled per token by its image's grid."""
            m = self.max_side
            hw = grid[seg.clamp_min(0)].clamp(1, m)  # (S, L, 2): the token's image grid
            rc = coords.clamp(0, m - 1)
            wr = self.rows[(hw[..., 0] - 1) * m + rc[..., 0]]  # (S, L, H0)
            wc = self.cols[(hw[..., 1] - 1) * m + rc[..., 1]]  # (S, L, W0)
            k = prefix_pos_len(self.vit)
            table = self.vit.pos_embed[0, k:].reshape(self.h0, self.w0 * self.vit.embed_dim)
            by_row = torch.matmul(wr, table).reshape(*wr.shape[:2], self.w0, self.vit.embed_dim)
            return (by_row * wc.unsqueeze(-1)).sum(dim=2)

        def forward(self, patches: torch.Tensor, coords: torch.Tensor, seg: torch.Tensor,
                    is_prefix: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            x = packed_content(self.vit, patches, seg, is_prefix)
            if self.vit.pos_embed is not None:
                is_patch = ((seg >= 0) & ~is_prefix).unsqueeze(-1).to(x.dtype)
                x = x + self.positions(coords, seg, grid) * is_patch
            return packed_blocks(self.vit, x, seg)  # the mask: segment_attention_mask(seg), in the graph

    return PackedViT().eval()


def check_grid(grid: np.ndarray, max_side: int) -> None:
    """Refuse image grids the graph's resampling table does not cover (one line)."""
    big = [tuple(int(v) for v in g) for g in np.asarray(grid) if max(g) > max_side]
    if big:
        raise DensekitError(f"a packed image grid of {big[0][0]}x{big[0][1]} patches exceeds this export's max side "
                            f"{max_side}; export with a larger --max-side or resize the image")


def export_packed_onnx(model: Any, out: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
                       max_side: int = DEFAULT_MAX_SIDE, verify: bool = True, seed: int = 0,
                       log: Callable[[str], None] = print) -> PackedExportReport:
    """Export a timm ViT backbone (name, checkpoint path or DenseBackbone) as the packed graph and verify it.

    Raises:
        DensekitError: not a timm ViT (CNNs cannot pack), bad arguments, failed checker, parity below
            :data:`~densekit.export.onnx.FP32_COSINE` or a TensorRT-incompatible op (nothing is written then).
    """
    import onnx

    from densekit.export.trt_ops import require_tensorrt_compat
    from densekit.serve.packing import vit_model

    t0 = time.perf_counter()
    out = check_target(out, opset)
    if max_side < 1:
        raise DensekitError(f"--max-side must be >= 1 patch, got {max_side}")
    net = load_model_for_export(model, seed=seed)
    vit_model(net)  # a CNN is refused here, in one line
    graph = _packed_module(net, max_side)
    report = PackedExportReport(path=out, opset=opset, max_side=max_side, seconds=0.0)
    with atomic_path(out) as tmp:
        _torch_export(graph, net, tmp, opset)
        proto = onnx.load(str(tmp))
        info = {"packed": True, "inputs": list(INPUTS), "output": OUTPUT, "max_side": max_side, "opset": opset,
                "prefix_tokens": int(vit_model(net).num_prefix_tokens)}
        set_metadata(proto, net.meta, info)
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # ValidationError / InferenceError
            raise DensekitError(f"exported packed graph fails onnx.checker: {one_line(exc)}") from None
        compat = require_tensorrt_compat(proto, str(out))
        report.tensorrt_ops = compat.ops
        if verify:
            report.max_abs, report.cosine = verify_packed_parity(net, tmp, max_side, log=log)
    report.seconds = time.perf_counter() - t0
    return report


def _example(net: Any) -> dict[str, Any]:
    """Three images in two sequences, to trace with (batch sizes of 1 would be specialised by some exporters)."""
    from densekit.serve.packing import pack_images, patch_size, vit_model

    p, prefix = patch_size(net), int(vit_model(net).num_prefix_tokens)
    grids = ((3, 4), (2, 2), (4, 2))
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((3, h * p, w * p)).astype(np.float32) for h, w in grids]
    return pack_images(images, p, prefix, seq_len=3 * 4 + prefix + 2)  # the first alone, the others together


def _torch_export(graph: Any, net: Any, path: Path, opset: int) -> None:
    """TorchScript exporter: the graph has no resampling left, and it exports in seconds (dynamo: minutes)."""
    import torch

    batch = _example(net)
    args = tuple(torch.from_numpy(batch[k]) for k in INPUTS)
    axes = {"patches": {0: "seqs", 1: "length"}, "coords": {0: "seqs", 1: "length"}, "seg": {0: "seqs", 1: "length"},
            "is_prefix": {0: "seqs", 1: "length"}, "grid": {0: "images"}, OUTPUT: {0: "seqs", 1: "length"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and TracerWarnings are not the user's problem
        try:
            torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=list(INPUTS), output_names=[OUTPUT], dynamic_axes=axes)
        except Exception as exc:
            raise DensekitError(f"packed ONNX export of {net.meta.name} failed: {one_line(exc)}") from None


def verify_packed_parity(net: Any, path: Path, max_side: int, *, log: Callable[[str], None] = print
                         ) -> tuple[float, float]:
    """ONNX Runtime (CPU) on ``path`` vs the torch packed forward on real photographs; (max |diff|, cosine) of
    the real tokens (padding left out). Raises below :data:`~densekit.export.onnx.FP32_COSINE`."""
    import onnxruntime as ort
    import torch

    from densekit.serve.extractor import preprocess_each
    from densekit.serve.packing import pack_images, packed_tokens, patch_size, vit_model

    p, prefix = patch_size(net), int(vit_model(net).num_prefix_tokens)
    sizes = [(min(h, max_side * p), min(w, max_side * p)) for h, w in PARITY_SIZES]  # inside the table
    images = [preprocess_each([photo], net.meta, size)[0] for photo, size in zip(real_images(), sizes)]
    longest = max(im.shape[1] * im.shape[2] // p**2 + prefix for im in images)
    batch = pack_images(images, p, prefix, seq_len=longest + 1)  # 2+ sequences, with padding
    check_grid(batch["grid"], max_side)
    with torch.no_grad():
        ref = packed_tokens(net, *(torch.from_numpy(batch[k]) for k in INPUTS)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT], {k: batch[k] for k in INPUTS})[0]
    real = batch["seg"] >= 0
    max_abs, cos, _ = compare(ref[real].T[None, :, :, None], got[real].T[None, :, :, None])
    log(f"packed parity ({len(images)} images in {real.shape[0]} sequences of {real.shape[1]}, "
        f"CPUExecutionProvider): max |diff| {max_abs:.3g}, cosine {cos:.8f}")
    if not cos >= FP32_COSINE:
        raise DensekitError(f"packed ONNX Runtime output differs from PyTorch: cosine {cos:.8f} < {FP32_COSINE} "
                            f"(max |diff| {max_abs:.3g})")
    return max_abs, cos


def packed_export_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``densekit_export`` metadata of a packed export (``{"packed": True, "max_side": ..., ...}``)."""
    import onnx

    from densekit.export.onnx import EXPORT_KEY

    proto = onnx.load(str(path), load_external_data=False)
    return next((json.loads(p.value) for p in proto.metadata_props if p.key == EXPORT_KEY), {})


__all__ = ["INPUTS", "OUTPUT", "PackedExportReport", "check_grid", "export_packed_onnx", "packed_export_info",
           "resample_weights", "verify_packed_parity"]
