from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from densekit.serve.errors import DensekitError
from densekit.serve.imageio import (
    DAVIS_PALETTE,
    natural_key,
    open_video,
    overlay,
    read_image,
    read_mask,
    write_mask,
    write_overlay_video,
)

RNG = np.random.default_rng(0)


def _ids(h: int = 30, w: int = 40) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[5:15, 5:20] = 1
    m[10:25, 15:35] = 2
    m[0:3, 0:3] = 255
    m[20:30, 0:5] = 7
    return m


def _write_cv2_video(path: Path, n: int, size=(48, 64), fps: float = 10.0, fourcc: str = "mp4v") -> list[np.ndarray]:
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened()
    frames = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.uint8)
        f[:, :, 0] = 40 + 10 * i  # red ramps over time
        f[h // 4 : h // 2, (2 * i) % w : (2 * i) % w + 8, 1] = 200
        frames.append(f)
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return frames


# --- palette ------------------------------------------------------------------------------------------


def test_palette_is_the_voc_colormap():
    assert DAVIS_PALETTE.shape == (256, 3) and DAVIS_PALETTE.dtype == np.uint8
    # Values from the VOC devkit documentation: background, aeroplane, bicycle, bird, boat, person, void.
    assert DAVIS_PALETTE[0].tolist() == [0, 0, 0]
    assert DAVIS_PALETTE[1].tolist() == [128, 0, 0]
    assert DAVIS_PALETTE[2].tolist() == [0, 128, 0]
    assert DAVIS_PALETTE[3].tolist() == [128, 128, 0]
    assert DAVIS_PALETTE[4].tolist() == [0, 0, 128]
    assert DAVIS_PALETTE[15].tolist() == [192, 128, 128]
    assert DAVIS_PALETTE[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in DAVIS_PALETTE.tolist()}) == 256


# --- masks --------------------------------------------------------------------------------------------


def test_write_mask_is_indexed_png_with_ids(tmp_path):
    m = _ids()
    p = tmp_path / "sub" / "00000.png"
    write_mask(p, m)
    with Image.open(p) as im:
        assert im.mode == "P"
        # How davis2017-evaluation reads annotations: the indices are the ids.
        assert np.array_equal(np.array(im), m)
        pal = np.array(im.getpalette()[: 256 * 3], np.uint8).reshape(-1, 3)
    assert np.array_equal(pal, DAVIS_PALETTE)
    assert np.array_equal(read_mask(p), m)
    assert [q.name for q in p.parent.iterdir()] == ["00000.png"]  # no temp files left


def test_write_mask_rejects_bad_arrays(tmp_path):
    with pytest.raises(DensekitError):
        write_mask(tmp_path / "a.png", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DensekitError):
        write_mask(tmp_path / "b.png", np.full((2, 3), 300, np.int32))
    with pytest.raises(DensekitError):
        write_mask(tmp_path / "c.png", np.zeros((2, 3), np.float32))
    assert not list(tmp_path.iterdir())


