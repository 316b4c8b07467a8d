"""densekit export onnx: metadata contract, dynamic axes, verified parity, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from densekit.apps.cli import main
from densekit.export.onnx import FP32_COSINE, convert_to_fp16, export_onnx, parse_hw
from densekit.export.parity import compare
from densekit.serve.backbones import build_backbone
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("onnx") / "r18.onnx"
    logs: list[str] = []
    report = export_onnx("resnet18", out, log=logs.append)
    return out, report, logs


def test_resnet18_export_contract_and_parity(r18) -> None:
    path, report, logs = r18
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelMeta.from_json(props["densekit"]) == build_backbone("resnet18").meta
    assert json.loads(props["densekit_export"])["exporter"] == report.exporter == "torchscript"
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    # two sizes, batch 1 and 2, each within the fp32 tolerance, and printed
    assert {(r.size, r.batch) for r in report.parity} == {((224, 320), 1), ((288, 192), 2)}
    assert all(r.cosine >= FP32_COSINE and r.max_abs < 1e-3 for r in report.parity)
    assert sum("parity" in line and "cosine" in line for line in logs) == 2
    assert report.trt_issues == []  # a plain CNN is TensorRT-parsable


def test_compare_detects_a_difference() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1, 8, 4, 4)).astype(np.float32)
    assert compare(a, a)[1] == pytest.approx(1.0)
    b = a.copy()
    b[0, :, 0, 0] *= -1  # one location flipped
    max_abs, cos, loc = compare(a, b)
    assert cos < FP32_COSINE and loc == pytest.approx(-1.0) and max_abs > 0


def test_half_conversion_keeps_float32_io(r18) -> None:
    half = convert_to_fp16(onnx.load(str(r18[0])))
    onnx.checker.check_model(half, full_check=True)  # also proves the node order is topological
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weights = {n.input[1] for n in half.graph.node if n.op_type == "Conv"}
    types = {i.data_type for i in half.graph.initializer if i.name in conv_weights}
    assert types == {onnx.TensorProto.FLOAT16}


def test_cli_pixels_static_simplify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "px.onnx"
    assert main(["export", "onnx", "pixels", "--out", str(out), "--static", "64,96", "--simplify"]) == 0
    text = capsys.readouterr().out
    assert "simplified by onnxslim" in text and "static 64x96" in text and "cosine" in text
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 96]


def test_bad_inputs_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "x.onnx"
    cases = [
        ["export", "onnx", str(fake), "--out", str(out)],
        ["export", "onnx", "pixels", "--out", str(tmp_path / "x.txt")],
        ["export", "onnx", "pixels", "--out", str(out), "--opset", "5"],
        ["export", "onnx", "pixels", "--out", str(out), "--static", "60,90"],  # not multiples of 8
        ["export", "onnx", "no_such_backbone", "--out", str(out)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".x.onnx*"))  # nothing half-written left


def test_failed_verification_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import densekit.export.onnx as mod

    out = tmp_path / "px.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(mod, "FP32_COSINE", 1.5)  # an impossible tolerance: verification must fail
    with pytest.raises(DensekitError, match="differs from PyTorch"):
        export_onnx("pixels", out, log=lambda _m: None)
    assert out.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_parse_hw() -> None:
    assert parse_hw("480,848", 16) == (480, 848) and parse_hw("64x96") == (64, 96) and parse_hw(None) is None
    for bad in ("480", "a,b", "0,8", "-8,8"):
        with pytest.raises(DensekitError):
            parse_hw(bad)


@pytest.mark.slow
def test_vit_dynamic_and_static(tmp_path: Path) -> None:
    dyn = export_onnx("timm:vit_tiny_patch16_224", tmp_path / "vit.onnx", log=lambda _m: None)
    assert dyn.exporter == "dynamo" and all(r.cosine >= FP32_COSINE for r in dyn.parity)
    # timm's antialiased bicubic position-embedding resampling: TensorRT's parser cannot take it
    assert any("Resize" in issue and "antialias" in issue for issue in dyn.trt_issues)
    fixed = export_onnx("timm:vit_tiny_patch16_224", tmp_path / "vit_s.onnx", static=(64, 96), log=lambda _m: None)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "vit_s.onnx")).graph.node}
    assert "Resize" not in ops and "LayerNormalization" in ops and fixed.trt_issues == []
    assert all(r.cosine >= FP32_COSINE for r in fixed.parity)


def test_checkpoint_export_carries_its_weights_and_meta(tmp_path: Path) -> None:
    from densekit.serve.checkpoint import save_checkpoint
    from densekit.serve.extractor import FeatureExtractor

    model = build_backbone("resnet18", seed=3)
    ckpt = tmp_path / "r18.safetensors"
    save_checkpoint(model, ckpt)
    out = tmp_path / "r18.onnx"
    assert main(["export", "onnx", str(ckpt), "--out", str(out)]) == 0
    img = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    got, want = FeatureExtractor(out)(img), FeatureExtractor(model)(img)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(FeatureExtractor("resnet18")(img) - got).max() > 0.1  # seed 3's weights, not seed 0's


def test_int8_export_for_the_cpu(tmp_path: Path, r18) -> None:
    from PIL import Image
    from skimage import data

    from densekit.serve.extractor import FeatureExtractor

    calib = tmp_path / "calib"
    calib.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).save(calib / f"{name}.png")
    out = tmp_path / "r18-int8.onnx"
    logs: list[str] = []
    report = export_onnx("resnet18", out, int8_calib=calib, log=logs.append)
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelMeta.from_json(props["densekit"]) == build_backbone("resnet18").meta
    info = json.loads(props["densekit_export"])["int8"]
    assert info["calibration_images"] == 3 and info["calibration_size"] == [360, 640]
    # The report's parity rows are the int8 graph's (printed with an "int8" label), within tolerance.
    assert report.int8 and len(report.parity) == 2 and all(0.98 <= r.cosine < 0.99999 for r in report.parity)
    assert sum(line.startswith("int8 parity") for line in logs) == 2
    # Served like any ONNX file: same contract, features close to the float32 graph's.
    photo = data.chelsea()
    f32, i8 = FeatureExtractor(r18[0])(photo), FeatureExtractor(out)(photo)
    assert f32.shape == i8.shape
    assert float((f32 * i8).sum(0).mean()) > 0.97  # both L2-normalised per location


def test_int8_export_keeps_shape_arithmetic_exact(tmp_path: Path) -> None:
    # EfficientNet-Lite0 computes its TF "SAME" padding from the input shape; quantized, that arithmetic
    # lost a row and a column (45x80 -> 44x79 at 360x640).
    from PIL import Image
    from skimage import data

    from densekit.serve.extractor import OnnxRuntimeBackend

    calib = tmp_path / "calib"
    calib.mkdir()
    Image.fromarray(data.coffee()).save(calib / "coffee.png")
    export_onnx("efficientnet_lite0", tmp_path / "l0.onnx", int8_calib=calib, verify=False, log=lambda _m: None)
    model = onnx.load(str(tmp_path / "l0.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    runner = OnnxRuntimeBackend(tmp_path / "l0.onnx")
    for h, w in ((360, 640), (224, 320), (288, 192)):
        assert runner.run(np.zeros((1, 3, h, w), np.float32)).shape == (1, 80, h // 8, w // 8)


def test_int8_bad_inputs_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ["export", "onnx", "pixels", "--out", str(out), "--int8"],  # no --calib
        ["export", "onnx", "pixels", "--out", str(out), "--calib", str(empty)],  # --calib without --int8
        ["export", "onnx", "pixels", "--out", str(out), "--int8", "--calib", str(empty)],  # no images
        ["export", "onnx", "pixels", "--out", str(out), "--int8", "--calib", str(tmp_path / "nope")],
        ["export", "onnx", "resnet18", "--out", str(out), "--int8", "--half", "--calib", str(empty)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
    assert not out.exists()
