"""An index no kill or second writer can break (issue 15, Index).

A real ``densekit index build`` subprocess is SIGKILLed at chosen points, creation included, by the
test-only hook ``DENSEKIT_TEST_KILL_AT=commit:N|write:N`` (densekit.retrieval.segment_index.kill_point:
just before the Nth SQLite commit, or just after the Nth file / vector write); the next build must resume
to the index an uninterrupted build makes (same rows, ids, descriptors, vector-store ids and search
hits), for FAISS and milvus-lite. Two builders started at once must each end in a whole index equal to
that one, or in one ``error:`` line (exit 2). Readers see a whole index or one clear line.

Cheap: 6 random 48x64 images, the ``pixels`` backbone, K = 4. Each subprocess imports torch (seconds),
so the kill points are few and chosen: each write and commit of creation and of one add batch.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from densekit.apps.cli import main
from densekit.retrieval.segment_index import DB_NAME, LOCK_NAME, SegmentIndex, list_images
from densekit.serve.errors import DensekitError

MILVUS_MISSING = [m for m in ("pymilvus", "milvus_lite") if importlib.util.find_spec(m) is None]
needs_milvus = pytest.mark.skipif(bool(MILVUS_MISSING), reason=f"not installed: {', '.join(MILVUS_MISSING)}")

# FAISS: create = write:1 (generation 0, temp file), commit:1 (info); add = write:2 (generation 1), commit:2.
# Milvus: create = write:1 (collection), commit:1 (info); add = commit:2 (pending mark), write:2 (insert),
# commit:3 (rows). Each point is reached by a build of a new index (the process must die there).
KILL_POINTS = [
    ("faiss", "write:1"), ("faiss", "commit:1"), ("faiss", "write:2"), ("faiss", "commit:2"),
    pytest.param("milvus", "write:1", marks=needs_milvus), pytest.param("milvus", "commit:1", marks=needs_milvus),
    pytest.param("milvus", "commit:2", marks=needs_milvus), pytest.param("milvus", "write:2", marks=needs_milvus),
]
BACKENDS = ["faiss", pytest.param("milvus", marks=needs_milvus)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reliability") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        img[: 24 + i * 3, : 20 + i * 5] = (40 * i, 200, 255 - 40 * i)  # a block, so segments differ in kind
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), img)
    return folder


def _build_args(images: Path, index: Path, backend: str) -> list[str]:
    return ["index", "build", str(images), "--index", str(index), "--model", "pixels", "--segments", "4",
            "--max-side", "64", "--threads", "1", "--backend", backend]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DENSEKIT_TEST_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kill_at:
        env["DENSEKIT_TEST_KILL_AT"] = kill_at
    return env


def _popen(args: list[str], kill_at: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "densekit.apps.cli", *args], env=_env(kill_at),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(index: Path, query: Path) -> dict:
    """What must survive: image and segment rows (ids, descriptors), the vector store's ids, search hits."""
    with SegmentIndex.open(index) as idx:
        images = idx._conn.execute("SELECT id, path, width, height, grid_h, grid_w FROM images ORDER BY id").fetchall()
        segments = idx._conn.execute(
            "SELECT id, image_id, label, x0, y0, x1, y1, area, rle, descriptor FROM segments ORDER BY id"
        ).fetchall()
        if idx.backend == "milvus":
            store_ids = idx._store.ids().tolist()
        else:
            import faiss

            store_ids = sorted(faiss.vector_to_array(idx._index.id_map).tolist())
        hits = [(h.segment_id, round(h.score, 5)) for h in idx.search(query, point=(10, 10), k=8)]
    assert hits and store_ids == [s[0] for s in segments]
    return {"images": images, "segments": segments, "store_ids": store_ids, "hits": hits}


