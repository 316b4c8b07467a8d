"""Benchmark: segment retrieval with FAISS (Flat, HNSW, IVF-Flat/SQ/PQ) and the ingest cost of segmenting.

Three parts, each a table on stdout (progress lines on stderr):

1. **Synthetic** (``--n`` x ``--dim``, default 1,000,000 x 128): a seeded mixture of ``--clusters``
   Gaussian clusters on the unit sphere. Each cluster has a unit centre, a random ``--subspace``-dim
   principal subspace (spread ``--spread``) and isotropic noise (``--noise``); every vector is
   L2-normalised and searched by inner product (cosine), as :mod:`densekit.retrieval.segment_index`
   does. Real descriptors have a low intrinsic dimension; the per-cluster subspace gives the synthetic
   set one too (i.i.d. isotropic 128-d noise is the worst case for every approximate index and would
   say little about real data). Cluster weights are Dirichlet(2)-distributed, so lists are unbalanced.
   Queries are fresh draws from the same mixture (a separate random stream), so none is in the base.
2. **Real** descriptors: segment descriptors of ``densekit data sample`` frames (or ``--images DIR``),
   made by :class:`~densekit.retrieval.segment_index.SegmentIndex` (K-means segments of the model's
   dense features, K = 15, mean feature per segment, L2-normalised). Every ``--holdout``-th frame of
   each sequence is held out: its segments are the queries, the other frames' segments the base.
3. **Ingest**: ``SegmentIndex.add_images`` on those images (Flat index) with its time broken down per
   stage: decode, feature extraction (resize + forward), K-means + descriptors, and the commit (SQLite
   rows with box, area and RLE mask; FAISS add; the atomic index file write; SQLite COMMIT). Overhead =
   everything beyond decode + extraction, over decode + extraction, in wall and in process CPU time
   (CPU time is the steadier figure on a shared machine). ``--extract-pass`` also times extraction
   alone in a separate pass over the same images, as a cross-check.

Columns: build s = train + add, as if each index were built alone: the IVF rows share one coarse
k-means and one assignment of the base vectors to lists (``faiss.contrib.ivf_tools.add_preassigned``),
and the time of both is added to every IVF row; ``X,RFlat`` wraps X's populated index
(``IndexRefineFlat(base, xb)``), so its time is X's plus the copy. B/vec =
``len(faiss.serialize_index(index)) / n``. QPS = queries / best wall time of one batched ``search`` of
all queries (best of 3 runs, or fewer if they take over 2 s, and of ``--min-time`` s), with
``faiss.omp_set_num_threads(--threads)``. recall@10 = |approximate top-10 ∩ exact top-10| / 10,
averaged over queries; exact = ``IndexFlatIP``
(the Flat row). ``x exact`` = QPS / exact QPS, where exact search is timed first and again at the end
of the table and the faster of the two is used (a long run on a shared machine sees the load drift;
the ``load`` column is the 1-minute load average when each row was timed).

Targets (issue 5): a configuration with recall@10 >= 0.95 at >= 20x the queries/s of exact search on
2 cores (marked ``<= target`` in the table); segmenting + describing + adding adds at most 20% to
feature extraction time.

Index choices follow the FAISS wiki "Guidelines to choose an index": nlist ~ 4 sqrt(N) (rounded to a
power of two, at most N / 39 so each list gets FAISS's 39 training points), trained on a seeded sample
of max(``--train-per-list`` x nlist, 65,536) base vectors (the wiki's 30..256 x nlist range; 65,536 =
the 256 x 256 vectors an 8-bit PQ trains on); PQ with dim / 4 bytes (8 bits each); HNSW32
with the default efConstruction (40). The 8-bit PQ factory's polysemous training is turned off, as
SegmentIndex does (it serves Hamming filtering we do not use and costs minutes).

Run:  python benchmarks/retrieval.py                  (~8.5 CPU-minutes; 22 min wall on 2 cores shared
                                                       with other jobs, mostly the HNSW build; 3 GB RAM)
      python benchmarks/retrieval.py --n 20000        (a quick look: ~70 CPU-seconds)
      python benchmarks/retrieval.py --skip-real --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Before any OpenMP runtime starts (numpy's BLAS, faiss, torch): idle OpenMP threads sleep instead of
# spinning. On a shared, oversubscribed machine spinning threads steal the cores the working ones need
# (faiss #422, #1035); measured here at load ~15 on 2 cores, PQ32 training of 20k vectors took 259 s
# with 2 spinning threads and 139 s with PASSIVE. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    wall, cpu = time.perf_counter() - _T0, time.process_time()
    print(f"[retrieval-bench {wall:7.1f}s wall {cpu:7.1f}s cpu] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ synthetic data
@dataclass
class Mixture:
    """A Gaussian mixture on the unit sphere: (C, D) unit centres, (C, D, r) orthonormal subspaces."""

    centres: np.ndarray
    bases: np.ndarray
    weights: np.ndarray
    spread: float
    noise: float


def make_mixture(dim: int, clusters: int, subspace: int, spread: float, noise: float, seed: int) -> Mixture:
    """Seeded mixture: random unit centres, random orthonormal ``subspace``-dim bases, Dirichlet(2) weights."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    r = min(subspace, dim)
    bases = np.linalg.qr(rng.standard_normal((clusters, dim, r)))[0].astype(np.float32)  # (C, D, r)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    return Mixture(centres, bases, weights, float(spread), float(noise))


