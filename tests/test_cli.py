"""The densekit CLI end to end on data the tests make, and its bad-input contract (one line, exit 2)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from densekit.apps.cli import main


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "davis"
    rc = main(["data", "sample", str(root), "--sequences", "3", "--frames", "8", "--height", "96", "--width", "160"])
    assert rc == 0
    return root


def _read_global(path: Path) -> dict[str, float]:
    with open(path) as fh:
        row = next(csv.DictReader(fh))
    return {k: float(v) for k, v in row.items()}


def test_eval_davis_on_sample_writes_masks_csvs_and_chart(sample_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc = main(["eval", "davis", str(sample_root), "--backbone", "pixels", "--out", str(out), "--split", "val",
               "--preset", "crw"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "J&F" in printed
    val = (sample_root / "ImageSets" / "2017" / "val.txt").read_text().split()
    for seq in val:
        frames = sorted((sample_root / "JPEGImages" / "480p" / seq).glob("*.jpg"))
        masks = sorted((out / seq).glob("*.png"))
        assert [p.stem for p in masks] == [p.stem for p in frames]
    glob_row = _read_global(out / "global_results-val.csv")
    assert set(glob_row) >= {"J&F-Mean", "J-Mean", "F-Mean", "J-Recall", "F-Recall", "J-Decay", "F-Decay"}
    assert 0.0 <= glob_row["J-Mean"] <= 1.0
    assert abs(glob_row["J&F-Mean"] - (glob_row["J-Mean"] + glob_row["F-Mean"]) / 2) < 1e-3
    assert (out / "per-sequence_results-val.csv").is_file()
    assert (out / "per-sequence_results-val.png").stat().st_size > 1000


def test_track_writes_one_mask_per_frame_and_an_overlay(sample_root: Path, tmp_path: Path) -> None:
    from densekit.serve.imageio import open_video, read_mask

    seq = sorted((sample_root / "JPEGImages" / "480p").iterdir())[0]
    first = sample_root / "Annotations" / "480p" / seq.name / "00000.png"
    out = tmp_path / "masks"
    overlay = tmp_path / "overlay.mp4"
    rc = main(["track", str(seq), "--mask", str(first), "--backbone", "pixels", "--out", str(out),
               "--preset", "crw", "--overlay", str(overlay)])
    assert rc == 0
    masks = sorted(out.glob("*.png"))
    assert len(masks) == len(list(seq.glob("*.jpg")))
    assert np.array_equal(read_mask(masks[0]), read_mask(first))
    assert len(open_video(overlay)) == len(masks)


def _write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


@pytest.fixture()
def frames_dir(tmp_path: Path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        _write_png(d / f"{i:05d}.png", rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    return d


def _run_bad(args: list[str], capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_video_is_one_line(tmp_path: Path, capsys) -> None:
    mask = _write_png(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    _run_bad(["track", str(tmp_path / "nope.mp4"), "--mask", str(mask), "--out", str(tmp_path / "o"),
              "--backbone", "pixels"], capsys)


def test_text_file_named_mp4_is_one_line(tmp_path: Path, capsys) -> None:
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video")
    mask = _write_png(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    _run_bad(["track", str(fake), "--mask", str(mask), "--out", str(tmp_path / "o"), "--backbone", "pixels"], capsys)


def test_mask_of_wrong_size_is_one_line(frames_dir: Path, tmp_path: Path, capsys) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[4:10, 4:10] = 1
    path = _write_png(tmp_path / "m.png", mask)
    _run_bad(["track", str(frames_dir), "--mask", str(path), "--out", str(tmp_path / "o"), "--backbone", "pixels"],
             capsys)


def test_mask_without_object_is_one_line(frames_dir: Path, tmp_path: Path, capsys) -> None:
    path = _write_png(tmp_path / "m.png", np.zeros((64, 96), np.uint8))
    _run_bad(["track", str(frames_dir), "--mask", str(path), "--out", str(tmp_path / "o"), "--backbone", "pixels"],
             capsys)


def test_unknown_backbone_and_preset_are_one_line(frames_dir: Path, tmp_path: Path, capsys) -> None:
    mask = np.zeros((64, 96), np.uint8)
    mask[10:30, 10:30] = 1
    path = _write_png(tmp_path / "m.png", mask)
    base = ["track", str(frames_dir), "--mask", str(path), "--out", str(tmp_path / "o")]
    _run_bad(base + ["--backbone", "no_such_net"], capsys)
    _run_bad(base + ["--backbone", "pixels", "--preset", "nope"], capsys)
    _run_bad(base + ["--backbone", str(tmp_path / "missing.safetensors")], capsys)


def test_unknown_split_is_one_line(sample_root: Path, tmp_path: Path, capsys) -> None:
    err = _run_bad(["eval", "davis", str(sample_root), "--out", str(tmp_path / "e"), "--split", "nosuch",
                    "--backbone", "pixels"], capsys)
    assert "nosuch" in err


def test_non_consecutive_object_ids_survive_tracking(frames_dir: Path, tmp_path: Path) -> None:
    from densekit.serve.imageio import read_mask

    mask = np.zeros((64, 96), np.uint8)
    mask[5:25, 5:25] = 3
    mask[30:60, 50:90] = 7
    path = tmp_path / "m.png"
    from densekit.serve.imageio import write_mask

    write_mask(path, mask)
    out = tmp_path / "o"
    assert main(["track", str(frames_dir), "--mask", str(path), "--out", str(out), "--backbone", "pixels"]) == 0
    ids = set(np.unique(np.concatenate([read_mask(p).ravel() for p in sorted(out.glob("*.png"))])))
    assert ids <= {0, 3, 7} and {3, 7} <= ids
