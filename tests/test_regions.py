"""Region hierarchy (UCM) and region-pair sampling for the hiergroup objective."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("higra")

from densekit.train.regions import (  # noqa: E402
    build_hierarchy,
    edge_map,
    grid_labels,
    sample_region_pairs,
    ucm_image,
)


def two_flat_regions(h: int = 48, w: int = 64, split: int = 24, seed: int = 0) -> np.ndarray:
    """Left part dark, right part bright, +-3 grey levels of noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, np.int32)
    img[:, split:] = 200
    img += rng.integers(-3, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("attribute", ["dynamics", "area", "volume"])
def test_top_merge_separates_two_flat_regions(attribute: str) -> None:
    img = two_flat_regions()
    hier = build_hierarchy(img, attribute)
    top = hier.top_merge_labels()
    assert np.unique(top).size == 2
    left = top[:, :24]
    right = top[:, 24:]
    assert np.unique(left).size == 1 and np.unique(right).size == 1 and left[0, 0] != right[0, 0]
    # ultrametric: pixels across the boundary merge at the root (1.0), pixels inside a region merge below sigma_p
    a = np.ravel_multi_index((np.arange(48), np.full(48, 3)), (48, 64))
    b = np.ravel_multi_index((np.arange(48), np.full(48, 60)), (48, 64))
    assert np.allclose(hier.distance(a, b), 1.0)
    assert (hier.distance(a, np.roll(a, 7)) <= 0.8).all()
    assert (hier.labels_at(0.8) == top).all()
    # the UCM image has its contour exactly on the region boundary
    ucm = ucm_image(hier)
    assert np.allclose(ucm[:, 23], 1.0) and ucm[:, :22].max() <= 0.8 and ucm[:, 25:].max() <= 0.8


def test_edge_map_peaks_on_the_boundary() -> None:
    e = edge_map(two_flat_regions())
    assert e.shape == (48, 64) and e.dtype == np.float32
    assert e[:, 22:26].min() > 10 * e[:, :18].max()


def test_flat_image_is_one_region_and_has_no_negatives() -> None:
    img = np.full((32, 32, 3), 90, np.uint8)
    lab = build_hierarchy(img).labels_at(0.8)
    assert np.unique(lab).size == 1
    s = sample_region_pairs(lab[::4, ::4], lab[::4, ::4], np.random.default_rng(0))
    assert s["valid"].all() and not s["neg_valid"].any()


def test_sampling_counts_and_region_membership() -> None:
    labels1 = np.repeat(np.arange(3), 24).reshape(6, 12)  # 3 regions, stripes
    labels2 = np.fliplr(labels1).copy()
    s = sample_region_pairs(labels1, labels2, np.random.default_rng(1), regions=7, positives=10, negatives=5)
    assert s["anchor"].shape == (70,) and s["positive"].shape == (70,) and s["negative"].shape == (70, 5)
    assert s["valid"].all() and s["neg_valid"].all()
    f1, f2 = labels1.reshape(-1), labels2.reshape(-1)
    assert (f1[s["anchor"]] == s["region"]).all()
    assert (f2[s["positive"]] == s["region"]).all()
    assert (f2[s["negative"]] != s["region"][:, None]).all()
    # every region gets 10 consecutive pairs, and with only 3 regions all of them are used
    assert (s["region"].reshape(7, 10) == s["region"].reshape(7, 10)[:, :1]).all()
    assert set(s["region"].tolist()) == {0, 1, 2}


def test_grid_labels_follow_crop_and_flip() -> None:
    labels = np.zeros((40, 80), np.int32)
    labels[:, 40:] = 1
    # full frame: left half of the grid 0, right half 1; flipped box: mirrored
    g = grid_labels(labels, (40, 80), (0.0, 0.0, 80.0, 40.0), (4, 8))
    assert (g[:, :4] == 0).all() and (g[:, 4:] == 1).all()
    gf = grid_labels(labels, (40, 80), (80.0, 0.0, 0.0, 40.0), (4, 8))
    assert (gf == g[:, ::-1]).all()
    # a crop of the right quarter only sees region 1; labels computed at half resolution map the same way
    assert (grid_labels(labels[::2, ::2], (40, 80), (60.0, 0.0, 80.0, 40.0), (4, 4)) == 1).all()


def test_transform_pairs_respect_the_hierarchy_at_sigma_p() -> None:
    """Positives of the hiergroup transform have ultrametric distance <= sigma_p, negatives > sigma_p."""
    from densekit.train.objectives.hiergroup import HierGroupTransform

    img = two_flat_regions(64, 64, split=28, seed=3)
    hier = build_hierarchy(img)
    tf = HierGroupTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 8, size=64, scale=(0.5, 1.0), cns=2)
    checked = 0
    for seed in range(4):
        out = tf([img], np.random.default_rng(seed))
        assert out["anchor"].shape == (70,) and out["negative"].shape == (70, 5) and out["cross_idx"].shape == (70, 2)
        grid = out["labels1"].shape

        def pixel(cells: np.ndarray, box: np.ndarray) -> np.ndarray:
            i, j = np.unravel_index(cells, grid)
            x = box[0] + (j + 0.5) / grid[1] * (box[2] - box[0])
            y = box[1] + (i + 0.5) / grid[0] * (box[3] - box[1])
            return np.ravel_multi_index((np.floor(y).astype(int), np.floor(x).astype(int)), (64, 64))

        v = out["valid"] > 0
        pa = pixel(out["anchor"][v], out["box1"])
        pp = pixel(out["positive"][v], out["box2"])
        assert (hier.distance(pa, pp) <= 0.8).all()
        nv = out["neg_valid"][v] > 0
        pn = pixel(out["negative"][v], out["box2"])
        d_neg = hier.distance(np.repeat(pa[:, None], 5, axis=1), pn)
        assert (d_neg[nv] > 0.8).all()
        checked += int(nv.sum())
    assert checked > 0