def sample_mixture(mix: Mixture, n: int, seed: int) -> np.ndarray:
    """(n, D) float32 unit vectors drawn from ``mix``; built in place, one cluster at a time."""
    rng = np.random.default_rng(seed)
    c, d = mix.centres.shape
    r = mix.bases.shape[2]
    labels = rng.choice(c, size=n, p=mix.weights)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=c)
    out = np.empty((n, d), dtype=np.float32)
    start = 0
    for k in range(c):
        m = int(counts[k])
        if not m:
            continue
        rows = order[start : start + m]
        start += m
        z = rng.standard_normal((m, r), dtype=np.float32) * np.float32(mix.spread / math.sqrt(r))
        e = rng.standard_normal((m, d), dtype=np.float32) * np.float32(mix.noise / math.sqrt(d))
        out[rows] = mix.centres[k] + z @ mix.bases[k].T + e
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


# ------------------------------------------------------------------------------------- index suite
@dataclass
class Row:
    dataset: str
    factory: str
    params: str
    build_s: float
    bytes_per_vector: float
    qps: float
    speedup: float
    recall10: float
    meets_target: bool
    load1: float  # 1-minute load average when measured
    note: str = ""


@dataclass
class Built:
    index: Any
    build_s: float
    bytes_per_vector: float
    note: str = ""
    keep: Any = None  # objects the index points into (the base of a refine index)
    serialize_s: float = 0.0  # faiss.serialize_index time: what each SegmentIndex commit pays to write it


def _pow2_near(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1.0))))


def choose_nlist(n: int) -> int:
    """nlist ~ 4 sqrt(n) as a power of two, at most n / 39 (FAISS wiki guidelines)."""
    nlist = _pow2_near(4 * math.sqrt(n))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def suite(dim: int, n: int) -> list[tuple[str, list[str]]]:
    """(factory, parameter sweep) pairs for ``n`` vectors of ``dim``; '' = no parameter.

    A ``X,RFlat`` entry must follow ``X``: it wraps X's populated index (see :func:`run_suite`).
    """
    nlist = choose_nlist(n)
    m = dim // 4 if dim % 4 == 0 else dim  # PQ with dim/4 bytes (4 dims per 8-bit sub-quantizer)
    nps = [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= nlist]
    out = [
        ("Flat", [""]),
        ("HNSW32", [f"efSearch={e}" for e in (16, 32, 64, 128, 256)]),
        (f"IVF{nlist},Flat", [f"nprobe={p}" for p in nps if p <= 64]),
        (f"IVF{nlist},SQ8", [f"nprobe={p}" for p in nps if 4 <= p <= 64 or p == nlist]),
    ]
    if n >= 256:  # 8-bit PQ needs at least 256 training vectors
        out += [
            (f"IVF{nlist},PQ{m}", [f"nprobe={p}" for p in nps if 8 <= p <= 64 or p == nlist]),
            (f"IVF{nlist},PQ{m},RFlat",
             [f"nprobe={p},k_factor_rf={kf}" for p in nps if 4 <= p <= 64 or p == nlist for kf in (2, 4)]),
        ]
    return out


