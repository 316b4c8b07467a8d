"""Segment retrieval: a vector index of image segments (FAISS or Milvus) with SQLite metadata.

Each indexed image is cut into segments by K-means over its L2-normalised dense embedding (K = 15 by
default, the number of clusters the hierarchical-grouping paper uses per image: Zhang & Maire, "Self-
Supervised Visual Representation Learning from Hierarchical Grouping", NeurIPS 2020), optionally with a
spatial term: the normalised cell coordinates ``(y/h, x/w)`` scaled by ``spatial_weight`` are appended
to each feature before clustering, so segments are pulled towards spatial compactness. A segment's
descriptor is the mean feature over its cells, L2-normalised; search is by inner product
(``METRIC_INNER_PRODUCT`` passed at construction, as the FAISS wiki "MetricType and distances"
prescribes for cosine similarity; setting ``.metric`` afterwards gives wrong scores, faiss #1083).

A query is a region of an image: a mask (resized to the feature grid, cells at least half covered), a
click point (the K-means segment of the query image under it, with the index's own K and spatial
weight) or a box (the cells whose centres lie inside it). Its descriptor is the mean feature over
those cells, L2-normalised. :meth:`SegmentIndex.query_region` runs the model once over the query image and
returns the region (on the grid and on the image), its descriptor and the hits; :meth:`SegmentIndex.search`
is its hits alone.

Backends (``SegmentIndex.create(..., backend=...)``, recorded in the index info so ``open`` picks it up):

- ``"faiss"`` (default): an in-process FAISS index written to ``DIR/segments-<G>.faiss`` (below).
- ``"milvus"``: a Milvus collection keyed by segment id, embedded milvus-lite in ``DIR/milvus.db`` or a
  Milvus server/cluster (``uri=``), for collections beyond one machine's memory. Factory strings map to
  Milvus index types; see :mod:`densekit.retrieval.milvus_store`.

Storage in ``DIR``::

    DIR/meta.sqlite          images, segments (box, RLE mask, area, descriptor), info (model, factory...)
    DIR/segments-<G>.faiss   faiss backend: the FAISS index of generation G (the generation named in info)
    DIR/milvus.db/           milvus backend without a server URI: milvus-lite's data folder

Masks are stored at *feature-grid* resolution (h x w = image size / stride after the resize to
``max_side``), run-length encoded in COCO's uncompressed convention (column-major, counts start with
a run of zeros); :class:`Hit.mask` is that mask resized (nearest) to the image's original size. Boxes
(``x0, y0, x1, y1``, exclusive ends) and areas are in original-image pixels.

Consistency (a crash at any point leaves a consistent pair). SQLite is the source of truth: it holds
every segment's descriptor as well as its metadata, and it is committed last. With FAISS every mutation
runs as::

    1. BEGIN; write the rows (or delete them); set info.generation = G + 1      (not committed)
    2. update the in-memory FAISS index; write it to a temp file and rename it onto
       segments-<G+1>.faiss                                                    (atomic_path)
    3. COMMIT the SQLite transaction
    4. delete segments-<G>.faiss

A crash before 3 leaves generation G in SQLite and its file intact (segments-<G+1>.faiss is an orphan,
deleted on the next open); a crash after 3 leaves G+1 and its file, with an orphaned old file. On
:meth:`SegmentIndex.open` the file of the committed generation is read (fast: one ``read_index``) and its
``ntotal`` is reconciled against the segment count in SQLite; if the file is missing or disagrees it is
rebuilt from the stored descriptors (and written as a new generation). The same rebuild serves index
types that cannot remove vectors (HNSW) and the training of IVF indexes. The Milvus backend follows the
same rule (rows, then vectors, then COMMIT) and reconciles the collection on open, deleting orphans and
re-inserting missing vectors (:mod:`densekit.retrieval.milvus_store`).

Creation is one SQLite transaction (the info rows, and FAISS generation 0 written before its COMMIT), so
a kill leaves no index or a whole one. A folder whose info is incomplete (a creation cut short, also by
older versions that committed the rows one at a time) and which holds no images is cleared by the next
writer and created afresh; :meth:`SegmentIndex.open` refuses it in one line.

Writers (issue 15): ``DIR/.writer.lock`` is an advisory lock (``flock``, holding the holder's pid).
:meth:`SegmentIndex.create`, :meth:`SegmentIndex.open_or_create` (``index build``) and ``open(writer=True)``
hold it for the handle's life; a reader's handle takes it for each of its own mutations. A second writer
waits up to ``lock_wait`` seconds (then one DensekitError line); a lock left by a dead process is taken
over (the kernel drops a dead holder's flock). Only the lock holder repairs: deletes orphan generations and
the temp files (``.segments-<G>.faiss.*``) of interrupted writes, writes a rebuilt index, reconciles
Milvus. A reader that finds the lock taken reads the last commit as it is (WAL mode) and rebuilds in
memory if the FAISS file it needs is gone. ``DENSEKIT_TEST_KILL_AT`` (:func:`kill_point`) is a test-only
crash hook.

IVF indexes (FAISS) are trained on a seeded sample (at most 256 x nlist descriptors, the FAISS
``max_points_per_centroid`` default) once the index holds enough descriptors (``train_min``: 39 x nlist,
and 256 more when PQ codes are used); until then the FAISS index is empty and search is exact over the
stored descriptors (numpy), so small collections work with any factory. ``nprobe`` is set explicitly
(faiss #1109: the default 1 gives poor recall). A refine stage (``IVF4096,PQ32,RFlat``) gets the IDMap
wrapper it needs for ids and re-ranks 4x k PQ candidates by exact scores (``k_factor_rf``; FAISS's 1 re-ranks
only k and kept recall@10 at PQ's 0.67 in ``benchmarks/retrieval.py``, 0.97 with 4).

HNSW search breadth: ``ef_search`` (default 64; stored in the info, overridable per ``open``) is FAISS's
``efSearch`` (set through ``ParameterSpace``, which reaches through the IDMap wrapper) and Milvus' ``ef``.
FAISS searches with ``max(efSearch, k)`` internally; Milvus rejects ``ef < k``, so ``max(ef_search, k)``
is sent there.

Threads: :func:`faiss.omp_set_num_threads` is called with ``threads`` (default ``os.cpu_count()``).
faiss is imported lazily inside functions. Import order with torch: with faiss-cpu 1.15.1 and the
torch wheel in this venv both orders (torch then faiss, faiss then torch) ran K-means and matmuls
without a crash; other combinations are reported to segfault or abort with ``OMP: Error #15``
(faiss #3401, #4273, faiss-wheels #40), so we never import faiss at module import time.

GPU (FAISS only, on request: ``gpu=True`` / ``--gpu``): searches run on a clone of the Flat/IVF index made
by ``faiss.index_cpu_to_all_gpus``; the CPU index stays canonical and is what gets written. Asking for it
when ``faiss.get_num_gpus() == 0`` (a faiss-cpu build, or no CUDA device), for HNSW (no FAISS GPU
implementation) or with the Milvus backend is a DensekitError. FAISS GPU search caps k at 2048
(``GPU_MAX_SELECTION_K``). That path is untested here (no GPU build of faiss in this venv).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from densekit.serve.atomic import atomic_path
from densekit.serve.errors import DensekitError
from densekit.serve.imageio import IMAGE_SUFFIXES

try:
    import fcntl
except ImportError:  # Windows: no advisory lock (WriterLock)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DB_NAME = "meta.sqlite"
SCHEMA_VERSION = "1"
LOCK_NAME = ".writer.lock"
LOCK_WAIT_S = 10.0  # how long a second writer waits for the first before giving up (one line, exit 2)
BUSY_TIMEOUT_S = 10.0  # SQLite's wait for a lock held by another connection (a reader's WAL checkpoint)
KILL_ENV = "DENSEKIT_TEST_KILL_AT"  # test-only: see kill_point

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE, width INTEGER NOT NULL, height INTEGER NOT NULL,
    grid_h INTEGER NOT NULL, grid_w INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    label INTEGER NOT NULL, x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL,
    y1 INTEGER NOT NULL, area INTEGER NOT NULL, rle BLOB NOT NULL, descriptor BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS segments_image ON segments(image_id);
"""


