"""The OpenVINO backend: parity to ONNX Runtime at two sizes, the contract through the IR, the precision that runs,
``densekit export openvino``, ``auto``'s rule, and one line for a missing openvino or an IR without a contract."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from densekit.apps.cli import main
from densekit.export.onnx import EXPORT_KEY, export_onnx
from densekit.export.openvino import export_openvino
from densekit.export.parity import compare, real_images
from densekit.serve import openvino_backend
from densekit.serve.errors import DensekitError
from densekit.serve.extractor import FeatureExtractor
from densekit.serve.loader import backend_for
from densekit.serve.onnx_meta import read_onnx_meta


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openvino") / "r18.onnx"
    export_onnx("resnet18", path, log=_quiet)
    return path


@pytest.fixture(scope="module")
def models(onnx_model: Path) -> dict[str, Path]:
    """resnet18 as ONNX and as an f32 IR written through the CLI (the export command's own test)."""
    pytest.importorskip("openvino", reason="openvino (the optional extra densekit[openvino]) is not installed")
    root = onnx_model.parent
    onnx_path, ir = onnx_model, root / "r18-ir"
    rc = main(["export", "openvino", str(onnx_path), "--out", str(ir), "--precision", "f32", "--threads", "1"])
    assert rc == 0
    return {"onnx": onnx_path, "ir": ir, "root": root}


def test_export_command_writes_an_ir_checked_on_photos(models: dict[str, Path], capsys) -> None:
    assert sorted(p.name for p in models["ir"].iterdir()) == ["model.bin", "model.xml"]
    again = models["root"] / "again"
    assert main(["export", "openvino", str(models["onnx"]), "--out", str(again), "--precision", "f32"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"parity \d+x\d+ batch \d \(openvino:CPU:f32 vs onnxruntime\).*cosine 1\.0000", out)) == 2
    assert "wrote " in out and "dynamic batch/height/width" in out
    assert main(["export", "openvino", str(models["onnx"]), "--out", str(again), "--precision", "f32"]) == 0  # replaced
    report = export_openvino("pixels", models["root"] / "px-ir", precision="f32", log=_quiet)  # a name: vs torch
    assert report.reference == "torch" and len(report.parity) == 2 and report.precision == "f32"


def test_parity_to_onnxruntime_at_two_sizes(models: dict[str, Path]) -> None:
    ort = FeatureExtractor(models["onnx"], backend="onnxruntime", device="cpu", threads=1)
    ir = FeatureExtractor(models["ir"], threads=1)  # a folder: auto means openvino
    direct = FeatureExtractor(models["onnx"], backend="openvino", threads=1)  # the .onnx itself
    assert ir.backend_name == direct.backend_name == "openvino" and ir.device == "cpu"
    assert ir.fixed_hw is None  # dynamic H and W
    photo = real_images()[0]
    for size in ((120, 200), (96, 64)):
        ref = ort.batch([photo], size=size)
        for ext in (ir, direct):
            got = ext.batch([photo], size=size)
            assert got.shape == ref.shape == (1, 256, size[0] // 8, size[1] // 8)
            _, cos, worst = compare(ref, got)
            assert cos >= 0.99999 and worst >= 0.9999, (size, cos, worst)


def test_contract_and_precision_are_carried_through_the_ir(models: dict[str, Path]) -> None:
    import openvino as ov

    ext = FeatureExtractor(models["ir"], threads=1)
    assert ext.meta == read_onnx_meta(models["onnx"])
    written = ov.Core().read_model(str(models["ir"] / "model.xml"))  # at densekit/meta, not only the ONNX frontend's copy
    assert openvino_backend.rt_text(written, openvino_backend.RT_META) == ext.meta.to_json()
    assert ext.backend.export_info["precision"] == "f32"  # recorded by the export, applied when served
    assert ext.provider == "openvino:CPU:f32"
    precision = ext.backend.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert ext.provider == f"openvino:CPU:{precision}"  # what the compiled model says, not what was asked


def test_provider_reports_the_cpus_default_precision(models: dict[str, Path]) -> None:
    ext = FeatureExtractor(models["onnx"], backend="openvino", threads=1)
    bf16 = openvino_backend.cpu_has_bf16()
    assert ext.provider == ("openvino:CPU:bf16" if bf16 else "openvino:CPU:f32")
    if not bf16:
        with pytest.raises(DensekitError, match="precision bf16: OpenVINO cannot run it on this CPU"):
            openvino_backend.OpenVinoBackend(models["onnx"], precision="bf16")


def test_auto_takes_openvino_only_on_a_bf16_cpu_for_float32_graphs(models: dict[str, Path], monkeypatch) -> None:
    assert backend_for(models["onnx"], "auto") == ("openvino" if openvino_backend.cpu_has_bf16() else "onnxruntime")
    monkeypatch.setattr(openvino_backend, "_ort_has_gpu", lambda: False)
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: True)
    assert backend_for(models["onnx"], "auto") == "openvino"
    assert backend_for(models["onnx"], "auto", "cuda") == "onnxruntime"
    assert backend_for(models["onnx"], "onnxruntime") == "onnxruntime"
    int8 = onnx.load(str(models["onnx"]))
    info = next(p for p in int8.metadata_props if p.key == EXPORT_KEY)
    info.value = json.dumps({**json.loads(info.value), "int8": {"scheme": "QDQ"}})
    onnx.save(int8, str(models["root"] / "int8.onnx"))
    assert backend_for(models["root"] / "int8.onnx", "auto") == "onnxruntime"  # calibrated for ORT's kernels
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: False)
    assert backend_for(models["onnx"], "auto") == "onnxruntime"
    assert EXPORT_KEY == openvino_backend.ONNX_EXPORT_KEY  # serve reads the key export writes


