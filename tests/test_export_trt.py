"""densekit export trt: version branching, operator check, profile, sidecar, clear errors; GPU build when present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from densekit.apps.cli import main
from densekit.export.onnx import set_metadata
from densekit.export.trt import insert_qdq, parse_shape, parse_version, plan_build, resolve_profile
from densekit.export.trt_ops import check_tensorrt_compat, require_tensorrt_compat, support_table
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.onnx_meta import EngineInfo, check_engine_version, read_engine_sidecar, sidecar_path

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
META = ModelMeta(name="toy", stride=1, dim=4, input_multiple=8)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def toy_model(op: str = "Relu", opset: int = 18, domain: str = "", **attrs) -> onnx.ModelProto:
    """x (B,3,H,W) -> Conv(3->4, 1x1) -> <op> -> y, with densekit metadata."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], np.linspace(-1, 1, 12).tolist())
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(op, ["c"], ["y"], name="the_op", domain=domain, **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, "h", "w"])],
        [w],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    set_metadata(model, META, {"exporter": "test"})
    return model


def test_data_file_has_its_version() -> None:
    table = support_table()
    assert table["tensorrt_version"] and "onnx-tensorrt" in table["source"]
    assert table["opset_min"] <= 18 <= table["opset_max"]
    ops = table["operators"]
    assert ops["Conv"]["supported"] and ops["LayerNormalization"]["supported"] and not ops["Unique"]["supported"]


def test_compat_accepts_plain_and_names_bad_ops() -> None:
    assert check_tensorrt_compat(toy_model("Relu")).ok
    for model, needle in [
        (toy_model("Unique"), "Unique"),  # listed as unsupported
        (toy_model("MyPlugin", domain="com.example"), "com.example::MyPlugin"),  # needs a plugin
        (toy_model("Relu", opset=8), "opset 8"),  # below the parser's range
        (toy_model("Gelu", opset=18), "not an ONNX operator at opset 18"),  # Gelu arrives in opset 20
    ]:
        report = check_tensorrt_compat(model)
        assert not report.ok and needle in "; ".join(i.describe() for i in report.issues), needle
    with pytest.raises(DensekitError, match="Unique"):
        require_tensorrt_compat(toy_model("Unique"), "toy.onnx")


def test_compat_resize_attribute_rules() -> None:
    def resize(**attrs) -> onnx.ModelProto:
        m = toy_model("Relu")
        m.graph.node[1].CopyFrom(helper.make_node("Resize", ["c", "", "scales"], ["y"], name="rs", **attrs))
        m.graph.initializer.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]))
        return m

    assert check_tensorrt_compat(resize(mode="linear")).ok
    bad = check_tensorrt_compat(resize(mode="cubic", antialias=1))
    text = "; ".join(i.describe() for i in bad.issues)
    assert "mode='cubic'" in text and "antialias=1" in text


