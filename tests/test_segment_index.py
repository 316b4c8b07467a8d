"""SegmentIndex (densekit.retrieval.segment_index) and ``densekit index build|search``.

Fast: the ``pixels`` backbone, images resized to a longer side of 128, K = 6 segments per image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from densekit.retrieval.segment_index import (
    SegmentIndex,
    kmeans_segments,
    rle_decode,
    rle_encode,
)
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import read_image, read_mask

K = 6
MAX_SIDE = 128
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 skimage photos, 4 frames of one sample sequence (with semantic masks) and one corrupt file."""
    from densekit.serve.sample import make_sample

    root = tmp_path_factory.mktemp("seg_images")
    images = root / "images"
    for name in PHOTOS:
        _write_rgb(images / f"{name}.png", getattr(skimage.data, name)())
    sample = make_sample(root / "sample", sequences=1, frames=4, height=96, width=160, seed=3)
    seq_dir = next((sample / "JPEGImages" / "480p").iterdir())
    for f in sorted(seq_dir.glob("*.jpg")):
        (images / f"seq_{f.name}").write_bytes(f.read_bytes())
    (images / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    return images


@pytest.fixture(scope="module")
def semantic_dir(image_dir: Path) -> Path:
    sample = image_dir.parent / "sample"
    return next((sample / "SemanticAnnotations" / "480p").iterdir())


@pytest.fixture(scope="module")
def built(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A Flat index over image_dir; returns (index dir, {file name: image id}) and the add report."""
    root = tmp_path_factory.mktemp("seg_index") / "idx"
    files = sorted(image_dir.iterdir())
    with SegmentIndex.create(root, "pixels", segments_per_image=K, max_side=MAX_SIDE) as idx:
        report = idx.add_images(files)
        rows = idx._conn.execute("SELECT id, path FROM images").fetchall()
    ids = {Path(p).name: i for i, p in rows}
    return root, {"ids": ids, "report": report}


def test_rle_round_trip_and_kmeans_cap() -> None:
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (16, 3)]:
        m = rng.random(shape) > 0.5
        assert np.array_equal(rle_decode(rle_encode(m), shape), m)
    assert np.array_equal(rle_decode(rle_encode(np.ones((3, 4), bool)), (3, 4)), np.ones((3, 4), bool))
    feats = rng.standard_normal((8, 2, 3)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=0, keepdims=True)
    labels = kmeans_segments(feats, k=15)  # 6 cells < K: K is capped, labels are compact
    assert labels.shape == (2, 3) and labels.max() < 6
    assert set(np.unique(labels)) == set(range(labels.max() + 1))


def test_add_reports_broken_file_and_indexes_the_rest(built) -> None:
    root, info = built
    report = info["report"]
    assert len(report.added) == 8  # 4 photos + 4 sample frames
    assert [Path(name).name for name, _ in report.skipped] == ["broken.jpg"]
    assert "broken.jpg" not in info["ids"]
    with SegmentIndex.open(root) as idx:
        assert len(idx) == 8
        assert 8 * 2 <= idx.n_segments <= 8 * K
        assert idx._index.ntotal == idx.n_segments


def test_segment_mask_query_finds_itself_first(built, image_dir: Path) -> None:
    root, info = built
    with SegmentIndex.open(root) as idx:
        for name in ("chelsea.png", "seq_00002.jpg"):
            image_id = info["ids"][name]
            image = read_image(image_dir / name)
            segs = idx.image_segments(image_id)
            sid, mask = max(segs, key=lambda s: s[1].sum())
            assert mask.shape == image.shape[:2]
            hits = idx.search(image, mask=mask, k=5)
            assert hits[0].image_id == image_id and hits[0].segment_id == sid
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)
            assert np.array_equal(hits[0].mask, mask)
            x0, y0, x1, y1 = hits[0].box
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_point_query_is_the_segment_under_the_point(built, image_dir: Path) -> None:
    root, info = built
    image_id = info["ids"]["coffee.png"]
    image = read_image(image_dir / "coffee.png")
    with SegmentIndex.open(root) as idx:
        hits = idx.search(image_dir / "coffee.png", point=(300, 200), k=3)
        # the stored segment containing that pixel is the one returned first, with score ~1
        containing = [sid for sid, m in idx.image_segments(image_id) if m[200, 300]]
    assert hits[0].image_id == image_id and hits[0].segment_id in containing
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].mask[200, 300]
    assert image.shape[:2] == hits[0].mask.shape


def test_box_query_equals_the_cell_aligned_mask_query(built, image_dir: Path) -> None:
    root, info = built
    image = read_image(image_dir / "astronaut.png")  # 512 x 512 -> 128 x 128 -> 16 x 16 cells of 32 px
    box = (64, 96, 320, 256)
    mask = np.zeros(image.shape[:2], bool)
    mask[96:256, 64:320] = True
    with SegmentIndex.open(root) as idx:
        by_box = idx.search(image, box=box, k=6)
        by_mask = idx.search(image, mask=mask, k=6)
        other = idx.search(image, box=(0, 0, 40, 40), k=6)
    assert [h.segment_id for h in by_box] == [h.segment_id for h in by_mask]
    assert np.allclose([h.score for h in by_box], [h.score for h in by_mask], atol=1e-5)
    assert [h.score for h in other] != [h.score for h in by_box]


def test_sample_object_mask_retrieves_its_own_sequence(built, image_dir: Path, semantic_dir: Path) -> None:
    """A semantic object region of one frame finds an object segment of the same video first."""
    root, info = built
    seq_ids = {i for n, i in info["ids"].items() if n.startswith("seq_")}
    sem = read_mask(semantic_dir / "00001.png")
    cls = [c for c in np.unique(sem) if c not in (0, 255)][0]
    with SegmentIndex.open(root) as idx:
        hits = idx.search(image_dir / "seq_00001.jpg", mask=sem == cls, k=3)
    assert hits[0].image_id in seq_ids
    assert hits[0].score > 0.9


def test_reopen_gives_same_results_and_rebuilds_a_lost_faiss_file(built, image_dir: Path, tmp_path: Path) -> None:
    import shutil

    src, info = built
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    q = read_image(image_dir / "rocket.png")
    with SegmentIndex.open(root) as idx:
        first = [(h.segment_id, round(h.score, 5)) for h in idx.search(q, point=(100, 100), k=5)]
    with SegmentIndex.open(root) as idx:
        again = [(h.segment_id, round(h.score, 5)) for h in idx.search(q, point=(100, 100), k=5)]
    assert again == first
    # a crash between writing a new FAISS generation and committing SQLite leaves an orphan file;
    # losing the committed file is repaired from the descriptors kept in SQLite
    (root / "segments-999.faiss").write_bytes(b"orphan")
    for f in root.glob("segments-*.faiss"):
        if f.name != "segments-999.faiss":
            f.unlink()
    with SegmentIndex.open(root) as idx:
        assert idx._index.ntotal == idx.n_segments
        rebuilt = [(h.segment_id, round(h.score, 5)) for h in idx.search(q, point=(100, 100), k=5)]
    assert rebuilt == first
    assert not (root / "segments-999.faiss").exists()
    assert len(list(root.glob("segments-*.faiss"))) == 1


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_remove_drops_hits_and_persists(factory: str, tmp_path: Path) -> None:
    photos = [cv2.resize(getattr(skimage.data, n)(), (128, 96)) for n in PHOTOS]
    root = tmp_path / factory
    with SegmentIndex.create(root, "pixels", factory=factory, segments_per_image=K) as idx:
        report = idx.add_images(photos, ids=[10, 11, 12, 13])
        assert report.added == [10, 11, 12, 13] and not report.skipped
        assert idx.search(photos[1], point=(60, 50), k=1)[0].image_id == 11
        assert idx.remove([11, 99]) == 1
        assert len(idx) == 3
        hits = idx.search(photos[1], point=(60, 50), k=50)
        assert hits and 11 not in {h.image_id for h in hits}
        assert idx._index.ntotal == idx.n_segments
    with SegmentIndex.open(root) as idx:
        assert len(idx) == 3
        assert 11 not in {h.image_id for h in idx.search(photos[1], point=(60, 50), k=50)}
        # ids already taken are reported, not silently overwritten
        assert idx.add_images([photos[0]], ids=[10]).skipped[0][1].startswith("image id 10")


def test_ivf_trains_once_it_has_enough_segments(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    crops = []
    for i in range(14):  # 14 random crops x 6 segments = 84 >= 39 * 2 training points
        p = photos[i % 4]
        y, x = rng.integers(0, p.shape[0] - 128), rng.integers(0, p.shape[1] - 128)
        crops.append(np.ascontiguousarray(p[y : y + 128, x : x + 128]))
    with SegmentIndex.create(tmp_path / "ivf", "pixels", factory="IVF2,Flat", segments_per_image=K, nprobe=2) as idx:
        idx.add_images(crops[:3])
        assert not idx._index.is_trained  # too few to train: exact search over SQLite meanwhile
        exact = idx.search(crops[1], point=(64, 64), k=1)[0]
        assert exact.image_id == 1 and exact.score == pytest.approx(1.0, abs=1e-4)
        idx.add_images(crops[3:])
        assert idx._index.is_trained and idx._index.ntotal == idx.n_segments
        hit = idx.search(crops[5], point=(64, 64), k=1)[0]
    assert hit.image_id == 5 and hit.score == pytest.approx(1.0, abs=1e-4)


def test_ivf_pq_factory_skips_polysemous_training() -> None:
    import faiss

    from densekit.retrieval.segment_index import _new_index

    index = _new_index(32, "IVF2,PQ8")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and ivf.do_polysemous_training is False
    assert _new_index(32, "IDMap,Flat").metric_type == faiss.METRIC_INNER_PRODUCT


def test_resumable_add_skips_indexed_paths(built, image_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(built[0], root)
    with SegmentIndex.open(root) as idx:
        n = idx.n_segments
        report = idx.add_images([image_dir / "astronaut.png", image_dir / "coffee.png"])
        assert report.added == [] and [r for _, r in report.skipped] == ["already indexed"] * 2
        assert idx.n_segments == n


def test_bad_input_errors(built, image_dir: Path, tmp_path: Path) -> None:
    root, _ = built
    with pytest.raises(DensekitError, match="built with model 'pixels'"):
        SegmentIndex.open(root, model="resnet18")
    with pytest.raises(DensekitError, match="no segment index"):
        SegmentIndex.open(tmp_path / "nowhere")
    with pytest.raises(DensekitError, match="already holds"):
        SegmentIndex.create(root, "pixels")
    with SegmentIndex.create(tmp_path / "empty", "pixels") as empty:
        with pytest.raises(DensekitError, match="empty"):
            empty.search(skimage.data.coffee(), point=(5, 5))
    with SegmentIndex.open(root) as idx:
        with pytest.raises(DensekitError, match="outside"):
            idx.search(image_dir / "coffee.png", point=(600, 10))  # coffee is 600 wide: x=600 is outside
        with pytest.raises(DensekitError, match="one query region"):
            idx.search(image_dir / "coffee.png", point=(1, 1), box=(0, 0, 5, 5))
        with pytest.raises(DensekitError, match="mask is"):
            idx.search(image_dir / "coffee.png", mask=np.ones((10, 10), bool))


def _cli(argv: list[str]) -> int:
    from densekit.apps import cli

    return cli.main(argv)


def test_cli_build_resume_search_grid(image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "cli_idx"
    base = ["index", "build", str(image_dir), "--index", str(index), "--segments", str(K), "--max-side", "96"]
    assert _cli(base + ["--model", "pixels"]) == 0
    out = capsys.readouterr()
    assert "added 8 images" in out.out and "broken.jpg" in out.err
    assert _cli(base) == 0  # resumes with the stored model
    assert "added 0 images" in capsys.readouterr().out
    assert _cli(base + ["--model", "resnet18"]) == 2
    assert "built with model 'pixels'" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    q = image_dir / "chelsea.png"
    rc = _cli(["index", "search", "--index", str(index), "--image", str(q), "--point", "200,150", "-k", "4",
               "--grid", str(grid)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 4 and "chelsea.png" in lines[0]
    sheet = cv2.imread(str(grid))
    assert sheet is not None and sheet.shape[0] >= 192 and sheet.shape[1] == 5 * 192
    # outlines are drawn: the hit tiles contain pure green contour pixels (BGR 0,255,0)
    assert ((sheet[:, 192:, 1] == 255) & (sheet[:, 192:, 0] == 0) & (sheet[:, 192:, 2] == 0)).sum() > 20

    for argv, msg in [
        (["index", "search", "--index", str(tmp_path / "missing"), "--image", str(q)], "no segment index"),
        (["index", "search", "--index", str(index), "--image", str(q), "--point", "9999,1"], "outside"),
        (["index", "search", "--index", str(index), "--image", str(q), "--point", "1"], "--point"),
        (["index", "search", "--index", str(index), "--image", str(q), "--box", "0,0,10,10"], None),
    ]:
        rc = _cli(argv)
        err = capsys.readouterr().err
        if msg is None:
            assert rc == 0
        else:
            assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1

    with SegmentIndex.create(tmp_path / "empty", "pixels"):
        pass
    assert _cli(["index", "search", "--index", str(tmp_path / "empty"), "--image", str(q)]) == 2
    assert "empty" in capsys.readouterr().err
