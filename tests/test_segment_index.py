"""FAISS-specific parts of SegmentIndex (densekit.retrieval.segment_index): RLE, K-means, FAISS files,
IVF training, the GPU path. Behaviour shared by both vector stores (FAISS, Milvus) and the CLI are tested
in test_segment_index_backends.py.

Fast: the ``pixels`` backbone, small images, K = 6 segments per image.
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
    region_descriptor,
    rle_decode,
    rle_encode,
)
from densekit.serve.errors import DensekitError

K = 6
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _photos() -> list[np.ndarray]:
    return [cv2.resize(getattr(skimage.data, n)(), (128, 96)) for n in PHOTOS]


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus()


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


def test_lost_faiss_file_is_rebuilt_and_orphans_deleted(tmp_path: Path) -> None:
    photos = _photos()
    root = tmp_path / "idx"
    with SegmentIndex.create(root, "pixels", segments_per_image=K) as idx:
        idx.add_images(photos)
        first = [(h.segment_id, round(h.score, 5)) for h in idx.search(photos[3], point=(60, 40), k=5)]
    # a crash between writing a new FAISS generation and committing SQLite leaves an orphan file;
    # losing the committed file is repaired from the descriptors kept in SQLite
    (root / "segments-999.faiss").write_bytes(b"orphan")
    for f in root.glob("segments-*.faiss"):
        if f.name != "segments-999.faiss":
            f.unlink()
    with SegmentIndex.open(root) as idx:
        assert idx._index.ntotal == idx.n_segments
        rebuilt = [(h.segment_id, round(h.score, 5)) for h in idx.search(photos[3], point=(60, 40), k=5)]
    assert rebuilt == first and len(first) == 5
    assert not (root / "segments-999.faiss").exists()
    assert len(list(root.glob("segments-*.faiss"))) == 1


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


def test_refine_factory_adds_with_ids_and_reranks_exactly(tmp_path: Path) -> None:
    import faiss

    rng = np.random.default_rng(1)
    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    crops = []
    for i in range(60):  # 60 x 6 segments = 360 >= 39 * 2 + 256 (IVF + PQ training points)
        p = photos[i % 4]
        y, x = rng.integers(0, p.shape[0] - 64), rng.integers(0, p.shape[1] - 64)
        crops.append(np.ascontiguousarray(p[y : y + 64, x : x + 64]))
    with SegmentIndex.create(tmp_path / "rf", "pixels", factory="IVF2,PQ8,RFlat", segments_per_image=K,
                             nprobe=2) as idx:
        idx.add_images(crops)
        assert idx._index.is_trained and idx._index.ntotal == idx.n_segments
        refine = faiss.downcast_index(faiss.downcast_index(idx._index).index)
        assert isinstance(refine, faiss.IndexRefine) and refine.k_factor == 4
        hits = [idx.search(crops[i], point=(32, 32), k=3) for i in (7, 20, 41)]
    with SegmentIndex.create(tmp_path / "flat", "pixels", segments_per_image=K) as exact_idx:
        exact_idx.add_images(crops)
        exact = [exact_idx.search(crops[i], point=(32, 32), k=3) for i in (7, 20, 41)]
    # All lists visited (nprobe = nlist) and 4x the candidates re-ranked by exact scores: the same hits and
    # scores as exact search, not PQ's approximations.
    for got, want in zip(hits, exact):
        assert [h.segment_id for h in got] == [h.segment_id for h in want]
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_ivf_pq_factory_skips_polysemous_training() -> None:
    import faiss

    from densekit.retrieval.segment_index import _new_index

    index = _new_index(32, "IVF2,PQ8")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and ivf.do_polysemous_training is False
    assert _new_index(32, "IDMap,Flat").metric_type == faiss.METRIC_INNER_PRODUCT


@pytest.mark.skipif(_faiss_gpus() == 0, reason="faiss sees no GPU (faiss-cpu build or no CUDA device)")
def test_gpu_search_matches_cpu(tmp_path: Path) -> None:
    photos = _photos()
    root = tmp_path / "flat"
    with SegmentIndex.create(root, "pixels", segments_per_image=K) as idx:
        idx.add_images(photos)
        cpu = idx.search(photos[1], point=(60, 50), k=8)
    with SegmentIndex.open(root, gpu=True) as idx:
        gpu = idx.search(photos[1], point=(60, 50), k=8)
        assert idx._store._search_index() is not idx._index  # searched on the index_cpu_to_all_gpus clone
        with pytest.raises(DensekitError, match="GPU limit"):
            idx.search(photos[1], point=(60, 50), k=4096)
    assert [h.segment_id for h in gpu] == [h.segment_id for h in cpu]
    assert np.allclose([h.score for h in gpu], [h.score for h in cpu], atol=1e-4)
    with SegmentIndex.create(tmp_path / "hnsw", "pixels", factory="HNSW32", segments_per_image=K):
        pass
    with pytest.raises(DensekitError, match="no GPU HNSW"):
        SegmentIndex.open(tmp_path / "hnsw", gpu=True)


@pytest.mark.skipif(_faiss_gpus() > 0, reason="faiss sees a GPU: the request is valid here")
def test_gpu_request_without_gpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DensekitError, match="faiss sees no GPU"):
        SegmentIndex.create(tmp_path / "idx", "pixels", gpu=True)
    assert not (tmp_path / "idx" / "meta.sqlite").exists()


class _CountingExtractor:
    """The real ``pixels`` extractor, counting its forward passes."""

    def __init__(self) -> None:
        from densekit.serve.extractor import FeatureExtractor

        self.inner = FeatureExtractor("pixels")
        self.meta = self.inner.meta
        self.calls = 0

    def __call__(self, image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        self.calls += 1
        return self.inner(image, size=size)


def test_query_region_runs_the_model_once_and_returns_region_descriptor_and_hits(tmp_path: Path) -> None:
    photos = _photos()
    model = _CountingExtractor()
    with SegmentIndex.create(tmp_path / "idx", model, segments_per_image=K) as idx:
        added = idx.add_images(photos).added
        model.calls = 0
        found = idx.query_region(photos[2], point=(70, 30), k=4)
        assert model.calls == 1
        H, W = photos[2].shape[:2]
        assert found.mask.shape == (H, W) and found.mask.dtype == bool and found.mask[30, 70]
        # the query image is indexed: its own K-means segment under the point comes first, same pixels, cosine 1
        top = found.hits[0]
        assert top.image_id == added[2]
        assert top.score == pytest.approx(1.0, abs=1e-4) and np.array_equal(top.mask, found.mask)
        assert [h.segment_id for h in found.hits] == [h.segment_id for h in idx.search(photos[2], point=(70, 30), k=4)]
        feats = model.inner(photos[2])
        assert found.cells.shape == feats.shape[1:]
        assert np.allclose(found.descriptor, region_descriptor(feats, found.cells), atol=1e-6)
        assert float(np.linalg.norm(found.descriptor)) == pytest.approx(1.0, abs=1e-5)

        box = idx.query_region(photos[0], box=(0, 0, 64, 48), k=2)
        ys, xs = np.nonzero(box.mask)
        assert box.mask[:48, :64].all() and not box.mask[48:].any() and not box.mask[:, 64:].any()
        assert (ys.max(), xs.max()) == (47, 63)
        whole = idx.query_region(photos[0], k=2)
        assert whole.mask.all() and not np.allclose(whole.descriptor, box.descriptor)
        with pytest.raises(DensekitError, match="outside"):
            idx.query_region(photos[0], point=(128, 0))
