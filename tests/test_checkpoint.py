"""safetensors checkpoints: exact round trips, metadata, and one-line errors for bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import densekit.serve.backbones as backbones
from densekit.serve.backbones import DenseBackbone, build_backbone
from densekit.serve.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError
from densekit.serve.loader import load_backbone


def perturbed(model: DenseBackbone) -> DenseBackbone:
    """Move every weight and BN statistic away from what a fresh build (or shipped .pth) gives."""
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen).abs())
    return model


def outputs(model: DenseBackbone, h: int, w: int) -> torch.Tensor:
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize(
    ("name", "decoder", "size"),
    [
        ("resnet18", False, (64, 96)),
        ("resnet18", True, (64, 96)),
        ("efficientnet_lite0", False, (64, 96)),
        ("timm:vit_tiny_patch16_224", False, (48, 64)),
    ],
)
def test_round_trip_identical_outputs(tmp_path: Path, name: str, decoder: bool, size: tuple[int, int]) -> None:
    model = perturbed(build_backbone(name, seed=3, decoder=decoder))
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, extra_meta={"step": 1200, "note": "test"})
    loaded = load_checkpoint(path)
    assert loaded.meta == model.meta
    assert not loaded.training
    assert torch.equal(outputs(loaded, *size), outputs(model, *size))
    # a fresh build differs, so equality above really comes from the file
    assert not torch.equal(outputs(build_backbone(name, seed=0, decoder=decoder), *size), outputs(model, *size))
    _, metadata = read_checkpoint_metadata(path)
    assert json.loads(metadata["step"]) == 1200 and metadata["note"] == "test"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary files left behind


def test_efficientnet_checkpoint_does_not_read_shipped_weights(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "lite0.safetensors"
    save_checkpoint(build_backbone("efficientnet_lite0"), path)

    def forbidden() -> Path:
        raise AssertionError("load_checkpoint read the shipped .pth")

    monkeypatch.setattr(backbones, "lite0_weights_path", forbidden)
    assert load_checkpoint(path).meta.name == "efficientnet_lite0"


def test_saved_meta_wins_and_load_backbone_takes_paths(tmp_path: Path) -> None:
    model = build_backbone("pixels")
    model.meta = ModelMeta(**{**model.meta.__dict__, "objective": "crw", "mean": (0.5, 0.5, 0.5)})
    path = tmp_path / "sub" / "pix.safetensors"
    save_checkpoint(model, path)
    loaded = load_backbone(path)
    assert loaded.meta.objective == "crw" and loaded.meta.mean == (0.5, 0.5, 0.5)
    assert load_backbone(str(path)).meta == loaded.meta


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(build_backbone("resnet18", seed=1), path)
    save_checkpoint(build_backbone("resnet18", seed=2), path)
    loaded = load_checkpoint(path)
    expected = build_backbone("resnet18", seed=2).state_dict()["body.stem.0.weight"]
    assert torch.equal(loaded.state_dict()["body.stem.0.weight"], expected)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    with pytest.raises(DensekitError, match="reserved"):
        save_checkpoint(build_backbone("pixels"), path, extra_meta={"densekit": "x"})


def _assert_one_line(info: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(info.value) and str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DensekitError, match="not found") as info:
        load_checkpoint(missing)
    _assert_one_line(info)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(DensekitError, match="not a safetensors file") as info:
        load_checkpoint(junk)
    _assert_one_line(info)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(DensekitError, match="without densekit metadata") as info:
        load_checkpoint(plain)
    _assert_one_line(info)


def test_arch_mismatch(tmp_path: Path) -> None:
    model = build_backbone("resnet18")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta_json = model.meta.to_json()

    missing_key = tmp_path / "missing_key.safetensors"
    partial = {k: v for k, v in state.items() if k != "body.layer3.0.conv1.weight"}
    save_file(partial, str(missing_key), metadata={"densekit": meta_json})
    with pytest.raises(DensekitError, match="do not match") as info:
        load_checkpoint(missing_key)
    _assert_one_line(info)

    wrong_arch = tmp_path / "wrong_arch.safetensors"
    meta50 = build_backbone("resnet50").meta.to_json()  # resnet18 weights under resnet50 metadata
    save_file(state, str(wrong_arch), metadata={"densekit": meta50})
    with pytest.raises(DensekitError) as info:
        load_checkpoint(wrong_arch)
    _assert_one_line(info)

    bad_arch = tmp_path / "bad_arch.safetensors"
    raw = json.loads(meta_json)
    raw["arch"] = {"family": "resnet", "depth": 19}
    save_file(state, str(bad_arch), metadata={"densekit": json.dumps(raw)})
    with pytest.raises(DensekitError, match="cannot build") as info:
        load_checkpoint(bad_arch)
    _assert_one_line(info)

    bad_json = tmp_path / "bad_json.safetensors"
    save_file(state, str(bad_json), metadata={"densekit": "{not json"})
    with pytest.raises(DensekitError, match="JSON"):
        load_checkpoint(bad_json)
