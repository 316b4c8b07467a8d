"""Training data: sources, pair sampling with a gap range, determinism from (seed, index), bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densekit.serve.errors import DensekitError
from densekit.train.data import (
    ImageDataset,
    PairDataset,
    StepBatchSampler,
    build_dataset,
    cover_resize_crop,
    make_loader,
    scan_source,
)


def _frames(folder: Path, n: int, h: int = 40, w: int = 56, seed: int = 0) -> list[np.ndarray]:
    """Write n PNG frames whose pixel (0,0) red value encodes the frame index (exact in PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        f[:, :, 0] = i * 10  # constant red plane: survives resizing exactly
        Image.fromarray(f).save(folder / f"{i:05d}.png")
        out.append(f)
    return out


def _index_of(frame: np.ndarray) -> int:
    return int(round(float(frame[..., 0].mean()) / 10))


@pytest.fixture()
def frame_folders(tmp_path: Path) -> Path:
    root = tmp_path / "vids"
    _frames(root / "a", 12)
    _frames(root / "b", 6, seed=1)
    return root


def test_pairs_respect_gap_range_and_stay_in_one_video(frame_folders: Path) -> None:
    ds = build_dataset(frame_folders, "pairs", None, seed=3, size=(24, 24), gap_min=2, gap_max=4)
    assert isinstance(ds, PairDataset)
    assert len(ds) == (12 - 2) + (6 - 2)  # anchors t with t + gap_min < len
    gaps = set()
    for g in range(3 * len(ds)):
        frames = ds[g]["frames"]
        assert frames.shape == (2, 24, 24, 3) and frames.dtype == np.uint8
        t0, t1 = _index_of(frames[0]), _index_of(frames[1])
        gaps.add(t1 - t0)
        assert 2 <= t1 - t0 <= 4
    assert gaps == {2, 3, 4}


def test_each_epoch_visits_every_anchor_once_in_a_seeded_order(frame_folders: Path) -> None:
    ds = build_dataset(frame_folders, "pairs", None, seed=0, size=(24, 24), gap_min=1, gap_max=1)
    n = len(ds)
    epoch0 = [ds.locate(g)[1] for g in range(n)]
    epoch1 = [ds.locate(g)[1] for g in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # reshuffled per epoch
    other = build_dataset(frame_folders, "pairs", None, seed=1, size=(24, 24), gap_min=1, gap_max=1)
    assert [other.locate(g)[1] for g in range(n)] != epoch0


def test_sample_is_a_function_of_seed_and_index_only(frame_folders: Path) -> None:
    def make(seed: int) -> PairDataset:
        return build_dataset(frame_folders, "pairs", None, seed=seed, size=(24, 24), gap_min=1, gap_max=5)  # type: ignore[return-value]

    a, b = make(0), make(0)
    for g in (0, 7, 31, 5, 0):  # any order, repeated: same sample
        assert np.array_equal(a[g]["frames"], b[g]["frames"])
    assert not np.array_equal(a[0]["frames"], make(1)[0]["frames"])


def test_transform_gets_a_per_sample_generator(frame_folders: Path) -> None:
    seen = []

    def transform(frames: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        seen.append(len(frames))
        return {"x": np.asarray([rng.random()], np.float32)}

    ds = build_dataset(frame_folders, "pairs", transform, seed=0, size=(24, 24))
    assert ds[5]["x"][0] == ds[5]["x"][0]
    assert ds[5]["x"][0] != ds[6]["x"][0]
    assert seen and set(seen) == {2}


def test_workers_and_ranks_do_not_change_the_samples(frame_folders: Path) -> None:
    """2 workers == 0 workers, and the union of 2 ranks' local batches == the single-process batch."""
    import torch

    ds = build_dataset(frame_folders, "pairs", None, seed=0, size=(24, 24), gap_min=1, gap_max=3)
    single = list(make_loader(ds, StepBatchSampler(0, 3, 4), num_workers=0))
    workers = list(make_loader(ds, StepBatchSampler(0, 3, 4), num_workers=2))
    ranks = [list(make_loader(ds, StepBatchSampler(0, 3, 4, rank=r, world=2))) for r in range(2)]
    resumed = list(make_loader(ds, StepBatchSampler(1, 3, 4), num_workers=0))
    for s in range(3):
        assert torch.equal(single[s]["frames"], workers[s]["frames"])
        assert torch.equal(single[s]["frames"], torch.cat([ranks[0][s]["frames"], ranks[1][s]["frames"]]))
    assert torch.equal(single[1]["frames"], resumed[0]["frames"])  # data position = step count
    with pytest.raises(DensekitError, match="divisible"):
        StepBatchSampler(0, 3, 5, rank=0, world=2)


def test_same_crop_for_both_frames_and_aspect_kept() -> None:
    rng = np.random.default_rng(0)
    f = rng.integers(0, 255, (60, 120, 3), dtype=np.uint8)
    for seed in range(5):
        a, b = cover_resize_crop([f, f.copy()], (30, 30), np.random.default_rng(seed))
        assert a.shape == (30, 30, 3) and np.array_equal(a, b)
    # Shorter side 60 -> 30: the crop is a window of the half-size frame, no aspect distortion.
    import cv2

    half = cv2.resize(f, (60, 30), interpolation=cv2.INTER_AREA)
    (c,) = cover_resize_crop([f], (30, 30), None)
    assert np.array_equal(c, half[:, 15:45])


def test_davis_root_source_with_split(tmp_path: Path) -> None:
    from densekit.serve.sample import make_sample

    root = make_sample(tmp_path / "s", sequences=3, frames=5, height=64, width=80, seed=0)
    all_videos = scan_source(root)
    train = scan_source(root, split="train")
    assert len(all_videos) == 3 and 1 <= len(train) < 3
    assert all(v.length == 5 for v in all_videos)
    ds = build_dataset(root, "images", None, seed=0, size=(32, 32), split="train")
    assert isinstance(ds, ImageDataset) and len(ds) == 5 * len(train)
    assert ds[0]["frames"].shape == (1, 32, 32, 3)
    with pytest.raises(DensekitError, match="split"):
        scan_source(root, split="nope")


def test_video_files_and_image_folders(tmp_path: Path) -> None:
    import cv2

    vids = tmp_path / "videos"
    vids.mkdir()
    _frames(tmp_path / "src", 8, h=48, w=64)
    frames = [np.full((48, 64, 3), i * 10, np.uint8) for i in range(8)]  # flat: survives MJPG
    writer = cv2.VideoWriter(str(vids / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write MJPG .avi here")
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    (videos,) = scan_source(vids)
    assert videos.file is not None and videos.length == 8
    ds = build_dataset(vids, "pairs", None, seed=0, size=(48, 64), gap_min=3, gap_max=3, crop="center")
    for g in range(10):
        a, b = ds[g]["frames"]
        assert _index_of(b) - _index_of(a) == 3
    # a folder of plain images: "images" uses each one; "pairs" treats the folder as one video
    imgs = build_dataset(tmp_path / "src", "images", None, seed=0, size=(16, 16))
    assert len(imgs) == 8
    one = build_dataset(tmp_path / "src", "pairs", None, seed=0, size=(16, 16), gap_min=1, gap_max=2)
    assert len(one) == 7


def test_bad_inputs_are_one_line(tmp_path: Path, frame_folders: Path) -> None:
    def err(fn) -> str:  # noqa: ANN001
        with pytest.raises(DensekitError) as e:
            fn()
        assert "\n" not in str(e.value)
        return str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no training data" in err(lambda: scan_source(empty))
    assert "not found" in err(lambda: scan_source(tmp_path / "missing"))
    bad = tmp_path / "bad"
    _frames(bad / "v", 3)
    (bad / "v" / "00001.png").write_text("not an image")
    assert "unreadable image" in err(lambda: scan_source(bad))
    assert "too short" in err(lambda: build_dataset(frame_folders, "pairs", None, seed=0, size=(8, 8), gap_min=6, gap_max=8))
    # skip_short drops the 6-frame video and keeps the 12-frame one
    ds = build_dataset(frame_folders, "pairs", None, seed=0, size=(8, 8), gap_min=6, gap_max=8, skip_short=True)
    assert len(ds) == 12 - 6
    assert "gap_min" in err(lambda: build_dataset(frame_folders, "pairs", None, seed=0, size=(8, 8), gap_min=3, gap_max=2))
    assert "every video is shorter" in err(
        lambda: build_dataset(frame_folders, "pairs", None, seed=0, size=(8, 8), gap_min=20, gap_max=20, skip_short=True))
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert "not a video" in err(lambda: scan_source(text))
    fake = tmp_path / "fakevid"
    fake.mkdir()
    (fake / "clip.mp4").write_text("not a video")
    assert err(lambda: scan_source(fake))
