import numpy as np
import pytest

from densekit.serve.errors import DensekitError
from densekit.serve.viz import pca_rgb


def test_pca_rgb_separates_two_regions_and_resizes() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 0.01, size=(16, 8, 10))
    feats[:, :, :5] += rng.normal(size=(16, 1, 1))  # left half: one direction, right half: another
    feats[:, :, 5:] += rng.normal(size=(16, 1, 1))
    rgb = pca_rgb(feats)
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    left, right = rgb[:, :5].reshape(-1, 3).astype(int), rgb[:, 5:].reshape(-1, 3).astype(int)
    # within a region colours barely vary on the first component; across regions they differ a lot
    assert abs(left[:, 0].mean() - right[:, 0].mean()) > 150
    assert left[:, 0].std() < 20 and right[:, 0].std() < 20
    big = pca_rgb(feats, size=(32, 40))
    assert big.shape == (32, 40, 3)
    assert np.array_equal(big[::4, ::4], rgb)


def test_pca_rgb_rejects_wrong_shape() -> None:
    with pytest.raises(DensekitError):
        pca_rgb(np.zeros((4, 4)))