def test_missing_openvino_is_one_line(onnx_model: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(DensekitError, match=r"OpenVINO is not installed: pip install 'densekit\[openvino\]'"):
        FeatureExtractor(onnx_model, backend="openvino")
    assert main(["export", "openvino", str(onnx_model), "--out", str(onnx_model.parent / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: OpenVINO is not installed") and len(err.splitlines()) == 1
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", openvino_backend.cpu_has_bf16.__wrapped__)
    assert backend_for(onnx_model, "auto") == "onnxruntime"  # auto without openvino keeps ONNX Runtime


def test_an_ir_without_contract_is_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    import openvino as ov

    foreign = onnx.load(str(models["onnx"]))
    del foreign.metadata_props[:]  # someone else's ONNX: no densekit metadata
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    ov.save_model(ov.Core().read_model(str(tmp_path / "foreign.onnx")), str(tmp_path / "ir" / "model.xml"))
    with pytest.raises(DensekitError, match=r"ir/model\.xml: OpenVINO IR without a densekit contract") as caught:
        FeatureExtractor(tmp_path / "ir")
    assert "\n" not in str(caught.value)
    ext = FeatureExtractor(tmp_path / "ir", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), stride=8)
    assert ext.meta.dim == 256 and ext.meta.stride == 8  # the contract given explicitly instead
    with pytest.raises(DensekitError, match="pass mean, std, stride"):
        FeatureExtractor(tmp_path / "foreign.onnx", backend="openvino")
    (tmp_path / "ir" / "model.bin").unlink()
    with pytest.raises(DensekitError, match=r"weights model\.bin are missing"):
        FeatureExtractor(tmp_path / "ir" / "model.xml")
    with pytest.raises(DensekitError, match="holds other files"):
        export_openvino(models["onnx"], tmp_path, log=_quiet)  # never clobbers a folder that is not an IR
    with pytest.raises(DensekitError, match="runs on the CPU"):
        FeatureExtractor(models["ir"], device="cuda")


def test_app_engine_passes_the_backend(models: dict[str, Path]) -> None:
    from densekit.apps.app.engine import shared_extractor

    shared = shared_extractor(str(models["onnx"]), "cpu", backend="openvino")
    assert shared.provider.startswith("openvino:CPU:")
    assert shared(np.zeros((64, 96, 3), np.uint8)).shape == (256, 8, 12)
