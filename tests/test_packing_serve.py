"""NaViT-style packing in serve/ and export/: packed extractor = each frame alone, the packed ONNX graph against
torch and against each image alone (ONNX Runtime), the TensorRT op check, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import densekit.serve.packing as packing
from densekit.apps.cli import main
from densekit.export.packed import INPUTS, OUTPUT, check_grid, export_packed_onnx, packed_export_info
from densekit.export.trt_ops import check_tensorrt_compat
from densekit.serve.backbones import build_backbone
from densekit.serve.errors import DensekitError
from densekit.serve.extractor import FeatureExtractor

VIT = "timm:vit_tiny_patch16_224"
#: (H, W) of the test frames: landscape, portrait, a 1:5 strip, square, one larger than the native 224 grid
SIZES = [(160, 224), (224, 160), (64, 320), (128, 128), (256, 288)]
REGISTERS = {"reg_tokens": 2, "no_embed_class": True}


def _vit(**kwargs):
    return build_backbone(VIT, seed=0, kwargs={"depth": 2, **kwargs}).eval()


def _frames(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.mark.parametrize("kwargs", [{}, REGISTERS], ids=["cls", "cls+registers"])
def test_extractor_packs_mixed_sizes_in_one_forward_equal_to_each_alone(kwargs: dict,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = FeatureExtractor(_vit(**kwargs))
    frames = _frames()
    alone = [ex(f) for f in frames]
    calls = []
    real = packing.packed_tokens
    monkeypatch.setattr(packing, "packed_tokens", lambda *a: calls.append(a[1].shape) or real(*a))
    got = ex.batch(frames, pack=True)
    assert len(calls) == 1 and calls[0][0] >= 2  # one forward of several sequences (L = the largest frame's)
    assert [g.shape for g in got] == [(192, h // 16, w // 16) for h, w in SIZES]
    worst = max(float(np.abs(g - a).max()) for g, a in zip(got, alone))
    assert worst < 1e-4, worst
    assert all(np.allclose(np.linalg.norm(g, axis=0), 1.0, atol=1e-5) for g in got)
    # one sequence holding every frame gives the same features; size= still applies to every frame
    one = ex.batch(frames, pack=True, seq_len=1000)
    assert calls[1][0] == 1 and max(float(np.abs(g - a).max()) for g, a in zip(one, alone)) < 1e-4
    same = ex.batch(frames[:2], pack=True, size=(96, 128))
    assert np.abs(np.stack(same) - ex.batch(frames[:2], size=(96, 128))).max() < 1e-4


def test_without_the_segment_mask_packed_frames_would_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity above can fail: with one segment for the whole sequence, the frames see each other."""
    ex = FeatureExtractor(_vit())
    frames = _frames()[:3]

    def one_segment(seg: torch.Tensor) -> torch.Tensor:
        flat = torch.where(seg >= 0, 0, -1)
        return (flat[:, :, None] == flat[:, None, :]).unsqueeze(1)

    monkeypatch.setattr(packing, "segment_attention_mask", one_segment)
    got = ex.batch(frames, pack=True, seq_len=1000)  # all in one sequence
    assert max(float(np.abs(g - ex(f)).max()) for g, f in zip(got, frames)) > 1e-3


def test_mixed_sizes_refusals_are_one_line() -> None:
    frames = _frames()[:2]
    vit = FeatureExtractor(_vit())
    with pytest.raises(DensekitError, match=r"different sizes .*pass pack=True") as err:
        vit.batch(frames)
    cnn = FeatureExtractor("resnet18")
    for call in (lambda: cnn.batch(frames, pack=True), lambda: cnn.batch(frames)):
        with pytest.raises(DensekitError, match="timm ViT backbone and resnet18 is not one") as err:
            call()
        assert "\n" not in str(err.value) and "CNNs" in str(err.value)
    with pytest.raises(DensekitError, match="cannot pack these frames"):
        cnn.batch(frames, pack=True)
    with pytest.raises(DensekitError, match="more than the packed sequence length 100"):
        vit.batch(frames, pack=True, seq_len=100)  # 140 + 1 tokens do not fit


