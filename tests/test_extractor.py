"""FeatureExtractor: preprocessing from the model contract, unit-norm output, devices, lazy torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from densekit.serve.backbones import build_backbone
from densekit.serve.checkpoint import save_checkpoint
from densekit.serve.errors import DensekitError
from densekit.serve.extractor import FeatureExtractor, l2_normalise, preprocess, target_size


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def r18() -> FeatureExtractor:
    return FeatureExtractor("resnet18")


def test_import_does_not_import_torch() -> None:
    code = "import sys, densekit.serve.extractor; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("size_in", "size_arg", "hw"),
    [
        ((120, 200), None, (15, 25)),
        ((123, 205), None, (15, 25)),  # rounded down to multiples of 8
        ((120, 200), (64, 96), (8, 12)),
        ((50, 60), (70, 100), (8, 12)),  # enlarged, then rounded down
    ],
)
def test_unit_norm_and_shape(r18: FeatureExtractor, size_in, size_arg, hw) -> None:
    out = r18(frame(*size_in), size=size_arg)
    assert out.dtype == np.float32 and out.shape == (256, *hw)
    np.testing.assert_allclose(np.linalg.norm(out, axis=0), 1.0, atol=1e-5)


def test_vit_and_pixels_shapes() -> None:
    vit = FeatureExtractor("timm:vit_tiny_patch16_224")
    assert vit.meta.input_multiple == 16
    assert vit(frame(120, 200)).shape == (192, 7, 12)
    pix = FeatureExtractor("pixels")
    out = pix.batch(np.stack([frame(64, 96, 1), frame(64, 96, 2)]))
    assert out.shape == (2, 192, 8, 12)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_batch_matches_single_calls(r18: FeatureExtractor) -> None:
    frames = [frame(64, 96, s) for s in range(3)]
    batch = r18.batch(frames)
    assert batch.shape == (3, 256, 8, 12)
    for i, f in enumerate(frames):
        np.testing.assert_allclose(batch[i], r18(f), atol=1e-5)
    with pytest.raises(DensekitError, match="different sizes"):
        r18.batch([frame(64, 96), frame(80, 96)])
    assert r18.batch([frame(64, 96), frame(80, 96)], size=(64, 96)).shape == (2, 256, 8, 12)


def test_preprocess_follows_meta() -> None:
    meta = build_backbone("efficientnet_lite0").meta  # its own mean/std, not ImageNet's
    colour = np.array([200, 100, 30], np.uint8)
    flat = np.broadcast_to(colour, (100, 140, 3)).copy()
    x = preprocess([flat], meta)  # shrinks to 96x136
    assert x.shape == (1, 3, 96, 136) and x.dtype == np.float32
    expected = (colour / 255.0 - np.array(meta.mean)) / np.array(meta.std)
    np.testing.assert_allclose(x[0, :, 50, 70], expected, atol=1e-5)
    np.testing.assert_allclose(x[0].std(axis=(1, 2)), 0.0, atol=1e-5)
    # shrinking averages (INTER_AREA): a 1-pixel checkerboard halved becomes flat grey, not aliased
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    small = preprocess([checker], meta, size=(32, 32))[0]
    np.testing.assert_allclose(small, (0.5 - meta.mean[0]) / meta.std[0], atol=1e-2)


def test_target_size() -> None:
    assert target_size((480, 854), None, 8) == (480, 848)
    assert target_size((480, 854), (241, 431), 16) == (240, 416)
    with pytest.raises(DensekitError):
        target_size((5, 100), None, 8)


def test_bad_frames(r18: FeatureExtractor) -> None:
    for bad in (np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), "x"):
        with pytest.raises(DensekitError, match="uint8"):
            r18(bad)
    with pytest.raises(DensekitError, match="no frames"):
        r18.batch([])


def test_devices() -> None:
    model = build_backbone("pixels")
    if not torch.cuda.is_available():
        with pytest.raises(DensekitError, match="CUDA is not available"):
            FeatureExtractor(model, device="cuda")
    for bad in ("tpu", "not a device"):
        with pytest.raises(DensekitError):
            FeatureExtractor(model, device=bad)
    with pytest.raises(DensekitError):
        FeatureExtractor(42)  # type: ignore[arg-type]


def test_training_model_is_run_in_eval_and_restored() -> None:
    model = build_backbone("resnet18", seed=4)
    expected = FeatureExtractor(model)(frame(64, 64))
    model.train()
    got = FeatureExtractor(model)(frame(64, 64))
    assert model.training  # mode restored
    np.testing.assert_allclose(got, expected, atol=1e-5)  # BN used running stats, not batch stats


def test_checkpoint_path(tmp_path: Path) -> None:
    model = build_backbone("resnet18", seed=7)
    path = tmp_path / "r18.safetensors"
    save_checkpoint(model, path)
    np.testing.assert_allclose(FeatureExtractor(path)(frame(64, 64)), FeatureExtractor(model)(frame(64, 64)), atol=1e-6)


def test_l2_normalise_keeps_zero_vectors() -> None:
    feats = np.zeros((1, 4, 2, 2), np.float32)
    feats[0, :, 0, 0] = [3, 4, 0, 0]
    out = l2_normalise(feats)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.6, 0.8, 0, 0])
    assert np.all(out[0, :, 1, 1] == 0)


def _propagate_j(extractor: FeatureExtractor, root: Path, seq: str, t: int) -> float:
    """J of a first-frame mask propagated to frame t by k-NN on features (k=10, softmax at 0.05)."""

    def read(i: int) -> tuple[np.ndarray, np.ndarray]:
        img = cv2.cvtColor(cv2.imread(str(root / "JPEGImages/480p" / seq / f"{i:05d}.jpg")), cv2.COLOR_BGR2RGB)
        return img, cv2.imread(str(root / "Annotations/480p" / seq / f"{i:05d}.png"), cv2.IMREAD_GRAYSCALE) > 127

    (img0, mask0), (img1, mask1) = read(0), read(t)
    f0, f1 = extractor.batch([img0, img1])
    d, h, w = f0.shape
    labels = cv2.resize(mask0.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA).reshape(-1)
    sim = f1.reshape(d, -1).T @ f0.reshape(d, -1)
    idx = np.argpartition(-sim, 10, axis=1)[:, :10]
    top = np.take_along_axis(sim, idx, axis=1) / 0.05
    weights = np.exp(top - top.max(1, keepdims=True))
    soft = (weights * labels[idx]).sum(1) / weights.sum(1)
    pred = cv2.resize(soft.reshape(h, w), mask1.shape[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
    return float((pred & mask1).sum() / max((pred | mask1).sum(), 1))


@pytest.mark.slow
def test_pretrained_features_track_better_than_pixels(davis2016_mini: Path) -> None:
    seqs = sorted(p.name for p in (davis2016_mini / "JPEGImages/480p").iterdir())
    scores = {}
    for name in ("efficientnet_lite0", "pixels"):
        extractor = FeatureExtractor(name)
        scores[name] = np.mean([_propagate_j(extractor, davis2016_mini, s, 10) for s in seqs])
    assert scores["efficientnet_lite0"] > 0.6
    assert scores["efficientnet_lite0"] > scores["pixels"] + 0.2
