"""SegmentIndex behaviour on both vector stores: FAISS and Milvus (embedded milvus-lite), plus the CLI.

Every behavioural test runs once per backend; the indexes they share are module-scoped fixtures
(parametrised by backend, so each backend builds once). Fast: the ``pixels`` backbone, images resized to
a longer side of 128, K = 6 segments per image.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from densekit.retrieval.segment_index import SegmentIndex
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import read_image, read_mask, write_mask

K = 6
MAX_SIDE = 128
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
MILVUS_MISSING = [m for m in ("pymilvus", "milvus_lite") if importlib.util.find_spec(m) is None]
BACKENDS = [
    "faiss",
    pytest.param(
        "milvus",
        marks=pytest.mark.skipif(bool(MILVUS_MISSING), reason=f"not installed: {', '.join(MILVUS_MISSING)}"),
    ),
]
needs_milvus = pytest.mark.skipif(bool(MILVUS_MISSING), reason=f"not installed: {', '.join(MILVUS_MISSING)}")


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _photos() -> list[np.ndarray]:
    return [cv2.resize(getattr(skimage.data, n)(), (128, 96)) for n in PHOTOS]


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


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def built(backend: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A Flat index over image_dir; returns (index dir, {"ids": {file name: image id}, "report": ...})."""
    root = tmp_path_factory.mktemp(f"seg_index_{backend}") / "idx"
    files = sorted(image_dir.iterdir())
    with SegmentIndex.create(root, "pixels", segments_per_image=K, max_side=MAX_SIDE, backend=backend) as idx:
        report = idx.add_images(files)
        rows = idx._conn.execute("SELECT id, path FROM images").fetchall()
    ids = {Path(p).name: i for i, p in rows}
    return root, {"ids": ids, "report": report}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)  # the source is closed: milvus-lite's server for it has been stopped
    return dest


def _store_ids(idx: SegmentIndex) -> set[int]:
    if idx.backend == "milvus":
        return set(idx._store.ids().tolist())
    import faiss

    return set(faiss.vector_to_array(idx._index.id_map).tolist())


def _sql_ids(idx: SegmentIndex) -> set[int]:
    return {r[0] for r in idx._conn.execute("SELECT id FROM segments")}


# ------------------------------------------------------------------------------------- behaviour
def test_add_reports_broken_file_and_indexes_the_rest(built) -> None:
    root, info = built
    report = info["report"]
    assert len(report.added) == 8  # 4 photos + 4 sample frames
    assert [Path(name).name for name, _ in report.skipped] == ["broken.jpg"]
    assert "broken.jpg" not in info["ids"]
    with SegmentIndex.open(root) as idx:
        assert len(idx) == 8
        assert 8 * 2 <= idx.n_segments <= 8 * K
        assert idx._store.count() == idx.n_segments
        assert _store_ids(idx) == _sql_ids(idx)


def test_backend_is_recorded_and_picked_up_by_open(built, backend: str) -> None:
    root, _ = built
    with SegmentIndex.open(root) as idx:
        assert idx.backend == backend == idx.info["backend"]
        assert idx._store.name == backend
    assert (root / "milvus.db").is_dir() == (backend == "milvus")
    assert bool(list(root.glob("segments-*.faiss"))) == (backend == "faiss")


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
            assert len({h.segment_id for h in hits}) == len(hits) == 5


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
    root, _ = built
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


def test_backends_rank_alike(built, image_dir: Path) -> None:
    """Flat search is exact on both stores: the same query gives the same scores as numpy over SQLite."""
    root, _ = built
    image = read_image(image_dir / "rocket.png")
    with SegmentIndex.open(root) as idx:
        found = idx.query_region(image, point=(100, 100), k=idx.n_segments)
        hits, q = found.hits, found.descriptor
        ids, x = idx._all_descriptors()
    exact = np.sort(x @ q)[::-1]
    assert len(hits) == len(ids)
    assert np.allclose([h.score for h in hits], exact, atol=1e-5)


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