def _quiet_small_training(index: Any, n_train: int) -> str:
    """Lower FAISS's min points per centroid where the training set is small (one note instead of
    a warning line per sub-quantizer); returns that note ('' when nothing was lowered)."""
    import faiss

    notes = []
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return ""
    if n_train < 39 * ivf.nlist:
        ivf.cp.min_points_per_centroid = 1
        notes.append(f"IVF: {n_train} training vectors < 39 x nlist")
    ivf = faiss.downcast_index(ivf)
    pq = getattr(ivf, "pq", None)
    if pq is not None and n_train < 39 * pq.ksub:
        pq.cp.min_points_per_centroid = 1
        notes.append(f"PQ: {n_train} training vectors < 39 x {pq.ksub}")
    return "; ".join(notes)


def _add_chunked(name: str, add: Any, n: int, chunk: int) -> None:
    for s in range(0, n, chunk):
        add(s, min(s + chunk, n))
        if n > chunk:
            _progress(f"  {name}: added {min(s + chunk, n):,}/{n:,}")


def _serialized(index: Any, n: int) -> tuple[float, float]:
    """-> (bytes per vector, seconds) of ``faiss.serialize_index``."""
    import faiss

    t0 = time.perf_counter()
    size = len(faiss.serialize_index(index))
    return size / n, time.perf_counter() - t0


def build_plain(factory: str, xb: np.ndarray, chunk: int) -> Built:
    """Flat / HNSW: no training; add ``xb``."""
    import faiss

    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    _add_chunked(factory, lambda s, e: index.add(xb[s:e]), len(xb), chunk)
    build_s = time.perf_counter() - t0
    bpv, ser = _serialized(index, len(xb))
    return Built(index, build_s, bpv, serialize_s=ser)


@dataclass
class Coarse:
    """The IVF coarse quantizer shared by every IVF row: centroids, each base vector's list, seconds."""

    centroids: np.ndarray
    assign: np.ndarray
    kmeans_s: float
    assign_s: float


