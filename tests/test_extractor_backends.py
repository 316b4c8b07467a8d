"""FeatureExtractor over torch and ONNX Runtime: same features, the provider that really runs, no torch needed."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from densekit.apps.cli import main
from densekit.export.onnx import export_onnx
from densekit.serve.errors import DensekitError
from densekit.serve.extractor import FeatureExtractor
from densekit.serve.loader import ort_providers


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backends")
    paths = {"r18": root / "r18.onnx", "px_static": root / "px_static.onnx"}
    export_onnx("resnet18", paths["r18"], log=lambda _m: None)
    export_onnx("pixels", paths["px_static"], static=(64, 96), log=lambda _m: None)
    return paths


def test_onnxruntime_matches_torch(exported: dict[str, Path]) -> None:
    ort_ext = FeatureExtractor(exported["r18"], backend="onnxruntime")  # auto may pick OpenVINO on a bf16 CPU
    torch_ext = FeatureExtractor("resnet18")
    assert ort_ext.backend_name == "onnxruntime" and torch_ext.backend_name == "torch"
    assert ort_ext.provider == "CPUExecutionProvider" and ort_ext.device == "cpu"  # what really runs
    assert ort_ext.meta == torch_ext.meta
    frames = [frame(120, 200, 1), frame(120, 200, 2)]
    a, b = torch_ext.batch(frames), ort_ext.batch(frames)
    assert a.shape == b.shape == (2, 256, 15, 25)
    np.testing.assert_allclose(b, a, atol=1e-4)
    assert np.abs(ort_ext(frame(64, 64)) - torch_ext(frame(64, 64))).max() < 1e-4  # another size, dynamic axes


def test_explicit_backend_and_mismatches(exported: dict[str, Path]) -> None:
    assert FeatureExtractor(exported["r18"], backend="onnxruntime", device="cpu").provider == "CPUExecutionProvider"
    with pytest.raises(DensekitError, match="an .onnx file"):
        FeatureExtractor("resnet18", backend="onnxruntime")
    with pytest.raises(DensekitError, match="engine"):
        FeatureExtractor(exported["r18"], backend="tensorrt")
    with pytest.raises(DensekitError, match="unknown backend"):
        FeatureExtractor(exported["r18"], backend="tvm")


def test_static_model_resizes_to_its_size(exported: dict[str, Path]) -> None:
    ext = FeatureExtractor(exported["px_static"])
    assert ext.fixed_hw == (64, 96)
    assert ext(frame(120, 200)).shape == (192, 8, 12)
    with pytest.raises(DensekitError, match="static input size"):
        ext(frame(120, 200), size=(32, 32))


def test_onnx_without_metadata(exported: dict[str, Path], tmp_path: Path) -> None:
    model = onnx.load(str(exported["r18"]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(DensekitError, match="without densekit metadata.*mean, std, stride"):
        FeatureExtractor(bare)
    with pytest.raises(DensekitError, match="stride"):
        FeatureExtractor(bare, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ext = FeatureExtractor(bare, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), stride=8)
    assert ext.meta.dim == 256 and ext.meta.stride == 8
    np.testing.assert_allclose(ext(frame(64, 64)), FeatureExtractor(exported["r18"])(frame(64, 64)), atol=1e-6)
    with pytest.raises(DensekitError, match="contradicts"):
        FeatureExtractor(exported["r18"], stride=16)


def test_bad_onnx_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model")
    with pytest.raises(DensekitError, match="junk.onnx"):
        FeatureExtractor(junk)
    with pytest.raises(DensekitError, match="not found"):
        FeatureExtractor(tmp_path / "missing.onnx")


def test_provider_order() -> None:
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(None, gpu) == gpu and ort_providers("auto", list(reversed(gpu))) == gpu
    assert ort_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert ort_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert ort_providers("cuda:1", gpu)[:2] == [
        ("TensorrtExecutionProvider", {"device_id": 1}),
        ("CUDAExecutionProvider", {"device_id": 1}),
    ]
    with pytest.raises(DensekitError, match="no GPU provider"):
        ort_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(DensekitError):
        ort_providers("tpu", gpu)


def test_onnx_runs_with_torch_blocked(exported: dict[str, Path]) -> None:
    code = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
import numpy as np
import densekit.serve
from densekit.serve.extractor import FeatureExtractor
ext = FeatureExtractor({str(exported["r18"])!r}, backend="onnxruntime")
out = ext(np.full((64, 96, 3), 128, np.uint8))
assert out.shape == (256, 8, 12), out.shape
assert abs(float(np.linalg.norm(out[:, 0, 0])) - 1) < 1e-4
assert sys.modules['torch'] is None
try:
    import torch
except ImportError:
    print('ok', ext.provider)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok CPUExecutionProvider"


def _jf(root: Path, out: Path, backbone: str) -> float:
    argv = [
        "eval",
        "davis",
        str(root),
        "--out",
        str(out),
        "--backbone",
        backbone,
        "--split",
        "train",
        "--sequences",
        "dog-agility",
        "--short-side",
        "240",
    ]
    assert main(argv) == 0
    with open(out / "global_results-train.csv", newline="") as handle:
        return float(next(csv.DictReader(handle))["J&F-Mean"])


@pytest.mark.slow
def test_davis_jf_torch_equals_onnx(davis2016_mini: Path, tmp_path: Path) -> None:
    """`densekit eval davis` on an .onnx file: same J&F as the torch backbone (the CLI's default backbone)."""
    onnx_path = tmp_path / "lite0.onnx"
    export_onnx("efficientnet_lite0", onnx_path, log=lambda _m: None)
    jf_torch = _jf(davis2016_mini, tmp_path / "torch", "efficientnet_lite0")
    jf_onnx = _jf(davis2016_mini, tmp_path / "onnx", str(onnx_path))
    assert 0.3 < jf_torch <= 1.0  # pretrained features track
    assert abs(jf_torch - jf_onnx) <= 0.001  # 0.1 on the 0-100 scale DAVIS tables use


def test_loader_opens_every_kind_of_model(tmp_path) -> None:
    """One loader for names, checkpoints, ONNX files and engines: each gets its backend or one clear line."""
    from densekit.serve.backbones import build_backbone
    from densekit.serve.checkpoint import save_checkpoint
    from densekit.serve.loader import open_backend

    meta, runner = open_backend("pixels")
    assert (runner.name, meta.dim) == ("torch", 192)
    save_checkpoint(build_backbone("pixels"), tmp_path / "p.safetensors")
    assert open_backend(tmp_path / "p.safetensors")[0] == meta
    export_onnx("pixels", tmp_path / "p.onnx")
    onnx_meta, ort_runner = open_backend(tmp_path / "p.onnx", device="cpu", backend="onnxruntime")
    assert (ort_runner.name, onnx_meta.dim, onnx_meta.stride) == ("onnxruntime", 192, 8)
    batch = np.random.default_rng(0).standard_normal((1, 3, 16, 24)).astype(np.float32)
    np.testing.assert_allclose(ort_runner.run(batch), runner.run(batch), atol=1e-6)
    with pytest.raises(DensekitError, match="no metadata sidecar"):
        (tmp_path / "m.engine").write_bytes(b"plan")
        open_backend(tmp_path / "m.engine")
    with pytest.raises(DensekitError, match="backend 'onnxruntime' runs an .onnx file"):
        open_backend("pixels", backend="onnxruntime")