def test_export_trt_refuses_unsupported_op_before_needing_tensorrt(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(toy_model("Unique"), str(path))
    assert main(["export", "trt", str(path), "--out", str(tmp_path / "bad.engine")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Unique" in err and "\n" not in err
    assert not (tmp_path / "bad.engine").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-TensorRT message cannot be shown")
def test_without_tensorrt_one_clear_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ok.onnx"
    onnx.save(toy_model("Relu"), str(path))
    for argv in (
        ["export", "trt", str(path), "--out", str(tmp_path / "ok.engine")],
        ["export", "trt", "pixels", "--out", str(tmp_path / "px.engine")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: TensorRT is not installed") and "pip install" in err and "\n" not in err
    assert not list(tmp_path.glob("*.engine")) and not (tmp_path / "px.onnx").exists()


def test_plan_build_branches_on_major_version() -> None:
    assert parse_version("10.16.1.11") == (10, 16, 1, 11) and parse_version("11.4.0.106")[0] == 11
    vit10 = plan_build("10.16.1.11", fp16=True, int8=False, transformer=True)
    assert not vit10.strongly_typed and vit10.onnx_transform is None
    assert vit10.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert vit10.fp32_layer_types == ("NORMALIZATION", "SOFTMAX")
    cnn10_int8 = plan_build("10.3.0", fp16=False, int8=True, transformer=False)
    assert cnn10_int8.calibrator and "INT8" in cnn10_int8.builder_flags and not cnn10_int8.fp32_layer_types
    vit11 = plan_build("11.4.0.106", fp16=True, int8=False, transformer=True)
    assert vit11.strongly_typed and vit11.builder_flags == () and vit11.onnx_transform == "fp16"
    assert plan_build("11.0.0", fp16=False, int8=True, transformer=False).onnx_transform == "qdq"
    assert plan_build("10.0.1", fp16=False, int8=False, transformer=True).builder_flags == ()
    with pytest.raises(DensekitError, match="too old"):
        plan_build("8.6.1", fp16=True, int8=False, transformer=False)


def test_profile_defaults_and_checks() -> None:
    meta16 = ModelMeta(name="v", stride=16, dim=8, input_multiple=16)
    prof = resolve_profile(meta16, (None, None), None, None, None)
    assert prof["opt"] == [1, 3, 480, 848] and prof["min"] == [1, 3, 64, 64] and prof["max"][0] == 4
    assert resolve_profile(meta16, (224, 320), None, None, None)["max"] == [4, 3, 224, 320]
    assert parse_shape("2x3x480x848", "opt-shape") == (2, 3, 480, 848)
    with pytest.raises(DensekitError, match="multiples of 16"):
        resolve_profile(meta16, (None, None), None, (1, 3, 480, 850), None)
    with pytest.raises(DensekitError, match="min <= opt <= max"):
        resolve_profile(meta16, (None, None), (8, 3, 64, 64), None, None)
    with pytest.raises(DensekitError, match="static"):
        resolve_profile(meta16, (224, 320), None, (1, 3, 480, 848), None)
    for bad in ("1x3x480", "1x4x480x848", "axbxcxd"):
        with pytest.raises(DensekitError):
            parse_shape(bad, "min-shape")


def test_cli_argument_errors(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ok.onnx"
    onnx.save(toy_model("Relu"), str(path))
    for extra in (
        ["--int8"],
        ["--int8", "--fp16", "--calib", str(tmp_path)],
        ["--int8", "--calib", str(tmp_path)],
        ["--workspace", "-1"],
        ["--opt-shape", "1x3x5"],
    ):
        assert main(["export", "trt", str(path), "--out", str(tmp_path / "m.engine"), *extra]) == 2, extra
        assert capsys.readouterr().err.startswith("error:")


def test_sidecar_roundtrip_and_version_check(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan bytes")
    info = EngineInfo(
        meta=META,
        tensorrt_version="10.16.1.11",
        precision="fp16",
        input_name="images",
        output_name="features",
        profile={"min": [1, 3, 64, 64], "opt": [1, 3, 480, 848], "max": [4, 3, 1088, 1920]},
        device={"name": "GPU", "compute_capability": "8.9"},
        extra={"onnx": "m.onnx"},
    )
    with pytest.raises(DensekitError, match="no metadata sidecar"):
        read_engine_sidecar(engine)
    sidecar_path(engine).write_text(info.to_json())
    assert sidecar_path(engine).name == "m.engine.json"
    assert read_engine_sidecar(engine) == info
    check_engine_version(engine, "10.16.1.11", "10.16.1.11")
    with pytest.raises(DensekitError, match=r"built with TensorRT 10\.3\.0 but this is TensorRT 10\.16\.1\.11"):
        check_engine_version(engine, "10.3.0", "10.16.1.11")
    sidecar_path(engine).write_text('{"format": "something else"}')
    with pytest.raises(DensekitError, match="not a densekit engine sidecar"):
        read_engine_sidecar(engine)


def test_engine_file_through_the_cli_is_one_line(tmp_path: Path, capsys) -> None:
    """An engine for another TensorRT (or no TensorRT here): `densekit track` answers one line, exit 2."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan bytes")
    info = EngineInfo(
        meta=META,
        tensorrt_version="0.0.0-other",
        precision="fp32",
        input_name="x",
        output_name="y",
        profile={"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]},
    )
    sidecar_path(engine).write_text(info.to_json())
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "00000.png"), np.zeros((16, 16, 3), np.uint8))
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), np.zeros((16, 16), np.uint8))
    assert (
        main(["track", str(frames), "--mask", str(mask), "--out", str(tmp_path / "o"), "--backbone", str(engine)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert ("TensorRT is not installed" in err) if not HAS_TRT else ("0.0.0-other" in err)


def test_qdq_insertion_for_tensorrt11_int8(tmp_path: Path) -> None:
    """TensorRT 11's INT8 path runs on the CPU: Q/DQ with zero points 0, still TensorRT-parsable."""
    src, dst = tmp_path / "toy.onnx", tmp_path / "toy_qdq.onnx"
    onnx.save(toy_model("Relu"), str(src))
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(1, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    insert_qdq(src, dst, batches)
    model = onnx.load(str(dst))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(np.all(z == 0) for z in zero_points)
    assert check_tensorrt_compat(model).ok
    import onnxruntime as ort

    x = batches[0]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.linalg.norm(ref - got) < 0.1 * np.linalg.norm(ref)  # int8: a few % off, not garbage


@pytest.mark.skipif(not (HAS_TRT and _cuda()), reason="needs TensorRT and a CUDA GPU (runs on a GPU machine only)")
@pytest.mark.parametrize("fp16", [False, True])
def test_gpu_build_and_run(tmp_path: Path, fp16: bool) -> None:
    from densekit.export.onnx import export_onnx
    from densekit.export.trt import build_engine
    from densekit.serve.extractor import FeatureExtractor

    onnx_path = tmp_path / "r18.onnx"
    export_onnx("resnet18", onnx_path, log=lambda _m: None)
    report = build_engine(
        onnx_path,
        tmp_path / "r18.engine",
        fp16=fp16,
        min_shape="1x3x64x64",
        opt_shape="1x3x224x320",
        max_shape="2x3x288x384",
        workspace_gb=1,
        log=lambda _m: None,
    )
    assert report.parity and all(row[3] >= (0.999 if fp16 else 0.9999) for row in report.parity)
    ext = FeatureExtractor(tmp_path / "r18.engine")
    assert ext.backend_name == "tensorrt" and ext(np.zeros((224, 320, 3), np.uint8)).shape == (256, 28, 40)
