"""OpenVINO on the CPU: an ``.onnx`` file or an IR folder (``densekit export openvino``) -> a backend.

Why a third CPU runtime: on CPUs with bf16 units (AVX-512 BF16, AMX) OpenVINO's CPU plugin runs float32
graphs in bf16 by default, and that halves the feature cost: resnet18 stride 8 at 1x3x360x640 on 2 cores
of an AMD EPYC with ``avx512_bf16``, 54-59 ms against ONNX Runtime's 108-121 ms fp32, cosine 0.99997
(issue 14). Where the CPU has no bf16, OpenVINO f32 runs at about ONNX Runtime's speed, so ``auto`` keeps
ONNX Runtime there (:func:`prefers_openvino`).

The precision that really runs is read back from the compiled model (``INFERENCE_PRECISION_HINT``), not
assumed: ``provider`` is ``"openvino:CPU:bf16"`` or ``"openvino:CPU:f32"``.

The contract: OpenVINO's ONNX frontend copies an ONNX file's ``metadata_props`` into the model's rt_info
under ``framework``, so an ``.onnx`` exported by densekit carries its :class:`ModelMeta` at
``framework/densekit``; an IR written by ``densekit export openvino`` carries it at ``densekit/meta``
(inside ``model.xml``), with the export's settings at ``densekit/export``. (An IR that OpenVINO's own ``ovc``
converted from a densekit ``.onnx`` keeps ``framework/densekit``, so it is read too.)

``openvino`` is an optional extra (``pip install 'densekit[openvino]'``), imported only here and only when
used; without it, one DensekitError line says what to install.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError, one_line

IR_XML = "model.xml"  # what `densekit export openvino` writes into its folder (with model.bin)
RT_META = ("densekit", "meta")  # rt_info path of the ModelMeta JSON in an IR
RT_EXPORT = ("densekit", "export")  # rt_info path of the export settings (JSON: precision, source, versions)
RT_ONNX_META = ("framework", "densekit")  # where the ONNX frontend puts metadata_props["densekit"]
# metadata_props key of the ONNX export settings, written by densekit.export.onnx.EXPORT_KEY (serve cannot
# import export; tests/test_openvino.py checks the two agree)
ONNX_EXPORT_KEY = "densekit_export"
PRECISIONS = ("f32", "bf16", "f16")
INSTALL_HINT = "pip install 'densekit[openvino]' (or pip install openvino)"


def import_openvino() -> Any:
    """``import openvino``, or one clear DensekitError saying what to install."""
    try:
        import openvino
    except ImportError:
        raise DensekitError(f"OpenVINO is not installed: {INSTALL_HINT}") from None
    except Exception as exc:  # a broken install (missing shared library) raises OSError/RuntimeError
        raise DensekitError(f"OpenVINO failed to load ({one_line(exc)}): {INSTALL_HINT}") from None
    return openvino


def ir_xml(path: str | os.PathLike[str]) -> Path | None:
    """The IR's ``.xml`` for an IR folder or ``.xml`` path, None when ``path`` is neither.

    A folder counts when it holds ``model.xml`` or exactly one ``*.xml`` (so a plain folder that happens to
    share a backbone's name is never taken for a model).
    """
    p = Path(path)
    if p.suffix.lower() == ".xml":
        return p
    if not p.is_dir():
        return None
    if (p / IR_XML).is_file():
        return p / IR_XML
    found = sorted(p.glob("*.xml"))
    return found[0] if len(found) == 1 else None


def _cpu_may_have_bf16() -> bool:
    """False only when Linux's CPU flags rule bf16 out, which spares the ~1 s ``import openvino``.

    OpenVINO reports BF16 for AVX-512 BF16, AMX-BF16 and AVX2-VNNI-2 (``avx_ne_convert``) CPUs.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # not Linux: ask OpenVINO
    return "bf16" in text or "avx_ne_convert" in text


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether OpenVINO is installed and its CPU plugin lists ``BF16`` in ``OPTIMIZATION_CAPABILITIES``."""
    if not _cpu_may_have_bf16():
        return False
    try:
        ov = import_openvino()
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or no CPU plugin: the rule then keeps ONNX Runtime
        return False


def prefers_openvino(onnx_path: str | os.PathLike[str], device: str | None) -> bool:
    """``backend="auto"`` for an ``.onnx`` file: OpenVINO rather than ONNX Runtime?

    The rule: yes when the CPU runs bf16 (:func:`cpu_has_bf16`, which also needs openvino installed), the
    device allows the CPU (None, ``auto``, ``cpu``: with ``cuda`` ONNX Runtime's GPU providers are asked for),
    ONNX Runtime offers no GPU provider for None/``auto``, and the graph is float32 (an ``--int8`` graph was
    calibrated and checked for ONNX Runtime's kernels, a ``--half`` one is meant for GPUs). Everything else
    keeps today's choice, ONNX Runtime: bf16 is where OpenVINO was measured 2x faster (module docstring).
    """
    if device not in (None, "auto", "cpu") or not cpu_has_bf16():
        return False
    if device != "cpu" and _ort_has_gpu():
        return False
    from densekit.serve.onnx_meta import read_onnx_metadata_props

    try:
        info = json.loads(read_onnx_metadata_props(onnx_path).get(ONNX_EXPORT_KEY, "{}"))
    except (DensekitError, ValueError):
        return False  # ONNX Runtime's loader then gives the one-line error for a broken file
    return not (isinstance(info, dict) and (info.get("int8") or info.get("half")))


def _ort_has_gpu() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in ort.get_available_providers() for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))


def check_precision_runs(ov: Any, precision: str | None) -> None:
    """DensekitError when ``precision`` (bf16, f16) is not among the CPU plugin's capabilities; None/f32 pass."""
    caps = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    needed = {"bf16": "BF16", "f16": "FP16"}.get(precision or "")
    if needed is not None and needed not in caps:
        raise DensekitError(
            f"precision {precision}: OpenVINO cannot run it on this CPU (capabilities: {', '.join(caps)}); use f32 or auto"
        )


def rt_text(model: Any, path: tuple[str, ...]) -> str | None:
    """The string at rt_info ``path`` of an ``ov.Model``, None when absent."""
    if not model.has_rt_info(list(path)):
        return None
    return str(model.get_rt_info(list(path)).astype(str))


class OpenVinoBackend:
    """Runs an ``.onnx`` file or an OpenVINO IR on OpenVINO's CPU plugin.

    Args:
        path: an ``.onnx`` file, an IR ``.xml`` (with its ``.bin``) or a folder from ``densekit export openvino``.
        device: None, ``"auto"`` or ``"cpu"`` (OpenVINO's CPU plugin); anything else is a DensekitError.
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, one per physical core).
        precision: ``"f32"``, ``"bf16"`` or ``"f16"`` as ``INFERENCE_PRECISION_HINT``; None: what the IR's export
            recorded, else the plugin's default (bf16 where the CPU has it, f32 otherwise). A precision that
            was asked for and does not run (bf16 on a CPU without it) is a DensekitError, not a silent f32.

    Attributes:
        provider: ``"openvino:CPU:<precision that runs>"``. precision: that precision (``f32``, ``bf16``...).
        fixed_hw: (H, W) if the model's input size is static, else None (H and W dynamic, any size runs).
        output_dim: D when the model states it. meta: the densekit contract it carries, or None.
    """

    name = "openvino"
    device = "cpu"

    def __init__(self, path: str | os.PathLike[str], device: str | None = None, threads: int | None = None,
                 precision: str | None = None) -> None:
        if device not in (None, "auto", "cpu"):
            raise DensekitError(
                f"device {device!r}: the OpenVINO backend runs on the CPU; use device='cpu', or backend='onnxruntime'"
                " or 'tensorrt' for a GPU"
            )
        ov = import_openvino()
        self.path, model = _read_model(ov, path)
        self.meta = _carried_meta(model, self.path)
        self.export_info = _export_info(model)
        wanted = precision or self.export_info.get("precision")
        wanted = None if wanted in (None, "auto") else str(wanted)
        if wanted is not None and wanted not in PRECISIONS:
            raise DensekitError(f"unknown OpenVINO precision {wanted!r}; choose one of auto, {', '.join(PRECISIONS)}")
        check_precision_runs(ov, wanted)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}  # one stream: frames come one at a time
        if wanted is not None:
            config["INFERENCE_PRECISION_HINT"] = wanted
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line messages
            raise DensekitError(f"{self.path}: OpenVINO cannot compile it for the CPU ({one_line(exc)})") from None
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if wanted is not None and self.precision != wanted:
            raise DensekitError(
                f"{self.path}: {wanted} was asked for but OpenVINO runs {self.precision} on this CPU "
                f"(capabilities: {', '.join(ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))})"
            )
        self.provider = f"openvino:CPU:{self.precision}"
        self.fixed_hw, self.output_dim = _io_shape(model, self.path)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: concurrent callers (HTTP threads) take turns

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, D, H/s, W/s) float32."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            try:
                self.request.infer({0: x})
            except Exception as exc:
                raise DensekitError(f"{self.path}: OpenVINO failed on input {tuple(x.shape)} ({one_line(exc)})") from None
            return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)  # copy: the buffer is reused