def test_layout_round_trip_without_torch_inputs() -> None:
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((3, h * 8, w * 8)).astype(np.float32) for h, w in [(2, 3), (1, 1), (4, 2)]]
    batch = packing.pack_images(images, 8, prefix=2, seq_len=12)
    assert batch["patches"].shape == (2, 12, 192) and tuple(batch["grid"][2]) == (4, 2)
    assert int(batch["is_prefix"].sum()) == 6 and int((batch["seg"] < 0).sum()) == 2 * 12 - 6 - 15
    # unpacking the first channel of the patches gives each image's top-left pixels back
    maps = packing.unpack_grids(batch["patches"], batch)
    for im, m in zip(images, maps):
        assert np.array_equal(m[0], im[0, ::8, ::8])


@pytest.fixture(scope="module")
def packed_onnx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    torch.set_num_threads(1)
    kwargs = getattr(request, "param", {})
    bb = _vit(**kwargs)
    out = tmp_path_factory.mktemp("packed") / "vit.onnx"
    logs: list[str] = []
    report = export_packed_onnx(bb, out, max_side=24, log=logs.append)
    return bb, out, report, logs


@pytest.mark.parametrize("packed_onnx", [{}, REGISTERS], indirect=True, ids=["cls", "cls+registers"])
def test_packed_onnx_runs_in_onnxruntime_equal_to_each_image_alone(packed_onnx) -> None:
    import onnxruntime as ort

    bb, path, report, logs = packed_onnx
    assert report.cosine >= 0.99999 and report.max_abs < 1e-4 and any("packed parity" in line for line in logs)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == list(INPUTS)  # no mask input: it is built from seg inside
    assert packed_export_info(path)["packed"] is True
    # another packing than the verification's: 3 sequences, a 1x1 image, a grid above the native 14x14
    rng = np.random.default_rng(2)
    grids = [(3, 5), (1, 1), (16, 20), (9, 4)]
    images = [rng.standard_normal((3, h * 16, w * 16)).astype(np.float32) for h, w in grids]
    prefix = int(bb.body.model.num_prefix_tokens)
    batch = packing.pack_images(images, 16, prefix, seq_len=16 * 20 + prefix)
    assert batch["seg"].shape[0] >= 2
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = sess.run([OUTPUT], {k: batch[k] for k in INPUTS})[0]
    got = packing.unpack_grids(tokens, batch)
    with torch.no_grad():
        alone = [bb(torch.from_numpy(im)[None])[0].numpy() for im in images]
    worst = max(float(np.abs(g - a).max()) for g, a in zip(got, alone))
    assert worst < 1e-4, worst


def test_packed_graph_passes_the_tensorrt_op_check(packed_onnx) -> None:
    _, path, report, _ = packed_onnx
    compat = check_tensorrt_compat(path)
    assert compat.ok, compat.issues
    assert "Resize" not in compat.ops and {"Equal", "Gather", "MatMul"} <= set(compat.ops)
    assert set(report.tensorrt_ops) == set(compat.ops)
    # the check can fail: a contrib op in the same graph is refused
    model = onnx.load(str(path))
    model.graph.node.append(onnx.helper.make_node("FusedGemm", ["x"], ["y"], domain="com.microsoft"))
    assert not check_tensorrt_compat(model).ok


def test_packed_export_refuses_cnns_and_large_grids_in_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.onnx"
    with pytest.raises(DensekitError, match="packing needs a timm ViT backbone.*'resnet18' is not one") as err:
        export_packed_onnx("resnet18", out)
    assert "\n" not in str(err.value)
    for argv in (["export", "onnx", "resnet18", "--out", str(out), "--packed"],
                 ["export", "onnx", VIT, "--out", str(out), "--packed", "--static", "224,224"]):
        assert main(argv) == 2, argv
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("error:") and "\n" not in msg, msg
    assert not out.exists()
    with pytest.raises(DensekitError, match="exceeds this export's max side 24"):
        check_grid(np.array([[3, 4], [30, 2]]), 24)
