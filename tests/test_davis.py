from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densekit.serve.davis import DavisRoot
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import write_mask

H, W = 24, 32


def _frame(path: Path, value: int = 100, size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path, quality=95)


def make_2016(root: Path, seqs: dict[str, int]) -> Path:
    """DAVIS-2016 layout: grayscale 0/255 masks, ImageSets/480p/train.txt of path pairs."""
    lines = []
    for seq, n in seqs.items():
        for i in range(n):
            _frame(root / "JPEGImages" / "480p" / seq / f"{i:05d}.jpg", 10 * i)
            m = np.zeros((H, W), np.uint8)
            m[2 + i : 10 + i, 3:12] = 255
            p = root / "Annotations" / "480p" / seq / f"{i:05d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m, "L").save(p)
            lines.append(f"/JPEGImages/480p/{seq}/{i:05d}.jpg /Annotations/480p/{seq}/{i:05d}.png")
    (root / "ImageSets" / "480p").mkdir(parents=True)
    (root / "ImageSets" / "480p" / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def make_2017(root: Path, seqs: dict[str, int], splits: dict[str, list[str]] | None, only_first: bool = False) -> Path:
    """DAVIS-2017 layout: palette masks with object ids, ImageSets/2017/<split>.txt of names."""
    for seq, n in seqs.items():
        for i in range(n):
            _frame(root / "JPEGImages" / "480p" / seq / f"{i:05d}.jpg", 10 * i)
            if only_first and i > 0:
                continue
            m = np.zeros((H, W), np.uint8)
            m[2:10, 3 + i : 12 + i] = 1
            m[12:20, 10:20] = 2
            m[0, 0] = 255  # void
            write_mask(root / "Annotations" / "480p" / seq / f"{i:05d}.png", m)
    if splits is not None:
        (root / "ImageSets" / "2017").mkdir(parents=True)
        for name, names in splits.items():
            (root / "ImageSets" / "2017" / f"{name}.txt").write_text("\n".join(names) + "\n")
    return root


def test_davis2016_layout(tmp_path):
    root = make_2016(tmp_path / "d16", {"bear": 3, "car": 4})
    d = DavisRoot(root)
    assert d.year == 2016
    assert d.sequences() == ["bear", "car"]
    assert d.sequences("train") == ["bear", "car"]
    assert d.splits() == ["train"]
    assert d.frame_names("car") == ["00000", "00001", "00002", "00003"]
    assert [p.name for p in d.annotation_paths("bear")] == ["00000.png", "00001.png", "00002.png"]
    gt = d.read_gt("car")
    assert gt.shape == (4, H, W) and gt.dtype == np.uint8
    assert set(np.unique(gt).tolist()) == {0, 1}
    assert gt[2, 4:12, 3:12].all() and gt[2].sum() == 8 * 9
    assert np.array_equal(d.first_mask("car"), gt[0])


def test_davis2017_layout_and_splits(tmp_path):
    root = make_2017(tmp_path / "d17", {"a": 3, "b": 2, "c": 2}, {"train": ["b", "a"], "val": ["c"]})
    d = DavisRoot(root)
    assert d.year == 2017
    assert d.sequences("train") == ["b", "a"]  # file order kept
    assert d.sequences("val") == ["c"]
    assert d.sequences() == ["a", "b", "c"]
    assert d.splits() == ["train", "val"]
    gt = d.read_gt("a")
    assert gt.shape == (3, H, W)
    assert set(np.unique(gt).tolist()) == {0, 1, 2, 255}  # void kept
    assert gt[1, 2:10, 4:13].min() == 1 and gt[1, 2:10, 3].max() == 0


def test_year_from_palette_masks_without_split_files(tmp_path):
    root = make_2017(tmp_path / "d", {"x": 2, "y": 1}, splits=None)
    d = DavisRoot(root)
    assert d.year == 2017
    assert d.sequences(None) == ["x", "y"]
    with pytest.raises(DensekitError, match="available: none"):
        d.sequences("train")


def test_unknown_split_lists_available(tmp_path):
    root = make_2017(tmp_path / "d", {"a": 1}, {"train": ["a"], "val": ["a"]})
    with pytest.raises(DensekitError, match="available: train, val"):
        DavisRoot(root).sequences("test-dev")


def test_split_listing_missing_sequence(tmp_path):
    root = make_2017(tmp_path / "d", {"a": 1}, {"train": ["a", "ghost"]})
    with pytest.raises(DensekitError, match="ghost"):
        DavisRoot(root).sequences("train")


def test_test_style_set_only_first_annotation(tmp_path):
    root = make_2017(tmp_path / "d", {"a": 4}, {"test-dev": ["a"]}, only_first=True)
    d = DavisRoot(root)
    assert [p.stem for p in d.annotation_paths("a")] == ["00000"]
    first = d.first_mask("a")
    assert first.shape == (H, W) and set(np.unique(first).tolist()) == {0, 1, 2, 255}
    with pytest.raises(DensekitError, match="3 of 4 frames have no annotation"):
        d.read_gt("a")


def test_not_a_davis_root(tmp_path):
    with pytest.raises(DensekitError, match="not found"):
        DavisRoot(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DensekitError, match="not a DAVIS root"):
        DavisRoot(tmp_path / "plain")


def test_bad_sequences(tmp_path):
    root = make_2017(tmp_path / "d", {"a": 2}, None)
    d = DavisRoot(root)
    with pytest.raises(DensekitError, match="not found"):
        d.frame_paths("zzz")
    (root / "JPEGImages" / "480p" / "empty").mkdir()
    with pytest.raises(DensekitError, match="no frames"):
        d.frame_names("empty")
    # An annotation of another size than the frames.
    write_mask(root / "Annotations" / "480p" / "a" / "00001.png", np.zeros((H + 2, W), np.uint8))
    with pytest.raises(DensekitError, match="frames are"):
        d.read_gt("a")
    # An annotation without a frame.
    write_mask(root / "Annotations" / "480p" / "a" / "00009.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DensekitError, match="no matching frame"):
        d.annotation_paths("a")


def test_first_mask_missing_and_wrong_size(tmp_path):
    root = make_2017(tmp_path / "d", {"a": 2, "b": 1}, None)
    (root / "Annotations" / "480p" / "a" / "00000.png").unlink()
    d = DavisRoot(root)
    with pytest.raises(DensekitError, match="first frame"):
        d.first_mask("a")
    write_mask(root / "Annotations" / "480p" / "b" / "00000.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(DensekitError, match="frame is"):
        d.first_mask("b")


def test_real_davis2016_mini(davis2016_mini):
    d = DavisRoot(davis2016_mini)
    assert d.year == 2016
    assert d.sequences("train") == ["dog-agility", "rollerblade", "motorbike"]
    assert set(d.sequences()) == {"dog-agility", "rollerblade", "motorbike"}
    assert len(d.frame_paths("dog-agility")) == 25
    assert len(d.annotation_paths("dog-agility")) == 25
    gt = d.read_gt("dog-agility")
    assert gt.shape == (25, 480, 854) and gt.dtype == np.uint8
    assert set(np.unique(gt).tolist()) == {0, 1}
    assert np.array_equal(d.first_mask("dog-agility"), gt[0])
    with pytest.raises(DensekitError, match="available: train"):
        d.sequences("val")