def test_read_mask_binary_gray_and_la_become_0_1(tmp_path):
    g = np.zeros((20, 30), np.uint8)
    g[3:9, 4:20] = 255
    Image.fromarray(g, "L").save(tmp_path / "l.png")
    la = np.stack([g, np.full_like(g, 255)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    expected = (g == 255).astype(np.uint8)
    assert np.array_equal(read_mask(tmp_path / "l.png"), expected)
    assert np.array_equal(read_mask(tmp_path / "la.png"), expected)
    with Image.open(tmp_path / "la.png") as im:
        assert im.mode == "LA"


def test_read_mask_gray_ids_kept(tmp_path):
    g = np.zeros((10, 10), np.uint8)
    g[:5] = 3
    g[5:, :2] = 255
    Image.fromarray(g, "L").save(tmp_path / "ids.png")
    assert np.array_equal(read_mask(tmp_path / "ids.png"), g)


def test_read_mask_16bit(tmp_path):
    g = np.zeros((8, 9), np.uint16)
    g[2:5, 2:7] = 65535
    cv2.imwrite(str(tmp_path / "m16.png"), g)
    with Image.open(tmp_path / "m16.png") as im:
        assert im.mode.startswith("I")
    assert np.array_equal(read_mask(tmp_path / "m16.png"), (g > 0).astype(np.uint8))
    ids = np.zeros((8, 9), np.uint16)
    ids[:4] = 2
    ids[4:, :3] = 5
    cv2.imwrite(str(tmp_path / "ids16.png"), ids)
    assert np.array_equal(read_mask(tmp_path / "ids16.png"), ids.astype(np.uint8))


def test_read_mask_colour_png_maps_to_palette_index(tmp_path):
    m = _ids()
    rgb = DAVIS_PALETTE[m]
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), m)
    rgba = np.concatenate([rgb, np.full(m.shape + (1,), 255, np.uint8)], axis=2)
    rgba[0:3, 0:3, 3] = 0  # transparent pixels are background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    exp = m.copy()
    exp[0:3, 0:3] = 0
    assert np.array_equal(read_mask(tmp_path / "rgba.png"), exp)


def test_read_mask_unknown_colour_is_named(tmp_path):
    rgb = DAVIS_PALETTE[_ids()].copy()
    rgb[1, 1] = (10, 200, 30)
    Image.fromarray(rgb, "RGB").save(tmp_path / "bad.png")
    with pytest.raises(DensekitError, match=r"\(10, 200, 30\)") as ei:
        read_mask(tmp_path / "bad.png")
    assert "\n" not in str(ei.value)


