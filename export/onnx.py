"""Export a dense backbone to ONNX, with its contract inside and verified parity.

``export_onnx`` writes one ``.onnx`` file (atomically: a failed export or a failed verification
leaves nothing behind) whose ``metadata_props`` hold :meth:`ModelMeta.to_json` under ``densekit``
(what :class:`~densekit.serve.extractor.FeatureExtractor` reads to preprocess). Input ``images``
(B, 3, H, W) float32, output ``features`` (B, D, H/s, W/s); batch, height and width are dynamic unless
``static=(H, W)``.

Exporter choice (``torch.onnx.export(..., dynamo=...)`` is always passed explicitly, because its
default flipped to ``dynamo=True`` in PyTorch 2.9):

* CNNs and ``pixels`` (ResNets, EfficientNet-Lite0, timm CNNs): the TorchScript exporter
  (``dynamo=False``). Their graphs are plain convolutions whose shapes never feed Python arithmetic
  except TF "SAME" padding, which is constant for every input that is a multiple of the stride (see
  :mod:`densekit.serve.backbones`); ``dynamic_axes`` is native there. Measured here on 2 CPU cores:
  EfficientNet-Lite0 exports in ~3 s with TorchScript and ~150 s with dynamo, with the same graph
  quality and parity. (PyTorch warns that the TorchScript exporter will be removed; when it is, ``auto``
  falls through to dynamo.)
* timm ViTs (``dynamic_img_size=True``): the dynamo exporter (``dynamo=True``, ``torch.export``).
  Their position embeddings are resampled to the token grid with antialiased bicubic interpolation
  (timm ``resample_abs_pos_embed``), ``aten::_upsample_bicubic2d_aa``, which the TorchScript exporter
  cannot export at all; dynamo lowers it to ``Resize(mode=cubic, antialias=1)`` (opset 18) and keeps
  H and W symbolic. Traced with batch 2 because ``torch.export`` specialises size-1 dimensions (timm
  ``timm/utils/onnx.py``).

Verification after export: ``onnx.checker.check_model(full_check=True)``, then ONNX Runtime (CPU)
against PyTorch on real photographs (scikit-image's ``astronaut``, ``coffee``, ``chelsea``) at two sizes,
batch 1 and 2, printing max |diff| and cosine similarity; float32 must reach cosine >= 0.99999.

``int8_calib=DIR`` (``--int8 --calib DIR``) quantizes the verified float32 graph for ONNX Runtime's CPU
provider: static QDQ quantization (``onnxruntime.quantization.quantize_static``: per-channel int8
weights in 7-bit range, uint8 activations, min-max ranges over the folder's images at the calibration size, after
``quant_pre_process``), the contract copied over, and the int8 graph checked against PyTorch on the same
photographs with cosine >= :data:`INT8_COSINE`. It is the CPU model of live tracking (ResNet-18 at 360p:
167 -> 89 ms per frame on 2 cores, parity cosine 0.998, ``benchmarks/live_latency.py``). EfficientNet-Lite0
(depthwise convolutions, ReLU6) reaches only cosine 0.978 and gains ~15 %, so its int8 export is refused by
the parity check. For TensorRT use ``export trt --int8``, which needs symmetric int8 activations instead.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.export.calibration import calibration_batches, calibration_reader, list_calibration_images
from densekit.export.parity import compare, real_images
from densekit.serve.atomic import atomic_path
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError, one_line
from densekit.serve.onnx_meta import META_KEY

DEFAULT_OPSET = 18  # lowest opset the dynamo exporter emits; also has Resize(antialias) for timm ViTs
MIN_OPSET = 14
EXPORT_KEY = "densekit_export"
INPUT_NAME, OUTPUT_NAME = "images", "features"
EXPORTERS = ("auto", "torchscript", "dynamo")
INT8_COSINE = 0.98  # as export.trt's int8 engines; measured 0.99+ for resnet18 and efficientnet_lite0
INT8_CALIB_SIZE = (360, 640)  # live tracking's processing size; activation ranges barely depend on it
FP32_COSINE = 0.99999  # the issue's fp32 tolerance
FP16_COSINE = 0.999
# Ops kept in float32 by --half: LayerNorm's variance and Softmax's exp overflow in FP16 in
# transformers (NVIDIA/TensorRT#2564; ORT's trt_layer_norm_fp32_fallback exists for the same reason).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Resize")


@dataclass(frozen=True)
class ParityRow:
    """ONNX Runtime vs PyTorch on one batch: raw (un-normalised) features."""

    size: tuple[int, int]
    batch: int
    max_abs: float
    cosine: float
    min_location_cosine: float


@dataclass
class ExportReport:
    path: Path
    meta: ModelMeta
    exporter: str
    opset: int
    seconds: float
    half: bool
    static: tuple[int, int] | None
    int8: bool = False
    parity: list[ParityRow] = field(default_factory=list)
    parity_note: str = ""
    trt_issues: list[str] = field(default_factory=list)
    simplified_by: str | None = None


def choose_exporter(model: Any, requested: str = "auto") -> str:
    """``'torchscript'`` or ``'dynamo'`` for ``model`` (see the module docstring for why)."""
    if requested not in EXPORTERS:
        raise DensekitError(f"unknown exporter {requested!r}; choose one of {', '.join(EXPORTERS)}")
    if requested != "auto":
        return requested
    from densekit.serve.backbones import TimmViTDense

    body = getattr(model, "body", model)
    if isinstance(body, TimmViTDense) and getattr(body.model, "dynamic_img_size", False):
        return "dynamo"  # a static-size copy (pin_vit_input_size) has no resampling: TorchScript takes it
    # when the TorchScript exporter is gone from torch, everything goes through dynamo
    return "torchscript" if _has_ts_exporter() else "dynamo"


def _has_ts_exporter() -> bool:
    import inspect

    import torch.onnx

    return "dynamic_axes" in inspect.signature(torch.onnx.export).parameters


def pin_vit_input_size(net: Any, static: tuple[int, int]) -> Any:
    """For a static export of a timm ViT: a copy whose position embedding is resampled once, ahead.

    timm resamples the position embedding on every forward with antialiased bicubic interpolation,
    which becomes a ``Resize(cubic, antialias)`` node that TensorRT's parser rejects. With the grid
    known, ``VisionTransformer.set_input_size`` does the same resampling once in torch (same
    ``resample_abs_pos_embed`` call), the forward then skips it, and the graph has no Resize.
    Features are unchanged (checked by the parity step against the original model).
    """
    import copy

    from densekit.serve.backbones import TimmViTDense

    body = getattr(net, "body", None)
    if not isinstance(body, TimmViTDense) or not hasattr(body.model, "set_input_size"):
        return net
    pinned = copy.deepcopy(net)
    vit = pinned.body.model
    vit.set_input_size(img_size=tuple(static))
    # timm skips its "same size" early-out while exporting (timm/layers/pos_embed.py), so the dynamic
    # path would still emit the Resize: switch the copy to the fixed-size path (flattened tokens)
    if hasattr(vit, "dynamic_img_size") and hasattr(vit.patch_embed, "flatten"):
        vit.dynamic_img_size = False
        vit.patch_embed.flatten = True
    return pinned.eval()


def load_model_for_export(model: Any, seed: int = 0) -> Any:
    """A DenseBackbone from a name, a checkpoint path or a DenseBackbone (eval mode)."""
    from densekit.serve.backbones import DenseBackbone
    from densekit.serve.loader import load_backbone

    if isinstance(model, DenseBackbone):
        return model.eval()
    text = str(model)
    suffix = Path(text).suffix.lower()
    if suffix == ".onnx":
        raise DensekitError(f"{text} is already ONNX; export onnx takes a backbone name or a .safetensors checkpoint")
    if suffix in (".engine", ".plan", ".trt"):
        raise DensekitError(
            f"{text} is a TensorRT engine; export onnx takes a backbone name or a .safetensors checkpoint"
        )
    return load_backbone(text, seed=seed).eval()


def parse_hw(text: str | None, multiple: int | None = None) -> tuple[int, int] | None:
    """``"480,848"`` or ``"480x848"`` -> (480, 848); checks positivity and the input multiple."""
    if text is None or text == "":
        return None
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise DensekitError(f"size {text!r} must be H,W (two integers)") from None
    if h <= 0 or w <= 0:
        raise DensekitError(f"size {text!r} must be positive")
    if multiple and (h % multiple or w % multiple):
        raise DensekitError(f"size {h},{w} must be a multiple of this model's input multiple {multiple}")
    return h, w


def check_target(out: str | os.PathLike[str], opset: int) -> Path:
    """An ONNX destination and opset this exporter can write, else one :class:`DensekitError` line."""
    import onnx

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise DensekitError(f"--out {out} must end in .onnx")
    if opset < MIN_OPSET or opset > onnx.defs.onnx_opset_version():
        raise DensekitError(f"opset {opset} outside {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    return out


def export_onnx(
    model: Any,
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    static: tuple[int, int] | None = None,
    half: bool = False,
    simplify: bool = False,
    exporter: str = "auto",
    verify: bool = True,
    int8_calib: str | os.PathLike[str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> ExportReport:
    """Export ``model`` (name, checkpoint path or DenseBackbone) to ``out`` and verify it.

    Args:
        opset: ONNX opset (>= 14; dynamo needs >= 18).
        static: fix H and W (batch stays dynamic); None keeps them dynamic.
        half: convert the graph to float16 after export (float32 inputs/outputs kept, and
            :data:`FP32_OPS` kept in float32) for GPUs; ONNX Runtime's CPU provider lacks most fp16
            kernels, so parity is only checked where a CUDA provider runs.
        simplify: run onnxslim (or onnxsim) over the graph.
        int8_calib: a folder of representative images: quantize to int8 for ONNX Runtime's CPU provider
            (see the module docstring); the float32 graph is verified first, then the int8 one.

    Raises:
        DensekitError: bad model/arguments, failed checker, or parity below tolerance (the
            destination is then left untouched).
    """
    import onnx

    t0 = time.perf_counter()
    out = check_target(out, opset)
    if int8_calib is not None and half:
        raise DensekitError("--int8 and --half are exclusive")
    calib_files = []
    if int8_calib is not None:
        calib_files = list_calibration_images(int8_calib)
    net = load_model_for_export(model, seed=seed)
    meta: ModelMeta = net.meta
    if static is not None:
        parse_hw(f"{static[0]},{static[1]}", meta.input_multiple)
    original = net
    if static is not None:
        net = pin_vit_input_size(net, static)
    which = choose_exporter(net, exporter)
    if which == "dynamo" and opset < 18:
        raise DensekitError(f"the dynamo exporter (used for {meta.name}) needs --opset >= 18, not {opset}")
    report = ExportReport(path=out, meta=meta, exporter=which, opset=opset, seconds=0.0, half=half, static=static,
                          int8=int8_calib is not None)
    with atomic_path(out) as tmp:
        _torch_export(net, tmp, which, opset, static)
        proto = onnx.load(str(tmp))
        if simplify:
            proto, report.simplified_by = _simplify(proto, log)
        _name_dims(proto, static)
        if half:
            proto = convert_to_fp16(proto)
        export_info = {
            "exporter": which,
            "opset": opset,
            "half": half,
            "static": list(static) if static else None,
            "simplified_by": report.simplified_by,
            "torch": _torch_version(),
        }
        set_metadata(proto, meta, export_info)
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # ValidationError / InferenceError
            raise DensekitError(f"exported graph fails onnx.checker: {one_line(exc)}") from None
        if verify:
            report.parity, report.parity_note = verify_parity(original, tmp, half=half, static=static, log=log)
        if calib_files:
            size = static or tuple(v // meta.input_multiple * meta.input_multiple for v in INT8_CALIB_SIZE)
            export_info["int8"] = {
                "scheme": "QDQ, per-channel int8 weights (reduce_range), uint8 activations, min-max",
                "calibration_images": len(calib_files),
                "calibration_size": list(size),
            }
            _quantize_int8(tmp, calib_files, meta, size, export_info, log)
            if verify:
                report.parity, report.parity_note = verify_parity(
                    original, tmp, half=False, static=static, log=log, threshold=INT8_COSINE, label="int8 "
                )
        else:
            from densekit.export.trt_ops import check_tensorrt_compat

            compat = check_tensorrt_compat(proto)
            report.trt_issues = [issue.describe() for issue in compat.issues]
    report.seconds = time.perf_counter() - t0
    if report.trt_issues:
        log(
            f"warning: TensorRT {compat.tensorrt_version}'s ONNX parser will not take this graph: "
            + "; ".join(report.trt_issues)
            + (
                " (a ViT exported with --static H,W has no Resize)"
                if any("Resize" in i for i in report.trt_issues)
                else ""
            )
        )
    return report


def _quantize_int8(
    path: Path,
    files: list[Path],
    meta: ModelMeta,
    size: tuple[int, int],
    export_info: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Replace the float32 graph at ``path`` by its int8 QDQ version (see the module docstring)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    batches = calibration_batches(files, meta, [1, 3, *size])

    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        pre, quant = Path(work) / "pre.onnx", Path(work) / "int8.onnx"
        try:
            quant_pre_process(str(path), str(pre))  # shape inference and graph fusions, as ORT advises
            quantize_static(
                str(pre), str(quant), calibration_reader(pre, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                # 7-bit weights: without AVX-512 VNNI, ONNX Runtime's u8 x s8 kernels (VPMADDUBSW) saturate
                # with full-range weights (its quantization docs); EfficientNet-Lite0's parity cosine went
                # 0.914 -> 0.978 with it, ResNet-18's stayed 0.998 at the same speed.
                reduce_range=True,
                nodes_to_exclude=_shape_nodes(onnx.load(str(pre), load_external_data=False)),
            )
        except Exception as exc:  # ORT's quantizer raises plain Exceptions of many kinds
            raise DensekitError(f"int8 quantization failed: {one_line(exc)}") from None
        proto = onnx.load(str(quant))
        set_metadata(proto, meta, export_info)  # the quantizer does not carry metadata_props over
        onnx.save(proto, str(path))
    log(f"int8: quantized on {len(batches)} images at {size[0]}x{size[1]} in {time.perf_counter() - t0:.1f}s")


def _shape_nodes(proto: Any) -> list[str]:
    """Names of the nodes that compute only shapes: from ``Shape`` outputs and constants.

    Quantizing them rounds sizes: EfficientNet-Lite0's TF "SAME" padding is computed from the input
    shape with Mul/Div/Sub, and quantized it lost a row and a column (45x80 -> 44x79 at 360x640).
    Restricting quantization to Conv instead would leave ResNet's residual Adds in float (int8 resnet18
    at 360x640: 94 -> 131 ms on 2 cores).
    """
    constants = {init.name for init in proto.graph.initializer}
    derived: set[str] = set()
    names = []
    for node in proto.graph.node:  # ONNX graphs are topologically sorted
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant":
            constants.update(node.output)
        elif node.op_type == "Shape" or (
            any(i in derived for i in inputs) and all(i in derived or i in constants for i in inputs)
        ):
            derived.update(node.output)
            names.append(node.name)
    return names


def _torch_export(net: Any, path: Path, which: str, opset: int, static: tuple[int, int] | None) -> None:
    import torch

    h, w = static if static is not None else (4 * net.meta.input_multiple, 6 * net.meta.input_multiple)
    # batch 2: torch.export specialises size-1 dims, which would freeze the batch (timm utils/onnx.py)
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and TracerWarnings are not the user's problem
        try:
            if which == "torchscript":
                axes_in = {0: "batch"} if static else {0: "batch", 2: "height", 3: "width"}
                axes_out = {0: "batch"} if static else {0: "batch", 2: "fheight", 3: "fwidth"}
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    do_constant_folding=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: axes_in, OUTPUT_NAME: axes_out},
                )
            else:
                dyn = torch.export.Dim.DYNAMIC
                shapes = ({0: dyn} if static else {0: dyn, 2: dyn, 3: dyn},)
                torch.onnx.export(
                    net,
                    (example,),
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=shapes,
                    external_data=False,
                    optimize=True,
                    report=False,
                    verbose=False,
                )
        except DensekitError:
            raise
        except ImportError as exc:
            raise DensekitError(
                f"the {which} ONNX exporter needs a missing package ({exc}); pip install onnxscript"
            ) from None
        except Exception as exc:
            raise DensekitError(f"{which} ONNX export of {net.meta.name} failed: {one_line(exc)}") from None


def _name_dims(proto: Any, static: tuple[int, int] | None) -> None:
    """Readable symbolic dims (the dynamo exporter names them ``s77``, ``(s53//16)``)."""
    for value, names in (
        (proto.graph.input[0], ("batch", "height", "width")),
        (proto.graph.output[0], ("batch", "fheight", "fwidth")),
    ):
        dims = value.type.tensor_type.shape.dim
        for axis, name in zip((0, 2, 3), names):
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


def set_metadata(proto: Any, meta: ModelMeta, export_info: dict[str, Any]) -> None:
    """Write ``densekit`` (ModelMeta JSON) and ``densekit_export`` into ``metadata_props``."""
    keep = [p for p in proto.metadata_props if p.key not in (META_KEY, EXPORT_KEY)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in ((META_KEY, meta.to_json()), (EXPORT_KEY, json.dumps(export_info, sort_keys=True))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def convert_to_fp16(proto: Any, fp32_ops: tuple[str, ...] = FP32_OPS) -> Any:
    """float16 weights and activations, float32 I/O, ``fp32_ops`` kept in float32.

    Uses ONNX Runtime's converter (``onnxruntime.transformers.float16``, the maintained successor of
    onnxconverter-common's ``float16`` module; no extra dependency).
    """
    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        raise DensekitError("--half needs onnxruntime's float16 converter: pip install onnxruntime") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(fp32_ops)
        )
    toposort(converted.graph)  # the converter appends the input Casts at the end of the node list
    return converted


def toposort(graph: Any) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (Kahn)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    nodes = list(graph.node)
    deps = [{produced_by[x] for x in node.input if x in produced_by} for node in nodes]
    order: list[int] = []
    done: set[int] = set()
    pending = list(range(len(nodes)))
    while pending:
        ready = [i for i in pending if deps[i] <= done]
        if not ready:
            raise DensekitError("the converted graph has a cycle")
        order.extend(ready)
        done.update(ready)
        pending = [i for i in pending if i not in done]
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _simplify(proto: Any, log: Callable[[str], None]) -> tuple[Any, str | None]:
    """onnxslim if installed, else onnxsim; a failing simplifier only warns (Ultralytics does the same)."""
    try:
        import onnxslim

        tool = "onnxslim"

        def run(p: Any) -> Any:
            return onnxslim.slim(p)
    except ImportError:
        try:
            import onnxsim
        except ImportError:
            raise DensekitError("--simplify needs onnxslim: pip install onnxslim") from None
        tool = "onnxsim"

        def run(p: Any) -> Any:
            simplified, ok = onnxsim.simplify(p)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified graph")
            return simplified

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run(proto), tool
    except Exception as exc:
        log(f"warning: {tool} failed ({one_line(exc)}); keeping the unsimplified graph")
        return proto, None


def parity_sizes(meta: ModelMeta, static: tuple[int, int] | None) -> list[tuple[tuple[int, int], int]]:
    """(size, batch) pairs checked: two sizes, batch 1 and 2 (one size, both batches when static)."""
    if static is not None:
        return [(static, 1), (static, 2)]
    m = meta.input_multiple
    return [((224 // m * m, 320 // m * m), 1), ((288 // m * m, 192 // m * m), 2)]


def verify_parity(
    net: Any,
    path: Path,
    *,
    half: bool,
    static: tuple[int, int] | None,
    log: Callable[[str], None] = print,
    threshold: float | None = None,
    label: str = "",
) -> tuple[list[ParityRow], str]:
    """Run ``path`` with ONNX Runtime and ``net`` with torch on real photos; raise below tolerance.

    ``threshold`` overrides the cosine tolerance (default: fp32's or fp16's); ``label`` prefixes the lines.
    """
    import torch

    from densekit.serve.extractor import OnnxRuntimeBackend, preprocess

    device = "auto" if half else "cpu"
    try:
        runner = OnnxRuntimeBackend(path, device=device)
    except DensekitError as exc:
        if half:
            note = f"fp16 parity not checked: ONNX Runtime cannot run this fp16 graph here ({exc})"
            log(note)
            return [], note
        raise
    if half and runner.provider == "CPUExecutionProvider":
        note = "fp16 parity not checked: no CUDA provider here (ONNX Runtime's CPU provider is not an fp16 reference)"
        log(note)
        return [], note
    if threshold is None:
        threshold = FP16_COSINE if half else FP32_COSINE
    photos = real_images()
    rows = []
    for i, (size, batch) in enumerate(parity_sizes(net.meta, static)):
        frames = [photos[(i + j) % len(photos)] for j in range(batch)]
        x = preprocess(frames, net.meta, size)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).float().numpy()
        got = runner.run(x)
        if got.shape != ref.shape:
            raise DensekitError(f"ONNX output {got.shape} != torch output {ref.shape} at size {size} batch {batch}")
        max_abs, cos, loc = compare(ref, got)
        row = ParityRow(size=size, batch=batch, max_abs=max_abs, cosine=cos, min_location_cosine=loc)
        rows.append(row)
        log(
            f"{label}parity {size[0]}x{size[1]} batch {batch} ({runner.provider}): max |diff| {max_abs:.3g}, "
            f"cosine {cos:.8f}, worst location cosine {loc:.6f}"
        )
        if not cos >= threshold:
            raise DensekitError(
                f"{label}ONNX Runtime differs from PyTorch at {size[0]}x{size[1]}: cosine {cos:.8f} < {threshold} "
                f"(max |diff| {max_abs:.3g})"
            )
    return rows, ""


def _torch_version() -> str:
    import torch

    return str(torch.__version__)