def _read_model(ov: Any, path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """(the file read, ``ov.Model``) for an ``.onnx``, an ``.xml`` or an IR folder; one line when unreadable."""
    given = Path(path)
    xml = ir_xml(given)
    target = given if given.suffix.lower() == ".onnx" else xml
    if target is None:
        raise DensekitError(f"{given}: no OpenVINO IR here (a folder with {IR_XML} and model.bin, an .xml, or an .onnx)")
    if not target.is_file():
        raise DensekitError(f"{target}: file not found")
    if target.suffix.lower() == ".xml" and not target.with_suffix(".bin").is_file():
        raise DensekitError(f"{target}: its weights {target.with_suffix('.bin').name} are missing beside it")
    try:
        model = ov.Core().read_model(str(target))
    except Exception as exc:
        raise DensekitError(f"{target}: OpenVINO cannot read it ({one_line(exc)})") from None
    if len(model.inputs) != 1 or len(model.outputs) < 1 or model.input(0).get_partial_shape().rank.get_length() != 4:
        raise DensekitError(f"{target}: a dense model has one (B, 3, H, W) input; this one has {len(model.inputs)}")
    return target, model


def _carried_meta(model: Any, source: Path) -> ModelMeta | None:
    """The ModelMeta in the IR's rt_info (or the ONNX file's metadata_props), None when it carries none."""
    text = rt_text(model, RT_META) or rt_text(model, RT_ONNX_META)
    if text is None:
        return None
    try:
        return ModelMeta.from_json(text)
    except DensekitError as exc:
        raise DensekitError(f"{source}: broken densekit metadata: {exc}") from None


def _export_info(model: Any) -> dict[str, Any]:
    text = rt_text(model, RT_EXPORT)
    try:
        info = json.loads(text) if text else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _io_shape(model: Any, source: Path) -> tuple[tuple[int, int] | None, int | None]:
    """((H, W) when static else None, D when static else None) of the model's input and first output."""
    shape_in = model.input(0).get_partial_shape()
    h, w = shape_in[2], shape_in[3]
    fixed = (h.get_length(), w.get_length()) if h.is_static and w.is_static else None
    shape_out = model.output(0).get_partial_shape()
    d = shape_out[1] if shape_out.rank.is_static and shape_out.rank.get_length() == 4 else None
    return fixed, (d.get_length() if d is not None and d.is_static else None)