def test_reopen_gives_same_results(built, image_dir: Path, tmp_path: Path) -> None:
    root = _copy(built[0], tmp_path / "copy")
    q = read_image(image_dir / "rocket.png")
    with SegmentIndex.open(root) as idx:
        first = [(h.segment_id, round(h.score, 5)) for h in idx.search(q, point=(100, 100), k=5)]
    with SegmentIndex.open(root) as idx:
        again = [(h.segment_id, round(h.score, 5)) for h in idx.search(q, point=(100, 100), k=5)]
    assert again == first and len(first) == 5


class _Crash(Exception):
    pass


@pytest.mark.parametrize("operation", ["add", "remove"])
def test_crash_before_the_sqlite_commit_leaves_a_consistent_index(
    built, backend: str, image_dir: Path, tmp_path: Path, operation: str
) -> None:
    """The process dies after the vector store changed but before SQLite committed: open repairs it."""
    root = _copy(built[0], tmp_path / "copy")
    chelsea = built[1]["ids"]["chelsea.png"]
    with SegmentIndex.open(root) as idx:
        n_images, n_segments = len(idx), idx.n_segments
        before = _sql_ids(idx)
        store = idx._store

        def crash() -> None:  # every step up to the COMMIT has run; then the process dies
            if backend == "faiss":
                store.write_generation(store._generation() + 1)
            raise _Crash

        store.commit = crash
        store.load = lambda **_: None  # a dead process does not get to reconcile in place
        with pytest.raises(_Crash):
            if operation == "add":
                idx.add_images([_photos()[0]], ids=[500])
            else:
                idx.remove([chelsea])
        # the vector store ran ahead of SQLite: orphans after an add, holes after a remove
        changed = store.count() != n_segments
    assert changed
    with SegmentIndex.open(root) as idx:
        assert (len(idx), idx.n_segments) == (n_images, n_segments)
        assert _sql_ids(idx) == before == _store_ids(idx)
        assert idx._store.count() == n_segments
        segs = idx.image_segments(chelsea)
        hits = idx.search(image_dir / "chelsea.png", mask=segs[0][1], k=1)
        assert hits[0].segment_id == segs[0][0]  # a removed-then-restored vector is searchable again
    if backend == "faiss":
        assert len(list(root.glob("segments-*.faiss"))) == 1  # the uncommitted generation was deleted


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_remove_drops_hits_and_persists(backend: str, factory: str, tmp_path: Path) -> None:
    photos = _photos()
    root = tmp_path / factory
    with SegmentIndex.create(root, "pixels", factory=factory, segments_per_image=K, backend=backend) as idx:
        report = idx.add_images(photos, ids=[10, 11, 12, 13])
        assert report.added == [10, 11, 12, 13] and not report.skipped
        assert idx.search(photos[1], point=(60, 50), k=1)[0].image_id == 11
        assert idx.remove([11, 99]) == 1
        assert idx.remove([99]) == 0
        assert len(idx) == 3
        hits = idx.search(photos[1], point=(60, 50), k=50)
        assert hits and 11 not in {h.image_id for h in hits}
        assert len(hits) == idx.n_segments  # k above the count: every remaining segment, once
        assert idx._store.count() == idx.n_segments
    with SegmentIndex.open(root) as idx:
        assert len(idx) == 3
        assert 11 not in {h.image_id for h in idx.search(photos[1], point=(60, 50), k=50)}
        # ids already taken are reported, not silently overwritten
        assert idx.add_images([photos[0]], ids=[10]).skipped[0][1].startswith("image id 10")
        assert _store_ids(idx) == _sql_ids(idx)


def test_resumable_add_skips_indexed_paths(built, image_dir: Path, tmp_path: Path) -> None:
    root = _copy(built[0], tmp_path / "copy")
    with SegmentIndex.open(root) as idx:
        n = idx.n_segments
        report = idx.add_images([image_dir / "astronaut.png", image_dir / "coffee.png"])
        assert report.added == [] and [r for _, r in report.skipped] == ["already indexed"] * 2
        assert idx.n_segments == n == idx._store.count()


