"""The densekit model contract for exported models, read without torch.

An exported ONNX model carries :class:`~densekit.serve.contract.ModelMeta` as JSON in its
``metadata_props`` under the key ``densekit`` (the same key a safetensors checkpoint uses). A TensorRT
engine stays a plain plan file that ``trtexec`` and Triton read unchanged, so its metadata lives in a
JSON *sidecar* next to it: ``model.engine`` -> ``model.engine.json``. The sidecar also records the
TensorRT version that built the plan, because a plan only deserialises with the exact TensorRT version
that built it (``Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed``,
NVIDIA/TensorRT#2072) and a matching version lets us say so in one line instead of that assertion.

Nothing here imports torch or tensorrt; ONNX files are read with the ``onnx`` package if it is
installed, else through an ONNX Runtime session.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densekit.serve.contract import IMAGENET_MEAN, IMAGENET_STD, ModelMeta
from densekit.serve.errors import DensekitError, one_line
from densekit.serve.meta_schema import SIDECAR_CHARS, SIDECAR_DEPTH, check_sidecar, loads_bounded

META_KEY = "densekit"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "densekit-tensorrt-engine/1"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
ONNX_SUFFIXES = (".onnx",)


def read_onnx_metadata_props(path: str | os.PathLike[str]) -> dict[str, str]:
    """All ``metadata_props`` of an ONNX file as a dict (weights are not needed, but protobuf parses them)."""
    path = Path(path)
    if not path.is_file():
        raise DensekitError(f"{path}: ONNX file not found")
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError / ValueError / OSError for non-ONNX bytes
            raise DensekitError(f"{path}: not a valid ONNX file ({one_line(exc)})") from None
        if not model.graph.node and not model.graph.input:
            raise DensekitError(f"{path}: not a valid ONNX file (empty graph)")
        return {p.key: p.value for p in model.metadata_props}
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DensekitError(f"{path}: not a valid ONNX file ({one_line(exc)})") from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def meta_from_props(props: dict[str, str], source: str) -> ModelMeta | None:
    """The ModelMeta stored under ``densekit`` in ``props``, None when absent."""
    if META_KEY not in props:
        return None
    try:
        return ModelMeta.from_json(props[META_KEY])
    except DensekitError as exc:
        raise DensekitError(f"{source}: broken densekit metadata: {exc}") from None


def read_onnx_meta(path: str | os.PathLike[str]) -> ModelMeta | None:
    """The densekit ModelMeta of an ONNX file, or None if the file has none."""
    return meta_from_props(read_onnx_metadata_props(path), str(path))


def explicit_meta(
    source: str,
    dim: int,
    *,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    stride: int | None,
    input_multiple: int | None = None,
) -> ModelMeta:
    """A ModelMeta for a foreign ONNX file, from arguments the user gave explicitly.

    All three of mean, std and stride are required: guessing normalisation silently gives wrong
    features that still look plausible, which is worse than refusing.
    """
    missing = [k for k, v in (("mean", mean), ("std", std), ("stride", stride)) if v is None]
    if missing:
        raise DensekitError(
            f"{source}: ONNX file without densekit metadata; pass {', '.join(missing)} explicitly "
            f"(e.g. --mean {','.join(map(str, IMAGENET_MEAN))} --std {','.join(map(str, IMAGENET_STD))} --stride 8) "
            "or export it with `densekit export onnx`"
        )
    assert mean is not None and std is not None and stride is not None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or stride <= 0:
        raise DensekitError(f"{source}: mean and std need 3 values (std > 0) and stride must be positive")
    return ModelMeta(
        name=Path(source).stem,
        stride=int(stride),
        dim=int(dim),
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        input_multiple=int(input_multiple or stride),
        arch={"family": "external"},
    )


def sidecar_path(engine: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class EngineInfo:
    """What the sidecar of a TensorRT engine says.

    Attributes:
        meta: the model contract.
        tensorrt_version: full version string of the TensorRT that built the plan (``10.16.1.11``).
        precision: ``fp32``, ``fp16`` or ``int8``.
        input_name, output_name: the engine's I/O tensor names.
        profile: ``{"min": [B, 3, H, W], "opt": [...], "max": [...]}`` of the optimisation profile.
        device: GPU name and compute capability the plan was built on.
        extra: every other key of the sidecar.
    """

    meta: ModelMeta
    tensorrt_version: str
    precision: str
    input_name: str
    output_name: str
    profile: dict[str, list[int]]
    device: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        raw = {
            "format": SIDECAR_FORMAT,
            META_KEY: json.loads(self.meta.to_json()),
            "tensorrt_version": self.tensorrt_version,
            "precision": self.precision,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "profile": self.profile,
            "device": self.device,
            **self.extra,
        }
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"


def read_engine_sidecar(engine: str | os.PathLike[str]) -> EngineInfo:
    """Parse ``<engine>.json``; DensekitError if the engine or its sidecar is missing or malformed."""
    engine = Path(engine)
    if not engine.is_file():
        raise DensekitError(f"{engine}: engine file not found")
    side = sidecar_path(engine)
    if not side.is_file():
        raise DensekitError(
            f"{engine}: no metadata sidecar {side.name} beside the engine; build engines with `densekit export trt`"
        )
    try:
        if side.stat().st_size > SIDECAR_CHARS * 4:  # 4 bytes per character at most in UTF-8
            raise DensekitError(f"{side}: {side.stat().st_size} bytes is far too large for an engine sidecar")
        text = side.read_bytes()
    except OSError as exc:
        raise DensekitError(f"{side}: cannot read it ({one_line(exc)})") from None
    try:
        raw = loads_bounded(text, "the sidecar", max_depth=SIDECAR_DEPTH, max_chars=SIDECAR_CHARS)
        if not isinstance(raw, dict) or raw.get("format") != SIDECAR_FORMAT:
            raise DensekitError(f"not a densekit engine sidecar (format {SIDECAR_FORMAT!r} expected)")
        fields = check_sidecar(raw)
        meta = ModelMeta.from_dict(fields.pop(META_KEY))
    except DensekitError as exc:
        raise DensekitError(f"{side}: {exc}") from None
    known = {"format", META_KEY, "tensorrt_version", "precision", "input_name", "output_name", "profile", "device"}
    return EngineInfo(meta=meta, **fields, extra={k: v for k, v in raw.items() if k not in known})


def check_engine_version(engine: str | os.PathLike[str], built_with: str, running: str) -> None:
    """Refuse an engine built by another TensorRT version (plans are not portable across versions).

    TensorRT only deserialises plans from the exact build that made them unless they were built
    version-compatible, which densekit does not do (it costs speed); we compare the full version.
    """
    if built_with.strip() != running.strip():
        raise DensekitError(
            f"{engine}: engine built with TensorRT {built_with} but this is TensorRT {running}; "
            f"rebuild it here with `densekit export trt MODEL.onnx --out {Path(engine).name}`"
        )
