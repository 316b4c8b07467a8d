"""Build a TensorRT engine from an ONNX export: a plain plan file plus a JSON sidecar.

TensorRT's Python API (NVIDIA "Python API Documentation", ``samples/python/common_runtime.py``):
``Builder`` -> ``create_network`` -> ``OnnxParser.parse_from_file`` -> builder config (workspace memory
pool, precision, one optimisation profile for the dynamic batch/height/width, timing cache) ->
``build_serialized_network``. The plan is written as is, so ``trtexec --loadEngine`` and Triton's
``tensorrt_plan`` backend read it; the densekit contract, TensorRT version, profile and GPU go to
``<engine>.json`` (:mod:`densekit.serve.onnx_meta`).

Precision differs by TensorRT major version (the version is read from ``tensorrt.__version__``):

* TensorRT 10 (weakly typed): ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` with an
  ``IInt8EntropyCalibrator2`` fed from ``--calib DIR``. For transformers, LayerNorm (``NORMALIZATION``)
  and ``SOFTMAX`` layers are pinned to FP32 with ``OBEY_PRECISION_CONSTRAINTS``: they overflow in FP16
  (NVIDIA/TensorRT#2564, #4723 for a DINOv3 ViT).
* TensorRT 11: weak typing is gone (``BuilderFlag.FP16/INT8``, ``int8_calibrator`` removed; NVIDIA's
  "TensorRT 10.x to 11.x Python API" migration guide; the failure is
  ``AttributeError: ... BuilderFlag has no attribute 'FP16'``, and rf-detr#1453 shows a build that
  silently stayed FP32). Precision must be in the graph: FP16 = the ONNX graph converted to float16
  with LayerNorm/Softmax left in float32 (:func:`densekit.export.onnx.convert_to_fp16`); INT8 = Q/DQ
  nodes inserted by ONNX Runtime's static quantizer (symmetric, zero point 0, as TensorRT requires).

Before anything needs a GPU, the graph goes through :mod:`densekit.export.trt_ops`, and
TensorRT's absence or the absence of a GPU is one line and exit code 2.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densekit.export.calibration import calibration_batches, calibration_reader, list_calibration_images
from densekit.export.onnx import DEFAULT_OPSET, convert_to_fp16, export_onnx, load_model_for_export
from densekit.export.parity import compare, real_images
from densekit.serve.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.onnx_meta import EngineInfo, read_onnx_meta, sidecar_path

MIN_MAJOR = 10
ATTENTION_OPS = ("LayerNormalization", "Softmax")
TRT10_FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")
PARITY_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}  # TF32 is on by default for fp32 builds


def parse_version(version: str) -> tuple[int, ...]:
    """``"10.16.1.11"`` -> (10, 16, 1, 11); DensekitError for something that is not a version."""
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise DensekitError(f"cannot read the TensorRT version {version!r}")
    return tuple(parts)


@dataclass(frozen=True)
class BuildPlan:
    """How to get the requested precision out of this TensorRT version.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8``.
        major: TensorRT major version.
        strongly_typed: precision comes from the graph's types (TensorRT 11 always).
        builder_flags: names of ``trt.BuilderFlag`` members to set.
        onnx_transform: None, ``"fp16"`` (cast the graph) or ``"qdq"`` (insert Q/DQ) before parsing.
        fp32_layer_types: names of ``trt.LayerType`` members pinned to FP32 (TensorRT 10 only).
        calibrator: an ``IInt8EntropyCalibrator2`` is needed.
    """

    precision: str
    major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()
    onnx_transform: str | None = None
    fp32_layer_types: tuple[str, ...] = ()
    calibrator: bool = False


def plan_build(tensorrt_version: str, *, fp16: bool, int8: bool, transformer: bool) -> BuildPlan:
    """The :class:`BuildPlan` for ``tensorrt_version`` (pure logic, testable without TensorRT)."""
    major = parse_version(tensorrt_version)[0]
    if major < MIN_MAJOR:
        raise DensekitError(f"TensorRT {tensorrt_version} is too old: densekit builds with TensorRT >= {MIN_MAJOR}")
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    if major >= 11:
        transform = {"fp32": None, "fp16": "fp16", "int8": "qdq"}[precision]
        return BuildPlan(precision, major, strongly_typed=True, onnx_transform=transform)
    if precision == "fp32":
        return BuildPlan(precision, major, strongly_typed=False)
    flags: tuple[str, ...] = ("FP16",) if precision == "fp16" else ("INT8", "FP16")
    pinned: tuple[str, ...] = ()
    if transformer:
        flags += ("OBEY_PRECISION_CONSTRAINTS",)
        pinned = TRT10_FP32_LAYER_TYPES
    return BuildPlan(
        precision,
        major,
        strongly_typed=False,
        builder_flags=flags,
        fp32_layer_types=pinned,
        calibrator=precision == "int8",
    )


def parse_shape(text: str | None, name: str) -> tuple[int, int, int, int] | None:
    """``"1x3x480x848"`` (or commas) -> (1, 3, 480, 848)."""
    if text is None or text == "":
        return None
    try:
        dims = tuple(int(v) for v in text.replace(",", "x").split("x"))
    except ValueError:
        raise DensekitError(f"--{name} {text!r} must look like 1x3x480x848") from None
    if len(dims) != 4 or dims[1] != 3 or min(dims) <= 0:
        raise DensekitError(f"--{name} {text!r} must be Bx3xHxW with positive sizes")
    return dims  # type: ignore[return-value]


def resolve_profile(
    meta: ModelMeta,
    onnx_hw: tuple[Any, Any],
    min_shape: tuple[int, ...] | None,
    opt_shape: tuple[int, ...] | None,
    max_shape: tuple[int, ...] | None,
) -> dict[str, list[int]]:
    """The optimisation profile: defaults around 480p, checked against the model's multiple.

    Defaults: min 1x3x(4m)x(4m), opt 1x3x480x848 (DAVIS 480p, rounded down to the multiple m), max
    4x3x1088x1920. A static ONNX input (``--static``) pins H and W everywhere.
    """
    m = meta.input_multiple
    static = all(isinstance(v, int) and v > 0 for v in onnx_hw)
    if static:
        h, w = int(onnx_hw[0]), int(onnx_hw[1])
        defaults = {"min": (1, 3, h, w), "opt": (1, 3, h, w), "max": (4, 3, h, w)}
    else:
        defaults = {
            "min": (1, 3, 4 * m, 4 * m),
            "opt": (1, 3, 480 // m * m, 848 // m * m),
            "max": (4, 3, 1088 // m * m, 1920 // m * m),
        }
    given = {"min": min_shape, "opt": opt_shape, "max": max_shape}
    profile = {k: list(given[k] or defaults[k]) for k in ("min", "opt", "max")}
    for key, shape in profile.items():
        if shape[2] % m or shape[3] % m:
            raise DensekitError(f"--{key}-shape {'x'.join(map(str, shape))}: H and W must be multiples of {m}")
        if static and (shape[2], shape[3]) != (int(onnx_hw[0]), int(onnx_hw[1])):
            raise DensekitError(f"--{key}-shape: this ONNX model has a static size {onnx_hw[0]}x{onnx_hw[1]}")
    for axis in range(4):
        if not profile["min"][axis] <= profile["opt"][axis] <= profile["max"][axis]:
            raise DensekitError(f"profile must satisfy min <= opt <= max on every axis, got {profile}")
    return profile


@dataclass
class EngineReport:
    path: Path
    onnx_path: Path
    plan: BuildPlan
    seconds: float
    info: EngineInfo
    parity: list[tuple[tuple[int, int], int, float, float]] = field(default_factory=list)


def build_engine(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fp16: bool = False,
    int8: bool = False,
    calib: str | os.PathLike[str] | None = None,
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    workspace_gb: float | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    opset: int | None = None,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> EngineReport:
    """Build ``out`` (+ ``out.json``) from an ``.onnx`` file, a checkpoint or a backbone name.

    Order of checks, cheapest first: arguments, ONNX metadata and the TensorRT operator check
    (anywhere), then TensorRT itself and a GPU (one clear line each), then the build.
    """
    import onnx

    from densekit.export.trt_ops import require_tensorrt_compat
    from densekit.serve.extractor import import_tensorrt, require_cuda_for_tensorrt

    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in (".engine", ".plan"):
        raise DensekitError(f"--out {out} must end in .engine or .plan")
    if int8 and calib is None:
        raise DensekitError("--int8 needs --calib DIR (a folder of representative images)")
    if int8 and fp16:
        raise DensekitError("--fp16 and --int8 are exclusive (INT8 builds fall back to FP16 where needed)")
    if workspace_gb is not None and workspace_gb <= 0:
        raise DensekitError("--workspace must be a positive number of GiB")
    shapes = {k: parse_shape(v, f"{k}-shape") for k, v in (("min", min_shape), ("opt", opt_shape), ("max", max_shape))}
    calib_files = list_calibration_images(calib) if int8 else []
    source = Path(str(model))
    if source.suffix.lower() == ".onnx":
        meta = read_onnx_meta(source)
        if meta is None:
            raise DensekitError(f"{source}: ONNX file without densekit metadata; export it with `densekit export onnx`")
        proto = onnx.load(str(source), load_external_data=False)
        require_tensorrt_compat(proto, str(source))
        trt = import_tensorrt()
        device = require_cuda_for_tensorrt()
        onnx_path = source
    else:
        if source.suffix.lower() in (".engine", ".plan", ".trt"):
            raise DensekitError(f"{source} is already an engine; give an .onnx file, a checkpoint or a backbone name")
        trt = import_tensorrt()  # before a costly export that could not be used
        device = require_cuda_for_tensorrt()
        from densekit.serve.backbones import TimmViTDense

        net = load_model_for_export(str(model))
        static = None
        if isinstance(net.body, TimmViTDense):
            # a ViT's dynamic position-embedding resampling is a Resize TensorRT cannot parse; with a
            # static size it is done once at export (see densekit.export.onnx.pin_vit_input_size)
            m = net.meta.input_multiple
            opt = shapes["opt"] or (1, 3, 480 // m * m, 848 // m * m)
            static = (int(opt[2]), int(opt[3]))
            log(f"{net.meta.name} is a ViT: exporting at the static size {static[0]}x{static[1]} for TensorRT")
        onnx_path = out.with_suffix(".onnx")
        log(f"exporting {model} to {onnx_path} first")
        export_onnx(net, onnx_path, opset=opset or DEFAULT_OPSET, static=static, log=log)
        meta = read_onnx_meta(onnx_path)
        assert meta is not None
        proto = onnx.load(str(onnx_path), load_external_data=False)
        require_tensorrt_compat(proto, str(onnx_path))
    transformer = any(n.op_type in ATTENTION_OPS for n in proto.graph.node)
    plan = plan_build(trt.__version__, fp16=fp16, int8=int8, transformer=transformer)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    onnx_hw = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[2:4])
    profile = resolve_profile(meta, onnx_hw, shapes["min"], shapes["opt"], shapes["max"])
    log(
        f"TensorRT {trt.__version__}: {plan.precision}, "
        + ("strongly typed" if plan.strongly_typed else f"flags {', '.join(plan.builder_flags) or 'none'}")
        + (f", FP32 layers {', '.join(plan.fp32_layer_types)}" if plan.fp32_layer_types else "")
    )
    with tempfile.TemporaryDirectory(prefix="densekit-trt-") as tmpdir:
        parse_path = onnx_path
        if plan.onnx_transform == "fp16":
            parse_path = Path(tmpdir) / "model_fp16.onnx"
            onnx.save(convert_to_fp16(onnx.load(str(onnx_path))), str(parse_path))
        elif plan.onnx_transform == "qdq":
            parse_path = Path(tmpdir) / "model_qdq.onnx"
            insert_qdq(onnx_path, parse_path, calibration_batches(calib_files, meta, profile["opt"]))
        serialized, input_name, output_name = _build(
            trt, parse_path, plan, profile, workspace_gb, timing_cache, calib_files, meta, device, out, log
        )
    info = EngineInfo(
        meta=meta,
        tensorrt_version=str(trt.__version__),
        precision=plan.precision,
        input_name=input_name,
        output_name=output_name,
        profile=profile,
        device=_device_info(device),
        extra={"onnx": onnx_path.name, "onnx_sha256": _sha256(onnx_path), "strongly_typed": plan.strongly_typed},
    )
    with atomic_path(out) as tmp:
        tmp.write_bytes(serialized)
        write_text_atomic(sidecar_path(out), info.to_json())
    report = EngineReport(path=out, onnx_path=onnx_path, plan=plan, seconds=time.perf_counter() - t0, info=info)
    if verify:
        report.parity = engine_parity(out, onnx_path, meta, profile, plan.precision, log)
    return report


def _build(
    trt: Any,
    onnx_path: Path,
    plan: BuildPlan,
    profile: dict[str, list[int]],
    workspace_gb: float | None,
    timing_cache: str | os.PathLike[str] | None,
    calib_files: list[Path],
    meta: ModelMeta,
    device: Any,
    out: Path,
    log: Callable[[str], None],
) -> tuple[bytes, str, str]:
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError:  # "pybind11::init(): factory function returned nullptr" when CUDA init fails
        raise DensekitError(
            "TensorRT could not initialise CUDA on this machine; run it on a machine with a GPU"
        ) from None
    flags = 0
    if plan.strongly_typed and plan.major == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise DensekitError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.fp32_layer_types:
        pinned = {getattr(trt.LayerType, name) for name in plan.fp32_layer_types}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in pinned:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    input_name = network.get_input(0).name
    output_name = network.get_output(0).name
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"]))
    config.add_optimization_profile(opt_profile)
    if plan.calibrator:
        batches = calibration_batches(calib_files, meta, profile["opt"])
        config.int8_calibrator = make_entropy_calibrator(trt, batches, out.with_suffix(".calib"), device)
        config.set_calibration_profile(opt_profile)
    cache = None
    if timing_cache is not None:
        cache_path = Path(timing_cache)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building {out.name} (profile min {profile['min']} opt {profile['opt']} max {profile['max']})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DensekitError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    if timing_cache is not None and cache is not None:
        write_bytes_atomic(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), input_name, output_name


def make_entropy_calibrator(trt: Any, batches: list[np.ndarray], cache: Path, device: Any) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``batches`` (TensorRT 10 implicit quantization)."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._current: Any = None

        def get_batch_size(self) -> int:
            return int(batches[0].shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._current = torch.from_numpy(batch).to(device).contiguous()  # kept alive until the next call
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            write_bytes_atomic(cache, bytes(data))

    return EntropyCalibrator()


def insert_qdq(src: Path, dst: Path, batches: list[np.ndarray]) -> None:
    """Explicit INT8 quantization (TensorRT 11): Q/DQ pairs from ONNX Runtime's static quantizer.

    Symmetric activations and weights (zero point 0, which TensorRT requires of QuantizeLinear and
    DequantizeLinear), per-channel weights, only Conv/MatMul/Gemm quantized so normalisation and
    softmax stay in floating point.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src),
        str(dst),
        calibration_reader(src, batches),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def engine_parity(
    engine: Path,
    onnx_path: Path,
    meta: ModelMeta,
    profile: dict[str, list[int]],
    precision: str,
    log: Callable[[str], None],
) -> list[tuple[tuple[int, int], int, float, float]]:
    """TensorRT against ONNX Runtime (CPU, fp32) on real photos at the opt and min sizes."""
    from densekit.serve.extractor import OnnxRuntimeBackend, TensorRTBackend, preprocess

    trt_runner = TensorRTBackend(engine)
    ort_runner = OnnxRuntimeBackend(onnx_path, device="cpu")
    photos = real_images()
    rows = []
    for shape in (profile["opt"], profile["min"]):
        b, _, h, w = shape
        x = preprocess([photos[i % len(photos)] for i in range(b)], meta, (h, w))
        max_abs, cos, _ = compare(ort_runner.run(x), trt_runner.run(x))
        rows.append(((h, w), b, max_abs, cos))
        log(f"TensorRT {precision} vs ONNX Runtime {h}x{w} batch {b}: max |diff| {max_abs:.3g}, cosine {cos:.6f}")
        if cos < PARITY_COSINE[precision]:
            raise DensekitError(
                f"{engine}: TensorRT output differs from ONNX Runtime (cosine {cos:.6f} < "
                f"{PARITY_COSINE[precision]} for {precision})"
            )
    return rows


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
