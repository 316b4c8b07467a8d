"""NaViT-style packing (densekit.train.packing): packed = alone, the packer's bounds, errors, determinism."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from densekit.serve.backbones import build_backbone
from densekit.serve.errors import DensekitError
from densekit.train.packing import (
    PackCollate, Stream, drop_tokens, first_fit, native_grid, packed_blocks, packed_embed, packed_forward,
    padding_fraction, patchify, segment_mean, segment_softmax, stream_for, unpack,
)
from densekit.train.vit import ViTAdapter

#: patch grids (h, w) of the test images: different sizes and aspect ratios, one single patch
GRIDS = [(2, 3), (4, 4), (3, 1), (1, 1), (2, 5)]
PATCH = 8


def _vit(**kwargs) -> ViTAdapter:
    torch.manual_seed(0)
    bb = build_backbone("timm:vit_tiny_patch16_224",
                        kwargs={"depth": 2, "patch_size": PATCH, "img_size": 32, **kwargs}).eval()
    return ViTAdapter(bb)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, h * PATCH, w * PATCH)).astype(np.float32) for h, w in GRIDS]


def _samples(images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    out = []
    for im in images:
        p, c, g = patchify(im, PATCH)
        out.append({"patches": p, "coords": c, "grid": g})
    return out


def _alone(vit: ViTAdapter, image: np.ndarray) -> torch.Tensor:
    return vit.model.forward_features(torch.from_numpy(image)[None])[0]


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "no_embed_class": True}], ids=["cls", "cls+registers"])
def test_packed_forward_equals_each_image_alone(kwargs: dict) -> None:
    vit = _vit(**kwargs)
    images = _images()
    batch = PackCollate((stream_for(vit, 40),))(_samples(images))
    assert batch["patches"].shape[0] >= 2  # several sequences, several images in at least one of them
    assert int(batch["num_images"]) == len(images)
    with torch.no_grad():
        packed = packed_forward(vit, batch)
        worst = 0.0
        for i, im in enumerate(images):
            alone = _alone(vit, im)  # (P + n, D): prefix tokens, then patches in raster order
            got = packed[batch["seg"] == i]
            assert got.shape == alone.shape
            worst = max(worst, float((got - alone).abs().max()))
        assert worst < 1e-5, worst

        # Without the block-diagonal mask (one segment per sequence) the images see each other.
        content, pos = packed_embed(vit, batch["patches"], batch["coords"], batch["seg"], batch["is_prefix"],
                                    batch["grid"])
        out = packed_blocks(vit, content + pos, torch.where(batch["seg"] >= 0, 0, -1))
        i = next(i for i in range(len(images)) if _neighbours(batch["seg"], i))
        assert (out[batch["seg"] == i] - _alone(vit, images[i])).abs().max() > 1e-3


def _neighbours(seg: torch.Tensor, i: int) -> set[int]:
    """The other images in image i's sequence."""
    row = seg[(seg == i).any(1)][0]
    return {int(j) for j in row.unique() if j >= 0 and j != i}


def test_other_images_and_padding_change_nothing() -> None:
    vit = _vit()
    images = _images()
    col = PackCollate((Stream(seq_len=64, prefix=vit.num_prefix_tokens),))
    a = col(_samples(images))
    changed = [im.copy() for im in images]
    changed[1] = changed[1] * 3.0 + 1.0
    b = col(_samples(changed))
    assert torch.equal(a["seg"], b["seg"])  # same sizes, same packing
    b["patches"][b["seg"] < 0] = 7.0  # garbage in the padding
    with torch.no_grad():
        ya, yb = packed_forward(vit, a), packed_forward(vit, b)
    assert 1 in _neighbours(a["seg"], 0)
    same = a["seg"] != 1
    assert torch.equal(ya[same], yb[same])  # exactly, padding included
    assert not torch.equal(ya[a["seg"] == 1], yb[a["seg"] == 1])


