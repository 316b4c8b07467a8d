"""Names and paths in, models out: the one place densekit turns "a name or a path" into something that runs.

:func:`load_backbone`
    a built-in name (``resnet18``, ``timm:<model>``...: :mod:`densekit.serve.backbones`' registry) or a
    ``.safetensors`` checkpoint (:mod:`densekit.serve.checkpoint`) -> a torch :class:`DenseBackbone`.
:func:`open_backend`
    the same, or an ``.onnx`` file (:class:`OnnxRuntimeBackend`, or OpenVINO's
    :class:`~densekit.serve.openvino_backend.OpenVinoBackend`), an OpenVINO IR folder or ``.xml``, or a TensorRT
    ``.engine``/``.plan``/``.trt`` with its JSON sidecar (:class:`TensorRTBackend`), or a DenseBackbone object ->
    (meta, backend); what :class:`~densekit.serve.extractor.FeatureExtractor` runs. :func:`backend_for` picks the
    backend by suffix (and, for ``.onnx`` under ``auto``, by the CPU: OpenVINO where it runs bf16).

A backend is any object with ``run(batch: np.ndarray (B, 3, H, W) float32) -> np.ndarray (B, D, H/s, W/s)``
(:class:`Backend`). ONNX Runtime's provider list is only a request: ``onnxruntime-gpu`` falls back to the CPU
silently when CUDA/cuDNN libraries are missing (microsoft/onnxruntime#23372), so the provider that really runs
is read back from the session. Importing this module does not import torch; the ONNX Runtime path never does, so an
exported model serves on a machine with only numpy, OpenCV and onnxruntime. The torch parts (backbones,
checkpoints, the torch and TensorRT backends) are imported when they are used.

Import direction: ``loader`` -> ``backbones``, ``checkpoint``, ``onnx_meta``, ``openvino_backend``; ``checkpoint`` ->
``backbones``; none of them imports ``loader`` or ``extractor`` (``extractor`` -> ``loader``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError, one_line
from densekit.serve.onnx_meta import (
    ENGINE_SUFFIXES,
    ONNX_SUFFIXES,
    check_engine_version,
    explicit_meta,
    meta_from_props,
    read_engine_sidecar,
)

if TYPE_CHECKING:
    from densekit.serve.backbones import DenseBackbone

CHECKPOINT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


def load_backbone(name_or_path: str | os.PathLike[str], seed: int = 0) -> DenseBackbone:
    """A torch backbone from a built-in name (see :func:`~densekit.serve.backbones.build_backbone`) or a
    ``.safetensors`` checkpoint path, in eval mode.

    Raises:
        DensekitError: unknown name, a missing or broken checkpoint, an exported model (those run through
            :func:`open_backend`), a pickle (never unpickled), or any other existing file.
    """
    text = os.fspath(name_or_path)
    suffix = Path(text).suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        from densekit.serve.checkpoint import load_checkpoint

        return load_checkpoint(text)
    if suffix in ONNX_SUFFIXES + ENGINE_SUFFIXES + (".xml",):
        raise DensekitError(
            f"{text}: {suffix} models are not supported by load_backbone (it gives torch models); "
            "run them with FeatureExtractor, which opens .onnx files, OpenVINO IRs and TensorRT engines"
        )
    if suffix in PICKLE_SUFFIXES:
        raise DensekitError(
            f"{text}: densekit reads .safetensors checkpoints only (it never unpickles {suffix} files)"
        )
    if not isinstance(name_or_path, str) or Path(text).exists():
        raise DensekitError(f"{text}: not a backbone name or a .safetensors checkpoint")
    from densekit.serve.backbones import build_backbone

    return build_backbone(text, seed=seed)


class Backend(Protocol):
    """Runs a dense network on a preprocessed batch."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, D, H/s, W/s) float32 (not normalised)."""
        ...


class TorchBackend:
    """Runs a :class:`DenseBackbone` with torch under ``inference_mode``.

    ``name`` = ``"torch"``, ``provider`` = ``"torch:<device>"``, ``fixed_hw`` = None (any size).

    The model is moved to ``device``; it runs in eval mode and is put back into training mode
    afterwards if it was training (so an extractor can be used on a model that is being trained).
    """

    name = "torch"
    fixed_hw: tuple[int, int] | None = None

    def __init__(self, model: DenseBackbone, device: str = "cpu") -> None:
        self.device = resolve_torch_device(device)
        self.model = model.to(self.device)
        self.provider = f"torch:{self.device}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
                out = self.model(x)
        finally:
            self.model.train(was_training)
        return out.float().cpu().numpy()


