"""densekit export triton: repository layout, config.pbtxt read back by two parsers, engine limits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from densekit.apps.cli import main
from densekit.export.onnx import export_onnx
from densekit.export.triton import parse_config, parse_pbtxt, render_config, write_triton_repo
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.onnx_meta import EngineInfo, sidecar_path

HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is not None


@pytest.fixture(scope="module")
def pixels_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tri") / "pixels.onnx"
    export_onnx("pixels", path, log=lambda _m: None)
    return path


def test_onnx_repository(pixels_onnx: Path, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    assert main(["export", "triton", str(pixels_onnx), "--repo", str(repo), "--max-batch", "4"]) == 0
    assert "parsed back" in capsys.readouterr().out
    assert (repo / "pixels" / "1" / "model.onnx").read_bytes() == pixels_onnx.read_bytes()
    config, _ = parse_config((repo / "pixels" / "config.pbtxt").read_text())
    assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [3, -1, -1]  # no batch dim, dynamic H/W
    assert config["output"][0]["dims"] == [192, -1, -1]
    assert "dynamic_batching" in config
    meta = ModelMeta.from_json(config["parameters"]["densekit"]["string_value"])
    assert meta.name == "pixels" and meta.stride == 8


def test_both_parsers_agree(pixels_onnx: Path, tmp_path: Path) -> None:
    entry = write_triton_repo(pixels_onnx, tmp_path / "r", name="px")
    text = entry.config_path.read_text()
    small = parse_pbtxt(text)
    assert small["max_batch_size"] == [8] and small["input"][0]["dims"] == [3, -1, -1]
    assert small["platform"] == ["onnxruntime_onnx"] and small["dynamic_batching"][0][
        "max_queue_delay_microseconds"
    ] == [100]
    if HAS_TRITONCLIENT:
        assert entry.parsed_with == "tritonclient model_config_pb2"
        from densekit.export.triton import _normalise

        ours = _normalise(small)
        for key in ("name", "platform", "max_batch_size", "input", "output"):
            assert ours[key] == entry.config[key], key
        assert ours["parameters"]["densekit"]["string_value"] == entry.config["parameters"]["densekit"]["string_value"]


def test_small_parser_handles_syntax_and_rejects_garbage() -> None:
    text = (
        '# comment\nname: "a\\"b"\nmax_batch_size: 2\n'
        'input: [ { name: "x" dims: [1, -1] }, { name: "y", dims: 3 } ]\nopt { k: 1.5 }\n'
    )
    parsed = parse_pbtxt(text)
    assert parsed["name"] == ['a"b'] and parsed["opt"][0]["k"] == [1.5]
    assert [i["dims"] for i in parsed["input"]] == [[1, -1], [3]]
    for bad in ("name: {", "input [ 1, 2", "123: 4"):
        with pytest.raises(DensekitError):
            parse_pbtxt(bad)


@pytest.mark.skipif(not HAS_TRITONCLIENT, reason="tritonclient not installed")
def test_tritonclient_rejects_a_wrong_field() -> None:
    with pytest.raises(DensekitError, match="does not parse"):
        parse_config('name: "x"\nplatform: "onnxruntime_onnx"\nmax_batch: 3\n')


def test_engine_repository_uses_profile(tmp_path: Path, capsys) -> None:
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"plan")
    meta = ModelMeta(name="resnet18", stride=8, dim=256)
    info = EngineInfo(
        meta=meta,
        tensorrt_version="10.16.1.11",
        precision="fp16",
        input_name="images",
        output_name="features",
        profile={"min": [1, 3, 224, 320], "opt": [2, 3, 224, 320], "max": [4, 3, 224, 320]},
    )
    sidecar_path(engine).write_text(info.to_json())
    entry = write_triton_repo(engine, tmp_path / "repo")
    assert entry.model_file.name == "model.plan" and entry.config["platform"] == "tensorrt_plan"
    assert entry.config["max_batch_size"] == 4  # min(8, profile max)
    assert entry.config["input"][0]["dims"] == [3, 224, 320] and entry.config["output"][0]["dims"] == [256, 28, 40]
    assert main(["export", "triton", str(engine), "--repo", str(tmp_path / "r2"), "--max-batch", "16"]) == 2
    assert "exceeds the engine profile's max batch 4" in capsys.readouterr().err


def test_bad_inputs(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    for argv in (
        ["export", "triton", str(bad), "--repo", str(tmp_path / "r")],
        ["export", "triton", str(tmp_path / "missing.onnx"), "--repo", str(tmp_path / "r")],
        ["export", "triton", str(tmp_path / "x.pt"), "--repo", str(tmp_path / "r")],
    ):
        (tmp_path / "x.pt").write_bytes(b"")
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    text = render_config(
        "modèle",
        "onnxruntime_onnx",
        1,
        {"input_name": "images", "output_name": "features", "input_dims": [3, -1, -1], "output_dims": [8, -1, -1]},
        ModelMeta(name="m", stride=8, dim=8),
    )
    assert "\\303\\250" in text and parse_pbtxt(text)["name"] == ["modèle"]  # UTF-8 as octal escapes, read back
    assert parse_config(text)[0]["name"] == "modèle"