def test_first_fit_never_exceeds_the_sequence_length() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        lengths = [int(n) for n in rng.integers(1, 30, size=int(rng.integers(1, 20)))]
        where = first_fit(lengths, 30)
        fill: dict[int, list[tuple[int, int]]] = {}
        for (s, o), n in zip(where, lengths):
            assert 0 <= o and o + n <= 30
            fill.setdefault(s, []).append((o, o + n))
        for spans in fill.values():  # no overlaps
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        # first fit: an item of a later sequence did not fit into an earlier one, so any two fills exceed L
        used = [sum(b - a for a, b in fill[k]) for k in sorted(fill)]
        assert all(used[i] + used[j] > 30 for i in range(len(used)) for j in range(i + 1, len(used)))
        assert first_fit(lengths, 30) == where  # a pure function of the lengths


def test_images_too_large_for_the_sequence_are_one_clear_error() -> None:
    with pytest.raises(DensekitError, match="more than the packed sequence length 10") as err:
        first_fit([4, 12, 3], 10)
    assert "\n" not in str(err.value)
    vit = _vit()
    big = _samples([np.zeros((3, 4 * PATCH, 4 * PATCH), np.float32)])  # 16 patches + CLS
    with pytest.raises(DensekitError, match="17 tokens, more than the packed sequence length 16"):
        PackCollate((stream_for(vit, 16),))(big)
    with pytest.raises(DensekitError, match="need 2 packed sequences"):
        first_fit([6, 6], 10, num_seqs=1)


def test_collate_is_deterministic_and_picklable() -> None:
    vit = _vit()
    col = PackCollate((stream_for(vit, 40, tokens=("flag",)),))
    samples = _samples(_images())
    for s in samples:
        s["flag"] = np.arange(len(s["patches"])) % 2 == 0
        s["extra"] = np.ones(3, np.float32)
    a = col(samples)
    b = pickle.loads(pickle.dumps(col))(samples)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["flag"].shape == a["seg"].shape and a["extra"].shape == (len(samples), 3)
    assert 0.0 <= padding_fraction(a["seg"]) < 1.0


def test_pooling_and_unpacking_per_image() -> None:
    vit = _vit()
    images = _images()
    batch = PackCollate((stream_for(vit, 40),))(_samples(images))
    x = torch.randn(*batch["seg"].shape, 6)
    x[batch["seg"] < 0] = 1e6  # padding must never count
    patch = ~batch["is_prefix"]
    pooled = segment_mean(x, batch["seg"], len(images), select=patch)
    tokens, valid = unpack(x, batch["seg"], batch["tok"], len(images))
    for i, (h, w) in enumerate(GRIDS):
        mine = x[(batch["seg"] == i) & patch]
        assert torch.allclose(pooled[i], mine.mean(0), atol=1e-5)
        assert int(valid[i].sum()) == h * w and torch.equal(tokens[i, : h * w], mine)
    sm = segment_softmax(x[..., 0], batch["seg"], len(images), select=patch)
    for i in range(len(images)):
        assert abs(float(sm[(batch["seg"] == i)].sum()) - 1.0) < 1e-5
    assert float(sm[batch["seg"] < 0].abs().sum()) == 0.0


def test_token_dropping_and_native_grids() -> None:
    rng = np.random.default_rng([0, 3, 1])
    keep = drop_tokens(rng, 10, 0.75)
    assert len(keep) == 2 and np.all(np.diff(keep) > 0)
    assert len(drop_tokens(rng, 3, 0.9)) == 1  # at least one token stays
    assert np.array_equal(drop_tokens(np.random.default_rng([0, 3, 1]), 10, 0.75), keep)
    p, c, g = patchify(np.arange(3 * 16 * 24, dtype=np.float32).reshape(3, 16, 24), 8)
    assert p.shape == (6, 192) and tuple(g) == (2, 3) and tuple(c[4]) == (1, 1)
    assert p[4, 0] == 8 * 24 + 8  # patch (1, 1) starts at pixel (8, 8) of channel 0
    for aspect in (0.5, 1.0, 2.0):
        h, w = native_grid(np.random.default_rng(0), aspect, 8, 2)
        assert 1 <= h <= 8 and 1 <= w <= 8 and abs(w / h - aspect) < 0.6
    with pytest.raises(DensekitError):
        patchify(np.zeros((3, 10, 16), np.float32), 8)
