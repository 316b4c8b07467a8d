"""The loss modules (densekit.train.losses), each on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densekit.serve.errors import DensekitError
from densekit.train.losses import (BYOLLoss, CovarianceLoss, DenseInfoNCELoss, GlobalInfoNCELoss, InfoNCELoss,
                                   InvarianceLoss, PixelContrastLoss, VarianceLoss, VICRegLLocalLoss, VICRegLoss)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- VICReg terms ---------------------------------------------------------------------------------


def test_variance_is_zero_when_every_std_is_at_least_one() -> None:
    x = torch.randn(4096, 8, generator=_gen()) * 3.0
    assert VarianceLoss()(x) == 0.0
    # one dimension with std 0.5: the hinge is (1 - 0.5) averaged over 8 dimensions
    x[:, 3] = x[:, 3] / x[:, 3].std() * 0.5
    assert float(VarianceLoss(eps=0.0)(x)) == pytest.approx(0.5 / 8, rel=1e-4)
    # collapse: every sample the same -> 1 - sqrt(eps) per dimension
    assert float(VarianceLoss(eps=1e-4)(torch.ones(16, 8))) == pytest.approx(1 - 1e-2)
    # (N, k, C): per slot, then averaged
    slots = torch.stack([torch.randn(512, 4, generator=_gen(1)) * 2, torch.zeros(512, 4)], dim=1)
    assert float(VarianceLoss(eps=0.0)(slots)) == pytest.approx(0.5)


def test_covariance_is_zero_for_decorrelated_dimensions() -> None:
    # centred +-1 columns that are orthogonal (a Hadamard matrix without its constant column)
    h = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    assert float(CovarianceLoss()(h)) == 0.0
    # two identical columns of variance v: off-diagonal entries v, v -> (2 v^2) / C
    a = torch.randn(64, 1, generator=_gen(2))
    v = float(a.var())
    assert float(CovarianceLoss()(torch.cat([a, a], dim=1))) == pytest.approx(2 * v * v / 2, rel=1e-5)
    # (N, k, C) is the mean over slots of the 2-D value
    x = torch.randn(32, 3, 5, generator=_gen(3))
    per_slot = torch.stack([CovarianceLoss()(x[:, i]) for i in range(3)]).mean()
    assert torch.allclose(CovarianceLoss()(x), per_slot, atol=1e-6)


def test_variance_and_covariance_need_two_samples() -> None:
    with pytest.raises(DensekitError, match="at least 2"):
        VarianceLoss()(torch.randn(1, 4))
    with pytest.raises(DensekitError, match="at least 2"):
        CovarianceLoss()(torch.randn(1, 4))


def test_vicreg_loss_combines_the_terms_with_their_coefficients() -> None:
    x, y = torch.randn(16, 6, generator=_gen(4)), torch.randn(16, 6, generator=_gen(5))
    t = VICRegLoss(inv_coeff=2.0, var_coeff=3.0, cov_coeff=5.0)(x, y)
    assert torch.allclose(t["inv"], 2.0 * InvarianceLoss()(x, y))
    assert torch.allclose(t["var"], 3.0 * (VarianceLoss()(x) + VarianceLoss()(y)) / 2)
    assert torch.allclose(t["cov"], 5.0 * (CovarianceLoss()(x) + CovarianceLoss()(y)) / 2)
    assert float(VICRegLoss()(x, x)["inv"]) == 0.0


def test_local_loss_invariance_vanishes_for_identical_maps_only() -> None:
    m = torch.randn(4, 9, 5, generator=_gen(6))
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1).reshape(1, 9, 2)
    loc = grid.expand(4, -1, -1)
    loss = VICRegLLocalLoss(num_matches=4)
    same = loss(m, m.clone(), loc, loc)
    assert float(same["inv_feat"]) == 0.0 and float(same["inv_loc"]) == 0.0 and float(same["var"]) > 0
    other = loss(m, torch.randn(4, 9, 5, generator=_gen(7)), loc, loc)
    assert float(other["inv_feat"]) > 0.1 and float(other["inv_loc"]) > float(other["inv_feat"])


# -- InfoNCE --------------------------------------------------------------------------------------


def test_info_nce_falls_as_positives_align() -> None:
    neg = torch.full((8, 16), 0.1)
    losses = [float(InfoNCELoss(0.2)(torch.full((8,), p), neg)) for p in (-0.5, 0.0, 0.5, 1.0)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    # a positive no better than the K negatives: log(K + 1)
    assert float(InfoNCELoss(0.2)(torch.full((8,), 0.1), neg)) == pytest.approx(math.log(17), rel=1e-6)
    with pytest.raises(ValueError):
        InfoNCELoss(0.0)


def test_global_info_nce_is_cross_entropy_over_key_and_queue() -> None:
    q = F.normalize(torch.randn(4, 8, generator=_gen(8)), dim=1)
    k = F.normalize(torch.randn(4, 8, generator=_gen(9)), dim=1)
    queue = F.normalize(torch.randn(8, 10, generator=_gen(10)), dim=0)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(GlobalInfoNCELoss(0.2)(q, k, queue), expected)
    assert float(GlobalInfoNCELoss(0.2)(q, q, queue)) < float(GlobalInfoNCELoss(0.2)(q, k, queue))


def test_dense_info_nce_follows_the_correspondence() -> None:
    q = F.normalize(torch.randn(2, 8, 6, generator=_gen(11)), dim=1)
    perm = torch.stack([torch.randperm(6, generator=_gen(12)) for _ in range(2)])
    k = torch.gather(q, 2, perm.unsqueeze(1).expand(-1, 8, -1))  # key location j holds query perm[j]
    match = torch.argsort(perm, dim=1)  # the key location holding query i
    queue = F.normalize(torch.randn(8, 32, generator=_gen(13)), dim=0)
    loss = DenseInfoNCELoss(0.2)
    right = float(loss(q, k, match, queue))
    wrong = float(loss(q, k, torch.arange(6).expand(2, -1), queue))
    assert right < wrong
    # with the right match every positive cosine is 1
    expected = InfoNCELoss(0.2)(torch.ones(12), q.transpose(1, 2).reshape(-1, 8) @ queue)
    assert right == pytest.approx(float(expected), rel=1e-5)


def _pixel_batch(b: int = 2, n: int = 6, k: int = 3, cells: int = 16) -> dict[str, torch.Tensor]:
    g = _gen(14)
    return {"anchor": torch.randint(0, cells, (b, n), generator=g),
            "positive": torch.randint(0, cells, (b, n), generator=g),
            "negative": torch.randint(0, cells, (b, n, k), generator=g), "valid": torch.ones(b, n),
            "neg_valid": torch.ones(b, n, k), "cross_idx": torch.randint(0, cells, (b, n, 2), generator=g),
            "cross_shift": torch.randint(0, 100, (b, n, 2), generator=g)}


def test_pixel_contrast_prefers_matching_cells_and_ignores_invalid_anchors() -> None:
    z1 = F.normalize(torch.randn(2, 8, 16, generator=_gen(15)), dim=1)
    z2 = F.normalize(torch.randn(2, 8, 16, generator=_gen(16)), dim=1)
    p = _pixel_batch()
    loss = PixelContrastLoss(0.1)

    def args(q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        keys = ("anchor", "positive", "negative", "valid", "neg_valid", "cross_idx", "cross_shift")
        return tuple(q[key] for key in keys)

    base = loss(z1, z2, *args(p))
    aligned = loss(z1, z1.clone(), *args({**p, "positive": p["anchor"]}))  # positive = the anchor's own vector
    assert float(aligned["loss"]) < float(base["loss"])
    assert float(aligned["pos_sim"]) == pytest.approx(1.0, abs=1e-6)
    assert float(aligned["pos_sim"]) > float(aligned["neg_sim"])
    # anchors marked invalid do not count: changing their positives changes nothing
    half = {**p, "valid": torch.cat([torch.ones(2, 3), torch.zeros(2, 3)], 1)}
    moved = {**half, "positive": torch.cat([half["positive"][:, :3], (half["positive"][:, 3:] + 1) % 16], 1)}
    assert torch.equal(loss(z1, z2, *args(half))["loss"], loss(z1, z2, *args(moved))["loss"])
    assert float(loss(z1, z2, *args(half))["anchors"]) == 6.0


# -- BYOL -----------------------------------------------------------------------------------------


def test_byol_loss_is_two_minus_two_cosine() -> None:
    x = torch.randn(5, 7, generator=_gen(17))
    assert float(BYOLLoss()(x, 3.0 * x)) == pytest.approx(0.0, abs=1e-6)
    assert float(BYOLLoss()(x, -x)) == pytest.approx(4.0, rel=1e-6)
    e = torch.eye(4)
    assert float(BYOLLoss()(e, e.roll(1, dims=1))) == pytest.approx(2.0, rel=1e-6)