def test_bad_input_errors(built, backend: str, image_dir: Path, tmp_path: Path) -> None:
    root, _ = built
    with pytest.raises(DensekitError, match="built with model 'pixels'"):
        SegmentIndex.open(root, model="resnet18")
    with pytest.raises(DensekitError, match="no segment index"):
        SegmentIndex.open(tmp_path / "nowhere")
    with pytest.raises(DensekitError, match="already holds"):
        SegmentIndex.create(root, "pixels", backend=backend)
    with SegmentIndex.create(tmp_path / "empty", "pixels", backend=backend) as empty:
        assert len(empty) == 0
        with pytest.raises(DensekitError, match="empty"):
            empty.search(skimage.data.coffee(), point=(5, 5))
    with SegmentIndex.open(root) as idx:
        with pytest.raises(DensekitError, match="outside"):
            idx.search(image_dir / "coffee.png", point=(600, 10))  # coffee is 600 wide: x=600 is outside
        with pytest.raises(DensekitError, match="one query region"):
            idx.search(image_dir / "coffee.png", point=(1, 1), box=(0, 0, 5, 5))
        with pytest.raises(DensekitError, match="mask is"):
            idx.search(image_dir / "coffee.png", mask=np.ones((10, 10), bool))
        with pytest.raises(DensekitError, match="k must be"):
            idx.search(image_dir / "coffee.png", k=0)


def test_ef_search_is_stored_and_overridable(backend: str, tmp_path: Path) -> None:
    root = tmp_path / "hnsw"
    photos = _photos()
    with SegmentIndex.create(root, "pixels", factory="HNSW16", segments_per_image=K, backend=backend, ef_search=3) as idx:
        idx.add_images(photos)
        assert idx.search(photos[2], point=(64, 48), k=8)[0].image_id == 2
    with SegmentIndex.open(root) as idx:
        assert idx.ef_search == 3
        if backend == "milvus":
            assert idx._store.search_params(k=8) == {"ef": 8}  # Milvus rejects ef < k
            assert idx._store.search_params(k=2) == {"ef": 3}
        else:
            import faiss

            assert faiss.downcast_index(idx._index.index).hnsw.efSearch == 3
    with SegmentIndex.open(root, ef_search=40) as idx:
        assert idx.ef_search == 40
        if backend == "faiss":
            import faiss

            assert faiss.downcast_index(idx._index.index).hnsw.efSearch == 40
        else:
            assert idx._store.search_params(k=8) == {"ef": 40}
        assert idx.search(photos[2], point=(64, 48), k=8)[0].image_id == 2
        idx.set_search_params(ef_search=50, persist=True)
    with SegmentIndex.open(root) as idx:
        assert idx.ef_search == 50
    with pytest.raises(DensekitError, match="ef_search"):
        SegmentIndex.open(root, ef_search=0)


def test_gpu_request_is_a_clear_error_here(built, backend: str) -> None:
    import faiss

    if backend == "faiss" and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU: the GPU path is tested in test_segment_index.py")
    with pytest.raises(DensekitError, match="no GPU" if backend == "faiss" else "faiss backend"):
        SegmentIndex.open(built[0], gpu=True)


