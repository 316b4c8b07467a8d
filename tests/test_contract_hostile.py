"""Hostile model metadata (issue 15): wherever the contract is read - safetensors metadata, ONNX ``metadata_props``,
a TensorRT engine's ``.json`` sidecar - anything but a well-formed contract is one ``error:`` line and exit 2,
never a traceback, a ``RecursionError`` or a value that only fails later.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from densekit.apps.cli import main
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.meta_schema import json_depth, loads_bounded
from densekit.serve.onnx_meta import EngineInfo, read_engine_sidecar, sidecar_path

GOOD = {"name": "pixels", "stride": 8, "dim": 192, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "input_multiple": 8, "objective": "none", "version": "0.1.0", "arch": {"family": "pixels", "stride": 8,
                                                                               "decoder": False}}
DEEP = "[" * 100_000 + "]" * 100_000

# (id, contract JSON text, words the error line holds)
HOSTILE = [
    ("mean-strings", json.dumps({**GOOD, "mean": ["x", 1, 2]}), "mean"),
    ("mean-two-values", json.dumps({**GOOD, "mean": [0.5, 0.5]}), "mean"),
    ("std-zero", json.dumps({**GOOD, "std": [0.0, 1.0, 1.0]}), "std"),
    ("std-nan", json.dumps({**GOOD, "std": [float("nan"), 1.0, 1.0]}), "NaN"),
    ("stride-null", json.dumps({**GOOD, "stride": None}), "stride"),
    ("stride-true", json.dumps({**GOOD, "stride": True}), "stride"),
    ("stride-zero", json.dumps({**GOOD, "stride": 0}), "stride"),
    ("stride-huge", json.dumps({**GOOD, "stride": 10**30}), "stride"),
    ("stride-fraction", json.dumps({**GOOD, "stride": 8.5}), "stride"),
    ("dim-string", json.dumps({**GOOD, "dim": "192"}), "dim"),
    ("input-multiple-negative", json.dumps({**GOOD, "input_multiple": -8}), "input_multiple"),
    ("name-number", json.dumps({**GOOD, "name": 5}), "name"),
    ("name-newline", json.dumps({**GOOD, "name": "a\nb"}), "name"),
    ("arch-list", json.dumps({**GOOD, "arch": [1, 2]}), "arch"),
    ("arch-family-list", json.dumps({**GOOD, "arch": {"family": ["pixels"]}}), "arch.family"),
    ("arch-deep", json.dumps({**GOOD, "arch": {"family": "pixels", "k": json.loads("[" * 11 + "]" * 11)}}), "nested"),
    ("not-an-object", "[1, 2, 3]", "JSON object"),
    ("missing-stride", json.dumps({"name": "pixels", "dim": 3}), "stride"),
    ("deep-array", DEEP, "nested"),
    ("deep-object", '{"a":' * 100_000 + "1" + "}" * 100_000, "nested"),
    ("deep-inside-the-contract", json.dumps(GOOD)[:-1] + ', "extra": ' + DEEP + "}", "nested"),
    ("not-json", "{name: pixels}", "not valid JSON"),
]
IDS = [c[0] for c in HOSTILE]


@pytest.mark.parametrize(("text", "words"), [c[1:] for c in HOSTILE], ids=IDS)
def test_hostile_contract_is_one_line(text: str, words: str) -> None:
    with pytest.raises(DensekitError) as err:
        ModelMeta.from_json(text)
    assert "\n" not in str(err.value) and words in str(err.value), str(err.value)


def test_the_good_contract_still_reads_and_brackets_in_strings_are_not_depth() -> None:
    meta = ModelMeta.from_json(json.dumps(GOOD))
    assert meta.stride == 8 and meta.mean == tuple(GOOD["mean"]) and meta.arch == GOOD["arch"]
    assert ModelMeta.from_json(json.dumps({**GOOD, "stride": 8.0})).stride == 8  # an integral float is an int
    named = ModelMeta.from_json(json.dumps({**GOOD, "name": "[[[[[[[[[[[[[[[[[[[[{{{{{{{{{{{{\\\"[[["}))
    assert named.name.startswith("[[[")
    assert json_depth(DEEP, 50) == 51  # stops counting past the limit
    with pytest.raises(DensekitError, match="nested more than 5"):
        loads_bounded("[[[[[[]]]]]]", "x", max_depth=5)


def _checkpoint(path: Path, text: str) -> Path:
    save_file({}, str(path), metadata={"densekit": text})  # pixels has no weights: the contract is all there is
    return path


def _one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert rc == 2, f"densekit {' '.join(argv)}: exit {rc}\n{text}"
    assert "Traceback" not in text and "RecursionError" not in text and "unexpected" not in text, text
    (line,) = [x for x in text.splitlines() if x.startswith("error: ")]
    return line


@pytest.fixture()
def clip(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of 2 frames and a first-frame mask for ``densekit track``."""
    from PIL import Image

    from densekit.serve.imageio import write_mask

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(frames / f"{i:05d}.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12] = 1
    write_mask(tmp_path / "mask.png", mask)
    return frames, tmp_path / "mask.png"


CLI_CASES = ["mean-strings", "stride-null", "deep-array", "arch-family-list"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_hostile_checkpoint_through_every_command_is_one_line(case: str, tmp_path: Path, clip: tuple[Path, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "hostile.safetensors", dict((c[0], c[1]) for c in HOSTILE)[case])
    frames, mask = clip
    commands = {
        "info": ["info", str(ckpt)],
        "export onnx": ["export", "onnx", str(ckpt), "--out", str(tmp_path / "m.onnx")],
        "serve": ["serve", "--model", str(ckpt), "--port", "0"],
        "track": ["track", str(frames), "--mask", str(mask), "--out", str(tmp_path / "masks"), "--backbone", str(ckpt)],
        "train": ["train", "--objective", "densecl", "--backbone", str(ckpt), "--data", str(frames.parent),
                  "--out", str(tmp_path / "run"), "max_steps=1", "batch_size=2", "tensorboard=false",
                  "progress=false", "data.num_workers=0"],
    }
    for name, argv in commands.items():
        line = _one_error_line(argv, capsys)
        assert str(ckpt) in line and "broken densekit metadata" in line, (name, line)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run" / "state.safetensors").exists()


def test_hostile_onnx_metadata_props_is_one_line(tmp_path: Path, clip: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    good = tmp_path / "pixels.onnx"
    assert main(["export", "onnx", "pixels", "--out", str(good), "--no-verify"]) == 0
    capsys.readouterr()
    frames, mask = clip
    for case in ("stride-null", "deep-array", "mean-strings"):
        proto = onnx.load(str(good))
        for prop in proto.metadata_props:
            if prop.key == "densekit":
                prop.value = dict((c[0], c[1]) for c in HOSTILE)[case]
        bad = tmp_path / f"{case}.onnx"
        onnx.save(proto, str(bad))
        for argv in (["track", str(frames), "--mask", str(mask), "--out", str(tmp_path / "o"), "--backbone", str(bad)],
                     ["serve", "--model", str(bad), "--port", "0"],
                     ["export", "triton", str(bad), "--repo", str(tmp_path / "repo")]):
            line = _one_error_line(argv, capsys)
            assert str(bad) in line and "broken densekit metadata" in line, line


def _engine_info() -> EngineInfo:
    return EngineInfo(meta=ModelMeta.from_dict(GOOD), tensorrt_version="10.16.1.11", precision="fp16",
                      input_name="images", output_name="features",
                      profile={"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [2, 3, 64, 64]})


@pytest.mark.parametrize("patch", [
    {"densekit": {**GOOD, "stride": None}},
    {"densekit": {**GOOD, "mean": ["x", 1, 2]}},
    {"precision": "fp64"},
    {"precision": 16},
    {"profile": {"min": [1, 3, 64], "opt": [1, 3, 64, 64], "max": [1, 3, 64, 64]}},
    {"profile": {"min": [1, 3, 64, None], "opt": [1, 3, 64, 64], "max": [1, 3, 64, 64]}},
    {"profile": "big"},
    {"device": [1]},
    {"input_name": None},
    {"extra": float("inf")},
], ids=["stride-null", "mean-strings", "precision-fp64", "precision-number", "profile-short", "profile-null",
        "profile-string", "device-list", "input-name-null", "extra-infinity"])
def test_hostile_engine_sidecar_is_one_line(patch: dict, tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    raw = json.loads(_engine_info().to_json())
    raw.update(patch)
    sidecar_path(engine).write_text(json.dumps(raw))
    with pytest.raises(DensekitError) as err:
        read_engine_sidecar(engine)
    assert "\n" not in str(err.value) and str(sidecar_path(engine)) in str(err.value), str(err.value)


def test_deep_engine_sidecar_is_one_line_through_the_cli(tmp_path: Path, clip: tuple[Path, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    text = _engine_info().to_json()
    sidecar_path(engine).write_text(text)
    assert read_engine_sidecar(engine) == _engine_info()  # the good one reads back
    sidecar_path(engine).write_text(text.rstrip()[:-1] + ', "x": ' + DEEP + "}")
    with pytest.raises(DensekitError, match="nested more than"):
        read_engine_sidecar(engine)
    frames, mask = clip
    line = _one_error_line(["track", str(frames), "--mask", str(mask), "--out", str(tmp_path / "o"),
                            "--backbone", str(engine)], capsys)
    assert "nested more than" in line and str(sidecar_path(engine)) in line