def resolve_torch_device(device: str) -> Any:
    """``'cpu'`` or ``'cuda'``/``'cuda:N'`` as a ``torch.device``; DensekitError if unusable (no fallback)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DensekitError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DensekitError(f"unsupported device {device!r}: use 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise DensekitError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DensekitError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TRT_INSTALL_HINT = (
    "install it with `pip install 'densekit[trt]'` (tensorrt>=10, polygraphy) on a Linux or Windows machine "
    "with an NVIDIA GPU and driver, and run this there"
)


class OnnxRuntimeBackend:
    """Runs an ONNX model with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        device: ``None``/``"auto"``: best available provider (TensorRT, CUDA, CPU in that order);
            ``"cpu"``: CPU only; ``"cuda"``/``"cuda:N"``: TensorRT or CUDA on GPU N, and a
            DensekitError if ONNX Runtime ends up on the CPU anyway (no silent fallback when a GPU
            was asked for).
        threads: ``intra_op_num_threads`` (None: ONNX Runtime's default, one per physical core).

    Attributes:
        provider: the execution provider that really runs (``session.get_providers()[0]``).
        requested: the provider list handed to the session.
        fixed_hw: (H, W) if the model has a static input size, else None.
        input_dtype: float32, or float16 for a model exported with ``--half`` without float32 I/O.
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], device: str | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DensekitError(
                "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
            ) from None
        self.path = Path(path)
        self.requested = ort_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # the provider fallback is reported through .provider, not logs
        if threads:
            options.intra_op_num_threads = int(threads)
        # ORT's pool threads busy-wait after each run by default. Frames here alternate with torch work
        # (propagation, k-means) that then runs on cores still spinning: live tracking at 360p measured
        # 158 -> 113 ms for the window search with spinning off, while back-to-back runs alone were within
        # 5 % either way (benchmarks/live_latency.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.requested)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf classes
            raise DensekitError(f"{self.path}: ONNX Runtime cannot load it ({one_line(exc)})") from None
        self.provider = self.session.get_providers()[0]
        if device is not None and device.startswith("cuda") and self.provider == "CPUExecutionProvider":
            raise DensekitError(
                f"device {device!r} requested but ONNX Runtime runs {self.path.name} on the CPU "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu whose CUDA "
                "major version matches the installed CUDA/cuDNN, or use device='cpu'"
            )
        inp, out = self.session.get_inputs(), self.session.get_outputs()
        if len(inp) != 1 or len(out) < 1 or len(inp[0].shape) != 4:
            raise DensekitError(f"{self.path}: a dense model has one (B, 3, H, W) input; this one has {len(inp)}")
        self.input_name = inp[0].name
        self.output_name = out[0].name
        self.input_dtype = np.float16 if inp[0].type == "tensor(float16)" else np.float32
        h, w = inp[0].shape[2:]
        self.fixed_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        d = out[0].shape[1] if len(out[0].shape) == 4 else None
        self.output_dim = d if isinstance(d, int) else None

    def metadata_props(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)