def train_coarse(nlist: int, xt: np.ndarray, xb: np.ndarray, chunk: int) -> Coarse:
    """FAISS's own IVF coarse k-means (spherical for inner product) on ``xt``, then the list of each
    vector of ``xb`` (what ``IndexIVF.add`` computes) through the same flat inner-product quantizer."""
    import faiss

    index = faiss.index_factory(xt.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    _quiet_small_training(index, len(xt))
    t0 = time.perf_counter()
    index.train(xt)
    kmeans_s = time.perf_counter() - t0
    quantizer = faiss.extract_index_ivf(index).quantizer
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    t0 = time.perf_counter()
    assign = np.empty(len(xb), dtype=np.int64)
    for s in range(0, len(xb), chunk):
        assign[s : s + chunk] = quantizer.search(xb[s : s + chunk], 1)[1][:, 0]
    return Coarse(centroids, assign, kmeans_s, time.perf_counter() - t0)


def build_ivf(factory: str, xb: np.ndarray, xt: np.ndarray, coarse: Coarse, chunk: int) -> Built:
    """An IVF index from the shared coarse quantizer: train its encoder on ``xt``, add ``xb`` to the
    precomputed lists. ``build_s`` = coarse k-means + assignment + own train + add (standalone cost)."""
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # see the module docstring
    note = _quiet_small_training(index, len(xt))
    t0 = time.perf_counter()
    ivf.quantizer.add(coarse.centroids)  # a quantizer holding nlist centroids skips the coarse k-means
    index.train(xt)
    _add_chunked(factory, lambda s, e: add_preassigned(ivf, xb[s:e], coarse.assign[s:e]), len(xb), chunk)
    build_s = time.perf_counter() - t0 + coarse.kmeans_s + coarse.assign_s
    bpv, ser = _serialized(index, len(xb))
    return Built(index, build_s, bpv, note, serialize_s=ser)


def build_refine(base: Built, xb: np.ndarray) -> Built:
    """``X,RFlat`` from X's populated index: IndexRefineFlat's (base, xb) constructor copies ``xb``
    into the exact re-ranking store, which is what adding to ``X,RFlat`` does besides adding to X."""
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexRefineFlat(base.index, faiss.swig_ptr(np.ascontiguousarray(xb)))
    build_s = base.build_s + time.perf_counter() - t0
    bpv, ser = _serialized(index, len(xb))
    return Built(index, build_s, bpv, base.note, keep=base, serialize_s=ser)


def timed_search(index: Any, xq: np.ndarray, k: int, min_time: float) -> tuple[float, np.ndarray]:
    """-> (best seconds of one batched search of all queries, (nq, k) ids).

    Best of at least 3 runs (while they fit in 2 s) and of as many as fit in ``min_time``: the best
    run is the one least disturbed by other processes on a shared machine.
    """
    best, spent, runs = math.inf, 0.0, 0
    ids = None
    while runs < 1 or (runs < 3 and spent < 2.0) or (spent < min_time and runs < 50):
        t0 = time.perf_counter()
        _, ids = index.search(xq, k)
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best, ids


def recall_at(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    """|ids[:, :k] ∩ gt[:, :k]| / k, averaged over queries (-1 = no result, never a hit)."""
    hits = sum(len(np.intersect1d(a[:k][a[:k] >= 0], b[:k])) for a, b in zip(ids, gt))
    return hits / (k * len(gt))


def run_suite(
    name: str, xb: np.ndarray, xq: np.ndarray, args: argparse.Namespace, k: int = 10
) -> tuple[list[Row], dict[str, Any]]:
    """Build every index of :func:`suite` on ``xb`` and measure it against exact search with ``xq``."""
    import faiss

    n, dim = xb.shape
    rows: list[Row] = []
    nlist = choose_nlist(n)
    # the PQ trains on at most 256 x 256 vectors (FAISS max_points_per_centroid): give it that many
    n_train = min(n, max(args.train_per_list * nlist, 65_536))
    xt = xb[np.sort(np.random.default_rng(args.seed + 7).choice(n, n_train, replace=False))]
    coarse: Coarse | None = None
    extra: dict[str, Any] = {"n": n, "dim": dim, "queries": len(xq), "nlist": nlist, "train": n_train}
    _progress(f"{name}: exact search (IndexFlatIP) for the ground truth")
    built: dict[str, Built] = {}
    refined_bases = {f[: -len(",RFlat")] for f, _ in suite(dim, n) if f.endswith(",RFlat")}
    exact_qps, gt = math.nan, None
    for factory, sweep in suite(dim, n):
        if args.only and factory != "Flat" and not any(re.search(p, factory) for p in args.only):
            continue
        if factory.startswith("IVF") and coarse is None:
            _progress(f"{name}: coarse k-means, nlist={nlist} on {n_train:,} vectors, and list assignment")
            coarse = train_coarse(nlist, xt, xb, args.chunk)
            extra["coarse_kmeans_s"], extra["coarse_assign_s"] = coarse.kmeans_s, coarse.assign_s
            _progress(f"{name}: coarse k-means {coarse.kmeans_s:.1f}s, assignment {coarse.assign_s:.1f}s")
        _progress(f"{name}: building {factory}")
        if factory.endswith(",RFlat"):
            base_name = factory[: -len(",RFlat")]
            if base_name not in built:
                continue
            this = build_refine(built[base_name], xb)
        elif factory.startswith("IVF"):
            assert coarse is not None
            this = build_ivf(factory, xb, xt, coarse, args.chunk)
        else:
            this = build_plain(factory, xb, args.chunk)
        built[factory] = this
        _progress(f"{name}: {factory} built in {this.build_s:.1f}s, {this.bytes_per_vector:.1f} B/vector "
                  f"(serialized in {this.serialize_s:.2f}s); searching")
        extra.setdefault("serialize_s", {})[factory] = this.serialize_s
        ps = faiss.ParameterSpace()
        for params in sweep:
            if params:
                ps.set_index_parameters(this.index, params)
            seconds, ids = timed_search(this.index, xq, k, args.min_time)
            qps = len(xq) / seconds
            if factory == "Flat":
                gt, exact_qps = ids, qps
            assert gt is not None
            rec = recall_at(ids, gt, k)
            speed = qps / exact_qps
            ok = rec >= 0.95 and speed >= 20
            rows.append(Row(name, factory, params or "-", this.build_s, this.bytes_per_vector, qps, speed, rec, ok,
                            os.getloadavg()[0], this.note))
            _progress(f"{name}: {factory} {params or '-'}: {qps:,.0f} q/s, recall@10 {rec:.3f}")
        # keep an index only while a refine row may still wrap it (memory: 1M x 128 floats = 512 MB)
        if factory.endswith(",RFlat"):
            built.clear()
        elif factory not in refined_bases:
            built.pop(factory)
        del this
    if gt is not None and exact_qps == exact_qps:
        # The load of a shared machine drifts over a long run: time exact search again at the end and
        # take the faster of the two as the baseline (the conservative choice for the 20x target).
        _progress(f"{name}: exact search again (the load may have changed since the first)")
        flat = faiss.IndexFlatIP(dim)
        flat.add(xb)
        again = len(xq) / timed_search(flat, xq, k, args.min_time)[0]
        del flat
        extra["exact_qps_start"], extra["exact_qps_end"] = exact_qps, again
        base = max(exact_qps, again)
        for r in rows:
            r.speedup = r.qps / base
            r.meets_target = r.recall10 >= 0.95 and r.speedup >= 20
        extra.update(_difficulty(xb, xq, gt))
    return rows, extra


def _difficulty(xb: np.ndarray, xq: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Mean cosine of each query to its 1st and 10th true neighbour and to random base vectors."""
    rng = np.random.default_rng(0)
    sims = np.einsum("qd,qkd->qk", xq, xb[gt[:, [0, -1]]])
    rand = xq @ xb[rng.choice(len(xb), min(256, len(xb)), replace=False)].T
    return {"cos_nn1": float(sims[:, 0].mean()), "cos_nn10": float(sims[:, 1].mean()), "cos_random": float(rand.mean())}


def print_table(title: str, rows: list[Row], extra: dict[str, Any], threads: int) -> None:
    print()
    print(f"{title}: N={extra['n']:,} D={extra['dim']} queries={extra['queries']:,} threads={threads} "
          f"nlist={extra['nlist']} (trained on {extra['train']:,}"
          + (f", coarse k-means {extra['coarse_kmeans_s']:.1f}s" if "coarse_kmeans_s" in extra else "") + ")")
    if "exact_qps_end" in extra:
        print(f"  exact search (Flat): {extra['exact_qps_start']:,.0f} q/s first, {extra['exact_qps_end']:,.0f} q/s "
              "at the end; x exact uses the faster")
    if "cos_nn1" in extra:
        print(f"  difficulty: mean cosine to 1st / 10th true neighbour {extra['cos_nn1']:.3f} / "
              f"{extra['cos_nn10']:.3f}, to a random base vector {extra['cos_random']:.3f}")
    hdr = (f"  {'index':<26}{'params':<24}{'build s':>9}{'B/vec':>8}{'QPS':>11}{'x exact':>9}{'R@10':>7}"
           f"{'load':>6}  target")
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    for r in rows:
        mark = "<= target" if r.meets_target else ""
        print(f"  {r.factory:<26}{r.params:<24}{r.build_s:>9.1f}{r.bytes_per_vector:>8.1f}{r.qps:>11,.0f}"
              f"{r.speedup:>9.1f}{r.recall10:>7.3f}{r.load1:>6.1f}  {mark}")
    notes = sorted({r.note for r in rows if r.note})
    for n in notes:
        print(f"  note: {n}")
    best = [r for r in rows if r.meets_target]
    if extra["n"] < 100_000:
        print(f"  (at N={extra['n']:,} exact search is already cheap, so few settings can be 20x faster; the "
              "issue's target is about large collections such as the 1M synthetic set)")
    if best:
        top = max(best, key=lambda r: r.qps)
        print(f"  target (R@10 >= 0.95 at >= 20x exact QPS): MET by {len(best)} setting(s); fastest "
              f"{top.factory} {top.params}: {top.qps:,.0f} q/s = {top.speedup:.0f}x, R@10 {top.recall10:.3f}")
    else:
        print("  target (R@10 >= 0.95 at >= 20x exact QPS): not met by any setting")


# ------------------------------------------------------------------------------------ real + ingest
def _sample_images(args: argparse.Namespace, tmp: Path) -> tuple[list[Path], Path]:
    from densekit.retrieval.segment_index import list_images

    if args.images:
        root = Path(args.images)
    else:
        from densekit.serve.sample import make_sample

        _progress("real: writing the sample dataset (densekit data sample)")
        root = make_sample(tmp / "sample") / "JPEGImages"
    return list_images(root), root


def _clock() -> np.ndarray:
    """(wall, process CPU) seconds. CPU time counts every thread of this process and no one else's, so
    on a shared machine it is the steadier measure of how much work a stage is."""
    return np.array([time.perf_counter(), time.process_time()])


_STAGES = {  # SegmentIndex method -> timer (private methods: checked below, so a rename fails loudly)
    "_features": "features",
    "_prepare": "prepare",
    "_commit_images": "commit",
}


def _timed_index_class() -> type:
    """SegmentIndex with (wall, CPU) accumulators around its per-image stages and commit steps."""
    from densekit.retrieval.segment_index import SegmentIndex

    missing = [m for m in (*_STAGES, "_mutate") if not hasattr(SegmentIndex, m)]
    if missing:
        raise RuntimeError(f"SegmentIndex has no {', '.join(missing)}; update benchmarks/retrieval.py")

    def tick(self: Any, key: str, t0: np.ndarray) -> None:
        self.timers[key] = self.timers.get(key, 0.0) + _clock() - t0

    def wrap(self: Any, key: str, fn: Any) -> Any:
        def inner(*a: Any, **kw: Any) -> Any:
            t0 = _clock()
            try:
                return fn(*a, **kw)
            finally:
                self.tick(key, t0)

        return inner

    def timed(method: str, key: str) -> Any:
        def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
            return wrap(self, key, getattr(super(cls, self), method))(*a, **kw)

        return wrapper

    def _mutate(self: Any, write_rows: Any, update_store: Any) -> None:
        store = getattr(self, "_store", None)
        if store is not None and hasattr(store, "write_generation") and not hasattr(store, "_timed"):
            store.write_generation = wrap(self, "faiss_write", store.write_generation)
            store._timed = True
        super(cls, self)._mutate(wrap(self, "sqlite_rows", write_rows), wrap(self, "store_add", update_store))

    body = {m: timed(m, k) for m, k in _STAGES.items()}
    body.update(tick=tick, _mutate=_mutate)
    cls = type("TimedSegmentIndex", (SegmentIndex,), body)
    return cls


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    """Ingest timing on the sample images, then the index table on their segment descriptors."""
    import cv2
    import torch

    from densekit.serve.extractor import FeatureExtractor
    from densekit.serve.imageio import read_image

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp_s:
        tmp = Path(tmp_s)
        paths, root = _sample_images(args, tmp)
        _progress(f"real: {len(paths)} images under {root}; loading {args.model}")
        extractor = FeatureExtractor(args.model)
        max_side = 512  # SegmentIndex.create's default

        def extract(path: Path) -> np.ndarray:  # what SegmentIndex._features does, plus the decode
            image = read_image(path)
            h, w = image.shape[:2]
            scale = min(1.0, max_side / max(h, w))
            if scale < 1.0:
                image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            return extractor(image)

        extract(paths[0])  # warm-up: lazy initialisation and first-call allocations
        extract_alone = None
        if args.extract_pass:
            _progress("real: feature extraction alone (separate pass)")
            t0 = _clock()
            for i, p in enumerate(paths):
                extract(p)
                if (i + 1) % 48 == 0:
                    _progress(f"  extracted {i + 1}/{len(paths)}")
            extract_alone = _clock() - t0

        _progress("real: SegmentIndex.add_images (Flat)")
        index = _timed_index_class().create(
            tmp / "index", extractor, factory="Flat", max_side=max_side, threads=args.threads
        )
        index.timers = {}
        done = [0]

        def progress(_item: str, _added: bool) -> None:
            done[0] += 1
            if done[0] % 48 == 0:
                _progress(f"  indexed {done[0]}/{len(paths)}")

        t0 = _clock()
        report = index.add_images([str(p) for p in paths], progress=progress)
        add_total = _clock() - t0
        tm = {k: np.asarray(v) for k, v in index.timers.items()}
        index.close()
        if report.skipped:
            _progress(f"real: {len(report.skipped)} images skipped: {report.skipped[:3]}")
        zero = np.zeros(2)
        features = tm.get("features", zero)
        segment = tm.get("prepare", zero) - features
        commit = tm.get("commit", zero)
        decode = add_total - tm.get("prepare", zero) - commit
        extraction = features + decode
        stages = {
            "decode_and_bookkeeping": decode,
            "features": features,
            "kmeans_and_descriptors": segment,
            "commit": commit,
            "commit.sqlite_rows": tm.get("sqlite_rows", zero),
            "commit.faiss_add": tm.get("store_add", zero),
            "commit.faiss_write": tm.get("faiss_write", zero),
            "commit.sqlite_commit": commit - tm.get("sqlite_rows", zero) - tm.get("store_add", zero)
            - tm.get("faiss_write", zero),
        }
        overhead = 100 * (segment + commit) / extraction
        out["ingest"] = {
            "images": len(paths),
            "segments": report.segments,
            "commits": int(math.ceil(len(paths) / 32)),
            "extract_alone": None if extract_alone is None else extract_alone.tolist(),
            "add_images": add_total.tolist(),
            "stages": {k: v.tolist() for k, v in stages.items()},
            "overhead_pct": overhead.tolist(),
            "segment_describe_pct": (100 * segment / extraction).tolist(),
            "overhead_vs_extract_alone_pct": None if extract_alone is None
            else (100 * (add_total - extract_alone) / extract_alone).tolist(),
            "note": "pairs are [wall seconds, process CPU seconds]",
        }

        # Segment descriptors as stored (meta.sqlite is the documented source of truth).
        conn = sqlite3.connect(str(tmp / "index" / "meta.sqlite"))
        dim = int(conn.execute("SELECT value FROM info WHERE key='dim'").fetchone()[0])
        image_path = dict(conn.execute("SELECT id, path FROM images"))
        segs = conn.execute("SELECT image_id, descriptor FROM segments ORDER BY id").fetchall()
        conn.close()
    frame_of = {i: _frame_number(p) for i, p in image_path.items()}
    query = np.array([frame_of[i] % args.holdout == args.holdout - 1 for i, _ in segs])
    x = np.frombuffer(b"".join(d for _, d in segs), dtype=np.float32).reshape(len(segs), dim)
    xb, xq = np.ascontiguousarray(x[~query]), np.ascontiguousarray(x[query])
    _progress(f"real: {len(xb)} base / {len(xq)} query descriptors (every {args.holdout}th frame held out)")
    rows, extra = run_suite("real", xb, xq, args)
    out["real_rows"], out["real_extra"] = rows, extra
    return out


def _frame_number(path: str) -> int:
    digits = re.findall(r"\d+", Path(path).stem)
    return int(digits[-1]) if digits else 0


def print_ingest(ing: dict[str, Any], model: str, threads: int) -> None:
    print()
    print(f"ingest: {ing['images']} images -> {ing['segments']} segments, model {model}, Flat index, "
          f"{threads} threads (torch and faiss), {ing['commits']} commits of <= 32 images")
    print(f"  {'stage':<66}{'wall s':>9}{'CPU s':>9}")

    def line(label: str, pair: list[float]) -> None:
        print(f"  {label:<66}{pair[0]:>9.2f}{pair[1]:>9.2f}")

    if ing["extract_alone"]:
        line("feature extraction alone, separate pass (decode+resize+forward)", ing["extract_alone"])
    line("SegmentIndex.add_images, total", ing["add_images"])
    st = ing["stages"]
    line("  decode + bookkeeping", st["decode_and_bookkeeping"])
    line("  features (resize + forward)", st["features"])
    line("  K-means segments + descriptors", st["kmeans_and_descriptors"])
    line("  commit", st["commit"])
    line("    SQLite rows (box, area, RLE mask, INSERT)", st["commit.sqlite_rows"])
    line("    FAISS add", st["commit.faiss_add"])
    line("    FAISS index file write (atomic)", st["commit.faiss_write"])
    line("    SQLite COMMIT (synchronous=FULL), old file unlink, rest", st["commit.sqlite_commit"])
    wall, cpu = ing["overhead_pct"]
    ok = cpu <= 20
    print(f"  overhead of segmenting + describing + adding over extraction (same run): {cpu:.1f}% CPU, "
          f"{wall:.1f}% wall "
          f"(K-means + descriptors alone: {ing['segment_describe_pct'][1]:.1f}% CPU)")
    if ing["overhead_vs_extract_alone_pct"]:
        print(f"  against the separate extraction pass: {ing['overhead_vs_extract_alone_pct'][1]:.1f}% CPU, "
              f"{ing['overhead_vs_extract_alone_pct'][0]:.1f}% wall")
    print(f"  target <= 20% (judged on CPU time, same run): {'MET' if ok else 'NOT MET'}")


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic base vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000, help="synthetic queries")
    ap.add_argument("--threads", type=int, default=2, help="faiss.omp_set_num_threads and torch threads")
    ap.add_argument("--clusters", type=int, default=1024, help="mixture components")
    ap.add_argument("--subspace", type=int, default=16, help="intrinsic dimension of each cluster")
    ap.add_argument("--spread", type=float, default=0.6, help="std (norm) of the in-subspace offset")
    ap.add_argument("--noise", type=float, default=0.25, help="std (norm) of the isotropic noise")
    ap.add_argument("--train-per-list", type=int, default=40, help="IVF training vectors per list (wiki: 30-256)")
    ap.add_argument("--min-time", type=float, default=0.2, help="repeat a search (best of) at least this long")
    ap.add_argument("--chunk", type=int, default=100_000, help="vectors per add() call (progress)")
    ap.add_argument("--only", nargs="*", help="regexes: build only matching factories (Flat is the baseline)")
    ap.add_argument("--model", default="efficientnet_lite0", help="backbone for the real descriptors")
    ap.add_argument("--images", help="folder of images for parts 2-3 (default: densekit data sample frames)")
    ap.add_argument("--extract-pass", action="store_true",
                    help="also time extraction alone in a separate pass (a cross-check of the in-run timing)")
    ap.add_argument("--holdout", type=int, default=4, help="every Nth frame's segments are real queries")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--scratch", default=None, help="folder for temporary files (default: system temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write all figures to this JSON file")
    args = ap.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    load0 = os.getloadavg()
    result: dict[str, Any] = {
        "args": vars(args),
        "faiss": faiss.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_start": load0,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    _progress(f"faiss {faiss.__version__}, {args.threads} threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"load average {load0[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.skip_synthetic:
        _progress(f"synthetic: {args.n:,} base + {args.queries:,} query vectors, D={args.dim}")
        mix = make_mixture(args.dim, args.clusters, args.subspace, args.spread, args.noise, args.seed)
        xb = sample_mixture(mix, args.n, args.seed + 1)
        xq = sample_mixture(mix, args.queries, args.seed + 2)
        rows, extra = run_suite("synthetic", xb, xq, args)
        del xb
        result["synthetic_rows"], result["synthetic_extra"] = [asdict(r) for r in rows], extra
        print_table(f"synthetic mixture ({args.clusters} clusters, {args.subspace}-d subspaces)", rows, extra,
                    args.threads)
    if not args.skip_real:
        real = run_real(args)
        print_table(f"real segment descriptors ({args.model})", real["real_rows"], real["real_extra"], args.threads)
        print_ingest(real["ingest"], args.model, args.threads)
        result["real_rows"] = [asdict(r) for r in real["real_rows"]]
        result["real_extra"] = real["real_extra"]
        result["ingest"] = real["ingest"]
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - _T0
    print()
    print(f"wall {result['wall_s']:.0f}s; load average (1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/"
          f"{load0[2]:.1f}, at end {result['loadavg_end'][0]:.1f}/{result['loadavg_end'][1]:.1f}/"
          f"{result['loadavg_end'][2]:.1f} on {os.cpu_count()} CPUs (a load above the thread count slows "
          "every row; the x-exact ratios are measured under the same load)")
    if args.json:
        from densekit.serve.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=1, default=float))
        _progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
