"""The shared view augmentation (densekit.train.augment): boxes, resampling, photometric ops, normalisation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from skimage import data as skdata

from densekit.serve.errors import DensekitError
from densekit.train.augment import (MOCO_V2, Photometric, RandomView, cell_locations, crop_resize, luma, normalize,
                                    random_box, random_resized_crop, view_size)


def test_random_resized_crop_stays_inside_and_follows_the_scale() -> None:
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(200):
        top, left, h, w = random_resized_crop(rng, 60, 90, (0.3, 0.6))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        areas.append(h * w / (60 * 90))
    assert 0.25 < min(areas) and max(areas) < 0.66  # rounding moves the area a little off [0.3, 0.6]
    # an impossible ratio falls back to the centre crop with the ratio clamped (torchvision's rule)
    top, left, h, w = random_resized_crop(rng, 10, 100, (1.0, 1.0), ratio=(1.0, 1.0))
    assert (h, w) == (10, 10) and left == 45 and top == 0


def test_random_box_flips_with_its_probability() -> None:
    rng = np.random.default_rng(1)
    boxes = [random_box(rng, 40, 40, (0.5, 1.0)) for _ in range(400)]
    flipped = np.mean([b[0] > b[2] for b in boxes])
    assert 0.4 < flipped < 0.6
    assert not any(b[0] > b[2] for b in (random_box(rng, 40, 40, (0.5, 1.0), p_flip=0.0) for _ in range(50)))


@pytest.mark.parametrize("resample", ["warp", "resize"])
def test_crop_resize_shows_the_box_content_and_its_flip(resample: str) -> None:
    ramp = np.tile(np.arange(64, dtype=np.float32)[None, :, None] / 64, (32, 1, 3))
    v = crop_resize(ramp, (16.0, 0.0, 48.0, 32.0), (32, 32), resample)
    assert np.abs(v[0, :, 0] - ramp[0, 16:48, 0]).max() < 1e-5
    vf = crop_resize(ramp, (48.0, 0.0, 16.0, 32.0), (32, 32), resample)
    assert np.abs(vf[0, :, 0] - ramp[0, 16:48, 0][::-1]).max() < 1e-5
    # shrinking by 2: warp samples between two pixels, resize averages them; both give the pair's mean
    half = crop_resize(ramp, (0.0, 0.0, 64.0, 32.0), (16, 32), resample)
    assert np.abs(half[0, :, 0] - (ramp[0, 0::2, 0] + ramp[0, 1::2, 0]) / 2).max() < 1e-5


def test_photometric_ops() -> None:
    img = skdata.astronaut()[::4, ::4]
    rng = np.random.default_rng(0)
    gray = Photometric(p_jitter=0.0, p_gray=1.0, p_blur=0.0)(img, rng)
    assert gray.dtype == np.float32 and np.allclose(gray[..., 0], gray[..., 2])
    assert np.allclose(gray[..., 0], luma(img.astype(np.float32) / 255), atol=1e-6)
    plain = Photometric(p_jitter=0.0, p_gray=0.0, p_blur=0.0)(img, rng)
    assert np.array_equal(plain, img.astype(np.float32) / 255)
    sol = Photometric(p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=1.0)(img, rng)
    assert np.allclose(sol, np.where(plain >= 0.5, 1 - plain, plain))
    blurred = Photometric(p_jitter=0.0, p_gray=0.0, p_blur=1.0, blur_sigma=(2.0, 2.0))(img, rng)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.6 * np.abs(np.diff(plain, axis=1)).mean()
    jittered = [MOCO_V2(img, np.random.default_rng(s)) for s in range(4)]
    assert all(0.0 <= j.min() and j.max() <= 1.0 for j in jittered)
    assert len({j.tobytes() for j in jittered}) == 4


def test_solarize_none_makes_no_draw_and_zero_makes_one() -> None:
    img = skdata.coffee()[::8, ::8]
    off, zero = Photometric(p_solarize=None), Photometric(p_solarize=0.0)
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(off(img, r1), zero(img, r2))  # the same picture ...
    assert r1.random() != r2.random()  # ... but zero consumed one more number


def test_random_view_is_deterministic_picklable_and_normalised() -> None:
    img = skdata.chelsea()[::2, ::2]
    view = pickle.loads(pickle.dumps(RandomView(MOCO_V2, scale=(0.3, 1.0))))
    a, box_a = view(img, (48, 64), np.random.default_rng(7))
    b, box_b = view(img, (48, 64), np.random.default_rng(7))
    assert a.shape == (48, 64, 3) and np.array_equal(a, b) and box_a == box_b
    x = normalize(a, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    assert x.shape == (3, 48, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    assert np.allclose(x[1] * 0.25 + 0.4, a[..., 1], atol=1e-6)


def test_view_size_and_cell_locations() -> None:
    assert view_size((70, 100), 0, 32) == (64, 96) and view_size((70, 100), 48, 16) == (48, 48)
    with pytest.raises(DensekitError):
        view_size((20, 100), 0, 32)
    boxes = torch.tensor([[8.0, 0.0, 40.0, 16.0], [40.0, 0.0, 8.0, 16.0]])  # the second is the flipped first
    loc = cell_locations(boxes, (16, 32), (2, 4))
    assert loc.shape == (2, 8, 2)
    assert torch.allclose(loc[0, :4, 0], torch.tensor([12.0, 20.0, 28.0, 36.0]))
    assert torch.allclose(loc[0, :, 1], torch.tensor([4.0] * 4 + [12.0] * 4))
    assert torch.allclose(loc[1, :4, 0], loc[0, :4, 0].flip(0))


def test_cell_centres_is_the_one_box_form_of_cell_locations() -> None:
    from densekit.train.augment import cell_centres

    box = (50.0, 4.0, 10.0, 36.0)  # flipped
    xs, ys = cell_centres(box, (4, 5))
    loc = cell_locations(torch.tensor([box], dtype=torch.float64), (32, 40), (4, 5))[0].numpy()
    assert np.allclose(loc[:, 0], np.tile(xs, 4)) and np.allclose(loc[:, 1], np.repeat(ys, 5))
    assert xs[0] == 46.0 and xs[-1] == 14.0 and ys[0] == 8.0