# ------------------------------------------------------------------------------------ Milvus only
@pytest.fixture(scope="module")
def milvus_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed milvus-lite-backed Flat index of the 4 photos (ids 0..3)."""
    root = tmp_path_factory.mktemp("milvus_small") / "idx"
    with SegmentIndex.create(root, "pixels", segments_per_image=K, backend="milvus") as idx:
        idx.add_images(_photos())
    return root


@needs_milvus
def test_milvus_reconciles_orphans_holes_and_a_lost_store(milvus_small: Path, tmp_path: Path) -> None:
    root = _copy(milvus_small, tmp_path / "copy")
    rocket = _photos()[3]
    with SegmentIndex.open(root) as idx:
        sql = _sql_ids(idx)
        victim = min(sql)
        client, name = idx._store._client, idx._store.collection
        client.insert(name, [{"id": 10**9, "vector": np.ones(idx.dim, np.float32) / np.sqrt(idx.dim)}])
        assert idx._store.count() == len(sql) + 1
    with SegmentIndex.open(root) as idx:  # count mismatch -> the orphan is deleted
        assert _store_ids(idx) == sql
        idx._store._client.delete(name, ids=[victim])
        assert idx._store.count() == len(sql) - 1
    with SegmentIndex.open(root) as idx:  # count mismatch -> the hole is re-inserted from SQLite
        assert _store_ids(idx) == sql
        assert idx.search(rocket, point=(60, 40), k=1)[0].score == pytest.approx(1, abs=1e-4)
    shutil.rmtree(root / "milvus.db")  # lost vector store: recreated and refilled from SQLite
    with SegmentIndex.open(root) as idx:
        assert _store_ids(idx) == sql
        hits = idx.search(rocket, point=(60, 40), k=3)
        assert hits[0].image_id == 3 and hits[0].score == pytest.approx(1, abs=1e-4)


@needs_milvus
def test_milvus_index_types_reach_the_collection(tmp_path: Path) -> None:
    from densekit.retrieval.milvus_store import milvus_index_params

    assert milvus_index_params("IDMap,Flat") == ("FLAT", {})
    assert milvus_index_params("IVF64,PQ16x4") == ("IVF_PQ", {"nlist": 64, "m": 16, "nbits": 4})
    assert milvus_index_params("IVF8,SQ8") == ("IVF_SQ8", {"nlist": 8})
    photos = _photos()
    for factory, itype, params in [("HNSW16", "HNSW", {"M": 16, "efConstruction": 40}), ("IVF4,Flat", "IVF_FLAT", {"nlist": 4})]:
        root = tmp_path / itype
        with SegmentIndex.create(root, "pixels", factory=factory, segments_per_image=K, backend="milvus", nprobe=4) as idx:
            idx.add_images(photos)
            desc = idx._store._client.describe_index(idx._store.collection, "vector")
            got = desc.get("params", desc)  # milvus-lite nests the build params; a server flattens them
            assert desc["index_type"] == itype and desc["metric_type"] == "IP"
            assert {k: int(got[k]) for k in params} == params
            assert idx.search(photos[3], point=(64, 48), k=3)[0].image_id == 3


@needs_milvus
def test_milvus_refusals_are_one_line(milvus_small: Path, tmp_path: Path) -> None:
    import fcntl
    import socket

    with pytest.raises(DensekitError, match="milvus-lite cannot build IVF_PQ"):
        SegmentIndex.create(tmp_path / "pq", "pixels", factory="IVF4,PQ8", backend="milvus")
    with pytest.raises(DensekitError, match="no Milvus index type"):
        SegmentIndex.create(tmp_path / "pca", "pixels", factory="PCA32,Flat", backend="milvus")
    with pytest.raises(DensekitError, match="must start with"):
        SegmentIndex.create(tmp_path / "ftp", "pixels", backend="milvus", uri="ftp://example")
    with pytest.raises(DensekitError, match="milvus backend"):
        SegmentIndex.create(tmp_path / "f", "pixels", backend="faiss", uri="http://localhost:19530")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DensekitError, match="cannot connect to Milvus") as err:
        SegmentIndex.create(tmp_path / "down", "pixels", backend="milvus", uri=f"http://user:secret@127.0.0.1:{port}")
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    for name in ("pq", "pca", "ftp", "f", "down"):
        assert not (tmp_path / name / "meta.sqlite").exists()  # refused before anything was written
    # another process holding milvus-lite's lock (an flock on a second descriptor conflicts like one)
    root = _copy(milvus_small, tmp_path / "copy")
    with open(root / "milvus.db" / "LOCK", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DensekitError, match="in use by another process"):
            SegmentIndex.open(root)
    with SegmentIndex.open(root) as idx:
        assert len(idx) == 4


def test_milvus_is_imported_lazily_and_its_absence_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code = (
        "import sys, densekit.retrieval.segment_index, densekit.retrieval.milvus_store\n"
        "assert 'pymilvus' not in sys.modules and 'milvus_lite' not in sys.modules, 'imported eagerly'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # what `import pymilvus` sees when it is not installed
    with pytest.raises(DensekitError, match=r"pip install 'pymilvus"):
        SegmentIndex.create(tmp_path / "idx", "pixels", backend="milvus")
    assert not (tmp_path / "idx" / "meta.sqlite").exists()


# ------------------------------------------------------------------------------------------- CLI
def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus()


def _cli(argv: list[str]) -> int:
    from densekit.apps import cli

    return cli.main(argv)


def test_cli_build_resume_search_grid_and_mask(
    backend: str, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = tmp_path / "cli_idx"
    base = ["index", "build", str(image_dir), "--index", str(index), "--segments", str(K), "--max-side", "96"]
    assert _cli(base + ["--model", "pixels", "--backend", backend, "--ef-search", "24"]) == 0
    out = capsys.readouterr()
    assert "added 8 images" in out.out and "broken.jpg" in out.err
    assert _cli(base) == 0  # resumes with the stored model and backend
    assert "added 0 images" in capsys.readouterr().out
    other = "faiss" if backend == "milvus" else "milvus"
    for argv, msg in [
        (base + ["--model", "resnet18"], "built with model 'pixels'"),
        (base + ["--backend", other], f"uses the {backend} backend"),
        (base + ["--backend", "annoy"], "--backend must be"),
    ]:
        assert _cli(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    with SegmentIndex.open(index) as idx:
        assert idx.backend == backend and idx.ef_search == 24
        chelsea = {Path(p).name: i for i, p in idx._conn.execute("SELECT id, path FROM images")}["chelsea.png"]
        sid, seg_mask = max(idx.image_segments(chelsea), key=lambda s: s[1].sum())

    grid = tmp_path / "grid.png"
    q = image_dir / "chelsea.png"
    search = ["index", "search", "--index", str(index), "--image", str(q)]
    rc = _cli(search + ["--point", "200,150", "-k", "4", "--grid", str(grid), "--ef-search", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 4 and "chelsea.png" in lines[0]
    sheet = cv2.imread(str(grid))
    assert sheet is not None and sheet.shape[0] >= 192 and sheet.shape[1] == 5 * 192
    # outlines are drawn: the hit tiles contain pure green contour pixels (BGR 0,255,0)
    assert ((sheet[:, 192:, 1] == 255) & (sheet[:, 192:, 0] == 0) & (sheet[:, 192:, 2] == 0)).sum() > 20

    # --mask: a stored segment of chelsea, written as a palette PNG, finds itself first with score 1
    mask_png = tmp_path / "m.png"
    write_mask(mask_png, seg_mask.astype(np.uint8))
    assert _cli(search + ["--mask", str(mask_png), "-k", "3"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 3
    rank, score, image_id, segment_id = lines[0][:4]
    assert (int(image_id), int(segment_id)) == (chelsea, sid) and float(score) == pytest.approx(1.0, abs=1e-3)
    assert lines[0][-1].endswith("chelsea.png")
    small = tmp_path / "small.png"
    write_mask(small, np.ones((10, 10), np.uint8))

    for argv, msg in [
        (["index", "search", "--index", str(tmp_path / "missing"), "--image", str(q)], "no segment index"),
        (search + ["--point", "9999,1"], "outside"),
        (search + ["--point", "1"], "--point"),
        (search + ["--mask", str(small)], "mask is"),
        (search + ["--gpu"], "faiss backend" if backend == "milvus" else None if _faiss_gpus() else "no GPU"),
        (search + ["--box", "0,0,10,10"], None),
    ]:
        rc = _cli(argv)
        err = capsys.readouterr().err
        if msg is None:
            assert rc == 0
        else:
            assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err

    with SegmentIndex.create(tmp_path / "empty", "pixels", backend=backend):
        pass
    assert _cli(["index", "search", "--index", str(tmp_path / "empty"), "--image", str(q)]) == 2
    assert "empty" in capsys.readouterr().err