def ort_providers(device: str | None, available: Sequence[str]) -> list[str]:
    """The provider priority list for ``device`` among ``available`` (see :class:`OnnxRuntimeBackend`).

    ``get_available_providers()`` reflects how the wheel was built, not this machine (onnxruntime-gpu
    lists TensorRT and CUDA on a machine without a GPU), so the list is only a request: what really
    runs is read back from the session.
    """
    if device is None or device == "auto":
        wanted: list[str] = list(ORT_PROVIDER_ORDER)
    elif device == "cpu":
        wanted = ["CPUExecutionProvider"]
    elif device == "cuda" or device.startswith("cuda:"):
        wanted = list(ORT_PROVIDER_ORDER)
        if device.startswith("cuda:") and not device[5:].isdigit():
            raise DensekitError(f"invalid device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    else:
        raise DensekitError(f"unsupported device {device!r}: use 'cpu', 'cuda[:N]' or 'auto'")
    chosen = [p for p in wanted if p in available]
    if device is not None and device.startswith("cuda") and not any(p != "CPUExecutionProvider" for p in chosen):
        raise DensekitError(
            f"device {device!r} requested but this onnxruntime has no GPU provider "
            f"(available: {', '.join(available)}); pip install onnxruntime-gpu (and uninstall onnxruntime)"
        )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if device is not None and device.startswith("cuda:"):
        index = int(device[5:])
        return [(p, {"device_id": index}) if p != "CPUExecutionProvider" else p for p in chosen]  # type: ignore[misc]
    return chosen


def import_tensorrt() -> Any:
    """``import tensorrt``, or one clear DensekitError saying what to install and where."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DensekitError(f"TensorRT is not installed: {TRT_INSTALL_HINT}") from None
    except Exception as exc:  # a broken install (missing libnvinfer) raises OSError/RuntimeError
        raise DensekitError(f"TensorRT failed to load ({one_line(exc)}): {TRT_INSTALL_HINT}") from None
    return trt


def require_cuda_for_tensorrt(device: str | None = None) -> Any:
    """The torch CUDA device TensorRT runs on, or a DensekitError when there is no usable GPU."""
    try:
        import torch
    except ImportError:
        raise DensekitError("the TensorRT backend uses torch for its CUDA buffers: pip install torch") from None
    if not torch.cuda.is_available():
        raise DensekitError(
            "TensorRT needs an NVIDIA GPU with a working CUDA driver and this machine has none; "
            "run it on a GPU machine (ONNX Runtime serves the .onnx file here)"
        )
    # TensorRT only runs on CUDA: 'cpu' (the CLI default) and 'auto' mean the current GPU
    return resolve_torch_device(device if device and device.startswith("cuda") else "cuda")


class TensorRTBackend:
    """Runs a serialized TensorRT engine (plan file + ``.json`` sidecar from ``densekit export trt``).

    I/O buffers are CUDA torch tensors (``data_ptr()``) and the engine runs on torch's current stream
    with ``execute_async_v3``; this is the named-tensor API of TensorRT >= 8.5, the only one left in
    TensorRT 10 and 11. Inputs must lie inside the engine's optimisation profile.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike[str], device: str | None = None) -> None:
        self.path = Path(path)
        self.info = read_engine_sidecar(self.path)
        trt = import_tensorrt()
        check_engine_version(self.path, self.info.tensorrt_version, trt.__version__)
        self.device = require_cuda_for_tensorrt(device)
        import torch

        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self.logger)
            self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise DensekitError(
                    f"{self.path}: TensorRT could not deserialize the engine (built for another GPU or TensorRT "
                    f"build?); rebuild it here with `densekit export trt`"
                )
            self.context = self.engine.create_execution_context()
        self.provider = f"TensorRT {trt.__version__} ({self.info.precision})"
        self.input_name, self.output_name = self.info.input_name, self.info.output_name
        self.dtypes = {
            name: _torch_dtype(torch, trt, self.engine.get_tensor_dtype(name))
            for name in (self.input_name, self.output_name)
        }
        lo, hi = self.info.profile["min"], self.info.profile["max"]
        self.fixed_hw = (lo[2], lo[3]) if lo[2:] == hi[2:] else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        lo, hi = self.info.profile["min"], self.info.profile["max"]
        if any(not (a <= s <= b) for a, s, b in zip(lo, batch.shape, hi)):
            raise DensekitError(
                f"input {tuple(batch.shape)} outside the engine's profile min {tuple(lo)} max {tuple(hi)}; "
                "rebuild with --min-shape/--max-shape or use a smaller size"
            )
        with torch.cuda.device(self.device):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            x = x.to(self.dtypes[self.input_name]).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            y = torch.empty(out_shape, dtype=self.dtypes[self.output_name], device=self.device)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise DensekitError(f"{self.path}: TensorRT execution failed")
            stream.synchronize()
        return y.float().cpu().numpy()


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if dtype not in table:
        raise DensekitError(f"engine tensor type {dtype} is not supported (float32/float16 I/O only)")
    return table[dtype]


def backend_for(model: Any, backend: str, device: str | None = None) -> str:
    """Which backend ``backend="auto"`` means for ``model`` (by file suffix; names are torch).

    An ``.onnx`` file runs with either ONNX Runtime or OpenVINO; ``auto`` takes OpenVINO only where
    :func:`~densekit.serve.openvino_backend.prefers_openvino` says so (a bf16 CPU), else ONNX Runtime.
    An IR folder or ``.xml`` is OpenVINO's.
    """
    from densekit.serve.openvino_backend import ir_xml, prefers_openvino

    if backend not in BACKENDS:
        raise DensekitError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(model, (str, Path)):
        if backend not in ("auto", "torch"):
            raise DensekitError(f"backend {backend!r} needs a model file path, not a {type(model).__name__}")
        return "torch"
    suffix = Path(str(model)).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        if backend in ("onnxruntime", "openvino"):
            return backend
        natural = "openvino" if backend == "auto" and prefers_openvino(str(model), device) else "onnxruntime"
    elif suffix in ENGINE_SUFFIXES:
        natural = "tensorrt"
    elif ir_xml(str(model)) is not None:
        natural = "openvino"
    else:
        natural = "torch"
    if backend == "auto":
        return natural
    if backend != natural:
        kinds = {"torch": "a backbone name or .safetensors checkpoint", "onnxruntime": "an .onnx file",
                 "openvino": "an .onnx file or an OpenVINO IR folder", "tensorrt": "an .engine/.plan file with its .json sidecar"}
        hint = " (export it first: densekit export onnx|openvino|trt)" if natural == "torch" else ""
        raise DensekitError(f"backend {backend!r} runs {kinds[backend]}, not {model}{hint}")
    return backend


