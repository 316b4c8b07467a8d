"""Export a dense backbone to an OpenVINO IR folder, with its contract inside and verified parity.

``export_openvino(MODEL, DIR)`` writes ``DIR/model.xml`` + ``DIR/model.bin``. MODEL is what the other exports
take: a backbone name or ``.safetensors`` checkpoint (exported to ONNX first with
:func:`~densekit.export.onnx.export_onnx`, in a temporary folder) or an ``.onnx`` file exported by densekit.
The IR keeps the input's batch, height and width dynamic (``reshape`` to ``[-1, 3, -1, -1]``; a static ONNX
keeps its H and W) and float32 weights (``save_model(compress_to_fp16=False)``: OpenVINO's default fp16 weight
compression would cost the f32 parity). Its rt_info carries the contract at ``densekit/meta`` and the export's
settings at ``densekit/export`` (:mod:`densekit.serve.openvino_backend` reads both back).

Verification: the written IR is opened the way serving opens it (:class:`OpenVinoBackend`, the precision
asked for) and compared with the reference, PyTorch for a name or checkpoint, ONNX Runtime (CPU) for an
``.onnx``, on the real photographs and the two sizes of :func:`densekit.export.onnx.parity_sizes`; cosine
must reach 0.9999 where bf16 runs, 0.99999 in f32 (0.999 in f16). A failed export or verification leaves
DIR as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.export.onnx import FP16_COSINE, FP32_COSINE, ParityRow, load_model_for_export, parity_sizes
from densekit.export.parity import compare, real_images
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError, one_line
from densekit.serve.onnx_meta import read_onnx_meta
from densekit.serve.openvino_backend import (
    IR_XML,
    PRECISIONS,
    RT_EXPORT,
    RT_META,
    OpenVinoBackend,
    check_precision_runs,
    import_openvino,
)

BF16_COSINE = 0.9999  # the bf16 tolerance (measured 0.99997 for resnet18 on an avx512_bf16 EPYC)
COSINE = {"f32": FP32_COSINE, "bf16": BF16_COSINE, "f16": FP16_COSINE}


@dataclass
class OpenVinoExportReport:
    path: Path
    meta: ModelMeta
    precision: str  # what ran in the parity check (the CPU's default when "auto" was asked)
    reference: str  # "torch" or "onnxruntime"
    seconds: float
    static: tuple[int, int] | None
    parity: list[ParityRow] = field(default_factory=list)


def export_openvino(
    model: Any,
    out: str | os.PathLike[str],
    *,
    precision: str = "auto",
    verify: bool = True,
    threads: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> OpenVinoExportReport:
    """Write the IR of ``model`` (name, checkpoint, DenseBackbone or densekit ``.onnx``) into folder ``out``.

    ``precision``: ``auto`` (the CPU plugin's default: bf16 where the CPU has it, else f32) or one of ``f32``,
    ``bf16``, ``f16``; recorded in the IR, so serving runs what was verified here.

    Raises:
        DensekitError: bad model or destination, openvino missing, or parity below tolerance (``out`` untouched).
    """
    t0 = time.perf_counter()
    ov = import_openvino()
    if precision not in ("auto", *PRECISIONS):
        raise DensekitError(f"unknown precision {precision!r}; choose one of auto, {', '.join(PRECISIONS)}")
    check_precision_runs(ov, None if precision == "auto" else precision)
    out = check_ir_target(out)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        onnx_path, meta, reference = _onnx_source(model, Path(work), seed, log)
        ov_model = ov.Core().read_model(str(onnx_path))
        static = _make_dynamic(ov, ov_model)
        export_info = {"precision": precision, "source": str(model) if isinstance(model, (str, Path)) else meta.name,
                       "openvino": ov.__version__, "static": list(static) if static else None}
        ov_model.set_rt_info(meta.to_json(), list(RT_META))
        ov_model.set_rt_info(json.dumps(export_info, sort_keys=True), list(RT_EXPORT))
        ir_dir = Path(work) / "ir"
        ov.save_model(ov_model, str(ir_dir / IR_XML), compress_to_fp16=False)
        runner = OpenVinoBackend(ir_dir, "cpu", threads=threads)
        rows = verify_ir(runner, reference, meta, static, log) if verify else []
        _replace_dir(ir_dir, out)
    return OpenVinoExportReport(path=out, meta=meta, precision=runner.precision, reference=reference.name,
                                seconds=time.perf_counter() - t0, static=static, parity=rows)


def check_ir_target(out: str | os.PathLike[str]) -> Path:
    """``out`` as an IR folder this export may write: absent, empty, or an earlier IR (replaced whole)."""
    out = Path(out)
    if out.suffix.lower() in (".xml", ".onnx", ".bin"):
        raise DensekitError(f"--out {out} is a folder for model.xml and model.bin, not a {out.suffix} file")
    if out.exists() and not out.is_dir():
        raise DensekitError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (IR_XML, "model.bin"))
        if foreign:
            raise DensekitError(f"--out {out} holds other files ({', '.join(foreign[:3])}); give a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DensekitError(f"--out {out}: cannot create its parent folder ({one_line(exc)})") from None
    if not os.access(out.parent, os.W_OK):
        raise DensekitError(f"--out {out}: its folder {out.parent} is not writable")
    return out


class _Reference:
    """What the IR is compared with: a torch backbone or an ONNX Runtime session, ``run(x) -> features``."""

    def __init__(self, name: str, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self.name, self.run = name, run


def _onnx_source(model: Any, work: Path, seed: int, log: Callable[[str], None]) -> tuple[Path, ModelMeta, _Reference]:
    """(an ONNX file to convert, its contract, the parity reference) for a name, checkpoint, net or ``.onnx``."""
    if isinstance(model, (str, Path)) and Path(str(model)).suffix.lower() == ".onnx":
        path = Path(str(model))
        meta = read_onnx_meta(path)  # DensekitError for a missing or invalid file
        if meta is None:
            raise DensekitError(f"{path}: ONNX file without densekit metadata; export it with `densekit export onnx`")
        from densekit.serve.loader import OnnxRuntimeBackend

        return path, meta, _Reference("onnxruntime", OnnxRuntimeBackend(path, device="cpu").run)
    import torch

    from densekit.export.onnx import export_onnx

    net = load_model_for_export(model, seed=seed)
    path = work / "model.onnx"
    export_onnx(net, path, verify=False, log=log)  # OpenVINO is checked against torch itself, below

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).float().numpy()

    return path, net.meta, _Reference("torch", run)


def _make_dynamic(ov: Any, ov_model: Any) -> tuple[int, int] | None:
    """Make batch (and H, W unless the source fixes them) dynamic; the static (H, W) or None."""
    shape = ov_model.input(0).get_partial_shape()
    h, w = shape[2], shape[3]
    static = (h.get_length(), w.get_length()) if h.is_static and w.is_static else None
    dims = [-1, 3, *(static or (-1, -1))]
    try:
        ov_model.reshape({ov_model.input(0): ov.PartialShape(dims)})
    except Exception as exc:
        raise DensekitError(f"OpenVINO cannot make the input {dims}: {one_line(exc)}") from None
    return static


def verify_ir(runner: OpenVinoBackend, reference: _Reference, meta: ModelMeta, static: tuple[int, int] | None,
              log: Callable[[str], None] = print) -> list[ParityRow]:
    """OpenVINO vs ``reference`` on real photos at two sizes (batch 1 and 2); DensekitError below tolerance."""
    from densekit.serve.extractor import preprocess

    threshold = COSINE[runner.precision] if runner.precision in COSINE else FP16_COSINE
    photos = real_images()
    rows = []
    for i, (size, batch) in enumerate(parity_sizes(meta, static)):
        x = preprocess([photos[(i + j) % len(photos)] for j in range(batch)], meta, size)
        ref, got = reference.run(x), runner.run(x)
        if got.shape != ref.shape:
            raise DensekitError(f"OpenVINO output {got.shape} != {reference.name} output {ref.shape} at size {size}")
        max_abs, cos, loc = compare(ref, got)
        rows.append(ParityRow(size=size, batch=batch, max_abs=max_abs, cosine=cos, min_location_cosine=loc))
        log(f"parity {size[0]}x{size[1]} batch {batch} ({runner.provider} vs {reference.name}): max |diff| "
            f"{max_abs:.3g}, cosine {cos:.8f}, worst location cosine {loc:.6f}")
        if not cos >= threshold:
            raise DensekitError(
                f"OpenVINO ({runner.precision}) differs from {reference.name} at {size[0]}x{size[1]}: cosine "
                f"{cos:.8f} < {threshold} (max |diff| {max_abs:.3g})"
            )
    return rows


def _replace_dir(src: Path, dest: Path) -> None:
    """Put folder ``src`` at ``dest``, the earlier ``dest`` (an IR, checked by :func:`check_ir_target`) removed.

    Two renames on one filesystem: a reader sees the old IR or the new one, never a half-written pair.
    """
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