def test_read_mask_missing_and_corrupt(tmp_path):
    with pytest.raises(DensekitError, match="not found"):
        read_mask(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_text("this is not a png\n")
    with pytest.raises(DensekitError) as ei:
        read_mask(tmp_path / "junk.png")
    assert "\n" not in str(ei.value)
    # A truncated PNG (header fine, data cut off) fails at decode time.
    write_mask(tmp_path / "ok.png", RNG.integers(0, 5, (64, 64)).astype(np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DensekitError):
        read_mask(tmp_path / "cut.png")


# --- images -------------------------------------------------------------------------------------------


def test_read_image_modes(tmp_path):
    rgb = RNG.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)

    gray = RNG.integers(0, 256, (12, 16)).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[:, :, c], gray) for c in range(3))

    rgba = np.concatenate([rgb, np.zeros((12, 16, 1), np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, colour kept

    g16 = (gray.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out16 = read_image(tmp_path / "g16.png")
    assert out16.shape == (12, 16, 3) and out16.dtype == np.uint8
    assert np.array_equal(out16[:, :, 0], gray)

    pal = Image.fromarray(_ids(), "L")
    pal.putpalette(DAVIS_PALETTE.tobytes())
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_image(tmp_path / "pal.png"), DAVIS_PALETTE[_ids()])


def test_read_image_errors(tmp_path):
    with pytest.raises(DensekitError, match="not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(DensekitError):
        read_image(tmp_path / "text.jpg")
    with pytest.raises(DensekitError):
        read_image(tmp_path)  # a folder


# --- video: folders -----------------------------------------------------------------------------------


def test_open_video_folder_natural_order_and_mixed_modes(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    shades = {}
    for i in (1, 2, 10, 11):
        shades[i] = 20 * i
    Image.fromarray(np.full((8, 10, 3), shades[1], np.uint8)).save(d / "f1.png")
    Image.fromarray(np.full((8, 10), shades[2], np.uint8), "L").save(d / "f2.png")  # grayscale
    rgba = np.full((8, 10, 4), shades[10], np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(d / "f10.png")  # RGBA
    Image.fromarray(np.full((8, 10, 3), shades[11], np.uint8)).save(d / "f11.bmp")
    (d / "notes.txt").write_text("ignored")
    v = open_video(d, fps=12)
    assert v.names == ["f1", "f2", "f10", "f11"]
    assert len(v) == 4 and v.size == (8, 10) and v.fps == 12
    frames = list(v)
    assert [int(f[0, 0, 0]) for f in frames] == [shades[i] for i in (1, 2, 10, 11)]
    assert all(f.shape == (8, 10, 3) and f.dtype == np.uint8 for f in frames)
    assert len(list(v)) == 4  # iterable twice
    assert sorted(["a10", "a9", "a100"], key=natural_key) == ["a9", "a10", "a100"]


def test_open_video_folder_errors(tmp_path):
    with pytest.raises(DensekitError, match="not found"):
        open_video(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames")
    with pytest.raises(DensekitError, match="no frames"):
        open_video(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(mixed / "00000.png")
    Image.fromarray(np.zeros((9, 10, 3), np.uint8)).save(mixed / "00001.png")
    v = open_video(mixed)
    with pytest.raises(DensekitError, match="one size"):
        list(v)
    dup = tmp_path / "dup"
    dup.mkdir()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(dup / "00000.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(dup / "00000.jpg")
    with pytest.raises(DensekitError, match="two frames"):
        open_video(dup)


# --- video: files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,fourcc", [(".mp4", "mp4v"), (".avi", "MJPG"), (".mkv", "mp4v")])
def test_open_video_file_counts_and_streams(tmp_path, suffix, fourcc):
    p = tmp_path / f"clip{suffix}"
    src = _write_cv2_video(p, 13, size=(48, 64), fps=10.0, fourcc=fourcc)
    v = open_video(p)
    assert len(v) == 13
    assert v.names[0] == "00000" and v.names[-1] == "00012"
    assert v.size == (48, 64)
    assert v.fps == pytest.approx(10.0, rel=0.01)
    frames = list(v)
    assert len(frames) == 13
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    # Lossy codecs: compare the mean red level, which ramps over time (and checks RGB order).
    reds = [float(f[:, :, 0].mean()) for f in frames]
    assert all(abs(r - float(s[:, :, 0].mean())) < 8 for r, s in zip(reds, src))
    assert float(frames[0][:, :, 2].mean()) < 15  # blue stays near 0: not BGR
    assert len(open_video(p, exact_count=True)) == 13


def test_open_video_file_errors(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("I am a text file pretending to be a video\n" * 20)
    with pytest.raises(DensekitError) as ei:
        open_video(fake)
    assert "\n" not in str(ei.value)

    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(DensekitError):
        open_video(tmp_path / "zero.mp4")

    (tmp_path / "noise.avi").write_bytes(RNG.integers(0, 256, 50_000).astype(np.uint8).tobytes())
    with pytest.raises(DensekitError):
        open_video(tmp_path / "noise.avi")

    (tmp_path / "doc.txt").write_text("x")
    with pytest.raises(DensekitError, match="neither"):
        open_video(tmp_path / "doc.txt")


def test_open_video_zero_frame_video(tmp_path):
    p = tmp_path / "empty.mp4"
    writer = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    writer.release()  # a container with no frames (or no file at all, depending on the backend)
    if not p.exists():
        p.write_bytes(b"")
    with pytest.raises(DensekitError):
        open_video(p)


def test_open_video_truncated_file_never_leaks_raw_errors(tmp_path):
    p = tmp_path / "clip.avi"
    _write_cv2_video(p, 20, fourcc="MJPG")
    data = p.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    try:
        v = open_video(cut)
        frames = list(v)
    except DensekitError:
        return
    assert len(frames) == len(v) and 0 < len(v) <= 20


# --- overlay ------------------------------------------------------------------------------------------


def test_overlay_blends_and_outlines():
    frame = np.full((40, 50, 3), 100, np.uint8)
    m = np.zeros((40, 50), np.uint8)
    m[10:30, 10:30] = 1
    m[12:20, 35:45] = 2
    out = overlay(frame, m, alpha=0.5)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(out[m == 0], frame[m == 0])  # background untouched
    inner = out[15:25, 15:25].reshape(-1, 3)
    assert np.all(np.abs(inner.astype(int) - [114, 50, 50]) <= 1)  # 0.5 * 100 + 0.5 * (128, 0, 0)
    assert out[10, 20].tolist() == DAVIS_PALETTE[1].tolist()  # contour in the object's colour
    assert out[12, 40].tolist() == DAVIS_PALETTE[2].tolist()
    assert np.array_equal(overlay(frame, m, alpha=0.0)[20, 20], frame[20, 20])
    with pytest.raises(DensekitError):
        overlay(frame, m[:-1])
    with pytest.raises(DensekitError):
        overlay(frame, m, alpha=2.0)


def test_write_overlay_video_reads_back(tmp_path):
    h, w, n = 60, 90, 9
    frames = [np.full((h, w, 3), 90 + 5 * i, np.uint8) for i in range(n)]
    masks = []
    for i in range(n):
        m = np.zeros((h, w), np.uint8)
        m[10:40, 5 + 4 * i : 35 + 4 * i] = 1
        masks.append(m)
    out = tmp_path / "vis" / "overlay.mp4"
    write_overlay_video(out, iter(frames), iter(masks), fps=12.0)
    assert [p.name for p in out.parent.iterdir()] == ["overlay.mp4"]
    v = open_video(out)
    assert len(v) == n and v.size == (h, w)
    assert v.fps == pytest.approx(12.0, rel=0.01)
    assert len(open_video(out, exact_count=True)) == n
    got = list(v)
    # The object region is red-tinted, the background grey.
    obj = got[4][20:30, 25:45].reshape(-1, 3).mean(0)
    bg = got[4][50:58, 5:20].reshape(-1, 3).mean(0)
    assert obj[0] > obj[1] + 30
    assert abs(bg[0] - bg[1]) < 8


def test_write_overlay_video_bad_input_leaves_nothing(tmp_path):
    f = [np.zeros((20, 30, 3), np.uint8)] * 3
    m = [np.zeros((20, 30), np.uint8)] * 2
    with pytest.raises(DensekitError, match="fewer masks"):
        write_overlay_video(tmp_path / "a.mp4", f, m, fps=10)
    with pytest.raises(DensekitError, match="more masks"):
        write_overlay_video(tmp_path / "b.mp4", f[:1], m, fps=10)
    with pytest.raises(DensekitError, match="no frames"):
        write_overlay_video(tmp_path / "c.mp4", [], [], fps=10)
    with pytest.raises(DensekitError):
        write_overlay_video(tmp_path / "d.mp4", [f[0], np.zeros((22, 30, 3), np.uint8)], [m[0], np.zeros((22, 30), np.uint8)], fps=10)
    assert list(tmp_path.iterdir()) == []


# --- real data ----------------------------------------------------------------------------------------


def test_real_davis2016_frames_and_masks(davis2016_mini):
    seq = davis2016_mini / "JPEGImages" / "480p" / "dog-agility"
    v = open_video(seq)
    assert len(v) == 25 and v.size == (480, 854) and v.names[0] == "00000"
    first = next(iter(v))
    assert first.shape == (480, 854, 3)
    m = read_mask(davis2016_mini / "Annotations" / "480p" / "dog-agility" / "00000.png")
    assert m.shape == (480, 854) and set(np.unique(m).tolist()) == {0, 1}


def test_real_mp4_count_matches_decoding(shared_data):
    p = shared_data / "videos" / "bikes.mp4"
    if not p.exists():
        pytest.skip("bikes.mp4 not present")
    v = open_video(p)
    assert len(v) == 250 and v.size == (272, 640)
    assert v.fps == pytest.approx(25.0, rel=0.01)
    assert len(open_video(p, exact_count=True)) == 250