def open_backend(
    model: str | os.PathLike[str] | DenseBackbone,
    device: str | None = None,
    seed: int = 0,
    backend: str = "auto",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    stride: int | None = None,
    threads: int | None = None,
) -> tuple[ModelMeta, Backend]:
    """(meta, backend) for a backbone name, checkpoint, ``.onnx`` file, engine or :class:`DenseBackbone`.

    ``mean``/``std``/``stride`` describe an ONNX file that carries no densekit metadata (all three
    are then required); for a file with metadata they are ignored unless given, in which case they
    must agree with it.
    """
    kind = backend_for(model, backend, device)
    if kind == "onnxruntime":
        return _open_onnx(Path(str(model)), device, mean=mean, std=std, stride=stride, threads=threads)
    if kind == "openvino":
        return _open_openvino(Path(str(model)), device, mean=mean, std=std, stride=stride, threads=threads)
    if kind == "tensorrt":
        runner = TensorRTBackend(Path(str(model)), device)
        return runner.info.meta, runner
    from densekit.serve.backbones import DenseBackbone

    if not isinstance(model, DenseBackbone):
        if not isinstance(model, (str, Path)):
            kind_name = type(model).__name__
            raise DensekitError(f"model must be a backbone name, a checkpoint path or a DenseBackbone, not {kind_name}")
        model = load_backbone(model, seed=seed)
    return model.meta, TorchBackend(model, "cpu" if device in (None, "auto") else device)


def _open_onnx(
    path: Path,
    device: str | None,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    stride: int | None,
    threads: int | None,
) -> tuple[ModelMeta, Backend]:
    if not path.is_file():
        raise DensekitError(f"{path}: ONNX file not found")
    runner = OnnxRuntimeBackend(path, device, threads=threads)
    meta = meta_from_props(runner.metadata_props(), str(path))
    return _contract(meta, path, runner.output_dim, mean=mean, std=std, stride=stride), runner


def _open_openvino(
    path: Path,
    device: str | None,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    stride: int | None,
    threads: int | None,
) -> tuple[ModelMeta, Backend]:
    from densekit.serve.openvino_backend import OpenVinoBackend

    if path.suffix.lower() in ONNX_SUFFIXES and not path.is_file():
        raise DensekitError(f"{path}: ONNX file not found")
    runner = OpenVinoBackend(path, device, threads=threads)
    if runner.meta is None and runner.path.suffix.lower() == ".xml" and None in (mean, std, stride):
        raise DensekitError(
            f"{runner.path}: OpenVINO IR without a densekit contract in its rt_info; write it with "
            "`densekit export openvino MODEL --out DIR`, or pass mean, std and stride"
        )
    return _contract(runner.meta, runner.path, runner.output_dim, mean=mean, std=std, stride=stride), runner


def _contract(
    meta: ModelMeta | None,
    path: Path,
    dim: int | None,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    stride: int | None,
) -> ModelMeta:
    """The exported model's own contract, checked against what the caller gave; or one built from those."""
    given = {"mean": mean, "std": std, "stride": stride}
    if meta is None:
        return explicit_meta(
            str(path),
            dim or 0,
            mean=tuple(mean) if mean is not None else None,  # type: ignore[arg-type]
            std=tuple(std) if std is not None else None,  # type: ignore[arg-type]
            stride=stride,
        )
    stored = {"mean": tuple(meta.mean), "std": tuple(meta.std), "stride": meta.stride}
    for key, value in given.items():
        if value is None:
            continue
        same = value == stored[key] if key == "stride" else np.allclose(value, stored[key], atol=1e-6)
        if not same:
            raise DensekitError(f"{path}: {key} {value} contradicts the model's metadata ({stored[key]})")
    return meta