def _assert_clean(index: Path, backend: str) -> None:
    """No temp files of interrupted writes; one FAISS generation file."""
    assert not list(index.glob(".segments-*")), sorted(p.name for p in index.iterdir())
    if backend == "faiss":
        assert len(list(index.glob("segments-*.faiss"))) == 1


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per backend: the snapshot of an uninterrupted build (in this process)."""
    out = {}
    for backend in ("faiss", "milvus"):
        if backend == "milvus" and MILVUS_MISSING:
            continue
        index = tmp_path_factory.mktemp(f"ref_{backend}") / "idx"
        assert main(_build_args(images, index, backend)) == 0
        out[backend] = snapshot(index, images / "03.png")
    return out


def _one_error_line(stderr: str) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    assert all(ln.startswith(("error: ", "segment index ")) for ln in lines), stderr  # the error, a log line


@pytest.mark.parametrize(("backend", "kill_at"), KILL_POINTS)
def test_a_build_killed_at_any_point_resumes_to_the_uninterrupted_index(
    backend: str, kill_at: str, images: Path, reference: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = tmp_path / "idx"
    proc = _popen(_build_args(images, index, backend), kill_at)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, f"never reached {kill_at}: rc {proc.returncode}\n{err}"
    if kill_at in ("write:1", "commit:1"):  # killed inside creation: a reader gets one clear line
        with pytest.raises(DensekitError, match="creation was interrupted"):
            SegmentIndex.open(index)
    assert main(_build_args(images, index, backend)) == 0
    capsys.readouterr()
    assert snapshot(index, images / "03.png") == reference[backend]
    _assert_clean(index, backend)


def _race(argv: list[str], n: int = 2) -> list[tuple[int, str]]:
    procs = [_popen(argv) for _ in range(n)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def _check_race(outcomes: list[tuple[int, str]]) -> None:
    """Every builder either built (exit 0) or said, in one line, that another process is writing."""
    for rc, err in outcomes:
        if rc != 0:
            assert rc == 2, err
            _one_error_line(err)
            assert "being written by another process (pid " in err, err
    assert any(rc == 0 for rc, _ in outcomes), outcomes


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_builders_of_a_new_index_at_once(backend: str, images: Path, reference: dict, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    _check_race(_race(_build_args(images, index, backend)))
    assert snapshot(index, images / "03.png") == reference[backend]
    _assert_clean(index, backend)


def test_two_builders_resuming_at_once(images: Path, reference: dict, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    first = list_images(images)[:3]
    with SegmentIndex.create(index, "pixels", segments_per_image=4, max_side=64, threads=1) as idx:
        idx.add_images(first)
    _check_race(_race(_build_args(images, index, "faiss") + ["--wait", "0"]))
    assert snapshot(index, images / "03.png") == reference["faiss"]
    _assert_clean(index, "faiss")


def test_the_writer_lock_waits_bounded_and_a_dead_holder_is_taken_over(images: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    with SegmentIndex.create(index, "pixels", segments_per_image=4, max_side=64, threads=1):
        with pytest.raises(DensekitError, match=rf"being written by another process \(pid {os.getpid()}\)"):
            SegmentIndex.open(index, writer=True, lock_wait=0.2)
        with pytest.raises(DensekitError, match="being written"):
            SegmentIndex.create(tmp_path / "idx", "pixels", lock_wait=0)
    # a lock file left by a process that died (flock is gone with it) is simply taken over
    (index / LOCK_NAME).write_text("999999\n")
    with SegmentIndex.open(index, writer=True, lock_wait=0) as idx:
        assert (index / LOCK_NAME).read_text().strip() == str(os.getpid())
        idx.add_images(list_images(images)[:1])
    # a reader's handle takes the lock only for its own mutation
    with SegmentIndex.open(index) as reader, SegmentIndex.open(index, writer=True, lock_wait=0) as writer:
        writer.add_images(list_images(images)[1:2])
        with pytest.raises(DensekitError, match="being written"):
            reader.lock_wait = 0
            reader.add_images(list_images(images)[2:3])
    with SegmentIndex.open(index) as idx:
        assert len(idx) == 2


def test_a_partial_meta_left_by_old_code_restarts_cleanly(
    images: Path, reference: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Creation used to commit the info rows one at a time: a crash left some (``schema`` first)."""
    index = tmp_path / "idx"
    index.mkdir()
    conn = sqlite3.connect(index / DB_NAME)
    conn.executescript("CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "INSERT INTO info VALUES ('schema', '1'), ('backend', 'faiss'), ('model', 'pixels');")
    conn.close()
    (index / ".segments-0.faiss.x1y2z3.faiss").write_bytes(b"half")
    search = ["index", "search", "--index", str(index), "--image", str(images / "03.png")]
    assert main(search) == 2
    _one_error_line(capsys.readouterr().err)
    assert main(_build_args(images, index, "faiss")) == 0
    capsys.readouterr()
    assert snapshot(index, images / "03.png") == reference["faiss"]
    _assert_clean(index, "faiss")
    assert main(search) == 0


def test_kill_hook_is_inert_without_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from densekit.retrieval import segment_index

    monkeypatch.delenv("DENSEKIT_TEST_KILL_AT", raising=False)
    for _ in range(3):
        segment_index.kill_point("commit")  # returns: no variable, no kill
    monkeypatch.setenv("DENSEKIT_TEST_KILL_AT", "write:1000000")
    segment_index.kill_point("commit")  # another kind: not counted, no kill