def _faiss() -> Any:
    import faiss  # lazily: see the module docstring on OpenMP import order

    return faiss


def set_threads(threads: int | None = None) -> int:
    """Set FAISS's OpenMP thread count explicitly (default ``os.cpu_count()``); returns it."""
    n = int(threads or os.cpu_count() or 1)
    _faiss().omp_set_num_threads(n)
    return n


_kill_counts: dict[str, int] = {}


def kill_point(kind: str) -> None:
    """Test-only crash hook: with ``DENSEKIT_TEST_KILL_AT=commit:N`` (or ``write:N``) the process SIGKILLs
    itself just before its Nth SQLite commit (or just after its Nth file / vector write, before anything
    else). Unset (always, outside tests/test_index_reliability.py): nothing happens."""
    spec = os.environ.get(KILL_ENV)
    if not spec or not spec.startswith(kind + ":"):
        return
    _kill_counts[kind] = _kill_counts.get(kind, 0) + 1
    if spec == f"{kind}:{_kill_counts[kind]}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------- RLE masks
def rle_encode(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> uint32 run lengths, COCO order (column-major, first run counts zeros)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds)
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    return runs.astype(np.uint32)


def rle_decode(runs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode` -> (h, w) bool."""
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, np.asarray(runs, dtype=np.int64))
    return flat.reshape(shape, order="F")


# ------------------------------------------------------------------------------------- segmentation
def kmeans_segments(
    feats: np.ndarray, k: int = 15, spatial_weight: float = 0.0, seed: int = 0, niter: int = 20
) -> np.ndarray:
    """(D, h, w) unit-norm features -> (h, w) int labels 0..K'-1 (K' <= k; empty clusters dropped).

    K is capped at the number of cells. ``min_points_per_centroid`` is lowered to 1: small images have
    fewer than FAISS's 39 x K (= 585 for K = 15) points and would otherwise print a warning each time.
    FAISS K-means is Lloyd's algorithm from a seeded random choice of initial centroids.
    """
    faiss = _faiss()
    d, h, w = feats.shape
    x = np.ascontiguousarray(feats.reshape(d, h * w).T, dtype=np.float32)
    if spatial_weight > 0:
        yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        xy = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float32) * float(spatial_weight)
        x = np.ascontiguousarray(np.concatenate([x, xy], axis=1))
    k = max(1, min(int(k), h * w))
    if k == 1:
        return np.zeros((h, w), dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed) + 1, min_points_per_centroid=1, verbose=False)
    # One image's K-means is tiny (hundreds of points): OpenMP fork/barrier overhead dominates. Measured
    # here (2 busy cores, 144 x 192-d points, K = 6): 0.15 s with 2 threads vs 0.001 s with 1 thread.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km.train(x)
        _, assign = km.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(previous)
    labels = assign.ravel()
    _, compact = np.unique(labels, return_inverse=True)
    return compact.reshape(h, w).astype(np.int64)


def region_descriptor(feats: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Mean of (D, h, w) features over the (h, w) bool ``cells``, L2-normalised -> (D,) float32."""
    v = feats[:, cells].mean(axis=1)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------- data types
@dataclass
class Hit:
    """One search result. ``mask`` is (height, width) bool in the hit image's original pixels."""

    image_id: int
    path: str | None
    segment_id: int
    score: float
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)


@dataclass
class RegionQuery:
    """What :meth:`SegmentIndex.query_region` found for a region of a query image (H x W pixels).

    ``cells``: (h, w) bool, the region on the query's feature grid; ``mask``: (H, W) bool, those cells on
    the image's pixels (nearest), what a picture of the query outlines; ``descriptor``: (D,) float32, the
    region's unit-norm mean feature; ``hits``: the nearest indexed segments, best first.
    """

    cells: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    descriptor: np.ndarray = field(repr=False)
    hits: list[Hit]


@dataclass
class AddReport:
    """What :meth:`SegmentIndex.add_images` did: ids added, and (item, reason) for each skip."""

    added: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    segments: int = 0


@dataclass
class _Prepared:
    image_id: int | None
    path: str | None
    width: int
    height: int
    labels: np.ndarray  # (h, w)
    descriptors: np.ndarray  # (K', D)


def _parse_factory(factory: str) -> tuple[str, int | None, bool]:
    """-> (faiss factory string with IDMap where needed, nlist or None, uses PQ)."""
    f = factory.strip()
    if not f:
        raise DensekitError("empty --factory")
    m = re.search(r"IVF(\d+)", f)
    nlist = int(m.group(1)) if m else None
    uses_pq = bool(re.search(r"PQ\d+", f))
    if (nlist is None or _REFINE.search(f)) and not f.startswith("IDMap"):
        # Flat, HNSW and the refine wrapper (IndexRefine) have no add_with_ids (FAISS wiki "Faiss indexes")
        f = "IDMap," + f
    return f, nlist, uses_pq


_REFINE = re.compile(r"(^|,)(RFlat|Refine\()")
K_FACTOR_RF = 4  # refine stages re-rank k * this many PQ candidates; FAISS's default 1 re-ranks only k


BACKENDS = ("faiss", "milvus")
DEFAULT_EF_SEARCH = 64
GPU_MAX_K = 2048  # faiss GPU_MAX_SELECTION_K (CUDA > 9)


class SegmentIndex:
    """A directory holding a vector index of image segments plus SQLite metadata (see module docs).

    Make one with :meth:`create`, reopen with :meth:`open`. ``len(index)`` is the number of images.
    ``backend`` is ``"faiss"`` or ``"milvus"``.
    """

    kill_point = staticmethod(kill_point)  # the test-only crash hook, for the vector stores

    def __init__(
        self,
        root: Path,
        conn: sqlite3.Connection,
        extractor: Any,
        info: dict[str, str],
        *,
        ef_search: int | None = None,
        gpu: bool = False,
    ) -> None:
        self.root = root
        self._conn = conn
        self.extractor = extractor
        self.info = info
        self.dim = int(info["dim"])
        self.k = int(info["segments_per_image"])
        self.spatial_weight = float(info["spatial_weight"])
        self.max_side = int(info["max_side"])
        self.seed = int(info["seed"])
        self.backend = info.get("backend", "faiss")  # indexes made before backends existed are FAISS
        self.nprobe = int(info["nprobe"])
        self.ef_search = int(ef_search if ef_search is not None else info.get("ef_search", DEFAULT_EF_SEARCH))
        if self.ef_search < 1:
            raise DensekitError("ef_search must be >= 1")
        self.gpu = bool(gpu)
        self._store: Any = None
        self._lock: WriterLock | None = None  # held for the handle's life by create / open(writer=True)
        self.lock_wait = LOCK_WAIT_S

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        model: str | Any,
        factory: str = "Flat",
        segments_per_image: int = 15,
        spatial_weight: float = 0.0,
        *,
        backend: str = "faiss",
        uri: str | None = None,
        token: str | None = None,
        collection: str | None = None,
        nprobe: int = 16,
        ef_search: int = DEFAULT_EF_SEARCH,
        max_side: int = 512,
        seed: int = 0,
        threads: int | None = None,
        gpu: bool = False,
        lock_wait: float = LOCK_WAIT_S,
    ) -> SegmentIndex:
        """Create an empty index in ``root`` (DensekitError if one is already there).

        The new handle holds the folder's writer lock until it is closed (waiting up to ``lock_wait``
        seconds for another writer); what an interrupted creation left in ``root`` is cleared first.

        Args:
            model: a backbone name / checkpoint path (stored, so :meth:`open` can rebuild the extractor)
                or a ready :class:`~densekit.serve.extractor.FeatureExtractor` (then pass it to ``open``).
            factory: a ``faiss.index_factory`` string: ``Flat``, ``HNSW32``, ``IVF{n},PQ{m}``,
                ``IVF{n},Flat``...; IDMap is prepended where the type needs it. With Milvus it is mapped
                to a Milvus index type (:func:`~densekit.retrieval.milvus_store.milvus_index_params`).
            segments_per_image: K of the per-image K-means (fewer when an image has fewer cells).
            spatial_weight: scale of the appended normalised (y, x) cell coordinates (0 = off).
            backend: ``"faiss"`` or ``"milvus"``. uri: Milvus server URI (``http://host:19530``); None =
                embedded milvus-lite in ``root/milvus.db``. token: Milvus token (default
                ``$DENSEKIT_MILVUS_TOKEN``; never stored). collection: Milvus collection name (default: a
                unique ``densekit_segments_<hex>``).
            nprobe: IVF lists visited per query. ef_search: HNSW search breadth (stored; ``open`` may
                override it). max_side: images are resized so their longer side is at most this before
                feature extraction. seed: K-means and IVF-training seed. gpu: search on FAISS GPUs.
        """
        spec = _CreateSpec(factory, segments_per_image, spatial_weight, backend, uri, token, collection, nprobe,
                           ef_search, max_side, seed, threads, gpu)
        extra = spec.check()  # before anything is written

        def make(state: str) -> SegmentIndex:
            if state == "whole":
                raise DensekitError(f"{root} already holds a segment index; open it instead")
            return cls._create_locked(Path(root), model, spec, extra)

        return cls._under_lock(Path(root), lock_wait, make)

    @classmethod
    def open_or_create(
        cls,
        root: str | os.PathLike[str],
        model: str | Any | None,
        *,
        lock_wait: float = LOCK_WAIT_S,
        **create_args: Any,
    ) -> tuple[SegmentIndex, bool]:
        """A writer's handle on ``root``: the index there, or a new one -> (index, created).

        The choice is made under the writer lock (so two builders at once cannot both create), and a
        folder left by an interrupted creation is cleared and created afresh. ``create_args`` are
        :meth:`create`'s keywords; an existing index uses ``threads``, ``uri`` and ``token`` of them.
        """
        spec = _CreateSpec(**create_args)
        created = False

        def make(state: str) -> SegmentIndex:
            nonlocal created
            if state == "whole":
                return cls._open_locked(Path(root), model, spec.threads, None, spec.uri, spec.token, spec.gpu, True)
            if model is None:
                raise DensekitError(f"no segment index at {root} yet: a model is needed to create one")
            created = True
            return cls._create_locked(Path(root), model, spec, spec.check())

        return cls._under_lock(Path(root), lock_wait, make), created

    @classmethod
    def _under_lock(
        cls, root: Path, lock_wait: float, make: Callable[[str], SegmentIndex]
    ) -> SegmentIndex:
        """Take ``root``'s writer lock, clear what an interrupted creation left, ``make(state)`` the handle,
        which keeps the lock. ``state``: "none" or "whole"."""
        made_root = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(root)
        lock.acquire(lock_wait)
        try:
            state = _index_state(root)
            if state == "partial":
                _clear_partial(root)
                state = "none"
            idx = make(state)
        except BaseException:
            if made_root:
                lock.remove()  # the folder was ours: leave nothing (under the lock, then released)
                try:
                    root.rmdir()
                except OSError:
                    pass
            lock.release()
            raise
        idx._lock = lock
        return idx

    @classmethod
    def _create_locked(cls, root: Path, model: str | Any, spec: _CreateSpec, extra: dict[str, str]) -> SegmentIndex:
        """The creation proper, with the writer lock held and no index in ``root``."""
        set_threads(spec.threads)
        extractor, model_spec = _make_extractor(model)
        index = spec.new_faiss_index(int(extractor.meta.dim)) if spec.backend == "faiss" else None
        info = spec.info(extractor.meta, model_spec or "", extra)
        self = cls(root, _connect(root / DB_NAME), extractor, info, gpu=spec.gpu)
        collection_made = False
        try:
            self._check_gpu()
            if spec.backend == "milvus":
                from densekit.retrieval.milvus_store import MilvusStore

                self._store = MilvusStore(self, uri=spec.uri, token=spec.token)
                self._store.create()  # before SQLite, so a refused collection leaves no index behind
                collection_made = True
            else:
                self._store = _FaissStore(self, index)
            self._write_info()
        except BaseException:
            self._undo_create(collection_made and spec.uri is not None)
            raise
        return self

    def _write_info(self) -> None:
        """The info rows (and FAISS generation 0) in one transaction: an index is whole or absent."""
        conn = self._conn
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO info(key, value) VALUES (?, ?)", list(self.info.items()))
        if self.backend == "faiss":
            self._store.configure()
            self._store.write_generation(0)
        kill_point("commit")
        conn.commit()

    def _undo_create(self, drop_collection: bool) -> None:
        """Remove what a failed :meth:`_create_locked` wrote (the writer lock is still held)."""
        if drop_collection:
            try:
                self._store.drop()
            except DensekitError:
                log.warning("could not drop Milvus collection %s after a failed create", self.info["milvus_collection"])
        self.close()
        _clear_partial(self.root, quiet=True)

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        model: str | Any | None = None,
        *,
        threads: int | None = None,
        ef_search: int | None = None,
        uri: str | None = None,
        token: str | None = None,
        gpu: bool = False,
        writer: bool = False,
        lock_wait: float = LOCK_WAIT_S,
    ) -> SegmentIndex:
        """Open an index: read SQLite and the vector store, reconcile them (rebuild/repair if they disagree).

        ``model`` defaults to the one stored at creation; a model whose name or dim differs from the
        index's raises DensekitError. ``ef_search`` overrides the stored HNSW search breadth for this
        handle (:meth:`set_search_params` stores it). ``uri``/``token``: Milvus server address (default:
        the stored one) and token (default ``$DENSEKIT_MILVUS_TOKEN``). ``gpu``: FAISS GPU search.

        Locking: ``writer=True`` holds the folder's writer lock until :meth:`close` (waiting up to
        ``lock_wait`` s). A reader (the default) repairs the store only when no writer holds the lock,
        and takes the lock for each :meth:`add_images` / :meth:`remove` of its own.
        """
        root = Path(root)
        if ef_search is not None and ef_search < 1:
            raise DensekitError("ef_search must be >= 1")
        if not (root / DB_NAME).is_file():
            raise DensekitError(f"no segment index at {root} (missing {DB_NAME})")
        lock = WriterLock(root)
        if writer:
            lock.acquire(lock_wait)
        repair = writer or lock.try_acquire()
        try:
            self = cls._open_locked(root, model, threads, ef_search, uri, token, gpu, repair)
        except BaseException:
            lock.release()
            raise
        if writer:
            self._lock = lock
        else:
            lock.release()
        self.lock_wait = lock_wait
        return self

    @classmethod
    def _open_locked(
        cls,
        root: Path,
        model: str | Any | None,
        threads: int | None,
        ef_search: int | None,
        uri: str | None,
        token: str | None,
        gpu: bool,
        repair: bool,
    ) -> SegmentIndex:
        """Open the index in ``root``; ``repair``: the writer lock is held, so the store may be repaired."""
        db = root / DB_NAME
        set_threads(threads)
        try:
            conn = _connect(db, schema=repair)
            info = _committed_info(conn)
        except sqlite3.DatabaseError as exc:
            raise DensekitError(f"{db} is not a readable segment index: {_first_line(exc)}") from None
        try:
            backend = _check_info(root, info, uri)
            extractor = _matching_extractor(root, info, model)
        except BaseException:
            conn.close()
            raise
        self = cls(root, conn, extractor, info, ef_search=ef_search, gpu=gpu)
        try:
            self._check_gpu()
            if backend == "milvus":
                from densekit.retrieval.milvus_store import MilvusStore

                self._store = MilvusStore(self, uri=uri, token=token)
            else:
                self._store = _FaissStore(self)
            self._store.load(repair=repair)
        except BaseException:
            self.close()
            raise
        return self

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writer lock for one mutation (a handle from create / ``open(writer=True)`` has it)."""
        if self._lock is not None and self._lock.held:
            yield
            return
        lock = WriterLock(self.root)
        lock.acquire(self.lock_wait)
        try:
            self._store.load(repair=True)  # another writer may have committed since this handle loaded
            yield
        finally:
            lock.release()

    def _check_gpu(self) -> None:
        if not self.gpu:
            return
        if self.backend != "faiss":
            raise DensekitError(
                "gpu applies to the faiss backend; Milvus runs GPU index types (GPU_IVF_FLAT, GPU_CAGRA) on the server"
            )
        faiss = _faiss()
        n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if n < 1:
            raise DensekitError("gpu search requested but faiss sees no GPU (a faiss-cpu build or no CUDA device)")
        if "HNSW" in self.info["faiss_factory"]:
            raise DensekitError(f"factory {self.info['factory']!r}: FAISS has no GPU HNSW; search it on the CPU")

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None, persist: bool = False) -> None:
        """Change HNSW ``ef_search`` / IVF ``nprobe`` for this handle; ``persist`` also stores them."""
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
            if value is None:
                continue
            if int(value) < 1:
                raise DensekitError(f"{name} must be >= 1")
            setattr(self, name, int(value))
            self.info[name] = str(int(value))
            if persist:
                self._conn.execute("INSERT OR REPLACE INTO info(key, value) VALUES (?, ?)", (name, str(int(value))))
        if self._store is not None and hasattr(self._store, "configure"):
            self._store.configure()

    @property
    def _index(self) -> Any:
        """The in-memory FAISS index (faiss backend), else None."""
        return self._store.index if isinstance(self._store, _FaissStore) else None

    # ------------------------------------------------------------------------------- descriptors
    def _all_descriptors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._conn.execute("SELECT id, descriptor FROM segments ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return ids, x

    def _descriptors_for(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(ids), D) stored descriptors, in the order of ``ids`` (all must exist)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        pos = {int(i): n for n, i in enumerate(ids)}
        keys = list(pos)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = ",".join("?" * len(chunk))
            for sid, blob in self._conn.execute(f"SELECT id, descriptor FROM segments WHERE id IN ({q})", chunk):
                out[pos[int(sid)]] = np.frombuffer(blob, dtype=np.float32)
        return out

    def _mutate(self, write_rows: Callable[[], None], update_store: Callable[[], None]) -> None:
        """Rows, then vectors, then COMMIT (module docstring); on failure roll back and reconcile."""
        conn = self._conn
        try:
            self._store.begin()
            conn.execute("BEGIN")
            write_rows()
            update_store()
            self._store.commit()
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            # the vector store may hold vectors SQLite no longer has: reload / reconcile the committed state
            self._store.load(repair=True)  # the writer lock is held (_writing)
            raise

    # ------------------------------------------------------------------------------------ adding
    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """image -> (feats (D,h,w), labels (h,w), descriptors (K',D))."""
        feats = self._features(image)
        labels = kmeans_segments(feats, self.k, self.spatial_weight, self.seed)
        descs = np.stack([region_descriptor(feats, labels == s) for s in range(labels.max() + 1)])
        return feats, labels, descs

    def _features(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        mult = int(self.extractor.meta.input_multiple)
        if min(image.shape[:2]) < mult:
            raise DensekitError(f"image {w}x{h} is smaller than the model's input multiple {mult}")
        return np.asarray(self.extractor(image), dtype=np.float32)

    def add_images(
        self,
        images: Iterable[str | os.PathLike[str] | np.ndarray],
        ids: Sequence[int] | None = None,
        *,
        commit_every: int = 32,
        progress: Callable[[str, bool], None] | None = None,
    ) -> AddReport:
        """Index images (paths or (H, W, 3) uint8 RGB arrays); returns an :class:`AddReport`.

        Images that do not decode, paths already indexed and ids already taken are skipped and
        reported; the rest are indexed. Work is committed every ``commit_every`` images, so an
        interrupted run keeps what it finished. ``progress(item, added)`` is called per image.
        """
        items = list(images)
        if ids is not None and len(ids) != len(items):
            raise DensekitError(f"{len(ids)} ids for {len(items)} images")
        with self._writing():  # ids and paths are read, and written, by one writer at a time
            return self._add_locked(items, ids, commit_every, progress)

    def _add_locked(
        self,
        items: list[Any],
        ids: Sequence[int] | None,
        commit_every: int,
        progress: Callable[[str, bool], None] | None,
    ) -> AddReport:
        from densekit.serve.imageio import read_image

        report = AddReport()
        pending: list[_Prepared] = []
        taken_paths = {r[0] for r in self._conn.execute("SELECT path FROM images WHERE path IS NOT NULL")}
        taken_ids = {r[0] for r in self._conn.execute("SELECT id FROM images")}
        next_id = max(taken_ids, default=-1) + 1
        for i, item in enumerate(items):
            name = item if isinstance(item, str) else (str(item) if not isinstance(item, np.ndarray) else f"<array {i}>")
            image_id = int(ids[i]) if ids is not None else None
            path: str | None = None
            try:
                if isinstance(item, np.ndarray):
                    arr = item
                    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                        raise DensekitError(f"expected (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
                else:
                    path = str(Path(item).resolve())
                    name = path
                    if path in taken_paths:
                        report.skipped.append((name, "already indexed"))
                        if progress:
                            progress(name, False)
                        continue
                    arr = read_image(path)
                if image_id is None:
                    image_id = next_id
                if image_id in taken_ids:
                    raise DensekitError(f"image id {image_id} is already in the index")
                _, labels, descs = self._prepare(arr)
            except DensekitError as exc:
                report.skipped.append((name, str(exc)))
                if progress:
                    progress(name, False)
                continue
            taken_ids.add(image_id)
            next_id = max(next_id, image_id + 1)
            if path is not None:
                taken_paths.add(path)
            pending.append(_Prepared(image_id, path, arr.shape[1], arr.shape[0], labels, descs))
            if progress:
                progress(name, True)
            if len(pending) >= commit_every:
                self._commit_images(pending, report)
                pending = []
        if pending:
            self._commit_images(pending, report)
        return report


    def _commit_images(self, batch: list[_Prepared], report: AddReport) -> None:
        conn = self._conn
        new_ids: list[int] = []
        new_x: list[np.ndarray] = []

        def write_rows() -> None:
            new_ids.clear()
            new_x.clear()
            seg_id = (conn.execute("SELECT MAX(id) FROM segments").fetchone()[0] or -1) + 1
            for p in batch:
                gh, gw = p.labels.shape
                conn.execute(
                    "INSERT INTO images(id, path, width, height, grid_h, grid_w) VALUES (?,?,?,?,?,?)",
                    (p.image_id, p.path, p.width, p.height, gh, gw),
                )
                boxes, areas = _segment_boxes(p.labels, len(p.descriptors), p.height, p.width)
                for s, desc in enumerate(p.descriptors):
                    cells = p.labels == s
                    conn.execute(
                        "INSERT INTO segments(id, image_id, label, x0, y0, x1, y1, area, rle, descriptor) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (seg_id, p.image_id, s, *boxes[s], int(areas[s]), rle_encode(cells).tobytes(),
                         np.ascontiguousarray(desc, dtype=np.float32).tobytes()),
                    )
                    new_ids.append(seg_id)
                    new_x.append(desc)
                    seg_id += 1

        def update_store() -> None:
            if new_ids:
                self._store.add(np.array(new_ids, dtype=np.int64), np.ascontiguousarray(np.stack(new_x)))

        self._mutate(write_rows, update_store)
        report.added.extend(p.image_id for p in batch if p.image_id is not None)
        report.segments += len(new_ids)

    # ---------------------------------------------------------------------------------- removing
    def remove(self, image_ids: Iterable[int]) -> int:
        """Remove images (and their segments); returns the number of images removed."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return 0
        with self._writing():
            return self._remove_locked(ids)

    def _remove_locked(self, ids: list[int]) -> int:
        conn = self._conn
        q = ",".join("?" * len(ids))
        seg_ids = np.array(
            [r[0] for r in conn.execute(f"SELECT id FROM segments WHERE image_id IN ({q})", ids)], dtype=np.int64
        )
        n_images = conn.execute(f"SELECT COUNT(*) FROM images WHERE id IN ({q})", ids).fetchone()[0]
        if not n_images:
            return 0

        def write_rows() -> None:
            conn.execute(f"DELETE FROM segments WHERE image_id IN ({q})", ids)
            conn.execute(f"DELETE FROM images WHERE id IN ({q})", ids)

        def update_store() -> None:
            if len(seg_ids):
                self._store.remove(seg_ids)

        self._mutate(write_rows, update_store)
        return int(n_images)

    # --------------------------------------------------------------------------------- searching
    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    @property
    def n_segments(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0])

    def query_cells(
        self,
        image: np.ndarray,
        feats: np.ndarray,
        mask: np.ndarray | None = None,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """The (h, w) bool feature cells of the query region (see the module docstring)."""
        given = [n for n, v in (("mask", mask), ("point", point), ("box", box)) if v is not None]
        if len(given) > 1:
            raise DensekitError(f"give one query region, not {' and '.join(given)}")
        H, W = image.shape[:2]
        _, h, w = feats.shape
        if mask is not None:
            m = np.asarray(mask)
            if m.shape[:2] != (H, W):
                raise DensekitError(f"query mask is {m.shape[1]}x{m.shape[0]}, the image is {W}x{H}")
            if not m.any():
                raise DensekitError("query mask is empty")
            cover = cv2.resize((m > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
            cells = cover >= 0.5
            if not cells.any():  # a region smaller than a cell: take the cell it covers most
                cells = np.zeros((h, w), bool)
                cells[np.unravel_index(int(np.argmax(cover)), cover.shape)] = True
            return cells
        if point is not None:
            x, y = float(point[0]), float(point[1])
            if not (0 <= x < W and 0 <= y < H):
                raise DensekitError(f"point ({x:g}, {y:g}) is outside the {W}x{H} image")
            labels = kmeans_segments(feats, self.k, self.spatial_weight, self.seed)
            return labels == labels[min(int(y * h / H), h - 1), min(int(x * w / W), w - 1)]
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            x0, x1 = max(0.0, min(x0, x1)), min(float(W), max(x0, x1))
            y0, y1 = max(0.0, min(y0, y1)), min(float(H), max(y0, y1))
            if x1 <= x0 or y1 <= y0:
                raise DensekitError(f"box {tuple(box)} does not overlap the {W}x{H} image")
            cy = (np.arange(h) + 0.5) * H / h
            cx = (np.arange(w) + 0.5) * W / w
            cells = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
            if not cells.any():
                cells = np.zeros((h, w), bool)
                cells[min(int((y0 + y1) / 2 * h / H), h - 1), min(int((x0 + x1) / 2 * w / W), w - 1)] = True
            return cells
        return np.ones((h, w), bool)

    def query_region(
        self,
        image: str | os.PathLike[str] | np.ndarray,
        *,
        mask: np.ndarray | None = None,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        k: int = 10,
    ) -> RegionQuery:
        """A region of ``image`` (a mask, a point, a box; none = whole image) and the ``k`` segments most like it.

        The query image goes through the model once: its features give the region (a point's K-means
        segment needs them) and the region's descriptor. Returns a :class:`RegionQuery`: the region on the
        feature grid and on the image's pixels, its descriptor and the hits (best first; ``score`` is the
        inner product of unit descriptors). Bad regions, ``k < 1`` and an empty index are DensekitErrors.
        """
        from densekit.serve.imageio import read_image

        if k < 1:
            raise DensekitError("k must be >= 1")
        if self.n_segments == 0:
            raise DensekitError(f"segment index {self.root} is empty; add images first")
        arr = image if isinstance(image, np.ndarray) else read_image(image)
        feats = self._features(arr)
        cells = self.query_cells(arr, feats, mask, point, box)
        q = region_descriptor(feats, cells)
        scores, ids = self._search_vectors(q[None], k)
        region = _upsample(cells, arr.shape[0], arr.shape[1])
        return RegionQuery(cells=cells, mask=region, descriptor=q, hits=self._hits(scores[0], ids[0]))

    def search(
        self,
        image: str | os.PathLike[str] | np.ndarray,
        mask: np.ndarray | None = None,
        point: tuple[float, float] | None = None,
        box: tuple[float, float, float, float] | None = None,
        k: int = 10,
    ) -> list[Hit]:
        """The hits of :meth:`query_region` alone: up to ``k`` segments most like a region of ``image``."""
        return self.query_region(image, mask=mask, point=point, box=box, k=k).hits

    def _search_vectors(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(q, dtype=np.float32)
        found = self._store.search(q, k)
        if found is not None:
            return found
        ids, x = self._all_descriptors()  # FAISS IVF not trained yet: exact search over SQLite
        s = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), ids[order]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        hits = []
        for s, sid in zip(scores, ids):
            if sid < 0:
                continue
            row = self._conn.execute(
                "SELECT s.image_id, i.path, s.x0, s.y0, s.x1, s.y1, s.rle, i.grid_h, i.grid_w, i.height, i.width "
                "FROM segments s JOIN images i ON i.id = s.image_id WHERE s.id = ?",
                (int(sid),),
            ).fetchone()
            if row is None:
                continue
            image_id, path, x0, y0, x1, y1, rle, gh, gw, H, W = row
            cells = rle_decode(np.frombuffer(rle, dtype=np.uint32), (gh, gw))
            hits.append(Hit(int(image_id), path, int(sid), float(s), (x0, y0, x1, y1), _upsample(cells, H, W)))
        return hits

    def image_segments(self, image_id: int) -> list[tuple[int, np.ndarray]]:
        """(segment id, (H, W) bool mask) of every segment of an indexed image."""
        row = self._conn.execute("SELECT grid_h, grid_w, height, width FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            raise DensekitError(f"no image with id {image_id} in the index")
        gh, gw, H, W = row
        out = []
        for sid, rle in self._conn.execute("SELECT id, rle FROM segments WHERE image_id=? ORDER BY id", (image_id,)):
            out.append((int(sid), _upsample(rle_decode(np.frombuffer(rle, dtype=np.uint32), (gh, gw)), H, W)))
        return out

    def close(self) -> None:
        store, self._store = self._store, None
        lock, self._lock = self._lock, None
        try:
            if store is not None:
                store.close()
        finally:
            self._conn.close()
            if lock is not None:
                lock.release()  # last: milvus-lite's folder lock is released by store.close()

    def __enter__(self) -> SegmentIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FaissStore:
    """The FAISS side of a segment index: generations of ``DIR/segments-<G>.faiss`` (module docstring)."""

    name = "faiss"

    def __init__(self, owner: SegmentIndex, index: Any = None) -> None:
        self.o = owner
        self.index = index
        self._gpu_index: Any = None

    def _file(self, generation: int) -> Path:
        return self.o.root / f"segments-{generation}.faiss"

    def _generation(self) -> int:
        return int(self.o._conn.execute("SELECT value FROM info WHERE key='generation'").fetchone()[0])

    def configure(self) -> None:
        """Apply nprobe (IVF) and efSearch (HNSW) to the in-memory index."""
        faiss = _faiss()
        ps = faiss.ParameterSpace()
        if int(self.o.info["nlist"]):
            ps.set_index_parameter(self.index, "nprobe", int(self.o.nprobe))
        if "HNSW" in self.o.info["faiss_factory"]:
            # ParameterSpace reaches the HNSW inside IDMap (and an HNSW coarse quantizer of an IVF)
            ps.set_index_parameter(self.index, "efSearch", int(self.o.ef_search))
        if _REFINE.search(self.o.info["faiss_factory"]):
            ps.set_index_parameter(self.index, "k_factor_rf", K_FACTOR_RF)
        self._gpu_index = None

    def _expected_ntotal(self) -> int:
        n = self.o.n_segments
        return n if self.index.is_trained else 0

    def load(self, repair: bool = True) -> None:
        """Read the committed generation's file. ``repair`` (the writer lock is held): delete orphans and
        temp files of interrupted writes, and write a rebuilt index; a reader rebuilds in memory only."""
        gen = self._generation()
        if repair:
            self._delete_strays(self._file(gen))
        ok = self._read(gen)
        for _ in range(2 if not repair else 0):  # a writer may have committed (and deleted gen's file) meanwhile
            if ok or self._generation() == gen:
                break
            gen = self._generation()
            ok = self._read(gen)
        if not ok:
            log.warning("segment index %s: FAISS file missing or out of step with SQLite; rebuilding", self.o.root)
            self.rebuild()
            if repair:
                self.o._conn.execute("BEGIN")
                self.commit()
        self.configure()

    def _read(self, gen: int) -> bool:
        """Read generation ``gen``'s file -> whether it is there and holds SQLite's segments."""
        path = self._file(gen)
        if not path.is_file():
            return False
        try:
            self.index = _faiss().read_index(str(path))
        except RuntimeError:
            return False
        return self.index.ntotal == self._expected_ntotal()

    def _delete_strays(self, keep: Path) -> None:
        """Orphans of an interrupted commit and temp files of an interrupted write (module docstring)."""
        root = self.o.root
        for stray in [*root.glob("segments-*.faiss"), *root.glob(".segments-*.faiss.*")]:
            if stray != keep:
                stray.unlink(missing_ok=True)

    def rebuild(self) -> None:
        self.index = _new_index(self.o.dim, self.o.info["faiss_factory"])
        ids, x = self.o._all_descriptors()
        self._maybe_train(x)
        if self.index.is_trained and len(ids):
            self.index.add_with_ids(np.ascontiguousarray(x), ids)
        self.configure()

    def _maybe_train(self, x: np.ndarray) -> None:
        if self.index.is_trained or len(x) < int(self.o.info["train_min"]):
            return
        nlist = int(self.o.info["nlist"]) or 1
        rng = np.random.default_rng(self.o.seed)
        n = min(len(x), 256 * nlist)
        sample = x[np.sort(rng.choice(len(x), n, replace=False))]
        self.index.train(np.ascontiguousarray(sample))

    def write_generation(self, gen: int) -> None:
        with atomic_path(self._file(gen)) as tmp:
            _faiss().write_index(self.index, str(tmp))
            kill_point("write")

    def begin(self) -> None:
        pass

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if self.index.is_trained:
            self.index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        elif self.o.n_segments >= int(self.o.info["train_min"]):  # rows of this transaction are visible
            self.rebuild()
        self._gpu_index = None

    def remove(self, ids: np.ndarray) -> None:
        if self.index.is_trained:
            try:
                self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            except RuntimeError:  # HNSW cannot remove vectors: rebuild from the stored descriptors
                self.rebuild()
        self._gpu_index = None

    def commit(self) -> None:
        """Inside an open SQLite transaction: write the next FAISS generation, then commit."""
        conn = self.o._conn
        old = self._generation()
        new = old + 1
        conn.execute("UPDATE info SET value=? WHERE key='generation'", (str(new),))
        self.write_generation(new)  # step 2: temp file + rename
        kill_point("commit")
        conn.commit()  # step 3
        self._file(old).unlink(missing_ok=True)  # step 4

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.index.is_trained or self.index.ntotal == 0:
            return None
        if self.o.gpu and k > GPU_MAX_K:
            raise DensekitError(f"k = {k} exceeds the FAISS GPU limit of {GPU_MAX_K}")
        return self._search_index().search(q, min(k, self.index.ntotal))

    def _search_index(self) -> Any:
        if self._gpu_index is None:
            self._gpu_index = self.index
            if self.o.gpu:
                # a clone per mutation: GPU indexes are searched, never written (the CPU one is canonical)
                self._gpu_index = _faiss().index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    def count(self) -> int:
        """Vectors in the FAISS index (0 while an IVF index is untrained)."""
        return int(self.index.ntotal)

    def close(self) -> None:
        self._gpu_index = None


# -------------------------------------------------------------------------------------------- helpers
def _new_index(dim: int, factory: str) -> Any:
    """``index_factory`` with the inner-product metric set at construction (faiss #1083)."""
    faiss = _faiss()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        # a view into ``index``, which keeps ownership (downcasting the factory's own return value
        # instead segfaulted here once that temporary wrapper was collected and freed the index)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return index
    if hasattr(ivf, "do_polysemous_training"):
        # the factory turns on polysemous training for 8-bit PQ; it serves Hamming filtering we do not
        # use and took 27 s for 360 training vectors here (0.01 s without)
        ivf.do_polysemous_training = False
    return index


def _upsample(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(cells.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def _nearest_source(dst: int, src: int) -> np.ndarray:
    """(dst,) int64: the source index each output index copies under :func:`_upsample` (asked of cv2
    itself, so it is exactly its INTER_NEAREST rounding); non-decreasing."""
    ramp = np.arange(src, dtype=np.float32)[None, :]
    return cv2.resize(ramp, (dst, 1), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)


def _segment_boxes(
    labels: np.ndarray, n: int, height: int, width: int
) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """Boxes ``(x0, y0, x1, y1)`` (exclusive ends) and areas, in (height, width) pixels, of labels
    0..n-1 of the (h, w) grid ``labels``: what ``_upsample(labels == s, height, width)`` gives, without
    making that full-size mask per segment (it was most of the per-image commit time: 7.9 ms vs
    0.5 ms for a 240 x 432 image with 15 segments)."""
    h, w = labels.shape
    ry, rx = _nearest_source(height, h), _nearest_source(width, w)
    ny, nx = np.bincount(ry, minlength=h), np.bincount(rx, minlength=w)  # pixels per grid row / column
    y0, y1 = np.searchsorted(ry, np.arange(h)), np.searchsorted(ry, np.arange(h), side="right")
    x0, x1 = np.searchsorted(rx, np.arange(w)), np.searchsorted(rx, np.arange(w), side="right")
    live = (ny > 0)[:, None] & (nx > 0)[None, :]  # grid cells that reach at least one pixel
    boxes: list[tuple[int, int, int, int]] = []
    areas = np.zeros(n, dtype=np.int64)
    for s in range(n):
        cells = (labels == s) & live
        rows, cols = np.flatnonzero(cells.any(axis=1)), np.flatnonzero(cells.any(axis=0))
        areas[s] = int(ny @ cells @ nx)
        if areas[s]:
            boxes.append((int(x0[cols[0]]), int(y0[rows[0]]), int(x1[cols[-1]]), int(y1[rows[-1]])))
        else:
            boxes.append((0, 0, 0, 0))
    return boxes, areas


def _train_min(nlist: int | None, uses_pq: bool) -> int:
    if not nlist:
        return 0
    return 39 * nlist + (256 if uses_pq else 0)


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _connect(path: Path, schema: bool = True) -> sqlite3.Connection:
    """SQLite in WAL mode (readers see the last commit while a writer works); ``schema``: create the
    tables (writers only: a reader writes nothing)."""
    # isolation_level=None: transactions are opened explicitly (BEGIN) so the commit order is ours
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    if schema:
        conn.executescript(_SCHEMA)
    return conn

# ------------------------------------------------------------------------------- creation, locking
@dataclass
class _CreateSpec:
    """The settings of a new index (:meth:`SegmentIndex.create`'s keywords)."""

    factory: str = "Flat"
    segments_per_image: int = 15
    spatial_weight: float = 0.0
    backend: str = "faiss"
    uri: str | None = None
    token: str | None = None
    collection: str | None = None
    nprobe: int = 16
    ef_search: int = DEFAULT_EF_SEARCH
    max_side: int = 512
    seed: int = 0
    threads: int | None = None
    gpu: bool = False

    def check(self) -> dict[str, str]:
        """Validate (DensekitError) -> the backend's extra info entries; writes nothing."""
        if self.segments_per_image < 1:
            raise DensekitError("segments_per_image must be >= 1")
        if self.backend not in BACKENDS:
            raise DensekitError(f"unknown backend {self.backend!r}; use {' or '.join(BACKENDS)}")
        if self.backend == "faiss" and (self.uri is not None or self.collection is not None):
            raise DensekitError("uri and collection apply to the milvus backend")
        if self.ef_search < 1 or self.nprobe < 1:
            raise DensekitError("ef_search and nprobe must be >= 1")
        _parse_factory(self.factory)
        if self.backend != "milvus":
            return {}
        from densekit.retrieval.milvus_store import MilvusStore

        return MilvusStore.info_for(self.factory, self.uri, self.collection)

    def new_faiss_index(self, dim: int) -> Any:
        try:
            return _new_index(dim, _parse_factory(self.factory)[0])
        except RuntimeError as exc:
            detail = re.sub(r"^.*?\.cpp:\d+:\s*", "", _first_line(exc))
            raise DensekitError(f"faiss cannot build factory {self.factory!r}: {detail}") from None

    def info(self, meta: Any, model_spec: str, extra: dict[str, str]) -> dict[str, str]:
        """The info rows of the new index (``meta``: the extractor's ModelMeta)."""
        fstring, nlist, uses_pq = _parse_factory(self.factory)
        return {
            "schema": SCHEMA_VERSION,
            "backend": self.backend,
            "model": model_spec,
            "model_name": meta.name,
            "dim": str(meta.dim),
            "stride": str(meta.stride),
            "model_meta": meta.to_json(),
            "factory": self.factory,
            "faiss_factory": fstring,
            "nlist": str(nlist or 0),
            "train_min": str(_train_min(nlist, uses_pq)),
            "nprobe": str(self.nprobe),
            "ef_search": str(int(self.ef_search)),
            "segments_per_image": str(self.segments_per_image),
            "spatial_weight": str(float(self.spatial_weight)),
            "max_side": str(self.max_side),
            "seed": str(self.seed),
            "generation": "0",
            **extra,
        }


class WriterLock:
    """The advisory writer lock of an index folder: ``DIR/.writer.lock``, held with ``flock``, holding
    the holder's pid (for the message a second writer gets).

    The kernel drops an flock when its holder dies (kill -9 included), so a lock file left by a dead
    process is taken over as it stands; no pid liveness guessing. After locking, the file is checked to be
    the one at the path (the creator of a folder that fails removes it, under the lock), else retried.
    Without ``fcntl`` (Windows) there is no lock.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self._fh: Any = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it -> whether it is held now."""
        if self._fh is not None or fcntl is None:
            return self._fh is not None or fcntl is None
        try:
            fh = open(self.path, "a+", encoding="ascii")
        except OSError:  # a folder that cannot be written (a read-only copy): no writer can start either
            return False
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fh.fileno()).st_ino != os.stat(self.path).st_ino:
                raise OSError("lock file replaced")
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return True

    def acquire(self, wait_s: float) -> None:
        """Take the lock, polling for up to ``wait_s`` seconds; then a one-line DensekitError."""
        deadline = time.monotonic() + max(0.0, float(wait_s))
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise DensekitError(
                    f"{self.path.parent} is being written by another process ({self._holder()}); "
                    f"waited {wait_s:g} s, try again when it has finished"
                )
            time.sleep(0.1)

    def _holder(self) -> str:
        try:
            pid = self.path.read_text(encoding="ascii").strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "pid unknown"

    def remove(self) -> None:
        """Delete the lock file (only while holding it; waiters see the inode change and retry)."""
        if self._fh is not None:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the descriptor drops the flock


def _required_info(backend: str) -> set[str]:
    keys = {"schema", "model", "model_name", "dim", "segments_per_image", "spatial_weight", "max_side", "seed",
            "nprobe", "faiss_factory", "nlist", "train_min", "generation"}
    return keys | ({"milvus_collection", "milvus_index"} if backend == "milvus" else set())


def _committed_info(conn: sqlite3.Connection) -> dict[str, str]:
    """The info rows ({} when the table is not there yet: a creation cut short)."""
    try:
        return dict(conn.execute("SELECT key, value FROM info").fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise


def _is_whole(info: dict[str, str]) -> bool:
    return _required_info(info.get("backend", "faiss")) <= info.keys()


def _index_state(root: Path) -> str:
    """"none", "partial" (an interrupted creation: info incomplete, no images) or "whole" (any schema)."""
    db = root / DB_NAME
    if not db.is_file():
        return "none"
    try:
        conn = _connect(db, schema=False)
        try:
            info = _committed_info(conn)
            images = 0 if _is_whole(info) else _count_rows(conn, "images")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise DensekitError(f"{db} is not a readable segment index: {_first_line(exc)}") from None
    if _is_whole(info):
        return "whole"
    if images:
        raise DensekitError(f"{db}: its info is incomplete but it holds {images} images; not touching it")
    return "partial"


def _count_rows(conn: sqlite3.Connection, table: str) -> int:
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _clear_partial(root: Path, quiet: bool = False) -> None:
    """Delete what an interrupted (or failed) creation left: SQLite files, FAISS files, milvus-lite's folder.

    A collection on a Milvus server named by such a creation is left there (its random name was never
    committed, so nothing else refers to it)."""
    import shutil

    if not quiet:
        log.warning("segment index %s: clearing what an interrupted creation left", root)
    for suffix in ("", "-wal", "-shm", "-journal"):
        (root / (DB_NAME + suffix)).unlink(missing_ok=True)
    for f in [*root.glob("segments-*.faiss"), *root.glob(".segments-*.faiss.*")]:
        f.unlink(missing_ok=True)
    shutil.rmtree(root / "milvus.db", ignore_errors=True)


def _check_info(root: Path, info: dict[str, str], uri: str | None) -> str:
    """A whole index of a known schema and backend -> the backend; else a one-line DensekitError."""
    db = root / DB_NAME
    if not _is_whole(info):
        raise DensekitError(
            f"{root}: the index's creation was interrupted or is still running; "
            "`densekit index build` on it starts it afresh"
        )
    if info.get("schema") != SCHEMA_VERSION:
        raise DensekitError(f"{db}: unknown schema version {info.get('schema')!r}")
    backend = info.get("backend", "faiss")
    if backend not in BACKENDS:
        raise DensekitError(f"{db}: unknown backend {backend!r}")
    if backend == "faiss" and uri is not None:
        raise DensekitError(f"{root} uses the faiss backend; a Milvus uri does not apply")
    return backend


def _matching_extractor(root: Path, info: dict[str, str], model: str | Any | None) -> Any:
    """The extractor of an index: ``model`` or the stored one; a different model is a DensekitError."""
    if model is None:
        if not info["model"]:
            raise DensekitError(f"{root} was built with an in-memory extractor; pass model= to open it")
        model = info["model"]
    extractor, _ = _make_extractor(model)
    meta = extractor.meta
    if meta.name != info["model_name"] or int(meta.dim) != int(info["dim"]):
        raise DensekitError(
            f"index {root} was built with model {info['model_name']!r} (dim {info['dim']}), "
            f"not {meta.name!r} (dim {meta.dim})"
        )
    return extractor



def _make_extractor(model: str | Any) -> tuple[Any, str | None]:
    """-> (extractor, spec to store). Strings are backbone names or checkpoint paths."""
    if isinstance(model, (str, os.PathLike)):
        from densekit.serve.extractor import FeatureExtractor

        spec = str(model)
        if Path(spec).suffix and Path(spec).exists():
            spec = str(Path(spec).resolve())
        return FeatureExtractor(spec), spec
    if not hasattr(model, "meta"):
        raise DensekitError("model must be a backbone name, a checkpoint path or a FeatureExtractor")
    return model, None


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder`` (recursive, natural order); DensekitError if none or missing."""
    from densekit.serve.imageio import natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise DensekitError(f"{folder} is not a folder")
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DensekitError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return sorted(files, key=lambda p: natural_key(str(p.relative_to(folder))))
